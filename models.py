"""Slimmable networks: one set of weights, many sub-networks (leading-channel slices).

Used by both papers of this repo: US3L ("Three Guidelines You Should Know for Universally Slimmable
Self-Supervised Learning", Cao et al., CVPR 2023) slims ResNets, MobileNetV2 and ViTs to any width;
DSPNet ("DSPNet: Towards Slimmable Pretrained Networks based on Discriminative Self-supervised
Learning") slims MobileNetV3 by width and ResNets by width and depth.

The layers that slice (SlimConv2d, SlimLinear, SlimBatchNorm2d, SlimLayerNorm) are in slim.py; this
file builds the architectures from them and holds what you do with a sub-network:

    model = ARCHS["resnet50"]()                        # backbone: (B, 3, H, W) -> (B, D_w)
    set_active(model, width=0.5)                       # every forward now runs the 0.5x sub-network
    set_sync_bn(model)                                 # N processes: BN statistics of the global batch
    calibrate_bn(model, batches, width=0.5)            # exact BN statistics for that sub-network
    net = export(model, width=0.5)                     # plain nn.Module, same eval output
    params, macs = profile(model, width=0.5, input_size=224)
    net = load_subnet("out/run/backbone.pt", width=0.5, batches=calib)  # a pretrained slice, BN calibrated
    net = subnet(model, width=0.5, batches=calib)      # the same for a backbone in memory (export.py)

This file imports only slim.py from the rest of the repo: copy the two into another project if you like.
CLI: python models.py --arch resnet50 --widths 0.25,0.5,0.75,1.0 --input_size 224
"""

import argparse
import contextlib
import copy
import math
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from slim import (SLIM, BatchNorm1d, SlimBatchNorm2d, SlimConv2d, SlimLayerNorm, SlimLinear, SlimWidth, conv_bn,
                  make_divisible, sincos_pos_embed)

