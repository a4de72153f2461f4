"""Data for slimmable self-supervised pretraining (DSPNet, US3L): sources, BYOL two-view
augmentation, the seeded order and views of the torch loader. Knows no network and no trainer. The
torch reference path (PIL + torchvision per sample in DataLoader workers) is here; the fast paths
build on it: FFCV in ffcv_data.py, batched on-device augmentation in augment.py.

    python data.py extract-cifar10        # the CIFAR-10 tarball -> data/cifar10 of this repository, once
    python data.py extract-cifar10 --tar T --out DIR      # or CIFAR10_TAR=T DATA_DIR=D (-> D/cifar10)
    python data.py stats DIR              # per-channel mean/std of DIR's training images: the mean/std keys

    ds = build_dataset("data/cifar10", "train", pretrain_transform("cifar10"), subset=5000)
    (v1, v2), y = ds[0]                                   # two views (3, 32, 32) of image 0, its label
    # the trainers' torch loader (augment.TorchLoader), per epoch: this rank's (epoch, index) keys, in order
    sampler = EpochSampler(len(ds), 256, epoch, rank=rank, world=world)
    for (v1, v2), y in DataLoader(SeededViews(ds), 256, sampler=sampler, num_workers=2): ...  # (B, 3, 32, 32)

data_path: DIR with train/ and test/ (or val/) class folders; DIR/cifar-10-batches-py or
DIR/cifar-100-python (or that folder itself) for torchvision's CIFAR; `hf:PATH_OR_NAME` for
HuggingFace `datasets` (build_hf). build_dataset never downloads (a missing dataset raises
FileNotFoundError naming what was tried), except that `datasets` fetches a hub dataset named by
hf:NAME that is not in its cache, where the environment allows it (HF_HUB_OFFLINE=1 forbids it).

The one exception is the trainers' default, data_path=data/cifar10, relative to the current
directory: if that folder is missing, train_us3l.py and train_dspnet.py call prepare_cifar10, which
extracts the CIFAR-10 JPEG tarball into it ($CIFAR10_TAR, else ../shared/data/cifar10-jpg.tar.gz
beside this repository) or, without a tarball, downloads CIFAR-10 there with torchvision (about
170 MB, internet needed), and prints one line saying which and where. `python data.py
extract-cifar10` does the same on demand: into --out, else $DATA_DIR/cifar10, else data/cifar10
inside this repository; it downloads only with --download.
"""

import argparse
import os
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from config import ConfigError

REPO = Path(__file__).resolve().parent
SPLITS = {"train": ["train"], "test": ["test", "val", "validation"], "val": ["val", "validation", "test"]}
# HuggingFace datasets: a held-out split is looked for as validation first. The hub's imagenet-1k
# has train / validation / test with every test label -1 (the test labels were never released), so
# "test" must not win there; a split with negative labels is an error anyway (build_hf).
HF_SPLITS = {"train": ["train"], "test": ["validation", "val", "test"], "val": ["validation", "val", "test"]}
HOW_TO = ("For CIFAR-10 run `python data.py extract-cifar10 --download` (or set CIFAR10_TAR to the JPEG "
          "tarball), or pass --data_path=DIR holding train/ and test/ (or val/) class folders (train/ alone "
          "with knn_monitor=false), a cifar-10-batches-py / cifar-100-python folder, or --data_path=hf:PATH "
          "for a HuggingFace dataset.")
# What datasets do with an image that does not decode (corrupt, truncated, not an image though named
# .jpg) and with an empty class folder: "fail" raises an error naming the file or folder; "skip"
# warns, naming it with a running count, serves the next readable image in a bad one's place and
# keeps an empty class (its label index stays, so train and test labels still agree). The scripts
# set it from their config key `bad_images`; each dataset keeps the value it was built with.
BAD_IMAGES = "fail"

# -----------------------------------------------------------------------------
# Sources


