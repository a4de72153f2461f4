"""Batched on-device two-view augmentation (BYOL's, or MoCo v2's with aug="mocov2") and an on-device
CIFAR loader: `loader=device`, and the batched part of `loader=ffcv`
(docs/design.md, The three loaders). The CPU reference is data.byol_view / data.mocov2_view (PIL + torchvision per sample); this
module draws the same distributions with per-sample random parameters, vectorized over the batch, on
the uint8 batch's device (CPU or CUDA).

    aug = TwoViewAugment("cifar10").to(device)            # 32 px, no blur; "imagenet": 224 px, blur
    g = torch.Generator(device).manual_seed(0)
    v1, v2 = aug(x_uint8, generator=g)                     # (B, 3, H, W) uint8 -> 2 x (B, 3, 32, 32) float

    loader = DeviceLoader(data.build_dataset("data/cifar10", "train"), 512, device, aug, seed=0,
                          rank=rank, world=world)          # decodes the split once into device memory
    loader.set_epoch(epoch, start=step % loader.steps())   # before each epoch; start: batches done
    for (x1, x2), y in loader: ...

View 1: crop, flip, jitter p=0.8, grayscale p=0.2, blur p=1.0, no solarize; view 2: blur p=0.1,
solarize p=0.2 (BYOL, Grill et al. 2020, Table 6). aug="mocov2": both views crop, flip, a stronger
saturation jitter, grayscale, blur p=0.5 (none on CIFAR), no solarize (the US3L release). Each op
with explicit per-sample parameters is a function below (resized_crop, color_jitter, adjust_hue,
grayscale, gaussian_blur, solarize): the tests compare them with torchvision's functional ops.

NOTE: float32 throughout, where PIL rounds to 8 bits after each op. Crop + resize is PIL's
algorithm (bicubic a = -0.5, antialiased when shrinking; torchvision's antialias=True), not
grid_sample, so it matches the reference at any scale. Measured on a 2-core CPU (AVX512-BF16) under
load, 1 thread, batch 256 at 32 px: about 6k pairs/s (10k with glibc's MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ raised, see bench/bench_data.py). At 224 px the batched path is meant for
GPUs: on that CPU PIL's uint8 path is faster (0.64x), and the dense crop + resize matmuls alone take
about 2.3 ms per image and view (batch 32, 2 threads): the two crops of a pair take longer than
PIL's whole two-view pipeline (about 3.6 ms per pair with 2 workers).
"""

import contextlib
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from config import ConfigError
from data import MEAN_STD, EpochSampler, SeededViews, build_dataset, pretrain_transform, subset_indices
from ffcv_data import beton_labels, build_ffcv_loader, require_ffcv

# The references' constants (data.byol_view, data.mocov2_view); tests/test_augment.py checks them.
AUGS = ("byol", "mocov2")  # config key `aug`
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
JITTER = (0.4, 0.4, 0.2, 0.1)  # BYOL's ColorJitter(brightness, contrast, saturation, hue)
P_JITTER, P_GRAY = 0.8, 0.2  # both recipes
P_BLUR, P_SOLARIZE = {1: 1.0, 2: 0.1}, {1: 0.0, 2: 0.2}  # BYOL, per view
SIGMA = (0.1, 2.0)  # both recipes
# MoCo v2 (Chen et al. 2020), as the US3L release's CIFAR and ImageNet runs: both views alike, saturation
# 0.4 instead of 0.2, blur p=0.5 (CIFAR: none), no solarize, bilinear crops (torchvision's default)
MOCOV2_JITTER, MOCOV2_P_BLUR = (0.4, 0.4, 0.4, 0.1), 0.5
# NOTE: BYOL's 0.5 on [0, 1]. The reference (PIL, uint8) inverts pixels >= 128, i.e. >= 0.50196:
# the two differ only for continuous values in [0.5, 0.502).
SOLARIZE_THRESHOLD = 0.5
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2)

