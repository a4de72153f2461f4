"""augment.py: the batched on-device augmentation (aug=byol and aug=mocov2) draws the references'
distributions (data.byol_view, data.mocov2_view, torchvision's get_params), each op matches torchvision's functional op at fixed
parameters, and the DeviceLoader keeps data.EpochSampler's contract. CPU, about 15 s; the CUDA
test skips without a GPU."""

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

import augment as A
import data
from config import ConfigError

N = 20_000  # batched draws per distribution test (cheap); torchvision's per-sample draws: 5,000


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic (max distance between the empirical CDFs)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def assert_same_distribution(a, b, what):
    limit = 1.95 * np.sqrt((len(a) + len(b)) / (len(a) * len(b)))  # alpha = 0.001 (conservative if discrete)
    assert ks_distance(a, b) < limit, f"{what}: KS {ks_distance(a, b):.4f} >= {limit:.4f}"


def assert_rate(mask, p, what):
    rate, n = mask.float().mean().item(), mask.numel()
    assert abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9, f"{what}: rate {rate:.4f}, expected {p}"


def draw(aug, n=N, height=32, width=32, seed=0):
    return aug.sample(n, height, width, torch.Generator().manual_seed(seed))


# --- the recipe: constants and parameter distributions ------------------------------------------


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("cifar100", 32), ("imagenet", 224)])
@pytest.mark.parametrize("view", [1, 2])
def test_constants_match_reference(dataset, size, view):
    ref = data.byol_view(view, size, dataset).transforms
    names = [type(t).__name__ for t in ref]
    blur = [] if dataset.startswith("cifar") else ["GaussianBlur"]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale", *blur,
                     "RandomSolarize", "ToTensor", "Normalize"]  # the order apply() follows
    aug = A.BatchAugment(dataset, view=view)
    crop, flip, jitter, gray = ref[:4]
    assert aug.size == size and crop.size == (size, size)
    assert tuple(crop.scale) == aug.scale and tuple(crop.ratio) == A.RATIO
    assert crop.interpolation == T.InterpolationMode.BICUBIC and aug.interpolation == "bicubic"
    assert flip.p == 0.5 and jitter.p == A.P_JITTER and gray.p == A.P_GRAY
    cj = jitter.transforms[0]
    b, c, s, h = A.JITTER
    assert (cj.brightness, cj.contrast, cj.saturation) == ((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s))
    assert cj.hue == (-h, h)
    if blur:
        assert ref[4].p == aug.p_blur == A.P_BLUR[view] and tuple(ref[4].sigma) == A.SIGMA
        assert aug.blur_kernel == (23 if size == 224 else aug.blur_kernel)  # BYOL's 23 at 224 px
    else:
        assert aug.p_blur == 0
    solar = ref[-3]
    assert solar.p == aug.p_solarize and abs(solar.threshold / 255 - A.SOLARIZE_THRESHOLD) < 1 / 255
    assert torch.allclose(aug.mean.flatten(), torch.tensor(ref[-1].mean))
    assert torch.allclose(aug.std.flatten(), torch.tensor(ref[-1].std))


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("cifar100", 32), ("imagenet", 224)])
def test_mocov2_constants_match_reference(dataset, size):
    """aug=mocov2: one transform for both views (the US3L release's MoCo v2 recipe), the batched views alike."""
    views = data.pretrain_transform(dataset, size, aug="mocov2")
    assert views.t1 is views.t2
    ref = views.t1.transforms
    names = [type(t).__name__ for t in ref]
    blur = [] if dataset.startswith("cifar") else ["GaussianBlur"]
    assert names == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", *blur, "RandomHorizontalFlip",
                     "ToTensor", "Normalize"]  # the release's order: the flip commutes with the rest
    crop, jitter, gray = ref[:3]
    assert crop.interpolation == T.InterpolationMode.BILINEAR and tuple(crop.ratio) == A.RATIO
    assert jitter.p == A.P_JITTER and gray.p == A.P_GRAY and ref[-3].p == 0.5
    cj = jitter.transforms[0]
    b, c, s, h = A.MOCOV2_JITTER
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s),
                                                                  (-h, h))
    for view in (1, 2):
        aug = A.BatchAugment(dataset, view=view, aug="mocov2")
        assert aug.size == size and crop.size == (size, size) and aug.interpolation == "bilinear"
        assert torch.allclose(aug.jitter_range, torch.tensor([[1 - b, 1 - c, 1 - s, -h], [1 + b, 1 + c, 1 + s, h]]))
        assert aug.p_solarize == 0 and aug.p_blur == (ref[3].p if blur else 0.0)
        if blur:
            assert ref[3].p == A.MOCOV2_P_BLUR and tuple(ref[3].sigma) == A.SIGMA
        assert torch.allclose(aug.mean.flatten(), torch.tensor(ref[-1].mean))
        assert torch.allclose(aug.std.flatten(), torch.tensor(ref[-1].std))


