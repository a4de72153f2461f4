"""US3L pretraining: one run, no labels, one set of weights that runs at any width in [width_min, 1].

Paper: "Three Guidelines You Should Know for Universally Slimmable Self-Supervised Learning" (Cao et
al., CVPR 2023), Algorithm 1, Table 7 case 13 by default: momentum teacher (EMA of backbone +
projector at full width); base network trained with InfoNCE (eq. 2) against the teacher's keys;
sub-networks distilled through an auxiliary head g with MSE on normalized vectors (eq. 6) to the
teacher's keys of the other view; dynamic sampling (full width only for the first quarter, then min
width 0.75 -> 0.5 -> 0.25); group regularization (eqs. 4-5). Every case of Table 7 and every row of
Tables 8 and 9 is a combination of config keys: yaml/us3l_ablations/ holds one recipe per row.

    python train_us3l.py --config yaml/cifar10_quick.yaml                          # CPU or 1 GPU
    accelerate launch train_us3l.py --config yaml/r50_in.yaml                      # all GPUs of a node
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train_us3l.py ...  # 2 CPU procs

Decisions where the paper is silent or loose (NOTE; README and docs/design.md, US3L as implemented):
- Loss scale (what lr 0.5 at batch 512 was tuned with). Per step L = L_base + sum over sub-networks
  of L_distill; each loss is a batch mean, and its two view directions (view 1 -> 2, 2 -> 1) are
  averaged (loss_views=mean), as the authors' release does; Algorithm 1 line 15 writes a sum, which
  at the same lr doubles every gradient. Temperature 0.5 (the paper omits it; the release and
  SimCLR's CIFAR recipe use 0.5). L_distill = 1 - cos (eq. 6, the gradient of -cos). The quick
  recipe keeps the earlier scale (sum, T 0.2, keys of the other view) its measured run used: about
  5x the base-loss gradient of the default.
- Negatives of InfoNCE (infonce_negatives=both_views): eq. (2) has 2B-2 negatives, the other images
  in both views. With a momentum teacher every term but the query is a teacher key (its keys of
  both views; the key of the query's own image and view is left out); without one (Table 7 cases 9
  to 11, 14, 15) it is SimCLR's NT-Xent: gradients through both views. other_view: MoCo's form, the
  B-1 keys of the other view. The release's momentum loss is a third form, not offered here:
  NT-Xent over the student's outputs of one view and the teacher's of the other (the student's
  same-view outputs are negatives, with gradient). Eq. (7) keeps the keys of the other view only.
- Without the sandwich rule (sandwich=false, Table 9) the largest width drawn takes the base loss
  and, with momentum_target_sub=false, provides the sub-networks' targets (as the release does).
- EMA teacher: tau from 0.99 to 1 by a cosine over the run (BYOL); the release keeps 0.99 constant
  (momentum_cosine=false). Biases and BN parameters get no weight decay (BYOL, MoCo); the paper
  gives wd 1e-4 with no exception and the release decays them too. Projector Linear(D, 2048, no
  bias)-BN-ReLU-Linear(2048, 128) (BYOL's, 2 layers); the aux head g (and the predictor of an MSE
  base loss) is the same MLP on 128-d; the paper gives no shape (the release's BYOL: a 3-layer
  2048-d projector, proj_layers=3, and 2048-d predictor and g: yaml/r18_in_release.yaml). The ViT
  recipe is MoCo v3's (the paper used its code): proj_layers=3 and proj_last_bn=true (Linear-BN-
  ReLU twice, then Linear-BN without affine, hidden 4096, out 256), predictor=true (Linear-BN-ReLU-
  Linear-BN without affine, on the base network's query side only; the teacher's keys never pass it), arch
  vit_tiny_cifar_mocov3 (models.ViT). With a predictor and no aux head, sub-networks distill
  through the predictor (as with base_loss=mse); with one, g alone.
- The two views run as one batch (BN statistics over both, as SimCLR); the model is not wrapped in
  DDP: each width has its own backward and the gradients are all-reduced once per step by hand, in
  buckets sent while the last width's backward runs (overlap_allreduce; DDP would need no_sync and
  unused-parameter handling for the heads that some widths skip); InfoNCE keys are gathered from all
  processes.
Under N processes every BN (backbone at any width, heads, teacher) normalizes with the statistics of
the global batch (sync_bn, models.set_sync_bn), so N processes of batch B/N train what one process of
batch B trains (tested with 2 processes in fp64: equal to 1e-12) and the teacher's keys carry no
per-process BN statistics (MoCo's "BN leak"); fp16 scales the loss (GradScaler) and skips an
overflowing step on every rank.

Re-running the same command resumes from out_dir/checkpoints (resume=auto). At the end out_dir holds
backbone.pt (online backbone + EMA teacher, plain tensors; models.load_backbone reads it),
results.json (kNN top-1 per width, before and after training), log.jsonl and config.yaml.
"""

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

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
from knn import build_knn_loaders, calibration_batches, collapse_eval, knn_eval
from models import ARCHS, make_individual_, min_width, projection_mlp, set_active, set_sync_bn
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
    train_subset: int = 0  # > 0: class-balanced subset of the training set (quick CPU runs)
    num_workers: int = 2  # DataLoader workers per process (loader=torch; decoding for loader=device); loader=ffcv:
    # FFCV's decoding threads per process, 0 = utils.cpus_per_rank() (the process's share of the node's CPUs)
    bad_images: str = "fail"  # an image that does not decode: fail (error naming it) | skip (warn, use the next)
    loader: str = "torch"  # torch (per-sample CPU augmentation) | device (whole split on the device, batched
    # augmentation there: CIFAR scale) | ffcv (ffcv_path/train.beton, crops in FFCV, the rest batched)
    ffcv_path: str = ""  # loader=ffcv: folder written by `python ffcv_data.py` (the kNN monitor reads data_path)
    # --- model
    arch: str = "resnet18_cifar"  # a key of models.ARCHS
    proj_hidden: int = 2048  # projector / heads hidden size
    proj_dim: int = 128  # output of projector, predictor and auxiliary head
    proj_layers: int = 2  # projector: 2 (BYOL: Linear-BN-ReLU-Linear) | 3 (one more Linear-BN-ReLU: MoCo v3,
    # SimSiam, the US3L release)
    proj_last_bn: bool = False  # MoCo v3: a BN without affine after the last Linear of the projector and, with
    # predictor=true, of the predictor and the aux head g (the release's ViT: g is a copy of the predictor)
    predictor: bool = False  # MoCo v3: a predictor MLP (proj_dim -> proj_hidden -> proj_dim) on the query
    # side of the base network's InfoNCE (base_loss=mse always has one)
    channels_last: bool = True  # faster convolutions with bf16 (CPU and GPU)
    # --- US3L (Table 7 switchboard; defaults = case 13)
    width_min: float = 0.25  # smallest width trained (R_min at the end of dynamic sampling)
    individual: float = 0.0  # > 0: the papers' "individually trained" baseline: this width alone, as a plain
    # network of its own init (models.make_individual_), the same recipe without sub-networks (no aux head,
    # distillation, dynamic sampling or group regularization); 0: the slimmable run
    num_widths: int = 3  # sandwich size per step: full, smallest, num_widths-2 random (paper: 3)
    width_grid: float = 0.0  # > 0: each random width rounded to a multiple of it (e.g. 0.015625 = 1/64) within
    # [R_min, 1]: a few dozen shapes for cudnn.benchmark to tune on a GPU instead of ~190; 0: any width (the paper)
    sandwich: bool = True  # false (Table 9): num_widths random widths, the largest takes the base loss
    # (logged as loss/1.0; loss/min is then the smallest drawn)
    dynamic_sampling: bool = True  # full width only for the first quarter, then min width 0.75/0.5/0.25
    base_loss: str = "infonce"  # infonce | mse (mse adds a SimSiam/BYOL predictor to the base network)
    distill_loss: str = "mse"  # mse (eq. 6) | infonce (eq. 7) | none (sub-networks use the base loss)
    aux_head: bool = True  # auxiliary distillation head g of eq. (3), used by sub-networks only
    momentum_target_base: bool = True  # base network's targets: EMA teacher (else its own other view)
    momentum_target_sub: bool = True  # sub-networks' targets: EMA teacher (else the base network)
    infonce_negatives: str = "both_views"  # base InfoNCE, eq. (2): both_views (2B-2 negatives; no teacher:
    # SimCLR's NT-Xent, gradients through both views) | other_view (B-1, keys detached: MoCo)
    temperature: float = 0.5  # InfoNCE (the paper omits it; 0.5: the authors' release, SimCLR on CIFAR)
    loss_views: str = "mean"  # the two view directions of every loss: mean (authors' release) | sum (Alg. 1)
    group_reg_alpha: float = 0.05  # eq. (5); 0 = plain L2 weight decay
    group_reg_form: str = "paper"  # paper: eqs. (4)-(5) on the backbone's weights (ndim > 1), the heads plain L2,
    # biases and norms no decay | release: the authors' code (GroupReg): every trained tensor decayed, conv
    # weights and all vectors (biases, BN/LN) by eq. (5)'s groups, Linear weights plain; alpha ramps linearly
    # from 0 (at group_reg_warmup_epochs) to group_reg_alpha at the middle of the run
    group_reg_warmup_epochs: float = 0.0  # plain L2 (alpha 0) for these epochs (the release's ImageNet run: 50)
    step_per_width: bool = False  # false: one optimizer step per batch (Algorithm 1) | true: a step, decay and
    # group regularization after each width's backward, as the authors' release does (3 per batch in stage 4)
    momentum: float = 0.99  # EMA teacher tau at the start
    momentum_cosine: bool = True  # tau -> 1 by cosine over the run (BYOL); else constant
    # --- optimization
    epochs: int = 400
    batch_size: int = 512  # per process
    base_lr: float = 0.25  # lr = base_lr * global batch / 256: 0.5 at batch 512, as the paper's CIFAR
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to 0
    weight_decay: float = 1e-4  # lambda of eq. (5), applied as group regularization to the backbone
    optimizer: str = "sgd"  # sgd | lars (biases and norms: no decay, no trust ratio) | adamw (ViT)
    sgd_momentum: float = 0.9
    precision: str = "bf16"  # bf16 | fp16 (with loss scaling: V100, T4) | no (fp32) | fp64 (exactness tests)
    sync_bn: bool = True  # BN statistics over every process's batch (no effect on 1 process); false: per process
    overlap_allreduce: bool = True  # N processes: gradient buckets all-reduced while the last backward runs
    # (utils.OverlappedAllReduce); false: one blocking all-reduce after it (the fallback, and the bench's baseline)
    seed: int = 0
    # --- run
    out_dir: str = "out/us3l"
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
    knn_widths: list[float] = field(default_factory=list)  # widths the kNN monitor evaluates ([]: 1.0, width_min)
    knn_batch_size: int = 128  # 128 was the fastest on the 2-core CPU (bf16, channels_last)
    tracker: str = ""  # tensorboard | wandb (optional, pip install wandb) | "": files in out_dir; log.jsonl always


