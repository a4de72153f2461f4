"""Weighted kNN evaluation of a slimmable backbone at given widths: the core that the training
scripts run as their monitor and eval_knn.py runs as a command (docs/design.md, Evaluation).

The protocol of InstDisc (Wu et al. 2018) as used by DINO's eval_knn.py: L2-normalized backbone
features of the training set form the bank; each test image votes with its k nearest bank images
(cosine similarity), each neighbour weighted by exp(sim / T); k=200, T=0.1 (CIFAR) or 0.07
(ImageNet). Before each width, BN statistics are recalibrated exactly for that sub-network
(models.calibrate_bn) on training images with the eval transform.

    bank_loader, test_loader = build_knn_loaders(cfg.data_path, "cifar10", 128, bank_subset=10000,
                                                 test_subset=2000, cache=True)
    calib = calibration_batches(bank_loader, 2000)
    top1 = knn_eval(accelerator.unwrap_model(backbone), bank_loader, test_loader, calib,
                    [1.0, 0.25], accelerator.device)              # {1.0: 0.33, 0.25: 0.21}

Under N processes (any launcher that initializes torch.distributed, Accelerate included) every rank
must call knn_eval: the loaders are rank shards; each rank keeps its shard of the feature bank
(bank/N memory per process), searches it for every test image and the per-rank top-k lists are
merged (merge_topk), so the result is exact (no padded duplicates) and identical on every rank.
Plain torch.distributed only: no Accelerate object is needed. calibration_batches draws the BN
calibration images per rank (the monitor); fixed_calibration_batches gives every rank the same ones
(the command: N processes give 1 process's numbers).

Measured on 2 CPU cores (AVX512-BF16, shared machine), random-init resnet18_cifar, 10k-image bank,
2k test images, 2000 calibration images, batch 128, bf16 + channels_last, cache=True:
    width 1.0:  top-1 30.1%, 33 s = calibrate 10.4 + extract 22.6 (540 img/s) + search 0.2
    width 0.25: top-1 24.5%, 2.7 s = calibrate 0.7 + extract 1.9 + search 0.1
The search is fp32 and exact: 50k x 512 bank against 10k queries takes about 4 s here.
"""

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from config import ConfigError
from data import build_dataset, eval_transform
from models import calibrate_bn, set_active
from slim import SlimBatchNorm2d


