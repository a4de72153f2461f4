"""utils.py training helpers: schedules, LARS, param_groups, EMA, atomic checkpoints, resume,
log_jsonl, check_finite. CPU, a few seconds; the checkpoint tests use a real accelerate.Accelerator(cpu=True).
(check_same_across_processes: tests/test_multiprocess.py, which has the 2-process helpers.)"""

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from config import ConfigError
from tests.test_multiprocess import free_port, thread_env
from utils import (LARS, atomic_save, check_finite, cosine, cpus_per_rank, ema_update_, load_resume, log_jsonl,
                   param_groups, warmup_cosine)

REPO = Path(__file__).resolve().parents[1]


# --- schedules -------------------------------------------------------------------------------------

def test_warmup_cosine_endpoints_and_monotonicity():
    total, warmup, peak, end = 100, 10, 0.4, 0.01
    lrs = [warmup_cosine(s, total, warmup, peak, end) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(peak / 2)
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[total] == pytest.approx(end)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # rising during warm-up
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then falling
    assert warmup_cosine(total + 50, total, warmup, peak, end) == pytest.approx(end)  # clamped
    assert warmup_cosine(50, 100, 0, 1.0) == pytest.approx(0.5)  # no warm-up: plain cosine


def test_cosine_clamps():
    assert cosine(0, 10, 1.0, 0.0) == 1.0
    assert cosine(-3, 10, 1.0, 0.0) == 1.0
    assert cosine(10, 10, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(25, 10, 1.0, 0.0) == pytest.approx(0.0)


def test_tau_schedule_byol():
    K, base = 1000, 0.996
    taus = [cosine(k, K, base, 1.0) for k in range(K + 1)]
    assert taus[0] == pytest.approx(0.996) and taus[K] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(taus, taus[1:]))
    k = 337  # BYOL: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2
    assert taus[k] == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2)


# --- optimizer -------------------------------------------------------------------------------------

def test_param_groups_split_by_ndim():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    for source in (model.parameters(), model.named_parameters()):
        decay, no_decay = param_groups(source, weight_decay=1e-4)
        assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
        assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight),
                                                         id(model[1].bias), id(model[3].bias)}
        assert (decay["weight_decay"], decay["lars"]) == (1e-4, True)
        assert (no_decay["weight_decay"], no_decay["lars"]) == (0.0, False)
    torch.optim.SGD(param_groups(model.parameters(), 1e-4), lr=0.1, momentum=0.9)  # SGD accepts them
    assert len(param_groups(nn.Linear(2, 2, bias=False).parameters(), 0.1)) == 1  # no empty group


def test_lars_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([[1.0, 2.0], [2.0, 0.0]]))  # ||w|| = 3
    b = nn.Parameter(torch.tensor([0.5, -1.0]))
    lr, m, wd, eta = 0.1, 0.9, 0.5, 0.001
    opt = LARS(param_groups([w, b], wd), lr=lr, momentum=m, eta=eta)
    g1 = (torch.tensor([[0.5, -1.0], [-1.0, 1.0]]), torch.tensor([1.0, 2.0]))
    g2 = (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([-1.0, 0.5]))

    w.grad, b.grad = g1
    opt.step()
    d1 = g1[0] + wd * torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # [[1, 0], [0, 1]], norm sqrt(2)
    d1 = d1 * eta * 3.0 / math.sqrt(2.0)
    w1 = torch.tensor([[1.0, 2.0], [2.0, 0.0]]) - lr * d1
    b1 = torch.tensor([0.5, -1.0]) - lr * g1[1]  # bias: plain SGD, no decay, no trust ratio
    torch.testing.assert_close(w.detach(), w1)
    torch.testing.assert_close(b.detach(), b1)

    w.grad, b.grad = g2
    opt.step()
    d2 = g2[0] + wd * w1
    d2 = d2 * eta * w1.norm() / d2.norm()
    torch.testing.assert_close(w.detach(), w1 - lr * (m * d1 + d2))
    torch.testing.assert_close(b.detach(), b1 - lr * (m * g1[1] + g2[1]))


def test_lars_zero_weight_gets_no_trust_ratio():
    w = nn.Parameter(torch.zeros(2, 2))  # ||p|| = 0: the update is the raw gradient
    opt = LARS(param_groups([w], 0.1), lr=1.0, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.ones(2, 2))


