"""train_dspnet.py: the DN list and sandwich sampling, per-DN backward = one backward of the summed
loss, momentum BN, the 9 ResNet DNs export exactly, a smoke run (shared: conftest.dspnet_run) with its
EMA momentum schedule, weight-decay partition and kNN monitor cadence, eval scripts list every DN of
the checkpoint, clear errors (2 CPU processes: tests/test_multiprocess.py; kill and resume:
tests/test_faults.py)."""

import contextlib
import copy
import json
import math
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import eval_knn
import eval_linear
import train_dspnet
from config import ConfigError, parse_config
from models import ARCHS, BasicBlock, ResNet, calibrate_bn, export, load_backbone, projection_mlp, set_active
from slim import BatchNorm1d, SlimBatchNorm2d
from tests.test_train_us3l import cli, read_log, run
from train_dspnet import Config, bn_momentum, dn_name, momentum_bns, parse_dns, sample_dns, train_step
from utils import LARS, ema_update_

DN9 = [[w, *d] for w in (2 / 3, 5 / 6, 1.0) for d in ([2, 2, 2, 2], [2, 3, 4, 3], [3, 4, 6, 3])]


def test_parse_dns_orders_by_macs_and_rejects_bad_entries():
    cfg = replace(Config(), arch="resnet34_w96_cifar", dns=DN9)
    r34 = ARCHS[cfg.arch]()  # one network for every call: parse_dns leaves it at full width and depth
    dns, macs = parse_dns(cfg, r34)
    assert macs == sorted(macs, reverse=True) and len(dns) == 9
    assert dns[0] == {"width": 1.0, "depth": [3, 4, 6, 3]}  # ResNet-34 at 1.5x: the whole encoder
    assert dns[-1] == {"width": 2 / 3, "depth": [2, 2, 2, 2]}  # ResNet-18
    assert dn_name(dns[-1]) == "0.6667_d2-2-2-2" and dn_name({"width": 1.0, "depth": None}) == "1.0"
    mbv3 = replace(Config(), arch="mobilenetv3_large", dns=[[0.5], [1.0], [0.75]], dataset="imagenet", image_size=64)
    assert [d["width"] for d in parse_dns(mbv3, ARCHS[mbv3.arch]())[0]] == [1.0, 0.75, 0.5]
    for bad, words in (([[1.5]], "1.5"), ([[1.0, 3, 4, 6, 9]], "depth"), ([[1.0], [1.0]], "twice"), ([], "empty")):
        with pytest.raises(ConfigError, match="dns") as e:
            parse_dns(replace(cfg, dns=bad), r34)
        assert words in str(e.value)
    with pytest.raises(ConfigError, match="ResNets"):
        parse_dns(replace(mbv3, dns=[[1.0, 2, 2]]), ARCHS[mbv3.arch]())
    # the whole network (width 1.0 at full depth) must be a DN: one line naming the key
    r18 = replace(cfg, arch="resnet18_cifar")
    for bad, c in (([[0.875], [0.5]], replace(mbv3, image_size=32)), ([[1.0, 1, 1, 1, 1], [0.5, 2, 2, 2, 2]], r18)):
        with pytest.raises(ConfigError, match=r"^config error: dns must include the whole network") as e:
            parse_dns(replace(c, dns=bad), ARCHS[c.arch]())
        assert "\n" not in str(e.value)
    assert "[1.0, 2, 2, 2, 2]" in str(e.value)  # the arch's full depth, spelled out
    assert parse_dns(replace(r18, dns=[[0.5], [1.0, 2, 2, 2, 2]]), ARCHS[r18.arch]())[0][0]["depth"] == [2, 2, 2, 2]


def test_sandwich_sampling():
    cfg = Config()  # n = 4
    seen = set()
    for step in range(200):
        torch.manual_seed(step)  # the global RNG must not matter: same DNs on every process
        picked = sample_dns(step, 20, 9, cfg)
        assert picked == sample_dns(step, 20, 9, cfg)
        if step < 20:
            assert picked == [0]  # the whole network only at first
            continue
        assert len(picked) == 4 and picked[0] == 0 and picked[-1] == 8  # largest and smallest
        assert len(set(picked)) == 4 and all(1 <= i <= 7 for i in picked[1:-1])
        seen.update(picked[1:-1])
    assert seen == set(range(1, 8))  # every other DN gets its turn
    assert sample_dns(50, 0, 3, cfg) == [0, 1, 2]  # n >= number of DNs: all of them
    assert sample_dns(50, 0, 5, replace(cfg, num_subnets=2)) == [0, 4]
    assert sample_dns(50, 0, 5, replace(cfg, num_subnets=1)) == [0]


