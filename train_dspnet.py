"""DSPNet pretraining: BYOL whose online encoder is slimmed to a fixed list of desired networks (DNs),
trained once; afterwards every DN is a slice of the one online encoder.

Paper: "DSPNet: Towards Slimmable Pretrained Networks based on Discriminative Self-supervised
Learning" (Wang et al., arXiv:2207.06075), Sections 4 and 5.1 (how this code reads them:
docs/design.md, DSPNet as implemented). Each step: the EMA target (full width and depth) projects
both views once; the sandwich rule picks num_subnets DNs (largest, smallest, others at
random, the same on every process); each DN's symmetric normalized-MSE loss is back-propagated on
its own (activations freed, peak memory of one network step), then one LARS step for the sum.

    python train_dspnet.py --config yaml/dspnet_cifar10_quick.yaml                       # CPU or 1 GPU
    accelerate launch train_dspnet.py --config yaml/mbv3_in.yaml                        # all GPUs of a node
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_dspnet.py ...  # 2 CPU procs

A DN is [width] or [width, depth of stage 1, ..., depth of stage S] (depths: ResNets only); the
list is `dns` in the config. Decisions where the paper is silent (NOTE): the two views run as one
batch (BN statistics over both, as in train_us3l.py); "largest" and "smallest" are by MACs at the
training resolution; the sandwich's others are distinct DNs; the projector's first Linear reads the
DN's leading features; gradients are all-reduced once per step by hand (no DDP wrapper), in buckets
sent while the last DN's backward runs (overlap_allreduce); under N processes every BN (online,
target, heads) uses the global batch's statistics (sync_bn), so N processes of batch B/N train what
one process of batch B trains; fp16 scales the loss; momentum BN (`momentum_bn`, on in the ImageNet
recipes) is in every BN of the target, backbone and projector, its weight on each new batch falling
by cosine from 1 to 0 over the run (bn_momentum); the DN list must hold the whole network (width 1.0
at full depth: the paper's Theta = theta_M).

The run folder, resume (same command again), log.jsonl, collapse monitor, NaN stop and kNN monitor
work as in train_us3l.py. backbone.pt records `dns`, so eval_knn.py / eval_linear.py evaluate every DN.
"""

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm import tqdm

import data
import losses
from augment import build_train_loader, to_device
from config import ConfigError, run, save_config
from data import prepare_cifar10
from eval_knn import net_name
from knn import build_knn_loaders, calibration_batches, collapse_eval, knn_eval
from models import ARCHS, make_individual_, min_width, profile, projection_mlp, set_active, set_sync_bn
from slim import BatchNorm1d, SlimBatchNorm2d
from utils import (LARS, BackgroundSaver, OverlappedAllReduce, atomic_save, check_finite, check_precision,
                   check_same_across_processes, check_tracker, cosine, cpu_state, ema_update_, init_tracker,
                   load_resume, log_jsonl, optimizer_step_, param_groups, read_results, to_floats, tracker_log,
                   trim_jsonl, warmup_cosine)


