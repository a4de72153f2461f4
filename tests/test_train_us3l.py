"""train_us3l.py: the width schedule, one step's gradients against the paper's loss written out, a
smoke run (shared: conftest.us3l_run) with its EMA momentum schedule, weight-decay partition and
kNN monitor cadence, clear errors for bad config and missing data (2 CPU processes:
tests/test_multiprocess.py; kill and resume: tests/test_faults.py)."""

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import config
import ffcv_data
import losses
import train_us3l
from config import ConfigError, parse_config
from models import (ARCHS, BasicBlock, ResNet, ViT, calibrate_bn, export, load_backbone, projection_mlp,
                    set_active)
from train_us3l import Config, check_config, forward_backward, pair_loss, sample_widths

REPO = Path(__file__).resolve().parents[1]


def test_width_schedule_dynamic_sampling():
    cfg = Config()  # width_min 0.25, 3 widths, dynamic sampling (US3L Sec. 3.2.2)
    total = 100
    for step in range(total):
        torch.manual_seed(step)  # the global RNG must not matter: same widths on every process
        widths = sample_widths(step, total, cfg)
        assert widths == sample_widths(step, total, cfg)
        if step < 25:
            assert widths == [1.0]  # stage 1: the base network only
            continue
        r_min = {1: 0.75, 2: 0.5, 3: 0.25}[step // 25]
        assert len(widths) == 3 and widths[0] == 1.0 and widths[-1] == pytest.approx(r_min)
        assert r_min <= widths[1] <= 1.0
    middles = [sample_widths(s, total, cfg)[1] for s in range(75, 100)]
    assert len(set(middles)) == len(middles)  # a fresh random width each step


def test_width_schedule_naive_sandwich():
    cfg = replace(Config(), dynamic_sampling=False, num_widths=4, width_min=0.25)
    for step in (0, 1, 50):
        widths = sample_widths(step, 100, cfg)
        assert len(widths) == 4 and widths[0] == 1.0 and widths[-1] == 0.25
        assert all(0.25 <= w <= 1.0 for w in widths) and widths == sorted(widths, reverse=True)


@pytest.mark.parametrize("dynamic", [False, True])
def test_width_schedule_without_sandwich(dynamic):
    # Table 9's "no sandwich rule": num_widths random widths, neither 1.0 nor R_min forced
    cfg = replace(Config(), sandwich=False, dynamic_sampling=dynamic)
    firsts, lasts = set(), set()
    for step in range(100):
        widths = sample_widths(step, 100, cfg)
        if dynamic and step < 25:
            assert widths == [1.0]  # dynamic sampling's first stage is unchanged
            continue
        r_min = {1: 0.75, 2: 0.5, 3: 0.25}[step // 25] if dynamic else 0.25
        assert len(widths) == 3 and widths == sorted(widths, reverse=True)
        assert all(r_min - 1e-9 <= w <= 1.0 for w in widths)
        firsts.add(widths[0])
        lasts.add(widths[-1])
    assert 1.0 not in firsts and 0.25 not in lasts and len(firsts) > 50


@pytest.mark.parametrize("over,message", [
    ({"infonce_negatives": "all"}, "config error: infonce_negatives='all', allowed: both_views, other_view"),
    ({"loss_views": "max"}, "config error: loss_views='max', allowed: mean, sum"),
    ({"temperature": 0.0}, "config error: temperature=0.0 must be > 0"),
    ({"num_widths": 1}, "config error: num_widths=1: the sandwich needs >= 2"),
    ({"num_widths": 0, "sandwich": False}, "config error: num_widths=0 must be >= 1"),
    ({"proj_layers": 4}, "config error: proj_layers=4, allowed: 2, 3"),
])
def test_loss_and_sampling_keys_are_checked(over, message):
    with pytest.raises(ConfigError, match=message):
        check_config(replace(Config(), **over))
    check_config(replace(Config(), num_widths=1, sandwich=False))  # one random width a step is a valid run


def test_pair_loss_forms():
    """Each InfoNCE form of the trainer against the losses it is made of: both_views with a teacher
    (eq. 2 with teacher keys), both_views without one (NT-Xent), other_view (MoCo), eq. (7), MSE; the
    two view directions averaged (loss_views=mean) or summed."""
    g = torch.Generator().manual_seed(0)
    z, k = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)  # (2B, D): cat(view 1, view 2)
    (z1, z2), (k1, k2) = z.chunk(2), k.chunk(2)
    cfg, T = Config(), Config().temperature
    assert (cfg.infonce_negatives, cfg.loss_views, T) == ("both_views", "mean", 0.5)
    expect = {
        ("infonce", True, "both_views"): losses.nt_xent(z1, z2, T),
        ("infonce", False, "both_views"): (losses.info_nce(z1, k2, T, k_same=k1)
                                           + losses.info_nce(z2, k1, T, k_same=k2)) / 2,
        ("infonce", False, "other_view"): (losses.info_nce(z1, k2, T) + losses.info_nce(z2, k1, T)) / 2,
        ("infonce", True, "other_view"): (losses.info_nce(z1, z2, T) + losses.info_nce(z2, z1, T)) / 2,
        ("nce", False, "both_views"): (losses.info_nce(z1, k2, T) + losses.info_nce(z2, k1, T)) / 2,  # eq. (7)
        ("mse", False, "both_views"): (losses.mse_distill(z1, k2) + losses.mse_distill(z2, k1)) / 2,
    }
    for (kind, own, negatives), want in expect.items():
        c = replace(cfg, infonce_negatives=negatives)
        got = pair_loss(kind, z, z if own else k, c, own)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(pair_loss(kind, z, z if own else k, replace(c, loss_views="sum"), own), 2 * want)
    # a network's own outputs: NT-Xent (both_views) is not the old stop-gradient form (other_view)
    zg = z.clone().requires_grad_()
    (g_nt,) = torch.autograd.grad(pair_loss("infonce", zg, zg, cfg, True), zg)
    (g_sg,) = torch.autograd.grad(pair_loss("infonce", zg, zg, replace(cfg, infonce_negatives="other_view"), True), zg)
    assert not torch.allclose(g_nt, g_sg, atol=1e-3)


def cos(a, b):  # row-wise cosine similarity of (B, D) tensors
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def eq2_with_teacher(q, k, T):
    """US3L eq. (2) with the teacher's keys, both view directions averaged: query i of view 1 has the
    positive k2_i and the 2B-2 negatives k2_j and k1_j, j != i (the mirror for view 2)."""
    (q1, q2), (k1, k2) = (q / q.norm(dim=1, keepdim=True)).chunk(2), (k / k.norm(dim=1, keepdim=True)).chunk(2)

    def direction(q, k_other, k_own):
        pos = torch.exp((q * k_other).sum(1) / T)
        neg = torch.exp(q @ k_other.T / T).sum(1) - pos + torch.exp(q @ k_own.T / T).sum(1) \
            - torch.exp((q * k_own).sum(1) / T)
        return -torch.log(pos / (pos + neg)).mean()

    return (direction(q1, k2, k1) + direction(q2, k1, k2)) / 2


def eq6(q, t):
    """US3L eq. (6) (and eq. (1), the MSE base loss) as 1 - cos to the target's OTHER view, both directions' mean."""
    (q1, q2), (t1, t2) = q.chunk(2), t.detach().chunk(2)
    return ((1 - cos(q1, t2)).mean() + (1 - cos(q2, t1)).mean()) / 2


@pytest.mark.parametrize("over,widths", [
    ({}, [1.0, 0.5, 0.25]),  # Table 7 case 13: InfoNCE base to the teacher, sub-networks via g (eq. 6)
    ({"momentum_target_sub": False}, [1.0, 0.5, 0.25]),  # sub-networks distill from the base network
    ({"sandwich": False, "momentum_target_sub": False}, [0.75, 0.5, 0.25]),  # Table 9: the largest drawn: base
    ({"base_loss": "mse"}, [1.0, 0.5, 0.25]),  # eq. (1): a predictor on the base network; g on the others
    ({"base_loss": "mse", "aux_head": False}, [1.0, 0.25]),  # no g: sub-networks distill through the predictor
], ids=["case13", "sub_from_base", "no_sandwich", "mse_base", "mse_base_no_aux"])
def test_step_gradients_equal_the_paper_loss(over, widths):
    """forward_backward's per-width backward passes give the gradients of ONE backward of the US3L loss
    written out here from the paper's definitions (as the trainer documents them): base loss on
    widths[0] (eq. 2 against the teacher's keys, or eq. 1 with a predictor), plus for every other width
    eq. (6) through the auxiliary head g (sub-networks only) to the teacher's keys (or, with
    momentum_target_sub=false, the base network's outputs) of the OTHER view. fp64, every parameter."""
    cfg = replace(Config(), precision="fp64", **over)
    torch.manual_seed(0)
    backbone = ResNet(BasicBlock, [1, 1], widths=(16, 32), stem="cifar")
    student = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 32, 16)})
    if cfg.base_loss == "mse":
        student["predictor"] = projection_mlp(16, 32, 16)
    if cfg.aux_head:
        student["aux"] = projection_mlp(16, 32, 16)
    student = student.double()
    teacher = copy.deepcopy(nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})).requires_grad_(False)
    with torch.no_grad():  # a teacher some EMA steps behind: its keys are not the student's outputs
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)  # two views of 8 images
    step_losses, _ = forward_backward(student, teacher, x, widths, cfg, contextlib.nullcontext)
    grads = {name: p.grad for name, p in student.named_parameters()}

    student.zero_grad(set_to_none=True)
    keys = teacher["projector"](teacher["backbone"](x))
    terms = []
    for i, w in enumerate(widths):
        set_active(student["backbone"], w)
        z = student["projector"](student["backbone"](x))
        if i == 0:
            base_z = z
            terms.append(eq6(student["predictor"](z), keys) if cfg.base_loss == "mse"
                         else eq2_with_teacher(z, keys, cfg.temperature))
        else:
            g = student["aux"] if cfg.aux_head else student["predictor"]
            terms.append(eq6(g(z), keys if cfg.momentum_target_sub else base_z))
    set_active(student["backbone"], 1.0)
    sum(terms).backward()  # one backward of the whole step's loss

    torch.testing.assert_close(step_losses, torch.stack(terms).detach())
    for name, p in student.named_parameters():
        assert (grads[name] is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, msg=name)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())  # every head is used