@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_crop_distribution_matches_torchvision(height, width):
    p = draw(A.BatchAugment(), height=height, width=width)
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(5000)])
    ours = {k: p[k].numpy() for k in "ijhw"}
    for col, k in enumerate("ijhw"):
        assert_same_distribution(ours[k], ref[:, col], f"crop {k}")
    area = height * width
    assert_same_distribution(ours["h"] * ours["w"] / area, ref[:, 2] * ref[:, 3] / area, "area fraction")
    assert_same_distribution(ours["w"] / ours["h"], ref[:, 3] / ref[:, 2], "aspect ratio")
    assert (ours["i"] >= 0).all() and (ours["i"] + ours["h"] <= height).all() and (ours["h"] >= 1).all()
    assert (ours["j"] >= 0).all() and (ours["j"] + ours["w"] <= width).all() and (ours["w"] >= 1).all()


def test_crop_params_tries_and_fallback():
    u = torch.zeros(1, 22)
    u[0, 0], u[0, 10] = 1.0, 1.0  # try 0: the whole area at ratio 4/3 is 37 px wide: does not fit
    u[0, 1], u[0, 11] = (0.25 - 0.08) / 0.92, 0.5  # try 1: a quarter of the area at ratio 1: 16 x 16
    u[0, 2:10] = 0.0  # later tries would fit too; the first fitting one wins
    u[0, 20], u[0, 21] = 0.99, 0.5
    i, j, h, w = A.crop_params(u, 32, 32)
    assert (i.item(), j.item(), h.item(), w.item()) == (16, 8, 16, 16)  # i = floor(0.99 * 17)
    # nothing fits (scale 1 on a 10 x 40 image): torchvision's central crop at the max aspect ratio
    torch.manual_seed(0)
    ref = T.RandomResizedCrop.get_params(torch.zeros(3, 10, 40), [1.0, 1.0], [3 / 4, 4 / 3])
    got = A.crop_params(torch.rand(5, 22), 10, 40, scale=(1.0, 1.0))
    assert all(tuple(t.tolist()) == (r,) * 5 for t, r in zip(got, ref)), (got, ref)
    ref = T.RandomResizedCrop.get_params(torch.zeros(3, 40, 10), [1.0, 1.0], [3 / 4, 4 / 3])
    assert [t[0].item() for t in A.crop_params(torch.rand(1, 22), 40, 10, scale=(1.0, 1.0))] == list(ref)


@pytest.mark.parametrize("aug", ["byol", "mocov2"])
@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
@pytest.mark.parametrize("view", [1, 2])
def test_rates_per_view(dataset, view, aug):
    p = draw(A.BatchAugment(dataset, view=view, aug=aug), seed=view)
    assert_rate(p["flip"], 0.5, "flip")
    assert_rate(p["jitter"], 0.8, "jitter")
    assert_rate(p["gray"], 0.2, "grayscale")
    blur = {"byol": 1.0 if view == 1 else 0.1, "mocov2": 0.5}[aug]  # CIFAR: no blur in either recipe
    assert_rate(p["blur"], 0.0 if dataset == "cifar10" else blur, "blur")
    assert_rate(p["solarize"], 0.2 if (aug, view) == ("byol", 2) else 0.0, "solarize")
    sigma = p["sigma"].numpy()
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0
    assert_same_distribution(sigma, np.random.default_rng(0).uniform(0.1, 2.0, 5000), "sigma")


