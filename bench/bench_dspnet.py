"""P2 and P5 for DSPNet (docs/design.md, Performance targets), measured side by side in one run.

P2: peak memory of a DSPNet step with n=4 DNs (a backward after each DN) over a single
    full-network BYOL step; target <= 1.10. Memory = peak bytes of tensors saved for backward
    (exact, any device) and, on CUDA, torch.cuda.max_memory_allocated.
P5: time of one DSPNet epoch on a fixed subset (sandwich of n=4 out of the DN list, every step)
    over the sum of one BYOL epoch of each DN trained on its own (a plain exported network with its
    own target, projector and predictor) on the same subset; target <= 0.55. The paper reports
    2.11 / 4.42 = 0.48 for its five MobileNetV3 DNs (GPU, ImageNet). Both include data loading and
    augmentation (the torch DataLoader path of train_dspnet.py), the optimizer step and the EMA.
    Also printed: the ratio MACs alone would give (sampled DNs + one shared target forward against
    every DN with its own target). For the paper's list and n=4 it is about 0.69: where compute
    dominates, as on a CPU, no implementation of the n=4 sandwich reaches 0.55; the paper's 0.48
    (GPU) also saves the data loading that each individual run repeats.

    python bench/bench_dspnet.py                       # MobileNetV3-Large, 5 widths, 128 px
    python bench/bench_dspnet.py --images 128 --size 64  # quicker
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.bench_us3l_step import peak_memory  # noqa: E402
from data import EpochSampler, SeededViews, build_dataset, pretrain_transform  # noqa: E402
from models import ARCHS, export, projection_mlp  # noqa: E402
from train_dspnet import Config, parse_dns, sample_dns, train_step  # noqa: E402
from utils import LARS, ema_update_, param_groups  # noqa: E402

FULL = [{"width": 1.0, "depth": None}]


def byol_parts(backbone, cfg, device, fmt):
    with torch.no_grad():  # D of this (possibly exported) network: the projector's input size
        dim = backbone.train()(torch.zeros(2, 3, cfg.image_size, cfg.image_size)).shape[1]
    online = nn.ModuleDict({"backbone": backbone,
                            "projector": projection_mlp(dim, cfg.proj_hidden, cfg.proj_dim),
                            "predictor": projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)})
    online = online.to(device, memory_format=fmt)
    encoder = nn.ModuleDict({k: online[k] for k in ("backbone", "projector")})
    target = copy.deepcopy(encoder).requires_grad_(False)
    optimizer = LARS(param_groups(online.parameters(), cfg.weight_decay), lr=0.1)
    return online, encoder, target, optimizer


def epoch_time(online, encoder, target, optimizer, pick, dataset, cfg, device, fmt, autocast):
    """Seconds for one epoch over `dataset`: load + augment, train_step on the DNs pick(step) gives,
    LARS step, EMA update (what train_dspnet.py does per step, minus logging and checkpoints)."""
    loader = torch.utils.data.DataLoader(SeededViews(dataset, 0), cfg.batch_size, drop_last=True,
                                         sampler=EpochSampler(len(dataset), cfg.batch_size, 0, 0, 0, 0, 1),
                                         num_workers=cfg.num_workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step, ((x1, x2), _) in enumerate(loader):
        x = torch.cat([x1, x2]).to(device).contiguous(memory_format=fmt)
        train_step(online, target, x, pick(step), autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update_(target, encoder, 0.996)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mobilenetv3_large")
    ap.add_argument("--dns", default="1.0,0.875,0.75,0.625,0.5", help="widths (the paper's MobileNetV3 list)")
    ap.add_argument("--data_path", default="data/cifar10")
    ap.add_argument("--images", type=int, default=384, help="fixed training subset (images)")
    ap.add_argument("--size", type=int, default=128, help="crop size (CIFAR images upscaled by the crop)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, fmt = torch.device(args.device), torch.channels_last
    cfg = replace(Config(), arch=args.arch, dns=[[float(w)] for w in args.dns.split(",")], dataset="imagenet",
                  image_size=args.size, batch_size=args.batch_size, num_workers=args.num_workers)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16)  # noqa: E731
    torch.manual_seed(0)
    backbone = ARCHS[cfg.arch]()
    dns, macs = parse_dns(cfg, backbone)
    print(f"DSPNet step, {cfg.arch}, {len(dns)} DNs (MMACs at {args.size} px: "
          + ", ".join(f"{d['width']}: {m / 1e6:.0f}" for d, m in zip(dns, macs))
          + f"), n = {cfg.num_subnets}, batch {cfg.batch_size} x 2 views, bf16, {device}, {torch.get_num_threads()} threads")

    # P2: peak memory of one step, n=4 DNs vs the full network alone
    online, encoder, target, optimizer = byol_parts(backbone, cfg, device, fmt)
    x = torch.randn(2 * cfg.batch_size, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    four = [dns[i] for i in sample_dns(10**6, 0, len(dns), cfg)]
    single, single_cuda = peak_memory(lambda: (train_step(online, target, x, FULL, autocast), online.zero_grad()), device)
    multi, multi_cuda = peak_memory(lambda: (train_step(online, target, x, four, autocast), online.zero_grad()), device)
    print(f"P2 saved-activation peak: full network {single / 2**20:.0f} MiB, {len(four)} DNs with a backward each "
          f"{multi / 2**20:.0f} MiB -> P2 = {multi / single:.3f} (target <= 1.10)")
    if single_cuda:
        print(f"P2 (CUDA max_memory_allocated) = {multi_cuda / single_cuda:.3f}")

    # P5: one DSPNet epoch vs one individual BYOL epoch of each DN, on the same fixed subset
    r = p5(cfg, args.data_path, args.images, device)
    t_ind, total, full = r["individual_s"], sum(r["individual_s"].values()), r["individual_s"][dns[0]["width"]]
    print(f"P5 on {r['images']} images ({r['steps']} steps): DSPNet epoch {r['dspnet_s']:.1f} s; individual epochs "
          + ", ".join(f"{w}: {t:.1f} s" for w, t in t_ind.items()) + f" (sum {total:.1f} s)")
    print(f"   relative to the 1.0x network alone: DSPNet {r['dspnet_s'] / full:.2f}x, all individually "
          f"{total / full:.2f}x (paper: 2.11x and 4.42x)")
    print(f"P5 = {r['p5']:.3f} (target <= 0.55)")
    print(f"P5 compute floor from MACs: {r['p5_macs']:.3f} (what P5 is when data loading and overheads cost nothing)")


def p5(cfg, data_path, images, device):
    """One DSPNet epoch on `images` training images (crops of cfg.image_size) against one BYOL epoch of
    each DN alone: {"dspnet_s", "individual_s": {width: s}, "p5", "p5_macs", "images", "steps"}."""
    fmt, size = torch.channels_last, cfg.image_size
    autocast = lambda: torch.autocast(device.type, torch.bfloat16)  # noqa: E731
    torch.manual_seed(0)
    backbone = ARCHS[cfg.arch]()
    dns, macs = parse_dns(cfg, backbone)
    online, encoder, target, optimizer = byol_parts(backbone, cfg, device, fmt)
    four = [dns[i] for i in sample_dns(10**6, 0, len(dns), cfg)]
    dataset = build_dataset(data_path, "train", pretrain_transform("imagenet", size), subset=images)
    steps = len(dataset) // cfg.batch_size
    warm = build_dataset(data_path, "train", pretrain_transform("imagenet", size), subset=2 * cfg.batch_size)
    epoch_time(online, encoder, target, optimizer, lambda s: four, warm, cfg, device, fmt, autocast)  # warm-up
    t_dsp = epoch_time(online, encoder, target, optimizer, lambda s: [dns[i] for i in sample_dns(s, 0, len(dns), cfg)],
                       dataset, cfg, device, fmt, autocast)
    t_ind = {}
    for dn in dns:  # each DN as its own network: the exported plain slice, its own BYOL heads and target
        torch.manual_seed(0)
        parts = byol_parts(export(ARCHS[cfg.arch](), dn["width"], dn["depth"], check_stats=False), cfg, device, fmt)
        epoch_time(*parts, lambda s: FULL, warm, cfg, device, fmt, autocast)  # warm-up
        t_ind[dn["width"]] = epoch_time(*parts, lambda s: FULL, dataset, cfg, device, fmt, autocast)
    # The ratio when MACs are all that count (backward = 2 forwards): a DSPNet step runs the sampled DNs
    # (largest, smallest and n-2 of the others: each other one with probability (n-2)/(N-2)) and one
    # shared full-width target forward; each DN alone runs itself and its own (equal-size) target.
    middle = max(min(cfg.num_subnets, len(dns)) - 2, 0) / max(len(dns) - 2, 1) * sum(macs[1:-1])
    sampled = macs[0] + (macs[-1] if len(dns) > 1 else 0) + middle
    return {"dspnet_s": t_dsp, "individual_s": t_ind, "p5": t_dsp / sum(t_ind.values()),
            "p5_macs": (3 * sampled + macs[0]) / (4 * sum(macs)), "images": steps * cfg.batch_size, "steps": steps}


if __name__ == "__main__":
    main()