# ----------------------------------------------------------------------------------------------
# ResNet (BasicBlock / Bottleneck, ImageNet or CIFAR stem, any stage widths and depths)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = SlimConv2d(cin, planes, 3, stride), SlimBatchNorm2d(planes)
        self.conv2, self.bn2 = SlimConv2d(planes, planes, 3), SlimBatchNorm2d(planes)
        self.shortcut = (conv_bn(cin, planes, 1, stride, act=None) if stride != 1 or cin != planes
                         else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * 4
        self.conv1, self.bn1 = SlimConv2d(cin, planes, 1), SlimBatchNorm2d(planes)
        self.conv2, self.bn2 = SlimConv2d(planes, planes, 3, stride), SlimBatchNorm2d(planes)
        self.conv3, self.bn3 = SlimConv2d(planes, cout, 1), SlimBatchNorm2d(cout)
        self.shortcut = (conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    def __init__(self, block, depths, widths=(64, 128, 256, 512), stem="imagenet", num_classes=0):
        super().__init__()
        # The stem follows the first stage's width (64 for the standard ResNets; DSPNet's wider DNs
        # scale it with the stages, which the paper does not spell out).
        c = widths[0]
        if stem in ("cifar", "cifar_s2"):  # 3x3 conv, no max-pool: 32x32 first stage at 32 px (cifar_s2: 16x16)
            self.stem = conv_bn(3, c, 3, 2 if stem == "cifar_s2" else 1)
        else:
            self.stem = nn.Sequential(conv_bn(3, c, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages = []
        for i, (d, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(d):
                blocks.append(block(c, planes, 2 if (i > 0 and j == 0) else 1))
                c = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.depth = list(depths)  # active blocks per stage; set_active changes it
        self.max_depth = list(depths)
        self.feature_dim = c
        self.head = SlimLinear(c, num_classes, slim_out=False) if num_classes else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """torchvision's ResNet init, from each layer's own shape (reinit applies it to an exported slice)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        for stage, d in zip(self.stages, self.depth):
            for block in stage[:d]:  # DSPNet depth slimming: the first d blocks of each stage
                x = block(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ----------------------------------------------------------------------------------------------
# MobileNetV2 (US3L's CIFAR runs) and MobileNetV3-Large (DSPNet)

class InvertedResidual(nn.Module):
    """MobileNetV2 block (t = expand ratio) or, with se/act/k given, MobileNetV3's bneck."""

    def __init__(self, cin, cout, stride, t=None, exp=None, k=3, se=False, act=nn.ReLU6):
        super().__init__()
        # V2: hidden = t * (active input), exactly as a width-w MobileNetV2; V3: its own width.
        hidden = cin * t if t else exp
        layers = []
        if hidden != cin:
            layers.append(conv_bn(cin, hidden, 1, act=act, factor=t or 1))
        layers.append(conv_bn(hidden, hidden, k, stride, act=act, depthwise=True))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = SlimConv2d(c, make_divisible(c // 4), 1, bias=True)
        self.fc2 = SlimConv2d(make_divisible(c // 4), c, 1, bias=True)

    def forward(self, x):
        s = F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)), inplace=True)
        return x * F.hardsigmoid(self.fc2(s))


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1)]  # (t, c, n, s) from the MobileNetV2 paper

    def __init__(self, cifar=False, num_classes=0):
        super().__init__()
        # CIFAR variant (the papers give none): stride 1 in the stem and in the 24-channel stage, so
        # 32 px inputs end at 4x4 as 224 px ones end at 7x7.
        layers, c = [conv_bn(3, 32, 3, 1 if cifar else 2, act=nn.ReLU6)], 32
        for i, (t, cout, n, s) in enumerate(self.CFG):
            for j in range(n):
                stride = (1 if cifar and i == 1 else s) if j == 0 else 1
                layers.append(InvertedResidual(c, cout, stride, t=t))
                c = cout
        # The last 1x1 conv keeps 1280 channels at every width <= 1, as in the standard width-w
        # MobileNetV2 (and US-Nets), so features are 1280-d at every width.
        layers.append(conv_bn(c, 1280, 1, act=nn.ReLU6, slim_out=False))
        self.features = nn.Sequential(*layers)
        self.feature_dim = 1280
        self.head = SlimLinear(1280, num_classes, slim_out=False) if num_classes else nn.Identity()

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MobileNetV3(nn.Module):
    # (k, exp, c, se, hardswish, s) for MobileNetV3-Large, from the MobileNetV3 paper, Table 1
    CFG = [(3, 16, 16, 0, 0, 1), (3, 64, 24, 0, 0, 2), (3, 72, 24, 0, 0, 1), (5, 72, 40, 1, 0, 2),
           (5, 120, 40, 1, 0, 1), (5, 120, 40, 1, 0, 1), (3, 240, 80, 0, 1, 2), (3, 200, 80, 0, 1, 1),
           (3, 184, 80, 0, 1, 1), (3, 184, 80, 0, 1, 1), (3, 480, 112, 1, 1, 1), (3, 672, 112, 1, 1, 1),
           (5, 672, 160, 1, 1, 2), (5, 960, 160, 1, 1, 1), (5, 960, 160, 1, 1, 1)]

    def __init__(self, num_classes=0):
        super().__init__()
        layers, c = [conv_bn(3, 16, 3, 2, act=nn.Hardswish)], 16
        for k, exp, cout, se, hs, s in self.CFG:
            act = nn.Hardswish if hs else nn.ReLU
            layers.append(InvertedResidual(c, cout, s, exp=exp, k=k, se=se, act=act))
            c = cout
        layers.append(conv_bn(c, 960, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        # Features come after the 960 -> 1280 layer of the classifier (slimmed too), as timm's
        # MobileNetV3 with num_classes=0: that is the representation a DSPNet DN hands downstream.
        self.fc = SlimLinear(960, 1280)
        self.feature_dim = 1280
        self.head = SlimLinear(1280, num_classes, slim_out=False) if num_classes else nn.Identity()

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.head(F.hardswish(self.fc(x)))


# ----------------------------------------------------------------------------------------------
# Vision Transformer, slimmed one of two ways (ViT's `slim` argument):
#
# slim="embed": real embedding-dimension slimming, as the paper words it (US3L Sec. 4.3: "we directly reduce
#   the embedding dimension in all layers"): patch projection, LayerNorms, residual stream, q/k/v, heads and
#   MLP all shrink; the width-w network is a narrower ViT. The paper is silent on heads: we keep the number of
#   heads and shrink every head, so the width unit is 8 * heads (each head a multiple of 8 dims).
# slim="input": what the official release ran for Table 3 (ViT_experiments/models/us_vits.py, USLinear with
#   its default us=[True, False]): at width w, qkv, proj, fc1 and fc2 each read only the leading
#   n = make_divisible(C_in * w) features of their input. The patch projection (a plain conv there), the
#   LayerNorms (its USLayerNorm computes a width and ignores it), class token, position embedding, residual
#   stream, head dim (D / heads, and the attention scale with it) and the features handed to the projector stay
#   full. proj reads the attention output's leading heads, fc2 the leading hidden units.
#   NOTE: the release computes every head and all 4D hidden units at every width and then never reads most of
#   them; we compute only what is read, with the same outputs: q, k and v of the heads proj reads (the leading
#   ceil(n / head_dim); of a partly read head, v is computed whole) and the hidden units fc2 reads. So the
#   width-w network is a ViT with a full-width residual stream, fewer heads and a narrower MLP: export() gives
#   it and profile() counts it. LayerNorm scales and shifts past n touch features no Linear reads at width w.
# NOTE: the two modes make different networks of the same name: Table 3's 0.25x is, in the release, a full-width
#   ViT whose four Linears per block read a quarter of their inputs, not a ViT a quarter as wide. At 224 px and
#   w = 0.25, vit_tiny_us3l keeps 17% of its parameters and 19% of its MACs (27% and 37% as the release runs
#   it, dropped outputs included); vit_tiny keeps 7% and 9%. The "embed" archs (vit_tiny, vit_*_cifar*) follow
#   the paper's words at 32 px; the "_us3l" archs follow its code (224 px CIFAR images, 16 x 16 patches, the
#   release's heads).
#
# init="mocov3" (MoCo v3's ViT, which the release builds on): Xavier-uniform for every Linear, qkv's fused
#   weight as three blocks q, k, v, each with the bound of its own (D_out/3, D_in) shape; zero biases; class
#   token N(0, 1e-6^2); patch projection Xavier-uniform over its (D, 3 * p * p) flattening (fan_in 3 p^2,
#   fan_out D, not torch's fans of a 4-D conv weight, which count p^2 on both sides) with a zero bias.
#   init="trunc_normal" (timm / DeiT's): trunc N(0, 0.02^2) Linear weights, zero biases, class token trunc
#   N(0, 0.02^2), PyTorch's default conv init for a trained patch projection. Either rule reads each layer's own
#   shape, so models.reinit applies it to an exported narrow slice.
# frozen_patch_embed=True (MoCo v3's stop-grad patch projection, which the release's run_ofa.sh turns on): the
#   projection keeps its Xavier-uniform weight and zero bias (with either init) and neither is ever trained.

def _linear(layer, x):
    """layer(x) on x's leading layer.in_features features. Only an exported slim="input" layer (a plain
    nn.Linear of the slice's width, fed a wider input) gets more than it reads; a SlimLinear with slim_in
    slices by itself, and everywhere else this is all of x."""
    return layer(x[..., :layer.in_features])


class _InputQKV(SlimLinear):
    """slim="input"'s qkv: reads in_active features of the full-width stream and outputs q, k and v (rows
    ordered (q|k|v, head, head_dim)) of the leading heads whose values proj reads, ceil(in_active / head_dim)."""

    def __init__(self, dim, heads):
        super().__init__(dim, 3 * dim, slim_out=False, slim_in=True, out_groups=3)
        self.head_dim = dim // heads

    def set_width(self, w):
        super().set_width(w)
        if w != 1.0:  # (the constructor's call, at 1.0, comes before head_dim is set)
            heads = -(-self.in_active // self.head_dim)
            self.out_active = 3 * heads * self.head_dim


class Attention(nn.Module):
    def __init__(self, dim, heads, divisor, slim="embed"):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads if slim == "input" else None  # fixed (input) or shrinking (embed)
        if slim == "input":  # proj reads the leading in_active features: whole heads, the last one maybe in part
            self.qkv = _InputQKV(dim, heads)
            self.proj = SlimLinear(dim, dim, slim_out=False, slim_in=True)
        else:  # qkv rows ordered (q|k|v, head, head_dim); proj columns ordered (head, head_dim)
            self.qkv = SlimLinear(dim, 3 * dim, factor=3, divisor=divisor, out_groups=3 * heads)
            self.proj = SlimLinear(dim, dim, divisor=divisor, in_groups=heads)

    def forward(self, x):
        B, N, C = x.shape
        qkv = _linear(self.qkv, x)
        qkv = qkv.reshape(B, N, 3, *((self.heads, -1) if self.head_dim is None else (-1, self.head_dim)))
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, N, head dim)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(active head dim)
        return _linear(self.proj, x.transpose(1, 2).reshape(B, N, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, divisor, mlp_ratio=4, slim="embed"):
        super().__init__()
        if slim == "input":  # fc1 outputs exactly the hidden units fc2 reads: make_divisible(4 D w) both
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, divisor, slim)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.fc1 = SlimLinear(dim, mlp_ratio * dim, slim_in=True)
            self.fc2 = SlimLinear(mlp_ratio * dim, dim, slim_out=False, slim_in=True)
        else:
            self.norm1, self.attn = SlimLayerNorm(dim, eps=1e-6), Attention(dim, heads, divisor)
            self.norm2 = SlimLayerNorm(dim, eps=1e-6)
            self.fc1 = SlimLinear(dim, mlp_ratio * dim, factor=mlp_ratio, divisor=divisor)
            self.fc2 = SlimLinear(mlp_ratio * dim, dim, divisor=divisor)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + _linear(self.fc2, F.gelu(_linear(self.fc1, self.norm2(x))))


class ViT(nn.Module):
    """ViT backbone: (B, 3, img_size, img_size) -> class token features (B, D_w); D_w = dim at every width with
    slim="input". pos_embed: "learned" (N(0, 0.02^2)) or "sincos" (MoCo v3's, fixed); init: "trunc_normal" or
    "mocov3"; slim: "embed" or "input" (see above)."""

    def __init__(self, dim=192, depth=12, heads=3, img_size=224, patch_size=16, num_classes=0,
                 pos_embed="learned", frozen_patch_embed=False, init="trunc_normal", slim="embed"):
        super().__init__()
        for key, value, allowed in (("init", init, ("trunc_normal", "mocov3")), ("slim", slim, ("embed", "input"))):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}, allowed: {', '.join(allowed)}")
        divisor = 8 * heads
        self.img_size, self.init, self.slim = img_size, init, slim
        if slim == "embed":
            self.patch_embed = SlimConv2d(3, dim, patch_size, patch_size, padding=0, bias=True, divisor=divisor)
        else:  # the release's: a plain projection to the full width
            self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = img_size // patch_size
        if pos_embed == "sincos":  # MoCo v3's: fixed, a buffer (never trained or decayed)
            self.register_buffer("pos_embed", sincos_pos_embed(dim, grid))  # dim: a multiple of 8 * heads
        elif pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, grid ** 2 + 1, dim) * 0.02)
        else:
            raise ValueError(f"pos_embed={pos_embed!r}, allowed: learned, sincos")
        self.blocks = nn.Sequential(*[Block(dim, heads, divisor, slim=slim) for _ in range(depth)])
        self.norm = SlimLayerNorm(dim, eps=1e-6) if slim == "embed" else nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim
        self.head = SlimLinear(dim, num_classes, slim_out=False) if num_classes else nn.Identity()
        self.frozen_patch_embed = frozen_patch_embed
        self.init_weights()
        if frozen_patch_embed:  # MoCo v3's: weight and bias never trained (requires_grad=False)
            self.patch_embed.requires_grad_(False)

    def init_weights(self):
        """From each layer's own shape (reinit applies it to an exported slice, whose layers are plain
        nn.Linear / nn.Conv2d). The learned position embedding keeps its N(0, 0.02^2) draw: the same for any
        width."""
        if self.init == "mocov3":
            qkv = {m.qkv for m in self.modules() if isinstance(m, Attention)}
            for m in self.modules():
                if isinstance(m, nn.Linear):  # Xavier-uniform; q, k and v each as a (D_out/3, D_in) layer
                    fan_out, fan_in = m.weight.shape
                    bound = math.sqrt(6 / ((fan_out // 3 if m in qkv else fan_out) + fan_in))
                    nn.init.uniform_(m.weight, -bound, bound)
                    nn.init.zeros_(m.bias)
            nn.init.normal_(self.cls_token, std=1e-6)
        else:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.init == "mocov3" or self.frozen_patch_embed:
            w = self.patch_embed.weight.data  # (D, 3, p, p) -> Xavier over (D, 3 p^2)
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, N, C)
        C = x.shape[-1]
        x = torch.cat([self.cls_token[..., :C].expand(x.shape[0], -1, -1), x], 1) + self.pos_embed[..., :C]
        return self.head(self.norm(self.blocks(x))[:, 0])  # class token


def projection_mlp(in_dim, hidden_dim, out_dim, last_bn=False, layers=2):
    """Projector / predictor / aux head: Linear-BN-ReLU-Linear (BYOL; layers=3: one more Linear-BN-ReLU, MoCo
    v3). The first Linear takes whatever width arrives (a slimmed backbone's D_w features); the rest is fixed."""
    mods = [SlimLinear(in_dim, hidden_dim, bias=False, slim_out=False), BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    for _ in range(layers - 2):
        mods += [nn.Linear(hidden_dim, hidden_dim, bias=False), BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
    mods.append(nn.Linear(hidden_dim, out_dim, bias=not last_bn))
    return nn.Sequential(*mods, *([BatchNorm1d(out_dim, affine=False)] if last_bn else []))


ARCHS = {
    "resnet18": partial(ResNet, BasicBlock, [2, 2, 2, 2]),
    "resnet34": partial(ResNet, BasicBlock, [3, 4, 6, 3]),
    "resnet50": partial(ResNet, Bottleneck, [3, 4, 6, 3]),
    "resnet18_cifar": partial(ResNet, BasicBlock, [2, 2, 2, 2], stem="cifar"),
    "resnet18_cifar_s2": partial(ResNet, BasicBlock, [2, 2, 2, 2], stem="cifar_s2"),  # the quick runs' network
    "resnet50_cifar": partial(ResNet, Bottleneck, [3, 4, 6, 3], stem="cifar"),
    # ResNet-18 at a quarter of the widths (0.7M params): the test suite's network, and a smoke run's
    "resnet18_cifar_tiny": partial(ResNet, BasicBlock, [2, 2, 2, 2], widths=(16, 32, 64, 128), stem="cifar"),
    # DSPNet's 9 ResNet DNs live in this one network: stage widths {64,80,96} x [1,2,4,8] are
    # widths 2/3, 5/6, 1 of it, depths [2,2,2,2] / [2,3,4,3] / [3,4,6,3] are depth slices.
    "resnet34_w96": partial(ResNet, BasicBlock, [3, 4, 6, 3], widths=(96, 192, 384, 768)),
    "resnet34_w96_cifar": partial(ResNet, BasicBlock, [3, 4, 6, 3], widths=(96, 192, 384, 768), stem="cifar"),
    # the same at a quarter of the widths (3.1M params): the test suite's stand-in for resnet34_w96 in the
    # README's DSPNet commands (its 9 DNs are still distinct networks; at width 5/6 the stem and first stage
    # round to the full 24 channels)
    "resnet34_w24_cifar": partial(ResNet, BasicBlock, [3, 4, 6, 3], widths=(24, 48, 96, 192), stem="cifar"),
    "mobilenetv2": MobileNetV2,
    "mobilenetv2_cifar": partial(MobileNetV2, cifar=True),
    "mobilenetv3_large": MobileNetV3,
    "vit_tiny": partial(ViT, 192, 12, 3),
    "vit_small": partial(ViT, 384, 12, 6),
    "vit_tiny_cifar": partial(ViT, 192, 12, 3, img_size=32, patch_size=4),  # 64 tokens at 32 px
    "vit_small_cifar": partial(ViT, 384, 12, 6, img_size=32, patch_size=4),
    "vit_tiny_cifar_mocov3": partial(ViT, 192, 12, 3, img_size=32, patch_size=4, pos_embed="sincos",  # MoCo v3's
                                     frozen_patch_embed=True, init="mocov3"),  # fixed sin-cos, frozen patch projection
    # The release's Table 3 networks (ViT_experiments/models/us_vits.py us_vit_tiny / us_vit_small, run_ofa.sh):
    # CIFAR images at 224 px, 16 x 16 patches (196 tokens), head dim 32, MoCo v3's init, sin-cos and frozen patch
    # projection (--stop-grad-conv1), each Linear's input slimmed (slim="input")
    "vit_tiny_us3l": partial(ViT, 192, 12, 6, img_size=224, patch_size=16, pos_embed="sincos", frozen_patch_embed=True,
                             init="mocov3", slim="input"),
    "vit_small_us3l": partial(ViT, 384, 12, 12, img_size=224, patch_size=16, pos_embed="sincos",
                              frozen_patch_embed=True, init="mocov3", slim="input"),
}


# ----------------------------------------------------------------------------------------------
# Width/depth control, BN calibration, export, profile

def set_sync_bn(model, sync=True):
    """Switch every BN of the model (slimmable and head BNs) to statistics over all processes in
    training (sync=True; no effect in a single process) or per process. calibrate_bn and export
    always use each process's own batches, sync or not."""
    for m in model.modules():
        if isinstance(m, (SlimBatchNorm2d, BatchNorm1d)):
            m.sync = sync
    return model


@contextlib.contextmanager
def _local_bn(model):
    """Per-process BN inside (calibration and tracing forward a rank's own batches, in any number)."""
    bns = [m for m in model.modules() if isinstance(m, (SlimBatchNorm2d, BatchNorm1d))]
    was = [m.sync for m in bns]
    set_sync_bn(model, False)
    try:
        yield
    finally:
        for m, sync in zip(bns, was):
            m.sync = sync


def load_backbone(path, teacher=False):
    """The backbone saved by train_us3l.py / train_dspnet.py (backbone.pt): plain tensors and
    primitives, loaded with weights_only=True. Returns (model at full width, checkpoint dict)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder: pass the backbone.pt in it (train_*.py writes one per run)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # not a checkpoint, cut short, or not plain tensors
        raise ValueError(f"{path} is not a checkpoint this code can read ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:120]}); pass a backbone.pt written by train_*.py") from None
    key = "teacher" if teacher else "backbone"
    if not isinstance(ckpt, dict) or key not in ckpt:
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} holds no {key!r} weights ({have}); pass a backbone.pt written by train_*.py")
    model = ARCHS[ckpt["arch"]]()
    model.load_state_dict(ckpt[key])
    return model, ckpt


def load_subnet(path, width=None, depth=None, dn=None, batches=None, teacher=False):
    """A pretrained sub-network of backbone.pt as a plain nn.Module (eval mode) for your own code:

        net = load_subnet("out/run/backbone.pt", width=0.5, batches=calib)  # calib: ~2000 training images
        feats = net(images)                                                  # (B, D_w) features

    width/depth: the slice (default: an individual checkpoint's network, else 1.0); dn: an index into a
    DSPNet checkpoint's DN list (largest first) instead. batches: images as in training (tensors or
    (x, y) pairs, normalized by data.eval_transform with the run's normalization: its config's mean/std
    keys, else the dataset's preset) on which BN is calibrated for this slice, which eval-mode use needs;
    None leaves BN uncalibrated (fine-tuning with BN in train mode only). The second half is subnet()."""
    model, ckpt = load_backbone(path, teacher)
    if dn is not None:
        if not ckpt.get("dns") or not 0 <= dn < len(ckpt["dns"]) or width is not None or depth is not None:
            raise ValueError(f"dn={dn}: an index into {path}'s DN list ({len(ckpt.get('dns') or [])} DNs), "
                             f"without width or depth")
        width, depth = ckpt["dns"][dn]["width"], ckpt["dns"][dn]["depth"]
    ind = ckpt.get("individual")
    width = width if width is not None else (ind["width"] if ind else 1.0)
    depth = depth if depth is not None or not ind else ind["depth"]
    if ind and (round(width, 4), depth) != (round(ind["width"], 4), ind["depth"]):
        raise ValueError(f"{path} is an individually pretrained network (width {ind['width']}, depth "
                         f"{ind['depth']}): no other slice was trained")
    if width < ckpt.get("width_min", 0.0) - 1e-6:
        raise ValueError(f"width={width} lies below {ckpt['width_min']}, the smallest width {path} was trained at")
    return subnet(model, width, depth, batches)


def subnet(model, width=1.0, depth=None, batches=None):
    """The slice (width, depth) of a slimmable backbone in memory as a plain nn.Module (eval mode): BN
    calibrated for it on `batches` (calibrate_bn, on the model's device, under the caller's autocast if
    any), then export. load_subnet does this after loading backbone.pt; export.py for each network it
    writes. batches None: BN left uncalibrated. The model keeps the calibrated statistics, at width 1.0."""
    if batches is not None:
        calibrate_bn(model, batches, width, depth)
    return export(model, width, depth, check_stats=batches is not None)


def set_active(model, width=1.0, depth=None):
    """Select the sub-network run by every following forward, in place. depth: per-stage block
    counts (ResNets only), None = all blocks."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    for m in model.modules():
        if isinstance(m, (SlimConv2d, SlimLinear)):
            m.set_width(width)
        elif isinstance(m, ResNet):
            if depth is None:
                m.depth = list(m.max_depth)
            elif len(depth) != len(m.max_depth) or not all(1 <= d <= dm for d, dm in zip(depth, m.max_depth)):
                raise ValueError(f"depth must list {len(m.max_depth)} stage depths, each in 1..max "
                                 f"{m.max_depth}; got {depth}")
            else:
                m.depth = list(depth)
    if depth is not None and not any(isinstance(m, ResNet) for m in model.modules()):
        raise ValueError(f"depth={depth} given, but only ResNets can be depth-slimmed")
    return model


def min_width(model):
    """The network's minimum width: at it the widest slimmable layer has `divisor` channels (an input-slimmed
    SlimLinear reads `divisor` features), so every layer sits at its floor (make_divisible never goes below
    the divisor) and any smaller width is the same network: 8/512 = 0.0156 for ResNet-18, 8/2048 for
    ResNet-50, 8/768 for vit_tiny_us3l (fc2 reads 768 hidden units)."""
    floors = [m.divisor / m.out_base for m in model.modules() if isinstance(m, SlimWidth) and m.slim_out]
    floors += [m.divisor / m.in_features for m in model.modules() if isinstance(m, SlimLinear) and m.slim_in]
    return min(floors, default=1.0)


def _batches_to_inputs(batches, device, dtype):
    for b in batches:
        x = b[0] if isinstance(b, (list, tuple)) else b
        yield x.to(device, dtype, non_blocking=True)


@torch.no_grad()
def calibrate_bn(model, batches, width=1.0, depth=None, all_reduce=False):
    """Exact BN statistics of the sub-network (width, depth): forward every calibration batch in
    training mode (batch statistics normalize, as in pretraining) and pool each BN input's mean and
    variance over ALL calibration images, not an EMA. batches: iterable of tensors or (x, y, ...).
    all_reduce: sum the statistics over processes (every rank must then call it). Networks without
    BN (ViT) need no calibration: then it only selects the sub-network."""

    def hook(bn, args):  # pool each batch's moments in float64: exact, and 2x faster than x.double()
        x = args[0].detach()
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
        n = x.numel() // x.shape[1]
        s = sums.setdefault(bn, [0.0, 0.0, 0])
        s[0] = s[0] + mean.double() * n
        s[1] = s[1] + (var.double() + mean.double() ** 2) * n
        s[2] += n

    set_active(model, width, depth)
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    if not bns:
        return model
    was_training = model.training
    model.train()
    p = next(model.parameters())
    sums, hooks = {}, [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        with _local_bn(model):
            for x in _batches_to_inputs(batches, p.device, p.dtype):
                model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("calibrate_bn got no calibration batch")
    for bn, (s1, s2, n) in sums.items():
        if all_reduce and dist.is_available() and dist.is_initialized():
            t = torch.cat([s1, s2, torch.tensor([float(n)], dtype=torch.float64, device=s1.device)])
            dist.all_reduce(t)
            c = s1.numel()
            s1, s2, n = t[:c], t[c:2 * c], t[-1].item()
        mean = s1 / n
        # NOTE: the population variance (PyTorch's running_var is unbiased): with it the eval network
        # reproduces the batch-statistics network on a single calibration batch exactly.
        var = (s2 / n - mean * mean).clamp_min(0)
        c = mean.numel()
        bn.running_mean[:c] = mean.to(bn.running_mean.dtype)
        bn.running_var[:c] = var.to(bn.running_var.dtype)
        bn.stats_channels = c
    return model


def _trace(model, width, depth):
    """Run one dummy forward of the sub-network; return {slim module: its active input size}."""
    set_active(model, width, depth)
    seen, hooks = {}, []

    def hook(m, args):  # channels are last for Linear/LayerNorm inputs, dim 1 for images
        seen.setdefault(m, args[0].shape[-1 if isinstance(m, (SlimLinear, SlimLayerNorm)) else 1])

    for m in model.modules():
        if isinstance(m, SLIM):
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.train()  # batch statistics: tracing must not depend on calibration
    p = next(model.parameters())
    size = getattr(model, "img_size", 32)  # any size works for the CNNs: 32 px is the cheapest
    try:
        with torch.no_grad(), _local_bn(model):
            model(torch.zeros(2, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def export(model, width=1.0, depth=None, check_stats=True):
    """A standalone plain network (nn.Conv2d / nn.BatchNorm2d / nn.Linear / nn.LayerNorm with the
    sub-network's shapes) whose eval-mode output equals the slimmed network's. Calibrate BN for the
    same (width, depth) first. Rebuild for loading: net = export(ARCHS[arch](), width, depth,
    check_stats=False); net.load_state_dict(torch.load(path, weights_only=True))."""
    seen = _trace(model, width, depth)
    names = {m: n for n, m in model.named_modules()}
    net = copy.deepcopy(model)
    for m, cin in seen.items():
        parent_name, _, attr = names[m].rpartition(".")
        parent = net.get_submodule(parent_name)
        if isinstance(m, SlimBatchNorm2d):
            plain = m.to_plain(cin, check_stats)
        else:
            plain = m.to_plain(cin)
        plain.requires_grad_(any(p.requires_grad for p in m.parameters()))  # a frozen layer stays frozen
        setattr(parent, attr, plain)
    for m in net.modules():
        if isinstance(m, ResNet):  # drop the blocks this depth skips
            m.stages = nn.ModuleList(nn.Sequential(*list(s)[:d]) for s, d in zip(m.stages, m.depth))
            m.max_depth = list(m.depth)
        if isinstance(m, ViT):
            c = m.norm.normalized_shape[0]
            m.cls_token = nn.Parameter(m.cls_token.data[..., :c].clone())
            pe = m.pos_embed.data[..., :c].clone()  # a Parameter (learned) or a buffer (sincos) as before
            m.pos_embed = nn.Parameter(pe, m.pos_embed.requires_grad) if isinstance(m.pos_embed, nn.Parameter) else pe
    left = [n for n, m in net.named_modules() if isinstance(m, SLIM)]
    assert not left, f"export left slimmable layers behind: {left}"
    set_active(model, 1.0)
    return net.eval()


def reinit(net):
    """Initialize `net`, a network of ARCHS or an exported slice of one, as its constructor does but from
    each layer's own shape: PyTorch's default per layer, then the architecture's rule (init_weights).
    A slice cut from a wide network's init is not that: Kaiming's std follows the fan of the full width."""
    for m in net.modules():
        if m is not net and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    if hasattr(net, "init_weights"):
        net.init_weights()
    return net


def slice_index(model, width=1.0, depth=None):
    """{name: flat indices} for each parameter of export(model, width, depth): the positions in the
    model's parameter of that name that its elements come from, in order. Found by exporting a copy
    whose parameters hold their own positions (float64 counts exactly up to 2**53)."""
    ids = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        for p in ids.parameters():
            p.copy_(torch.arange(p.numel(), dtype=torch.float64).view_as(p))
    net = export(ids, width, depth, check_stats=False)
    return {name: q.detach().reshape(-1).long() for name, q in net.named_parameters()}


def make_individual_(model, width=1.0, depth=None):
    """The papers' "individually trained" network inside the slimmable layout, in place: the slice
    (width, depth) holds a plain network of that size, initialized as one (reinit of the exported
    slice), and every other parameter is zero. Run at (width, depth), the model is that network; the
    zeros get no gradient and no weight decay (decay of 0 is 0), so training moves the slice only, and
    eval_knn.py / eval_linear.py / export.py read it like any slimmable backbone. Returns the model."""
    net = reinit(export(model, width, depth, check_stats=False))
    index, plain = slice_index(model, width, depth), dict(net.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_()
            if name in plain:
                p.view(-1)[index[name]] = plain[name].reshape(-1).to(p.dtype)
    return model


def profile(model, width=1.0, depth=None, input_size=224):
    """(params, macs) of the sub-network actually run at input_size x input_size (batch 1): weights
    of the executed slices only; MACs of convolutions, linear layers and attention matmuls."""
    net = export(model, width, depth, check_stats=False)
    params = sum(p.numel() for p in net.parameters())
    macs, hooks = [0], []

    def count(m, args, out):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            macs[0] += out[0].numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            macs[0] += out[0].numel() * m.in_features
        elif isinstance(m, Attention):  # q @ k^T and attn @ v: 2 * N * N * C per sample (C: the heads' width)
            macs[0] += 2 * x.shape[1] ** 2 * (m.qkv.out_features // 3)

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
            hooks.append(m.register_forward_hook(count))
    size = getattr(net, "img_size", input_size)
    p = next(net.parameters())
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    for h in hooks:
        h.remove()
    return params, macs[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Params and MACs of the sub-networks of a slimmable network")
    ap.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    ap.add_argument("--widths", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--depth", default=None, help="per-stage depths for ResNets, e.g. 2,2,2,2")
    ap.add_argument("--input_size", type=int, default=None, help="default: 32 for the CIFAR archs, else 224")
    ap.add_argument("--num_classes", type=int, default=None,
                    help="count a classifier of this size too, as published figures do (0: backbone only; "
                         "default: 1000 for the ImageNet archs, 100 for the CIFAR ones, the papers' CIFAR-100)")
    args = ap.parse_args()
    cifar = "cifar" in args.arch
    args.input_size = args.input_size or (32 if cifar else 224)
    args.num_classes = 100 if args.num_classes is None and cifar else 1000 if args.num_classes is None else args.num_classes
    model = ARCHS[args.arch](num_classes=args.num_classes)
    depth = [int(d) for d in args.depth.split(",")] if args.depth else None
    print(f"{args.arch}  input {args.input_size} px  depth {depth or 'full'}  "
          f"{'+ %d-way classifier' % args.num_classes if args.num_classes else 'backbone only'}")
    print(f"{'width':>6} {'params (M)':>11} {'MMACs':>9}")
    for w in [float(s) for s in args.widths.split(",")]:
        params, macs = profile(model, w, depth, args.input_size)
        print(f"{w:>6.3g} {params / 1e6:>11.2f} {macs / 1e6:>9.0f}")