@pytest.mark.parametrize("aug,saturation", [("byol", (0.8, 1.2)), ("mocov2", (0.6, 1.4))])
def test_jitter_factors_and_order_match_torchvision(aug, saturation):
    p = draw(A.BatchAugment(aug=aug))
    torch.manual_seed(0)
    ref = [T.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4), saturation, (-0.1, 0.1)) for _ in range(5000)]
    for k in range(4):  # brightness, contrast, saturation, hue
        assert_same_distribution(p["factors"][:, k].numpy(), [r[1 + k] for r in ref], f"factor {k}")
    counts = Counter(map(tuple, p["order"].tolist()))
    assert set(counts) == set(itertools.permutations(range(4)))  # every order, each a permutation
    expected = N / 24
    assert max(abs(c - expected) for c in counts.values()) < 5 * np.sqrt(expected)
    assert Counter(tuple(r[0].tolist()) for r in ref).keys() == counts.keys()


# --- ops at fixed parameters vs torchvision's functional ops ------------------------------------


def test_resized_crop_and_flip_match_torchvision():
    torch.manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(5, 3, 30, 44)  # no cubic overshoot out of [0, 1] (PIL clips between passes)
    i, j = torch.tensor([0, 3, 5, 10, 0]), torch.tensor([0, 7, 2, 1, 4])
    h, w = torch.tensor([30, 10, 20, 7, 30]), torch.tensor([44, 12, 30, 9, 40])  # shrink, grow, both
    flip = torch.tensor([False, True, False, True, True])
    for interpolation in ("bicubic", "bilinear"):
        mode = T.InterpolationMode(interpolation)
        out = A.resized_crop(x, i, j, h, w, 24, flip, interpolation)
        for b in range(5):  # antialias=True: PIL's algorithm (cubic a = -0.5), as the reference
            ref = TF.resized_crop(x[b], i[b].item(), j[b].item(), h[b].item(), w[b].item(), [24, 24], mode,
                                  antialias=True).clamp(0, 1)
            ref = TF.horizontal_flip(ref) if flip[b] else ref
            torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])  # byol's, mocov2's
def test_resized_crop_matches_pil_reference(image_folder, interpolation):
    """On real uint8 images against the reference itself (PIL crop + resize, 8-bit rounding)."""
    ds = data.build_dataset(image_folder, "train")
    imgs = [ds[k][0] for k in range(0, 200, 10)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs])  # (20, 3, 32, 32) uint8
    g = torch.Generator().manual_seed(0)
    i, j, h, w = A.crop_params(torch.rand(20, 22, generator=g), 32, 32)
    out = A.resized_crop(x.float(), i, j, h, w, 32, interpolation=interpolation, gain=1 / 255)
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    for b, im in enumerate(imgs):
        ref = np.array(im.crop((j[b].item(), i[b].item(), (j[b] + w[b]).item(), (i[b] + h[b]).item()))
                         .resize((32, 32), mode))
        diff = (out[b].permute(1, 2, 0) * 255 - torch.from_numpy(ref).float()).abs()
        assert diff.max() <= 1.5 and diff.mean() < 0.4, diff.max()  # PIL rounds both passes to 8 bits


