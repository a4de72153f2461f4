"""What only a GPU can show, in one command and one table (--knn_minutes sets its longest part; untimed on a GPU).

    python bench/gpu_check.py --data_tar cifar10-jpg.tar.gz --out out/gpu_check   # the GPU at hand (or the CPU)
    python bench/gpu_check.py --smoke --data_path DIR --out /tmp/gpu_check        # every part at toy size, CPU
    python bench/gpu_check.py --parts sync_debug,knn_memory --out out/gpu_extra   # chosen parts (and their needs)

Writes OUT/gpu_check.json (rewritten after every part, so a killed run leaves the parts it finished) and
prints the same as a table. Every measurement is a part of its own; a part that cannot run is null in the
JSON with its reason under "errors", a part whose input part failed is null with "skipped: part X failed", and
the others still run. "not_run" lists the parts not reached yet (a run killed by a timeout).
    device, torch, cuda            the GPU's name (or the CPU), torch's version, the CUDA torch was built for
    precision, cudnn_benchmark     bf16 (fp16 where bf16 is missing); cudnn autotuning on CUDA, as the trainers set it
    data                           part `data`: CIFAR-10 from --data_path, extracted there first from --data_tar
                                   ($CIFAR10_TAR, else the trainers' default tarball) when it is not there yet
    plain_img_per_s                a plain ResNet-50 (models.export at width 1.0) forward + backward at
                                   224 px, channels_last, synthetic images on the device: the compute limit
    us3l_img_per_s, us3l_vs_limit  the US3L training step (train_us3l.forward_backward, the step end of
                                   utils.optimizer_step_, the EMA update) on the same images, stage-2 widths
                                   [1, U(R_min, 1), R_min] for R_min 0.75 / 0.5 / 0.25; its time over the
                                   MACs-weighted plain time of the same widths (1.0: no overhead beyond compute)
    p3_time_ratio                  P3 of bench/bench_us3l_step.py in time (ResNet-18 CIFAR, batch 128)
    p4_224_ratio                   P4 of bench/bench_data.py at 224 px: the batched on-device augmentation
                                   over the torchvision DataLoader (CIFAR-10 upscaled to 224 px JPEGs, part images_224)
    copy_224_ratio                 the copy of a two-view batch to the device as augment.to_device does it (per
                                   view, pinned, non_blocking, cat on the device) over the old cat-then-copy
    loader_{torch,ffcv}_img_per_s  the training loader alone at 224 px (ffcv: a .beton written here, part beton),
                                   timed from its first batches on: the workers' start-up (paid every epoch by the
                                   trainers) and the backlog they build meanwhile are left out; _vs_us3l: over
                                   us3l_img_per_s (>= 1: the loader keeps up with the step)
    cifar10_knn                    the US3L quick recipe (its stride-2-stem ResNet-18, loader=device) for as many
                                   steps as fit in --knn_minutes, kNN top-1 per width before and after, wall time,
                                   img_per_s and data_wait from its log.jsonl (data_wait: the share of wall time the
                                   host spent waiting for the loader's next batch; mean over the log records after
                                   the first, which holds the start-up)
    dspnet_p5                      P5 of bench/bench_dspnet.py in time (MobileNetV3-Large, 5 widths, 128 px)
Parts run only when named in --parts (not by default):
    sync_free_step, sync_at        one warmed-up step of the quick recipe's hot loop (loader=device batch on a
                                   side stream, train_us3l.forward_backward, optimizer_step_ with group decay,
                                   EMA) under torch.cuda.set_sync_debug_mode("error"): true, or false and the
                                   first host sync's line; null on a CPU (nothing to check)
    knn_memory                     knn.knn_accuracy on a random ImageNet-size bank (1.28M x 2048 fp32, as
                                   knn.extract_features returns it; 10k queries, k=200, chunk 1024): peak
                                   memory and seconds of the search, the bank's own size apart
    sync_bn                        bench/bench_devices.py's: sync BN's forward + backward at ResNet-50's BN shapes,
                                   one process per GPU, torch's fused kernels (fused_ms, slim's default on CUDA)
                                   against the reference Function (python_ms, SLIM_SYNC_BN=python) and per-process
                                   BN (local_ms); one GPU: a process group of one (the kernels' passes only)
    ffcv_contexts                  bench/bench_devices.py's (2+ GPUs, else checked false): does a process on cuda:1
                                   reading FFCV hold a CUDA context on GPU 0, with ffcv_data's loader and ffcv's own
    cudnn_widths_*                 30 US3L training steps (ResNet-50 as in plain_and_us3l, the quick recipe's Config)
                                   whose widths are new draws every step, as training draws them (sample_widths over
                                   stages 2-4 of a 40-step run), each setting in a fresh process (its own cudnn cache
                                   and allocator): bench_on (cudnn.benchmark, width_grid 0: the trainers' default),
                                   bench_off, bench_on_grid64 (width_grid 1/64). _ms: mean step; _new_ms: the steps
                                   that met a backbone shape not seen before (benchmark: autotuning), _known_ms: the
                                   others (the steady state; null if none); _reserved_mb, _allocated_mb: peak memory
                                   reserved and allocated (the gap: the allocator's cache and fragmentation; null on
                                   a CPU); _setup: steps, distinct widths and backbone shapes, PYTORCH_CUDA_ALLOC_CONF.
                                   expandable_segments is read when CUDA starts: compare it by a second run,
                                   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ... --parts cudnn_widths. On a
                                   CPU (--smoke: 6 steps of a tiny ResNet-18) the cudnn flag is a no-op

Only the parts that need them import `ffcv` (part beton, loader_ffcv); `datasets` (hf: data only) and ONNX
are never imported here, so a machine without them loses those rows only.
"""