# -----------------------------------------------------------------------------
# Ops with explicit per-sample parameters. x: (B, 3, H, W) float in [0, 1], any memory format.


def crop_params(u, height, width, scale=(0.08, 1.0), ratio=RATIO):
    """torchvision's RandomResizedCrop.get_params for B samples at once. u: (B, 22) uniforms in
    [0, 1): 10 tries of (area fraction, log aspect ratio), then the top/left position. The first
    try whose box fits wins; if none fits, torchvision's central fallback. Returns (i, j, h, w),
    each (B,) int64. Float64 so that the rounding equals torchvision's Python floats."""
    u = u.double()
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])  # (B, 10) tries
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 10:20])
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # index of the first fitting try (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # fallback (all 10 tries failed): central crop at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = fits.any(1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    i = torch.where(ok, torch.floor(u[:, 20] * (height - h + 1)), (height - fh) // 2)  # randint(0, H-h+1)
    j = torch.where(ok, torch.floor(u[:, 21] * (width - w + 1)), (width - fw) // 2)
    return i.long(), j.long(), h.long(), w.long()


def _filter(d, interpolation):
    """PIL's separable resampling filters: Keys cubic with a = -0.5 (PIL's and torchvision's
    antialiased bicubic), or the triangle (bilinear). Branch-free: each piece is 0 at its ends."""
    d = d.abs()
    if interpolation == "bilinear":
        return (1 - d).clamp_(min=0)
    a = -0.5
    near, far = d.clamp(max=1), d.clamp(1, 2)
    return (((a + 2) * near - (a + 3)) * near * near + 1) + (((far - 5) * far + 8) * far - 4) * a


def resample_matrix(start, length, in_size, out_size, flip=None, interpolation="bicubic",
                    dtype=torch.float32):
    """(B, out_size, in_size): row o resamples the window [start, start + length) of an axis of
    in_size pixels to output pixel o, as PIL crops and then resizes: taps outside the window are
    dropped and the rest renormalized, the filter is stretched by length / out_size when shrinking
    (antialias). Rows reversed where flip (B,) is True: a horizontal flip for free."""
    start, length = start.to(dtype)[:, None, None], length.to(dtype)[:, None, None]  # (B, 1, 1)
    scale = length / out_size
    out = torch.arange(out_size, device=start.device, dtype=dtype)[None, :, None]  # (1, S, 1)
    if flip is not None:
        out = out + flip.to(dtype)[:, None, None] * (out_size - 1 - 2 * out)  # (B, S, 1): o -> S - 1 - o
    pos = torch.arange(in_size, device=start.device, dtype=dtype)[None, None, :] + 0.5  # pixel centers
    center = start + (out + 0.5) * scale  # (B, S, 1) in input pixel coordinates
    w = _filter((pos - center) / scale.clamp(min=1), interpolation)  # (B, S, in_size)
    w = w * ((pos > start) & (pos < start + length))  # only the window's pixels
    return w / w.sum(-1, keepdim=True)


def resized_crop(x, i, j, h, w, size, flip=None, interpolation="bicubic", gain=1.0):
    """Crop (i, j, h, w) of each sample, resized to (size, size), mirrored where flip: two batched
    matmuls with per-sample interpolation matrices, out = Wy @ (gain * x @ Wx^T) (gain 1/255 turns
    0..255 into [0, 1] for free), clamped to [0, 1] as PIL's 8-bit passes are. NOTE: the dense
    matrices cost size * W * (H + size) MACs per channel (the crop's sparsity is unused): trivial
    at 32 px and on a GPU, but at 224 px on this 2-core CPU PIL's uint8 SIMD resize is faster.
    On CUDA the matmuls may run in TF32 if torch.backends.cuda.matmul.allow_tf32 is set."""
    height, width = x.shape[-2:]
    wy = resample_matrix(i, h, height, size, None, interpolation, x.dtype)  # (B, S, H)
    wx = resample_matrix(j, w, width, size, flip, interpolation, x.dtype) * gain  # (B, S, W)
    # horizontal pass first and clamped, as PIL's two 8-bit passes (a cubic overshoot clipped in
    # between changes the second pass by up to a few levels near sharp edges)
    out = (x @ wx[:, None].transpose(-1, -2)).clamp_(0, 1)  # (B, 3, H, W) @ (B, 1, W, S): (B, 3, H, S)
    return (wy[:, None] @ out).clamp_(0, 1)  # (B, 1, S, H) @ (B, 3, H, S) -> (B, 3, S, S)


def grayscale(x):
    """(B, 3, H, W) -> (B, 1, H, W), torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY[0] + g * GRAY[1] + b * GRAY[2]).unsqueeze(1)


def _blend_slot(x, factors, op):
    """One position of the jitter sequence for the ops that blend with a reference image, as
    torchvision's _blend: brightness (op 0: with black), contrast (1: with the mean of the
    grayscale image), saturation (2: with the grayscale image); op -1: identity (factor 1).
    factors: (B, 4), op: (B,)."""
    f = torch.where(op >= 0, factors.gather(1, op.clamp(min=0)[:, None])[:, 0], 1.0).to(x.dtype)
    f, op = f[:, None, None, None], op[:, None, None, None]  # (B, 1, 1, 1)
    gray = grayscale(x)  # (B, 1, H, W)
    mean = gray.mean((-2, -1), keepdim=True)  # (B, 1, 1, 1)
    # NOTE: masks as 0/1 multipliers, not torch.where: where is not vectorized on CPU (several x slower)
    ref = torch.addcmul(mean * ((op == 1) * (1 - f)), gray, (op == 2) * (1 - f))  # (1 - f) * reference
    return torch.addcmul(ref, x, f).clamp_(0, 1)  # f * x + (1 - f) * reference


def adjust_hue(x, shift):
    """Rotate the HSV hue of each sample by shift (B,) in [-0.5, 0.5] turns, torchvision's
    RGB -> HSV -> RGB with the closed-form HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is
    V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6, C = max - min = V * S."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)  # (B, H, W)
    chroma = maxc - minc
    # hue in sixths of a turn; ties go to R, then G, as torchvision. NOTE: 0/1 masks as multipliers,
    # not torch.where, which is not vectorized on CPU (several times slower)
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype) * (1 - is_r)
    is_b = 1 - is_r - is_g
    num = (g - b) * is_r + (b - r) * is_g + (r - g) * is_b
    offset = torch.addcmul(2 * is_g + 4 * is_b, 6 * shift.to(x.dtype)[:, None, None], torch.ones_like(is_b))
    h6 = torch.addcmul(offset, num, 1 / (chroma + (chroma == 0)))
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for c, n in enumerate((5, 3, 1)):
        k = h6 + n
        k = k - 6 * torch.floor(k * (1 / 6))  # mod 6 (torch.remainder is slower on CPU)
        torch.addcmul(maxc, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1, out=out[:, c])
    return out  # (B, 3, H, W)