def test_ema_update():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student(torch.randn(8, 3))  # train-mode forward: the student's BN running stats move
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, tau=0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t.detach(), 0.9 * t0 + 0.1 * s.detach())
    for t, s in zip(teacher.buffers(), student.buffers()):
        assert torch.equal(t, s)
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.9)


# --- checkpoints -----------------------------------------------------------------------------------

class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_atomic_save(tmp_path):
    path = tmp_path / "backbone.pt"
    atomic_save({"w": torch.arange(3)}, path)
    assert os.listdir(tmp_path) == ["backbone.pt"]
    with pytest.raises((RuntimeError, pickle.PicklingError)):
        atomic_save({"w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["backbone.pt"]  # no temp file left behind
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


@pytest.fixture(scope="module")
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # later tests may want another precision


@dataclasses.dataclass
class RunConfig:  # the keys of a trainer's Config that load_resume reads
    out_dir: str = "out"
    arch: str = "resnet18_cifar"
    batch_size: int = 16
    resume: str = "auto"


def trained(seed):
    """A model and its SGD optimizer after one step (momentum buffers exist): distinct per seed."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def write_checkpoint(path, seed, step, cfg):
    """A checkpoint as the trainers write it; returns the model saved in it."""
    model, opt = trained(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"student": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "num_processes": 1,
                 "config": dataclasses.asdict(cfg)}, path)
    return model


def test_resume_none_auto_and_a_path(accelerator, tmp_path, capsys):
    """resume=none starts over even with a checkpoint in out_dir; auto resumes from it; PATH resumes
    from that file (another run's: its out_dir differs, which is no config change)."""
    cfg = RunConfig(out_dir=str(tmp_path / "run"))
    last, other = tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "other" / "checkpoints" / "last.pt"
    saved = {last: write_checkpoint(last, 1, 5, cfg),
             other: write_checkpoint(other, 2, 7, dataclasses.replace(cfg, out_dir=str(tmp_path / "other")))}
    for resume, step, source in (("none", 0, None), ("auto", 5, last), (str(other), 7, other)):
        model, opt = trained(0)
        fresh = [p.detach().clone() for p in model.parameters()]
        mu = opt.state_dict()["state"][0]["momentum_buffer"].clone()
        assert load_resume(dataclasses.replace(cfg, resume=resume), last, {"student": model, "optimizer": opt},
                           accelerator) == step, resume
        want = fresh if source is None else list(saved[source].parameters())
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want)), resume
        assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], mu) == (source is None), resume
        said = capsys.readouterr().out
        assert (f"resumed from {source} at step {step}" in said if source else "resumed" not in said), said


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_truncated_checkpoint_is_one_line_naming_it(keep, accelerator, tmp_path):
    """A last.pt cut short (a copy gone wrong, a full disk): resume=auto neither starts over nor
    shows a traceback, but stops with one line naming the file."""
    cfg = RunConfig(out_dir=str(tmp_path))
    last = tmp_path / "checkpoints" / "last.pt"
    write_checkpoint(last, 1, 5, cfg)
    whole = last.read_bytes()
    last.write_bytes(whole[:int(len(whole) * keep)])
    model, opt = trained(0)
    fresh = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError) as e:
        load_resume(cfg, last, {"student": model, "optimizer": opt}, accelerator)
    message = str(e.value)
    assert message.startswith("config error: ") and "\n" not in message
    assert f"cannot resume from {last} (" in message and "--resume=none" in message, message  # and what to do
    assert all(torch.equal(p, f) for p, f in zip(model.parameters(), fresh))


def test_check_finite(accelerator):
    losses = {"w1.0": torch.tensor(1.5), "w0.25": torch.tensor(2.0, dtype=torch.bfloat16)}
    assert check_finite(losses, 3, accelerator) == {"w1.0": 1.5, "w0.25": 2.0}
    losses["w0.5"] = torch.tensor(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 17: w1\.0=1\.5, w0\.25=2, w0\.5=nan"):
        check_finite(losses, 17, accelerator)
    with pytest.raises(FloatingPointError, match="step 18"):
        check_finite({"base": torch.tensor(float("inf"))}, 18, accelerator)


def test_log_jsonl(tmp_path):
    path = tmp_path / "log.jsonl"
    log_jsonl(path, {"step": 1, "loss": torch.tensor(0.5), "std": np.float32(0.25), "lr": 0.1})
    log_jsonl(path, {"step": 2, "per_width": torch.tensor([1.0, 2.0]), "n": np.int64(3), "w": np.ones(2)})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 0.5, "std": 0.25, "lr": 0.1},
        {"step": 2, "per_width": [1.0, 2.0], "n": 3, "w": [1.0, 1.0]}]