import argparse
import copy
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_data  # noqa: E402
import bench_devices  # noqa: E402
import bench_dspnet  # noqa: E402
import bench_us3l_step  # noqa: E402
import losses  # noqa: E402
import train_dspnet  # noqa: E402
import train_us3l  # noqa: E402
from augment import DeviceLoader, TwoViewAugment, build_train_loader, to_device  # noqa: E402
from config import parse_config  # noqa: E402
from data import build_dataset, prepare_cifar10  # noqa: E402
from knn import knn_accuracy  # noqa: E402
from models import ARCHS, calibrate_bn, export, profile, projection_mlp, set_active  # noqa: E402
from slim import SlimWidth  # noqa: E402
from utils import ema_update_, optimizer_step_, param_groups  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
QUICK = os.path.join(REPO, "yaml", "cifar10_quick.yaml")
FULL = {  # sizes of each part: the GPU check, and --smoke (the CPU test of the script itself)
    "gpu": dict(size=224, batch=64, repeats=10, draws=3, p3_batch=128, p3_repeats=8, images_224=2048,
                p4_batch=64, workers=min(8, os.cpu_count() or 1), loader_batches=24, p5_images=2048, p5_size=128,
                p5_batch=64, p5_dns="1.0,0.875,0.75,0.625,0.5", warmup=2, sync_batch=256,
                knn_bank=1_281_167, knn_dim=2048, knn_queries=10_000, width_arch="resnet50", width_steps=30),
    "smoke": dict(size=32, batch=2, repeats=1, draws=1, p3_batch=2, p3_repeats=1, images_224=24, p4_batch=8,
                  workers=0, loader_batches=2, p5_images=8, p5_size=32, p5_batch=8, p5_dns="1.0,0.5", warmup=1,
                  sync_batch=4, knn_bank=4096, knn_dim=64, knn_queries=256, width_arch="resnet18_cifar_tiny",
                  width_steps=6),
}
PARTS = {  # name: (the JSON rows it fills, the parts whose output it needs), in the order they run
    "data": (["data"], []),
    "plain_and_us3l": (["plain_img_per_s", "us3l_img_per_s", "us3l_vs_limit"], []),
    "p3": (["p3_time_ratio", "p3_macs_ratio"], []),
    "copy_224": (["copy_224_ratio"], []),
    "images_224": ([], ["data"]),
    "p4": (["p4_224_ratio"], ["images_224"]),
    "loader_torch": (["loader_torch_img_per_s", "loader_torch_vs_us3l"], ["images_224"]),
    "beton": ([], ["images_224"]),
    "loader_ffcv": (["loader_ffcv_img_per_s", "loader_ffcv_vs_us3l"], ["beton"]),
    "dspnet_p5": (["dspnet_p5", "dspnet_p5_macs"], ["images_224"]),
    "cifar10_knn": (["cifar10_knn"], ["data"]),
    "sync_debug": (["sync_free_step", "sync_at"], []),
    "knn_memory": (["knn_memory"], []),
    "cudnn_widths": ([f"cudnn_widths_{k}" for k in ("ms", "new_ms", "known_ms", "reserved_mb", "allocated_mb",
                                                    "setup")], []),
    "sync_bn": (["sync_bn"], []),
    "ffcv_contexts": (["ffcv_contexts"], []),
}
DEFAULT_PARTS = [p for p in PARTS if p not in ("sync_debug", "knn_memory", "cudnn_widths", "sync_bn",
                                                "ffcv_contexts")]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def us3l_model(model, cfg, device, fmt):
    """(student, online, teacher) around the backbone `model` as train_us3l.main builds them (backbone +
    projector + aux head g), on the device."""
    student = nn.ModuleDict({"backbone": model, "projector": projection_mlp(model.feature_dim, cfg.proj_hidden,
                                                                             cfg.proj_dim),
                             "aux": projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)})
    student = student.to(device, memory_format=fmt)
    online = nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})
    return student, online, copy.deepcopy(online).requires_grad_(False)


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
    student, online, teacher = us3l_model(model, cfg, device, fmt)
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


