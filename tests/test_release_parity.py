"""The US3L release's forms, behind config keys: an optimizer step per width (step_per_width), the
release's group regularization (group_reg_form=release: every tensor decayed, vectors grouped, alpha
ramped) and its plain-L2 warm-up (group_reg_warmup_epochs); each against a loop written out here."""

import contextlib
import copy
import inspect
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import losses
import train_us3l
from config import parse_config
from models import BasicBlock, ResNet, projection_mlp, set_active
from tests.conftest import recorded_run
from tests.test_train_us3l import eq2_with_teacher, eq6, tiny_args
from train_us3l import Config, forward_backward, group_alpha
from utils import optimizer_step_, param_groups


def coeffs(K, alpha, groups=8):
    """eq. (5)'s multipliers written out: channel k is in group min(k // floor(K/G), G-1)."""
    size = max(K // groups, 1)
    return torch.tensor([1 - alpha * min(k // size, groups - 1) for k in range(K)], dtype=torch.float64)


def tiny_student():
    torch.manual_seed(0)
    backbone = ResNet(BasicBlock, [1, 1], widths=(16, 32), stem="cifar")
    student = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 32, 16),
                             "aux": projection_mlp(16, 32, 16)}).double()
    teacher = copy.deepcopy(nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def test_step_per_width_is_the_release_loop():
    """forward_backward with step_each (step_per_width=true) against the release's loop written out:
    for each width, zero_grad, forward, loss + 0.5 * eq. (4) (backbone weights) + 0.5 * L2 (heads),
    backward, SGD step; the teacher's keys computed once per batch. fp64, every parameter after 3 steps."""
    cfg = replace(Config(), precision="fp64", step_per_width=True)
    wd, alpha, lr, widths = 1e-2, 0.05, 0.1, [1.0, 0.5, 0.25]
    student, teacher = tiny_student()
    ref = copy.deepcopy(student)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)

    opt = torch.optim.SGD(param_groups(student.parameters(), 0.0), lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = list(student.parameters())
    backbone_w = [p for p in student["backbone"].parameters() if p.ndim > 1]
    heads_w = [p for k in ("projector", "aux") for p in student[k].parameters() if p.ndim > 1]
    steps = []

    def regularize():
        losses.add_group_reg_grad_(backbone_w, wd, alpha=alpha)
        losses.add_group_reg_grad_(heads_w, wd, alpha=0.0)

    def step():
        steps.append(1)
        optimizer_step_(opt, scaler, params, 1, regularize)

    forward_backward(student, teacher, x, widths, cfg, contextlib.nullcontext, step_each=step)
    assert len(steps) == len(widths)

    ref_opt = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9)
    keys = teacher["projector"](teacher["backbone"](x)).detach()
    for i, w in enumerate(widths):
        ref_opt.zero_grad()
        set_active(ref["backbone"], w)
        z = ref["projector"](ref["backbone"](x))
        loss = eq2_with_teacher(z, keys, cfg.temperature) if i == 0 else eq6(ref["aux"](z), keys)
        for p in ref["backbone"].parameters():
            if p.ndim > 1:
                loss = loss + 0.5 * wd * (coeffs(p.shape[0], alpha) * p.pow(2).flatten(1).sum(1)).sum()
        for k in ("projector", "aux") if i else ("projector",):  # decay reaches the tensors this width trains
            loss = loss + sum(0.5 * wd * p.pow(2).sum() for p in ref[k].parameters() if p.ndim > 1)
        loss.backward()
        ref_opt.step()
    set_active(ref["backbone"], 1.0)
    for (name, p), q in zip(student.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_release_group_reg_gradient_is_its_loss():
    """vectors=True (group_reg_form=release): BN scales / shifts and biases get eq. (5)'s grouped decay
    too; the gradient equals that of the release's loss lambda * sum(mask * w^2) with wd = 2 lambda."""
    w = torch.randn(20, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    lam, alpha = 5e-5, 0.05
    loss = sum(lam * (coeffs(20, alpha).view(-1, *[1] * (p.ndim - 1)) * p.pow(2)).sum() for p in (w, b))
    want = torch.autograd.grad(loss, [w, b])
    for p in (w, b):
        p.grad = torch.zeros_like(p)
    losses.add_group_reg_grad_([w, b], 2 * lam, alpha=alpha, vectors=True)
    torch.testing.assert_close(w.grad, want[0])
    torch.testing.assert_close(b.grad, want[1])
    b.grad = torch.zeros_like(b)
    losses.add_group_reg_grad_([b], 2 * lam, alpha=alpha)  # the paper's form: vectors are not decayed
    assert b.grad.abs().sum() == 0


def test_group_alpha_schedule():
    cfg = replace(Config(), epochs=100, group_reg_alpha=0.05, group_reg_warmup_epochs=50)
    assert [group_alpha(s, 100, cfg) for s in (0, 49, 50, 99)] == [0.0, 0.0, 0.05, 0.05]  # paper: a step up
    cfg = replace(cfg, group_reg_form="release", group_reg_warmup_epochs=10)
    got = [group_alpha(s, 100, cfg) for s in (0, 9, 10, 30, 50, 99)]
    assert got == pytest.approx([0.0, 0.0, 0.0, 0.025, 0.05, 0.05])  # plain L2, then a ramp to the middle


def test_release_form_in_a_run(image_folder, tmp_path, fresh_accelerate):
    """The trainer's partition and schedule: release decays vectors (grouped) and Linear weights (plain),
    alpha 0 for the warm-up, then ramped; the paper's form decays weights only."""
    args = tiny_args(image_folder, tmp_path / "rel", group_reg_form="release", group_reg_warmup_epochs=1, epochs=4,
                     max_steps=8, dynamic_sampling="false", step_per_width="true")
    seen = recorded_run(train_us3l, parse_config(train_us3l.Config, args))
    grouped, plain = seen.decay[0][0], seen.decay[1][0]
    assert any(p.ndim == 1 for p in grouped) and all(p.ndim in (1, 4) for p in grouped)
    assert plain and all(p.ndim == 2 for p in plain)
    trained = [p for p in seen.state["student"].parameters() if p.requires_grad]
    assert len(grouped) + len(plain) == len(trained)  # every trained tensor is decayed
    # 3 widths per batch, a decay per width; alpha: warm-up (t < 1/4), then the ramp to t = 1/2
    alphas = [a for _, _, a in seen.decay[::2]]
    assert len(alphas) == 8 * 3
    assert alphas[::3] == pytest.approx([0, 0, 0, 0.025, 0.05, 0.05, 0.05, 0.05])
    assert len(seen.taus) == 8  # one teacher update per batch

    seen = recorded_run(train_us3l, parse_config(train_us3l.Config, tiny_args(image_folder, tmp_path / "paper",
                                                                                max_steps=2)))
    assert all(p.ndim > 1 for p in seen.decay[0][0] + seen.decay[1][0])


@pytest.mark.parametrize("trainer", ["train_us3l", "train_dspnet"])
def test_aug_reaches_the_loader(trainer, image_folder, tmp_path, monkeypatch, fresh_accelerate):
    """aug and min_scale go to build_train_loader (augment.py draws the views: tests/test_augment.py); a bad
    aug is a one-line error before anything is built."""
    import train_dspnet
    from tests.test_dspnet import tiny_args as dspnet_args
    from tests.test_train_us3l import cli

    module = train_us3l if trainer == "train_us3l" else train_dspnet
    args = (tiny_args if module is train_us3l else dspnet_args)(image_folder, tmp_path, aug="mocov2", min_scale=0.2)
    seen, real = {}, inspect.signature(module.build_train_loader)

    def build_train_loader(*a, **kw):
        seen.update(real.bind(*a, **kw).arguments)
        raise SystemExit("stop")

    monkeypatch.setattr(module, "build_train_loader", build_train_loader)
    assert cli(module.main, module.Config, args, monkeypatch) == "stop"
    assert (seen["min_scale"], seen["aug"]) == (0.2, "mocov2")
    msg = cli(module.main, module.Config, [*args, "--aug=simclr"], monkeypatch)
    assert msg == "config error: aug='simclr', allowed: byol, mocov2"


def test_no_teacher_infonce_scale_is_the_releases():
    """Without a teacher (Table 7 cases 9-11, 14, 15) the base loss at loss_views=mean is the release's
    NT-Xent scale: the mean over all 2B anchors of -log(softmax over the 2B-1 others at the other view),
    written out here; loss_views=sum doubles it (Algorithm 1's sum)."""
    torch.manual_seed(0)
    z = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    n, T = z.shape[0] // 2, 0.5
    u = torch.nn.functional.normalize(z, dim=1)
    logits = (u @ u.T / T).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # anchor i of view 1 <-> i of view 2
    want = torch.nn.functional.cross_entropy(logits, target)
    for views, scale in (("mean", 1), ("sum", 2)):
        cfg = replace(Config(), temperature=T, loss_views=views)
        got = train_us3l.pair_loss("infonce", z, z, cfg, own=True)
        torch.testing.assert_close(got, scale * want)
        g_got, = torch.autograd.grad(got, z)
        g_want, = torch.autograd.grad(scale * want, z, retain_graph=True)
        torch.testing.assert_close(g_got, g_want)
