"""Linear evaluation of a slimmable backbone at every requested width, the semi-supervised
protocol (1% / 10% of the training labels), and semi-supervised fine-tuning; docs/design.md, Evaluation.

Per width: BN statistics are recalibrated exactly for that sub-network (models.calibrate_bn) on
training images with the eval transform, the backbone stays frozen and in eval mode, and a linear
classifier is trained on its pooled features. Two modes:

- `cached` (default; CIFAR scale): extract the features of the (labeled) training images and of the
  test images once per width, then train the head on the cached features: mini-batch SGD with
  momentum 0.9 (Nesterov) and a cosine lr for `epochs` passes; seconds on a CPU.
- `augment`: augmentation on the fly: each step augments a batch (CIFAR: RandomCrop(32, pad 4) +
  flip; ImageNet: RandomResizedCrop(224) + flip), runs the frozen backbone under no_grad and takes
  an SGD step on the head. Slow on a CPU. Recipes: yaml/linear_cifar.yaml and yaml/linear_in.yaml,
  a MoCo v3 / DINO-style probe (100 epochs, a standardizing head); yaml/linear_byol_in.yaml, BYOL's
  protocol, which DSPNet follows (80 epochs, Nesterov SGD, lr 0.2 x batch / 256 cosine, no weight
  decay, a plain Linear head). NOTE: US3L's text gives no probe details and DSPNet evaluates on
  ImageNet only, so the CIFAR recipe and the standardizing head are our choice, not a paper's.
  yaml/linear_us3l_cifar.yaml is the official US3L release's CIFAR probe instead (probe_aug=us3l:
  RandomResizedCrop(32, scale 0.8-1, bicubic) + flip, test images Resize(36) + CenterCrop(32); a plain
  Linear head, lr 30 at batch 512 with lr_schedule=step, x0.1 at epochs 60 and 80, 100 epochs).

A network that fixes its input size (a ViT's img_size) gets the images at it: CIFAR is upsampled
(data.eval_transform: Resize(size * 256 / 224) + CenterCrop(size), bicubic), and probe_aug=default then
trains augment mode and fine-tuning on MoCo v3's probe transforms, RandomResizedCrop(size) + flip, as
the US3L release's ViT probe for Table 3 (ViT_experiments/main_lincls_ddp.py: CIFAR-10 at 224 px, test
images Resize(256) + CenterCrop(224)). NOTE (our decision): the transforms follow the network, the
schedule stays in the keys; that probe's schedule is `--mode=augment --head_bn=false --nesterov=false
--epochs=90 --base_lr=0.1 --batch_size=256` (SGD momentum 0.9, no weight decay, cosine; the command in
yaml/vit_tiny_cifar10_release.yaml's header). Both take torchvision's default bilinear resize; we
upsample bicubic (as data.byol_view crops the pretraining views).

In both modes and in fine-tuning the lr is set by hand each step, a pure function of the step (lr_at):
lr_schedule=cosine (default, to 0 at the end) or step (x0.1 from each epoch in lr_milestones on).

The head is BatchNorm1d(affine=False) + Linear (as MoCo v3 and MAE): the BN standardizes the
features, so one learning rate suits every width and architecture whatever the feature scale.
In cached mode its statistics are the exact mean / variance of the cached training features (set
once, the BN then stays in eval mode: a fixed standardization); in augment mode it runs with batch
statistics during training. head_bn=false drops the BN: a plain Linear (BYOL). Features are NOT
L2-normalized (unlike kNN).

Fine-tuning (finetune=true; DSPNet Fig. 5 fine-tunes every DN on 10% of the labels): per network,
a copy of the pretrained slimmable backbone set to that width / depth (each network starts from the
same pretrained weights) and a Linear classifier are trained together on the labeled images,
augmented on the fly as in `augment` mode, BN in train mode (batch statistics, over every process's
batch). BYOL's schedule: SGD with Nesterov momentum 0.9, no weight decay, 20 epochs at 10% of the
labels, 30 at 1% (epochs=0 picks them), cosine lr. NOTE (where the papers are silent): lr 0.01 x
batch / 256 (0.04 at BYOL's batch 1024; BYOL picks it on a held-out split, we do not tune), the
same for backbone and classifier; after training BN is recalibrated exactly (as for every
evaluation here) instead of keeping running averages, and test images take the eval transform.
`mode` and `head_bn` do not apply. results.json has the linear probe's shape, plus the relative
weight change of each network (`weight_change`); the fine-tuned weights are not saved.

Semi-supervised: --label_fraction=0.01 (or 0.1) keeps a class-balanced seeded subset of the
training labels (data.subset_indices); --label_list=FILE keeps the images it lists, one per line:
a path relative to the train split folder (`n01440764/n01440764_10026.JPEG`), a bare file name
(`n01440764_10026.JPEG`, SimCLR's ImageNet 1% / 10% lists) or an integer index into the train
split. BN calibration uses training images with or without labels (it needs none).

Under N processes BN is calibrated on the same batches as on 1 process (knn.calibration_shard:
a seeded draw from the training pool, rank r forwarding batches r, r + N, ...), the features are
gathered and deduplicated by sample index (knn.extract_features), every rank trains the same
head on the same data with the same seed, and rank 0's head is broadcast (bit-equal heads on every
rank): N processes give 1 process's numbers (tested with 2 CPU processes, fp32). Fine-tuning under
N processes: each rank takes its share of every global batch, BN uses the global batch's statistics
and gradients are averaged, so every rank holds the same network. The backbone's parameters are
compared with a copy at the end: any change raises (fine-tuning trains copies).

    python eval_linear.py --ckpt=out/run/backbone.pt --widths=1.0,0.5,0.25 --out_dir=out/run/linear
    python eval_linear.py --ckpt=out/run/backbone.pt --teacher --label_fraction=0.1 --out_dir=out/run/lin10
    python eval_linear.py --arch=resnet18_cifar --widths=1.0,0.25 --train_subset=10000   # random init
    python eval_linear.py --config yaml/linear_cifar.yaml --ckpt=out/run/backbone.pt        # augment mode
    python eval_linear.py --config yaml/linear_us3l_cifar.yaml --ckpt=out/run/backbone.pt   # the release's probe
    python eval_linear.py --ckpt=out/run/backbone.pt --finetune=true --label_fraction=0.1   # fine-tuning
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_linear.py ...  # CPU, 2 procs
    accelerate launch eval_linear.py --config yaml/linear_byol_in.yaml --ckpt=... --data_path=DIR
    accelerate launch eval_linear.py --config yaml/finetune_dspnet_in.yaml --ckpt=... --data_path=DIR

Outputs in out_dir: config.yaml, results.json {"<width>": {"top1", "top5", "params", "macs"}}
(accuracies in [0, 1]; params / MACs of the backbone sub-network, head excluded), linear.png.
out_dir defaults to a folder beside the checkpoint, one per protocol (linear_kind): <ckpt dir>/linear,
linear_1pct, linear_list_<file stem>, ..._augment, ..._us3l, finetune_10pct, ..._teacher;
out/random_init/<arch>/... without one.
--tracker=tensorboard|wandb also logs each network's top-1, top-5, MMACs and params there.
"""

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
from config import ConfigError, run, save_config
from data import MEAN_STD, EpochSampler, SeededViews, build_dataset, eval_transform, subset_indices
from eval_knn import default_out_dir, eval_data, load_network, log_results, networks_to_eval
from knn import (DeviceBatches, Progress, Upsampled, all_gather_rows, build_knn_loaders, calibration_shard,
                 eval_parts, extract_features, maybe_autocast, rank_world)