def tiny_args(data, out, **over):
    """Command-line arguments of a tiny run: ResNet-18's blocks at a quarter of its widths (0.7M
    parameters: what a run does does not depend on the network's size), 16 px crops, 8 steps of 16
    images, small heads and kNN subsets."""
    args = {"data_path": data, "out_dir": out, "arch": "resnet18_cifar_tiny", "image_size": 16, "batch_size": 16,
            "max_steps": 8, "log_every": 2, "knn_bank_subset": 100, "knn_test_subset": 50, "knn_batch_size": 50,
            "num_workers": 0, "proj_hidden": 64, "proj_dim": 32, "knn_k": 20}
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def run(cmd, **kw):
    """A script as a subprocess in the repository root. Its threads: the caller's OMP_NUM_THREADS (one
    per xdist worker: conftest.py), shared out between the 2 processes of an `accelerate launch --multi_gpu`."""
    env = dict(os.environ)
    if "--multi_gpu" in cmd:
        env["OMP_NUM_THREADS"] = str(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())) // 2))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, **kw.pop("env", {})},
                          timeout=600, **kw)


def cli(main, cls, argv, monkeypatch):
    """`python script.py ARGV` in this process (config.run, as the scripts' __main__): the exit code,
    which is a failed run's one-line message (or 1 after a traceback); None when it ran through."""
    monkeypatch.setattr(sys, "argv", ["script.py", *map(str, argv)])
    try:
        config.run(main, cls)
    except SystemExit as e:
        return e.code
    return None


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_smoke_run_and_backbone_export(us3l_run, capsys, fresh_accelerate):
    out = us3l_run.out
    res = json.loads((out / "results.json").read_text())
    for key in ("knn_top1", "knn_top1_init"):
        assert set(res[key]) == {"1.0", "0.25"} and all(0 <= a <= 1 for a in res[key].values())
    assert res["num_processes"] == 1
    assert set(res["collapse_std"]) == {"1.0", "0.25"} and all(0 < s < 1 for s in res["collapse_std"].values())
    log = read_log(out)
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert log[0]["widths"] == [1.0] and len(log[-1]["widths"]) == 3  # dynamic sampling
    assert all(r["loss/1.0"] > 0 for r in log) and "loss/min" in log[-1] and "collapse_std/1.000" in log[-1]
    assert (out / "config.yaml").is_file()
    # backbone.pt: load, slim, calibrate, export
    model, ckpt = load_backbone(out / "backbone.pt")
    assert ckpt["arch"] == "resnet18_cifar_tiny" and ckpt["widths"] == [1.0, 0.75, 0.5, 0.25]
    teacher, _ = load_backbone(out / "backbone.pt", teacher=True)
    x = torch.randn(8, 3, 16, 16)
    calibrate_bn(model, [x], width=0.25)
    net = export(model, width=0.25)
    assert net(x).shape == (8, 32)  # a quarter of the 128 features
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))
    # the same run again: it is finished, nothing is redone
    capsys.readouterr()
    train_us3l.main(us3l_run.cfg)
    assert "nothing to do" in capsys.readouterr().out


