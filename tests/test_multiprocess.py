"""N processes of batch B/N train what one process of batch B trains: synchronized BN (slimmable,
heads, momentum-BN target), fp16 loss scaling whose skip decision is shared by every rank, resume on
another number of processes, and the trainers end to end (2 CPU processes of batch B/2 against 1
process of batch B). Everything here runs on resnet18_cifar_tiny (ResNet-18's depth at 1/4 of its
widths, 16 px images): no property tested here depends on the network's size.

NOTE: the end-to-end comparison runs in fp64 (precision=fp64). In fp32 the two runs part by far more
than the order of a sum would suggest, and so would any two fp32 implementations: at initialization
a ResNet-18's gradients are ill-conditioned (one process, fp32 against fp64, same code: 10% relative
error on some weight gradients, 1% on the stem's), and 3 steps at lr 0.0025 then leave 1-proc and
2-proc weights 4e-3 apart (moved 3e-2). In fp64 they agree to about 1e-12 (the tiny ResNet-18, 3
steps: 1-proc and 2-proc weights at most 5e-13 of how far they moved apart, both trainers)."""

import contextlib
import copy
import datetime
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import train_dspnet
import train_us3l
from models import ARCHS, calibrate_bn, projection_mlp, set_active, set_sync_bn
from slim import BatchNorm1d, SlimBatchNorm2d
from utils import OverlappedAllReduce, all_reduce_grads_, check_same_across_processes, optimizer_step_

REPO = Path(__file__).resolve().parents[1]
ARCH = "resnet18_cifar_tiny"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_env(procs=1):
    """OMP_NUM_THREADS for each of `procs` processes: this process's own count (1 under xdist, see
    conftest.py) shared among them, so that 2 processes do not oversubscribe the worker's core."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    return {"OMP_NUM_THREADS": str(max(1, threads // procs))}


def _worker(rank, port, fn, out):
    torch.set_num_threads(1)  # also keeps the forked child out of the parent's OpenMP pool (not fork-safe)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def two_ranks(fn, tmp_path):
    """fn(rank) in 2 gloo processes (forked: no re-import of torch); returns [result of rank 0, 1]."""
    mp.start_processes(_worker, args=(free_port(), fn, str(tmp_path / "out")), nprocs=2, start_method="fork")
    return [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]


def bn_case(rank=None):
    """A BN input batch of 8 (4 per rank), sliced to 40 of 64 channels as at a width < 1, channels_last;
    outputs and gradients of the slimmable BN, a head BN and a momentum-BN target (encoder and projector BN)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 40, 5, 5, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last)
    h = torch.randn(8, 16, generator=g) * 2 - 1
    dy, dh = torch.randn(8, 40, 5, 5, generator=g), torch.randn(8, 16, generator=g)
    rows = slice(None) if rank is None else slice(4 * rank, 4 * rank + 4)
    bn, head, target, target_head = SlimBatchNorm2d(64), BatchNorm1d(16), SlimBatchNorm2d(64), BatchNorm1d(16)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    target.stats_momentum = target_head.stats_momentum = 0.3
    for m in (bn, head, target, target_head):
        set_sync_bn(m, True)
    x, h = x[rows].clone().requires_grad_(), h[rows].clone().requires_grad_()
    y, z = bn(x), head(h)
    (y * dy[rows]).sum().backward()
    (z * dh[rows]).sum().backward()
    for batch, hb in ((x.detach(), h.detach()), (x.detach() * 2 + 1, h.detach() * 3 - 1)):
        t, th = target(batch), target_head(hb)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "z": z.detach(), "dh": h.grad,
            "head_dw": head.weight.grad, "head_mean": head.running_mean, "head_var": head.running_var,
            "t": t, "t_mean": target.running_mean, "t_var": target.running_var,
            "th": th, "th_mean": target_head.running_mean, "th_var": target_head.running_var}


def test_sync_bn_equals_one_process_of_the_whole_batch(tmp_path):
    ref = bn_case()  # one process: sync is a no-op, plain batch norm over the 8 rows
    ranks = two_ranks(bn_case, tmp_path)
    for key in ("y", "dx", "z", "dh", "t", "th"):  # per-row tensors: each rank holds its 4 rows
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), ref[key], rtol=1e-4, atol=1e-5)
    for key in ("dw", "db", "head_dw"):  # parameter gradients: summed over ranks by the all-reduce
        torch.testing.assert_close(ranks[0][key] + ranks[1][key], ref[key], rtol=1e-4, atol=1e-5)
    for key in ("head_mean", "head_var", "t_mean", "t_var", "th_mean", "th_var"):  # running statistics: the global batch's
        for r in ranks:
            torch.testing.assert_close(r[key], ref[key], rtol=1e-5, atol=1e-6)
    for key in ("t_mean", "th_mean"):  # bit-equal targets on every rank
        assert torch.equal(ranks[0][key], ranks[1][key])


