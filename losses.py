"""Losses for slimmable self-supervised pretraining.

Papers (references in CITATION.cff):
  DSPNet  "DSPNet: Towards Slimmable Pretrained Networks based on Discriminative Self-supervised
          Learning" (Wang et al., arXiv:2207.06075): BYOL normalized MSE.
  US3L    "Three Guidelines You Should Know for Universally Slimmable Self-Supervised Learning"
          (Cao et al., CVPR 2023): InfoNCE base loss (eq. 2: info_nce with a momentum teacher,
          nt_xent without one), distillation losses (eqs. 6-7), group regularization (eqs. 4-5).

This file knows no network and no trainer. Conventions shared by every loss here:
  - inputs may be bf16 under autocast; everything is computed in fp32 (fp64 for fp64 inputs, the
    trainers' precision=fp64 for exactness tests) and returns a scalar of that type.
  - the batch reduction is a mean (the papers write sums over i; a mean keeps the lr independent
    of the batch size). Each loss here is one view direction (nt_xent: both); the trainer averages
    or sums the two directions (train_us3l.py, loss_views).
  - targets (the second argument) are detached here, so a caller cannot leak gradient into a
    momentum teacher or a stop-gradient branch by accident (nt_xent has no target: both of its
    arguments carry gradient).
  - temperatures are applied as logits / T with no extra 2*T factor (see info_nce).

Usage:
    loss = (info_nce(q1, k2, T, k_same=k1) + info_nce(q2, k1, T, k_same=k2)) / 2   # US3L eq. (2), teacher
    loss = nt_xent(z1, z2, T)                                                      # eq. (2), no teacher
    loss = loss + (mse_distill(g(zs1), k2) + mse_distill(g(zs2), k1)) / 2          # US3L eq. (6)
    loss = normalized_mse(p1, t2) + normalized_mse(p2, t1)                         # DSPNet/BYOL
    ...; loss.backward(); add_group_reg_grad_(decay_params, wd); optimizer.step()  # eqs. (4)-(5)
"""
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

def f32(x):
    """x in fp32 at least: bf16/fp16 -> fp32, fp32 and fp64 unchanged."""
    return x if x.dtype == torch.float64 else x.float()


# -----------------------------------------------------------------------------
# BYOL / DSPNet

def normalized_mse(p, z):
    """BYOL's loss ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), mean over the batch. (B, D), (B, D) -> ()

    DSPNet Sec. 4 uses exactly this form (range [0, 4]). Its gradient is 2x that of the
    negative cosine D(p, z) of US3L eq. (1); use mse_distill for the eq. (1)/(6) scale.
    """
    p = F.normalize(f32(p), dim=1)
    z = F.normalize(f32(z.detach()), dim=1)  # target: stop-gradient (BYOL, SimSiam)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


# -----------------------------------------------------------------------------
# InfoNCE with keys from every process