# --- two processes ---------------------------------------------------------------------------------

TWO_PROC = textwrap.dedent("""
    import dataclasses, torch
    from accelerate import Accelerator
    from torch import nn
    from config import run
    from utils import LARS, check_finite, param_groups

    @dataclasses.dataclass
    class Config:
        step: int = 9

    def main(cfg):
        acc = Accelerator(cpu=True)
        assert acc.num_processes == 2, acc.num_processes
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        model, opt = acc.prepare(model, LARS(param_groups(model.parameters(), 0.1), lr=0.1))
        loss = torch.tensor(float("nan") if acc.process_index == 1 else 1.0)  # only rank 1 diverges
        print(f"rank {acc.process_index} logs {check_finite({'w1.0': torch.tensor(1.0)}, 1, acc)}", flush=True)
        check_finite({"w1.0": loss}, cfg.step, acc)

    run(main, Config)  # raises on both ranks; the process group is torn down before exit
""")


def test_two_processes_check_finite(tmp_path):
    script = tmp_path / "two_proc.py"
    script.write_text(TWO_PROC)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), **thread_env(2)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the error, on both ranks, not a signal (-6 = abort: exit code < 0)
    assert "terminate called" not in out and "SIGABRT" not in out, out
    for rank in (0, 1):
        assert f"rank {rank} logs {{'w1.0': 1.0}}" in proc.stdout
    assert out.count("FloatingPointError: non-finite loss at step 9: w1.0=nan (means over processes)") == 2, out


def test_lars_foreach_equals_the_per_parameter_rule():
    """The fused step equals the rule applied parameter by parameter (the LARS docstring), with a
    parameter without a gradient left alone and its momentum not created."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in ((4, 3), (5,), (2, 2, 3), (6, 2))]
    ref = [p.detach().clone() for p in params]
    mu = [torch.zeros_like(p) for p in params]
    opt = LARS(param_groups(params, 0.01), lr=0.5, momentum=0.9, eta=0.02)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        params[3].grad = None
        opt.step()
        for i, (r, g) in enumerate(zip(ref, grads)):
            if i == 3:
                continue
            d = g + 0.01 * r if r.ndim > 1 else g
            if r.ndim > 1:
                d = d * 0.02 * r.norm() / d.norm()
            mu[i] = 0.9 * mu[i] + d
            ref[i] = r - 0.5 * mu[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r)
    assert "mu" not in opt.state[params[3]]


def test_background_saver_writes_the_state_of_the_save_call(tmp_path):
    from utils import BackgroundSaver
    w = torch.ones(3)
    saver = BackgroundSaver()
    saver.save({"w": w, "step": 1, "nested": [w]}, tmp_path / "ckpt.pt")
    w.add_(1.0)  # training goes on while the thread writes: the file holds the snapshot
    saver.wait()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert torch.equal(ckpt["w"], torch.ones(3)) and torch.equal(ckpt["nested"][0], torch.ones(3)) and ckpt["step"] == 1
    saver.save({"w": w}, tmp_path / "missing_folder" / "ckpt.pt")  # the write fails in the thread ...
    with pytest.raises(FileNotFoundError):
        saver.wait()  # ... and the error reaches the training loop
    saver.wait()  # once


def test_bf16_refused_below_compute_capability_8(monkeypatch):
    """A V100/T4 (compute capability 7.x) with precision=bf16: one line pointing to fp16; an A100/H100 passes."""
    from config import ConfigError
    from utils import check_precision

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    with pytest.raises(ConfigError, match=r"precision=bf16 on Tesla V100-SXM2-32GB \(compute capability 7.0\) "
                                          r"is emulated and slow: use precision=fp16"):
        check_precision("bf16", torch.device("cuda", 0))
    check_precision("fp16", torch.device("cuda", 0))
    check_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_precision("bf16", torch.device("cuda", 0))


def test_cpus_per_rank(monkeypatch):
    """The CPUs this process may run on, shared by the processes of its node; at least 1; the machine's
    count where there is no affinity API."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpus_per_rank() == 64  # one process: every CPU it may use
    for local, want in (("8", 8), ("3", 21), ("", 64), ("128", 1)):  # torchrun / accelerate launch set it
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert cpus_per_rank() == want, local
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5, 7}, raising=False)  # taskset, a cgroup
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpus_per_rank() == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 10)
    assert cpus_per_rank() == 5