def color_jitter(x, factors, order, apply):
    """ColorJitter with per-sample factors (B, 4) = (brightness, contrast, saturation, hue), op order
    (B, 4) (a permutation of 0..3 per sample, 3 = hue) and apply (B,) bool. Vectorized without
    per-sample branches: the three blend ops before a sample's hue run in 3 slots, the hue once for
    all, the blend ops after it in 3 more slots (identity where a slot is empty), which costs 6 cheap
    blends + 1 hue instead of 4 x (3 blends + hue) with masks."""
    ident = torch.cat([torch.ones_like(factors[:, :3]), torch.zeros_like(factors[:, 3:])], 1)  # (B, 4)
    factors = torch.where(apply[:, None], factors, ident)
    pos_hue = (order == 3).long().argmax(1)  # (B,)
    for t in range(3):  # ops before the hue
        x = _blend_slot(x, factors, torch.where(pos_hue > t, order[:, t], -1))
    x = adjust_hue(x, factors[:, 3])  # a shift of 0 returns x to within an ulp
    for t in range(3):  # ops after the hue
        k = pos_hue + 1 + t
        x = _blend_slot(x, factors, torch.where(k < 4, order.gather(1, k.clamp(max=3)[:, None])[:, 0], -1))
    return x


def gaussian_blur(x, sigma, kernel_size, apply=None):
    """torchvision's gaussian_blur (reflect padding, kernel exp(-t^2 / 2 sigma^2) normalized) with a
    sigma (B,) per sample; samples where apply is False get a delta kernel (unchanged, exactly).
    Separable: two depthwise convolutions over the B * 3 planes."""
    n, c, height, width = x.shape
    if n == 0:  # e.g. none of view 2's samples drew the blur (CPU path)
        return x
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype)[:, None]) ** 2)  # (B, K)
    k = k / k.sum(1, keepdim=True)
    if apply is not None:
        k = torch.where(apply[:, None], k, (t == 0).to(x.dtype))
    k = k.repeat_interleave(c, 0)  # (B*3, K)
    p = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, height, width), (p, p, p, p), mode="reflect")  # (1, B*3, H+2p, W+2p)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H
    return y.view(n, c, height, width)


