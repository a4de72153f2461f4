"""Loss values at known inputs, gradients against the papers' forms, group regularization
against torch.optim.SGD, and InfoNCE key gathering across 2 CPU processes (gloo)."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from losses import (
    add_group_reg_grad_,
    collapse_std,
    group_decay_,
    group_reg_coeffs,
    group_reg_loss,
    info_nce,
    mse_distill,
    nce_distill,
    normalized_mse,
    nt_xent,
)


def unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


# -----------------------------------------------------------------------------
# normalized MSE

def test_normalized_mse_known_values():
    e1, e2 = torch.eye(2)
    p = torch.stack([e1, e1, e1]) * 3.0  # scale must not matter
    assert torch.allclose(normalized_mse(p, torch.stack([e1, e1, e1])), torch.tensor(0.0))
    assert torch.allclose(normalized_mse(p, torch.stack([-e1, -e1, -e1])), torch.tensor(4.0))
    assert torch.allclose(normalized_mse(p, torch.stack([e2, e2, e2])), torch.tensor(2.0))
    # mean over the batch: (0 + 4 + 2) / 3
    assert torch.allclose(normalized_mse(p, torch.stack([e1, -e1, e2])), torch.tensor(2.0))


def test_normalized_mse_bf16_and_stop_gradient():
    p = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    loss = normalized_mse(p, z)
    assert loss.dtype == torch.float32
    loss.backward()
    assert p.grad is not None and z.grad is None


# -----------------------------------------------------------------------------
# InfoNCE

def test_info_nce_uniform_logits_is_log_k():
    # every query orthogonal to every key -> all logits 0 -> loss log(K), K = number of keys
    q = torch.zeros(5, 8)
    q[:, 0] = 1.0
    k = torch.zeros(5, 8)
    k[:, 1] = 1.0
    for t in (0.1, 0.2, 1.0):
        assert torch.allclose(info_nce(q, k, t), torch.tensor(math.log(5)))


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalizes to e1, e2
    k = torch.tensor([[3.0, 4.0], [0.0, -1.0]])  # normalizes to (.6, .8), (0, -1)
    t = 0.5
    # logits = q_n @ k_n.T / t = [[.6, 0], [.8, -1]] / t; positives on the diagonal
    l0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0)))
    l1 = -math.log(math.exp(-1 / t) / (math.exp(0.8 / t) + math.exp(-1 / t)))
    assert torch.allclose(info_nce(q, k, t), torch.tensor((l0 + l1) / 2))


def test_info_nce_fp32_under_autocast():
    q, k = torch.randn(64, 128), torch.randn(64, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = info_nce(q, k, 0.1)
    assert inside.dtype == torch.float32
    assert torch.allclose(inside, info_nce(q, k, 0.1), atol=1e-6)


def test_info_nce_no_gradient_into_keys():
    q = torch.randn(6, 4, requires_grad=True)
    k = torch.randn(6, 4, requires_grad=True)
    loss = info_nce(q.bfloat16(), k, 0.2)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def eq2_loop(anchors, positives, negatives, t):
    """US3L eq. (2) term by term, with the temperature: -log(e^{a.p/t} / (e^{a.p/t} + sum_n e^{a.n/t}))
    for each anchor (its positive and its list of negatives), all L2-normalized, mean over anchors."""
    total = 0.0
    for a, p, negs in zip(anchors, positives, negatives, strict=True):
        a, p = F.normalize(a, dim=0), F.normalize(p, dim=0)
        pos = torch.exp(a @ p / t)
        total = total - torch.log(pos / (pos + sum(torch.exp(a @ F.normalize(n, dim=0) / t) for n in negs)))
    return total / len(anchors)


def test_nt_xent_is_eq2_with_gradients_through_both_views():
    B, t = 5, 0.5
    z1 = torch.randn(B, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(B, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    views = (z1, z2)
    anchors, positives, negatives = [], [], []
    for v in range(2):  # every output is an anchor: view v of image i against the other view of i
        for i in range(B):
            anchors.append(views[v][i])
            positives.append(views[1 - v][i])
            negatives.append([views[u][j] for j in range(B) if j != i for u in range(2)])  # 2B-2
    assert len(negatives[0]) == 2 * B - 2
    ref = eq2_loop(anchors, positives, negatives, t)
    ours = nt_xent(z1, z2, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, views)
    g_ref = torch.autograd.grad(ref, views)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert a.abs().sum() > 0  # no stop-gradient on either view
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nt_xent_uniform_logits_is_log_2b_minus_1():
    eye = torch.eye(8)  # 2B = 8 orthogonal outputs: every logit 0 but the (excluded) self-similarity
    for t in (0.1, 0.5):
        assert torch.allclose(nt_xent(eye[:4], eye[4:] * 3.0, t), torch.tensor(math.log(7)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nt_xent(torch.randn(4, 8), torch.randn(4, 8), 0.5).dtype == torch.float32


def test_info_nce_both_views_is_eq2_with_teacher_keys():
    # the momentum form of eq. (2): query q_i (student, view 1), positive k2_i, negatives k2_j and k1_j
    # for j != i (the teacher's keys of both views; k1_i, the query's own image and view, left out)
    B, t = 4, 0.3
    q = torch.randn(B, 6, dtype=torch.float64, requires_grad=True)
    k1, k2 = torch.randn(B, 6, dtype=torch.float64), torch.randn(B, 6, dtype=torch.float64)
    negatives = [[k[j] for j in range(B) if j != i for k in (k1, k2)] for i in range(B)]
    ref = eq2_loop(list(q), list(k2), negatives, t)
    ours = info_nce(q, k2, t, k_same=k1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0], rtol=1e-10, atol=1e-12)
    # uniform logits: log(2B - 1); without k_same (MoCo's form): log(B)
    e = torch.eye(3 * B)
    assert torch.allclose(info_nce(e[:B], e[B:2 * B], 0.2, k_same=e[2 * B:]), torch.tensor(math.log(2 * B - 1)))
    assert torch.allclose(info_nce(e[:B], e[B:2 * B], 0.2), torch.tensor(math.log(B)))
    k1.requires_grad_()
    info_nce(q, k2, t, k_same=k1).backward()
    assert k1.grad is None  # teacher keys: no gradient


# -----------------------------------------------------------------------------
# US3L distillation losses, eqs. (6)-(9)

def test_mse_distill_values_and_paper_gradient():
    e1, e2 = torch.eye(2)
    zs = torch.stack([e1, e1, e1]) * 2.0
    assert torch.allclose(mse_distill(zs, torch.stack([e1, -e1, e2])), torch.tensor(1.0))
    # same gradient as eq. (6), -zs_n . zt_n (mean over the batch), w.r.t. the raw zs
    zs, zt = torch.randn(7, 5, requires_grad=True), torch.randn(7, 5)
    (g_ours,) = torch.autograd.grad(mse_distill(zs, zt), zs)
    paper = -(F.normalize(zs, dim=1) * F.normalize(zt, dim=1)).sum(1).mean()
    (g_paper,) = torch.autograd.grad(paper, zs)
    assert torch.allclose(g_ours, g_paper, atol=1e-6)
    # half of BYOL's 2 - 2cos
    assert torch.allclose(2 * mse_distill(zs, zt), normalized_mse(zs, zt))


def test_mse_distill_gradient_is_eq8():
    # on the unit sphere the gradient is eq. (8), -zt, projected onto the tangent plane
    zs, zt = unit(4, 6, seed=1).requires_grad_(), unit(4, 6, seed=2)
    (g,) = torch.autograd.grad(mse_distill(zs, zt), zs)
    eq8 = -zt / 4
    tangent = eq8 - (eq8 * zs).sum(1, keepdim=True) * zs
    assert torch.allclose(g, tangent.detach(), atol=1e-6)


def test_nce_distill_value_and_paper_gradient():
    zs = torch.randn(6, 5, requires_grad=True)
    zt = torch.randn(6, 5, requires_grad=True)
    t = 0.3
    zs_n, zt_n = F.normalize(zs, dim=1), F.normalize(zt.detach(), dim=1)
    s = zs_n @ zt_n.T / t
    paper = (-s.diag() + torch.logsumexp(s, dim=1)).mean()  # eq. (7), with the temperature
    ours = nce_distill(zs, zt, t)
    assert torch.allclose(ours, paper, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, zs)
    (g_paper,) = torch.autograd.grad(paper, zs)
    assert torch.allclose(g_ours, g_paper, atol=1e-6)
    assert torch.equal(nce_distill(zs, zt, t), info_nce(zs, zt, t))


def test_nce_distill_gradient_is_eq9():
    # eq. (9) at T=1: dL/dzs_i = -zt_i + sum_j P_j zt_j, projected onto the sphere's tangent
    B = 5
    zs, zt = unit(B, 8, seed=3).requires_grad_(), unit(B, 8, seed=4)
    (g,) = torch.autograd.grad(nce_distill(zs, zt, 1.0), zs)
    P = torch.softmax(zs.detach() @ zt.T, dim=1)
    eq9 = (-zt + P @ zt) / B
    tangent = eq9 - (eq9 * zs.detach()).sum(1, keepdim=True) * zs.detach()
    assert torch.allclose(g, tangent, atol=1e-6)
    zt.requires_grad_()
    nce_distill(zs, zt, 1.0).backward()
    assert zt.grad is None


# -----------------------------------------------------------------------------
# group regularization, eqs. (4)-(5)

def test_group_reg_coeffs_divisible():
    c = group_reg_coeffs(64)
    assert c.shape == (64,)
    assert torch.allclose(c[:8], torch.ones(8))
    assert torch.allclose(c[-8:], torch.full((8,), 1 - 7 * 0.05))
    assert torch.allclose(c.view(8, 8), (1 - 0.05 * torch.arange(8.0))[:, None].expand(8, 8))
    assert torch.equal(group_reg_coeffs(64, alpha=0.0), torch.ones(64))


def test_group_reg_coeffs_not_divisible():
    # K=20, G=8: K_G=2, channels 14..19 (the last group plus the 4 leftovers) get 1 - 7*alpha
    c = group_reg_coeffs(20)
    expect = [1 - 0.05 * min(k // 2, 7) for k in range(20)]
    assert torch.allclose(c, torch.tensor(expect))
    assert torch.allclose(c[14:], torch.full((6,), 0.65))
    # K < G: one channel per group
    assert torch.allclose(group_reg_coeffs(3), torch.tensor([1.0, 0.95, 0.9]))
    assert c.min() >= 1 - 7 * 0.05 - 1e-6


def params_for_reg():
    torch.manual_seed(0)
    return [
        torch.randn(64, 3, 3, 3, requires_grad=True),  # conv
        torch.randn(20, 7, requires_grad=True),  # linear, K not divisible by 8
        torch.randn(64, requires_grad=True),  # bias / norm: no decay
    ]


def test_group_reg_loss_equals_naive_loop():
    params, lam, alpha = params_for_reg(), 1e-2, 0.05
    naive = 0.0
    for w in params:
        if w.ndim <= 1:
            continue
        K = w.shape[0]
        KG = max(K // 8, 1)
        for k in range(K):
            lam_k = lam * (1 - min(k // KG, 7) * alpha)
            naive += lam_k * w[k].detach().pow(2).sum().item()
    assert math.isclose(group_reg_loss(params, lam).item(), naive, rel_tol=1e-5)
    # alpha=0 is plain L2
    l2 = lam * sum(w.detach().pow(2).sum().item() for w in params if w.ndim > 1)
    assert math.isclose(group_reg_loss(params, lam, alpha=0.0).item(), l2, rel_tol=1e-5)


def test_add_group_reg_grad_is_half_loss_gradient():
    params, lam = params_for_reg(), 1e-2
    (0.5 * group_reg_loss(params, lam)).backward()
    assert params[2].grad is None  # the bias is not part of eq. (4)
    expect = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    add_group_reg_grad_(params, lam)
    for p, g in zip(params, expect, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-7)
        assert not p.grad.requires_grad
    assert torch.equal(params[2].grad, torch.zeros(64))  # ndim <= 1 untouched


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 3),
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )


def train(model, opt, before_step, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before_step(model)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def sgd(model, lr, momentum, weight_decay):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_alpha0_equals_sgd_weight_decay(momentum):
    lr, lam = 0.1, 0.05
    m = small_model()
    ref = train(m, sgd(m, lr, momentum, lam), lambda m: None)
    m = small_model()
    ours = train(m, sgd(m, lr, momentum, 0.0),
                 lambda m: add_group_reg_grad_(m.parameters(), lam, alpha=0.0))
    for a, b in zip(ref, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    m = small_model()
    no_wd = train(m, sgd(m, lr, momentum, 0.0), lambda m: None)
    assert not torch.allclose(ref[0], no_wd[0], atol=1e-4)  # the decay is visible at all


def test_decoupled_equals_coupled_for_plain_sgd():
    lr, lam = 0.1, 0.05
    m = small_model()
    ref = train(m, sgd(m, lr, 0.0, lam), lambda m: None)
    m = small_model()
    ours = train(m, sgd(m, lr, 0.0, 0.0),
                 lambda m: group_decay_(m.parameters(), lr, lam, alpha=0.0))
    for a, b in zip(ref, ours, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # with alpha > 0 the decoupled and coupled forms agree too (no momentum)
    m = small_model()
    coupled = train(m, sgd(m, lr, 0.0, 0.0), lambda m: add_group_reg_grad_(m.parameters(), lam))
    m = small_model()
    decoupled = train(m, sgd(m, lr, 0.0, 0.0), lambda m: group_decay_(m.parameters(), lr, lam))
    for a, b in zip(coupled, decoupled, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(coupled[0], ref[0], atol=1e-5)  # alpha=0.05 differs from L2


# -----------------------------------------------------------------------------
# monitoring

def test_collapse_std():
    z = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0))
    assert abs(collapse_std(z).item() - 1 / math.sqrt(128)) < 0.005
    assert collapse_std(torch.randn(1, 128).expand(64, 128)).item() < 1e-6


# -----------------------------------------------------------------------------
# 2 processes: gathered keys give the single-process loss on the concatenated batch

def _worker(rank, world, port, q, k, t, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    B = q.shape[0] // world
    rows = slice(rank * B, (rank + 1) * B)
    q_local = q[rows].clone().requires_grad_()
    loss = info_nce(q_local, k[rows], t)
    loss.backward()
    res = {"loss": loss.detach(), "grad": q_local.grad}
    q_local.grad = None
    loss = info_nce(q_local, k[rows], t, k_same=q[rows] * 2)  # both views' keys (q's own view: 2q)
    loss.backward()
    res.update(loss_same=loss.detach(), grad_same=q_local.grad)
    z1, z2 = q[rows].clone().requires_grad_(), k[rows].clone().requires_grad_()
    loss = nt_xent(z1, z2, t)
    loss.backward()
    res.update(loss_nt=loss.detach(), grad_nt1=z1.grad, grad_nt2=z2.grad)
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_info_nce_gathers_keys_across_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q, k, t = torch.randn(8, 16), torch.randn(8, 16), 0.2
    mp.spawn(_worker, args=(2, port, q, k, t, str(tmp_path)), nprocs=2, join=True)
    # reference: one process, all 8 keys; rank r's loss is the mean over its own 4 queries
    q_ref = q.clone().requires_grad_()
    logits = F.normalize(q_ref, dim=1) @ F.normalize(k, dim=1).T / t
    per_sample = F.cross_entropy(logits, torch.arange(8), reduction="none")
    per_sample.sum().backward()
    assert torch.allclose(info_nce(q, k, t), per_sample.mean())
    # both views' keys: the local mean of the one-process per-query losses, as above
    q_same = q.clone().requires_grad_()
    per_same = eq2_per_query(q_same, k, q * 2, t)
    per_same.sum().backward()
    # NT-Xent: every process returns the loss of the whole batch; the gradients of its own rows,
    # averaged over the 2 processes as the trainer's all-reduce does, are those of one process
    z1, z2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref_nt = nt_xent(z1, z2, t)
    ref_nt.backward()
    for r in range(2):
        res = torch.load(tmp_path / f"{r}.pt")
        rows = slice(r * 4, (r + 1) * 4)
        assert torch.allclose(res["loss"], per_sample[rows].mean().detach(), atol=1e-6)
        assert torch.allclose(res["grad"], q_ref.grad[rows] / 4, atol=1e-6)
        assert torch.allclose(res["loss_same"], per_same[rows].mean().detach(), atol=1e-6)
        assert torch.allclose(res["grad_same"], q_same.grad[rows] / 4, atol=1e-6)
        assert torch.allclose(res["loss_nt"], ref_nt.detach(), atol=1e-6)
        assert torch.allclose(res["grad_nt1"] / 2, z1.grad[rows], atol=1e-6)  # / 2: the average over 2 ranks
        assert torch.allclose(res["grad_nt2"] / 2, z2.grad[rows], atol=1e-6)


def eq2_per_query(q, k, k_same, t):
    """Per-query eq. (2) losses with keys k (positives) and k_same (own view), one process."""
    qn, kn, sn = (F.normalize(x, dim=1) for x in (q, k, k_same))
    n = q.shape[0]
    own = (qn @ sn.T / t).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(torch.cat([qn @ kn.T / t, own], dim=1), torch.arange(n), reduction="none")