from models import calibrate_bn, export, profile, set_active, set_sync_bn
from utils import all_reduce_grads_, check_tracker, init_tracker


@dataclass
class Config:
    ckpt: str = ""  # backbone.pt written by train_us3l.py; empty = random init of --arch (a baseline)
    teacher: bool = False  # evaluate the checkpoint's EMA teacher instead of the online backbone
    arch: str = ""  # models.ARCHS key: a seeded random-init baseline, required without --ckpt (a checkpoint names its own)
    data_path: str = "data/cifar10"  # see data.py; `python data.py extract-cifar10` makes this one
    dataset: str = ""  # cifar10 | cifar100 | imagenet (normalization, transforms); empty = the ckpt's, else cifar10
    mean: list[float] = field(default_factory=list)  # per-channel input normalization, RGB in [0, 1], with std;
    # [] = the ckpt's training run's (its mean/std keys), else the dataset's preset (data.MEAN_STD)
    std: list[float] = field(default_factory=list)  # per-channel std, given with mean; [] = as mean
    widths: list[float] = field(default_factory=list)  # evaluated widths; empty = the ckpt's widths or DSPNet
    # dns (every desired network), else 1.0, 0.75, 0.5, 0.25
    depth: list[int] | None = None  # per-stage blocks (DSPNet ResNets); None = full depth
    mode: str = "cached"  # cached: head on cached features (fast) | augment: on-the-fly augmentation (slow)
    head_bn: bool = True  # BatchNorm1d(affine=False) before the head's Linear (MoCo v3 / MAE); false: plain Linear (BYOL)
    probe_aug: str = "default"  # mode=augment / finetune: default (CIFAR RandomCrop(32, pad 4) + flip, ImageNet
    # RandomResizedCrop(224) + flip; a network with a fixed input size other than 32 px on CIFAR, e.g. the release's
    # 224 px ViT: RandomResizedCrop(size, bicubic) + flip, MoCo v3's) | us3l (the US3L release's 32 px CIFAR probe:
    # RandomResizedCrop(32, scale 0.8-1, bicubic) + flip; test and BN calibration images Resize(36) + CenterCrop(32))
    finetune: bool = False  # fine-tune each whole sub-network with a Linear classifier (semi-supervised, BYOL's
    # schedule; see the docstring) instead of a linear probe; mode and head_bn do not apply
    label_fraction: float = 0.0  # semi-supervised: 0.01 or 0.1 of the training labels (class-balanced); 0 = all
    label_list: str = ""  # semi-supervised: file listing the labeled training images (paths or indices)
    train_subset: int = 0  # class-balanced subset of the train split (before label_fraction), 0 = all
    test_subset: int = 0  # class-balanced subset of the test split, 0 = all
    epochs: int = 0  # passes over the labeled images; 0: 100 for a linear head; fine-tuning 30 at <= 1% labels, else 20
    batch_size: int = 256  # head batch (cached: the same on every rank; augment: per process) and extraction batch
    base_lr: float = 0.0  # lr = base_lr * global batch / 256, then lr_schedule; 0: 0.1 for a linear head (features
    # standardized by the head's BN; BYOL's plain head: 0.2), 0.01 for fine-tuning
    lr_schedule: str = "cosine"  # cosine (to 0 at the end) | step (x0.1 at each of lr_milestones; the US3L release)
    lr_milestones: list[int] = field(default_factory=list)  # step: lr x 0.1 from each of these epochs on: [60, 80]
    # (the release's); strictly increasing, in 1..epochs-1; empty with cosine
    momentum: float = 0.9  # SGD momentum, head and fine-tuning
    nesterov: bool = True  # Nesterov momentum (BYOL's protocols); the US3L release's probe: plain (false)
    weight_decay: float = 0.0  # head weight decay (BYOL, MAE/MoCo v3 probes, BYOL fine-tuning: 0); try 5e-4 with 1% labels
    calib_images: int = 2000  # BN calibration images per width (US-Nets: about 2000), training pool, same for any N
    num_workers: int = 0  # DataLoader workers; CIFAR decodes faster than the network eats
    bad_images: str = "fail"  # an image that does not decode: fail (error naming it) | skip (warn, use the next)
    loader: str = "torch"  # feature extraction: torch | device (decoded once onto the device) | ffcv
    # (ffcv_path/{train,test}.beton, rows = the same samples; calibration and augment mode read data_path)
    ffcv_path: str = ""  # loader=ffcv: the folder `python ffcv_data.py --data_path DATA_PATH` wrote
    autocast: bool = True  # bf16 autocast for the backbone where supported (CPU too); features stay fp32
    seed: int = 0  # subsets, label fractions, calibration images, head init and data order
    out_dir: str = ""  # config.yaml, results.json, linear.png; empty = beside the checkpoint (see linear_kind)
    tracker: str = ""  # tensorboard | wandb (optional package): per-network results logged there too