def solarize(x, apply, threshold=SOLARIZE_THRESHOLD):
    """Invert pixels >= threshold where apply (B,) is True (torchvision's float solarize)."""
    if threshold == 0.5:  # where(x >= 0.5, 1 - x, x) = min(x, 1 - x); min(x, 2 - x) = x for [0, 1] images
        return torch.minimum(x, (2 - apply.to(x.dtype))[:, None, None, None] - x)
    return torch.where(apply[:, None, None, None] & (x >= threshold), 1 - x, x)


# -----------------------------------------------------------------------------
# Modules


class BatchAugment(nn.Module):
    """One view of recipe `aug` (byol: data.byol_view's view 1 or 2; mocov2: data.mocov2_view, the
    same for either view) for a uint8 batch (B, 3, H, W) on any device, parameters drawn per sample
    from `generator` (on the batch's device; None: torch's default). Returns float (B, 3, size, size),
    normalized with mean_std ((mean, std) of data.normalization: the mean/std keys), None: data.MEAN_STD[dataset].
    A float input is taken as [0, 1] and its dtype kept.
    crop=False: the input was already cropped (e.g. by FFCV's RandomResizedCropRGBImageDecoder);
    only resized if not at size, then flipped and so on here. interpolation None: the recipe's
    (byol bicubic, mocov2 bilinear). blur_kernel: default 23 at 224 px (BYOL), about 10% of the
    size, odd; CIFAR has no blur."""

    def __init__(self, dataset="cifar10", size=None, view=1, crop=True, min_scale=0.08,
                 interpolation=None, blur_kernel=None, aug="byol", mean_std=None):
        super().__init__()
        byol = aug == "byol"
        interpolation = interpolation or ("bicubic" if byol else "bilinear")
        if view not in (1, 2) or interpolation not in ("bicubic", "bilinear") or aug not in AUGS:
            raise ValueError(f"view must be 1 or 2, interpolation bicubic|bilinear, aug byol|mocov2: "
                             f"got {view}, {interpolation}, {aug}")
        cifar = dataset.startswith("cifar")
        self.size = size or (32 if cifar else 224)
        self.view, self.crop, self.scale, self.interpolation = view, crop, (min_scale, 1.0), interpolation
        self.aug = aug
        # the references (data.byol_view, data.mocov2_view): CIFAR at 32 px has no blur
        self.p_blur = 0.0 if cifar else (P_BLUR[view] if byol else MOCOV2_P_BLUR)
        self.p_solarize = P_SOLARIZE[view] if byol else 0.0
        self.blur_kernel = blur_kernel or 2 * round(0.05 * self.size) + 1  # 224 -> 23
        b, c, s, h = JITTER if byol else MOCOV2_JITTER
        jitter_range = torch.tensor([[1 - b, 1 - c, 1 - s, -h], [1 + b, 1 + c, 1 + s, h]])
        # buffers: moved to the device once by .to(device), no host-to-device copy per batch
        self.register_buffer("jitter_range", jitter_range, persistent=False)
        mean, std = mean_std or MEAN_STD[dataset]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def sample(self, n, height, width, generator=None, device=None):
        """Parameters of n samples of (height, width) images, as a dict of (n, ...) tensors. One
        draw of (n, 36) uniforms, so the stream consumed does not depend on the values."""
        u = torch.rand(n, 36, generator=generator, device=device)
        i, j, h, w = crop_params(u[:, :22], height, width, self.scale)
        lo, hi = self.jitter_range.to(u.device)  # (4,) each
        return {"i": i, "j": j, "h": h, "w": w,
                "flip": u[:, 22] < 0.5,
                "jitter": u[:, 23] < P_JITTER,
                "factors": lo + (hi - lo) * u[:, 24:28],  # (n, 4) brightness, contrast, saturation, hue
                "order": u[:, 28:32].argsort(1),  # (n, 4) a uniformly random permutation per sample
                "gray": u[:, 32] < P_GRAY,
                "blur": u[:, 33] < self.p_blur,
                "sigma": SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[:, 34],
                "solarize": u[:, 35] < self.p_solarize}

    def apply(self, x, p):
        """The view with parameters p (from sample): crop + flip, jitter, grayscale, blur, solarize,
        normalize, in data.byol_view's order (data.mocov2_view flips last: the same distribution)."""
        gain = 1 / 255 if x.dtype == torch.uint8 else 1.0  # a float input is taken as [0, 1]
        x = x.float() if x.dtype == torch.uint8 else x
        n, _, height, width = x.shape
        if self.crop or (height, width) != (self.size, self.size):
            i, j, h, w = (p["i"], p["j"], p["h"], p["w"]) if self.crop else (
                x.new_zeros(n), x.new_zeros(n), x.new_full((n,), height), x.new_full((n,), width))
            x = resized_crop(x, i, j, h, w, self.size, p["flip"], self.interpolation, gain)
        else:
            x = torch.where(p["flip"][:, None, None, None], x.flip(-1), x) * gain
        x = color_jitter(x, p["factors"], p["order"], p["jitter"])
        m = p["gray"].to(x.dtype)[:, None, None, None]
        x = torch.addcmul(grayscale(x) * m, x, 1 - m)  # RandomGrayscale: 3 equal channels where m = 1
        if self.p_blur > 0:
            if x.device.type == "cpu" and self.p_blur < 1:
                # NOTE: on CPU a host sync is free, so only the drawn samples are blurred (10% of view 2);
                # on CUDA every sample runs, a delta kernel for the others. Same result either way.
                idx = p["blur"].nonzero()[:, 0]
                x = x.index_copy(0, idx, gaussian_blur(x[idx], p["sigma"][idx], self.blur_kernel))
            else:
                x = gaussian_blur(x, p["sigma"], self.blur_kernel, p["blur"])
        x = solarize(x, p["solarize"])
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return torch.addcmul(-mean / std, x, 1 / std)  # (x - mean) / std

    def forward(self, x, generator=None):
        """x: (B, 3, H, W) uint8 (or float in [0, 1]) -> (B, 3, size, size) normalized float."""
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], generator, x.device))