def p4(device, s, folder):
    args = SimpleNamespace(batch_size=s["p4_batch"], batch_size_224=s["p4_batch"], workers=s["workers"],
                           repeats=max(s["repeats"] // 3, 1), step_batch=s["p4_batch"] // 2,
                           step_batch_224=s["p4_batch"] // 2, step_repeats=max(s["repeats"] // 3, 1))
    r = bench_data.compare("CIFAR-10 upscaled to 224 px JPEGs", folder, 0, "imagenet", s["size"], args, device,
                           "resnet18")
    return {"p4_224_ratio": r["p4"]}


def loader_rate(kind, device, s, folder, beton):
    """img/s of one epoch of the trainers' loader `kind`, its batches copied to the device, timed from the
    end of batch max(1, workers) on: the start-up (workers, FFCV's compiled pipeline) and the batches the
    other workers finished meanwhile are not the steady rate."""
    loader = build_train_loader(kind, folder, beton, "imagenet", s["size"], s["p4_batch"], device=device,
                                num_workers=s["workers"])
    loader.set_epoch(0)
    skip, n, t0 = max(1, s["workers"]), 0, None
    for k, ((x1, x2), _) in enumerate(loader):
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        if k + 1 == skip:
            sync(device)
            t0 = time.perf_counter()
        elif k + 1 > skip:
            n += x1.shape[0]
        if k + 1 == skip + s["loader_batches"]:
            break
    sync(device)
    if not n:
        raise RuntimeError(f"loader={kind}: an epoch of {loader.steps()} batches leaves none to time after {skip}")
    return n / (time.perf_counter() - t0)


def cifar10_knn(args, out, smoke, step_s):
    """The quick recipe on loader=device for about args.knn_minutes (step_s: a step's seconds, measured)."""
    steps = 2 if smoke else max(int(60 * args.knn_minutes / step_s), 10)
    over = [f"--data_path={args.data_path}", f"--out_dir={out}", "--loader=device", f"--max_steps={steps}",
            "--resume=none"]
    if smoke:
        over += ["--batch_size=16", "--train_subset=64", "--knn_bank_subset=40", "--knn_test_subset=20",
                 "--knn_batch_size=20", "--knn_k=5", "--proj_hidden=64", "--proj_dim=32", "--num_workers=0",
                 "--arch=resnet18_cifar_tiny", "--log_every=1"]  # toy size: its checkpoints are 15 MB, not 220
    cfg = parse_config(train_us3l.Config, ["--config", QUICK, *over])
    t0 = time.perf_counter()
    res = train_us3l.main(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    later = log[1:] or log  # the first record holds the start-up (kernels, cudnn autotuning)
    return {"steps": steps, "batch_size": cfg.batch_size, "wall_s": wall,
            "img_per_s": statistics.median(r["img_per_s"] for r in later) if later else None,
            "data_wait": statistics.mean(r["data_wait"] for r in later) if later else None,
            "knn_top1_init": res["knn_top1_init"], "knn_top1": res["knn_top1"]}


def dspnet_p5(device, s, folder):
    cfg = replace(train_dspnet.Config(), arch="mobilenetv3_large", dns=[[float(w)] for w in s["p5_dns"].split(",")],
                  dataset="imagenet", image_size=s["p5_size"], batch_size=s["p5_batch"], num_workers=s["workers"])
    r = bench_dspnet.p5(cfg, folder, s["p5_images"], device)
    return {"dspnet_p5": r["p5"], "dspnet_p5_macs": r["p5_macs"]}


def sync_debug(device, dtype, s, smoke):
    """One step of train_us3l's hot loop after `warmup` steps, under set_sync_debug_mode("error") on CUDA:
    the next loader=device batch (augmented on a side stream by augment.to_device), the views' cat,
    forward_backward, optimizer_step_ with the group decay, the EMA update. Synthetic uint8 images."""
    over = ["--arch=resnet18_cifar_tiny", "--proj_hidden=64", "--proj_dim=32"] if smoke else []
    cfg = parse_config(train_us3l.Config, ["--config", QUICK, f"--batch_size={s['sync_batch']}", *over])
    fmt, total, warmup = torch.channels_last, 100, s["warmup"] + 1
    autocast = lambda: torch.autocast(device.type, dtype)  # noqa: E731
    torch.manual_seed(0)
    student, online, teacher = us3l_model(ARCHS[cfg.arch](), cfg, device, fmt)
    params = list(student.parameters())
    optimizer = torch.optim.SGD(param_groups(params, 0.0), lr=0.1, momentum=cfg.sgd_momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16: its check is a host sync
    decay_backbone = [p for p in student["backbone"].parameters() if p.ndim > 1]
    decay_plain = [p for k, m in student.items() if k != "backbone" for p in m.parameters() if p.ndim > 1]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, ((warmup + 2) * cfg.batch_size, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = DeviceLoader((images, torch.zeros(len(images), dtype=torch.long)), cfg.batch_size, device,
                          TwoViewAugment(cfg.dataset, 32).to(device), seed=0)
    batches = iter(to_device(loader, device))

    def step(k):  # stage 2 of the run (k + total // 2): three widths, group decay ramped up
        (x1, x2), _ = next(batches)
        at = k + total // 2
        for group in optimizer.param_groups:
            group["lr"] = 0.1
        widths = train_us3l.sample_widths(at, total, cfg)
        alpha = train_us3l.group_alpha(at, total, cfg)
        x = torch.cat([x1, x2]).contiguous(memory_format=fmt)  # (2B, 3, 32, 32)

        def regularize():
            losses.add_group_reg_grad_(decay_backbone, cfg.weight_decay, alpha=alpha)
            losses.add_group_reg_grad_(decay_plain, cfg.weight_decay, alpha=0.0)

        train_us3l.forward_backward(student, teacher, x, widths, cfg, autocast, scale=scaler.scale)
        optimizer_step_(optimizer, scaler, params, 1, regularize)
        ema_update_(teacher, online, cfg.momentum)

    for k in range(warmup):
        step(k)
    if device.type != "cuda":
        step(warmup)
        return {"sync_free_step": None, "sync_at": "not checked: set_sync_debug_mode is CUDA's"}
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(warmup)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename).startswith(
            os.path.abspath(REPO))]
        where = f"{os.path.relpath(frames[-1].filename, REPO)}:{frames[-1].lineno} {frames[-1].line}" if frames else ""
        return {"sync_free_step": False, "sync_at": f"{where} ({str(e).strip().splitlines()[0][:200]})"}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    sync(device)
    return {"sync_free_step": True, "sync_at": None}


def knn_memory(device, s):
    """Peak memory and seconds of knn.knn_accuracy on a random unit-norm bank of s["knn_bank"] x s["knn_dim"]
    fp32 (ImageNet's 1.28M x 2048 on the GPU) against s["knn_queries"] queries, 1000 classes."""
    n, dim, q = s["knn_bank"], s["knn_dim"], s["knn_queries"]
    g = torch.Generator(device).manual_seed(0)
    bank = torch.randn(n, dim, device=device, generator=g)
    bank /= bank.norm(dim=1, keepdim=True)  # in place: no second copy of the bank
    bank_y = torch.randint(0, 1000, (n,), device=device, generator=g)
    test = torch.randn(q, dim, device=device, generator=g)
    test /= test.norm(dim=1, keepdim=True)
    test_y = torch.randint(0, 1000, (q,), device=device, generator=g)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    knn_accuracy(bank, bank_y, test, test_y, 1000, ks=(200,), temperature=0.07, chunk=1024)
    sync(device)
    seconds = time.perf_counter() - t0
    gib = 2**30
    out = {"bank": [n, dim], "dtype": "fp32", "queries": q, "k": 200, "chunk": 1024, "search_s": seconds,
           "search_s_per_50k_queries": seconds * 50_000 / q, "bank_gib": bank.numel() * 4 / gib}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_gib=peak / gib, search_extra_gib=(peak - held) / gib,
                   total_gib=torch.cuda.get_device_properties(device).total_memory / gib)
    return out


def cudnn_widths_run(device, dtype, s, benchmark, grid, smoke):
    """In a fresh process: s["width_steps"] US3L steps of the quick recipe's Config at arch s["width_arch"],
    each with the widths sample_widths draws at one step of stages 2-4 of a run that long. -> mean ms, ms of
    the steps meeting a new backbone shape and of the others, peak memory (CUDA), distinct widths and shapes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = benchmark  # NOTE: no-op on a CPU
    over = ["--proj_hidden=64", "--proj_dim=32"] if smoke else []
    cfg = parse_config(train_us3l.Config, ["--config", QUICK, f"--arch={s['width_arch']}", f"--width_grid={grid}",
                                           *over])
    fmt = torch.channels_last
    autocast = lambda: torch.autocast(device.type, dtype)  # noqa: E731
    x = torch.randn(2 * s["batch"], 3, s["size"], s["size"], device=device).contiguous(memory_format=fmt)
    torch.manual_seed(0)
    student, online, teacher = us3l_model(ARCHS[cfg.arch](), cfg, device, fmt)
    params = list(student.parameters())
    optimizer = torch.optim.SGD(param_groups(params, 0.0), lr=0.1, momentum=cfg.sgd_momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    slims = [m for m in student["backbone"].modules() if isinstance(m, SlimWidth)]

    def shape(w):  # the backbone's channel counts at width w: what cudnn's autotuning cache tells apart
        set_active(student["backbone"], w)
        return tuple(m.out_active for m in slims)

    per_stage = s["width_steps"] // 3  # the draws of stages 2-4 of a run of 4 * per_stage steps
    draws = [train_us3l.sample_widths(t, 4 * per_stage, cfg) for t in range(per_stage, 4 * per_stage)]
    seen, new = {shape(1.0)}, []
    for ws in draws:
        shapes = {shape(w) for w in ws}
        new.append(bool(shapes - seen))
        seen |= shapes

    def step(ws):
        train_us3l.forward_backward(student, teacher, x, ws, cfg, autocast, scale=scaler.scale)
        optimizer_step_(optimizer, scaler, params, 1)
        ema_update_(teacher, online, cfg.momentum)

    step([1.0])  # warm-up: kernels, the optimizer's state, the full width (in every step, tuned once)
    ms = []
    for ws in draws:
        sync(device)
        t0 = time.perf_counter()
        step(ws)
        sync(device)
        ms.append(1e3 * (time.perf_counter() - t0))
    new_ms, known_ms = [t for t, n in zip(ms, new) if n], [t for t, n in zip(ms, new) if not n]
    out = {"ms": statistics.mean(ms), "new_ms": statistics.mean(new_ms) if new_ms else None,
           "known_ms": statistics.mean(known_ms) if known_ms else None, "steps": len(draws),
           "new_steps": len(new_ms), "widths": len({w for ws in draws for w in ws} | {1.0}), "shapes": len(seen)}
    if device.type == "cuda":
        out.update(reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
                   allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def cudnn_widths(device, dtype, s, smoke):
    """The cudnn_widths_* rows: bench_on, bench_off, bench_on_grid64, each in a spawned process, since cudnn's
    autotuning cache has no public reset and would carry one setting's tuned shapes into the next."""
    res = {}
    for name, benchmark, grid in (("bench_on", True, 0.0), ("bench_off", False, 0.0),
                                  ("bench_on_grid64", True, 1 / 64)):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            res[name] = pool.submit(cudnn_widths_run, str(device), dtype, s, benchmark, grid, smoke).result()
    rows = {f"cudnn_widths_{k}": {name: r[k] for name, r in res.items()} for k in ("ms", "new_ms", "known_ms")}
    for k in ("reserved_mb", "allocated_mb"):  # CUDA's allocator only
        rows[f"cudnn_widths_{k}"] = {name: r[k] for name, r in res.items()} if device.type == "cuda" else None
    on, on64 = res["bench_on"], res["bench_on_grid64"]
    rows["cudnn_widths_setup"] = {
        "arch": s["width_arch"], "batch": s["batch"], "size": s["size"], "steps": on["steps"],
        "widths": on["widths"], "shapes": on["shapes"], "new_steps": on["new_steps"], "widths_grid64": on64["widths"],
        "shapes_grid64": on64["shapes"], "new_steps_grid64": on64["new_steps"],
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    return rows


def table(res):
    rows = []
    for key, value in res.items():
        if key in ("errors", "seconds", "parts", "not_run", "notes"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"  {key:<22} {value}")
    rows += [f"  {k:<22} null: {v}" for k, v in res["errors"].items()]
    rows += [f"  {k:<22} not run" for k in res["not_run"]]
    rows.append("  seconds                " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    return "\n".join(rows)


def resolve_parts(text):
    """--parts a,b (or all): those parts, the parts they need, in PARTS order."""
    want = list(PARTS) if text == "all" else DEFAULT_PARTS if not text else text.split(",")
    unknown = [p for p in want if p not in PARTS]
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(unknown)}; parts: {', '.join(PARTS)}, all")
    todo, stack = set(), list(want)
    while stack:
        p = stack.pop()
        if p not in todo:
            todo.add(p)
            stack += PARTS[p][1]
    return [p for p in PARTS if p in todo]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/gpu_check")
    ap.add_argument("--smoke", action="store_true", help="every part at toy size (the CPU test of this script)")
    ap.add_argument("--data_path", default="data/cifar10", help="CIFAR-10 (default: data/cifar10 in this repo)")
    ap.add_argument("--data_tar", default=None, help="CIFAR-10 tarball, extracted into --data_path when it is "
                    "missing (default: $CIFAR10_TAR, else the trainers' default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--knn_minutes", type=float, default=4.0)
    ap.add_argument("--parts", default="", help=f"comma-separated, or all (default: {','.join(DEFAULT_PARTS)})")
    args = ap.parse_args()
    parts = resolve_parts(args.parts)
    device, s = torch.device(args.device), FULL["smoke" if args.smoke else "gpu"]
    if device.type == "cuda":  # --device cuda:N: every default-device call (bench_*, Accelerate) goes there too
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train_us3l.py and train_dspnet.py set it
    os.makedirs(args.out, exist_ok=True)
    if args.data_path == "data/cifar10":
        args.data_path = os.path.join(REPO, "data", "cifar10")
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
           f"{os.cpu_count()} cores)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "precision": "bf16" if bf16 else "fp16",
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "smoke": args.smoke, "parts": parts,
           "notes": {"data_wait": "cifar10_knn: the share of wall time the host spent waiting for the loader's next "
                                  "batch (train_us3l.py's log.jsonl), mean over its records after the first",
                     "loader_*_img_per_s": "the loader alone, timed from batch max(1, workers) on: worker start-up "
                                           "(paid every epoch by the trainers) left out"}}
    for p in parts:
        res.update(dict.fromkeys(PARTS[p][0]))
    res.update(errors={}, seconds={}, not_run=list(parts))
    path = os.path.join(args.out, "gpu_check.json")

    def write():
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)

    print(f"gpu_check on {res['device']}, torch {res['torch']}, {res['precision']}{' (smoke)' if args.smoke else ''}: "
          f"{', '.join(parts)}", flush=True)
    write()
    ctx = {"p3_ms": {}}
    tmp = tempfile.TemporaryDirectory()
    folder, beton = os.path.join(tmp.name, "jpg224"), os.path.join(tmp.name, "ffcv")

    def data():
        root = args.data_path
        if args.data_tar or not os.path.isdir(root):  # a prepared folder is left as it is (prepare_cifar10 no-ops)
            root = str(prepare_cifar10(root, tar=args.data_tar, download=False))
        args.data_path = root
        return {"data": {"path": root, "train_images": len(build_dataset(root, "train"))}}

    def run_p3():
        r = p3(device, dtype, s)
        ctx["p3_ms"].update(r.pop("ms"))
        return r

    def images():
        src = build_dataset(args.data_path, "train", subset=s["images_224"])
        bench_data.upscaled_folder(src, len(src), s["size"], folder)
        return {}

    def make_beton():
        from ffcv_data import write_beton  # FFCV itself is imported there, after its one-line check

        write_beton(folder, beton, splits=("train",), max_resolution=256, num_workers=max(s["workers"], 1))
        return {}

    def loader(kind):
        rate, us3l = loader_rate(kind, device, s, folder, beton), res.get("us3l_img_per_s")
        return {f"loader_{kind}_img_per_s": rate, f"loader_{kind}_vs_us3l": rate / us3l if us3l else None}

    def knn_run():
        # the quick recipe's step (batch 256, 3 widths) from P3's stage-2 steps at p3_batch (1 s if P3 did not run)
        stage2 = [v for k, v in ctx["p3_ms"].items() if k.startswith("R_min")]
        step_s = 1e-3 * statistics.mean(stage2) * 256 / s["p3_batch"] if stage2 else 1.0
        return {"cifar10_knn": cifar10_knn(args, os.path.join(args.out, "cifar10_quick"), args.smoke, step_s)}

    fns = {"data": data, "plain_and_us3l": lambda: plain_and_us3l(device, dtype, s), "p3": run_p3,
           "copy_224": lambda: {"copy_224_ratio": bench_data.copies(device, s["p4_batch"], s["size"],
                                                                    max(s["repeats"], 3))["ratio"]},
           "images_224": images, "p4": lambda: p4(device, s, folder), "loader_torch": lambda: loader("torch"),
           "beton": make_beton, "loader_ffcv": lambda: loader("ffcv"), "dspnet_p5": lambda: dspnet_p5(device, s, folder),
           "cifar10_knn": knn_run, "sync_debug": lambda: sync_debug(device, dtype, s, args.smoke),
           "knn_memory": lambda: {"knn_memory": knn_memory(device, s)},
           "cudnn_widths": lambda: cudnn_widths(device, dtype, s, args.smoke),
           "sync_bn": lambda: {"sync_bn": bench_devices.sync_bn(args.smoke)},
           "ffcv_contexts": lambda: {"ffcv_contexts": bench_devices.ffcv_contexts()}}
    try:
        for name in parts:
            keys, needs = PARTS[name]
            t0 = time.perf_counter()
            failed = [n for n in needs if n in res["errors"]]
            if failed:  # its input is missing: null, and why
                res["errors"][name] = f"skipped: part {failed[0]} failed"
            else:
                try:
                    res.update(fns[name]())
                except Exception as e:  # a part that cannot run is null, with its reason; the rest still run
                    traceback.print_exc()
                    res.update(dict.fromkeys(keys))
                    said = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    res["errors"][name] = f"{type(e).__name__}: {said}"
                finally:
                    if device.type == "cuda":  # the next part starts with the memory this one freed
                        torch.cuda.empty_cache()
            res["seconds"][name] = time.perf_counter() - t0
            res["not_run"].remove(name)
            write()
            print(f"[{name}: {res['seconds'][name]:.0f} s{' null' if name in res['errors'] else ''}]", flush=True)
    finally:
        tmp.cleanup()
    print(table(res))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
