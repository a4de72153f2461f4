"""train_us3l.py: the width schedule, a smoke run (2 CPU processes: tests/test_multiprocess.py),
clear errors for bad config and missing data (kill and resume: tests/test_faults.py)."""

import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import losses
import train_us3l
from config import ConfigError, parse_config
from models import ARCHS, ViT, calibrate_bn, export, load_backbone, projection_mlp
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


def tiny_args(data, out, **over):
    args = {"data_path": data, "out_dir": out, "batch_size": 16, "max_steps": 8, "log_every": 2,
            "knn_bank_subset": 100, "knn_test_subset": 50, "knn_batch_size": 50, "num_workers": 0,
            "proj_hidden": 64, "proj_dim": 32, "knn_k": 20}
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1" if "--multi_gpu" in cmd else os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, **kw.pop("env", {})},
                          timeout=600, **kw)


def test_smoke_run_and_backbone_export(cifar_small, tmp_path):
    out = tmp_path / "run"
    p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, out)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for key in ("knn_top1", "knn_top1_init"):
        assert set(res[key]) == {"1.0", "0.25"} and all(0 <= a <= 1 for a in res[key].values())
    assert res["num_processes"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert log[0]["widths"] == [1.0] and len(log[-1]["widths"]) == 3  # dynamic sampling
    assert all(r["loss/1.0"] > 0 for r in log) and "loss/min" in log[-1] and "collapse_std/1.000" in log[-1]
    assert (out / "config.yaml").is_file()
    # backbone.pt: load, slim, calibrate, export
    model, ckpt = load_backbone(out / "backbone.pt")
    assert ckpt["arch"] == "resnet18_cifar" and ckpt["widths"] == [1.0, 0.75, 0.5, 0.25]
    teacher, _ = load_backbone(out / "backbone.pt", teacher=True)
    x = torch.randn(8, 3, 32, 32)
    calibrate_bn(model, [x], width=0.25)
    net = export(model, width=0.25)
    assert net(x).shape == (8, 128)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))
    # the same command again: the run is finished, nothing is redone
    p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, out)])
    assert p.returncode == 0 and "nothing to do" in p.stdout


def test_clear_errors(cifar_small, tmp_path):
    p = run([sys.executable, "train_us3l.py", "--epoch=3"])
    assert p.returncode != 0 and "epoch" in p.stderr and "epochs" in p.stderr
    p = run([sys.executable, "train_us3l.py", f"--data_path={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"])
    assert p.returncode != 0 and str(tmp_path / "nope") in p.stderr
    p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, tmp_path / "o2", distill_loss="kl")])
    assert p.returncode != 0 and "distill_loss" in p.stderr and "infonce" in p.stderr
    p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, tmp_path / "o3", knn_widths="[1.0,0.01]")])
    assert p.returncode != 0 and "knn_widths=[1.0, 0.01]" in p.stderr


def test_device_and_ffcv_loaders(cifar_small, tmp_path):
    """loader=device (the split on the device, batched augmentation) and loader=ffcv (a small .beton)
    train, log and finish like the torch path, from the same initial weights (the kNN of the random
    init is the same: the loaders are built before the seeded model); a missing .beton is a clear error."""
    beton = tmp_path / "beton"
    p = run([sys.executable, "ffcv_data.py", f"--data_path={cifar_small}", f"--out={beton}", "--raw",
             "--splits=train", "--num_workers=1"])
    assert p.returncode == 0, p.stderr[-3000:]
    init = {}
    for kind, extra in (("device", {}), ("ffcv", {"ffcv_path": beton})):
        out = tmp_path / kind
        p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, out, loader=kind, max_steps=4,
                                                             knn_widths="[1.0,0.5,0.25]", **extra)])
        assert p.returncode == 0, p.stderr[-3000:]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [2, 4] and all(r["loss/1.0"] > 0 and 0 <= r["data_wait"] < 1 for r in log)
        results = json.loads((out / "results.json").read_text())
        assert set(results["knn_top1"]) == set(results["knn_top1_init"]) == {"1.0", "0.5", "0.25"}  # knn_widths
        init[kind] = results["knn_top1_init"]
    assert init["device"] == init["ffcv"]  # the ffcv run's monitor reads data_path with the torch loader
    p = run([sys.executable, "train_us3l.py", *tiny_args(cifar_small, tmp_path / "x", loader="ffcv",
                                                         ffcv_path=tmp_path / "none")])
    assert p.returncode != 0 and "train.beton" in p.stderr and "ffcv_data.py" in p.stderr


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


def test_vit_mocov3_recipe_trains(cifar_small, tmp_path, monkeypatch):
    """yaml/vit_tiny_cifar10.yaml's keys, 2 steps on a 1-block 64-d ViT (8 px patches at 32 px: the kNN monitor runs at 32 px): the frozen patch projection
    and the sin-cos buffer leave the run as they came (student and teacher), the rest trains."""
    monkeypatch.setitem(ARCHS, "vit_mocov3_test", functools.partial(
        ViT, 64, 1, 2, img_size=32, patch_size=8, pos_embed="sincos", frozen_patch_embed=True))
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "vit_tiny_cifar10.yaml")])
    assert (cfg.arch, cfg.proj_layers, cfg.predictor, cfg.optimizer) == ("vit_tiny_cifar_mocov3", 3, True, "adamw")
    tiny = {"data_path": str(cifar_small), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8,
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
