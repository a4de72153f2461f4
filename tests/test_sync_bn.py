"""Sync BN's two implementations agree: torch's fused CUDA kernels (slim._FusedSyncBatchNorm, the machinery
of nn.SyncBatchNorm, on the sliced weight) and the generic Function (slim._SyncBatchNorm, what a CPU runs):
outputs, gradients and running statistics of a slimmable BN at a width < 1, a head BN and a momentum-BN
target (encoder and projector BN), in fp64, fp32 and bf16 inputs (fp32 weights, as under autocast),
channels_last and a non-contiguous slice, on 2 processes (1 on a 1-GPU machine: the sync path forced on
a group of one).

torch 2.14 has no CPU kernels for batch_norm_stats and the four others (NotImplementedError for the CPU
backend), so on a CPU the fused path runs on stand-ins written from the CUDA kernels' source
(aten/src/ATen/native/cuda/Normalization.cu{,h}), dtype contracts included (the typed accessors): that
checks what slim does around the kernels (which kernel gets what, the all_gather's layout, the running
statistics, autograd), not the kernels. test_fused_kernels_cuda runs the real ones (2 GPUs: NCCL across
both); bench/gpu_session.sh runs it on a GPU slot with the other "needs CUDA" tests."""

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import slim
from slim import BatchNorm1d, SlimBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
# fused against python, per input dtype: (rtol, atol). fp64: both exact to rounding; fp32: fp32 statistics
# (fused) against fp64 all-reduces (python); bf16: y and dx are bf16 (one rounding apart at most)
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}
STAT_TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-4, 1e-5)}


# ----------------------------------------------------------------------------------------------
# CPU stand-ins for the CUDA kernels (torch.batch_norm_stats & co), from Normalization.cu(h): statistics
# in the accumulate type (fp32 for bf16/fp16/fp32, fp64 for fp64), outputs in the input's dtype. The asserts
# are the kernels' typed accessors and TORCH_CHECKs: a wrong dtype handed to one fails on CUDA too.

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _c(x):  # (C,) -> broadcast over (B, C[, H, W])
    return (1, -1) + (1,) * (x.ndim - 2)


def _dims(x):
    return [0, *range(2, x.ndim)]