def test_color_ops_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 20)
    x[0] = x[0, :1]  # a gray image: hue undefined (0), saturation 0
    x[1, :, :4] = 1.0  # saturated max: ties between channels
    f = torch.tensor([[1.3, 0.7, 1.15, 0.08], [0.6, 1.4, 0.8, -0.1], [1.0, 1.0, 1.0, 0.0],
                      [0.9, 1.2, 1.2, 0.05], [1.4, 0.6, 0.9, -0.03], [0.7, 0.8, 1.1, 0.1]])
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    ident = torch.tensor([1.0, 1.0, 1.0, 0.0])
    everyone = torch.ones(6, dtype=torch.bool)
    for k, fn in enumerate(fns):  # each op alone: the other factors at identity
        fk = ident.repeat(6, 1)
        fk[:, k] = f[:, k]
        out = A.color_jitter(x, fk, torch.stack([torch.randperm(4) for _ in range(6)]), everyone)
        for b in range(6):
            torch.testing.assert_close(out[b], fn(x[b], fk[b, k].item()), atol=1e-5, rtol=0)
    torch.testing.assert_close(A.adjust_hue(x, torch.zeros(6)), x, atol=1e-6, rtol=0)  # no jitter: x
    orders = torch.tensor([list(o) for o in itertools.permutations(range(4))])  # all 24 orders
    apply = torch.rand(24) < 0.8
    xs = x.repeat(4, 1, 1, 1)
    out = A.color_jitter(xs, f.repeat(4, 1), orders, apply)
    for b in range(24):
        ref = xs[b]
        if apply[b]:
            for k in orders[b].tolist():
                ref = fns[k](ref, f[b % 6, k].item())
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)
    gray = A.grayscale(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_blur_solarize_match_torchvision():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 40, 36)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    apply = torch.tensor([True, True, False, True])
    out = A.gaussian_blur(x, sigma, 23, apply)
    for b in range(4):
        ref = TF.gaussian_blur(x[b], [23, 23], [sigma[b].item()] * 2) if apply[b] else x[b]
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[2], x[2])  # a delta kernel leaves it bit for bit
    assert A.gaussian_blur(x[:0], sigma[:0], 23).shape == (0, 3, 40, 36)
    p = A.BatchAugment("imagenet", size=40, view=2).sample(4, 40, 36)
    p["blur"][:] = False  # no sample drew the blur: the CPU path blurs an empty subset
    assert A.BatchAugment("imagenet", size=40, view=2).apply(x, p).shape == (4, 3, 40, 40)
    for thr in (0.5, 0.3):
        out = A.solarize(x, apply, thr)
        for b in range(4):
            torch.testing.assert_close(out[b], TF.solarize(x[b], thr) if apply[b] else x[b], atol=0, rtol=0)


def test_apply_is_the_composition_of_the_ops():
    """apply = crop+flip, jitter, grayscale, blur, solarize, normalize with the drawn parameters."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8)
    aug = A.BatchAugment("imagenet", size=40, view=2)
    p = draw(aug, 64, 48, 48)
    y = A.resized_crop(x.float() / 255, p["i"], p["j"], p["h"], p["w"], 40, p["flip"])
    y = A.color_jitter(y, p["factors"], p["order"], p["jitter"])
    y = torch.where(p["gray"][:, None, None, None], TF.rgb_to_grayscale(y, 3), y)
    y = A.gaussian_blur(y, p["sigma"], aug.blur_kernel, p["blur"])
    y = TF.normalize(A.solarize(y, p["solarize"]), data.MEAN_STD["imagenet"][0], data.MEAN_STD["imagenet"][1])
    torch.testing.assert_close(aug.apply(x, p), y, atol=2e-5, rtol=0)
    assert p["blur"].any() and not p["blur"].all() and p["solarize"].any() and p["gray"].any()


# --- whole views: reference statistics, determinism, memory formats -----------------------------


def assert_same_mean(a, b, what):
    """z-test of equal means of two samples (N, ...) along dim 0: |difference| < 4 standard errors."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    z = ((a.mean(0) - b.mean(0)).abs() / se).max()
    assert z < 4, f"{what}: {a.mean(0)} vs {b.mean(0)} (z = {z:.1f})"


def assert_views_match_reference(folder, dataset, size, repeats, aug="byol"):
    """Per-view channel means and stds and the grayscale fraction over the views of folder's train
    images at size px, batched (TwoViewAugment) vs the PIL reference (data.pretrain_transform)."""
    ds = data.build_dataset(folder, "train")
    imgs = [ds[k][0].resize((size, size), Image.BICUBIC) for k in range(len(ds))]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]).repeat(repeats, 1, 1, 1)
    ref_t = data.pretrain_transform(dataset, size, aug=aug)
    torch.manual_seed(0)
    ref = [ref_t(im) for im in imgs * repeats]
    ours = A.TwoViewAugment(dataset, size, aug=aug)(x, torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(m).view(1, 3, 1, 1) for m in data.MEAN_STD[dataset])
    for v in range(2):
        r = torch.stack([pair[v] for pair in ref])
        assert_same_mean(r.mean((2, 3)), ours[v].mean((2, 3)), f"view {v + 1} channel means")
        assert_same_mean(r.std((2, 3)), ours[v].std((2, 3)), f"view {v + 1} channel stds")
        gray = [((t * std + mean).std(1).amax((1, 2)) < 0.01).float()[:, None] for t in (r, ours[v])]
        assert_same_mean(*gray, f"view {v + 1} grayscale fraction")
        assert 0.1 < gray[1].mean() < 0.3
        # mean |horizontal step| per view: tells the interpolation (bicubic is sharper) and the blur rate
        sharp = [((t * std)[..., 1:] - (t * std)[..., :-1]).abs().mean((1, 2, 3))[:, None] for t in (r, ours[v])]
        assert_same_mean(*sharp, f"view {v + 1} sharpness")


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("imagenet", 96)])
def test_views_match_reference_statistics(cifar_real, dataset, size):
    """BYOL's views of real images (the real-data test: jitter, grayscale and blur statistics depend on
    natural images' colours and edges); 96 px upscaled CIFAR exercises the blur."""
    assert_views_match_reference(cifar_real, dataset, size, 4 if size == 32 else 1)