class ImageDataset(Dataset):
    """Every source as (PIL image or transform(image), label), plus the index (0..len-1 in this,
    possibly subset, dataset) with return_index: eval scripts dedupe by it under multiple processes.
    .labels (numpy), .classes, .num_classes need no image decoding."""

    def __init__(self, base, labels, classes, transform=None, indices=None, return_index=False, keys=None):
        self.base, self.classes, self.num_classes = base, list(classes), len(classes)
        # keys: the (image, label) column names of a HuggingFace dataset; None for torchvision ones
        self.transform, self.return_index, self.keys = transform, return_index, keys
        labels = np.asarray(labels, dtype=np.int64)
        # numpy, not lists: forked workers touching Python lists copy them page by page (refcounts)
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = labels[self.indices]
        self.bad_images, self.skipped = BAD_IMAGES, set()  # an attribute: travels to spawned workers

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        # bad_images=skip: the next readable image (and its label) stands in for an unreadable one
        for k in range(len(self)):
            j = int(self.indices[(i + k) % len(self)])
            try:  # any failure to decode this one image counts: PIL raises OSError (unidentified,
                # truncated), SyntaxError, ValueError, EOFError, DecompressionBombError (past 2x
                # Image.MAX_IMAGE_PIXELS; an Exception, not an OSError) and more from its format plugins
                img, y = self._load(j)
                break
            except Exception as e:
                if self.bad_images != "skip":
                    raise BadImageError(f"unreadable image {self.where(j)} ({type(e).__name__}: {e}): fix or "
                                        "remove it, or set bad_images=skip to go on without it") from None
                self.skipped.add(j)
                warnings.warn(f"bad_images=skip: skipped unreadable image {self.where(j)} ({type(e).__name__}: "
                              f"{e}); {len(self.skipped)} skipped so far by this process", stacklevel=2)
        else:
            raise BadImageError(f"no readable image among the {len(self)} of this dataset")
        if self.transform is not None:
            img = self.transform(img)
        return (img, int(y), i) if self.return_index else (img, int(y))

    def _load(self, j):
        row = self.base[j]  # torchvision: (PIL, int), decoded by its loader; HF: a dict of columns
        img, y = row if self.keys is None else (row[self.keys[0]], row[self.keys[1]])
        if not isinstance(img, Image.Image):  # HF column of raw arrays (H, W, C) uint8
            img = Image.fromarray(np.asarray(img, dtype=np.uint8))
        img.load()  # decode now (lazy for HF columns): a truncated file fails here, not in a transform
        return (img if img.mode == "RGB" else img.convert("RGB")), y  # grayscale, RGBA, CMYK, palette -> RGB

    def where(self, j):
        samples = getattr(self.base, "samples", None)  # ImageFolder: (path, class) per image
        return samples[j][0] if samples is not None else f"row {j} of {type(self.base).__name__}"


class BadImageError(RuntimeError):
    """An image that does not decode, under bad_images=fail (the default)."""