def gather_keys(k):
    """All-gather no-grad keys from every process. (B, D) -> (world*B, D), rank.

    A plain all_gather is correct because keys carry no gradient. Every rank
    must hold the same B (drop_last=True), as all_gather needs equal shapes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return k, 0
    out = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(out, k.contiguous())
    return torch.cat(out), dist.get_rank()


def info_nce(q, k, temperature, k_same=None):
    """InfoNCE with detached keys, US3L eq. (2) with a momentum teacher. q (B, D) with grad, k (B, D)
    keys of the other view, k_same (B, D) optional keys of q's own view -> ()

    Keys are gathered from all processes: K = world*B keys, the positive of local query i sits at
    index rank*B + i, the other K-1 are negatives (MoCo's form). k_same adds the eq. (2) negatives
    of the query's own view: the K-1 keys of the other images (the key of query i's own image and
    view is left out, as eq. (2)'s j != i), so 2K-2 negatives in all. Uniform logits give log(K)
    without k_same and log(2K-1) with it.

    NOTE: MoCo v3's code multiplies this loss by 2*T. US3L writes eq. (2) and eq. (7) without
    that factor (and "omits the temperature for simplicity"), so we return the plain
    cross-entropy. With T=0.2 the MoCo v3 scaling would be 0.4x the gradient here: port a
    MoCo v3 recipe by scaling its lr, not by changing this function.
    """
    assert q.shape == k.shape, f"queries {tuple(q.shape)} and keys {tuple(k.shape)} must match"
    q = F.normalize(f32(q), dim=1)
    k_all, rank = gather_keys(F.normalize(f32(k.detach()), dim=1))
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    # NOTE: .float() alone is not enough: autocast would still run this matmul in bf16
    # (logit error ~1e-2 at T=0.1). Temperature losses stay fp32 (docs/design.md, Precision).
    with torch.autocast(q.device.type, enabled=False):
        logits = q @ k_all.T / temperature  # (B, world*B)
        if k_same is not None:
            same, _ = gather_keys(F.normalize(f32(k_same.detach()), dim=1))
            same = (q @ same.T / temperature).scatter(1, labels[:, None], float("-inf"))  # j != i
            logits = torch.cat([logits, same], dim=1)  # (B, 2*world*B): other view, then own view
    return F.cross_entropy(logits, labels)


def nt_xent(z1, z2, temperature):
    """SimCLR's NT-Xent, US3L eq. (2) as written, for a network contrasting its own two views.
    z1, z2 (B, D), both with grad -> ()

    Every one of the 2B outputs is an anchor: its positive is the other view of its image, its
    negatives the 2B-2 outputs of the other images in both views; gradients flow through anchors,
    positives and negatives alike (no stop-gradient, no teacher). The mean over the 2B anchors is
    the mean of the two view directions (anchors of view 1, anchors of view 2). Uniform logits give
    log(2B-1).

    Under N processes each holds B/N images. Every process computes the loss of the whole global
    batch (a (2B, 2B) matrix: small next to the network), from outputs gathered from all processes;
    only its own rows carry gradient, so its gradient is exactly its rows' share of the gradient of
    the global loss. The trainers average gradients over processes, so that share is scaled by N
    (the gradient only, not the value): the average over processes is then the gradient of one
    process holding the whole batch.
    """
    assert z1.shape == z2.shape, f"views {tuple(z1.shape)} and {tuple(z2.shape)} must match"
    b = z1.shape[0]
    parts = []
    for z in (z1, z2):
        z = F.normalize(f32(z), dim=1)
        z_all, rank = gather_keys(z.detach())  # (world*b, D), constants
        parts.append(torch.cat([z_all[:rank * b], z, z_all[(rank + 1) * b:]]))  # own rows: with grad
    world = parts[0].shape[0] // b
    z = torch.cat(parts)  # (2B, D): view 1 of the global batch, then view 2
    n = z.shape[0] // 2
    with torch.autocast(z.device.type, enabled=False):  # fp32 logits (see info_nce)
        logits = z @ z.T / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # no self
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # the other view of the same image
    loss = F.cross_entropy(logits, labels)
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())  # gradient x N, value as is


# -----------------------------------------------------------------------------
# US3L distillation losses (Sec. 3.3): zs from g(sub-network), zt from the teacher

def mse_distill(zs, zt):
    """US3L eq. (6), -zs.zt on L2-normalized vectors, as 1 - cos(zs, zt). (B, D), (B, D) -> ()

    The +1 offset only makes the value non-negative (0 when aligned); the gradient is exactly
    eq. (8), -zt (through the normalization). This is half of normalized_mse: 2 - 2cos would
    double the gradient relative to the paper.
    """
    zs = F.normalize(f32(zs), dim=1)
    zt = F.normalize(f32(zt.detach()), dim=1)
    return (1 - (zs * zt).sum(dim=1)).mean()


def nce_distill(zs, zt, temperature):
    """US3L eq. (7): InfoNCE with the sub-network's zs as queries and teacher outputs zt as keys.

    Identical to info_nce (keys detached and gathered across processes); the separate name keeps
    the trainer's Table 7 switchboard readable. Gradient: eq. (9), -zt_i + sum_j P_j zt_j (/T).
    """
    return info_nce(zs, zt, temperature)


# -----------------------------------------------------------------------------
# US3L group regularization, eqs. (4)-(5)
#
# lambda_k = lambda * (1 - floor(k / K_G) * alpha), K_G = floor(K / G), over the output channels
# (dim 0) of every weight with ndim > 1 (conv, linear; biases and norms get no decay, as BYOL).
# Later channels are used by fewer sub-networks, so they get the smaller coefficient.
#
# Conventions:
#   - k is 0-indexed. Read 1-indexed, eq. (5) would give the first group K_G-1 channels and put
#     the last channel alone in a 9th group with 1 - G*alpha.
#   - K not divisible by G: the paper only defines K_G = floor(K/G); the K mod G trailing
#     channels join the last group (k -> min(k // K_G, G-1)) instead of opening extra groups
#     with ever smaller coefficients. K < G: K_G = 1, one channel per group.
#   - lambda is SGD's weight_decay. The paper trains with "SGD, weight decay 1e-4" and says
#     alpha=0 "degenerates into the standard L2 regularization", i.e. the gradient lambda*w of
#     torch.optim.SGD(weight_decay=lambda), which is the gradient of (lambda/2)||w||^2.
#     So group_reg_loss returns the literal eq. (4) sum (for logging), and the update that the
#     trainer applies, add_group_reg_grad_, is the gradient of HALF of it: lambda_k * w_k.
#     Adding group_reg_loss itself to the loss would decay twice as hard as the paper's recipe.
# NOTE: dim 0 must be in width order. A fused qkv Linear (3D, D) would be grouped as q|k|v, not
# by channel: keep q, k, v as separate weights or leave such weights out of params.

def group_reg_coeffs(K, groups=8, alpha=0.05):
    """Per-output-channel multipliers (1 - g*alpha) of eq. (5), without lambda. -> (K,) fp32"""
    size = max(K // groups, 1)  # K_G
    g = (torch.arange(K) // size).clamp(max=groups - 1)
    return 1.0 - alpha * g.float()


@functools.cache
def _coeffs(K, ndim, groups, alpha, device, dtype):
    # cached per shape so the per-step cost is one fused multiply-add per parameter
    return group_reg_coeffs(K, groups, alpha).to(device, dtype).view(K, *[1] * (ndim - 1))


def _decayed(params, vectors=False):  # weights; vectors=True: biases and norms too (the release's form)
    return [p for p in params if p.ndim > 1 or vectors]


def group_reg_loss(params, weight_decay, groups=8, alpha=0.05):
    """Literal US3L eq. (4): sum_k lambda_k ||w_k||^2 over all weights with ndim > 1. -> () fp32

    Its gradient is 2*lambda_k*w_k; use add_group_reg_grad_ (or 0.5 * this) for the recipe.
    """
    terms = [
        (_coeffs(p.shape[0], 2, groups, alpha, p.device, torch.float32).flatten()
         * p.float().pow(2).flatten(1).sum(dim=1)).sum()  # sum_k c_k ||w_k||^2
        for p in _decayed(params)
    ]
    return weight_decay * (torch.stack(terms).sum() if terms else torch.zeros(()))


@torch.no_grad()
def add_group_reg_grad_(params, weight_decay, groups=8, alpha=0.05, vectors=False):
    """Coupled group decay: p.grad += lambda_k * w_k, the gradient of 0.5 * eq. (4).

    Call after backward (and after unscaling / clipping, where SGD applies its own
    weight_decay) and right before optimizer.step(), with weight_decay=0 in the optimizer for
    these params. The term then enters the momentum buffer like SGD's L2 weight decay, which is
    the paper's L2 form; alpha=0 reproduces torch.optim.SGD(weight_decay=lambda) exactly.
    Params with ndim <= 1 (unless vectors: the release decays them, grouped) or without a grad are skipped.
    """
    ps = [p for p in _decayed(params, vectors) if p.grad is not None]
    if not ps:
        return
    coeffs = [_coeffs(p.shape[0], p.ndim, groups, alpha, p.device, p.dtype) for p in ps]
    torch._foreach_addcmul_([p.grad for p in ps], ps, coeffs, value=weight_decay)


@torch.no_grad()
def group_decay_(params, lr, weight_decay, groups=8, alpha=0.05, vectors=False):
    """Decoupled group decay in place: w_k -= lr * lambda_k * w_k.

    Called before optimizer.step() of plain SGD (no momentum), this equals
    add_group_reg_grad_ (gradients were computed at the old weights, so the order is exact).
    With momentum it is the decoupled (SGDW-style) variant, which is NOT the paper's L2 form:
    the decay skips the momentum buffer. Params with ndim <= 1 are skipped unless vectors.
    """
    ps = _decayed(params, vectors)
    if not ps:
        return
    coeffs = [_coeffs(p.shape[0], p.ndim, groups, alpha, p.device, p.dtype) for p in ps]
    torch._foreach_addcmul_(ps, ps, coeffs, value=-lr * weight_decay)


# -----------------------------------------------------------------------------
# Monitoring

@torch.no_grad()
def collapse_std(z):
    """Std over the batch of L2-normalized outputs, averaged over dims. (B, D) -> () fp32

    Healthy representations give about 1/sqrt(D); collapse to a constant drives it to 0
    (after SimSiam). Returns a tensor: call .item() only when logging.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