def rank_world():
    """(rank, world size) of torch.distributed, (0, 1) when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_autocast(device, enabled):
    """bf16 autocast where the device supports it (CPU too: about 2x on AVX512-BF16)."""
    ok = enabled and torch.amp.is_autocast_available(device.type)
    if ok and device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ok)


def all_gather_rows(t, n_max):
    """all_gather of a (n, ...) tensor whose n differs by rank: pad to n_max, gather, concat."""
    pad = t.new_zeros((n_max - t.shape[0], *t.shape[1:]))
    out = [t.new_empty((n_max, *t.shape[1:])) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.cat([t, pad]))
    return out


# Memory per process of ImageNet R-50's kNN (1.28M x 2048 bank, 50k test images, one process; N
# processes hold 1/N of the bank each, the test features whole). Computed from this file's
# allocations (bytes = rows x cols x element size); before this layout the same count gave about
# 31 GB (a list of batches + torch.cat + F.normalize's copy, 3 x 10.5 GB, then a 1024 x 1.28M fp32
# similarity of 5.2 GB). NOTE: measured on CPU at 1/64 scale (20k x 2048 fp32 bank = 164 MB, batch
# 250, one process, ru_maxrss before/after extract_features) the peak grew by 175 MB in some runs
# and 334 MB in others of the same script: the second bank-sized block is not explained yet.
#   bank, filled in place:  fp32 10.5 GB | fp16 (CUDA default, bank_dtype) 5.2 GB
#   + a sorted copy of it, briefly, only when the loader's order is not already by index (a loader
#     of build_knn_loaders is: no copy)
#   test features (fp32) 0.41 GB, plus 2 x that while all-gathered under N processes
#   search (SIM_BYTES = 1 GiB): a (chunk x bank rows) fp32 similarity <= 1 GiB; an fp16 bank is
#     upcast block by block, one 1 GiB fp32 block (131k rows x 2048) at a time
#   peak: fp32 about 12 GB, fp16 about 7.5 GB (+ the model, and the bank's copy if unsorted)
SIM_BYTES = 2**30  # bound on one fp32 similarity block (and one upcast bank block)


def _take(t, rows):
    """t's rows `rows` (sorted, deduplicated order): a view when that is a prefix, so a bank already in
    index order is not copied; otherwise a copy (a second bank, briefly)."""
    if torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
        return t[:rows.numel()]
    return t.index_select(0, rows)


@torch.no_grad()
def extract_features(model, loader, device, autocast=True, normalize=True, gather=True, dtype=torch.float32):
    """(features (N, D) float32, L2-normalized unless normalize=False, labels (N,), indices (N,)),
    sorted by sample index. Raw features (normalize=False) feed eval_linear's head.

    loader yields (x, y, idx): data.build_dataset(..., return_index=True). The model runs in eval
    mode (restored afterwards) under no_grad, with bf16 autocast if asked and supported, inputs in
    channels_last. Under N processes each rank extracts its shard; the shards (of any sizes) are
    all-gathered and deduplicated by index, so every rank returns each sample exactly once, even
    when a DistributedSampler padded a shard with repeated samples. gather=False: each rank returns
    its own shard only (only the indices are gathered, to drop a sample that a lower rank also
    holds), so the shards partition the dataset: the kNN bank at ImageNet size (1.28M x 2048 fp32 is
    10 GB) then costs each process 1/N of it.
    The features are written in place into one buffer sized from len(loader) x the first batch's
    size (grown by doubling if the loader says nothing or too little), of dtype `dtype` (fp16 or
    bf16 halves the bank; normalized per batch in fp32 first, then rounded)."""
    was_training = model.training
    model.eval()
    feats, n, labels, idxs = None, 0, [], []
    try:
        with maybe_autocast(device, autocast):
            x_dtype = next(model.parameters()).dtype  # fp32, or a trainer's precision=fp64
            for x, y, idx in loader:
                x = x.to(device, x_dtype, non_blocking=True)
                if x.ndim == 4:  # NOTE: 10-25% faster on CPU (oneDNN), the weights may stay NCHW
                    x = x.contiguous(memory_format=torch.channels_last)
                f = model(x).float()
                f = F.normalize(f, dim=1) if normalize else f  # per row: the same as on the whole bank
                if feats is None or n + len(f) > len(feats):
                    try:
                        rows = len(loader) * len(f)
                    except TypeError:  # no len(): grow as it goes
                        rows = 0
                    grown = torch.empty(max(rows, n + len(f), 2 * n), f.shape[1], dtype=dtype, device=device)
                    if feats is not None:
                        grown[:n] = feats[:n]
                    feats = grown
                feats[n:n + len(f)] = f
                n += len(f)
                labels.append(y)
                idxs.append(idx)
    finally:
        model.train(was_training)
    if n:
        feats = feats[:n]
        labels, idxs = torch.cat(labels).to(device), torch.cat(idxs).to(device)
    else:  # an empty shard (more ranks than samples): its feature size comes from the others
        feats = torch.zeros(0, 0, dtype=dtype, device=device)
        labels = idxs = torch.zeros(0, dtype=torch.long, device=device)
    rank, world = rank_world()
    if world > 1 and not gather:
        return _own_shard(feats, labels, idxs, rank)
    if world > 1:
        sizes = torch.tensor([feats.shape[0], feats.shape[1]], device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        n = [int(s[0]) for s in all_sizes]
        n_max, dim = max(n), max(int(s[1]) for s in all_sizes)
        if feats.shape[0] == 0:
            feats = feats.new_zeros(0, dim)
        # pad to the longest shard for all_gather, then drop each rank's padding rows
        feats = torch.cat([f[:k] for f, k in zip(all_gather_rows(feats, n_max), n)])
        labels = torch.cat([f[:k] for f, k in zip(all_gather_rows(labels, n_max), n)])
        idxs = torch.cat([f[:k] for f, k in zip(all_gather_rows(idxs, n_max), n)])
    order = torch.argsort(idxs, stable=True)
    idxs = idxs[order]
    keep = torch.ones_like(idxs, dtype=torch.bool)
    keep[1:] = idxs[1:] != idxs[:-1]  # duplicates (sampler padding) are the same sample: keep one
    order = order[keep]
    return _take(feats, order), labels[order], idxs[keep]


def _own_shard(feats, labels, idxs, rank):
    """This rank's rows sorted by index, minus those a lower rank holds too (sampler padding)."""
    order = torch.argsort(idxs, stable=True)
    labels, idxs = labels[order], idxs[order]
    keep = torch.ones_like(idxs, dtype=torch.bool)
    keep[1:] = idxs[1:] != idxs[:-1]
    n = torch.tensor([idxs.numel()], device=idxs.device)
    all_n = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(all_n, n)
    n = [int(v) for v in all_n]
    lower = torch.cat([f[:k] for f, k in zip(all_gather_rows(idxs, max(n)), n)][:rank] + [idxs[:0]])
    keep &= ~torch.isin(idxs, lower)
    return _take(feats, order[keep]), labels[keep], idxs[keep]