def us3l_step_grads(rank=None, sync=True, **over):
    """The gradients of one US3L step (base network + 2 sub-networks, aux head, InfoNCE keys gathered
    from every rank, gradients all-reduced) in fp64, on 16 images or on rank's 8 of them. over: Config
    keys (Table 7 case 9: SimCLR's NT-Xent for every width, gradients through both views' outputs
    gathered from every rank)."""
    torch.manual_seed(0)
    backbone = ARCHS[ARCH]()
    student = torch.nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 64, 32),
                                   "aux": projection_mlp(32, 64, 32)}).double()
    set_sync_bn(student, sync)
    teacher = copy.deepcopy(torch.nn.ModuleDict({k: student[k] for k in ("backbone", "projector")}))
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(16, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    rows = slice(None) if rank is None else slice(8 * rank, 8 * rank + 8)
    cfg = train_us3l.Config(proj_hidden=64, proj_dim=32, **over)
    train_us3l.forward_backward(student, teacher, torch.cat([x1[rows], x2[rows]]), [1.0, 0.8, 0.5], cfg,
                                contextlib.nullcontext)
    all_reduce_grads_(list(student.parameters()), 1 if rank is None else 2)
    return {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


CASE9 = {"distill_loss": "none", "aux_head": False, "momentum_target_base": False, "momentum_target_sub": False}


@pytest.mark.parametrize("over", [{}, CASE9], ids=["case13", "case9_nt_xent"])
def test_step_gradients_of_two_processes_are_one_processs(over, tmp_path):
    ref = us3l_step_grads(**over)

    def worst(ranks):
        return max((r[n] - ref[n]).abs().max().item() / ref[n].abs().max().item() for r in ranks for n in ref)

    assert worst(two_ranks(functools.partial(us3l_step_grads, **over), tmp_path)) < 1e-9  # fp64: order of sums
    if not over:
        assert worst(two_ranks(functools.partial(us3l_step_grads, sync=False), tmp_path)) > 1e-2  # per-process BN


def rank_batches(rank):
    """Rank's own calibration batches, 1 on rank 0 and 3 on rank 1: unequal counts, so a collective
    per forward (a sync BN left on) would hang or mismatch."""
    return [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(10 * rank + k))
            for k in range(1 + 2 * rank)]


def calibrated(batches, all_reduce=False):
    """The BN statistics of a seeded sync-BN network's width-0.5 sub-network after calibrate_bn on
    `batches`, and its BNs' sync switches afterwards."""
    torch.manual_seed(0)
    model = set_sync_bn(ARCHS[ARCH](), True)
    calibrate_bn(model, batches, width=0.5, all_reduce=all_reduce)
    set_active(model, 1.0)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, SlimBatchNorm2d)}
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    return stats, [m.sync for m in bns.values()]


def test_calibration_stays_per_process(tmp_path):
    """calibrate_bn forwards each rank's own batches with per-process BN (sync or not: models._local_bn).
    all_reduce=False: each rank holds the statistics of its own images, those of one process calibrating
    on them; all_reduce=True: the per-process moments are pooled, those of one process calibrating on
    every rank's batches (each normalized on its own, not with the other rank's)."""
    ranks = two_ranks(lambda rank: {a: calibrated(rank_batches(rank), a) for a in (False, True)}, tmp_path)
    pooled, _ = calibrated(rank_batches(0) + rank_batches(1))
    for rank, out in enumerate(ranks):
        own, _ = calibrated(rank_batches(rank))
        for all_reduce, expected in ((False, own), (True, pooled)):
            stats, syncs = out[all_reduce]
            assert all(syncs)  # the switch is restored afterwards
            for name, (mean, var) in expected.items():  # the tolerance: thread counts may differ from here
                torch.testing.assert_close(stats[name][0], mean, rtol=1e-5, atol=1e-6, msg=f"{rank} {name} mean")
                torch.testing.assert_close(stats[name][1], var, rtol=1e-5, atol=1e-6, msg=f"{rank} {name} var")