def tiny_online(seed=0):
    torch.manual_seed(seed)
    backbone = ResNet(BasicBlock, [2, 2], widths=(16, 32), stem="cifar")
    online = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 32, 16),
                            "predictor": projection_mlp(16, 32, 16)})
    return online, copy.deepcopy(nn.ModuleDict({k: online[k] for k in ("backbone", "projector")}))


def test_per_dn_backward_equals_one_backward_of_the_sum():
    online, target = tiny_online()
    x = torch.randn(16, 3, 16, 16)  # two views of 8 images
    dns = [{"width": 1.0, "depth": None}, {"width": 0.5, "depth": [1, 2]}, {"width": 0.25, "depth": [1, 1]}]
    step_losses, _ = train_step(online, target, x, dns, contextlib.nullcontext)
    per_dn = [p.grad.clone() for p in online.parameters()]

    online.zero_grad()
    with torch.no_grad():
        t1, t2 = target["projector"](target["backbone"](x)).chunk(2)
    total = 0
    for dn in dns:  # the paper's accumulated loss (eq. 5, symmetrized), one backward
        set_active(online["backbone"], dn["width"], dn["depth"])
        p1, p2 = online["predictor"](online["projector"](online["backbone"](x))).chunk(2)
        cos = torch.nn.functional.cosine_similarity
        total = total + (2 - 2 * cos(p1, t2)).mean() + (2 - 2 * cos(p2, t1)).mean()
    total.backward()
    torch.testing.assert_close(step_losses.sum(), total.detach())
    for a, p in zip(per_dn, online.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, torch.zeros_like(a)) for a in per_dn[:3])