@pytest.mark.parametrize("dataset,size", [("cifar10", 32), ("imagenet", 64)])
def test_mocov2_views_match_reference_statistics(image_folder, dataset, size):
    """MoCo v2's views (bilinear crops, saturation 0.4; at 64 px the blur with p=0.5) of the generated
    images, batched vs the PIL reference."""
    assert_views_match_reference(image_folder, dataset, size, 4 if size == 32 else 2, aug="mocov2")


def test_mocov2_views_alike_no_blur_no_solarize_on_cifar():
    """aug=mocov2 on CIFAR: both views one distribution (same jitter strengths, rates, interpolation),
    never blurred or solarized: with jitter and grayscale off a view is the normalized crop itself."""
    two = A.TwoViewAugment("cifar10", aug="mocov2")
    v1, v2 = two.view1, two.view2
    assert torch.equal(v1.jitter_range, v2.jitter_range) and v1.jitter_range[1, 2] == 1.4  # saturation 0.4
    assert (v1.p_blur, v1.p_solarize, v1.interpolation) == (v2.p_blur, v2.p_solarize, v2.interpolation)
    assert v1.p_blur == v1.p_solarize == 0 and v1.interpolation == "bilinear"
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    for k, view in enumerate((v1, v2)):
        p = draw(view, seed=k)
        assert not p["blur"].any() and not p["solarize"].any()
        p = draw(view, 64, seed=k)
        p["jitter"][:], p["gray"][:] = False, False
        y = A.resized_crop(x.float() / 255, p["i"], p["j"], p["h"], p["w"], 32, p["flip"], "bilinear")
        y = TF.normalize(y, *data.MEAN_STD["cifar10"])
        torch.testing.assert_close(view.apply(x, p), y, atol=1e-5, rtol=0)
    ops = {type(o).__name__ for o in data.pretrain_transform("cifar10", aug="mocov2").t1.transforms}
    assert not ops & {"GaussianBlur", "RandomSolarize"}
    a1, a2 = two(x, torch.Generator().manual_seed(1))
    assert not torch.allclose(a1, a2)  # two independent draws


def test_determinism_and_views_differ():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = A.TwoViewAugment("cifar10")
    a1, a2 = aug(x, torch.Generator().manual_seed(3))
    b1, b2 = aug(x, torch.Generator().manual_seed(3))
    c1, _ = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, c1) and not torch.allclose(a1, a2)
    assert a1.shape == (16, 3, 32, 32) and a1.dtype == torch.float32
    assert all(not torch.allclose(a1[k], a2[k]) for k in range(16))  # every sample's two views differ
    torch.manual_seed(5)
    d1, _ = aug(x)  # no generator: torch's default RNG
    torch.manual_seed(5)
    assert torch.equal(d1, aug(x)[0])


def test_channels_last_float_and_precropped_inputs():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = A.BatchAugment("imagenet", size=32, view=1)
    p = draw(aug, 8)
    ref = aug.apply(x, p)
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(aug.apply(cl, p), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug.apply(x.float() / 255, p), ref, atol=1e-5, rtol=0)
    # crop=False (e.g. after FFCV's crop): the same as cropping the whole image
    pre = A.BatchAugment("imagenet", size=32, view=1, crop=False)
    whole = dict(p, i=torch.zeros(8, dtype=torch.long), j=torch.zeros(8, dtype=torch.long),
                 h=torch.full((8,), 32), w=torch.full((8,), 32))
    torch.testing.assert_close(pre.apply(x, p), aug.apply(x, whole), atol=1e-5, rtol=0)
    assert pre.apply(torch.zeros(8, 3, 40, 40, dtype=torch.uint8), p).shape == (8, 3, 32, 32)  # resized