def subset_indices(labels, n, seed=0):
    """Class-balanced subset of n indices (sorted): n // C per class, the remainder one each to
    some classes. seed=None takes the first ones of each class in dataset order; an int seed draws
    them at random, reproducibly. A class smaller than its share contributes all it has."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per = np.full(len(classes), n // len(classes))
    rng = np.random.default_rng(seed)
    extra = np.arange(n % len(classes)) if seed is None else rng.permutation(len(classes))[: n % len(classes)]
    per[extra] += 1
    out = []
    for c, k in zip(classes, per):
        idx = np.flatnonzero(labels == c)
        out.append(idx[:k] if seed is None else rng.permutation(idx)[:k])
    return np.sort(np.concatenate(out))


UNLABELLED = "(unlabelled)"  # the one class of a split folder that holds images and no class folders


class FlatFolder:
    """The images directly in a folder, sorted by name, each with label 0: unlabelled data for
    pretraining (the trainers' kNN monitor needs labels: knn_monitor=false)."""

    def __init__(self, folder, is_image):
        self.samples = [(e.path, 0) for e in sorted(os.scandir(folder), key=lambda e: e.name)
                        if e.is_file() and is_image(e.path)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, j):
        return torchvision.datasets.folder.default_loader(self.samples[j][0]), 0


def is_unlabelled(data_path):
    """Whether data_path is a folder whose train/ split holds images and no class folders (FlatFolder).
    An empty train/ is not: build_dataset names it, instead of a key that would not help."""
    train = Path(str(data_path)).expanduser() / "train"
    if str(data_path).startswith("hf:") or not train.is_dir():
        return False
    entries = list(os.scandir(train))
    return not any(e.is_dir() for e in entries) and any(is_image_file(e.path) for e in entries)


def is_image_file(path):
    return torchvision.datasets.folder.has_file_allowed_extension(path, torchvision.datasets.folder.IMG_EXTENSIONS)


def build_imagefolder(root, split):
    tried = [root / s for s in SPLITS[split]]
    folder = next((p for p in tried if p.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"no {split} split: tried {', '.join(map(str, tried))}. {HOW_TO}")
    ignored = []  # files without an image extension (notes, .DS_Store): never read, counted

    def is_image(path):
        if is_image_file(path):
            return True
        ignored.append(path)
        return False

    if not any(e.is_dir() for e in os.scandir(folder)):  # images without class folders: unlabelled
        flat = FlatFolder(folder, is_image)
        if not len(flat):
            raise FileNotFoundError(f"{folder} holds no images and no class folders. {HOW_TO}")
        return ImageDataset(flat, np.zeros(len(flat), dtype=np.int64), [UNLABELLED])
    ds = torchvision.datasets.ImageFolder(folder, is_valid_file=is_image, allow_empty=True)
    empty = [c for c, n in zip(ds.classes, np.bincount(ds.targets, minlength=len(ds.classes))) if n == 0]
    if len(empty) == len(ds.classes):  # bad_images=skip would keep every class and leave no image
        names = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise FileNotFoundError(f"{folder} holds no images: its {len(empty)} class folder(s) ({names}) are empty. "
                                f"{HOW_TO}")
    if empty and BAD_IMAGES != "skip":
        raise FileNotFoundError(f"{folder}: {len(empty)} empty class folder(s): {empty[:5]} (set bad_images=skip "
                                "to keep the class without images)")
    if empty:
        warnings.warn(f"bad_images=skip: {len(empty)} empty class folder(s) in {folder}: {empty[:5]}", stacklevel=2)
    if ignored:
        warnings.warn(f"{folder}: ignored {len(ignored)} file(s) without an image extension, e.g. {ignored[0]}",
                      stacklevel=2)
    # ImageFolder numbers classes by sorted folder name: a class missing from test/ would silently
    # shift every label after it, so insist that test/ and train/ agree.
    if split != "train" and (root / "train").is_dir():
        train_classes = sorted(e.name for e in os.scandir(root / "train") if e.is_dir())
        if train_classes != ds.classes:
            raise ValueError(f"class folders differ between {root / 'train'} and {folder}")
    return ImageDataset(ds, ds.targets, ds.classes)


def build_hf(spec, split, image_key=None, label_key=None):
    """`hf:PATH_OR_NAME` with HuggingFace `datasets`. A save_to_disk folder: a DatasetDict gives its
    splits, a single Dataset only its own split ('train' if unnamed). Another local folder:
    load_dataset(PATH), e.g. imagefolder's PATH/{train,test}/<class>/ or a clone of a hub repo.
    Otherwise a hub name (hf:uoft-cs/cifar10): the HF cache, and the hub only where the user's
    environment allows it (HF_HUB_OFFLINE=1 forbids it). Columns default to the first present of
    img/image and label/fine_label/labels."""
    import datasets  # imported here: slow import that only this source needs

    name = spec[len("hf:"):]
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise FileNotFoundError(f"{spec}: no such folder {path}. {HOW_TO}")
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(path))
        else:
            dd = datasets.load_dataset(str(path) if path.is_dir() else name)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:  # not cached, and the hub refused
        why = ("offline: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE
               else f"the hub: {' '.join(str(e).split())[:200]}")  # no network, a typo, a gated dataset
        raise FileNotFoundError(
            f"HuggingFace dataset {name!r} is not in the local cache ({datasets.config.HF_DATASETS_CACHE}) and "
            f"cannot be fetched ({why}). Fetch it once where the hub is reachable, into the same cache (HF_HOME): "
            f"python -c \"import datasets; datasets.load_dataset('{name}')\"; or point data_path to a local "
            "copy: hf:FOLDER (a save_to_disk folder, or a clone of the hub repository) or an image folder DIR"
        ) from None
    if isinstance(dd, datasets.Dataset):  # never serve a split-less Dataset as test data
        dd = {str(dd.split or "train"): dd}
    split_name = next((s for s in HF_SPLITS[split] if s in dd), None)
    if split_name is None:
        raise FileNotFoundError(f"{spec}: no split among {HF_SPLITS[split]}; it has {list(dd)}")
    ds = dd[split_name]
    cols = ds.column_names
    image_key = image_key or next((c for c in ("img", "image") if c in cols), None)
    label_key = label_key or next((c for c in ("label", "fine_label", "labels") if c in cols), None)
    if image_key not in cols or label_key not in cols:
        raise KeyError(f"{spec}: image/label columns {image_key!r}/{label_key!r} not in {cols}; "
                       "pass image_key=, label_key=")
    ds = ds.select_columns([image_key, label_key])  # do not decode columns we drop anyway
    labels = np.asarray(ds[label_key])
    if len(labels) and labels.min() < 0:  # e.g. -1 for "no label": every score would be silently wrong
        unlabeled = int((labels < 0).sum())
        raise ValueError(f"{spec}: split {split_name!r} has {'no labels' if unlabeled == len(labels) else 'negative labels'} "
                         f"({unlabeled} of {len(labels)} rows have {label_key!r} < 0); evaluate on a labelled split "
                         f"(splits: {list(dd)})")
    feature = ds.features[label_key]
    # NOTE: without a ClassLabel feature the classes are 0..max(label) of this split only
    classes = feature.names if hasattr(feature, "names") else [str(c) for c in range(int(labels.max()) + 1)]
    return ImageDataset(ds, labels, classes, keys=(image_key, label_key))


def build_dataset(data_path, split="train", transform=None, subset=0, subset_seed=0, return_index=False,
                  image_key=None, label_key=None):
    """The one entry point. split: train | test | val (test and val fall back to each other).
    subset > 0 keeps that many images, class-balanced (subset_indices; subset_seed=None: the first
    ones of each class)."""
    split = {"validation": "val"}.get(split, split)
    if split not in ("train", "test", "val"):
        raise ValueError(f"split must be train, test or val, got {split!r}")
    data_path = str(data_path)
    if data_path.startswith("hf:"):
        ds = build_hf(data_path, split, image_key, label_key)
    else:
        root = Path(data_path).expanduser()
        tv = {"cifar-10-batches-py": torchvision.datasets.CIFAR10, "cifar-100-python": torchvision.datasets.CIFAR100}
        cifar = [p for p in [root] * (root.name in tv) + [root / n for n in tv] if p.is_dir()]
        if cifar:  # download=False: torchvision checks the md5 sums, RuntimeError if anything is off
            base = tv[cifar[0].name](cifar[0].parent, train=split == "train", download=False)
            ds = ImageDataset(base, base.targets, base.classes)
        elif root.is_dir():
            if not any(root.iterdir()):
                raise FileNotFoundError(f"data_path {root} is an empty folder. {HOW_TO}")
            ds = build_imagefolder(root, split)
        else:
            raise FileNotFoundError(f"data_path {root} does not exist. {HOW_TO}")
    if subset:
        keep = subset_indices(ds.labels, subset, subset_seed)
        ds = ImageDataset(ds.base, ds.labels, ds.classes, keys=ds.keys, indices=keep)
    ds.transform, ds.return_index = transform, return_index
    return ds


# -----------------------------------------------------------------------------
# CIFAR-10 from the JPEG tarball (cifar10/{train,test}/<class>/NNNN.jpg, 32x32 JPEG)


def prepare_cifar10(dest=None, tar=None, download=False):
    """Extract the CIFAR-10 tarball (tar, else $CIFAR10_TAR, else ../shared/data beside this repo)
    into dest (default $DATA_DIR/cifar10, else data/cifar10 inside this repo; a relative dest is
    relative to the current directory), giving dest/train and dest/test. Idempotent (a marker file)
    and atomic (extract into a temp folder beside dest, then rename), so concurrent processes are
    safe. Without the tarball, download=True falls back to torchvision's CIFAR10 download
    (dest/cifar-10-batches-py). Prints one line when it extracts or downloads, none when dest is ready.
    A dest that holds a train/ folder (a copy made by hand) is used as it is; an empty one is filled."""
    dest = Path(dest or Path(os.environ.get("DATA_DIR", REPO / "data")) / "cifar10").expanduser()
    # the shared data is reached relative to the repo (or via CIFAR10_TAR), never by an absolute path
    tar = Path(tar or os.environ.get("CIFAR10_TAR", REPO / ".." / "shared/data/cifar10-jpg.tar.gz")).expanduser()
    marker = dest / ".extracted"
    if marker.is_file() or (dest / "cifar-10-batches-py").is_dir() or (dest / "train").is_dir():
        return dest
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # e.g. made by hand beforehand: extracted or downloaded into its place below
    if dest.exists():
        raise FileExistsError(f"{dest} exists, holds no train/ folder and prepare_cifar10 did not make it "
                              f"(no {marker.name}): remove it, or put CIFAR-10's train/ and test/ folders in it")
    if not tar.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 tarball not found at {tar}. Set CIFAR10_TAR=PATH (or --tar PATH), pass "
                f"--download to fetch it with torchvision (needs internet), or put CIFAR-10 in {dest}. {HOW_TO}")
        print(f"CIFAR-10: no tarball at {tar}: downloading it with torchvision into {dest.resolve()} (once)",
              flush=True)
        try:
            torchvision.datasets.CIFAR10(dest, download=True)  # one archive holds both splits
        except Exception as e:  # no internet (these machines), a proxy, a broken mirror
            raise FileNotFoundError(
                f"CIFAR-10 is not in {dest}, the tarball {tar} is absent and the download failed ({e}). "
                f"Put CIFAR-10 there (train/ and test/ class folders, or torchvision's cifar-10-batches-py), "
                f"or pass --data_path=DIR") from e
        return dest
    print(f"CIFAR-10: extracting {tar} into {dest.resolve()} (once)", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        with tarfile.open(tar, "r:gz") as tf:
            tf.extractall(tmp, members=[m for m in tf if m.name.startswith("cifar10/")], filter="data")
        (tmp / "cifar10" / marker.name).write_text(f"extracted from {tar.name}\n")
        try:
            (tmp / "cifar10").rename(dest)
        except OSError:  # another process won the race; its copy is complete (rename is atomic)
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# -----------------------------------------------------------------------------
# Augmentation (docs/design.md, Augmentation): aug=byol, BYOL's two asymmetric views (Grill et al. 2020,
# Table 6); aug=mocov2, MoCo v2's two alike views, the recipe of the US3L release

# Each training set's own per-channel mean/std (over all pixels; the often copied CIFAR std (0.2023,
# 0.1994, 0.2010) is a mean of per-image stds). The shared JPEG CIFAR-10 measures (0.4913, 0.4821,
# 0.4465) / (0.2452, 0.2428, 0.2606), close to these. Other image folders use ImageNet's.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization(dataset, mean=(), std=()):
    """(mean, std) of the inputs, 3 floats each, for the config keys `mean` and `std`: the dataset's preset
    (MEAN_STD) when both are empty, else the two given (your own images: `python data.py stats DIR`).
    Every transform and batched path takes the result as its `mean_std` argument (None: the preset).
    A ConfigError naming the key for only one of the two, not 3 values, or values off the [0, 1] pixel
    scale (a std of 58.4 is the 0-255 convention of other code bases; a std <= 0 divides by zero)."""
    if dataset not in MEAN_STD:
        raise ConfigError(f"config error: dataset={dataset!r}, allowed: {', '.join(MEAN_STD)}")
    if not mean and not std:
        return MEAN_STD[dataset]
    given = {"mean": list(mean), "std": list(std)}
    for key, other in (("mean", "std"), ("std", "mean")):
        if not given[key]:
            raise ConfigError(f"config error: {other}={given[other]} without {key}: give both (3 values each), "
                              f"or neither for {dataset}'s preset")
        if len(given[key]) != 3:
            raise ConfigError(f"config error: {key}={given[key]}: 3 values needed (R, G, B), got {len(given[key])}")
    if not all(0 <= m <= 1 for m in mean):
        raise ConfigError(f"config error: mean={given['mean']}: each must lie in [0, 1] (pixels are scaled to "
                          "[0, 1] first: 0.485, not 123.7)")
    if not all(0 < s <= 1 for s in std):
        raise ConfigError(f"config error: std={given['std']}: each must lie in (0, 1] (pixels are scaled to "
                          "[0, 1] first: 0.229, not 58.4)")
    return tuple(map(float, mean)), tuple(map(float, std))


def pixel_sums(img):
    """(3, 3) float64 of an RGB image of any size, pixels in [0, 1]: per channel (columns) the sum of the
    pixels, the sum of their squares and their count (image_stats' transform)."""
    x = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255
    return torch.from_numpy(np.stack([x.sum(0), (x * x).sum(0), np.full(3, float(len(x)))]))


def summed(batch):  # DataLoader collate for image_stats: [(pixel_sums, label), ...] -> their sum (3, 3)
    return sum(s for s, _ in batch)


def image_stats(data_path, max_images=0, num_workers=0, progress=False):
    """(mean, std, number of images): per-channel statistics of data_path's training split over every
    pixel (as MEAN_STD's, not a mean of per-image stds), RGB in [0, 1]: what the mean/std keys take.
    max_images > 0: a seeded class-balanced subset of that many (a large set: a sample is enough)."""
    ds = build_dataset(data_path, "train", pixel_sums, subset=max_images)
    loader = DataLoader(ds, batch_size=64, num_workers=num_workers, collate_fn=summed)
    total = sum(tqdm(loader, desc="batches of 64 images", disable=not progress, leave=False))
    mean = total[0] / total[2]
    std = (total[1] / total[2] - mean**2).clamp_min(0).sqrt()  # float64: no cancellation to speak of
    return mean.tolist(), std.tolist(), len(ds)


class GaussianBlur:
    """Blur with sigma ~ U(0.1, 2.0) with probability p. BYOL's 23x23 kernel at 224 px spans +-5.5
    sigma, i.e. is an untruncated Gaussian, which PIL computes (radius = sigma, within 1/255 of
    torchvision's exact kernel). NOTE: whole view-1 pipeline at 224 px, 1 core of this machine:
    178 img/s with PIL's blur vs 67 with T.GaussianBlur(23)."""

    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if self.p < 1 and torch.rand(()).item() >= self.p:  # torch's RNG, as torchvision's transforms
            return img
        return img.filter(ImageFilter.GaussianBlur(torch.empty(()).uniform_(*self.sigma).item()))


def byol_view(view, size, dataset, min_scale=0.08, mean_std=None):
    """One BYOL view: view 1 blur p=1.0, solarize p=0; view 2 blur p=0.1, solarize p=0.2. CIFAR
    (32 px) drops the blur, as the usual CIFAR variants do, and keeps the solarize. min_scale: BYOL's
    0.08, for CIFAR too; SimSiam-style CIFAR code often uses 0.2. torchvision v1 on PIL, as it is the fastest
    at 32 px on 1 core here: 3.9k img/s vs 2.0k (v2 on tensors) and 3.1k (v2 on PIL). mean_std: (mean, std)
    of normalization() (the mean/std keys); None: MEAN_STD[dataset]."""
    mean, std = mean_std or MEAN_STD[dataset]
    cifar = dataset.startswith("cifar")
    blur = [] if cifar else [GaussianBlur(p=1.0 if view == 1 else 0.1)]
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),  # BYOL
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *blur,
        T.RandomSolarize(threshold=128, p=0.0 if view == 1 else 0.2),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def mocov2_view(size, dataset, min_scale=0.08, mean_std=None):
    """One MoCo v2 view (Chen et al. 2020), both views alike, as the US3L release builds them for its
    CIFAR and ImageNet runs: crop, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, blur p=0.5
    (none on CIFAR, commented out in the release), flip; no solarize. MoCo v2 crops with min_scale 0.2.
    mean_std: as byol_view's."""
    mean, std = mean_std or MEAN_STD[dataset]
    blur = [] if dataset.startswith("cifar") else [GaussianBlur(p=0.5)]  # sigma ~ U(0.1, 2.0), PIL's blur
    return T.Compose([
        # the release's RandomResizedCrop keeps torchvision's default interpolation, bilinear
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BILINEAR),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *blur,
        # the release flips last; flipping commutes with the colour ops and the symmetric blur, so the
        # batched path (augment.BatchAugment) flips inside the crop and draws the same distribution
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        # NOTE: the release normalizes CIFAR with (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010);
        # we keep MEAN_STD, the statistics eval_transform and the batched paths use (a per-channel
        # affine map that the first convolution absorbs)
        T.Normalize(mean, std),
    ])