def test_ema_momentum_schedule(us3l_run):
    """The teacher's EMA momentum tau rises from `momentum` (0.99) at the first step towards 1 at the
    end of the run by half a cosine (BYOL): tau_k = 1 - (1 - 0.99) (cos(pi k / K) + 1) / 2 at step k of
    K; it is the tau of each step's update, and log.jsonl logs it."""
    K, tau0 = 8, us3l_run.cfg.momentum
    assert (tau0, us3l_run.cfg.momentum_cosine) == (0.99, True)
    want = [1 - (1 - tau0) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    assert us3l_run.taus == pytest.approx(want, rel=0, abs=1e-12)
    assert us3l_run.taus[0] == 0.99 and us3l_run.taus[K // 2] == pytest.approx(0.995)  # halfway: halfway to 1
    assert all(a < b < 1 for a, b in zip(us3l_run.taus, us3l_run.taus[1:]))
    assert [r["tau"] for r in read_log(us3l_run.out)] == [us3l_run.taus[s - 1] for s in (2, 4, 6, 8)]


def test_weight_decay_partition(us3l_run):
    """Weight decay, applied by hand (eqs. 4-5: group regularization on the backbone, plain L2 on the
    heads), reaches every weight (ndim > 1) of the backbone, projector and aux head, each step, and
    nothing else: no biases, no norm scales. The optimizer adds none of its own (that would decay twice)."""
    student, optimizer = us3l_run.state["student"], us3l_run.state["optimizer"]
    names = {p: name for name, p in student.named_parameters()}
    weights = {name for name, p in student.named_parameters() if p.ndim > 1}
    assert {name.split(".")[0] for name in weights} == {"backbone", "projector", "aux"}
    calls = us3l_run.decay
    assert len(calls) == 2 * 8  # two calls a step: the backbone's, the heads'
    for backbone_call, heads_call in zip(calls[::2], calls[1::2]):
        (bb, wd_bb, alpha_bb), (heads, wd_heads, alpha_heads) = backbone_call, heads_call
        assert wd_bb == wd_heads == us3l_run.cfg.weight_decay == 1e-4
        assert alpha_bb == us3l_run.cfg.group_reg_alpha == 0.05 and alpha_heads == 0.0  # eq. (5): backbone only
        assert {names[p] for p in bb} == {n for n in weights if n.startswith("backbone.")}
        assert {names[p] for p in heads} == {n for n in weights if not n.startswith("backbone.")}
    in_groups = [names[p] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(names.values())  # every parameter, once
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)


def test_eval_every_runs_the_knn_monitor_at_its_epochs(us3l_run):
    """eval_every=2 over 4 epochs of 2 steps: the kNN monitor runs on the random init, after epoch 2
    (step 4: results.json's knn_top1_history) and at the end (not again after epoch 4, which ends the
    run), and results.json holds what each one measured."""
    res = json.loads((us3l_run.out / "results.json").read_text())
    assert [step for step, _ in us3l_run.knn] == [0, 4, 8]
    (_, init), (_, mid), (_, end) = [(s, {str(w): round(a, 4) for w, a in acc.items()}) for s, acc in us3l_run.knn]
    assert res["knn_top1_init"] == init and res["knn_top1_history"] == {"4": mid} and res["knn_top1"] == end
    assert set(mid) == {"1.0", "0.25"}


def test_clear_errors(image_folder, tmp_path, monkeypatch, capsys, fresh_accelerate):
    # the command line itself: exit code 1 and one line, no traceback
    p = run([sys.executable, "train_us3l.py", "--epoch=3"])
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "config error: unknown key 'epoch' on the command line (did you mean 'epochs'?)"], p.stderr[-2000:]
    # the others in this process, as config.run ends them
    code = cli(train_us3l.main, Config, [f"--data_path={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"],
               monkeypatch)
    assert code and str(tmp_path / "nope") in f"{code}{capsys.readouterr().err}"
    code = cli(train_us3l.main, Config, tiny_args(image_folder, tmp_path / "o2", distill_loss="kl"), monkeypatch)
    assert code == "config error: distill_loss='kl', allowed: mse, infonce, none"
    code = cli(train_us3l.main, Config, tiny_args(image_folder, tmp_path / "o3", knn_widths="[1.0,0.01]"),
               monkeypatch)
    assert code == "config error: knn_widths=[1.0, 0.01]: each must be in [0.0625, 1]"
    assert "Traceback" not in capsys.readouterr().err


def test_device_and_ffcv_loaders(image_folder, tmp_path, fresh_accelerate, monkeypatch, capsys):
    """loader=device (the split on the device, batched augmentation) and loader=ffcv (a small .beton)
    train, log and finish like the torch path, from the same initial weights (the kNN of the random
    init is the same: the loaders are built before the seeded model); a missing .beton is a clear error.
    momentum_cosine=false: the EMA momentum stays at `momentum` (the authors' release)."""
    threads, beton = torch.get_num_threads(), tmp_path / "beton"
    ffcv_data.write_beton(image_folder, beton, splits=["train"], raw=True, num_workers=1)
    torch.set_num_threads(threads)  # importing ffcv set torch's threads to 1
    init = {}
    # FFCV's loader sets torch's threads to its num_workers: ours, so that nothing changes for later tests
    for kind, extra in (("device", {}), ("ffcv", {"ffcv_path": beton, "num_workers": threads})):
        out = tmp_path / kind
        args = tiny_args(image_folder, out, loader=kind, max_steps=4, momentum_cosine="false",
                         knn_widths="[1.0,0.5,0.25]", **extra)
        train_us3l.main(parse_config(Config, args))
        log = read_log(out)
        assert [r["step"] for r in log] == [2, 4] and all(r["loss/1.0"] > 0 and 0 <= r["data_wait"] < 1 for r in log)
        assert [r["tau"] for r in log] == [0.99, 0.99]
        results = json.loads((out / "results.json").read_text())
        assert set(results["knn_top1"]) == set(results["knn_top1_init"]) == {"1.0", "0.5", "0.25"}  # knn_widths
        init[kind] = results["knn_top1_init"]
    assert init["device"] == init["ffcv"]  # the ffcv run's monitor reads data_path with the torch loader
    assert torch.get_num_threads() == threads
    code = cli(train_us3l.main, Config, tiny_args(image_folder, tmp_path / "x", loader="ffcv",
                                                   ffcv_path=tmp_path / "none"), monkeypatch)
    assert code.startswith("error: loader=ffcv needs ffcv_path") and "train.beton" in code and "ffcv_data.py" in code
    assert "Traceback" not in capsys.readouterr().err  # one line (config.USER_ERRORS)


def test_mocov3_predictor_on_the_query_side():
    """predictor=true: the base network's InfoNCE is predictor(projector(backbone(x))) against the
    teacher's keys (projector output, no predictor); the predictor gets gradients, the frozen patch
    projection none."""
    torch.manual_seed(0)
    cfg = replace(Config(), predictor=True, proj_layers=3, infonce_negatives="other_view", temperature=0.2,
                  aux_head=False, precision="no")
    backbone = ViT(48, 1, 2, img_size=16, patch_size=4, pos_embed="sincos", frozen_patch_embed=True)
    student = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(48, 32, 16, last_bn=True, layers=3),
                             "predictor": projection_mlp(16, 32, 16)})
    teacher = copy.deepcopy(nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})).requires_grad_(False)
    x = torch.randn(8, 3, 16, 16)
    losses_, _ = forward_backward(student, teacher, x, [1.0], cfg, contextlib.nullcontext)
    with torch.no_grad():
        z = student["projector"](backbone(x))
        keys = teacher["projector"](teacher["backbone"](x))
        want = pair_loss("infonce", student["predictor"](z), keys, cfg)
        without = pair_loss("infonce", z, keys, cfg)
    torch.testing.assert_close(losses_[0], want)
    assert not torch.allclose(want, without)
    assert all(p.grad is not None for p in student["predictor"].parameters())
    assert backbone.patch_embed.weight.grad is None and backbone.blocks[0].fc1.weight.grad is not None