class TwoViewAugment(nn.Module):
    """data.pretrain_transform(dataset, size, min_scale, aug, mean_std) batched: view 1 then view 2 from one
    generator (aug=byol: BYOL's asymmetric pair; mocov2: two draws of one distribution)."""

    def __init__(self, dataset="cifar10", size=None, crop=True, min_scale=0.08, interpolation=None,
                 aug="byol", mean_std=None):
        super().__init__()
        self.view1 = BatchAugment(dataset, size, 1, crop, min_scale, interpolation, aug=aug, mean_std=mean_std)
        self.view2 = BatchAugment(dataset, size, 2, crop, min_scale, interpolation, aug=aug, mean_std=mean_std)

    def forward(self, x, generator=None):
        return self.view1(x, generator), self.view2(x, generator)


# -----------------------------------------------------------------------------
# On-device loader (CIFAR scale: the whole split as uint8 in device memory)


def _to_uint8(batch):  # DataLoader collate: [(PIL image, label), ...] -> (uint8 (B, H, W, 3), labels)
    images, labels = zip(*batch)
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images, got {type(img).__name__}: build the dataset with "
                            "transform=None")
    shapes = {img.size for img in images}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes {sorted(shapes)[:4]}: a DeviceLoader needs one size")
    return np.stack([np.asarray(img.convert("RGB")) for img in images]), np.asarray(labels, dtype=np.int64)