@dataclass
class Config:
    # --- data
    data_path: str = "data/cifar10"  # train/ + test/ class folders, a CIFAR python folder, or hf:NAME
    # (this default, relative to the current directory, is extracted or downloaded on first use: data.py)
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagenet: augmentation recipe and normalization
    mean: list[float] = field(default_factory=list)  # your own images: per-channel input normalization, RGB in
    # [0, 1], with std (`python data.py stats DIR` prints both lines); [] = the dataset's preset (data.MEAN_STD)
    std: list[float] = field(default_factory=list)  # per-channel std, given with mean; [] = the dataset's preset
    image_size: int = 0  # 0: 32 for CIFAR, 224 otherwise
    min_scale: float = 0.08  # each view's RandomResizedCrop keeps [min_scale, 1] of the image area (BYOL: 0.08)
    aug: str = "byol"  # the views: byol (BYOL's asymmetric pair: blur, solarize) | mocov2 (MoCo v2's symmetric
    # views, no solarize, blur at 224 px only: the US3L release's; with min_scale 0.2)
    train_subset: int = 0  # > 0: class-balanced subset of the training set (quick CPU runs, benchmarks)
    num_workers: int = 2  # DataLoader workers per process (loader=torch; decoding for loader=device); loader=ffcv:
    # FFCV's decoding threads per process, 0 = utils.cpus_per_rank() (the process's share of the node's CPUs)
    bad_images: str = "fail"  # an image that does not decode: fail (error naming it) | skip (warn, use the next)
    loader: str = "torch"  # torch (per-sample CPU augmentation) | device (whole split on the device, batched
    # augmentation there: CIFAR scale) | ffcv (ffcv_path/train.beton, crops in FFCV, the rest batched)
    ffcv_path: str = ""  # loader=ffcv: folder written by `python ffcv_data.py` (the kNN monitor reads data_path)
    # --- model
    arch: str = "resnet18_cifar"  # a key of models.ARCHS; the whole online encoder (= the largest DN)
    dns: list[list[float]] = field(default_factory=lambda: [[1.0], [0.875], [0.75], [0.625], [0.5]])  # the
    # desired networks, [width] or [width, depth per stage...]; default: the paper's MobileNetV3 widths
    individual: list[float] = field(default_factory=list)  # a DN ([width] or [width, depths...]): the paper's
    # "individually pretrained" baseline (Fig. 4): that network alone, as a plain network of its own init
    # (models.make_individual_), the same BYOL recipe; dns is then ignored. []: the slimmable run
    proj_hidden: int = 4096  # BYOL projector / predictor hidden size
    proj_dim: int = 256  # BYOL projection size
    channels_last: bool = True  # faster convolutions with bf16 (CPU and GPU)
    # --- DSPNet
    num_subnets: int = 4  # n of the sandwich rule: largest, smallest, n-2 others (paper: 4)
    full_only_epochs: float = 10.0  # train only the whole network at first (paper: the 10 warm-up epochs)
    momentum: float = 0.996  # target EMA tau at the start, -> 1 by cosine (BYOL)
    momentum_bn: bool = False  # momentum BN in the target (backbone and projector; paper Sec. 5.1, on in the
    # ImageNet recipes): normalized by an EMA of batch statistics whose weight on each new batch falls from
    # 1 to 0 by cosine over the run (bn_momentum). false: batch statistics, as BYOL
    # --- optimization (paper: LARS, 0.2 x batch/256, 10 warm-up epochs, cosine, wd 1.5e-6, 300 epochs, batch 4096)
    epochs: int = 300
    batch_size: int = 256  # per process
    base_lr: float = 0.2  # lr = base_lr * global batch / 256
    warmup_epochs: float = 10.0
    weight_decay: float = 1.5e-6
    optimizer: str = "lars"  # lars (biases and norms: no decay, no trust ratio) | sgd
    lars_eta: float = 0.001  # LARS trust coefficient: a weight moves ~lr*eta of its norm per step (BYOL: 0.001)
    sgd_momentum: float = 0.9
    precision: str = "bf16"  # bf16 | fp16 (with loss scaling: V100, T4) | no (fp32) | fp64 (exactness tests)
    sync_bn: bool = True  # BN statistics over every process's batch (no effect on 1 process); false: per process
    overlap_allreduce: bool = True  # N processes: gradient buckets all-reduced while the last backward runs
    # (utils.OverlappedAllReduce); false: one blocking all-reduce after it (the fallback, and the bench's baseline)
    seed: int = 0
    # --- run
    out_dir: str = "out/dspnet"
    max_steps: int = 0  # > 0: the run is this many steps (schedules compressed to it): smoke runs
    log_every: int = 20  # steps; losses are synced (and checked for NaN) only then
    save_every: int = 0  # > 0: also checkpoint every this many steps
    save_every_min: float = 1.0  # checkpoint at least this often (minutes), and at every epoch end
    eval_every: int = 0  # epochs between kNN monitors (0: before training and at the end only)
    resume: str = "auto"  # auto (out_dir/checkpoints/last.pt if any) | none | PATH
    allow_changed: list[str] = field(default_factory=list)  # resume: keys that may differ from the checkpoint's
    # config besides utils.RESUME_SAFE (logging, workers, data paths), e.g. [max_steps] to extend a run on purpose
    knn_monitor: bool = True  # the kNN monitor (before training, every eval_every epochs, at the end); false: none,
    # for unlabelled data (train/ with images and no class folders, no test/ needed): log.jsonl's collapse_std
    # and losses are then the signal, and results.json holds empty knn_top1 entries
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_bank_subset: int = 0  # > 0: class-balanced subset of the training set as the kNN bank
    knn_test_subset: int = 0  # > 0: class-balanced subset of the test split
    knn_dns: str = "ends"  # the DNs the kNN monitor evaluates: ends (largest and smallest) | all
    knn_batch_size: int = 128
    tracker: str = ""  # tensorboard | wandb (optional, pip install wandb) | "": files in out_dir; log.jsonl always