def test_momentum_bn_target():
    bn = SlimBatchNorm2d(4)
    bn.stats_momentum = 0.1
    x1, x2 = torch.randn(8, 4, 5, 5) * 2 + 3, torch.randn(8, 4, 5, 5)
    y1 = bn(x1)  # the first batch sets the statistics outright: as plain batch norm
    torch.testing.assert_close(y1, torch.nn.functional.batch_norm(x1, None, None, training=True), rtol=1e-4, atol=1e-4)
    var1, mean1 = torch.var_mean(x1, dim=(0, 2, 3), unbiased=False)
    var2, mean2 = torch.var_mean(x2, dim=(0, 2, 3), unbiased=False)
    y2 = bn(x2)  # then an EMA of batch statistics normalizes
    mean, var = 0.9 * mean1 + 0.1 * mean2, 0.9 * var1 + 0.1 * var2
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(y2, (x2 - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps),
                               rtol=1e-4, atol=1e-4)
    # the EMA weight update leaves such a target's statistics alone
    online, target = tiny_online()
    bns = [m for m in target.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.running_mean.fill_(7.0)
    ema_update_(target, nn.ModuleDict({k: online[k] for k in ("backbone", "projector")}), 0.9, buffers=False)
    assert all(torch.all(m.running_mean == 7.0) for m in bns)


def test_momentum_bn_schedule_and_projector_bn():
    """The weight on each new batch's statistics falls by cosine from 1 to 0 (Momentum^2 Teacher), and
    every target BN gets it, the projector's BatchNorm1d included (the smoke run below logs it)."""
    total = 100
    assert bn_momentum(0, total) == 1.0 and bn_momentum(total, total) == 0.0
    assert bn_momentum(50, total) == pytest.approx(0.5) and bn_momentum(25, total) == pytest.approx(0.8535534)
    values = [bn_momentum(s, total) for s in range(total + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing, no floor
    # a projector BN with momentum 1 normalizes as plain batch norm; then the EMA of batch statistics
    bn = BatchNorm1d(6)
    bn.stats_momentum = 1.0
    h1, h2 = torch.randn(8, 6) * 3 + 2, torch.randn(8, 6)
    torch.testing.assert_close(bn(h1), torch.nn.functional.batch_norm(h1, None, None, training=True))
    bn.stats_momentum = 0.25
    y2 = bn(h2)
    mean = 0.75 * h1.mean(0) + 0.25 * h2.mean(0)
    var = 0.75 * h1.var(0, unbiased=False) + 0.25 * h2.var(0, unbiased=False)
    torch.testing.assert_close(y2, (h2 - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-5)
    # the trainer sets it each step on these: every target BN, the projector's BatchNorm1d included
    online, target = tiny_online()
    bns = momentum_bns(target)
    assert sum(isinstance(m, BatchNorm1d) for m in bns) == 1 and target["projector"][1] in bns
    assert {id(m) for m in target.modules() if isinstance(m, nn.BatchNorm2d)} <= {id(m) for m in bns}


def test_resnet_dns_export_exactly():
    torch.manual_seed(0)
    model = ARCHS["resnet34_w96_cifar"]().eval()
    x = torch.randn(4, 3, 16, 16)  # exactness does not depend on the image size: 16 px, a quarter of the work
    for dn in DN9:
        width, depth = dn[0], dn[1:]
        calibrate_bn(model, [x], width=width, depth=depth)
        set_active(model, width, depth)
        with torch.no_grad():
            ref = model(x)
            net = export(model, width, depth).eval()
            out = net(x)
        assert ref.shape == (4, round(768 * width))
        assert (out - ref).abs().max().item() <= 1e-4, dn
        assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 1 + 2 * sum(depth) + 3  # stem, blocks, shortcuts


def tiny_args(data, out, **over):
    """Command-line arguments of a tiny run (as tests/test_train_us3l.py's: ResNet-18's blocks at a quarter
    of its widths, 16 px crops, 8 steps of 16 images) with 4 DNs, 1 full-only and 1 warm-up epoch of 4."""
    args = {"data_path": data, "out_dir": out, "arch": "resnet18_cifar_tiny", "image_size": 16, "batch_size": 16,
            "max_steps": 8, "epochs": 4, "full_only_epochs": 1, "warmup_epochs": 1, "log_every": 2,
            "knn_bank_subset": 100, "knn_test_subset": 50, "knn_batch_size": 50, "num_workers": 0,
            "proj_hidden": 64, "proj_dim": 32, "knn_k": 20, "dns": "[[1.0],[0.5],[0.5,1,1,1,1],[0.25,1,1,1,1]]",
            "momentum_bn": "true"}
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


DN_NAMES = ["1.0", "0.5", "0.5_d1-1-1-1", "0.25_d1-1-1-1"]  # tiny_args' DNs, largest first


def test_smoke_run_backbone_and_eval_lists_every_dn(dspnet_run, tmp_path, capsys, fresh_accelerate):
    out, image_folder = dspnet_run.out, dspnet_run.cfg.data_path
    res = json.loads((out / "results.json").read_text())
    for key in ("knn_top1", "knn_top1_init"):  # knn_dns=all: every DN (the default, ends: the largest and smallest)
        assert set(res[key]) == set(DN_NAMES)
        assert all(0 <= a <= 1 for a in res[key].values())
    assert res["num_processes"] == 1
    assert set(res["collapse_std"]) == set(DN_NAMES) and all(0 < s < 1 for s in res["collapse_std"].values())
    log = read_log(out)
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert log[0]["dns"] == ["1.0"] and log[-1]["dns"][0] == "1.0" and log[-1]["dns"][-1] == "0.25_d1-1-1-1"
    assert len(log[-1]["dns"]) == 4 and all(r["loss/1.0"] > 0 for r in log) and "collapse_std/0.25_d1-1-1-1" in log[-1]
    assert [r["bn_momentum"] for r in log] == [bn_momentum(s, 8) for s in (1, 3, 5, 7)]  # the target's momentum BN
    model, ckpt = load_backbone(out / "backbone.pt")
    assert ckpt["arch"] == "resnet18_cifar_tiny"
    assert ckpt["dns"][0] == {"width": 1.0, "depth": None}
    assert ckpt["dns"][-1] == {"width": 0.25, "depth": [1, 1, 1, 1]}
    x = torch.randn(8, 3, 16, 16)
    for dn in ckpt["dns"]:
        calibrate_bn(model, [x], width=dn["width"], depth=dn["depth"])
        assert export(model, dn["width"], dn["depth"])(x).shape[0] == 8
    # the evaluation scripts (in this process) list every DN of the checkpoint, largest first
    knn = eval_knn.main(parse_config(eval_knn.Config, [
        f"--ckpt={out / 'backbone.pt'}", f"--data_path={image_folder}", f"--out_dir={tmp_path / 'knn'}",
        "--bank_subset=100", "--test_subset=50", "--k=20", "--num_workers=0"]))
    assert list(knn) == list(json.loads((tmp_path / "knn" / "results.json").read_text())) == DN_NAMES
    lin = eval_linear.main(parse_config(eval_linear.Config, [
        f"--ckpt={out / 'backbone.pt'}", f"--data_path={image_folder}", f"--out_dir={tmp_path / 'lin'}",
        "--train_subset=100", "--test_subset=50", "--calib_images=50", "--batch_size=25", "--epochs=2"]))
    assert list(lin) == list(json.loads((tmp_path / "lin" / "results.json").read_text())) == DN_NAMES
    # the same run again: it is finished, nothing is redone
    capsys.readouterr()
    fresh_accelerate()  # the evaluations' Accelerate state had no mixed precision, the run's has bf16
    train_dspnet.main(dspnet_run.cfg)
    assert "nothing to do" in capsys.readouterr().out


def test_ema_momentum_schedule(dspnet_run):
    """The target's EMA momentum tau rises from `momentum` (0.996, BYOL's) at the first step towards 1
    at the end of the run by half a cosine: tau_k = 1 - (1 - 0.996) (cos(pi k / K) + 1) / 2 at step k
    of K; it is the tau of each step's update, and log.jsonl logs it."""
    K, tau0 = 8, dspnet_run.cfg.momentum
    assert tau0 == 0.996
    want = [1 - (1 - tau0) * (math.cos(math.pi * k / K) + 1) / 2 for k in range(K)]
    assert dspnet_run.taus == pytest.approx(want, rel=0, abs=1e-12)
    assert dspnet_run.taus[0] == 0.996 and dspnet_run.taus[K // 2] == pytest.approx(0.998)  # halfway: halfway to 1
    assert all(a < b < 1 for a, b in zip(dspnet_run.taus, dspnet_run.taus[1:]))
    assert [r["tau"] for r in read_log(dspnet_run.out)] == [dspnet_run.taus[s - 1] for s in (2, 4, 6, 8)]


def test_weight_decay_partition(dspnet_run):
    """LARS's weight decay and trust ratio reach every weight (ndim > 1) of the encoder, projector and
    predictor, and no bias or norm scale (BYOL): the optimizer's groups as the trainer built them."""
    online, optimizer = dspnet_run.state["online"], dspnet_run.state["optimizer"]
    assert isinstance(optimizer, LARS)
    names = {p: name for name, p in online.named_parameters()}
    decayed, plain = set(), set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            if g["lars"] and g["weight_decay"] == dspnet_run.cfg.weight_decay == 1.5e-6:
                decayed.add(names[p])
            else:
                assert not g["lars"] and g["weight_decay"] == 0.0, names[p]
                plain.add(names[p])
    assert decayed == {name for name, p in online.named_parameters() if p.ndim > 1}
    assert plain == {name for name, p in online.named_parameters() if p.ndim <= 1}
    assert {name.split(".")[0] for name in decayed} == {name.split(".")[0] for name in plain} == {
        "backbone", "projector", "predictor"}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # each parameter once


def test_eval_every_runs_the_knn_monitor_at_its_epochs(dspnet_run):
    """eval_every=2 over 4 epochs of 2 steps: the kNN monitor runs (on every DN, knn_dns=all) on the
    random init, after epoch 2 (step 4: results.json's knn_top1_history) and at the end, not after
    epochs 1 and 3, and results.json holds what each one measured."""
    res = json.loads((dspnet_run.out / "results.json").read_text())
    steps = [step for step, _ in dspnet_run.knn]
    assert steps == [0] * 4 + [4] * 4 + [8] * 4  # one kNN per DN
    measured = [{name: round(next(iter(acc.values())), 4)  # each DN's monitor: {its width: top-1}
                 for name, (_, acc) in zip(DN_NAMES, dspnet_run.knn[i:i + 4])} for i in (0, 4, 8)]
    assert [res["knn_top1_init"], res["knn_top1_history"], res["knn_top1"]] == [
        measured[0], {"4": measured[1]}, measured[2]]


def test_clear_errors(image_folder, tmp_path, monkeypatch, fresh_accelerate):
    # the command line itself: exit code 1 and one line, no traceback
    p = run([sys.executable, "train_dspnet.py", "--num_subnet=3"])
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "config error: unknown key 'num_subnet' on the command line (did you mean 'num_subnets'?)"], p.stderr[-2000:]
    # the others in this process, as config.run ends them
    code = cli(train_dspnet.main, Config, tiny_args(image_folder, tmp_path / "o", dns="[[1.0],[0.5,9,9,9,9]]"),
               monkeypatch)
    assert code.startswith("config error: dns entry [0.5, 9.0, 9.0, 9.0, 9.0] does not fit resnet18_cifar_tiny")
    code = cli(train_dspnet.main, Config, tiny_args(image_folder, tmp_path / "o", knn_dns="some"), monkeypatch)
    assert code == "config error: knn_dns='some', allowed: ends, all"