def decode_dataset(dataset, num_workers=0, batch_size=500):
    """Every (PIL image, label) of dataset as uint8 (N, 3, H, W) and int64 (N,) CPU tensors."""
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=num_workers, collate_fn=_to_uint8)
    parts = list(loader)
    if len({p[0].shape[1:] for p in parts}) > 1:
        raise ValueError("images of different sizes: a DeviceLoader needs one size")
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return images.contiguous(), torch.from_numpy(np.concatenate([p[1] for p in parts]))


def no_batch(batch_size, world, n, what="training images"):  # every loader drops the last partial batch
    return ConfigError(f"config error: batch_size={batch_size} x {world} process(es) exceeds the {n} {what}: "
                       "lower batch_size (drop_last leaves no batch)")


class DeviceLoader:
    """The torch path's contract (data.EpochSampler + SeededViews) with everything on the device:
    the split decoded once (decode_dataset) into uint8 device memory, the same seeded permutation
    per epoch as EpochSampler (so the same images per step as the torch path), cut to whole global
    batches, rank r taking the r-th batch_size block of each (disjoint, equal sizes, drop_last).
    Yields (augment(x_uint8, generator), labels) per batch, plus the indices with return_index;
    augment=None yields the uint8 batch itself. The augmentation generator is seeded by (seed,
    epoch, step in epoch, rank), so set_epoch(epoch, start) resumes mid-epoch exactly.
    NOTE: unlike SeededViews, the views also depend on the process count (equally distributed)."""

    def __init__(self, dataset, batch_size, device, augment=None, seed=0, rank=0, world=1, epoch=0, start=0,
                 return_index=False, num_workers=0):
        self.device = torch.device(device)
        if isinstance(dataset, tuple):  # (images uint8 (N, 3, H, W), labels (N,)) already decoded
            images, labels = dataset
        else:
            images, labels = decode_dataset(dataset, num_workers)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.n, self.batch_size, self.augment = len(self.images), batch_size, augment
        self.seed, self.rank, self.world, self.return_index = seed, rank, world, return_index
        if self.steps() == 0:
            raise no_batch(batch_size, world, self.n)
        self.generator = torch.Generator(self.device)
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch, start=0):
        """The epoch to iterate next; start: batches of it already done."""
        self.epoch, self.start = epoch, start

    def steps(self):  # batches per epoch, every rank
        return self.n // (self.batch_size * self.world)

    def __len__(self):
        return self.steps() - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # as data.EpochSampler
        perm = torch.randperm(self.n, generator=g)[:self.steps() * self.batch_size * self.world]
        mine = perm.view(self.steps(), self.world, self.batch_size)[:, self.rank].to(self.device)  # (steps, B)
        for step in range(self.start, self.steps()):
            idx = mine[step]
            x, y = self.images[idx], self.labels[idx]  # (B, 3, H, W) uint8, (B,)
            if self.augment is not None:
                seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + step) * 1_000_033 + self.rank
                x = self.augment(x, self.generator.manual_seed(seed % 2**63))
            yield (x, y, idx) if self.return_index else (x, y)