def merge_topk(sims, labels, k):
    """The k largest of several candidate lists: sims, labels (P, c, k_p) -> (c, k) each, largest
    first. The top k of a union of shards is the top k of the shards' top k's, so a bank split over
    processes gives the neighbours of the whole bank."""
    sim, pos = torch.cat(list(sims), 1).topk(k, dim=1)  # (c, P * k_p) -> (c, k)
    return sim, torch.cat(list(labels), 1).gather(1, pos)


def _block_topk(q, bank, k, block):
    """topk(q @ bank.T) of a half-precision bank, upcast to q's dtype `block` rows at a time: the top k
    of each block merged with the running top k (merge_topk's argument), never a whole fp32 bank."""
    sim = idx = None
    for b0 in range(0, bank.shape[0], block):
        s = q @ bank[b0:b0 + block].to(q.dtype).T  # (c, D) x (D, block) -> (c, block)
        s, i = s.topk(min(k, s.shape[1]), dim=1)
        i += b0
        if sim is not None:
            s, pos = torch.cat([sim, s], 1).topk(min(k, sim.shape[1] + s.shape[1]), dim=1)
            i = torch.cat([idx, i], 1).gather(1, pos)
        sim, idx = s, i
    return sim, idx


def _knn_topk(train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk, sharded=False):
    """Yield (test rows slice, {k: scores (c, num_classes)}) per chunk of c test rows: one (c x N)
    matmul and one topk with the largest k; smaller k are the leading columns (topk sorts).
    c is `chunk`, less where a (c x N) fp32 similarity would pass SIM_BYTES (ImageNet's 1.28M-row
    bank: 209 rows). A half-precision bank (knn_eval's bank_dtype) is upcast block by block.
    sharded: each process holds a shard of the bank (extract_features(gather=False)) and the same
    test rows; every rank searches its shard and the candidates are merged (all_gather of c x k)."""
    n_bank, world = train_feats.shape[0], rank_world()[1]
    sharded = sharded and world > 1
    if sharded:
        n = torch.tensor(n_bank, device=test_feats.device)
        dist.all_reduce(n)
        n_bank = int(n)
    k_max = min(max(ks), n_bank)
    half = train_feats.dtype != test_feats.dtype and train_feats.shape[0] > 0
    block = max(1, SIM_BYTES // (4 * max(1, train_feats.shape[1])))  # upcast rows of a half bank
    cols = -(-n_bank // world) if sharded else n_bank  # the same on every rank: they loop together
    chunk = max(1, min(chunk, SIM_BYTES // (4 * max(1, min(cols, block) if half else cols))))
    for start in range(0, test_feats.shape[0], chunk):
        q = test_feats[start:start + chunk]
        if half:
            sim, nn_idx = _block_topk(q, train_feats, k_max, block)
        else:
            sim = q @ train_feats.to(q.dtype).T  # (c, D) x (D, N) -> (c, N) cosine
            sim, nn_idx = sim.topk(min(k_max, sim.shape[1]), dim=1)  # (c, k_max), largest first
        nn_labels = train_labels[nn_idx]
        if sharded:  # pad a short shard with -inf, then the top k_max of every rank's candidates
            pad = k_max - sim.shape[1]
            sim = F.pad(sim, (0, pad), value=float("-inf"))
            nn_labels = F.pad(nn_labels, (0, pad))
            sims, labs = [torch.empty_like(sim) for _ in range(world)], [torch.empty_like(nn_labels) for _ in range(world)]
            dist.all_gather(sims, sim)
            dist.all_gather(labs, nn_labels)
            sim, nn_labels = merge_topk(sims, labs, k_max)
        weight = (sim / temperature).exp_()  # InstDisc/DINO vote weight exp(sim / T)
        out = {}
        for k in ks:
            kk = min(k, k_max)  # k beyond the bank size: every bank row votes
            out[k] = sim.new_zeros(sim.shape[0], num_classes).scatter_add_(1, nn_labels[:, :kk], weight[:, :kk])
        yield slice(start, start + q.shape[0]), out


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=200, temperature=0.1, chunk=1024):
    """(test, num_classes) class scores: sum over the k most cosine-similar bank rows of
    exp(sim / T), per class. Features must be L2-normalized already. chunk: test rows per matmul,
    bounding memory to chunk x N floats (1024 x 50k = 200 MB; at most SIM_BYTES)."""
    scores = torch.empty(test_feats.shape[0], num_classes, device=test_feats.device)
    for rows, out in _knn_topk(train_feats, train_labels, test_feats, num_classes, [k], temperature, chunk):
        scores[rows] = out[k]
    return scores


@torch.no_grad()
def _knn_correct(train_feats, train_labels, test_feats, test_labels, num_classes, ks, temperature, chunk,
                 sharded=False):
    """(len(ks), 2) counts of top-1 and top-5 hits, for each k."""
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=test_feats.device)
    top = min(5, num_classes)
    for rows, out in _knn_topk(train_feats, train_labels, test_feats, num_classes, ks, temperature, chunk,
                               sharded):
        y = test_labels[rows, None]
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
    loader's dataset, with its transform and batch size (an Upsampled loader: its 32 px images, and
    the batches are upsampled when used, Upsampled). Random, not the loader's first batches:
    an image folder lists the images class by class, so the first 2000 CIFAR images are 2 classes.
    US-Nets calibrate on about 2000 training images. Under N processes each rank draws
    n_images / N from its own shard and knn_eval pools the statistics (all_reduce).
    NOTE: the draw matters at the 1% level. Random-init resnet18_cifar, 10k bank / 2k test, three
    seeds: top-1 30.05 / 30.8 / 30.4% at 1.0x and 24.45 / 24.5 / 25.5% at 0.25x with 2000 images,
    about the same spread with 500 (4x cheaper). Keep the seed fixed within a run; the draw (and so
    the accuracy) also changes with the number of processes, and bit-equal results would further
    need the same batches, as train-mode BN depends on them."""
    if isinstance(loader, Upsampled):  # drawn at 32 px, upsampled batch by batch when used
        return Upsampled(calibration_batches(loader.loader, n_images, seed), loader.upsample, loader.device)
    rank, world = rank_world()
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
             depth=None, autocast=True, all_reduce=None, chunk=1024, timings=None, ks=(), details=None,
             progress=False, bank_dtype=None):
    """{width: kNN top-1 in [0, 1]} of the backbone, each width BN-calibrated first.

    calib_batches: re-iterable batches of training images with the eval transform (see
    calibration_batches), used at every width; a one-shot iterator is materialized once.
    all_reduce: pool the BN calibration statistics over processes; None = whenever
    torch.distributed runs with more than one process (every rank must call knn_eval anyway).
    Pass the unwrapped backbone (accelerator.unwrap_model), not the DDP wrapper. The backbone's
    parameters, training mode and BN buffers are left as they were (its checkpoints do not depend
    on when it was evaluated); the width is set back to 1.0 (full depth). timings: an optional
    dict, filled with seconds spent in calibration, extraction and search (summed over widths).
    ks, details: more neighbour counts searched at no extra cost (one topk of the largest k); an
    optional dict filled with {width: {"top1_k": {k: acc}, "top5_k": {k: acc}}} for k and ks.
    progress: tqdm bars over the bank and test passes (pass accelerator.is_main_process).
    bank_dtype: the bank's storage dtype; None = fp16 on CUDA (half the memory; unit vectors keep
    about 3 decimal digits, sims are computed in fp32), fp32 elsewhere (exact, as tested).
    Under N processes the bank stays sharded (each rank holds 1/N of it, ImageNet's 1.28M x 2048 fp32
    is 10 GB) and the test features are gathered: every rank searches its shard for every test row
    and the top k of the merged candidates are the whole bank's (equal to 1 process, tested).
    """
    world = rank_world()[1]
    if bank_dtype is None:
        bank_dtype = torch.float16 if device.type == "cuda" else torch.float32
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
            with maybe_autocast(device, autocast):  # statistics of the network as it will run
                calibrate_bn(backbone, calib_batches, w, depth, all_reduce=all_reduce)
            t1 = time.perf_counter()
            bank, bank_y, _ = extract_features(backbone, Progress(bank_loader, not progress, f"kNN {w:g} bank"), device,
                                               autocast, gather=False, dtype=bank_dtype)
            test, test_y, _ = extract_features(backbone, Progress(test_loader, not progress, f"kNN {w:g} test"), device,
                                               autocast)
            t2 = time.perf_counter()
            num_classes = torch.stack([bank_y.max() if len(bank_y) else test_y.max(), test_y.max()]).max()
            if world > 1:
                dist.all_reduce(num_classes, op=dist.ReduceOp.MAX)
            all_k = list(dict.fromkeys([k, *ks]))  # k first: results[w] reads row 0
            correct = _knn_correct(bank, bank_y, test, test_y, int(num_classes) + 1, all_k, temperature, chunk,
                                   sharded=True)  # the same counts on every rank
            c, n = correct.tolist(), max(test.shape[0], 1)
            results[w] = c[0][0] / n
            if details is not None:
                details[w] = {"top1_k": {kk: c[i][0] / n for i, kk in enumerate(all_k)},
                              "top5_k": {kk: c[i][1] / n for i, kk in enumerate(all_k)}}
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


@torch.no_grad()
def collapse_eval(backbone, projector, calib_batches, slices, device, autocast=True):
    """{name: collapse std} per slice (slices: {name: (width, depth)}): std over images of the
    L2-normalized projector output, averaged over dims (losses.collapse_std; about 1/sqrt(D) for a
    uniform spread, 0 for a collapse), on the calibration images (calibration_batches) run as in
    pretraining: train-mode BN with batch statistics. The same statistic as log.jsonl's, which is
    logged only for the widths a step happened to sample; this one covers every monitored slice at
    the end of a run. The BN buffers and training modes are restored. Under N processes every rank
    runs its own images (sync BN pools batch statistics as in training) and the std is over all."""
    modules = (backbone, projector)
    modes, dtype = [m.training for m in modules], next(backbone.parameters()).dtype  # fp64 runs: fp64 inputs
    buffers = [(b, b.clone()) for m in modules for b in m.buffers()]  # BN running statistics and counts
    out = {}
    try:
        for m in modules:
            m.train()
        for name, (w, depth) in slices.items():
            set_active(backbone, w, depth)
            s = None  # per dim: sum, sum of squares, count (float64): the std over every rank's images
            for b in calib_batches:
                x = (b[0] if isinstance(b, (list, tuple)) else b).to(device, dtype, non_blocking=True)
                with maybe_autocast(device, autocast):
                    z = F.normalize(projector(backbone(x)).float(), dim=1).double()
                part = torch.stack([z.sum(0), (z * z).sum(0), torch.full_like(z[0], z.shape[0])])
                s = part if s is None else s + part
            if rank_world()[1] > 1:
                dist.all_reduce(s)
            total, sq, n = s
            out[name] = round(((sq - total * total / n) / (n - 1)).clamp_min(0).sqrt().mean().item(), 5)
    finally:
        set_active(backbone, 1.0)
        for b, saved in buffers:
            b.copy_(saved)
        for m, mode in zip(modules, modes):
            m.train(mode)
    return out


class Progress:
    """A re-iterable loader wrapper with a tqdm bar per pass (main process only)."""

    def __init__(self, loader, disable, desc=""):
        self.loader, self.disable, self.desc = loader, disable, desc

    def __iter__(self):
        return iter(tqdm(self.loader, desc=self.desc, disable=self.disable, leave=False, dynamic_ncols=True))


def build_knn_loaders(data_path, dataset_name, batch_size, bank_subset=0, test_subset=0, num_workers=0,
                      seed=0, cache=False, loader="torch", ffcv_path="", device="cpu", rows=None, image_size=None,
                      mean_std=None):
    """(bank_loader, test_loader): the train split (bank) and the test split with the eval
    transform, optionally class-balanced seeded subsets (0 = all), yielding (x, y, idx) in a fixed
    order. Under N processes (call it after the process group is up, e.g. after Accelerator())
    each rank loads samples rank, rank + N, ... (shards differ by at most one sample, no padding);
    extract_features gathers them back by idx. cache: decode and transform once, keep the
    (rank's) images in memory as tensors: for the training monitor on CIFAR-scale data (a 10k
    bank is 123 MB), where JPEG decoding would otherwise cost about as much as a 0.25x forward.
    loader: torch (DataLoader, as above) | device (cached, and the tensors kept on `device`,
    batches sliced there) | ffcv (ffcv_path/train.beton and test.beton, center crops decoded by
    FFCV onto the device, normalized there; no subsets, but rows={"train"|"test": rows} picks rows).
    image_size: the input size the network fixes (a ViT's img_size; None for a CNN, which takes any):
    CIFAR is upsampled to it as data.eval_transform does, batch by batch (eval_parts, Upsampled).
    mean_std: the normalization on every path (data.normalization of the mean/std keys; None: the preset)."""
    transform, upsample = eval_parts(dataset_name, image_size, mean_std)
    if loader == "ffcv":
        loaders = _ffcv_eval_loaders(ffcv_path, dataset_name, batch_size, bank_subset, test_subset, device, rows or {},
                                     image_size, mean_std)
        return tuple(Upsampled(ld, upsample, device) for ld in loaders) if upsample else loaders
    rank, world = rank_world()
    loaders = []
    for split, subset in (("train", bank_subset), ("test", test_subset)):
        ds = build_dataset(data_path, split, transform, subset=subset, subset_seed=seed, return_index=True)
        if world > 1:
            ds = Subset(ds, range(rank, len(ds), world))
        if cache or loader == "device":
            x, y, idx = zip(*DataLoader(ds, batch_size=256, num_workers=num_workers))
            ds, num_workers = TensorDataset(torch.cat(x), torch.cat(y), torch.cat(idx)), 0
        if loader == "device":
            batches = DeviceBatches([t.to(device) for t in ds.tensors], batch_size)
        else:
            batches = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
        loaders.append(Upsampled(batches, upsample, device) if upsample else batches)
    return tuple(loaders)


def eval_parts(dataset_name, image_size=None, mean_std=None):
    """(transform, upsample) of data.eval_transform(dataset_name, image_size, mean_std): CIFAR at a network's size
    other than 32 px is the 32 px transform per image, then `upsample` (the resize and centre crop that
    eval_transform applies last, to the tensor) per batch, on the device; otherwise the whole transform
    and None. The images stay 32 px until a batch is used: a 10k-image bank at 224 px would be 6 GB in
    fp32, 2000 calibration images 1.2 GB, and the resize runs on the GPU, not in the loader's workers."""
    small, full = eval_transform(dataset_name, None, mean_std), eval_transform(dataset_name, image_size, mean_std)
    extra = full.transforms[len(small.transforms):]
    return (small, T.Compose(extra)) if extra else (full, None)


class Upsampled:
    """A loader's batches, (x, y, idx) or image batches x (calibration), with x upsampled as it is
    served, on `device`: the same tensors per image as data.eval_transform (eval_parts). batch_size and
    num_workers are the loader's; calibration_batches of it draws 32 px images and upsamples them too."""

    def __init__(self, loader, upsample, device="cpu"):
        self.loader, self.upsample, self.device = loader, upsample, device
        self.batch_size, self.num_workers = getattr(loader, "batch_size", None), getattr(loader, "num_workers", 0)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            x, rest = (b, None) if torch.is_tensor(b) else (b[0], b[1:])
            x = self.upsample(x.to(self.device, non_blocking=True))
            yield x if rest is None else (x, *rest)


class DeviceBatches:
    """Re-iterable (x, y, idx) batches sliced from tensors already on the device; .dataset,
    .batch_size and .num_workers as a DataLoader's (calibration_batches draws from it)."""

    def __init__(self, tensors, batch_size):
        self.tensors, self.batch_size, self.num_workers = tensors, batch_size, 0
        self.dataset = TensorDataset(*tensors)

    def __len__(self):
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.tensors[0]), self.batch_size):
            yield tuple(t[i:i + self.batch_size] for t in self.tensors)


