"""Weighted kNN evaluation of a slimmable backbone at every requested width (DESIGN section 8).

The protocol of InstDisc (Wu et al. 2018) as used by DINO's eval_knn.py: L2-normalized backbone
features of the training set form the bank; each test image votes with its k nearest bank images
(cosine similarity), each neighbour weighted by exp(sim / T); k=200, T=0.1 (CIFAR) or 0.07
(ImageNet). Before each width, BN statistics are recalibrated exactly for that sub-network
(models.calibrate_bn) on training images with the eval transform.

The training scripts import the core as their kNN monitor:

    bank_loader, test_loader = build_knn_loaders(cfg.data_path, "cifar10", 128, bank_subset=10000,
                                                 test_subset=2000, cache=True)
    calib = calibration_batches(bank_loader, 2000)
    top1 = knn_eval(accelerator.unwrap_model(backbone), bank_loader, test_loader, calib,
                    [1.0, 0.25], accelerator.device)              # {1.0: 0.33, 0.25: 0.21}

Under N processes (any launcher that initializes torch.distributed, Accelerate included) every rank
must call knn_eval: the loaders are rank shards, the features are all-gathered and deduplicated by
sample index, so the result is exact (no padded duplicates) and identical on every rank. Plain
torch.distributed only: no Accelerate object is needed.

    python eval_knn.py --data_path=data/cifar10 --widths=1.0,0.25 --bank_subset=10000 --test_subset=2000
    python eval_knn.py --ckpt=out/run/backbone.pt --arch=resnet18_cifar --widths=1.0,0.75,0.5,0.25
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval_knn.py ...   # CPU, 2 procs
    accelerate launch eval_knn.py --ckpt=... --data_path=... --dataset=imagenet --temperature=0.07

Measured on 2 CPU cores (AVX512-BF16, shared machine), random-init resnet18_cifar, 10k-image bank,
2k test images, 2000 calibration images, batch 128, bf16 + channels_last, cache=True:
    width 1.0:  top-1 30.1%, 33 s = calibrate 10.4 + extract 22.6 (540 img/s) + search 0.2
    width 0.25: top-1 24.5%, 2.7 s = calibrate 0.7 + extract 1.9 + search 0.1
The search is fp32 and exact: 50k x 512 bank against 10k queries takes about 4 s here.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset, TensorDataset

from data import build_dataset, eval_transform
from models import ARCHS, SlimBatchNorm2d, calibrate_bn, set_active
from utils import parse_config


def _world():
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _autocast(device, enabled):
    """bf16 autocast where the device supports it (CPU too: about 2x on AVX512-BF16)."""
    ok = enabled and torch.amp.is_autocast_available(device.type)
    if ok and device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ok)


def _all_gather_rows(t, n_max):
    """all_gather of a (n, ...) tensor whose n differs by rank: pad to n_max, gather, concat."""
    pad = t.new_zeros((n_max - t.shape[0], *t.shape[1:]))
    out = [t.new_empty((n_max, *t.shape[1:])) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.cat([t, pad]))
    return out


@torch.no_grad()
def extract_features(model, loader, device, autocast=True):
    """(features (N, D) float32 L2-normalized, labels (N,), indices (N,)), sorted by sample index.

    loader yields (x, y, idx): data.build_dataset(..., return_index=True). The model runs in eval
    mode (restored afterwards) under no_grad, with bf16 autocast if asked and supported, inputs in
    channels_last. Under N processes each rank extracts its shard; the shards (of any sizes) are
    all-gathered and deduplicated by index, so every rank returns each sample exactly once, even
    when a DistributedSampler padded a shard with repeated samples."""
    was_training = model.training
    model.eval()
    feats, labels, idxs = [], [], []
    try:
        with _autocast(device, autocast):
            for x, y, idx in loader:
                x = x.to(device, non_blocking=True)
                if x.ndim == 4:  # NOTE: 10-25% faster on CPU (oneDNN), the weights may stay NCHW
                    x = x.contiguous(memory_format=torch.channels_last)
                feats.append(model(x).float())
                labels.append(y)
                idxs.append(idx)
    finally:
        model.train(was_training)
    if feats:
        feats = F.normalize(torch.cat(feats), dim=1)
        labels, idxs = torch.cat(labels).to(device), torch.cat(idxs).to(device)
    else:  # an empty shard (more ranks than samples): its feature size comes from the others
        feats = torch.zeros(0, 0, device=device)
        labels = idxs = torch.zeros(0, dtype=torch.long, device=device)
    _, world = _world()
    if world > 1:
        sizes = torch.tensor([feats.shape[0], feats.shape[1]], device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        n = [int(s[0]) for s in all_sizes]
        n_max, dim = max(n), max(int(s[1]) for s in all_sizes)
        if feats.shape[0] == 0:
            feats = feats.new_zeros(0, dim)
        # pad to the longest shard for all_gather, then drop each rank's padding rows
        feats = torch.cat([f[:k] for f, k in zip(_all_gather_rows(feats, n_max), n)])
        labels = torch.cat([f[:k] for f, k in zip(_all_gather_rows(labels, n_max), n)])
        idxs = torch.cat([f[:k] for f, k in zip(_all_gather_rows(idxs, n_max), n)])
    order = torch.argsort(idxs, stable=True)
    idxs = idxs[order]
    keep = torch.ones_like(idxs, dtype=torch.bool)
    keep[1:] = idxs[1:] != idxs[:-1]  # duplicates (sampler padding) are the same sample: keep one
    order = order[keep]
    return feats[order], labels[order], idxs[keep]


def _knn_topk(train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk):
    """Yield (start, {k: scores (chunk, num_classes)}) per chunk of test rows: one (chunk x N)
    matmul and one topk with the largest k; smaller k are the leading columns (topk sorts)."""
    k_max = min(max(ks), train_feats.shape[0])
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # (c, D) x (D, N) -> (c, N) cosine
        sim, nn_idx = sim.topk(k_max, dim=1)  # (c, k_max), largest first
        weight = (sim / temperature).exp_()  # InstDisc/DINO vote weight exp(sim / T)
        nn_labels = train_labels[nn_idx]
        out = {}
        for k in ks:
            kk = min(k, k_max)  # k beyond the bank size: every bank row votes
            out[k] = sim.new_zeros(sim.shape[0], num_classes).scatter_add_(1, nn_labels[:, :kk], weight[:, :kk])
        yield start, out


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, chunk=1024):
    """(test, num_classes) class scores: sum over the k most cosine-similar bank rows of
    exp(sim / T), per class. Features must be L2-normalized already. chunk: test rows per matmul,
    bounding memory to chunk x N floats (1024 x 50k = 200 MB)."""
    scores = torch.empty(test_feats.shape[0], num_classes, device=test_feats.device)
    for start, out in _knn_topk(train_feats, train_labels, test_feats, num_classes, [k], temperature, chunk):
        scores[start:start + chunk] = out[k]
    return scores


@torch.no_grad()
def _knn_correct(train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperature, chunk):
    """(len(ks), 2) counts of top-1 and top-5 hits, for each k."""
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=test_feats.device)
    top = min(5, num_classes)
    for start, out in _knn_topk(train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk):
        y = test_labels[start:start + chunk, None]
        for i, k in enumerate(ks):
            hit = out[k].topk(top, dim=1).indices == y  # (c, top)
            correct[i, 0] += hit[:, 0].sum()
            correct[i, 1] += hit.any(1).sum()
    return correct


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, ks=(10, 20, 200),
                 temperature=0.1, chunk=1024):
    """({k: top1}, {k: top5}) in [0, 1] for several k at the cost of one search (topk of max k)."""
    ks = list(ks)
    c = _knn_correct(train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperature,
                     chunk).tolist()
    n = max(test_feats.shape[0], 1)
    return {k: c[i][0] / n for i, k in enumerate(ks)}, {k: c[i][1] / n for i, k in enumerate(ks)}


def calibration_batches(loader, n_images=2000, seed=0):
    """A list of image batches for calibrate_bn: n_images drawn at random (seeded) from the
    loader's dataset, with its transform and batch size. Random, not the loader's first batches:
    an image folder lists the images class by class, so the first 2000 CIFAR images are 2 classes.
    US-Nets calibrate on about 2000 training images. Under N processes each rank draws
    n_images / N from its own shard and knn_eval pools the statistics (all_reduce).
    NOTE: the draw matters at the 1% level. Random-init resnet18_cifar, 10k bank / 2k test, three
    seeds: top-1 30.05 / 30.8 / 30.4% at 1.0x and 24.45 / 24.5 / 25.5% at 0.25x with 2000 images,
    about the same spread with 500 (4x cheaper). Keep the seed fixed within a run; the draw (and so
    the accuracy) also changes with the number of processes, and bit-equal results would further
    need the same batches, as train-mode BN depends on them."""
    rank, world = _world()
    n = max(1, n_images // world + (rank < n_images % world))  # an empty rank would hang all_reduce
    g = torch.Generator().manual_seed(seed + rank)
    ds = loader.dataset
    pick = torch.randperm(len(ds), generator=g)[:n].sort().values.tolist()
    sub = DataLoader(Subset(ds, pick), batch_size=loader.batch_size, num_workers=loader.num_workers)
    return [b[0] for b in sub]  # NOTE: kept in memory: 2000 CIFAR images are 25 MB


def _bn_state(model):
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    return [(m, m.running_mean.clone(), m.running_var.clone(), m.stats_channels) for m in bns]


@torch.no_grad()
def knn_eval(backbone, bank_loader, test_loader, calib_batches, widths, device, k=200, temperature=0.1,
             depth=None, autocast=True, all_reduce=None, chunk=1024, timings=None):
    """{width: kNN top-1 in [0, 1]} of the backbone, each width BN-calibrated first.

    calib_batches: re-iterable batches of training images with the eval transform (see
    calibration_batches), used at every width; a one-shot iterator is materialized once.
    all_reduce: pool the BN calibration statistics over processes; None = whenever
    torch.distributed runs with more than one process (every rank must call knn_eval anyway).
    Pass the unwrapped backbone (accelerator.unwrap_model), not the DDP wrapper. The backbone's
    parameters, training mode and BN buffers are left as they were (its checkpoints do not depend
    on when it was evaluated); the width is set back to 1.0 (full depth). timings: an optional
    dict, filled with seconds spent in calibration, extraction and search (summed over widths).
    """
    rank, world = _world()
    if all_reduce is None:
        all_reduce = world > 1
    if iter(calib_batches) is calib_batches:  # a generator would be empty at the second width
        calib_batches = list(calib_batches)
    timings = {} if timings is None else timings
    for key in ("calibrate", "extract", "search"):
        timings.setdefault(key, 0.0)
    was_training, saved = backbone.training, _bn_state(backbone)
    results = {}
    try:
        for w in widths:
            t0 = time.perf_counter()
            with _autocast(device, autocast):  # statistics of the network as it will run
                calibrate_bn(backbone, calib_batches, w, depth, all_reduce=all_reduce)
            t1 = time.perf_counter()
            bank, bank_y, _ = extract_features(backbone, bank_loader, device, autocast)
            test, test_y, _ = extract_features(backbone, test_loader, device, autocast)
            t2 = time.perf_counter()
            num_classes = int(max(bank_y.max(), test_y.max())) + 1
            # every rank holds all features: each searches a slice of the test rows, counts summed
            sl = slice(rank, None, world)
            correct = _knn_correct(bank, bank_y, test[sl], test_y[sl], num_classes, [k], temperature, chunk)
            if world > 1:
                dist.all_reduce(correct)
            results[w] = correct[0, 0].item() / test.shape[0]
            timings["calibrate"] += t1 - t0
            timings["extract"] += t2 - t1
            timings["search"] += time.perf_counter() - t2
    finally:
        for m, mean, var, c in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.stats_channels = c
        set_active(backbone, 1.0)
        backbone.train(was_training)
    return results


def build_knn_loaders(data_path, dataset_name, batch_size, bank_subset=0, test_subset=0, num_workers=0,
                      seed=0, cache=False):
    """(bank_loader, test_loader): the train split (bank) and the test split with the eval
    transform, optionally class-balanced seeded subsets (0 = all), yielding (x, y, idx) in a fixed
    order. Under N processes (call it after the process group is up, e.g. after Accelerator())
    each rank loads samples rank, rank + N, ... (shards differ by at most one sample, no padding);
    extract_features gathers them back by idx. cache: decode and transform once, keep the
    (rank's) images in memory as tensors: for the training monitor on CIFAR-scale data (a 10k
    bank is 123 MB), where JPEG decoding would otherwise cost about as much as a 0.25x forward."""
    rank, world = _world()
    loaders = []
    for split, subset in (("train", bank_subset), ("test", test_subset)):
        ds = build_dataset(data_path, split, eval_transform(dataset_name), subset=subset, subset_seed=seed,
                           return_index=True)
        if world > 1:
            ds = Subset(ds, range(rank, len(ds), world))
        if cache:
            x, y, idx = zip(*DataLoader(ds, batch_size=256, num_workers=num_workers))
            ds, num_workers = TensorDataset(torch.cat(x), torch.cat(y), torch.cat(idx)), 0
        loaders.append(DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                  pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0))
    return tuple(loaders)


# ------------------------------------------------------------------------------------------------
# Minimal CLI (results.json, plots and per-width tables against MACs come later)


@dataclass
class Config:
    arch: str = "resnet18_cifar"  # models.ARCHS key
    ckpt: str = ""  # backbone state dict (plain tensors, torch.save); empty = random init (a baseline)
    data_path: str = "data/cifar10"  # see data.py; `python data.py extract-cifar10` makes this one
    dataset: str = "cifar10"  # normalization and eval transform: cifar10 | cifar100 | imagenet
    widths: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])  # evaluated widths
    depth: list[int] | None = None  # per-stage blocks (DSPNet ResNets); None = full depth
    k: int = 200  # neighbours
    temperature: float = 0.1  # vote weight exp(sim / T): 0.1 CIFAR, 0.07 ImageNet
    batch_size: int = 128  # per process; on 2 CPU cores 128 beats 256 and 512 (bf16, resnet18_cifar)
    bank_subset: int = 0  # class-balanced bank subset of the train split, 0 = all
    test_subset: int = 0  # class-balanced subset of the test split, 0 = all
    calib_images: int = 2000  # BN calibration images per width (US-Nets: about 2000)
    num_workers: int = 0  # DataLoader workers; CIFAR decodes faster than the network eats
    cache: bool = False  # decode once, keep the eval images in memory (CIFAR scale; 10k images: 123 MB)
    autocast: bool = True  # bf16 autocast where supported (CPU too); features stay fp32
    seed: int = 0  # subsets and calibration images


def main(cfg):
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # sets up torch.distributed if launched
    device = accelerator.device
    torch.manual_seed(cfg.seed)  # a random-init baseline must be the same network on every rank
    backbone = ARCHS[cfg.arch]().to(device)
    if cfg.ckpt:
        backbone.load_state_dict(torch.load(cfg.ckpt, map_location=device, weights_only=True))
    bank_loader, test_loader = build_knn_loaders(cfg.data_path, cfg.dataset, cfg.batch_size, cfg.bank_subset,
                                                 cfg.test_subset, cfg.num_workers, cfg.seed, cfg.cache)
    calib = calibration_batches(bank_loader, cfg.calib_images, cfg.seed)
    timings = {}
    top1 = knn_eval(backbone, bank_loader, test_loader, calib, cfg.widths, device, cfg.k, cfg.temperature,
                    cfg.depth, cfg.autocast, timings=timings)
    accelerator.print(f"kNN k={cfg.k} T={cfg.temperature} {cfg.arch} {cfg.ckpt or '(random init)'}, "
                      f"{accelerator.num_processes} process(es)")
    for w, acc in top1.items():
        accelerator.print(f"width {w:.3f}  top-1 {100 * acc:.2f}%")
    accelerator.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return top1


if __name__ == "__main__":
    main(parse_config(Config))