# -----------------------------------------------------------------------------
# The trainers' choice (config key `loader`): every kind has set_epoch(epoch, start), steps() and
# yields ((v1, v2), labels), the views normalized float (B, 3, size, size); same order per (seed, epoch).


class TorchLoader:
    """The reference path: PIL + torchvision per sample in DataLoader workers (data.SeededViews: the
    views are a function of (seed, epoch, index), whatever the process count), a new DataLoader per
    epoch over data.EpochSampler, batches copied to the device by the trainer."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world=1, num_workers=0, pin_memory=False):
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.num_workers, self.pin_memory, self.epoch, self.start = num_workers, pin_memory, 0, 0
        if self.steps() == 0:
            raise no_batch(batch_size, world, len(dataset))

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def steps(self):
        return len(self.dataset) // (self.batch_size * self.world)

    def __iter__(self):
        sampler = EpochSampler(len(self.dataset), self.batch_size, self.epoch, self.start, self.seed, self.rank,
                               self.world)
        return iter(torch.utils.data.DataLoader(
            SeededViews(self.dataset, self.seed), self.batch_size, sampler=sampler, num_workers=self.num_workers,
            pin_memory=self.pin_memory, drop_last=True, persistent_workers=False))


class FFCVViews:
    """ffcv_data.build_ffcv_loader (in FFCV one decode per image, RandomResizedCrop + flip per view, uint8 on
    the device) followed by the rest of each view of recipe `aug` (byol | mocov2) batched here (crop=False).
    The augmentation generator is seeded per (seed, epoch, step, rank); FFCV's crops come from its own RNG
    (not reproducible)."""

    def __init__(self, path, dataset, size, batch_size, seed, rank, world, device, num_workers=None, subset=0,
                 min_scale=0.08, aug="byol", mean_std=None):
        rows = None
        if subset:
            rows = subset_indices(beton_labels(path), subset)
        self.loader = build_ffcv_loader(path, batch_size, size, seed=seed, rank=rank, world=world, device=device,
                                        min_scale=min_scale, indices=rows, num_workers=num_workers)
        self.n = len(rows) if rows is not None else len(beton_labels(path))
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.view1 = BatchAugment(dataset, size, 1, crop=False, aug=aug, mean_std=mean_std).to(device)
        self.view2 = BatchAugment(dataset, size, 2, crop=False, aug=aug, mean_std=mean_std).to(device)
        self.generator, self.epoch, self.start = torch.Generator(device), 0, 0
        if self.steps() == 0:
            raise no_batch(batch_size, world, self.n, f"images of {path}")

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start
        self.loader.set_epoch(epoch, start)

    def steps(self):
        return self.n // (self.batch_size * self.world)

    def close(self):
        """Stop FFCV's reading thread (FFCVLoader.close): call it when training ends, early or not."""
        self.loader.close()

    def __iter__(self):
        for k, ((v1, v2), y) in enumerate(self.loader, start=self.start):
            seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + k) * 1_000_033 + self.rank
            g = self.generator.manual_seed(seed % 2**63)
            yield (self.view1(v1, g), self.view2(v2, g)), y


