"""P2 and P3 for US3L on ResNet-18 CIFAR (docs/design.md, Performance targets), measured side by side in one run.

P2: peak memory of a US3L step with 3 widths (a backward after each width) over a single
    full-width step; target <= 1.10. Also shown: the same 3 widths with ONE backward of the summed
    loss, which keeps every width's activations alive. Memory = peak bytes of tensors saved for
    backward (exact, any device) and, on CUDA, torch.cuda.max_memory_allocated.
P3: expected time of a US3L stage-2 step (3 widths: full, U(R_min, 1), R_min) over a naive
    sandwich step (4 widths: full, two U(0.25, 1), 0.25, every step); target <= 0.80. Reported
    per phase (R_min = 0.75, 0.5, 0.25), over the second stage (the three phases, equally long),
    and over the whole run (stage 1, the first quarter, trains the full width only).

The random widths make a step's time a random variable: P3 compares expectations. Every variant
draws its random widths from the same stratified quantiles (repeat r uses the r-th of `repeats`
equal slices of U(0, 1), in a seeded order per width slot), and times are means over the repeats,
so the estimate does not hinge on a few lucky draws. Next to the times, the same ratios in
training MACs (teacher forward 1x, each width forward + backward 3x the forward MACs, from
models.profile at 32 px) say what a compute-bound device gets; the paper counts cost in sampled
widths instead ("we do not consider the effect of model size"), 3 against 4.

    python bench/bench_us3l_step.py [--batch_size 128] [--repeats 8]
    python bench/bench_us3l_step.py --allreduce [--batch_size 16]   # starts 2 processes itself

--allreduce: the time of a whole training step (stage-2 widths [1, U(R_min, 1), R_min], the step end
of utils.optimizer_step_) in 2 processes, the gradients all-reduced in one blocking flat buffer after
the last backward or in buckets sent while it runs (utils.OverlappedAllReduce, the trainers' default),
side by side on the same width draws. It re-runs this script under `accelerate launch --multi_gpu
--num_processes 2` (printed): gloo on the CPU (ACCELERATE_USE_CPU=true), NCCL with 2 or more GPUs.
"""

import argparse
import copy
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models import ARCHS, profile, projection_mlp, set_sync_bn  # noqa: E402
from train_us3l import Config, forward_backward  # noqa: E402
from utils import OverlappedAllReduce, all_reduce_grads_, optimizer_step_  # noqa: E402


class SavedTensorMeter:
    """Live bytes of tensors saved for backward, and their peak (torch.autograd.graph hooks)."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Freed(t, n, self)

    def unpack(self, holder):
        return holder.t


class _Freed:  # gives its bytes back when autograd frees the saved tensor
    def __init__(self, t, n, meter):
        self.t, self.n, self.meter = t, n, meter

    def __del__(self):
        self.meter.live -= self.n


def build(device, fmt):
    torch.manual_seed(0)
    cfg = Config()
    backbone = ARCHS[cfg.arch]()
    student = nn.ModuleDict({"backbone": backbone,
                             "projector": projection_mlp(backbone.feature_dim, cfg.proj_hidden, cfg.proj_dim),
                             "aux": projection_mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)})
    student = student.to(device, memory_format=fmt)
    teacher = copy.deepcopy(nn.ModuleDict({k: student[k] for k in ("backbone", "projector")}))
    return cfg, student, teacher


def summed_backward(student, teacher, x, widths, cfg, autocast):
    """The naive alternative for P2: every width's loss in one graph, one backward."""
    from train_us3l import pair_loss
    with torch.no_grad(), autocast():
        keys = teacher["projector"](teacher["backbone"](x)).float()
    total = 0
    from models import set_active
    for i, w in enumerate(widths):
        with autocast():
            set_active(student["backbone"], w)
            z = student["projector"](student["backbone"](x))
            q = z if i == 0 else student["aux"](z)
            total = total + pair_loss("infonce" if i == 0 else "mse", q, keys, cfg)  # the trainer's losses
    total.backward()
    set_active(student["backbone"], 1.0)