def parse_dns(cfg, backbone):
    """[{"width": w, "depth": [..] or None}] of cfg.dns, checked against the backbone (bad widths or
    depths are errors naming the DN; the whole network, width 1.0 at full depth, must be listed),
    largest first by MACs at the training resolution."""
    if not cfg.dns and not cfg.individual:
        raise ConfigError("config error: dns is empty: list the desired networks, e.g. [[1.0], [0.5]]")
    size = cfg.image_size or (32 if cfg.dataset.startswith("cifar") else 224)
    dns, macs, floor = [], [], min_width(backbone)
    what = "individual=" if cfg.individual else "dns entry "
    for dn in [cfg.individual] if cfg.individual else cfg.dns:
        width, depth = float(dn[0]), ([int(d) for d in dn[1:]] or None)
        if depth is not None and any(d != int(d) for d in dn[1:]):
            raise ConfigError(f"config error: {what}{dn}: depths must be whole numbers")
        if width < floor:
            raise ConfigError(f"config error: {what}{dn}: width {width} is below {cfg.arch}'s minimum width "
                              f"{floor:.4g}; allowed: [{floor:.4g}, 1]")
        try:
            macs.append(profile(backbone, width, depth, input_size=size)[1])
        except ValueError as e:
            raise ConfigError(f"config error: {what}{dn} does not fit {cfg.arch}: {e}") from None
        dns.append({"width": width, "depth": depth})
    if len({(d["width"], tuple(d["depth"] or ())) for d in dns}) < len(dns):
        raise ConfigError(f"config error: dns lists a network twice: {cfg.dns}")
    full = getattr(backbone, "max_depth", None)  # ResNets: blocks per stage; None: not depth-slimmable
    if cfg.individual:
        return [{"width": dns[0]["width"], "depth": None if dns[0]["depth"] == full else dns[0]["depth"]}], macs
    if not any(d["width"] == 1.0 and d["depth"] in (None, full) for d in dns):
        raise ConfigError(f"config error: dns must include the whole network, [1.0]"
                          f"{f' or {[1.0, *full]}' if full else ''} (DSPNet Sec. 4.1: the largest sampled "
                          f"network is the whole one, Theta = theta_M); got {cfg.dns}")
    order = sorted(range(len(dns)), key=lambda i: -macs[i])
    set_active(backbone, 1.0)
    return [dns[i] for i in order], [macs[i] for i in order]


def sample_dns(step, full_only_steps, num_dns, cfg):
    """Indices into the MACs-sorted DN list for one step, largest first (sandwich rule): the largest
    alone during the first full_only_steps, then the largest, num_subnets-2 distinct others and the
    smallest. A generator seeded by (seed, step): identical on every process and after a resume."""
    if step < full_only_steps or num_dns == 1 or cfg.num_subnets == 1:
        return [0]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    others = (torch.randperm(num_dns - 2, generator=g)[:max(cfg.num_subnets - 2, 0)] + 1).tolist()
    return [0] + sorted(others) + [num_dns - 1]


