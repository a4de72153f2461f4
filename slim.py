"""Slimmable layers: one set of weights, many widths (leading-channel slices). The architectures
built from them, and what you do with a sub-network (set_active, calibrate_bn, export, profile), are
in models.py.

A layer with C channels at full width runs at width w with make_divisible(C*w) leading channels; its
input width is whatever arrives (x.shape[1]), so the only state is the width each layer is set to
(set_width, called by models.set_active).

    conv = SlimConv2d(64, 128, 3)        # weight allocated at full width (128, 64, 3, 3)
    conv.set_width(0.5)                  # forward now outputs 64 channels, from however many come in
    bn = SlimBatchNorm2d(128)            # per-channel statistics and affine, sliced the same way
    plain = conv.to_plain(cin=32)        # a plain nn.Conv2d holding the slice (models.export)

BN across processes: with `sync` set (models.set_sync_bn), SlimBatchNorm2d and the heads' BatchNorm1d
normalize with the statistics of the global batch (every process's batch of the active channel
slice), so N processes of batch B/N train what one process of batch B trains. On CUDA it runs the
fused kernels behind torch's nn.SyncBatchNorm (one pass over the batch for the statistics, one for
the output, two in the backward); elsewhere (CPU, gloo: torch has no CPU kernels for them) a Function
of generic tensor ops with float64 all-reduces, the reference. SLIM_SYNC_BN=python in the environment
runs that reference on CUDA too (A/B timing: bench/gpu_check.py --parts sync_bn). sincos_pos_embed: a
fixed ViT position code whose leading-channel slices are themselves 2-D sin-cos codes (MoCo v3's ViT
recipe).

This file imports nothing from the rest of the repo; models.py imports only this file.
"""