# --- DeviceLoader -------------------------------------------------------------------------------


def toy_dataset(n, size=8):
    rng = np.random.default_rng(0)
    return [(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), i % 10) for i in range(n)]


def test_device_loader_order_and_sharding():
    ds = toy_dataset(103)
    images, labels = A.decode_dataset(ds)
    assert images.shape == (103, 3, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(images[5], torch.from_numpy(np.array(ds[5][0])).permute(2, 0, 1))
    batch, world = 8, 3
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            loader = A.DeviceLoader((images, labels), batch, "cpu", seed=7, rank=rank, world=world, epoch=epoch,
                                    return_index=True)
            out = list(loader)
            assert len(out) == len(loader) == 103 // (batch * world) == 4
            idx = torch.cat([i for _, _, i in out])
            assert all(len(i) == batch for _, _, i in out)
            assert all(torch.equal(x, images[i]) and torch.equal(y, labels[i]) for x, y, i in out)
            sampler = data.EpochSampler(103, batch, epoch, 0, seed=7, rank=rank, world=world)
            assert [(epoch, k) for k in idx.tolist()] == list(sampler)  # the torch path's order
            seen += idx.tolist()
        assert len(seen) == len(set(seen)) == 96  # disjoint, every rank equal, drop_last
        assert seen != list(range(96))
    with pytest.raises(ConfigError, match="exceeds"):
        A.DeviceLoader((images, labels), 64, "cpu", world=2)


def test_device_loader_resume_mid_epoch():
    images, labels = A.decode_dataset(toy_dataset(64, size=32))
    aug = A.TwoViewAugment("cifar10")
    full = A.DeviceLoader((images, labels), 8, "cpu", aug, seed=1, rank=1, world=2, epoch=3, return_index=True)
    steps = list(full)
    resumed = A.DeviceLoader((images, labels), 8, "cpu", aug, seed=1, rank=1, world=2, return_index=True)
    resumed.set_epoch(3, start=2)
    assert len(resumed) == 2
    for ((a1, a2), ya, ia), ((b1, b2), yb, ib) in zip(steps[2:], resumed, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(a1, b1) and torch.equal(a2, b2)
    other = A.DeviceLoader((images, labels), 8, "cpu", aug, seed=1, rank=0, world=2, epoch=3)
    (o1, _), _ = next(iter(other))
    assert o1.shape == (8, 3, 32, 32) and not torch.allclose(o1, steps[0][0][0])  # ranks: other images, views
    full.set_epoch(4)
    assert not torch.equal(next(iter(full))[2], steps[0][2])  # a new epoch, a new order


def test_device_loader_from_image_folder(image_folder):
    ds = data.build_dataset(image_folder, "train")
    loader = A.DeviceLoader(ds, 32, "cpu", A.TwoViewAugment("cifar10"), seed=0)
    assert loader.images.shape == (200, 3, 32, 32) and torch.equal(loader.labels, torch.from_numpy(ds.labels))
    n = 0
    for (x1, x2), y in loader:  # the trainer's loop
        assert x1.shape == x2.shape == (32, 3, 32, 32) and y.shape == (32,)
        n += 1
    assert n == 6
    with pytest.raises(TypeError, match="transform=None"):
        A.decode_dataset(data.build_dataset(image_folder, "test", data.eval_transform("cifar10")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Same parameters, same views on CUDA (every sample blurred, delta kernels) as on CPU (subset)."""
    x = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8)
    for view in (1, 2):
        aug = A.BatchAugment("imagenet", size=40, view=view)
        p = draw(aug, 64, 48, 48)
        ref = aug.apply(x, p)
        out = aug.to("cuda").apply(x.cuda(), {k: v.cuda() for k, v in p.items()})
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=0)
    images, labels = A.decode_dataset(toy_dataset(64, size=32))
    runs = [list(A.DeviceLoader((images, labels), 8, "cuda", A.TwoViewAugment("cifar10").cuda(), seed=2))
            for _ in range(2)]
    (x1, x2), y = runs[0][0]
    assert x1.is_cuda and y.is_cuda and x1.shape == (8, 3, 32, 32)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(*runs))  # seeded on the device


def test_to_device_prefetches_one_batch_ahead_in_order():
    pulled = []

    def loader():
        for k in range(3):
            pulled.append(k)
            yield (torch.full((2, 3), float(k)), torch.full((2, 3), -float(k))), torch.tensor([k, k])

    it = A.to_device(loader(), torch.device("cpu"))
    (v1, v2), y = next(it)
    assert pulled == [0, 1]  # the next batch is fetched (and its copy issued) before this one is used
    assert torch.equal(v1, torch.zeros(2, 3)) and torch.equal(y, torch.tensor([0, 0]))
    rest = list(it)
    assert [int(b[1][0]) for b in rest] == [1, 2] and torch.equal(rest[1][0][1], torch.full((2, 3), -2.0))
    assert list(A.to_device(iter([]), torch.device("cpu"))) == []


def to_device_matches_the_loader(device):
    """to_device over a seeded DeviceLoader yields the batches of iterating it directly, in order; the
    streams its generator body ran on (CUDA: the side stream, not the training one)."""
    images, labels = A.decode_dataset(toy_dataset(48, size=32))
    loader = A.DeviceLoader((images, labels), 8, device, A.TwoViewAugment("cifar10").to(device), seed=3)
    direct, streams = list(loader), []

    def watched():
        for batch in loader:
            streams.append(torch.cuda.current_stream() if device == "cuda" else None)
            yield batch

    got = list(A.to_device(watched(), torch.device(device)))
    assert len(got) == len(direct) == 6
    for ((a1, a2), ay), ((b1, b2), by) in zip(got, direct):
        assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ay, by)
    return streams


def test_to_device_yields_the_loaders_batches_in_order():
    to_device_matches_the_loader("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_augments_on_a_side_stream_with_the_same_batches():
    streams = to_device_matches_the_loader("cuda")
    assert all(s != torch.cuda.default_stream() for s in streams)  # the augmentation ran off the training stream


def test_min_scale_reaches_every_loaders_crops(image_folder, tmp_path, monkeypatch):
    """Config key min_scale sets the RandomResizedCrop area range of both views for each loader kind;
    outside (0, 1] it is a config error naming the key."""
    t = A.build_train_loader("torch", image_folder, "", "cifar10", 32, 32, min_scale=0.2)
    crops = [op for view in (t.dataset.transform.t1, t.dataset.transform.t2) for op in view.transforms
             if isinstance(op, T.RandomResizedCrop)]
    assert [c.scale for c in crops] == [(0.2, 1.0)] * 2
    d = A.build_train_loader("device", image_folder, "", "cifar10", 32, 32, min_scale=0.2)
    assert d.augment.view1.scale == d.augment.view2.scale == (0.2, 1.0)
    seen = {}
    monkeypatch.setattr(A, "beton_labels", lambda path: np.zeros(200, np.int64))
    monkeypatch.setattr(A, "build_ffcv_loader", lambda *a, **k: seen.update(k))
    (tmp_path / "train.beton").touch()
    A.build_train_loader("ffcv", image_folder, str(tmp_path), "cifar10", 32, 32, min_scale=0.2)
    assert seen["min_scale"] == 0.2
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=f"min_scale={bad}"):
            A.build_train_loader("device", image_folder, "", "cifar10", 32, 32, min_scale=bad)


def test_aug_reaches_every_loader(image_folder, tmp_path, monkeypatch):
    """Config key aug picks the views' recipe of each loader kind; byol is the default."""
    t = A.build_train_loader("torch", image_folder, "", "cifar10", 32, 32, min_scale=0.2, aug="mocov2")
    views = t.dataset.transform
    assert views.t1 is views.t2 and type(views.t1.transforms[1].transforms[0]).__name__ == "ColorJitter"
    assert views.t1.transforms[1].transforms[0].saturation == (0.6, 1.4)
    assert A.build_train_loader("torch", image_folder, "", "cifar10", 32, 32).dataset.transform.t1 is not \
        A.build_train_loader("torch", image_folder, "", "cifar10", 32, 32).dataset.transform.t2  # byol: a pair
    d = A.build_train_loader("device", image_folder, "", "cifar10", 32, 32, min_scale=0.2, aug="mocov2")
    assert d.augment.view1.aug == d.augment.view2.aug == "mocov2" and d.augment.view1.scale == (0.2, 1.0)
    assert A.build_train_loader("device", image_folder, "", "cifar10", 32, 32).augment.view2.aug == "byol"
    monkeypatch.setattr(A, "beton_labels", lambda path: np.zeros(200, np.int64))
    monkeypatch.setattr(A, "build_ffcv_loader", lambda *a, **k: None)
    (tmp_path / "train.beton").touch()
    f = A.build_train_loader("ffcv", image_folder, str(tmp_path), "imagenet", 64, 32, aug="mocov2")
    assert f.view1.aug == f.view2.aug == "mocov2" and f.view1.p_blur == f.view2.p_blur == 0.5
    assert f.view1.p_solarize == f.view2.p_solarize == 0 and not f.view1.crop


def test_bad_aug_is_a_one_line_config_error(image_folder, tmp_path):
    for kind, ffcv_path in (("torch", ""), ("device", ""), ("ffcv", str(tmp_path))):  # before any file is read
        with pytest.raises(ConfigError) as e:
            A.build_train_loader(kind, image_folder, ffcv_path, "cifar10", 32, 32, aug="simclr")
        assert str(e.value) == "config error: aug='simclr', allowed: byol, mocov2"
    with pytest.raises(ValueError, match="aug byol|mocov2"):
        A.BatchAugment(aug="mocov3")


def test_mean_std_keys_reach_every_train_path(image_folder):
    """The mean/std keys (data.normalization) normalize the torch path and the batched device path alike: with
    every random op off, the device path's views of the generated images are the torch path's ToTensor +
    Normalize of them; and on each path a run's views with the keys are its views with the preset, mapped by
    the change of normalization (nothing else changes; loader=ffcv batches with the same BatchAugment)."""
    mean_std = data.normalization("cifar10", [0.3, 0.5, 0.7], [0.1, 0.2, 0.4])
    (m0, s0), (m1, s1) = ((torch.tensor(v).view(1, 3, 1, 1) for v in ms) for ms in (data.MEAN_STD["cifar10"], mean_std))

    def loaders(**kw):
        return [A.build_train_loader(kind, image_folder, "", "cifar10", 32, 20, subset=40, seed=3, **kw)
                for kind in ("torch", "device")]

    torch_path, device_path = loaders(mean_std=mean_std)
    ds = data.build_dataset(image_folder, "train", subset=40)
    imgs = [ds[i][0] for i in range(0, 40, 5)]  # 8 images, several classes
    x = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in imgs])  # (8, 3, 32, 32) uint8
    views = torch_path.dataset.transform
    for ref, ours in ((views.t1, device_path.augment.view1), (views.t2, device_path.augment.view2)):
        assert (tuple(ref.transforms[-1].mean), tuple(ref.transforms[-1].std)) == mean_std
        p = draw(ours, 8)
        p.update(i=torch.zeros(8, dtype=torch.long), j=torch.zeros(8, dtype=torch.long), h=torch.full((8,), 32),
                 w=torch.full((8,), 32), flip=p["flip"] & False, jitter=p["jitter"] & False, gray=p["gray"] & False,
                 solarize=p["solarize"] & False)  # the whole image, no flip, jitter, grayscale or solarize
        want = torch.stack([T.Compose(ref.transforms[-2:])(img) for img in imgs])  # ToTensor, Normalize
        torch.testing.assert_close(ours.apply(x, p), want, atol=1e-5, rtol=0)
    for custom, preset in zip((torch_path, device_path), loaders(), strict=True):
        for k in (custom, preset):
            k.set_epoch(1)
        for ((c1, c2), _), ((p1, p2), _) in zip(custom, preset, strict=True):
            for c, p in ((c1, p1), (c2, p2)):
                torch.testing.assert_close(c, (p * s0 + m0 - m1) / s1, atol=1e-4, rtol=0)