def linear_kind(cfg):
    """The default out_dir's name, one per protocol (eval_knn.default_out_dir puts it beside the
    checkpoint): linear, linear_1pct (label_fraction=0.01), linear_list_<file stem> (label_list), with
    _augment for mode=augment: e.g. <ckpt dir>/linear_10pct_augment; finetune_10pct for finetune=true;
    _us3l with probe_aug=us3l (linear_augment_us3l)."""
    kind = "finetune" if cfg.finetune else "linear"
    if cfg.label_list:
        kind += f"_list_{Path(cfg.label_list).stem}"
    elif cfg.label_fraction:
        kind += f"_{100 * cfg.label_fraction:g}pct"
    kind += "_augment" if cfg.mode == "augment" and not cfg.finetune else ""
    return kind + ("_us3l" if cfg.probe_aug == "us3l" else "")


def schedule(cfg, labeled, pool):
    """(epochs, base_lr), where 0 in the config means the protocol's own: a linear head 100 epochs at
    0.1 (0.2 without the head's BN, as BYOL); fine-tuning 0.01 and BYOL's epochs, 30 with at most 1%
    of the pool labeled, else 20."""
    epochs = cfg.epochs or (100 if not cfg.finetune else 30 if labeled <= 0.01 * pool + 0.5 else 20)
    return epochs, cfg.base_lr or (0.01 if cfg.finetune else 0.1 if cfg.head_bn else 0.2)