def fp16_steps(rank, overlap=False):
    """Two steps of the trainers' step end with a GradScaler: rank 1's gradients overflow in the
    first (an inf in its input), the second is clean. overlap: all-reduced during the backward."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sync = OverlappedAllReduce(list(model.parameters()), 2, bucket_mb=0) if overlap else None  # a bucket each
    out = []
    for step in range(2):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step)) + rank
        if step == 0 and rank == 1:
            x[0, 0] = float("inf")
        loss = model(x).square().mean()
        if sync is not None:
            sync.arm(loss)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer_step_(opt, scaler, list(model.parameters()), 2, overlap=sync)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        out.append({"changed": changed, "scale": scaler.get_scale(), "w": model.weight.detach().clone()})
    return out


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlapped"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(overlap, tmp_path):
    ranks = two_ranks(functools.partial(fp16_steps, overlap=overlap), tmp_path)
    for steps in ranks:
        assert steps[0]["changed"] is False and steps[0]["scale"] == 512.0  # skipped, scale halved
        assert steps[1]["changed"] is True and steps[1]["scale"] == 512.0  # then a normal step
    assert torch.equal(ranks[0][1]["w"], ranks[1][1]["w"])  # and the ranks still agree


def divergence_checks(rank):
    """check_same_across_processes with a real Accelerator on the group of two_ranks, for a small
    network alike on both ranks except for one float of rank 1 (one ulp of a weight, or of a BN
    running mean) and nothing: {(what, buffers): the error raised, or None}."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    AcceleratorState._reset_state(reset_partial_state=True)  # a forked copy of the parent's 1-process state
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    out = {}
    for what in ("weight", "running_mean", None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        model[1].running_mean.normal_()  # statistics as after training (one ulp of a zero would be a denormal)
        if rank == 1 and what is not None:
            t = getattr(model[0 if what == "weight" else 1], what).data.view(-1)
            t[1] = torch.nextafter(t[1], torch.tensor(float("inf")))
        for buffers in (True, False):
            try:
                check_same_across_processes(model, accelerator, buffers=buffers)
                out[what, buffers] = None
            except RuntimeError as e:
                out[what, buffers] = str(e)
    return out


def test_a_rank_that_diverged_is_caught_on_every_rank(tmp_path):
    said = "parameters or BN statistics differ across processes at the end of training"
    for out in two_ranks(divergence_checks, tmp_path):
        assert out["weight", True] == out["weight", False] == f"{said}: 0.weight"  # one ulp of one weight, named
        assert out["running_mean", True] == f"{said}: 1.running_mean"  # BN statistics are compared too ...
        assert out["running_mean", False] is None  # ... unless per-process BN leaves them differing
        assert out[None, True] is out[None, False] is None


def overlap_case(rank, trainer):
    """Two steps' gradients of a trainer's per-width (US3L) or per-DN (DSPNet) backward passes on
    rank's 8 images, fp64, all-reduced blocking, then the same steps overlapped with the last backward
    (0.25 MB buckets: 17 for the tiny ResNet-18's 5.5 MB of fp64), with how many buckets were out before
    finish(). The steps: US3L 3 widths, then the full width alone (the aux head has no gradient); DSPNet
    the whole network then a shallower DN (whose backward skips blocks), then the whole network alone."""
    torch.manual_seed(0)
    backbone = ARCHS[ARCH]()
    head = "aux" if trainer == "us3l" else "predictor"
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 64, 32),
                                 head: projection_mlp(32, 64, 32)}).double()
    set_sync_bn(model, True)
    teacher = copy.deepcopy(torch.nn.ModuleDict({k: model[k] for k in ("backbone", "projector")}))
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1 + rank), dtype=torch.float64)
    params = list(model.parameters())
    full, shallow = {"width": 1.0, "depth": None}, {"width": 0.5, "depth": [1, 1, 1, 1]}
    out = {}
    for sync in (None, OverlappedAllReduce(params, 2, bucket_mb=0.25)):
        arm = None if sync is None else sync.arm
        for k, nets in enumerate([[1.0, 0.8, 0.5], [1.0]] if trainer == "us3l" else [[full, shallow], [full]]):
            if trainer == "us3l":
                train_us3l.forward_backward(model, teacher, x, nets, train_us3l.Config(proj_hidden=64, proj_dim=32),
                                            contextlib.nullcontext, before_last=arm)
            else:
                train_dspnet.train_step(model, teacher, x, nets, contextlib.nullcontext, before_last=arm)
            early = None if sync is None else len(sync.sent)
            if sync is None:
                all_reduce_grads_(params, 2)
            else:
                sync.finish()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            out[sync is not None, k] = grads, early, None if sync is None else len(sync.buckets)
            model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("trainer", ["us3l", "dspnet"])