import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v, divisor=8):
    """Round v to a multiple of divisor: never below divisor, never more than 10% below v."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# ----------------------------------------------------------------------------------------------
# Slimmable primitives. Weights are allocated at full width and sliced in forward (views, never
# stored copies). `out_base * factor` is the full output size; at width w a layer outputs
# make_divisible(out_base * w, divisor) * factor channels (factor > 1 keeps MobileNetV2's expanded
# layers exactly `t` times their input, as in the standard width-w MobileNetV2). slim_out=False
# pins the output (classifier, MobileNetV2's last 1x1 conv); SlimLinear's slim_in slims its input
# instead, whatever width arrives (the US3L release's ViT).

class SlimWidth:
    """The width state of the layers that slice (SlimConv2d, SlimLinear): set_width(w) sets out_active."""

    def _init_slim(self, out_base, factor, divisor, slim_out):
        self.out_base, self.factor, self.divisor, self.slim_out = out_base, factor, divisor, slim_out
        self.set_width(1.0)

    def set_width(self, w):
        self.width = w
        c = make_divisible(self.out_base * w, self.divisor) if self.slim_out and w != 1.0 else self.out_base
        self.out_active = min(c, self.out_base) * self.factor


class SlimConv2d(nn.Conv2d, SlimWidth):
    def __init__(self, cin, cout, k, stride=1, padding=None, depthwise=False, bias=False,
                 factor=1, divisor=8, slim_out=True):
        super().__init__(cin, cout, k, stride, (k - 1) // 2 if padding is None else padding,
                         groups=cout if depthwise else 1, bias=bias)
        self.depthwise = depthwise
        self._init_slim(cout // factor, factor, divisor, slim_out)

    def forward(self, x):
        cin, cout = x.shape[1], self.out_active
        if self.depthwise:  # NOTE: a depthwise layer's output follows its input, not its own width
            cout = cin
        weight, bias = self.weight, self.bias
        if cout != weight.shape[0] or (cin != weight.shape[1] and not self.depthwise):
            # at full width the slice is skipped: its backward would allocate a weight-sized zero tensor
            weight = self.weight[:cout] if self.depthwise else self.weight[:cout, :cin]
            bias = self.bias[:cout] if self.bias is not None else None
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                        cout if self.depthwise else 1)

    def to_plain(self, cin):
        cout = cin if self.depthwise else self.out_active
        m = nn.Conv2d(cin, cout, self.kernel_size, self.stride, self.padding,
                      groups=cout if self.depthwise else 1, bias=self.bias is not None)
        m.weight.data.copy_(self.weight[:cout] if self.depthwise else self.weight[:cout, :cin])
        if self.bias is not None:
            m.bias.data.copy_(self.bias[:cout])
        return m


class SlimLinear(nn.Linear, SlimWidth):
    """Linear whose rows/columns may be structured in groups (ViT: q|k|v x heads, heads x head_dim);
    slimming then keeps the leading entries of every group, so each head shrinks, none is dropped.
    slim_in=True: at width w the layer reads only the leading in_active = make_divisible(cin * w) features of
    whatever input arrives (the US3L release's USLinear: its ViT keeps the token stream at full width and
    slims each Linear's input only; models.ViT(slim="input"))."""

    def __init__(self, cin, cout, bias=True, factor=1, divisor=8, slim_out=True, in_groups=1, out_groups=1,
                 slim_in=False):
        super().__init__(cin, cout, bias)
        self.in_groups, self.out_groups, self.slim_in = in_groups, out_groups, slim_in
        self._init_slim(cout // factor, factor, divisor, slim_out)

    def set_width(self, w):
        super().set_width(w)
        self.in_active = (min(make_divisible(self.in_features * w, self.divisor), self.in_features)
                          if self.slim_in and w != 1.0 else self.in_features)

    def _sliced(self, cin):
        cout, og, ig = self.out_active, self.out_groups, self.in_groups
        if cout == self.out_features and cin == self.in_features:
            return self.weight, self.bias
        if og == 1 and ig == 1:
            w = self.weight[:cout, :cin]
        else:  # (O, I) -> (og, O/og, ig, I/ig), keep the leading part of every group
            w = self.weight.view(og, -1, ig, self.in_features // ig)[:, :cout // og, :, :cin // ig]
            w = w.reshape(cout, cin)
        b = None if self.bias is None else self.bias.view(og, -1)[:, :cout // og].reshape(cout)
        return w, b

    def forward(self, x):
        if self.slim_in:
            x = x[..., :self.in_active]
        return F.linear(x, *self._sliced(x.shape[-1]))

    def to_plain(self, cin):  # cin: the input width that arrives (an input-slimmed layer reads in_active of it)
        w, b = self._sliced(min(cin, self.in_active))
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        m.weight.data.copy_(w)
        if b is not None:
            m.bias.data.copy_(b)
        return m


# sync BN's implementation on CUDA: fused (torch's sync-BN kernels) or python (_SyncBatchNorm, as on a CPU)
SYNC_BN_KERNELS = os.environ.get("SLIM_SYNC_BN", "fused")
if SYNC_BN_KERNELS not in ("fused", "python"):
    raise ValueError(f"SLIM_SYNC_BN={SYNC_BN_KERNELS!r} in the environment: fused (default) or python")


def _sync_active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fused(x):
    """Whether sync BN on x runs torch's fused kernels: CUDA tensors (the kernels exist for CUDA only)
    unless SLIM_SYNC_BN=python."""
    return x.device.type == "cuda" and SYNC_BN_KERNELS == "fused"


def _f32(x):  # bf16/fp16 -> fp32 for statistics; fp32 and fp64 stay as they are
    return x if x.dtype == torch.float64 else x.float()


def _pooled_moments(x):
    """Per-channel (mean, biased var) of x (B, C[, H, W]) over the batch of every process: each rank's
    count, mean and E[x^2] summed in float64 by one all-reduce (as calibrate_bn pools batches).
    -> (C,) fp32 (fp64 for fp64 inputs) each, the same on every rank, and the total count. Every rank
    must call it (a collective)."""
    dims = [0, *range(2, x.ndim)]
    var, mean = torch.var_mean(_f32(x), dim=dims, correction=0)
    n = x.numel() // x.shape[1]
    mean64 = mean.double()
    s = torch.cat([mean64 * n, (var.double() + mean64 * mean64) * n, mean64.new_full((1,), n)])
    dist.all_reduce(s)
    c = mean.numel()
    mean64 = s[:c] / s[-1]
    return mean64.to(mean.dtype), (s[c:2 * c] / s[-1] - mean64 * mean64).clamp_min(0).to(mean.dtype), s[-1]


class _SyncBatchNorm(torch.autograd.Function):
    """Training-mode batch norm whose statistics are those of the global batch (all processes), with
    the matching backward: the gradient through the shared mean and variance collects every rank's
    dy (one more all-reduce). Generic tensor ops, so it runs on CPU (tests, gloo) and GPU alike; torch's
    nn.SyncBatchNorm is GPU-only and knows no width slicing. Returns y and the pooled (mean, var).
    The reference: CUDA runs _FusedSyncBatchNorm (SLIM_SYNC_BN=python: this one), whose fp32 statistics
    agree with these to fp32 rounding (tests/test_sync_bn.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, var, n = _pooled_moments(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        y = (_f32(x) - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape = [0, *range(2, x.ndim)], (1, -1) + (1,) * (x.ndim - 2)
        dy = dy.to(mean.dtype)
        xhat = (_f32(x) - mean.view(shape)) * invstd.view(shape)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)  # this rank's d bias, d weight
        g = torch.cat([sum_dy, sum_dy_xhat]).double()
        dist.all_reduce(g)
        mean_dy, mean_dy_xhat = (g / n).to(mean.dtype).chunk(2)
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        dw = None if weight is None else sum_dy_xhat.to(weight.dtype)
        return dx.to(x.dtype), dw, None if weight is None else sum_dy.to(weight.dtype), None


def _bn_layout(t):
    """t as the fused kernels take it (nn.SyncBatchNorm's rule): contiguous or channels_last, else a copy."""
    return t if t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)) \
        else t.contiguous()


def _fused_stats(x, eps):
    """Per-channel (mean, invstd = 1/sqrt(var + eps)) of x (B, C[, H, W]) over every process's batch, by
    torch's sync-BN kernels (CUDA): each rank's mean, invstd and count in one all_gather, combined as
    parallel variances (batch_norm_gather_stats_with_counts). -> mean, invstd (C,) fp32 (fp64 for fp64 x),
    the same on every rank, and the counts (world, 1). Every rank must call it (a collective).
    NOTE: no empty batch on any rank (nn.SyncBatchNorm drops those with a host sync; every rank here holds
    the same batch size, drop_last)."""
    mean, invstd = torch.batch_norm_stats(x, eps)  # one pass; fp32 accumulation for bf16/fp16 x
    c, world = mean.numel(), dist.get_world_size()
    local = torch.cat([mean, invstd, mean.new_full((1,), x.numel() // c)])
    gathered = local.new_empty(world * local.numel())
    dist.all_gather_into_tensor(gathered, local)
    mean_all, invstd_all, counts = gathered.view(world, -1).split([c, c, 1], dim=1)  # (W, C), (W, C), (W, 1)
    # NOTE: the kernel's first argument only sets the dtype it reads counts in (without running stats): mean_all's
    # fp32 (fp64), not a bf16 x's, in which counts above 256 are inexact
    mean, invstd = torch.batch_norm_gather_stats_with_counts(mean_all, mean_all, invstd_all, None, None, 0.0, eps,
                                                             counts.reshape(-1))
    return mean, invstd, counts


def _var(invstd, eps):  # the biased variance behind the fused kernels' invstd
    return (invstd.pow(-2) - eps).clamp_min(0)


class _FusedSyncBatchNorm(torch.autograd.Function):
    """_SyncBatchNorm on torch's fused CUDA kernels (those of torch.nn.SyncBatchNorm, here on the sliced
    weight and bias): statistics in one pass over x and one all_gather, the output in one more; the
    backward reduces dy once (one all-reduce of sum dy and sum dy (x - mean)) and writes dx in one pass.
    bf16/fp16 x: statistics and reductions in fp32, y and dx in x's dtype; channels_last stays so.
    Returns y and the global (mean, invstd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x = _bn_layout(x)
        mean, invstd, counts = _fused_stats(x, eps)
        ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
        ctx.mark_non_differentiable(mean, invstd)
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps), mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = _bn_layout(dy)
        sum_dy, sum_dy_xmu, dw, db = torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, need_x, need_w,
                                                                      need_b)  # this rank's d weight, d bias
        dx = None
        if need_x:
            g = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(g)
            sum_dy, sum_dy_xmu = g.chunk(2)
            w = weight if weight is None or weight.dtype == mean.dtype else weight.to(mean.dtype)  # as the kernel reads it
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts)
        return dx, dw if need_w else None, db if need_b else None, None


@torch.no_grad()
def _momentum_stats_(bn, x, c, sync):
    """Momentum BN ("Momentum^2 Teacher", Li et al. 2021): the running statistics of the first c
    channels move toward this batch's (biased) mean and variance by the weight bn.stats_momentum, and
    normalize in place of the batch's (weight 1: plain batch norm). The first batch (num_batches_tracked
    0) sets them outright. sync: the global batch's statistics, so the same on every process.
    -> (mean, var) to normalize with."""
    if sync and _fused(x):
        mean, invstd, _ = _fused_stats(_bn_layout(x), bn.eps)
        var = _var(invstd, bn.eps)
    elif sync:
        mean, var, _ = _pooled_moments(x)
    else:
        var, mean = torch.var_mean(_f32(x), dim=[0, *range(2, x.ndim)], correction=0)
    m = torch.where(bn.num_batches_tracked == 0, 1.0, bn.stats_momentum).to(bn.running_mean)  # no host sync
    bn.running_mean[:c].lerp_(mean.to(m), m)
    bn.running_var[:c].lerp_(var.to(m), m)
    bn.num_batches_tracked += 1
    return bn.running_mean[:c], bn.running_var[:c]


class SlimBatchNorm2d(nn.BatchNorm2d):
    """BN shared by all widths: affine parameters sliced; batch statistics during training (running
    statistics mean nothing across widths), exact per-width statistics from calibrate_bn for eval.
    sync=True (set_sync_bn): in training, statistics of the active channel slice over every process's
    batch, so N processes of batch B/N normalize as one process of batch B."""

    def __init__(self, c):
        super().__init__(c)
        self.stats_channels = None  # how many channels calibrate_bn last wrote; eval refuses others
        self.stats_momentum = None  # momentum BN: the weight in [0, 1] of each new batch's statistics (set
        # by train_dspnet.py on its target only, every step: a schedule); None: off
        self.sync = False

    def forward(self, x):
        c = x.shape[1]
        w, b = (self.weight, self.bias) if c == self.num_features else (self.weight[:c], self.bias[:c])
        sync = self.training and self.sync and _sync_active()
        if self.training and self.stats_momentum is not None:  # momentum BN: normalize with an EMA of batch
            mean, var = _momentum_stats_(self, x, c, sync)  # statistics (the target: no gradient through them)
            return F.batch_norm(x, mean, var, w, b, False, 0.0, self.eps)
        if sync:
            return (_FusedSyncBatchNorm if _fused(x) else _SyncBatchNorm).apply(x, w, b, self.eps)[0]
        if self.training:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if self.stats_channels != c:
            raise RuntimeError(f"BN statistics are not calibrated for this width ({c} channels, calibrated for "
                               f"{self.stats_channels}): call calibrate_bn(model, batches, width=...) first")
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], w, b, False, 0.0, self.eps)

    def to_plain(self, c, check_stats=True):
        if check_stats and self.stats_channels != c:
            raise RuntimeError("export needs calibrated BN statistics: call calibrate_bn with the same "
                               "width and depth first")
        m = nn.BatchNorm2d(c, eps=self.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(m, name).data.copy_(getattr(self, name)[:c])
        return m


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d (the projector and heads: never slimmed) with the same sync switch: in training
    with sync=True, statistics over every process's batch, running statistics updated from them.
    stats_momentum: momentum BN as SlimBatchNorm2d's (DSPNet's target projector)."""

    def __init__(self, c, affine=True):
        super().__init__(c, affine=affine)
        self.sync = False
        self.stats_momentum = None  # momentum BN weight (train_dspnet.py's target); None: off

    def forward(self, x):
        if self.training and self.stats_momentum is not None:
            mean, var = _momentum_stats_(self, x, x.shape[1], self.sync and _sync_active())
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if not (self.training and self.sync and _sync_active()):
            return super().forward(x)
        if _fused(x):
            y, mean, invstd = _FusedSyncBatchNorm.apply(x, self.weight, self.bias, self.eps)
            var = _var(invstd, self.eps)
        else:
            y, mean, var = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():  # as nn.BatchNorm1d: running var unbiased over the global batch
            n = x.shape[0] * dist.get_world_size()  # every rank holds the same batch size (drop_last)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / max(n - 1, 1)).to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked += 1
        return y


class SlimLayerNorm(nn.LayerNorm):
    def forward(self, x):
        c = x.shape[-1]
        if c == self.normalized_shape[0]:
            return F.layer_norm(x, (c,), self.weight, self.bias, self.eps)
        return F.layer_norm(x, (c,), self.weight[:c], self.bias[:c], self.eps)

    def to_plain(self, c):
        m = nn.LayerNorm(c, eps=self.eps)
        m.weight.data.copy_(self.weight[:c])
        m.bias.data.copy_(self.bias[:c])
        return m


SLIM = (SlimConv2d, SlimLinear, SlimBatchNorm2d, SlimLayerNorm)


def conv_bn(cin, cout, k=3, stride=1, act=nn.ReLU, **kw):
    layers = [SlimConv2d(cin, cout, k, stride, **kw), SlimBatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


def sincos_pos_embed(dim, grid):
    """MoCo v3's fixed 2-D sin-cos position embedding (1, grid^2 + 1, dim), class token row 0: patch (h, w)
    gets sin(w o_i), cos(w o_i), sin(h o_i), cos(h o_i), o_i = 10000^(-4i/dim). NOTE: ordered frequency
    by frequency (not MoCo v3's [sin w|cos w|sin h|cos h] blocks: a channel permutation), so the leading
    C channels a slimmed models.ViT runs are a sin-cos of both axes, and a channel's code is the same
    at every width (docs/design.md)."""
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    h, w = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    aw, ah = w.reshape(-1, 1) * omega, h.reshape(-1, 1) * omega  # (grid^2, dim/4)
    pe = torch.stack([aw.sin(), aw.cos(), ah.sin(), ah.cos()], -1).reshape(grid * grid, dim)
    return torch.cat([torch.zeros(1, dim, dtype=pe.dtype), pe]).unsqueeze(0).float()
