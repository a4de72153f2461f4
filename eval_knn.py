"""Weighted kNN evaluation of a checkpoint at every width, as a command (the kNN core is knn.py; the
protocol and the numbers of processes there; docs/design.md, Evaluation).

The command evaluates every width of a checkpoint (its `widths` list, or each DSPNet DN of its
`dns` list with its depth), or of a seeded random-init network (the baseline), and writes a table to
stdout, out_dir/results.json ({"<width or DN>": {"top1", "top5", "params", "macs", "top1_k"}, ...},
accuracies in [0, 1], top1/top5 at the last k given) and out_dir/knn.png (top-1 against MACs and
against width). MACs are counted at the eval image size (32 px CIFAR, 224 px ImageNet; a network that
fixes its input size, a ViT's img_size, at that size: CIFAR upsampled to it, data.eval_transform). out_dir
defaults to a folder beside the checkpoint (default_out_dir: <ckpt dir>/knn, <ckpt dir>/knn_teacher;
out/random_init/<arch>/knn without one), so evaluations of different runs never share one.
--tracker=tensorboard|wandb also logs each network's top-1, top-5, MMACs and params there.

    python eval_knn.py --ckpt=out/run/backbone.pt --data_path=data/cifar10 --out_dir=out/run/knn   # CPU or 1 GPU
    python eval_knn.py --arch=resnet18_cifar --widths=1.0,0.75,0.5,0.25 --bank_subset=10000 --test_subset=2000
    python eval_knn.py --ckpt=out/run/backbone.pt --teacher --k=10,20,200 --temperature=0.1
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_knn.py ...   # CPU, 2 procs
    accelerate launch eval_knn.py --ckpt=... --data_path=... --dataset=imagenet --temperature=0.07   # N GPUs

The command calibrates BN on the same batches whatever the number of processes
(fixed_calibration_batches), so N processes give 1 process's numbers (tested with 2 CPU processes,
fp32); the training monitor's calibration_batches draws per rank instead.

The network selection and naming here (networks_to_eval, net_name, load_network, eval_data, default_out_dir,
log_results) are shared with eval_linear.py and export.py.

Measured on 2 CPU cores (AVX512-BF16, shared machine), the command with `--arch=resnet18_cifar
--bank_subset=10000 --test_subset=2000 --cache=true`, top-1 at k = 10 / 20 / 200 and top-5 at k=200,
params (M) / MMACs at 32 px:
    1.0   28.45 / 29.65 / 29.75%, top-5 81.75%   11.17 / 555
    0.75  24.40 / 25.15 / 27.10%, top-5 80.30%    6.28 / 313
    0.5   25.50 / 27.75 / 29.05%, top-5 80.00%    2.80 / 139
    0.25  21.80 / 22.65 / 24.45%, top-5 77.60%    0.70 / 35
NOTE: the minimal CLI of commit 0e5c5e3 also gives 29.75% at 1.0x today (same calibration images):
the 30.1% in knn.py is a stale figure from an earlier state of the code.
"""

import json
import os
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator

import data
from config import ConfigError, run, save_config
from knn import build_knn_loaders, fixed_calibration_batches, knn_eval
from models import ARCHS, min_width, profile, set_active
from utils import check_tracker, init_tracker, tracker_log