class TwoViews:  # (t1(img), t2(img)): BYOL's asymmetric pair, or MoCo v2's one transform twice
    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def pretrain_transform(dataset, size=None, min_scale=0.08, aug="byol", mean_std=None):
    """dataset: cifar10 | cifar100 (32 px, no blur) | imagenet (224 px). aug: byol (byol_view 1 and 2)
    | mocov2 (mocov2_view twice, independent draws). mean_std: normalization()'s, None: the dataset's
    preset. Returns TwoViews."""
    size = size or (32 if dataset.startswith("cifar") else 224)
    if aug == "mocov2":
        view = mocov2_view(size, dataset, min_scale, mean_std)
        return TwoViews(view, view)
    if aug != "byol":
        raise ValueError(f"aug must be byol or mocov2, got {aug!r}")
    return TwoViews(*(byol_view(view, size, dataset, min_scale, mean_std) for view in (1, 2)))


def eval_transform(dataset, size=None, mean_std=None):
    """CIFAR: the 32 px image as is (size None or 32). At another size, for a network that fixes its input
    size (the US3L release's ViT takes CIFAR at 224 px): upsampled as the release's ViT linear probe tests,
    Resize(256) + CenterCrop(224), scaled for other sizes, bicubic. ImageNet: Resize(256) + CenterCrop(224),
    scaled for other sizes, bicubic. mean_std: normalization()'s, None: the dataset's preset."""
    mean, std = mean_std or MEAN_STD[dataset]
    if dataset.startswith("cifar"):
        as_is = [T.ToTensor(), T.Normalize(mean, std)]
        if not size or size == 32:
            return T.Compose(as_is)
        # NOTE: the release resizes the PIL image with torchvision's default, bilinear; we upsample bicubic,
        # as byol_view upsamples the pretraining crops, and on the normalized tensor, last (antialias=True:
        # PIL's bicubic kernel, without its 8-bit rounding), so that knn.py can keep the 32 px images cached
        # and apply these two ops to whole batches on the device, with the same result per image
        return T.Compose([*as_is, T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC,
                                           antialias=True), T.CenterCrop(size)])
    size = size or 224
    return T.Compose([T.Resize(round(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


# -----------------------------------------------------------------------------
# Loader


class SeededViews(Dataset):
    """Pretraining view of a dataset whose augmentation is a function of (seed, epoch, index): the
    torch RNG (which torchvision's transforms draw from) is seeded per sample, so a resumed run, any
    number of workers and any process count see exactly the same views. Keys are (epoch, index)."""

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        return self.dataset[i]


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, cut to whole global batches, with rank r taking the r-th
    batch_size-block of each global batch: the same on every run, so a resumed run continues the
    data order. start: batches of this epoch already done. Yields (epoch, index) for SeededViews."""

    def __init__(self, n, batch_size, epoch, start=0, seed=0, rank=0, world=1):
        self.n, self.batch_size, self.epoch, self.start = n, batch_size, epoch, start
        self.seed, self.rank, self.world = seed, rank, world

    def steps(self):
        return self.n // (self.batch_size * self.world)

    def __len__(self):
        return (self.steps() - self.start) * self.batch_size

    def indices(self):
        """This rank's sample indices of this epoch from batch `start` on, in order (int64 tensor)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[:self.steps() * self.batch_size * self.world]
        mine = perm.view(self.steps(), self.world, self.batch_size)[self.start:, self.rank]  # (steps-start, B)
        return mine.flatten()

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices().tolist()])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="data.py utilities (.beton files: python ffcv_data.py)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("extract-cifar10", help="once")
    p.add_argument("--tar", default=None, help="default: $CIFAR10_TAR, else ../shared/data/cifar10-jpg.tar.gz "
                   "beside this repository")
    p.add_argument("--out", default=None, help="default: $DATA_DIR/cifar10, else data/cifar10 in this repository")
    p.add_argument("--download", action="store_true", help="no tarball: download with torchvision (internet)")
    p = sub.add_parser("stats", help="per-channel mean/std of a data_path's training images, as YAML lines for "
                       "the trainers' mean/std keys")
    p.add_argument("data_path", help="what --data_path takes: DIR with train/ (class folders or images), a CIFAR "
                   "folder, hf:PATH_OR_NAME")
    p.add_argument("--max_images", type=int, default=0, help="> 0: a seeded class-balanced sample of that many")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--bad_images", choices=("fail", "skip"), default="fail",
                   help="an image that does not decode: fail (error naming it) or skip (warn, count the next)")
    args = parser.parse_args()
    try:
        if args.cmd == "stats":
            BAD_IMAGES = args.bad_images  # the module default, read by the dataset image_stats builds
            mean, std, n = image_stats(args.data_path, args.max_images, args.num_workers, progress=True)
            print(f"# {n} training images of {args.data_path}, per channel over every pixel, RGB in [0, 1]")
            print(f"mean: [{', '.join(f'{v:.4f}' for v in mean)}]")
            print(f"std: [{', '.join(f'{v:.4f}' for v in std)}]")
        else:
            out = prepare_cifar10(args.out, args.tar, args.download)
            print(f"CIFAR-10 ready in {out}: use --data_path={out}")
    except (OSError, BadImageError) as e:  # missing data, no tarball, a foreign folder in the way, a bad image
        raise SystemExit(f"error: {e}")