def peak_memory(fn, device):
    meter = SavedTensorMeter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        fn()
    cuda = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return meter.peak, cuda


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--allreduce", action="store_true", help="overlapped vs blocking all-reduce, 2 processes")
    args = ap.parse_args()
    if args.allreduce:
        return allreduce(args)
    device = torch.device(args.device)
    fmt = torch.channels_last
    cfg, student, teacher = build(device, fmt)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16)  # noqa: E731
    x = torch.randn(2 * args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)  # two views
    print(f"US3L step, {cfg.arch}, batch {args.batch_size} x 2 views, bf16, {device}, "
          f"{torch.get_num_threads()} threads")

    # P2: peak memory
    widths3 = [1.0, 0.6, 0.25]
    def step(fn, widths):  # noqa: E306
        return lambda: (fn(student, teacher, x, widths, cfg, autocast), student.zero_grad(set_to_none=True))
    single, single_cuda = peak_memory(step(forward_backward, [1.0]), device)
    per_width, per_width_cuda = peak_memory(step(forward_backward, widths3), device)
    summed, summed_cuda = peak_memory(step(summed_backward, widths3), device)
    print(f"P2 saved-activation peak: single full width {single / 2**20:.0f} MiB, 3 widths with a backward "
          f"each {per_width / 2**20:.0f} MiB, 3 widths summed {summed / 2**20:.0f} MiB")
    print(f"P2 = {per_width / single:.3f} (target <= 1.10); one summed backward would be {summed / single:.2f}")
    if single_cuda:
        print(f"P2 (CUDA max_memory_allocated) = {per_width_cuda / single_cuda:.3f}; summed {summed_cuda / single_cuda:.2f}")

    # P3: step time, interleaved so that machine noise hits every variant alike
    r = p3(student, teacher, x, cfg, autocast, args.repeats, device)
    mean, cost, naive, naive_macs = r["ms"], r["macs"], r["ms"]["naive n=4"], r["macs"]["naive n=4"]
    print(f"P3 step time (mean of {args.repeats} stratified width draws) and training MACs, relative to the naive step:")
    for name in mean:
        print(f"  {name:<20} {mean[name]:7.0f} ms/step  time {mean[name] / naive:5.3f}  "
              f"MACs {cost[name] / naive_macs:5.3f}")
    print(f"P3 = {r['p3_time']:.3f} over US3L's second stage (R_min 0.75 -> 0.25; target <= 0.80), MACs {r['p3_macs']:.3f}")
    print(f"     {mean['R_min 0.25'] / naive:.3f} at R_min = width_min (3 widths vs 4 over the same range), "
          f"MACs {cost['R_min 0.25'] / naive_macs:.3f}")
    print(f"     {r['run_time']:.3f} over the whole run (with the full-width-only first quarter), MACs "
          f"{r['run_macs']:.3f}; in sampled widths 3/4 = 0.75 and 2.5/4 = 0.625")