@dataclass
class Config:
    ckpt: str = ""  # backbone.pt of train_us3l.py (models.load_backbone format); empty = random init
    teacher: bool = False  # evaluate the checkpoint's EMA teacher instead of the online backbone
    arch: str = ""  # models.ARCHS key; required without ckpt (seeded random init), checked against it
    data_path: str = "data/cifar10"  # see data.py; `python data.py extract-cifar10` makes this one
    dataset: str = ""  # cifar10 | cifar100 | imagenet (eval transform, image size); empty = ckpt's, else cifar10
    mean: list[float] = field(default_factory=list)  # per-channel input normalization, RGB in [0, 1], with std;
    # [] = the ckpt's training run's (its mean/std keys), else the dataset's preset (data.MEAN_STD)
    std: list[float] = field(default_factory=list)  # per-channel std, given with mean; [] = as mean
    widths: list[float] = field(default_factory=list)  # in (0, 1]; empty = the ckpt's widths (or its DSPNet dns)
    depth: list[int] | None = None  # per-stage blocks for all widths (ResNets); None = full depth
    k: list[int] = field(default_factory=lambda: [10, 20, 200])  # neighbours; the last is the main k (top1)
    temperature: float = 0.0  # vote weight exp(sim / T); 0: 0.07 on ImageNet (DINO's protocol), else 0.1 (CIFAR)
    batch_size: int = 128  # per process; on 2 CPU cores 128 beats 256 and 512 (bf16, resnet18_cifar)
    bank_subset: int = 0  # class-balanced bank subset of the train split, 0 = all
    test_subset: int = 0  # class-balanced subset of the test split, 0 = all
    calib_images: int = 2000  # BN calibration images per width (US-Nets: about 2000), same set for any N
    num_workers: int = 0  # DataLoader workers; CIFAR decodes faster than the network eats
    bad_images: str = "fail"  # an image that does not decode: fail (error naming it) | skip (warn, use the next)
    cache: bool = False  # decode once, keep the eval images in memory (CIFAR scale; 10k images: 123 MB)
    loader: str = "torch"  # torch | device (cached on the device) | ffcv (ffcv_path/{train,test}.beton; BN
    # calibration images still come from data_path)
    ffcv_path: str = ""  # loader=ffcv: the folder `python ffcv_data.py` wrote
    autocast: bool = True  # bf16 autocast where supported (CPU too); features and search stay fp32
    seed: int = 0  # random-init weights, subsets and calibration images
    out_dir: str = ""  # results.json, knn.png, config.yaml; empty = beside the checkpoint (default_out_dir)
    tracker: str = ""  # tensorboard | wandb (optional package): per-network results logged there too


def net_name(width, depth=None):
    """'1.0', '0.25', or '0.6667_d2-2-2-2' for a depth-slimmed DN: results.json keys (eval scripts and
    train_dspnet.py's log and monitor)."""
    return repr(round(float(width), 4)) + (f"_d{'-'.join(map(str, depth))}" if depth else "")


def networks_to_eval(cfg, ckpt, model):
    """[(name, width, depth)]: the configured widths (at cfg.depth), else the checkpoint's DSPNet `dns`
    list ({"width": w, "depth": [...] or None}), else its `widths`, else 1.0, 0.75, 0.5, 0.25.
    Widths must lie in (0, 1] and not below the smallest width the checkpoint was trained at (US3L's
    width_min, DSPNet's smallest DN): a slice never trained is not a pretrained network. An individually
    pretrained checkpoint (train_*.py `individual`) holds one network: anything else is refused."""
    ind = ckpt.get("individual")
    if ind and (cfg.widths or cfg.depth is not None):
        full = getattr(model, "max_depth", None)
        asked = [(float(w), cfg.depth if cfg.depth != full else None) for w in cfg.widths or [ind["width"]]]
        other = [net_name(w, d) for w, d in asked if (round(w, 4), d) != (round(ind["width"], 4), ind["depth"])]
        if other:
            raise ConfigError(f"config error: {cfg.ckpt} is an individually pretrained network, "
                              f"{net_name(ind['width'], ind['depth'])} only (train_*.py individual=...): "
                              f"{', '.join(other)} was never trained; drop widths/depth to evaluate it")
    if not cfg.widths and ckpt.get("dns"):
        return [(net_name(dn["width"], dn["depth"]), float(dn["width"]), dn["depth"] and list(dn["depth"]))
                for dn in ckpt["dns"]]
    widths = cfg.widths or ckpt.get("widths") or [1.0, 0.75, 0.5, 0.25]
    bad = [w for w in widths if not 0.0 < w <= 1.0]
    if bad:
        raise ConfigError(f"config error: widths must lie in (0, 1], got {bad}")
    trained = ckpt.get("width_min") or min((dn["width"] for dn in ckpt.get("dns") or []), default=0.0)
    bad = [w for w in widths if w < trained - 1e-6]
    if bad:
        raise ConfigError(f"config error: widths {bad} lie below {trained}, the smallest width {cfg.ckpt} was "
                          f"trained at; allowed: [{trained}, 1]")
    floor, arch = min_width(model), ckpt.get("arch", type(model).__name__)
    if any(w < floor for w in widths):
        raise ConfigError(f"config error: widths {[w for w in widths if w < floor]} lie below {arch}'s minimum width "
                          f"{floor:.4g} (every layer at its channel floor); allowed: [{floor:.4g}, 1]")
    if cfg.depth is not None:
        try:
            set_active(model, 1.0, cfg.depth)
        except ValueError as e:
            raise ConfigError(f"config error: depth={cfg.depth}: {e}") from None
        set_active(model, 1.0)
    return [(net_name(w, cfg.depth), float(w), cfg.depth) for w in widths]