def emu_stats(x, eps):
    var, mean = torch.var_mean(x.to(_acc(x.dtype)), dim=_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def emu_gather_stats_with_counts(inp, mean, invstd, running_mean, running_var, momentum, eps, counts):
    scalar = running_mean.dtype if running_mean is not None else inp.dtype  # the kernel's dispatch type
    assert mean.dtype == invstd.dtype == _acc(scalar), "mean/invstd accessors are the accumulate type"
    assert counts.dtype == scalar, f"counts accessor is {scalar}, got {counts.dtype}"
    assert mean.ndim == 2 and counts.shape == mean.shape[:1]
    n = counts.to(mean.dtype).view(-1, 1)  # (W, 1)
    var = invstd.pow(-2) - eps  # each rank's biased variance, as the kernel recovers it
    total = n.sum(0)
    avg = (n * mean).sum(0) / total
    var_n = (n * var).sum(0) + (n * (mean - avg) ** 2).sum(0)  # Chan et al.'s combination, summed at once
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(momentum * avg)
        running_var.mul_(1 - momentum).add_(momentum * var_n / (total - 1))
    return avg, torch.rsqrt(var_n / total + eps)


def emu_elemt(x, weight, bias, mean, invstd, eps):
    assert mean.dtype == invstd.dtype == _acc(x.dtype)
    assert weight is None or weight.dtype in (x.dtype, mean.dtype)  # plain, or mixed (params in fp32)
    y = (x.to(mean.dtype) - mean.view(_c(x))) * invstd.view(_c(x))
    if weight is not None:
        y = y * weight.to(mean.dtype).view(_c(x))
    if bias is not None:
        y = y + bias.to(mean.dtype).view(_c(x))
    return y.to(x.dtype)  # empty_like(x): x's dtype and memory format


def emu_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    assert mean.dtype == invstd.dtype, "mean and invstd need to have the same data types"
    assert dy.dtype == x.dtype and (weight is not None or not (weight_g or bias_g))
    dy_, xmu = dy.to(mean.dtype), x.to(mean.dtype) - mean.view(_c(x))
    sum_dy, sum_dy_xmu = dy_.sum(_dims(x)), (dy_ * xmu).sum(_dims(x))
    grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
    grad_b = sum_dy.to(weight.dtype) if bias_g else None
    return (sum_dy if input_g else None), (sum_dy_xmu if input_g else None), grad_w, grad_b


def emu_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    assert mean.dtype == invstd.dtype == sum_dy.dtype == sum_dy_xmu.dtype
    assert count.dtype == torch.int32 and count.is_contiguous(), "count is read as int32 numels"
    assert weight is None or weight.dtype == mean.dtype or weight.dtype == x.dtype == mean.dtype
    n = count.sum().to(mean.dtype)
    xmu = x.to(mean.dtype) - mean.view(_c(x))
    scale = invstd if weight is None else invstd * weight.to(mean.dtype)
    dx = (dy.to(mean.dtype) - (sum_dy / n).view(_c(x)) - xmu * (invstd * invstd * sum_dy_xmu / n).view(_c(x)))
    return (dx * scale.view(_c(x))).to(x.dtype)


def emulate_kernels():
    """The CPU stand-ins in place of torch's CUDA-only kernels (in a worker process only), and slim taking
    the fused path for CPU tensors as it does for CUDA ones."""
    torch.batch_norm_stats = emu_stats
    torch.batch_norm_gather_stats_with_counts = emu_gather_stats_with_counts
    torch.batch_norm_elemt = emu_elemt
    torch.batch_norm_backward_reduce = emu_backward_reduce
    torch.batch_norm_backward_elemt = emu_backward_elemt
    slim._fused = lambda x: slim.SYNC_BN_KERNELS == "fused"


# ----------------------------------------------------------------------------------------------

def bn_case(rank, world, device, dtype):
    """A global batch of 8 (8 / world rows per rank) through every sync-BN path: SlimBatchNorm2d(64) on
    40 channels (fp64: a non-contiguous channel slice of a bigger tensor; else channels_last), a head
    BatchNorm1d(16), and momentum-BN targets of both (two batches: the first sets the running statistics,
    the second moves them). x and h in `dtype`, the modules in fp32 (fp64 for fp64) as under autocast."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(8, 48, 5, 5, generator=g, dtype=torch.float64) * 3 + 1
    h = torch.randn(8, 16, generator=g, dtype=torch.float64) * 2 - 1
    dy, dh = torch.randn(8, 40, 5, 5, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    per = 8 // world
    rows = slice(rank * per, (rank + 1) * per)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    bn, head, target, target_head = (m.to(device, params) for m in (SlimBatchNorm2d(64), BatchNorm1d(16),
                                                                     SlimBatchNorm2d(64), BatchNorm1d(16)))
    with torch.no_grad():
        for m in (bn, head):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64) * 2 - 1)
    target.stats_momentum = target_head.stats_momentum = 0.3
    for m in (bn, head, target, target_head):
        m.sync = True
    x = wide[rows].to(device, dtype)
    x = x[:, :40] if dtype == torch.float64 else x[:, :40].contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    hr = h[rows].to(device, dtype).requires_grad_()
    y, z = bn(x), head(hr)
    (y.double() * dy[rows].to(device)).sum().backward()
    (z.double() * dh[rows].to(device)).sum().backward()
    with torch.no_grad():
        for xb, hb in ((x, hr), (x * 2 + 1, hr * 3 - 1)):
            t, th = target(xb), target_head(hb)
    out = {"y": y, "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "z": z, "dh": hr.grad,
           "head_dw": head.weight.grad, "head_db": head.bias.grad, "head_mean": head.running_mean,
           "head_var": head.running_var, "head_n": head.num_batches_tracked, "t": t, "t_mean": target.running_mean,
           "t_var": target.running_var, "th": th, "th_mean": target_head.running_mean,
           "th_var": target_head.running_var}
    out = {k: v.detach().cpu() for k, v in out.items()}
    out["y_channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
    out["x_channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
    return out


def _count(calls, name, fn):
    def counted(*a, **k):
        calls[name] += 1
        return fn(*a, **k)
    return counted


def worker(rank, world, port, backend, emulate, dtypes, out):
    """bn_case per dtype and per path, {(dtype, mode): (result, calls)}: mode auto (slim's own choice, no
    stand-ins), fused and python (SLIM_SYNC_BN's two values; on a CPU the fused one on the stand-ins);
    calls: how often each implementation's statistics ran (fused: batch_norm_stats, python: _pooled_moments)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), **({"device_id": device} if backend == "nccl" else {}))
    try:
        if world == 1:  # one GPU: the sync path on a group of one (its collectives are copies)
            slim._sync_active = lambda: True
        calls = {"fused": 0, "python": 0}
        slim._pooled_moments = _count(calls, "python", slim._pooled_moments)
        res = {}
        for mode in ("auto", "fused", "python"):
            if mode == "fused" and emulate:
                emulate_kernels()
            stats = torch.batch_norm_stats
            torch.batch_norm_stats = _count(calls, "fused", stats)
            slim.SYNC_BN_KERNELS = "python" if mode == "python" else "fused"
            for dtype in dtypes:
                calls.update(fused=0, python=0)
                res[str(dtype), mode] = bn_case(rank, world, device, dtype), dict(calls)
            torch.batch_norm_stats = stats
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, backend, emulate, dtypes, tmp_path):
    """worker on `world` spawned processes (fresh: no CUDA state or patched torch from this one)."""
    mp.start_processes(worker, args=(world, free_port(), backend, emulate, dtypes, str(tmp_path / "out")),
                       nprocs=world, start_method="spawn")
    return [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(world)]


def check_paths_agree(ranks, dtypes, auto):
    """Per rank and dtype: fused == python (TOL), the path each mode took, and `auto`'s path."""
    # sync-BN statistics per bn_case: bn, head (forward), target and target_head (2 batches each)
    for res in ranks:
        for dtype in dtypes:
            (fused, f_calls), (python, p_calls) = res[str(dtype), "fused"], res[str(dtype), "python"]
            assert f_calls == {"fused": 6, "python": 0} and p_calls == {"fused": 0, "python": 6}
            assert res[str(dtype), "auto"][1] == (f_calls if auto == "fused" else p_calls)
            assert fused["y_channels_last"] == fused["x_channels_last"] == python["y_channels_last"]
            assert fused["head_n"] == python["head_n"] == 1
            for key, value in python.items():
                if isinstance(value, bool) or key == "head_n":
                    continue
                assert fused[key].dtype == value.dtype, key
                rtol, atol = (STAT_TOL if "_mean" in key or "_var" in key else TOL)[dtype]
                torch.testing.assert_close(fused[key].double(), value.double(), rtol=rtol, atol=atol,
                                           msg=lambda m, k=key, d=dtype: f"{k} ({d}): {m}")


def test_path_selection(monkeypatch):
    """CUDA tensors take the fused kernels unless SLIM_SYNC_BN=python; CPU tensors the Function (the
    module level: test_fused_path_equals_function_cpu's mode auto); a bad SLIM_SYNC_BN fails at import."""
    cuda_like = SimpleNamespace(device=torch.device("cuda", 1))
    assert slim._fused(cuda_like) and not slim._fused(torch.zeros(2, 3))
    monkeypatch.setattr(slim, "SYNC_BN_KERNELS", "python")
    assert not slim._fused(cuda_like)
    code = "import slim; print(slim.SYNC_BN_KERNELS)"
    env = {k: v for k, v in os.environ.items() if k != "SLIM_SYNC_BN"}
    for value, expect in ((None, "fused"), ("python", "python"), ("fast", None)):
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**env, **({"SLIM_SYNC_BN": value} if value else {})})
        if expect:
            assert p.returncode == 0 and p.stdout.strip() == expect, p.stderr[-2000:]
        else:
            assert p.returncode != 0 and "SLIM_SYNC_BN='fast'" in p.stderr


def test_fused_path_equals_function_cpu(tmp_path):
    """2 gloo processes, the fused path on the kernels' CPU stand-ins against the Function; mode auto
    (no stand-ins) takes the Function on a CPU."""
    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    check_paths_agree(run_ranks(2, "gloo", True, dtypes, tmp_path), dtypes, auto="python")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernels_cuda(tmp_path):
    """torch's CUDA kernels (NCCL over 2 GPUs where there are 2, else a group of one) against the Function;
    mode auto takes them on CUDA."""
    dtypes = (torch.float64, torch.float32, torch.bfloat16)
    world = min(2, torch.cuda.device_count())
    check_paths_agree(run_ranks(world, "nccl", False, dtypes, tmp_path), dtypes, auto="fused")