def _ffcv_eval_loaders(ffcv_path, dataset_name, batch_size, bank_subset, test_subset, device, rows, image_size=None,
                       mean_std=None):
    from data import MEAN_STD
    from ffcv_data import build_ffcv_eval_loader

    if bank_subset or test_subset:
        raise ConfigError("config error: loader=ffcv reads whole .beton files: bank_subset and test_subset "
                          "must be 0 (write a smaller .beton instead)")
    paths = [os.path.join(ffcv_path, f"{split}.beton") for split in ("train", "test")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        cap = "--raw" if dataset_name.startswith("cifar") else "--max_resolution 256"
        raise ConfigError(f"config error: loader=ffcv: {', '.join(missing)} not found; write them with "
                          f"`python ffcv_data.py --data_path DIR --out {ffcv_path or 'FFCV_PATH'} {cap}`")
    rank, world = rank_world()
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std or MEAN_STD[dataset_name])
    size = 32 if dataset_name.startswith("cifar") else image_size or 224  # CIFAR: as stored (Upsampled resizes it)

    class Normalized:  # uint8 -> normalized float on the device, as eval_transform
        def __init__(self, path, indices):
            self.path, self.indices, self.loader = path, indices, None

        def __iter__(self):  # the ffcv Loader is built on first use (each compiles its pipeline: seconds)
            if self.loader is None:
                self.loader = build_ffcv_eval_loader(self.path, batch_size, size, rank, world, device,
                                                     indices=self.indices)
            for x, y, idx in self.loader:
                yield (x.float() / 255 - mean) / std, y.clone(), idx  # ffcv reuses its label buffers

    return tuple(Normalized(p, rows.get(split)) for p, split in zip(paths, ("train", "test")))