def eval_data(cfg, ckpt):
    """(dataset, (mean, std)) an evaluation of checkpoint `ckpt` runs with: the keys where given, else the
    training run's (backbone.pt's "config"), else cifar10 and its preset. mean and std come as a pair: given
    either key, both are this config's (data.normalization names the key that is wrong or missing)."""
    trained = ckpt.get("config") or {}
    dataset = cfg.dataset or trained.get("dataset") or "cifar10"
    given = cfg.mean or cfg.std
    mean, std = (cfg.mean, cfg.std) if given else (trained.get("mean") or [], trained.get("std") or [])
    return dataset, data.normalization(dataset, mean, std)


def default_out_dir(cfg, kind):
    """Where an evaluation writes when out_dir is empty: beside the checkpoint it evaluates, so two
    runs never overwrite each other's results: <ckpt dir>/<kind>, '_teacher' appended for the EMA
    weights; without a checkpoint out/random_init/<arch>/<kind> ('_seed<N>' for a seed other than 0).
    kind: 'knn', or eval_linear.py's 'linear', 'linear_1pct', ... (one folder per protocol)."""
    if cfg.ckpt:
        return os.path.join(os.path.dirname(cfg.ckpt) or ".", kind + ("_teacher" if cfg.teacher else ""))
    return os.path.join("out", "random_init", cfg.arch or "unknown", kind + (f"_seed{cfg.seed}" if cfg.seed else ""))


def load_network(cfg):
    """(backbone, checkpoint dict) on the CPU; a random-init network (seeded, the same on every
    rank) without ckpt, with an empty checkpoint dict."""
    if cfg.ckpt:
        if os.path.isdir(cfg.ckpt):
            raise ConfigError(f"config error: ckpt={cfg.ckpt} is a folder: pass the backbone.pt in it")
        if not os.path.isfile(cfg.ckpt):
            raise ConfigError(f"config error: checkpoint not found: {cfg.ckpt}")
        try:
            ckpt = torch.load(cfg.ckpt, map_location="cpu", weights_only=True)
        except Exception as e:  # not a checkpoint, cut short, or not plain tensors: one line, not a traceback
            raise ConfigError(f"config error: {cfg.ckpt} is not a checkpoint this code can read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:120]}); pass a backbone.pt written by train_*.py") from None
        arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
        if arch not in ARCHS:
            raise ConfigError(f"config error: {cfg.ckpt} has arch {arch!r}, not one of models.ARCHS: {', '.join(ARCHS)}")
        if cfg.arch and cfg.arch != arch:
            raise ConfigError(f"config error: --arch={cfg.arch} but {cfg.ckpt} holds a {arch}")
        key = "teacher" if cfg.teacher else "backbone"
        if key not in ckpt:
            raise ConfigError(f"config error: {cfg.ckpt} holds no {key!r} weights (keys: {sorted(ckpt)})")
        model = ARCHS[arch]()
        model.load_state_dict(ckpt[key])
        return model, ckpt
    if cfg.arch not in ARCHS:
        raise ConfigError(f"config error: give --ckpt, or --arch (one of {', '.join(ARCHS)}) for a random-init "
                          f"baseline; got arch={cfg.arch!r}")
    if cfg.teacher:
        raise ConfigError("config error: teacher=true needs ckpt")
    torch.manual_seed(cfg.seed)
    return ARCHS[cfg.arch](), {"arch": cfg.arch}