def main(cfg):
    for key, allowed in {"optimizer": ("lars", "sgd"), "precision": ("bf16", "fp16", "no", "fp64"),
                         "dataset": ("cifar10", "cifar100", "imagenet"), "arch": tuple(ARCHS),
                         "loader": ("torch", "device", "ffcv"), "bad_images": ("fail", "skip"),
                         "knn_dns": ("ends", "all"), "aug": ("byol", "mocov2")}.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config error: {key}={getattr(cfg, key)!r}, allowed: {', '.join(allowed)}")
    if cfg.num_subnets < 1:
        raise ConfigError(f"config error: num_subnets={cfg.num_subnets} must be >= 1")
    if not cfg.out_dir:
        raise ConfigError("config error: out_dir is empty: name the run's folder, e.g. --out_dir=out/NAME")
    check_tracker(cfg.tracker)
    data.BAD_IMAGES = cfg.bad_images
    accelerator = Accelerator(mixed_precision={"fp64": "no"}.get(cfg.precision, cfg.precision),
                              log_with=cfg.tracker or None, project_dir=cfg.out_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # cudnn autotunes each conv shape once: the DNs are a fixed set of shapes
    torch.backends.cudnn.benchmark = device.type == "cuda"
    check_precision(cfg.precision, device)  # bf16 below compute capability 8.0: one line, not a slow run
    # model: online = encoder + projector (first Linear takes any DN's width) + predictor. Seeded and built
    # before the data: building loaders may draw from the global RNG (each DataLoader iterator takes
    # a base seed), which would make the initial weights depend on `loader`
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    backbone = ARCHS[cfg.arch]()
    online = nn.ModuleDict({"backbone": backbone,
                            "projector": projection_mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim),
                            "predictor": projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)})
    dns, dn_macs = parse_dns(cfg, backbone)
    if cfg.individual:  # the DN's slice starts as a plain network of that size; every other weight is 0
        make_individual_(backbone, dns[0]["width"], dns[0]["depth"])
    ckpt_path = os.path.join(cfg.out_dir, "checkpoints", "last.pt")
    accelerator.print(f"{world} process(es) on {device}, precision {cfg.precision}; {len(dns)} DNs (MMACs): "
                      + ", ".join(f"{dn_name(d)} ({m / 1e6:.0f})" for d, m in zip(dns, dn_macs)))

    # data: as train_us3l.py (augmentation a function of (seed, epoch, index), order of (seed, epoch))
    mean_std = data.normalization(cfg.dataset, cfg.mean, cfg.std)  # the mean/std keys, else the dataset's preset
    if cfg.data_path == Config.data_path:
        with accelerator.main_process_first():
            prepare_cifar10(cfg.data_path, download=True)
    size = cfg.image_size or (32 if cfg.dataset.startswith("cifar") else 224)
    if cfg.knn_monitor and data.is_unlabelled(cfg.data_path):
        raise ConfigError(f"config error: {cfg.data_path}/train holds images without class folders (unlabelled): "
                          f"the kNN monitor needs labels and a test split; set knn_monitor=false")
    train_loader = build_train_loader(cfg.loader, cfg.data_path, cfg.ffcv_path, cfg.dataset, size, cfg.batch_size,
                                      cfg.train_subset, cfg.seed, rank, world, device, cfg.num_workers,
                                      cfg.min_scale, cfg.aug, mean_std)
    steps_per_epoch = train_loader.steps()
    total = cfg.epochs * steps_per_epoch if cfg.max_steps <= 0 else cfg.max_steps
    # with max_steps the epoch-based phases shrink with the run, as the schedules do
    scale = total / (cfg.epochs * steps_per_epoch)
    full_only_steps = round(cfg.full_only_epochs * steps_per_epoch * scale)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch * scale)
    bank_loader = test_loader = None  # knn_monitor=false: no labels needed
    if cfg.knn_monitor:
        bank_loader, test_loader = build_knn_loaders(
            cfg.data_path, cfg.dataset, cfg.knn_batch_size, cfg.knn_bank_subset, cfg.knn_test_subset,
            cfg.num_workers, cfg.seed, cache=cfg.dataset.startswith("cifar"),
            loader="device" if cfg.loader == "device" else "torch", device=device, mean_std=mean_std)

    # target = EMA of encoder + projector, always full width and depth, never prepared
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32  # of the weights (autocast aside)
    online = set_sync_bn(online.to(device, dtype, memory_format=fmt), cfg.sync_bn)
    encoder = nn.ModuleDict({k: online[k] for k in ("backbone", "projector")})  # shares the online modules
    target = copy.deepcopy(encoder).requires_grad_(False)  # BN synced as the online one's
    if cfg.individual:  # an individual network's target is that network (else the whole one)
        set_active(target["backbone"], dns[0]["width"], dns[0]["depth"])
    # with sync_bn the target's momentum statistics are the global batch's: the same target on every process
    target_bns = momentum_bns(target) if cfg.momentum_bn else []
    if world > 1 and not cfg.sync_bn:
        accelerator.print(f"NOTE: sync_bn=false: BN statistics per process ({cfg.batch_size} x 2 views), so the "
                          f"result depends on the number of processes")
    lr_peak = cfg.base_lr * cfg.batch_size * world / 256
    groups = param_groups(online.parameters(), cfg.weight_decay)  # no decay / adaptation for p.ndim <= 1
    optimizer = (LARS(groups, lr=lr_peak, momentum=cfg.sgd_momentum, eta=cfg.lars_eta) if cfg.optimizer == "lars"
                 else torch.optim.SGD(groups, lr=lr_peak, momentum=cfg.sgd_momentum))
    accelerator.print(f"{cfg.arch}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params; global batch "
                      f"{cfg.batch_size * world}, lr {lr_peak:.4g}, {steps_per_epoch} steps/epoch, {total} steps "
                      f"({full_only_steps} full-only, {warmup_steps} warm-up)")

    # fp16: loss scaling, the skip of an overflowing step shared by every process (utils.optimizer_step_)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    state = {"online": online, "target": target, "optimizer": optimizer}
    if scaler.is_enabled():
        state["scaler"] = scaler
    found = {"wandb_id": None}  # the W&B run a resumed run continues
    step = load_resume(cfg, ckpt_path, state, accelerator, extra=found)
    if accelerator.is_main_process:  # after the data and the resume check: a run that fails before training
        os.makedirs(os.path.dirname(ckpt_path), exist_ok=True)  # creates no folder, a refused one keeps its config
        save_config(cfg, cfg.out_dir)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if accelerator.is_main_process:
        trim_jsonl(log_path, step)  # a killed run's records past its last checkpoint are logged again

    results_path = os.path.join(cfg.out_dir, "results.json")
    results = read_results(results_path, accelerator)
    if step >= total and "knn_top1" in results:
        accelerator.print(f"{cfg.out_dir} is a finished run ({step} steps): nothing to do")
        return results
    # a run killed before its first checkpoint has its W&B id in results.json only
    run_id = found["wandb_id"] or (results.get("wandb_id") if cfg.resume == "auto" else None)
    run_id = init_tracker(accelerator, cfg, "dspnet", run_id, step)
    if run_id:
        results["wandb_id"] = run_id

    def monitor(tag):  # weighted kNN on the online encoder at the largest and the smallest DN (or all DNs)
        if not cfg.knn_monitor:
            return {}
        t0, acc = time.time(), {}
        calib = calibration_batches(bank_loader, 2000, cfg.seed)
        for dn in range(len(dns)) if cfg.knn_dns == "all" else sorted({0, len(dns) - 1}):
            a = knn_eval(online["backbone"], bank_loader, test_loader, calib, [dns[dn]["width"]], device,
                         k=cfg.knn_k, temperature=cfg.knn_temperature, depth=dns[dn]["depth"],
                         autocast=cfg.precision == "bf16", all_reduce=world > 1,
                         progress=accelerator.is_main_process)
            acc[dn_name(dns[dn])] = round(a[dns[dn]["width"]], 4)
        accelerator.print(f"kNN top-1 ({tag}, step {step}): {acc}  [{time.time() - t0:.0f} s]")
        tracker_log(accelerator, {f"knn_top1/{name}": a for name, a in acc.items()}, step)
        if tag == "end":  # the collapse statistic at every monitored DN (log.jsonl: the sampled ones only)
            slices = {dn_name(d): (d["width"], d["depth"]) for d in dns if dn_name(d) in acc}
            results["collapse_std"] = collapse_eval(online["backbone"], online["projector"], calib, slices, device,
                                                    autocast=cfg.precision == "bf16")
            accelerator.print(f"collapse std (end; uniform spread {cfg.proj_dim ** -0.5:.4f}): {results['collapse_std']}")
            tracker_log(accelerator, {f"collapse_std_end/{k}": v for k, v in results["collapse_std"].items()}, step)
        return acc

    def write_results():
        if accelerator.is_main_process:
            with open(results_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(results_path + ".tmp", results_path)

    if "knn_top1_init" not in results and step == 0:
        results["knn_top1_init"] = monitor("random init")
        write_results()

    params = list(online.parameters())
    # N processes: the gradients' all-reduce overlaps the last DN's backward (bucketed, asynchronous)
    grad_sync = OverlappedAllReduce(params, world) if cfg.overlap_allreduce and world > 1 else None
    arm = grad_sync.arm if grad_sync is not None else None  # called before the last backward of a step
    last_save, t_log, seen = time.time(), time.time(), 0
    t_next, wait = time.time(), 0.0  # host time spent waiting for the next batch since the last log
    sums = torch.zeros(len(dns), device=device)  # loss sums per DN since the last log
    counts = torch.zeros(len(dns), device=device)
    saver = BackgroundSaver()  # the main process writes checkpoints in a thread; nobody waits for it
    pbar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    while step < total:
        epoch = step // steps_per_epoch
        train_loader.set_epoch(epoch, step % steps_per_epoch)
        for (x1, x2), _ in to_device(train_loader, device):  # the next batch's copy overlaps this step
            wait += time.time() - t_next
            if step >= total:
                break
            lr = warmup_cosine(step, total, warmup_steps, lr_peak)
            tau = cosine(step, total, cfg.momentum, 1.0)
            bn_m = bn_momentum(step, total)  # a function of the step: a resumed run continues it exactly
            for m in target_bns:
                m.stats_momentum = bn_m
            for g in optimizer.param_groups:
                g["lr"] = lr
            picked = sample_dns(step, full_only_steps, len(dns), cfg)
            x = torch.cat([x1, x2]).to(dtype).contiguous(memory_format=fmt)  # on the device: (2B, 3, H, W)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
            step_losses, stats = train_step(online, target, x, [dns[i] for i in picked], accelerator.autocast, log_now,
                                            scaler.scale, arm)
            for i, loss in zip(picked, step_losses):  # int indices: a list index would be a host-to-device copy
                sums[i] += loss
                counts[i] += 1
            optimizer_step_(optimizer, scaler, params, world, overlap=grad_sync)  # one all-reduce per step
            ema_update_(target, encoder, tau, buffers=not cfg.momentum_bn)  # momentum BN: the target's own stats
            step += 1
            seen += x1.shape[0] * world
            pbar.update(1)

            save_due = step % steps_per_epoch == 0 or step == total or (cfg.save_every and step % cfg.save_every == 0)
            if world == 1 or log_now:  # minutes-based cadence: each step in one process; with several, the
                late = time.time() - last_save > 60 * cfg.save_every_min  # main one decides for all at log steps
                if world > 1:
                    late = bool(broadcast(torch.tensor([late], device=device)).item())
                save_due = save_due or late
            if log_now or save_due:  # losses must be finite on every rank before anything is logged or saved
                per_dn = check_finite({f"loss/{dn_name(d)}": s / c.clamp(min=1) for d, s, c in zip(dns, sums, counts)},
                                      step, accelerator)
            if log_now:  # data_wait: the share of the time spent waiting for the loader (host side)
                dt = time.time() - t_log
                rec = {"step": step, "epoch": epoch, "lr": lr, "tau": tau, "dns": [dn_name(dns[i]) for i in picked],
                       **({"bn_momentum": bn_m} if target_bns else {}),
                       "img_per_s": seen / dt, "data_wait": wait / dt, **to_floats(stats),
                       **{k: v for (k, v), c in zip(per_dn.items(), counts.tolist()) if c > 0}}  # DNs run
                sums.zero_()
                counts.zero_()
                seen, t_log, wait = 0, time.time(), 0.0
                pbar.set_postfix(loss=f"{rec[f'loss/{dn_name(dns[0])}']:.3f}", dns=len(picked),
                                 ips=f"{rec['img_per_s']:.0f}")
                if accelerator.is_main_process:
                    log_jsonl(log_path, rec)
                    tracker_log(accelerator, rec, step)
            if save_due:
                if accelerator.is_main_process:
                    saver.save({**{k: m.state_dict() for k, m in state.items()}, "step": step,
                                "num_processes": world, "config": asdict(cfg), "wandb_id": run_id}, ckpt_path)
                last_save = time.time()
            if step % steps_per_epoch == 0 and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0 and step < total:
                results.setdefault("knn_top1_history", {})[str(step)] = monitor(f"epoch {step // steps_per_epoch}")
                write_results()
            t_next = time.time()
    pbar.close()
    getattr(train_loader, "close", lambda: None)()  # loader=ffcv: stop its reading thread
    saver.wait()  # the last checkpoint is on disk

    for m in (online, target):  # fails loudly if any process diverged (the target's momentum BN included)
        check_same_across_processes(m, accelerator, buffers=cfg.sync_bn)
    results["num_processes"] = world
    results["knn_top1"] = monitor("end")
    if accelerator.is_main_process:  # plain tensors and primitives: models.load_backbone reads it
        atomic_save({"arch": cfg.arch, "backbone": cpu_state(online["backbone"]),
                     "teacher": cpu_state(target["backbone"]), "dns": dns, "width_min": dns[-1]["width"],
                     "individual": dns[0] if cfg.individual else None,  # eval_knn.py refuses any other network
                     "widths": sorted({d["width"] for d in dns}, reverse=True), "step": step, "config": asdict(cfg)},
                    os.path.join(cfg.out_dir, "backbone.pt"))
    write_results()
    accelerator.end_training()
    return results


def bn_momentum(step, total):
    """The target's momentum-BN weight on the new batch's statistics at `step`: 1 at step 0 (batch
    statistics), falling by cosine to 0 at `total` (statistics frozen as the target's weights freeze,
    tau -> 1). NOTE: "Momentum^2 Teacher" (Li et al. 2021), which DSPNet cites for momentum BN,
    decays it this way; DSPNet gives no schedule of its own. We take the full 1 -> 0 with no floor."""
    return cosine(step, total, 1.0, 0.0)


def momentum_bns(target):
    """The BNs that run momentum BN: every BN of the target, its backbone's and its projector's."""
    return [m for m in target.modules() if isinstance(m, (SlimBatchNorm2d, BatchNorm1d))]


def dn_name(dn):
    """'1.0' for a width-only DN, '0.6667_d2-2-2-2' with a depth: keys of log.jsonl and results.json."""
    return net_name(dn["width"], dn["depth"])


def train_step(online, target, x, dns, autocast, log=False, scale=None, before_last=None):
    """Gradients of one DSPNet iteration (Sec. 4) for the two views x = cat(v, v'): the target projects
    both views once, shared by every DN; then each DN in turn (largest first) runs the online encoder,
    projector and predictor on both views and back-propagates its symmetric BYOL loss (eq. 5 and its
    mirror) on its own, so only one DN's activations are alive at a time; gradients accumulate
    (the sum over DNs of the paper's total loss). scale: the fp16 loss scaling (GradScaler.scale)
    applied before each backward; before_last(loss) before the last (OverlappedAllReduce.arm). Returns
    the per-DN losses (detached, unscaled) and, when log, the collapse monitor (std of the normalized
    projections) per DN."""
    with torch.no_grad(), autocast():
        z_t = losses.f32(target["projector"](target["backbone"](x)))  # (2B, D), full width and depth
    t1, t2 = z_t.chunk(2)
    out, stats = [], {}
    for i, dn in enumerate(dns):
        with autocast():
            set_active(online["backbone"], dn["width"], dn["depth"])
            z = online["projector"](online["backbone"](x))
            p1, p2 = online["predictor"](z).chunk(2)  # (2B, D) -> 2 x (B, D)
            loss = losses.normalized_mse(p1, t2) + losses.normalized_mse(p2, t1)
        if before_last is not None and i == len(dns) - 1:
            before_last(loss)
        (scale(loss) if scale else loss).backward()
        out.append(loss.detach())
        if log:
            stats[f"collapse_std/{dn_name(dn)}"] = losses.collapse_std(z)  # a tensor: no host sync between DNs
    set_active(online["backbone"], 1.0)
    return torch.stack(out), stats


if __name__ == "__main__":
    run(main, Config)