def test_overlapped_all_reduce_equals_the_blocking_one(trainer, tmp_path):
    for out in two_ranks(functools.partial(overlap_case, trainer=trainer), tmp_path):
        for k in range(2):
            (blocking, _, _), (overlapped, early, buckets) = out[False, k], out[True, k]
            assert blocking.keys() == overlapped.keys() and buckets > 5  # many buckets, each sent on its own
            for name in blocking:
                assert torch.equal(overlapped[name], blocking[name]), name  # the same sums: bit for bit
            assert early == buckets  # every bucket was out before finish(), unreached parameters included


# ------------------------------------------------------------------------------------------------
# The trainers: 2 processes of batch B/2 against 1 process of batch B


def launch(script, args, out, procs, env=None):
    cmd = [sys.executable, script, *args, f"--out_dir={out}"]
    if procs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--main_process_port", str(free_port()), *cmd[1:]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", **thread_env(procs), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def tiny(data, **over):
    args = {"data_path": data, "arch": ARCH, "image_size": 16, "max_steps": 3, "log_every": 1, "precision": "fp64",
            "loader": "torch", "base_lr": 1.0, "sync_bn": "true", "num_workers": 0, "knn_bank_subset": 40,
            "knn_test_subset": 20, "knn_batch_size": 20, "knn_k": 5, "proj_hidden": 64, "proj_dim": 32}
    return [f"--{k}={v}" for k, v in {**args, **over}.items()]


@pytest.mark.parametrize("script,extra", [
    ("train_us3l.py", {}),
    # DSPNet: DNs of width and depth, the whole network alone for the first step, a momentum-BN target
    ("train_dspnet.py", {"dns": "[[1.0],[0.75],[0.5,1,1,1,1],[0.25]]", "num_subnets": 3,
                         "full_only_epochs": 1, "warmup_epochs": 0, "epochs": 3, "optimizer": "sgd",
                         "momentum_bn": "true"}),
])
def test_two_processes_of_half_the_batch_train_what_one_process_trains(script, extra, image_folder, tmp_path):
    one = launch(script, tiny(image_folder, batch_size=16, **extra), tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(script, tiny(image_folder, batch_size=8, **extra), tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    a = torch.load(tmp_path / "one" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "backbone.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    torch.manual_seed(0)  # the trainers' initial weights
    init = ARCHS[ARCH]().state_dict()
    for key in ("backbone", "teacher"):  # weights and BN statistics
        assert a[key].keys() == b[key].keys() == init.keys()
        floats = [k for k in init if init[k].is_floating_point()]
        moved = max((a[key][k] - init[k]).abs().max().item() for k in floats)
        apart = max((a[key][k] - b[key][k]).abs().max().item() for k in floats)
        # measured (tiny arch, fp64): apart/moved <= 5e-13 for both trainers; gradients all-reduced in
        # fp32 (a bug the former atol=1e-4 let through) put them 7e-8 apart
        assert moved > 1e-3 and apart <= 1e-9 * moved, (key, apart, moved)
        for k in init.keys() - floats:  # BN batch counters
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_resume_across_a_changed_world_with_fp16(image_folder, tmp_path):
    """Same global batch on another number of processes resumes; another global batch is refused in
    one line naming the keys. fp16 throughout: the GradScaler's state is checkpointed and taken over
    (on a CPU autocast stays fp32, as Accelerate enables fp16 autocast on GPUs only; the scaling runs)."""
    out = tmp_path / "run"
    p = launch("train_us3l.py", tiny(image_folder, batch_size=16, max_steps=2, epochs=1, precision="fp16"), out, 1)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["num_processes"] == 1 and ckpt["step"] == 2
    assert ckpt["scaler"]["scale"] == 65536.0  # no overflow in 2 steps: the initial scale
    ckpt["scaler"]["scale"] = 1024.0  # as after overflowing steps: the resumed run must take it over
    torch.save(ckpt, out / "checkpoints" / "last.pt")
    p = launch("train_us3l.py", tiny(image_folder, batch_size=16, max_steps=3, epochs=1, precision="fp16",
                                     allow_changed="max_steps"), out, 2)  # a longer run on purpose
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("config error")]
    assert errors, p.stderr[-3000:]
    assert "global batch of 16" in errors[0] and "batch_size=16 x num_processes=2" in errors[0]
    assert "batch_size=8 on 2 processes" in errors[0]
    p = launch("train_us3l.py", tiny(image_folder, batch_size=8, max_steps=3, epochs=1, precision="fp16",
                                     allow_changed="max_steps"), out, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "resuming a run of 1 process(es) on 2" in p.stdout
    assert json.loads((out / "results.json").read_text())["num_processes"] == 2
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["num_processes"] == 2 and ckpt["step"] == 3 and ckpt["scaler"]["scale"] == 1024.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss/1.0"] > 0 for r in log)