def p3(student, teacher, x, cfg, autocast, n, device):
    """Mean step time (ms) and training MACs of each width variant over the same n stratified width
    draws, and the P3 ratios: {"ms", "macs", "p3_time", "p3_macs", "run_time", "run_macs"}."""
    g = torch.Generator().manual_seed(0)
    slots = [((torch.randperm(n, generator=g) + 0.5) / n).tolist() for _ in range(2)]  # 2 random widths
    draws = list(zip(*slots))  # draws[r]: the quantiles of repeat r's random widths
    variants = {"naive n=4": lambda q: [1.0, u(0.25, q[0]), u(0.25, q[1]), 0.25],
                "stage 1 (full only)": lambda q: [1.0],
                "R_min 0.75": lambda q: [1.0, u(0.75, q[0]), 0.75],
                "R_min 0.5": lambda q: [1.0, u(0.5, q[0]), 0.5],
                "R_min 0.25": lambda q: [1.0, u(0.25, q[0]), 0.25]}
    times = {k: [] for k in variants}
    for r in range(-1, n):  # r = -1 warms up
        for name, draw in variants.items():
            widths = draw(draws[max(r, 0)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward_backward(student, teacher, x, widths, cfg, autocast)
            student.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 0:
                times[name].append(time.perf_counter() - t0)

    # the same expectations in training MACs, over the same width draws
    macs_cache = {}
    def macs(w):  # noqa: E306
        if w not in macs_cache:
            macs_cache[w] = profile(student["backbone"], w, input_size=x.shape[-1])[1]
        return macs_cache[w]
    def step_macs(widths):  # noqa: E306
        return macs(1.0) + sum(3 * macs(w) for w in widths)
    cost = {name: statistics.mean(step_macs(draw(q)) for q in draws) for name, draw in variants.items()}
    mean = {k: statistics.mean(v) for k, v in times.items()}
    naive, naive_macs = mean["naive n=4"], cost["naive n=4"]
    phases = ["R_min 0.75", "R_min 0.5", "R_min 0.25"]
    stage2 = statistics.mean(mean[k] for k in phases) / naive
    stage2_macs = statistics.mean(cost[k] for k in phases) / naive_macs
    return {"ms": {k: 1e3 * v for k, v in mean.items()}, "macs": cost, "p3_time": stage2, "p3_macs": stage2_macs,
            "run_time": (mean["stage 1 (full only)"] / naive + 3 * stage2) / 4,
            "run_macs": (cost["stage 1 (full only)"] / naive_macs + 3 * stage2_macs) / 4}


def allreduce(args):
    """Prints (rank 0) and returns the mean step time with each all-reduce, their ratio (overlapped
    over blocking) and the time of the blocking all-reduce alone: {"blocking_ms", "overlapped_ms",
    "ratio", "allreduce_ms"}."""
    if "LOCAL_RANK" not in os.environ:  # not launched yet: start 2 processes of this script
        gpus = torch.cuda.device_count() >= 2 and args.device == "cuda"
        with socket.socket() as sock:  # a free port: other jobs on this machine may hold accelerate's default
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend",
               "no", *sys.argv]
        env = {**os.environ, **({} if gpus else {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})}
        print(("" if gpus else "ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 ") + " ".join(cmd[2:]).replace(
            "accelerate.commands.launch", "accelerate launch"), flush=True)
        return subprocess.run(cmd, env=env, check=True)
    from accelerate import Accelerator
    accelerator = Accelerator()
    device, world, fmt = accelerator.device, accelerator.num_processes, torch.channels_last
    cfg, student, teacher = build(device, fmt)
    set_sync_bn(student, True)  # as the trainers: its all-reduces run in the backward, between the buckets
    params = list(student.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16)  # noqa: E731
    x = torch.randn(2 * args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    overlap = OverlappedAllReduce(params, world)
    mb = sum(p.numel() * p.element_size() for p in params) / 2**20
    accelerator.print(f"{world} processes on {device} ({torch.distributed.get_backend()}), {cfg.arch}, batch "
                      f"{args.batch_size} x 2 views per process, bf16, sync BN, {torch.get_num_threads()} thread(s) each; "
                      f"{mb:.0f} MB of gradients, {len(overlap.buckets)} buckets")
    g = torch.Generator().manual_seed(0)
    draws = [[1.0, u(r, q), r] for q in ((torch.randperm(args.repeats, generator=g) + 0.5) / args.repeats).tolist()
             for r in (0.75, 0.5, 0.25)]  # stage 2: the three phases, stratified random widths
    times = {"blocking": [], "overlapped": []}
    for k, widths in enumerate(draws[:3] + draws):  # the first 3 warm up
        for name, sync in (("blocking", None), ("overlapped", overlap)):  # interleaved: noise hits both alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            forward_backward(student, teacher, x, widths, cfg, autocast, before_last=None if sync is None else sync.arm)
            optimizer_step_(optimizer, scaler, params, world, overlap=sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= 3:
                times[name].append(time.perf_counter() - t0)
    forward_backward(student, teacher, x, [1.0], cfg, autocast)  # what there is to hide: the flat all-reduce alone
    alone = []
    for _ in range(5):
        t0 = time.perf_counter()
        all_reduce_grads_(params, world)
        alone.append(time.perf_counter() - t0)
    r = {f"{k}_ms": 1e3 * statistics.mean(v) for k, v in times.items()}
    r["ratio"], r["allreduce_ms"] = r["overlapped_ms"] / r["blocking_ms"], 1e3 * statistics.median(alone)
    accelerator.print(f"all-reduce: blocking {r['blocking_ms']:.0f} ms/step, overlapped {r['overlapped_ms']:.0f} "
                      f"ms/step (mean of {len(draws)} steps); overlapped / blocking = {r['ratio']:.3f}; the "
                      f"blocking all-reduce alone takes {r['allreduce_ms']:.0f} ms")
    return r


def u(lo, q):  # the q-quantile of U(lo, 1)
    return lo + (1 - lo) * q


if __name__ == "__main__":
    main()