def to_device(batches, device):
    """The ((v1, v2), y) batches of a training loader with both views on `device`, the copy of the next
    batch issued before the current one is handed out: from pinned host memory (TorchLoader pins on
    CUDA) the copy then runs while the step computes. Each view is copied as it is (no concatenated
    host copy); the trainer concatenates them on the device. Views already there (device, ffcv) pass.
    On CUDA the next batch is pulled on a side stream: loader=device and loader=ffcv augment inside
    their generators, and these kernels (and the torch loader's copy) would otherwise queue on the
    training stream between two steps; the training stream waits for that batch's event only."""
    device = torch.device(device)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    main = torch.cuda.current_stream(device) if side is not None else None

    def pull(it):  # the next batch with its copy issued (CUDA: on the side stream), and the event ending it
        if side is not None:
            side.wait_stream(main)  # what the training stream wrote before (the decoded split, say) is there
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            batch = next(it, None)
            if batch is None:
                return None
            (v1, v2), y = batch
            views = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        return (views, y), (side.record_event() if side is not None else None)

    def ready(pulled):
        (views, y), event = pulled
        if event is not None:
            main.wait_event(event)
            for t in (*views, y):  # made on the side stream: not reused by it while the step still reads them
                if t.is_cuda:
                    t.record_stream(main)
        return views, y

    it = iter(batches)
    cur = pull(it)
    while cur is not None:
        nxt = pull(it)  # issued now: overlaps the step on cur
        yield ready(cur)
        cur = nxt


def build_train_loader(kind, data_path, ffcv_path, dataset, size, batch_size, subset=0, seed=0, rank=0, world=1,
                       device="cpu", num_workers=0, min_scale=0.08, aug="byol", mean_std=None):
    """The two-view pretraining loader of config key `loader`, views of recipe `aug` (byol: BYOL's
    asymmetric pair; mocov2: MoCo v2's alike views, the US3L release's), crops of [min_scale, 1],
    normalized with mean_std (data.normalization of the mean/std keys; None: the dataset's preset):
    torch:  TorchLoader over data_path (the reference; any source, per-sample CPU augmentation);
    device: DeviceLoader, data_path's train split decoded once into device memory (CIFAR scale),
            TwoViewAugment per batch on the device;
    ffcv:   FFCVViews over ffcv_path/train.beton (written by `python ffcv_data.py`)."""
    if not 0 < min_scale <= 1:
        raise ConfigError(f"config error: min_scale={min_scale}: the crop's area fraction must be in (0, 1]")
    # NOTE: min_scale stays its own key, not implied by aug: BYOL crops with 0.08, MoCo v2 (and the US3L
    # release, CIFAR and ImageNet) with 0.2, so a mocov2 recipe sets min_scale: 0.2 beside aug: mocov2
    if aug not in AUGS:
        raise ConfigError(f"config error: aug={aug!r}, allowed: {', '.join(AUGS)}")
    if kind == "torch":
        views = pretrain_transform(dataset, size, min_scale, aug=aug, mean_std=mean_std)
        ds = build_dataset(data_path, "train", views, subset=subset)
        return TorchLoader(ds, batch_size, seed, rank, world, num_workers, pin_memory=torch.device(device).type == "cuda")
    if kind == "device":
        views = TwoViewAugment(dataset, size, min_scale=min_scale, aug=aug, mean_std=mean_std).to(device)
        return DeviceLoader(build_dataset(data_path, "train", subset=subset), batch_size, device, views, seed=seed,
                            rank=rank, world=world, num_workers=num_workers)
    if kind == "ffcv":
        require_ffcv()
        path = os.path.join(ffcv_path, "train.beton")
        if not ffcv_path or not os.path.isfile(path):
            cap = "--raw" if dataset.startswith("cifar") else "--max_resolution 256"
            raise FileNotFoundError(f"loader=ffcv needs ffcv_path, a folder with train.beton: {path!r} not found. "
                                    f"Write it once: python ffcv_data.py --data_path {data_path} "
                                    f"--out {ffcv_path or 'DIR'} {cap}")
        return FFCVViews(path, dataset, size, batch_size, seed, rank, world, device, num_workers or None, subset,
                         min_scale, aug, mean_std)
    raise ConfigError(f"config error: loader={kind!r}, allowed: torch, device, ffcv")