def fixed_calibration_batches(data_path, dataset_name, bank_subset, n_images, batch_size, seed=0, num_workers=0,
                              image_size=None, mean_std=None):
    """The CLI's calibration set: calibration_shard of the bank split (with the eval transform at image_size,
    the network's input size: CIFAR upsampled batch by batch when used, eval_parts; normalized with mean_std)."""
    transform, upsample = eval_parts(dataset_name, image_size, mean_std)
    ds = build_dataset(data_path, "train", transform, subset=bank_subset, subset_seed=seed)
    batches = calibration_shard(ds, n_images, batch_size, seed, num_workers)
    return Upsampled(batches, upsample) if upsample else batches


def calibration_shard(ds, n_images, batch_size, seed=0, num_workers=0, pool=None):
    """This rank's share of a calibration set that is the same whatever the process count: n_images
    drawn at random (seeded) from ds, or from its indices `pool` (e.g. eval_linear's training pool),
    cut into batches of batch_size in index order (the short one last); rank r forwards batches
    r, r + N, ... and calibrate_bn pools the statistics (all_reduce). Train-mode BN depends on the
    batch composition, so the same batches are what make N processes give 1 process's numbers.
    On 1 process, without pool, it equals calibration_batches(loader of ds, n_images, seed)."""
    rank, world = rank_world()
    pool = torch.arange(len(ds)) if pool is None else torch.as_tensor(pool)
    g = torch.Generator().manual_seed(seed)
    pick = pool[torch.randperm(len(pool), generator=g)[:n_images]].sort().values
    batches = pick.split(batch_size)  # full batches, the short one last: re-batching a rank's share keeps them
    if len(batches) < world:  # the same on every rank: all raise, none hangs in all_reduce
        raise ValueError(f"calib_images={n_images} at batch_size={batch_size} makes {len(batches)} calibration "
                         f"batch(es) for {world} processes: raise calib_images or lower batch_size")
    mine = torch.cat(batches[rank::world]).tolist()
    return [b[0] for b in DataLoader(Subset(ds, mine), batch_size=batch_size, num_workers=num_workers)]