def test_vit_mocov3_recipe_trains(image_folder, tmp_path, monkeypatch, fresh_accelerate):
    """yaml/vit_tiny_cifar10.yaml's keys, 2 steps on a 1-block 64-d ViT (8 px patches at 32 px: the kNN monitor runs at 32 px): the frozen patch projection
    and the sin-cos buffer leave the run as they came (student and teacher), the rest trains."""
    monkeypatch.setitem(ARCHS, "vit_mocov3_test", functools.partial(
        ViT, 64, 1, 2, img_size=32, patch_size=8, pos_embed="sincos", frozen_patch_embed=True))
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "vit_tiny_cifar10.yaml")])
    assert (cfg.arch, cfg.proj_layers, cfg.proj_last_bn, cfg.predictor, cfg.optimizer) == (
        "vit_tiny_cifar_mocov3", 3, True, True, "adamw")
    tiny = {"data_path": str(image_folder), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8,
            "arch": "vit_mocov3_test", "precision": "no", "log_every": 1, "proj_hidden": 32, "proj_dim": 16,
            "knn_bank_subset": 20, "knn_test_subset": 10, "knn_batch_size": 20, "knn_k": 5, "num_workers": 0,
            "warmup_epochs": 0, "base_lr": 1e-2}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = train_us3l.main(replace(cfg, **tiny))
    finally:
        torch.set_num_threads(n)
    assert set(results["knn_top1"]) == {"1.0", "0.25"}
    torch.manual_seed(cfg.seed)
    init = ARCHS["vit_mocov3_test"]().state_dict()  # the run's initial weights (seeded the same way)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    # MoCo v3's heads: a BN without affine after the projector's and the predictor's last Linear
    assert "projector.7.running_var" in ckpt["student"] and "projector.7.weight" not in ckpt["student"]
    assert "predictor.4.running_var" in ckpt["student"] and "predictor.4.weight" not in ckpt["student"]
    assert "aux.4.running_var" in ckpt["student"] and "aux.4.weight" not in ckpt["student"]
    for net in (ckpt["student"], ckpt["teacher"]):
        for k in ("backbone.patch_embed.weight", "backbone.patch_embed.bias", "backbone.pos_embed"):
            assert torch.equal(net[k], init[k.removeprefix("backbone.")]), k
        assert not torch.equal(net["backbone.blocks.0.fc1.weight"], init["blocks.0.fc1.weight"])
    assert any(k.startswith("predictor.") for k in ckpt["student"])
    assert not any(k.startswith("predictor.") for k in ckpt["teacher"])
    assert "projector.7.running_mean" in ckpt["teacher"]  # the 3-layer projector's last BN
    model, _ = load_backbone(tmp_path / "backbone.pt")  # backbone.pt: loads, slims, exports
    assert not model.patch_embed.weight.requires_grad and torch.equal(model.pos_embed, init["pos_embed"])
    assert export(model, 0.25)(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_a_changed_config_does_not_resume_into_the_old_run(us3l_run, tmp_path, monkeypatch, fresh_accelerate):
    """Re-running a finished run's folder with another seed or max_steps is refused in one line naming the
    keys and the way out (a new out_dir, or allow_changed to continue on purpose); the folder's config.yaml
    is left as it was. Safe keys (log_every) and allow_changed resume."""
    out = tmp_path / "run"
    shutil.copytree(us3l_run.out, out)  # the shared run's folder stays as it is
    before = (out / "config.yaml").read_text()
    args = tiny_args(us3l_run.cfg.data_path, out, max_steps=8, train_subset=40, eval_every=2, tracker="tensorboard")
    msg = cli(train_us3l.main, Config, [*args, "--seed=1", "--max_steps=12"], monkeypatch)
    assert msg.startswith(f"config error: {out / 'checkpoints' / 'last.pt'} was written by a run with another config")
    assert "max_steps=8 there, 12 here" in msg and "seed=0 there, 1 here" in msg
    assert "new --out_dir" in msg and "--allow_changed=seed,max_steps" in msg and "\n" not in msg
    assert (out / "config.yaml").read_text() == before
    assert cli(train_us3l.main, Config, [*args, "--allow_changed=sed"], monkeypatch) == \
        "config error: allow_changed names keys this script does not have: sed"
    # a safe key: the finished run is found and left alone
    assert cli(train_us3l.main, Config, [*args, "--log_every=4"], monkeypatch) is None


def test_width_grid_rounds_the_random_widths():
    """width_grid=1/64: every random width a multiple of it in [R_min, 1]; 0: the draws as before, bit for bit."""
    cfg = replace(Config(), dynamic_sampling=False, num_widths=4)
    grid = replace(cfg, width_grid=1 / 64)
    for step in range(50):
        plain, gridded = sample_widths(step, 100, cfg), sample_widths(step, 100, grid)
        assert gridded[0] == 1.0 and gridded[-1] == plain[-1] == 0.25
        for w, v in zip(plain[1:-1], gridded[1:-1]):
            assert abs(v * 64 - round(v * 64)) < 1e-9 and 0.25 <= v <= 1.0 and abs(v - w) <= 1 / 128 + 1e-12
    assert len({w for s in range(200) for w in sample_widths(s, 400, grid)[1:-1]}) <= 49  # (1 - 0.25) * 64 + 1
    assert sample_widths(7, 100, replace(cfg, width_grid=0.0)) == sample_widths(7, 100, cfg)
