"""What only a GPU can show, in one command and one table (about 8 minutes on one GPU).

    python bench/gpu_check.py --out out/gpu_check                 # the GPU at hand (or the CPU)
    python bench/gpu_check.py --smoke --out /tmp/gpu_check        # every part at toy size, CPU, < 2 min

Writes OUT/gpu_check.json and prints the same as a table. Each part is timed on its own; a part that
cannot run is null in the JSON with its reason under "errors" (the others still run):
    device, torch, precision       the device's name, torch's version, bf16 (fp16 where bf16 is missing)
    plain_img_per_s                a plain ResNet-50 (models.export at width 1.0) forward + backward at
                                   224 px, channels_last, synthetic images on the device: the compute limit
    us3l_img_per_s, us3l_vs_limit  the US3L training step (train_us3l.forward_backward, the step end of
                                   utils.optimizer_step_, the EMA update) on the same images, stage-2 widths
                                   [1, U(R_min, 1), R_min] for R_min 0.75 / 0.5 / 0.25; its time over the
                                   MACs-weighted plain time of the same widths (1.0: no overhead beyond compute)
    p3_time_ratio                  P3 of bench/bench_us3l_step.py in time (ResNet-18 CIFAR, batch 128)
    p4_224_ratio                   P4 of bench/bench_data.py at 224 px: the batched on-device augmentation
                                   over the torchvision DataLoader (CIFAR-10 upscaled to 224 px JPEGs)
    copy_224_ratio                 the copy of a two-view batch to the device as augment.to_device does it (per
                                   view, pinned, non_blocking, cat on the device) over the old cat-then-copy
    loader_img_per_s               loader=torch and loader=ffcv (a .beton written here from the same JPEGs)
                                   at 224 px, against us3l_img_per_s: does the loader keep up
    cifar10_knn                    the US3L quick recipe (its stride-2-stem ResNet-18, loader=device) for as many
                                   steps as fit in --knn_minutes, kNN top-1 per width before and after, wall time
    dspnet_p5                      P5 of bench/bench_dspnet.py in time (MobileNetV3-Large, 5 widths, 128 px)

Data: CIFAR-10 from --data_path (the default data/cifar10 is extracted from the shared tarball as
the trainers do); --images_224 of its images are upscaled for the 224 px parts.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_data  # noqa: E402
import bench_dspnet  # noqa: E402
import bench_us3l_step  # noqa: E402
import train_dspnet  # noqa: E402
import train_us3l  # noqa: E402
from augment import build_train_loader  # noqa: E402
from data import build_dataset, prepare_cifar10  # noqa: E402
from ffcv_data import write_beton  # noqa: E402
from models import ARCHS, calibrate_bn, export, profile, projection_mlp  # noqa: E402
from config import parse_config
from utils import ema_update_, optimizer_step_, param_groups  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FULL = {  # sizes of each part: the GPU check, and --smoke (the CPU test of the script itself)
    "gpu": dict(size=224, batch=64, repeats=10, draws=3, p3_batch=128, p3_repeats=8, images_224=2048,
                p4_batch=64, workers=min(8, os.cpu_count() or 1), loader_batches=30, p5_images=2048, p5_size=128,
                p5_batch=64, p5_dns="1.0,0.875,0.75,0.625,0.5", warmup=2),
    "smoke": dict(size=32, batch=2, repeats=1, draws=1, p3_batch=2, p3_repeats=1, images_224=24, p4_batch=8,
                  workers=0, loader_batches=2, p5_images=8, p5_size=32, p5_batch=8, p5_dns="1.0,0.5", warmup=1),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=2):
    """Median seconds of fn() over repeats, after warm-up calls (CUDA kernels, allocator, cudnn)."""
    out = []
    for r in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if r >= warmup:
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def plain_and_us3l(device, dtype, s):
    """plain_img_per_s, us3l_img_per_s, us3l_vs_limit on ResNet-50 at s["size"] px, 2 x s["batch"] images."""
    fmt = torch.channels_last
    autocast = lambda: torch.autocast(device.type, dtype)  # noqa: E731
    x = torch.randn(2 * s["batch"], 3, s["size"], s["size"], device=device).contiguous(memory_format=fmt)
    torch.manual_seed(0)
    model = ARCHS["resnet50"]()
    calibrate_bn(model, [torch.randn(4, 3, 64, 64)])
    plain = export(model, 1.0).to(device, memory_format=fmt).train()

    def plain_step():
        with autocast():
            out = plain(x)
        out.float().square().mean().backward()
        plain.zero_grad(set_to_none=True)

    t_plain = timed(plain_step, device, s["repeats"], s["warmup"])
    cfg = train_us3l.Config(arch="resnet50")
    student = nn.ModuleDict({"backbone": model, "projector": projection_mlp(model.feature_dim, cfg.proj_hidden,
                                                                             cfg.proj_dim),
                             "aux": projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)})
    student = student.to(device, memory_format=fmt)
    online = nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})
    teacher = copy.deepcopy(online).requires_grad_(False)
    params = list(student.parameters())
    optimizer = torch.optim.SGD(param_groups(params, 0.0), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    quantiles = [(k + 0.5) / s["draws"] for k in range(s["draws"])]
    widths = [[1.0, r + (1 - r) * q, r] for r in (0.75, 0.5, 0.25) for q in quantiles]

    def us3l_step(w):
        train_us3l.forward_backward(student, teacher, x, w, cfg, autocast, scale=scaler.scale)
        optimizer_step_(optimizer, scaler, params, 1)  # the all-reduce is a no-op on 1 process
        ema_update_(teacher, online, 0.99)

    t_us3l = statistics.mean(timed(lambda w=w: us3l_step(w), device, max(s["repeats"] // 3, 1), warmup=1)
                             for w in widths)
    macs = {w: profile(model, w, input_size=s["size"])[1] for ws in widths for w in ws}
    full = macs[1.0]  # plain fwd + bwd = 3 forwards; a US3L step: teacher forward + 3 per width
    limit = statistics.mean(t_plain * (full + sum(3 * macs[w] for w in ws)) / (3 * full) for ws in widths)
    n = s["batch"]  # images (= two-view pairs) per step
    return {"plain_img_per_s": n / t_plain, "us3l_img_per_s": n / t_us3l, "us3l_vs_limit": t_us3l / limit}


def p3(device, dtype, s):
    cfg, student, teacher = bench_us3l_step.build(device, torch.channels_last)
    x = torch.randn(2 * s["p3_batch"], 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    r = bench_us3l_step.p3(student, teacher, x, cfg, lambda: torch.autocast(device.type, dtype), s["p3_repeats"], device)
    return {"p3_time_ratio": r["p3_time"], "p3_macs_ratio": r["p3_macs"], "ms": r["ms"]}


def p4_and_loaders(device, s, folder, beton, us3l_rate):
    args = SimpleNamespace(batch_size=s["p4_batch"], batch_size_224=s["p4_batch"], workers=s["workers"],
                           repeats=max(s["repeats"] // 3, 1), step_batch=s["p4_batch"] // 2,
                           step_batch_224=s["p4_batch"] // 2, step_repeats=max(s["repeats"] // 3, 1))
    r = bench_data.compare("CIFAR-10 upscaled to 224 px JPEGs", folder, 0, "imagenet", s["size"], args, device,
                           "resnet18")
    rates = {}
    for kind in ("torch", "ffcv"):
        loader = build_train_loader(kind, folder, beton, "imagenet", s["size"], s["p4_batch"], device=device,
                                    num_workers=s["workers"])
        for epoch in range(2):  # epoch 0 warms up (workers, FFCV's compiled pipeline)
            loader.set_epoch(epoch)
            sync(device)
            t0, n = time.perf_counter(), 0
            for k, ((x1, x2), _) in enumerate(loader):
                x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
                n += x1.shape[0]
                if k + 1 == s["loader_batches"]:
                    break
            sync(device)
        rates[kind] = n / (time.perf_counter() - t0)
    copy = bench_data.copies(device, s["p4_batch"], s["size"], max(s["repeats"], 3))
    return {"p4_224_ratio": r["p4"], "copy_224_ratio": copy["ratio"], "loader_img_per_s": rates,
            "loader_vs_us3l": {k: v / us3l_rate for k, v in rates.items()} if us3l_rate else None}


def cifar10_knn(args, out, smoke, step_s):
    """The quick recipe on loader=device for about args.knn_minutes (step_s: a step's seconds, measured)."""
    steps = 2 if smoke else max(int(60 * args.knn_minutes / step_s), 10)
    over = [f"--data_path={args.data_path}", f"--out_dir={out}", "--loader=device", f"--max_steps={steps}",
            "--resume=none"]
    if smoke:
        over += ["--batch_size=16", "--train_subset=64", "--knn_bank_subset=40", "--knn_test_subset=20",
                 "--knn_batch_size=20", "--knn_k=5", "--proj_hidden=64", "--proj_dim=32", "--num_workers=0",
                 "--arch=resnet18_cifar_tiny"]  # toy size: its checkpoints are 15 MB, not 220
    cfg = parse_config(train_us3l.Config, ["--config", os.path.join(REPO, "yaml", "cifar10_quick.yaml"), *over])
    t0 = time.perf_counter()
    res = train_us3l.main(cfg)
    return {"steps": steps, "batch_size": cfg.batch_size, "wall_s": time.perf_counter() - t0,
            "knn_top1_init": res["knn_top1_init"], "knn_top1": res["knn_top1"]}


def dspnet_p5(device, s, folder):
    cfg = replace(train_dspnet.Config(), arch="mobilenetv3_large", dns=[[float(w)] for w in s["p5_dns"].split(",")],
                  dataset="imagenet", image_size=s["p5_size"], batch_size=s["p5_batch"], num_workers=s["workers"])
    r = bench_dspnet.p5(cfg, folder, s["p5_images"], device)
    return {"dspnet_p5": r["p5"], "dspnet_p5_macs": r["p5_macs"]}


def table(res):
    rows = []
    for key, value in res.items():
        if key in ("errors", "seconds"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"  {key:<18} {value}")
    rows += [f"  {k:<18} null: {v}" for k, v in res["errors"].items()]
    rows.append("  seconds            " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpu_check")
    ap.add_argument("--smoke", action="store_true", help="every part at toy size (the CPU test of this script)")
    ap.add_argument("--data_path", default="data/cifar10")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--knn_minutes", type=float, default=4.0)
    args = ap.parse_args()
    device, s = torch.device(args.device), FULL["smoke" if args.smoke else "gpu"]
    os.makedirs(args.out, exist_ok=True)
    if args.data_path == "data/cifar10":
        prepare_cifar10(os.path.join(REPO, "data", "cifar10"), download=False)
        args.data_path = os.path.join(REPO, "data", "cifar10")
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
           f"{os.cpu_count()} cores)", "torch": torch.__version__, "precision": "bf16" if bf16 else "fp16",
           "errors": {}, "seconds": {}}
    print(f"gpu_check on {res['device']}, torch {res['torch']}, {res['precision']}{' (smoke)' if args.smoke else ''}")

    def part(name, keys, fn):
        t0 = time.perf_counter()
        try:
            res.update(fn())
        except Exception as e:  # a part that cannot run is null, with its reason; the rest still run
            traceback.print_exc()
            for k in keys:
                res[k] = None
            res["errors"][name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        res["seconds"][name] = time.perf_counter() - t0
        print(f"[{name}: {res['seconds'][name]:.0f} s]", flush=True)

    part("plain_and_us3l", ["plain_img_per_s", "us3l_img_per_s", "us3l_vs_limit"], lambda: plain_and_us3l(device, dtype, s))
    p3_ms = {}

    def run_p3():
        r = p3(device, dtype, s)
        p3_ms.update(r.pop("ms"))
        return r

    part("p3", ["p3_time_ratio", "p3_macs_ratio"], run_p3)
    with tempfile.TemporaryDirectory() as tmp:
        folder, beton = os.path.join(tmp, "jpg224"), os.path.join(tmp, "ffcv")

        def images():
            src = build_dataset(args.data_path, "train", subset=s["images_224"])
            bench_data.upscaled_folder(src, len(src), s["size"], folder)
            write_beton(folder, beton, splits=("train",), max_resolution=256, num_workers=max(s["workers"], 1))
            return {}

        part("images_224", [], images)
        part("p4_and_loaders", ["p4_224_ratio", "copy_224_ratio", "loader_img_per_s", "loader_vs_us3l"],
             lambda: p4_and_loaders(device, s, folder, beton, res.get("us3l_img_per_s")))
        part("dspnet_p5", ["dspnet_p5", "dspnet_p5_macs"], lambda: dspnet_p5(device, s, folder))
    # the quick recipe's step (batch 256, 3 widths) from P3's stage-2 steps at p3_batch (1 s if P3 failed)
    stage2 = [v for k, v in p3_ms.items() if k.startswith("R_min")]
    step_s = 1e-3 * statistics.mean(stage2) * 256 / s["p3_batch"] if stage2 else 1.0
    part("cifar10_knn", ["cifar10_knn"], lambda: {"cifar10_knn": cifar10_knn(args, os.path.join(args.out, "cifar10_quick"),
                                                                              args.smoke, step_s)})
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')}")


if __name__ == "__main__":
    main()