def check_protocol(cfg, dataset, epochs, img_size=None):
    """ConfigError (one line, naming the key) for an lr schedule or probe augmentation that cannot run
    as asked; `epochs` as schedule() resolved it, img_size the input size the network fixes (None: any).
    main checks the keys' allowed values first."""
    ms = list(cfg.lr_milestones)
    if cfg.lr_schedule != "step" and ms:
        raise ConfigError(f"config error: lr_milestones={ms} needs lr_schedule=step ({cfg.lr_schedule} has none)")
    if cfg.lr_schedule == "step":
        if not ms:
            raise ConfigError("config error: lr_milestones is empty: lr_schedule=step needs the epochs at which "
                              "the lr drops, e.g. [60, 80]")
        if any(b <= a for a, b in zip(ms, ms[1:])) or ms[0] < 1 or ms[-1] > epochs - 1:
            raise ConfigError(f"config error: lr_milestones={ms}: must increase strictly and lie in "
                              f"1..{epochs - 1} (epochs={epochs})")
    if cfg.probe_aug != "us3l":
        return
    if not dataset.startswith("cifar"):
        raise ConfigError(f"config error: probe_aug=us3l is the release's CIFAR probe, not for dataset={dataset}")
    if img_size not in (None, 32):
        raise ConfigError(f"config error: probe_aug=us3l is the release's 32 px CIFAR probe; this network takes "
                          f"{img_size} px inputs: use probe_aug=default (MoCo v3's probe at that size, the release's ViT's)")
    if cfg.mode == "cached" and not cfg.finetune:
        raise ConfigError("config error: probe_aug=us3l augments the training images: it needs mode=augment "
                          "or finetune=true")
    if cfg.loader == "ffcv":
        raise ConfigError("config error: probe_aug=us3l resizes the test images, loader=ffcv reads them as "
                          "stored: use loader=torch or device")


def lr_at(step, steps_per_epoch, epochs, peak, schedule="cosine", milestones=()):
    """The lr at global step `step`, a pure function of it. cosine: from `peak` (step 0) to 0 at
    epochs * steps_per_epoch. step: `peak` x 0.1 per milestone <= the step's epoch, so constant within
    an epoch, as the US3L release sets it once per epoch (workers/linear.py, multiStep: 30, then 3 from
    epoch 60, 0.3 from epoch 80). NOTE: the release's DECAY_RATE key is not read there (0.1 is fixed),
    so we fix 0.1 too and have no gamma key."""
    if schedule == "step":
        return peak * 0.1 ** sum(step // steps_per_epoch >= m for m in milestones)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
    raise ValueError(f"lr schedule {schedule!r}: cosine or step")


def make_head(dim, num_classes, bn=True):
    """BN without affine (a standardization of the features) + Linear, as MoCo v3 / MAE; bn=False: the
    Linear alone (BYOL's linear protocol and fine-tuning)."""
    head = nn.Sequential(*([nn.BatchNorm1d(dim, affine=False)] if bn else []), nn.Linear(dim, num_classes))
    nn.init.normal_(head[-1].weight, std=0.01)
    nn.init.zeros_(head[-1].bias)
    return head


def _sgd(head, lr, momentum, weight_decay, nesterov=True):
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


def train_head_cached(x, y, num_classes, epochs=100, batch_size=256, base_lr=0.1, momentum=0.9,
                      weight_decay=0.0, seed=0, bn=True, schedule="cosine", milestones=(), nesterov=True):
    """A linear head trained on cached features x (N, D) with labels y (N,): mini-batch SGD, the lr from
    base_lr * batch / 256 by lr_at (cosine, or step at the milestone epochs), a seeded shuffle per epoch.
    Deterministic for a given seed, so every rank trains the same head. The head's BN (bn=True) holds
    the exact training mean / variance."""
    torch.manual_seed(seed)
    head = make_head(x.shape[1], num_classes, bn).to(x.device)
    if bn:
        var, mean = torch.var_mean(x, dim=0, correction=0)
        head[0].running_mean.copy_(mean)
        head[0].running_var.copy_(var)
    head.eval()  # the BN is a fixed standardization from here on
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, x.shape[0])
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    lr = base_lr * batch_size / 256
    opt = _sgd(head, lr, momentum, weight_decay, nesterov)
    # NOTE: the ops are tiny ((256, 512) x (512, 10)): on a CPU one thread is faster, and far faster
    # on a busy machine. 20 epochs of 10k x 512 features, 2 cores with other jobs running (load 6):
    # 18.8 s with 2 threads, 0.68 s with 1, same head.
    threads, step = torch.get_num_threads(), 0
    if x.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in tqdm(range(epochs), desc="head", leave=False, disable=rank_world()[0] != 0):
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            for i in range(0, x.shape[0], batch_size):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps_per_epoch, epochs, lr, schedule, milestones)
                b = perm[i:i + batch_size]
                loss = F.cross_entropy(head(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    finally:
        torch.set_num_threads(threads)
    return head


def augment_transform(dataset, probe_aug="default", size=None, mean_std=None):
    """The linear-eval augmentation. default: CIFAR RandomCrop(32, padding 4) + flip; ImageNet
    RandomResizedCrop(224) + flip (MoCo v3, DINO). size: the input size the network fixes (None: any);
    CIFAR at another size than 32 px: RandomResizedCrop(size, bicubic) + flip, MoCo v3's probe as the
    release's ViT uses it. us3l (CIFAR, 32 px): the US3L release's probe (workers/linear.py),
    RandomResizedCrop(32, scale (0.8, 1), ratio (3/4, 4/3), bicubic) + flip. mean_std: data.normalization's
    (the mean/std keys), None: the dataset's preset."""
    mean, std = mean_std or MEAN_STD[dataset]
    cifar = dataset.startswith("cifar")
    if probe_aug == "us3l":
        crop = T.RandomResizedCrop(32, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3),
                                   interpolation=T.InterpolationMode.BICUBIC)
    elif cifar and size not in (None, 32):  # upsampled as data.eval_transform does (bicubic)
        crop = T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC)
    else:
        crop = T.RandomCrop(32, padding=4) if cifar else T.RandomResizedCrop(size or 224)
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def probe_test_transform(dataset, probe_aug="default", size=None, mean_std=None):
    """Test (and BN calibration) images. default: data.eval_transform at size, the input size the network
    fixes (None: any; CIFAR at another size than 32 px is upsampled to it; main applies it in two parts,
    knn.eval_parts). us3l: the US3L release's CIFAR
    test transform, Resize(36) + CenterCrop(32), bicubic (its 32 x 8/7: a slight zoom into the centre).
    NOTE (our decision): probe_aug=us3l extracts the test features with it, as the release tests, and
    calibrates BN on training images with it too: the statistics of the inputs the head is scored on,
    and a deterministic transform, so the calibration batches stay the same under any process count
    (the release instead runs 3 passes of its augmented training loader in train mode). mean_std: as
    augment_transform's."""
    if probe_aug != "us3l":
        return eval_transform(dataset, size, mean_std)
    mean, std = mean_std or MEAN_STD[dataset]
    return T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                      T.Normalize(mean, std)])