def check_config(cfg):
    choices = {"base_loss": ("infonce", "mse"), "distill_loss": ("mse", "infonce", "none"),
               "infonce_negatives": ("both_views", "other_view"), "loss_views": ("mean", "sum"),
               "optimizer": ("sgd", "lars", "adamw"), "precision": ("bf16", "fp16", "no", "fp64"),
               "dataset": ("cifar10", "cifar100", "imagenet"), "arch": tuple(ARCHS),
               "loader": ("torch", "device", "ffcv"), "bad_images": ("fail", "skip"),
               "group_reg_form": ("paper", "release"), "aug": ("byol", "mocov2")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config error: {key}={getattr(cfg, key)!r}, allowed: {', '.join(allowed)}")
    if not cfg.out_dir:
        raise ConfigError("config error: out_dir is empty: name the run's folder, e.g. --out_dir=out/NAME")
    if not 0 < cfg.width_min <= 1:
        raise ConfigError(f"config error: width_min={cfg.width_min} must be in (0, 1]")
    floor = min_width(ARCHS[cfg.arch]())
    if cfg.individual and not floor <= cfg.individual <= 1:
        raise ConfigError(f"config error: individual={cfg.individual}: the width must be in [{floor:.4g}, 1] "
                          f"({cfg.arch}), or 0 for the slimmable run")
    if cfg.width_min < floor:
        raise ConfigError(f"config error: width_min={cfg.width_min} is below {cfg.arch}'s minimum width {floor:.4g} "
                          f"(every layer at its channel floor); allowed: [{floor:.4g}, 1]")
    if any(not floor <= w <= 1 for w in cfg.knn_widths):
        raise ConfigError(f"config error: knn_widths={cfg.knn_widths}: each must be in [{floor:.4g}, 1]")
    if cfg.num_widths < (2 if cfg.sandwich else 1):
        raise ConfigError(f"config error: num_widths={cfg.num_widths}: the sandwich needs >= 2 (full + smallest)"
                          if cfg.sandwich else f"config error: num_widths={cfg.num_widths} must be >= 1")
    if cfg.proj_layers not in (2, 3):
        raise ConfigError(f"config error: proj_layers={cfg.proj_layers}, allowed: 2, 3")
    if not 0 <= cfg.width_grid < 1:
        raise ConfigError(f"config error: width_grid={cfg.width_grid} must be in [0, 1) (0: no grid)")
    if not cfg.temperature > 0:
        raise ConfigError(f"config error: temperature={cfg.temperature} must be > 0")
    check_tracker(cfg.tracker)


def sample_widths(step, total, cfg):
    """Widths of one step, largest first (Algorithm 1). A generator seeded by (seed, step): identical
    on every process and after a resume, whatever else drew random numbers. sandwich=false (Table 9):
    num_widths uniform draws in [R_min, 1], neither the full nor the smallest width forced."""
    if cfg.individual:
        return [cfg.individual]
    if cfg.dynamic_sampling:
        period = max(total // 4, 1)  # T_p
        stage = min(step // period, 3)
        if stage == 0:
            return [1.0]  # stage 1: the base network only
        # R_min = 1 - 0.25 * floor(t / T_p) for width_min = 0.25; generally 3 equal steps to width_min
        r_min = 1.0 - stage * (1.0 - cfg.width_min) / 3
    else:
        r_min = cfg.width_min
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)

    def draw(n):
        ws = (r_min + (1.0 - r_min) * torch.rand(n, generator=g)).tolist()
        if cfg.width_grid:
            ws = [min(1.0, max(r_min, round(w / cfg.width_grid) * cfg.width_grid)) for w in ws]
        return sorted(ws, reverse=True)

    if not cfg.sandwich:
        return draw(cfg.num_widths)
    return [1.0] + draw(cfg.num_widths - 2) + [r_min]


def group_alpha(step, total, cfg):
    """alpha of eq. (5) at this step: 0 (plain L2) for group_reg_warmup_epochs; with group_reg_form=release,
    then a linear ramp to group_reg_alpha at the middle of the run (the release ramps per epoch; here per
    step, and in fractions of the run, so max_steps compresses it as it does every schedule)."""
    t, warm = step / max(total, 1), cfg.group_reg_warmup_epochs / cfg.epochs
    if t < warm:
        return 0.0
    if cfg.group_reg_form == "release" and t < 0.5:
        return cfg.group_reg_alpha * (t - warm) / (0.5 - warm)
    return cfg.group_reg_alpha


def individual_config(cfg):
    """individual=w: the same recipe for one network of width w, the sub-network machinery off (said, not
    silent). Applied before config.yaml is written, so the run folder records what ran."""
    if not cfg.individual:
        return cfg, ""
    off = dict(width_min=cfg.individual, num_widths=1, sandwich=False, dynamic_sampling=False, aux_head=False,
               group_reg_alpha=0.0, knn_widths=[cfg.individual])
    changed = {k: v for k, v in off.items() if getattr(cfg, k) != v}
    note = f"individual={cfg.individual}: one network, so " + ", ".join(f"{k}={v}" for k, v in changed.items())
    return replace(cfg, **off), note if changed else ""


def main(cfg):
    check_config(cfg)
    cfg, note = individual_config(cfg)
    data.BAD_IMAGES = cfg.bad_images
    accelerator = Accelerator(mixed_precision={"fp64": "no"}.get(cfg.precision, cfg.precision),
                              log_with=cfg.tracker or None, project_dir=cfg.out_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    # cudnn autotunes each conv shape once: a random width is one of a few hundred channel sets
    # (make_divisible rounds to multiples of 8), so the tuning is paid a few hundred times per run
    torch.backends.cudnn.benchmark = device.type == "cuda"
    check_precision(cfg.precision, device)  # bf16 below compute capability 8.0: one line, not a slow run
    ckpt_path = os.path.join(cfg.out_dir, "checkpoints", "last.pt")
    accelerator.print(f"{world} process(es) on {device}, precision {cfg.precision}" + (f"\n{note}" if note else ""))

    # data: augmentation is a function of (seed, epoch, index) and the order of (seed, epoch)
    mean_std = data.normalization(cfg.dataset, cfg.mean, cfg.std)  # the mean/std keys, else the dataset's preset
    if cfg.data_path == Config.data_path:  # missing: extracted from the CIFAR-10 tarball, else downloaded
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
    # the kNN images at the input size the network fixes (a ViT's img_size: the release's Table 3 ViT takes CIFAR
    # at 224 px); None for a CNN, which takes any size (CIFAR as is, ImageNet at 224 px)
    with torch.device("meta"):  # the architecture only: no weights allocated, no draw from the RNG
        knn_size = getattr(ARCHS[cfg.arch](), "img_size", None)
    bank_loader = test_loader = None  # knn_monitor=false: no labels needed
    if cfg.knn_monitor:
        bank_loader, test_loader = build_knn_loaders(  # CIFAR-size banks are decoded once and kept in memory
            cfg.data_path, cfg.dataset, cfg.knn_batch_size, cfg.knn_bank_subset, cfg.knn_test_subset,
            cfg.num_workers, cfg.seed, cache=cfg.dataset.startswith("cifar"),
            loader="device" if cfg.loader == "device" else "torch", device=device, image_size=knn_size,
            mean_std=mean_std)

    # model: student = backbone + projector (+ predictor for an MSE base loss) (+ auxiliary head g);
    # teacher = EMA of backbone + projector, always full width, never wrapped by prepare
    # seeded here, after the data: building loaders may draw from the global RNG (each DataLoader
    # iterator takes a base seed), which would make the initial weights depend on `loader`
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    backbone = ARCHS[cfg.arch]()
    if cfg.individual:  # the width-w slice starts as a plain width-w network; every other weight is 0
        make_individual_(backbone, cfg.individual)
    student = nn.ModuleDict({"backbone": backbone,
                             "projector": projection_mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim,
                                                         last_bn=cfg.proj_last_bn, layers=cfg.proj_layers)})
    if cfg.base_loss == "mse" or cfg.predictor:
        student["predictor"] = projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim,
                                              last_bn=cfg.proj_last_bn and cfg.predictor)
    if cfg.aux_head and cfg.distill_loss != "none":  # g: the predictor's shape (the release's MoCo v3 ViT: a copy)
        student["aux"] = projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim,
                                        last_bn=cfg.proj_last_bn and cfg.predictor)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32  # of the weights (autocast aside)
    student = set_sync_bn(student.to(device, dtype, memory_format=fmt), cfg.sync_bn)
    online = nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})  # shares the student's modules
    teacher = copy.deepcopy(online).requires_grad_(False)  # BN synced as the student's (MoCo's BN leak otherwise)
    set_active(teacher["backbone"], cfg.individual or 1.0)  # an individual network's teacher is that network
    if world > 1 and not cfg.sync_bn:
        accelerator.print(f"NOTE: sync_bn=false: BN statistics per process ({cfg.batch_size} x 2 views), so the "
                          f"result depends on the number of processes")

    # optimizer: weight decay is applied by hand as group regularization (backbone, eqs. 4-5) and
    # plain L2 (heads); no decay and no LARS adaptation for biases and norms (p.ndim <= 1); frozen
    # parameters (a ViT's patch projection with MoCo v3's recipe) are in none of these lists
    trained = [p for p in student.parameters() if p.requires_grad]
    groups = param_groups(trained, 0.0)
    lr_peak = cfg.base_lr * cfg.batch_size * world / 256
    if cfg.optimizer == "lars":
        optimizer = LARS(groups, lr=lr_peak, momentum=cfg.sgd_momentum)
    elif cfg.optimizer == "adamw":  # MoCo v3's ViT recipe; decay then decoupled too (below)
        optimizer = torch.optim.AdamW(groups, lr=lr_peak, betas=(0.9, 0.999), weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr_peak, momentum=cfg.sgd_momentum)
    # NOTE: eq. (5) needs dim 0 in slimming order; a ViT's fused qkv rows (q|k|v x heads) and other
    # grouped layers are not, so they get plain decay (alpha 0).
    grouped = {m.weight for m in backbone.modules() if getattr(m, "out_groups", 1) > 1}
    if cfg.group_reg_form == "paper":
        decay_backbone = [p for p in backbone.parameters() if p.ndim > 1 and p.requires_grad and p not in grouped]
        decay_plain = [p for p in grouped if p.requires_grad] + [p for k, m in student.items() if k != "backbone"
                                                                 for p in m.parameters() if p.ndim > 1]
    else:  # the release's GroupReg: conv weights and every vector of the student grouped, the rest plain
        decay_backbone = [p for p in trained if p.ndim in (1, 4) and p not in grouped]
        decay_plain = [p for p in trained if p.ndim in (2, 3) or p in grouped]
    accelerator.print(f"{cfg.arch}: {sum(p.numel() for p in backbone.parameters()) / 1e6:.2f}M params; "
                      f"global batch {cfg.batch_size * world}, lr {lr_peak:.4g}, {steps_per_epoch} steps/epoch, "
                      f"{total} steps")

    # fp16: loss scaling, the skip of an overflowing step shared by every process (utils.optimizer_step_)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    state = {"student": student, "teacher": teacher, "optimizer": optimizer}
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
    run_id = init_tracker(accelerator, cfg, "us3l", run_id, step)
    if run_id:
        results["wandb_id"] = run_id

    def monitor(tag):  # weighted kNN on the online backbone, BN recalibrated per width
        if not cfg.knn_monitor:
            return {}
        widths = sorted(set(cfg.knn_widths) or {1.0, cfg.width_min}, reverse=True)
        t0 = time.time()
        calib = calibration_batches(bank_loader, 2000, cfg.seed)  # US-Nets calibrate on ~2k images
        acc = knn_eval(student["backbone"], bank_loader, test_loader, calib, widths, device, k=cfg.knn_k,
                       temperature=cfg.knn_temperature, autocast=cfg.precision == "bf16", all_reduce=world > 1,
                       progress=accelerator.is_main_process)
        acc = {str(w): round(a, 4) for w, a in acc.items()}
        accelerator.print(f"kNN top-1 ({tag}, step {step}): {acc}  [{time.time() - t0:.0f} s]")
        tracker_log(accelerator, {f"knn_top1/{w}": a for w, a in acc.items()}, step)
        if tag == "end":  # the collapse statistic at every monitored width (log.jsonl: the sampled ones only)
            results["collapse_std"] = collapse_eval(student["backbone"], student["projector"], calib,
                                                    {str(w): (w, None) for w in widths}, device,
                                                    autocast=cfg.precision == "bf16")
            accelerator.print(f"collapse std (end; uniform spread {cfg.proj_dim ** -0.5:.4f}): {results['collapse_std']}")
            tracker_log(accelerator, {f"collapse_std_end/{w}": v for w, v in results["collapse_std"].items()}, step)
        return acc

    def write_results():
        if accelerator.is_main_process:
            with open(results_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(results_path + ".tmp", results_path)

    if "knn_top1_init" not in results and step == 0:
        results["knn_top1_init"] = monitor("random init")
        write_results()

    # one step = the full-width base network and the sub-networks of sample_widths, each with its
    # own backward (activations of one width are freed before the next), one optimizer step
    params = trained
    # N processes: the gradients' all-reduce overlaps the last width's backward (bucketed, asynchronous)
    grad_sync = OverlappedAllReduce(params, world) if cfg.overlap_allreduce and world > 1 else None
    arm = grad_sync.arm if grad_sync is not None else None  # called before the last backward of a step
    vectors = cfg.group_reg_form == "release"  # biases and norms decayed too
    last_save, t_log, seen = time.time(), time.time(), 0
    t_next, wait = time.time(), 0.0  # host time spent waiting for the next batch since the last log
    sums = torch.zeros(cfg.num_widths, device=device)  # loss sums per sandwich position since the last log
    saver = BackgroundSaver()  # the main process writes checkpoints in a thread; nobody waits for it
    pbar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
    while step < total:
        epoch = step // steps_per_epoch
        train_loader.set_epoch(epoch, step % steps_per_epoch)
        for (x1, x2), _ in to_device(train_loader, device):  # the next batch's copy overlaps this step
            wait += time.time() - t_next
            if step >= total:
                break
            lr = warmup_cosine(step, total, int(cfg.warmup_epochs * steps_per_epoch), lr_peak)
            tau = cosine(step, total, cfg.momentum, 1.0) if cfg.momentum_cosine else cfg.momentum
            for g in optimizer.param_groups:
                g["lr"] = lr
            widths = sample_widths(step, total, cfg)
            x = torch.cat([x1, x2]).to(dtype).contiguous(memory_format=fmt)  # on the device: (2B, 3, H, W)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == total
            alpha = group_alpha(step, total, cfg)

            def regularize():
                if cfg.optimizer == "adamw":  # decoupled: w_k -= lr * lambda_k * w_k
                    losses.group_decay_(decay_backbone, lr, cfg.weight_decay, alpha=alpha, vectors=vectors)
                    losses.group_decay_(decay_plain, lr, cfg.weight_decay, alpha=0.0)
                else:  # the gradient of 0.5 * eq. (4): enters the momentum like SGD's L2 decay
                    losses.add_group_reg_grad_(decay_backbone, cfg.weight_decay, alpha=alpha, vectors=vectors)
                    losses.add_group_reg_grad_(decay_plain, cfg.weight_decay, alpha=0.0)

            def optimizer_step():  # one all-reduce per step, not per backward (no DDP); regularize on unscaled grads
                optimizer_step_(optimizer, scaler, params, world, regularize, grad_sync)

            step_losses, stats = forward_backward(student, teacher, x, widths, cfg, accelerator.autocast, log_now,
                                                  scaler.scale, arm, optimizer_step if cfg.step_per_width else None)
            sums[:len(widths)] += step_losses
            if not cfg.step_per_width:
                optimizer_step()
            if cfg.momentum_target_base or cfg.momentum_target_sub:
                ema_update_(teacher, online, tau)
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
                names = ["loss/1.0"] + [f"loss/rand{j}" for j in range(len(widths) - 2)] + ["loss/min"] * (len(widths) > 1)
                per_width = check_finite(dict(zip(names, sums)), step, accelerator)
            if log_now:  # data_wait: the share of the time spent waiting for the loader (host side)
                dt = time.time() - t_log
                rec = {"step": step, "epoch": epoch, "lr": lr, "tau": tau, "widths": widths,
                       "img_per_s": seen / dt, "data_wait": wait / dt, **to_floats(stats),
                       **{k: v / cfg.log_every for k, v in per_width.items()}}  # mean per sandwich position
                sums.zero_()
                seen, t_log, wait = 0, time.time(), 0.0
                pbar.set_postfix(loss=f"{rec['loss/1.0']:.3f}", widths=len(widths), ips=f"{rec['img_per_s']:.0f}")
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

    check_same_across_processes(student, accelerator, buffers=cfg.sync_bn)  # fails loudly if any process diverged
    results["num_processes"] = world
    results["knn_top1"] = monitor("end")
    if accelerator.is_main_process:
        # plain tensors and primitives only: torch.load(weights_only=True) and models.load_backbone
        atomic_save({"arch": cfg.arch, "backbone": cpu_state(student["backbone"]),
                     "teacher": cpu_state(teacher["backbone"]), "width_min": cfg.width_min,
                     "widths": sorted({w for w in (1.0, 0.75, 0.5, 0.25) if w >= cfg.width_min} | {cfg.width_min},
                                      reverse=True) if not cfg.individual else [cfg.individual],  # the default
                     # list eval_knn.py / eval_linear.py evaluate; an individual network refuses any other
                     "individual": {"width": cfg.individual, "depth": None} if cfg.individual else None,
                     "step": step, "config": asdict(cfg)}, os.path.join(cfg.out_dir, "backbone.pt"))
    write_results()
    accelerator.end_training()
    return results


def pair_loss(kind, q, t, cfg, own=False):
    """One loss over both views, q and t (2B, D) = cat(view 1, view 2): the directions q1 -> t2 and
    q2 -> t1, averaged or summed (cfg.loss_views). kind: infonce (the base loss, eq. 2), nce (eq. 7:
    keys of the other view only), mse (eqs. 1 and 6). own: t is the network's own output, no teacher
    (then InfoNCE with both_views is SimCLR's NT-Xent, gradients through both views)."""
    q1, q2 = q.chunk(2)  # (2B, D) -> 2 x (B, D)
    t1, t2 = t.chunk(2)
    if kind == "mse":
        both = losses.mse_distill(q1, t2) + losses.mse_distill(q2, t1)
    elif kind == "nce" or cfg.infonce_negatives == "other_view":
        both = losses.info_nce(q1, t2, cfg.temperature) + losses.info_nce(q2, t1, cfg.temperature)
    elif own:
        both = 2 * losses.nt_xent(q1, q2, cfg.temperature)  # its mean over 2B anchors = mean of the directions
    else:  # eq. (2) with the teacher's keys of both views as positive and negatives
        both = (losses.info_nce(q1, t2, cfg.temperature, k_same=t1)
                + losses.info_nce(q2, t1, cfg.temperature, k_same=t2))
    return both / 2 if cfg.loss_views == "mean" else both


def forward_backward(student, teacher, x, widths, cfg, autocast, log=False, scale=None, before_last=None,
                     step_each=None):
    """One US3L iteration's gradients (Algorithm 1, lines 4-17) for the two views x = cat(x1, x2):
    the base network (widths[0]: 1.0, or the largest drawn without the sandwich rule) and each
    sub-network in turn, each followed by its own backward, so only one width's activations are
    alive at a time (peak memory of a single full-width step); gradients accumulate. scale: the fp16
    loss scaling (GradScaler.scale) applied before each backward; before_last(loss) before the last
    (OverlappedAllReduce.arm). step_each (step_per_width, the release's loop): an optimizer step after
    every width's backward (before_last then comes before every backward); the teacher's keys and the
    base network's outputs (momentum_target_sub=false) are those of the batch's first forward, as there.
    Returns the per-width losses (detached, unscaled) and, when log, the collapse monitor per width."""
    distill = {"mse": "mse", "infonce": "nce"}.get(cfg.distill_loss)
    keys, stats, out = None, {}, []
    if cfg.momentum_target_base or cfg.momentum_target_sub:
        with torch.no_grad(), autocast():  # teacher keys: once per step, shared by every width
            keys = losses.f32(teacher["projector"](teacher["backbone"](x)))
    for i, w in enumerate(widths):
        with autocast():
            set_active(student["backbone"], w)
            z = student["projector"](student["backbone"](x))
            if i == 0:  # base network: L_Base against the teacher (or its own other view)
                q = student["predictor"](z) if "predictor" in student else z  # MoCo v3: query side only
                own = not cfg.momentum_target_base
                loss = pair_loss(cfg.base_loss, q, z if own else keys, cfg, own)
                base_z = z.detach()
            elif distill is None:  # Table 7 'x': the base loss on the sub-network's own outputs
                q = student["predictor"](z) if "predictor" in student else z
                own = not cfg.momentum_target_sub
                loss = pair_loss(cfg.base_loss, q, z if own else keys, cfg, own)
            else:  # L_Distill through the auxiliary head g to the teacher (or the base network)
                q = student["aux"](z) if "aux" in student else (student["predictor"](z) if "predictor" in student else z)
                loss = pair_loss(distill, q, keys if cfg.momentum_target_sub else base_z, cfg)
        if before_last is not None and (i == len(widths) - 1 or step_each is not None):
            before_last(loss)
        (scale(loss) if scale else loss).backward()
        if step_each is not None:
            step_each()
        out.append(loss.detach())
        if log:
            stats[f"collapse_std/{w:.3f}"] = losses.collapse_std(z)  # a tensor: no host sync between widths
    set_active(student["backbone"], 1.0)
    return torch.stack(out), stats


if __name__ == "__main__":
    run(main, Config)