def plot(results, path, k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel in ((ax1, "macs", "MMACs (log)"), (ax2, "width", "width")):
        names = sorted(results, key=lambda n: (results[n][key], n))  # DNs may share a width
        x = [results[n][key] / (1e6 if key == "macs" else 1) for n in names]
        y = [100 * results[n]["top1"] for n in names]
        ax.plot(x, y, "o-")
        for n, xi, yi in zip(names, x, y):
            ax.annotate(n, (xi, yi), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set(xlabel=xlabel, ylabel=f"kNN top-1 (%), k={k}", title=f"top-1 vs {key}")
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(NullFormatter())  # the default minor labels overlap
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg):
    if not cfg.k or min(cfg.k) < 1:
        raise ConfigError(f"config error: k must list neighbour counts >= 1, got {cfg.k}")
    for key, allowed in (("loader", ("torch", "device", "ffcv")), ("bad_images", ("fail", "skip"))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config error: {key}={getattr(cfg, key)!r}, allowed: {', '.join(allowed)}")
    check_tracker(cfg.tracker)
    data.BAD_IMAGES = cfg.bad_images
    model, ckpt = load_network(cfg)  # config errors before any process group or data
    nets = networks_to_eval(cfg, ckpt, model)
    dataset, mean_std = eval_data(cfg, ckpt)  # the keys, else the checkpoint's training run's
    cfg = replace(cfg, temperature=cfg.temperature or (0.07 if dataset == "imagenet" else 0.1))
    cfg = replace(cfg, out_dir=cfg.out_dir or default_out_dir(cfg, "knn"))  # config.yaml records where
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # sets up torch.distributed if launched
                              log_with=cfg.tracker or None, project_dir=cfg.out_dir)
    device, is_main = accelerator.device, accelerator.is_main_process
    if is_main:
        save_config(cfg, cfg.out_dir)
    init_tracker(accelerator, cfg, "eval_knn")
    model = model.to(device)
    # a network that fixes its input size (a ViT's img_size) gets the images at it: CIFAR upsampled to 224 px
    # for the release's Table 3 ViT (data.eval_transform); a CNN (None) takes CIFAR as is, ImageNet at 224 px
    img_size = getattr(model, "img_size", None)
    bank_loader, test_loader = build_knn_loaders(cfg.data_path, dataset, cfg.batch_size, cfg.bank_subset,
                                                 cfg.test_subset, cfg.num_workers, cfg.seed, cfg.cache,
                                                 cfg.loader, cfg.ffcv_path, device, image_size=img_size,
                                                 mean_std=mean_std)
    calib = fixed_calibration_batches(cfg.data_path, dataset, cfg.bank_subset, cfg.calib_images, cfg.batch_size,
                                      cfg.seed, cfg.num_workers, image_size=img_size, mean_std=mean_std)
    custom = "" if mean_std == data.MEAN_STD[dataset] else f", mean {list(mean_std[0])} std {list(mean_std[1])}"
    accelerator.print(f"kNN T={cfg.temperature} k={cfg.k} on {dataset}{custom} ({cfg.data_path}): "
                      f"{ckpt['arch']} {cfg.ckpt + (' (teacher)' if cfg.teacher else '') or '(random init, seed %d)' % cfg.seed}, "
                      f"{accelerator.num_processes} process(es)")
    main_k, size = cfg.k[-1], img_size or (32 if dataset.startswith("cifar") else 224)
    results, timings = {}, {}
    for name, w, depth in nets:
        details = {}
        knn_eval(model, bank_loader, test_loader, calib, [w], device, k=main_k, temperature=cfg.temperature, depth=depth,
                 autocast=cfg.autocast, timings=timings, ks=cfg.k, details=details, progress=is_main)
        params, macs = profile(model, w, depth, input_size=size)
        d = details[w]
        results[name] = {"top1": d["top1_k"][main_k], "top5": d["top5_k"][main_k], "params": params, "macs": macs,
                         "width": w, "depth": depth, "top1_k": {str(k): d["top1_k"][k] for k in cfg.k},
                         "top5_k": {str(k): d["top5_k"][k] for k in cfg.k}}
    if is_main:
        head = f"{'network':>16} {'params (M)':>10} {'MMACs':>8} " + " ".join(f"{'k=%d' % k:>7}" for k in cfg.k)
        print(f"{head} {'top-5':>7}   (top-1 % per k; top-5 at k={main_k}; MACs at {size} px)")
        for name, r in results.items():
            print(f"{name:>16} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e6:>8.1f} "
                  + " ".join(f"{100 * r['top1_k'][str(k)]:>7.2f}" for k in cfg.k) + f" {100 * r['top5']:>7.2f}")
        print("seconds: " + ", ".join(f"{key} {v:.1f}" for key, v in timings.items()))
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot(results, os.path.join(cfg.out_dir, "knn.png"), main_k)
        print(f"wrote {cfg.out_dir}/results.json, knn.png")
    log_results(accelerator, results, "knn", ckpt.get("step", 0))
    accelerator.end_training()
    return results


def log_results(accelerator, results, prefix, step):
    """Each evaluated network's top-1, top-5, MMACs and params (M) to the tracker (if any), at the
    training step of the checkpoint: e.g. knn/top1/0.25 next to knn/mmacs/0.25."""
    rec = {}
    for name, r in results.items():
        rec.update({f"{prefix}/top1/{name}": r["top1"], f"{prefix}/top5/{name}": r["top5"],
                    f"{prefix}/mmacs/{name}": r["macs"] / 1e6, f"{prefix}/mparams/{name}": r["params"] / 1e6})
    tracker_log(accelerator, rec, int(step))


if __name__ == "__main__":
    run(main, Config)