def train_head_augment(backbone, dataset, num_classes, dim, device, cfg):
    """Augment mode: augmented batches through the frozen backbone (eval mode, no_grad), SGD on the
    head, `cfg.epochs` epochs. Views are a function of (seed, epoch, index)
    (data.SeededViews), so a given global batch size (batch_size x processes) sees the same batches
    under any process count; the features of a step are all-gathered so every rank takes the same
    head step. `dataset`: the labeled training images with augment_transform. lr: lr_at."""
    rank, world = rank_world()
    backbone.eval()  # calibrated BN statistics, never batch statistics
    torch.manual_seed(cfg.seed)
    head = make_head(dim, num_classes, cfg.head_bn).to(device).train()
    n = len(dataset)
    steps_per_epoch = EpochSampler(n, cfg.batch_size, 0, world=world).steps()
    if steps_per_epoch == 0:
        raise ConfigError(f"config error: batch_size={cfg.batch_size} x {world} process(es) exceeds the {n} "
                          "labeled images (mode=augment drops the last partial batch): lower batch_size")
    total, lr = cfg.epochs * steps_per_epoch, cfg.base_lr * cfg.batch_size * world / 256
    opt = _sgd(head, lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    views, step = SeededViews(dataset, cfg.seed), 0
    bar = tqdm(total=total, desc="head (augment)", leave=False, disable=rank != 0)
    for epoch in range(cfg.epochs):
        sampler = EpochSampler(n, cfg.batch_size, epoch, seed=cfg.seed, rank=rank, world=world)
        loader = DataLoader(views, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
        for x, y, _ in loader:
            with torch.no_grad(), maybe_autocast(device, cfg.autocast):
                f = backbone(x.to(device).contiguous(memory_format=torch.channels_last)).float()
            y = y.to(device)
            if world > 1:  # (B, D) per rank -> (B * world, D), the same on every rank (EpochSampler: equal B)
                f, y = torch.cat(all_gather_rows(f, len(f))), torch.cat(all_gather_rows(y, len(y)))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, cfg.epochs, lr, cfg.lr_schedule, cfg.lr_milestones)
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
    bar.close()
    return head.eval()


def finetune_network(backbone, width, depth, dataset, num_classes, device, cfg):
    """Semi-supervised fine-tuning of one sub-network (BYOL's protocol, see the docstring): a copy of
    the pretrained backbone at (width, depth) and a Linear classifier, trained together on `dataset`
    (the labeled images with augment_transform) by Nesterov SGD (lr: lr_at), BN in train mode
    over every process's batch (sync BN), gradients averaged over processes: N processes of batch B
    train what 1 process of batch N x B trains. Views and order as train_head_augment. The copy's BN
    statistics are NOT calibrated (the caller does that). -> (network at (width, depth), head)."""
    rank, world = rank_world()
    net = copy.deepcopy(backbone).requires_grad_(True)
    set_active(net, width, depth)
    dtype = next(net.parameters()).dtype
    with torch.no_grad():  # the feature size at this width; batch statistics, this process only
        size = getattr(net, "img_size", None) or (32 if cfg.dataset.startswith("cifar") else 224)
        dim = net.train()(torch.zeros(2, 3, size, size, device=device, dtype=dtype)).shape[1]
    set_sync_bn(net, True)
    torch.manual_seed(cfg.seed)
    head = make_head(dim, num_classes, bn=False).to(device, dtype)
    n = len(dataset)
    steps_per_epoch = EpochSampler(n, cfg.batch_size, 0, world=world).steps()
    if steps_per_epoch == 0:
        raise ConfigError(f"config error: batch_size={cfg.batch_size} x {world} process(es) exceeds the {n} "
                          "labeled images (fine-tuning drops the last partial batch): lower batch_size")
    params = [*net.parameters(), *head.parameters()]
    total, lr = cfg.epochs * steps_per_epoch, cfg.base_lr * cfg.batch_size * world / 256
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    views, step = SeededViews(dataset, cfg.seed), 0
    bar = tqdm(total=total, desc=f"fine-tune {width:g}", leave=False, disable=rank != 0)
    for epoch in range(cfg.epochs):
        sampler = EpochSampler(n, cfg.batch_size, epoch, seed=cfg.seed, rank=rank, world=world)
        for x, y, _ in DataLoader(views, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, cfg.epochs, lr, cfg.lr_schedule, cfg.lr_milestones)
            with maybe_autocast(device, cfg.autocast):
                logits = head(net(x.to(device, dtype).contiguous(memory_format=torch.channels_last)))
            F.cross_entropy(logits.float(), y.to(device)).backward()  # this rank's mean: equal shards
            all_reduce_grads_(params, world)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
    bar.close()
    return net.requires_grad_(False).eval(), head.eval()


@torch.no_grad()
def weight_change(net, backbone, width, depth):
    """||theta_finetuned - theta_pretrained|| / ||theta_pretrained|| over the sub-network's weights."""
    a, b = export(net, width, depth, check_stats=False), export(backbone, width, depth, check_stats=False)
    num = sum((p - q).double().pow(2).sum() for p, q in zip(a.parameters(), b.parameters()))
    return math.sqrt(num / sum(q.double().pow(2).sum() for q in b.parameters()))


@torch.no_grad()
def accuracy(head, x, y):
    """(top-1, top-5) in [0, 1] of the head on features x (N, D)."""
    head.eval()
    logits = head(x)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    hit = top == y[:, None]
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item()


def read_label_list(path, ds):
    """Sorted unique train-split indices of the images listed in `path`, one per line: an integer
    index, a path relative to the split folder, or a bare file name (unique in the split). Blank
    lines and `#` comments are skipped. Unmatched lines raise ValueError naming them."""
    lines = [line.split("#")[0].strip() for line in Path(path).read_text().splitlines()]
    lines = [line for line in lines if line]
    samples = getattr(ds.base, "samples", None)  # ImageFolder: [(path, label)], in ds.indices order
    by_rel, by_name = {}, {}
    if samples is not None:
        root = Path(ds.base.root)
        for i, j in enumerate(ds.indices):
            p = Path(samples[j][0])
            by_rel[p.relative_to(root).as_posix()] = i
            by_name[p.name] = i if p.name not in by_name else -1  # -1: ambiguous bare name
    out, bad = [], []
    for line in lines:
        key = line.replace("\\", "/").removeprefix("./")
        if line.isdigit() and int(line) < len(ds):
            out.append(int(line))
        elif key in by_rel:
            out.append(by_rel[key])
        elif "/" not in key and by_name.get(key, -1) >= 0:  # a bare name, unique in the split
            out.append(by_name[key])
        else:
            bad.append(line)
    if bad:
        why = "" if samples is not None else " (this source has no image paths: use integer indices)"
        ambiguous = [b for b in bad if by_name.get(b) == -1]
        if ambiguous:
            why += f" ({len(ambiguous)} bare file names in several class folders, e.g. {ambiguous[0]!r}: give class/name)"
        raise ValueError(f"{path}: {len(bad)} of {len(lines)} lines match no training image of {len(ds)}{why}, "
                         f"e.g. {bad[:5]}")
    return np.unique(np.asarray(out, dtype=np.int64))


def labeled_indices(ds, cfg):
    """(pool, labeled): train-split indices of the unlabeled pool (BN calibration) and of the images
    whose labels the head sees."""
    pool = subset_indices(ds.labels, cfg.train_subset, cfg.seed) if cfg.train_subset else np.arange(len(ds))
    if cfg.label_list and (cfg.label_fraction or cfg.train_subset):
        raise ConfigError("config error: label_list excludes label_fraction and train_subset")
    if cfg.label_list:
        return pool, read_label_list(cfg.label_list, ds)
    if cfg.label_fraction:
        if not 0 < cfg.label_fraction <= 1:
            raise ConfigError(f"config error: label_fraction={cfg.label_fraction}, allowed: (0, 1]")
        n = max(1, round(cfg.label_fraction * len(pool)))
        return pool, pool[subset_indices(ds.labels[pool], n, cfg.seed)]
    return pool, pool


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def plot(results, path, kind="linear"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = sorted(results, key=lambda n: results[n]["macs"])  # widths or DNs, smallest first
    top1 = [100 * results[n]["top1"] for n in ws]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    mmacs = [results[n]["macs"] / 1e6 for n in ws]
    axes[0].plot(mmacs, top1, "o-")
    axes[0].set(xlabel="MMACs (log scale)", ylabel=f"{kind} top-1 (%)", xscale="log")
    axes[0].minorticks_off()
    axes[0].set_xticks(mmacs, [f"{m:.3g}" for m in mmacs])
    axes[0].margins(x=0.15, y=0.15)
    axes[1].plot([results[n]["width"] for n in ws], top1, "o")
    axes[1].set(xlabel="width", ylabel=f"{kind} top-1 (%)")
    for n, a in zip(ws, top1):
        axes[0].annotate(n, (results[n]["macs"] / 1e6, a), textcoords="offset points", xytext=(5, 5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg, backbone=None):
    """results {"<width>": {...}}. backbone: evaluate this module instead of loading --ckpt / --arch
    (tests, notebooks); its parameters must come out unchanged."""
    check_tracker(cfg.tracker)
    if not cfg.out_dir:  # derived from the checkpoint (or the arch); config.yaml records where
        named = cfg if backbone is None else replace(cfg, arch=type(backbone).__name__)
        cfg = replace(cfg, out_dir=default_out_dir(named, linear_kind(cfg)))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # sets up torch.distributed if launched
                              log_with=cfg.tracker or None, project_dir=cfg.out_dir)
    device, (rank, world) = accelerator.device, rank_world()
    for key, allowed in (("loader", ("torch", "device", "ffcv")), ("mode", ("cached", "augment")),
                         ("bad_images", ("fail", "skip")), ("lr_schedule", ("cosine", "step")),
                         ("probe_aug", ("default", "us3l"))):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config error: {key}={getattr(cfg, key)!r}, allowed: {', '.join(allowed)}")
    data.BAD_IMAGES = cfg.bad_images
    if backbone is not None:
        arch, ckpt = type(backbone).__name__, {}
    else:  # the checkpoint's own arch (cfg.arch is for a random-init baseline, seeded: equal on every rank)
        backbone, ckpt = load_network(replace(cfg, arch="") if cfg.ckpt else cfg)
        arch = ckpt["arch"]
    dataset, mean_std = eval_data(cfg, ckpt)  # the keys, else the checkpoint's training run's
    nets = networks_to_eval(cfg, ckpt, backbone)  # widths, or every DN of a DSPNet checkpoint
    backbone = backbone.to(device).requires_grad_(False).eval()
    before = _params(backbone)
    if accelerator.is_main_process:
        save_config(cfg, cfg.out_dir)
    init_tracker(accelerator, cfg, "eval_linear")

    # data: the train split with the eval transform (features, calibration), sharded by rank;
    # probe_aug=us3l: the release's test transform for test features and calibration (probe_test_transform).
    # A network that fixes its input size (a ViT's img_size) gets the images at it: CIFAR decoded at 32 px and
    # upsampled batch by batch as it is used, on the device (knn.eval_parts: as data.eval_transform at that size)
    img_size = getattr(backbone, "img_size", None)
    test_transform, upsample = probe_test_transform(dataset, cfg.probe_aug, mean_std=mean_std), None
    if cfg.probe_aug == "default":
        test_transform, upsample = eval_parts(dataset, img_size, mean_std)
    train = build_dataset(cfg.data_path, "train", test_transform, return_index=True)
    test = build_dataset(cfg.data_path, "test", test_transform, subset=cfg.test_subset,
                         subset_seed=cfg.seed, return_index=True)
    pool, labeled = labeled_indices(train, cfg)
    num_classes = train.num_classes
    epochs, base_lr = schedule(cfg, len(labeled), len(pool))  # printed, not stored
    check_protocol(cfg, dataset, epochs, img_size)  # before any image is decoded

    def shard(ds, idx, split):  # this rank's share of the samples idx of ds, as (x, y, idx) batches
        if cfg.loader == "ffcv":  # the same rows of the .beton (write_beton keeps build_dataset's order)
            return build_knn_loaders("", dataset, cfg.batch_size, loader="ffcv", ffcv_path=cfg.ffcv_path,
                                     device=device, rows={split: ds.indices[np.asarray(idx)]},
                                     image_size=img_size, mean_std=mean_std)[split == "test"]
        loader = DataLoader(Subset(ds, np.asarray(idx)[rank::world].tolist()), batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers)
        if cfg.loader == "device":  # decoded once, kept on the device (the features are extracted once anyway)
            x, y, i = zip(*loader)
            loader = DeviceBatches([torch.cat(t).to(device) for t in (x, y, i)], cfg.batch_size)
        return Upsampled(loader, upsample, device) if upsample else loader

    # NOTE: the same calibration batches for any process count (knn.calibration_shard), drawn from
    # the training pool (labels unused): with per-rank draws N processes would not give 1 process's numbers
    calib = calibration_shard(train, cfg.calib_images, cfg.batch_size, cfg.seed, cfg.num_workers, pool=pool)
    calib = Upsampled(calib, upsample, device) if upsample else calib
    test_loader = shard(test, np.arange(len(test)), "test")
    train_loader = shard(train, labeled, "train") if cfg.mode == "cached" and not cfg.finetune else None
    counts = np.bincount(train.labels[labeled], minlength=num_classes)
    run_cfg = replace(cfg, epochs=epochs, base_lr=base_lr, dataset=dataset)
    lr = base_lr * cfg.batch_size * (world if cfg.mode == "augment" or cfg.finetune else 1) / 256
    decay = (f"x0.1 at epochs {', '.join(map(str, cfg.lr_milestones))}" if cfg.lr_schedule == "step"
             else "cosine to 0")
    kind = "fine-tuning" if cfg.finetune else f"linear eval ({cfg.mode})"
    on = dataset if mean_std == MEAN_STD[dataset] else f"{dataset} (mean {list(mean_std[0])} std {list(mean_std[1])})"
    accelerator.print(f"{kind} of {arch} {cfg.ckpt or '(random init)'}"
                      f"{' teacher' if cfg.teacher else ''} on {on}: {len(labeled)} labeled training images "
                      f"({counts.min()}-{counts.max()} per class), pool {len(pool)}, {len(test)} test images, "
                      f"{world} process(es); {epochs} epochs, lr {lr:g} {decay}"
                      f"{', probe_aug=us3l' if cfg.probe_aug == 'us3l' else ''}")

    results, input_size = {}, img_size or (32 if dataset.startswith("cifar") else 224)
    if cfg.mode == "augment" or cfg.finetune:
        transform = augment_transform(dataset, cfg.probe_aug, img_size, mean_std)
        aug = Subset(build_dataset(cfg.data_path, "train", transform, return_index=True), labeled.tolist())
    for name, w, depth in nets:
        t0 = time.perf_counter()
        net, head, extra, seconds = backbone, None, {}, {}
        if cfg.finetune:  # a fine-tuned copy of the sub-network with its classifier; the backbone stays
            net, head = finetune_network(backbone, w, depth, aug, num_classes, device, run_cfg)
            seconds["finetune"] = time.perf_counter() - t0
        tc = time.perf_counter()
        with maybe_autocast(device, cfg.autocast):  # statistics of the network as it will run
            calibrate_bn(net, calib, w, depth, all_reduce=world > 1)
        net.eval()
        t1 = time.perf_counter()
        test_x, test_y, _ = extract_features(net, Progress(test_loader, rank != 0, f"test {name}"), device,
                                             cfg.autocast, normalize=False)
        if cfg.finetune:
            t2 = time.perf_counter()
            extra["weight_change"] = weight_change(net, backbone, w, depth)
        elif cfg.mode == "cached":
            train_x, train_y, _ = extract_features(backbone, Progress(train_loader, rank != 0, f"train {name}"),
                                                   device, cfg.autocast, normalize=False)
            t2 = time.perf_counter()
            head = train_head_cached(train_x, train_y, num_classes, epochs, cfg.batch_size, base_lr,
                                     cfg.momentum, cfg.weight_decay, cfg.seed, cfg.head_bn, cfg.lr_schedule,
                                     cfg.lr_milestones, cfg.nesterov)
        else:
            t2 = time.perf_counter()
            head = train_head_augment(backbone, aug, num_classes, test_x.shape[1], device, run_cfg)
        if world > 1:  # the ranks trained the same head; broadcast makes it bit-equal
            for t in head.state_dict().values():
                dist.broadcast(t, 0)
        t3 = time.perf_counter()
        top1, top5 = accuracy(head, test_x, test_y)
        params, macs = profile(backbone, w, depth, input_size)  # NOTE: resets the width to 1.0
        seconds.update(calibrate=t1 - tc, extract=t2 - t1, train_head=t3 - t2)
        results[name] = {"top1": top1, "top5": top5, "params": params, "macs": macs, "dim": test_x.shape[1],
                         "width": w, "depth": depth, **extra, "seconds": seconds}
        accelerator.print(f"{name}: top-1 {100 * top1:.2f}%  seconds: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
        del net
    set_active(backbone, 1.0)
    if any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters())):
        raise RuntimeError("linear evaluation changed the backbone's parameters")  # fine-tuning: copies only

    accelerator.print(f"\n{'network':>16} {'params (M)':>10} {'MMACs':>8} {'top-1':>7} {'top-5':>7}")
    for name, r in results.items():
        accelerator.print(f"{name:>16} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e6:>8.1f} "
                          f"{100 * r['top1']:>6.2f}% {100 * r['top5']:>6.2f}%")
    if accelerator.is_main_process:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        plot(results, os.path.join(cfg.out_dir, "linear.png"), "fine-tuned" if cfg.finetune else "linear")
        print(f"wrote {cfg.out_dir}/results.json, linear.png")
    log_results(accelerator, results, "finetune" if cfg.finetune else "linear", ckpt.get("step", 0))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the tracker
    return results


if __name__ == "__main__":
    run(main, Config)
