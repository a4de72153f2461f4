"""data.py: sources, subsets, two-view augmentation, and the trainers' torch loader (augment.TorchLoader
over data.EpochSampler and data.SeededViews). CPU, a few seconds, on the generated CIFAR-like image
folder (the image_folder fixture in conftest.py): no real data."""

import hashlib
import importlib.util
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augment as A
import data
import ffcv_data
from config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --- sources -------------------------------------------------------------------------------------


def test_imagefolder_source(image_folder):
    ds = data.build_dataset(image_folder, "train")
    assert len(ds) == 200 and ds.num_classes == 10 and ds.classes == CLASSES
    assert Counter(ds.labels.tolist()) == {c: 20 for c in range(10)}
    img, y = ds[0]
    assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB" and y == 0
    ds = data.build_dataset(image_folder, "test", data.eval_transform("cifar10"), return_index=True)
    x, y, i = ds[57]
    assert len(ds) == 100 and x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y == ds.labels[57] == 5 and i == 57
    assert -3 < x.mean() < 3  # normalized, not 0..255


def test_split_naming(image_folder, tmp_path):
    shutil.copytree(image_folder / "train", tmp_path / "train")
    shutil.copytree(image_folder / "test", tmp_path / "val")  # ImageNet's naming
    for split in ("test", "val", "validation"):
        assert len(data.build_dataset(tmp_path, split)) == 100
    (tmp_path / "val").rename(tmp_path / "test")
    assert len(data.build_dataset(tmp_path, "val")) == 100
    shutil.rmtree(tmp_path / "test" / "cat")  # would silently renumber every class after cat
    with pytest.raises(ValueError, match="class folders differ"):
        data.build_dataset(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        data.build_dataset(tmp_path, "holdout")


def test_missing_data_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(e.value) and "extract-cifar10" in str(e.value)
    shutil.copytree(image_folder / "train", tmp_path / "train")
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset(tmp_path, "test")
    assert str(tmp_path / "test") in str(e.value) and str(tmp_path / "val") in str(e.value)


def test_subset_indices():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    idx = data.subset_indices(labels, 50, seed=1)
    assert len(idx) == 50 == len(set(idx)) and Counter(labels[idx].tolist()) == {c: 5 for c in range(10)}
    assert np.array_equal(idx, data.subset_indices(labels, 50, seed=1))  # reproducible
    assert not np.array_equal(idx, data.subset_indices(labels, 50, seed=2))
    first = data.subset_indices(labels, 20, seed=None)  # first 2 of each class, in dataset order
    assert np.array_equal(first, np.sort([np.flatnonzero(labels == c)[k] for c in range(10) for k in (0, 1)]))
    counts = Counter(labels[data.subset_indices(labels, 25, seed=0)].tolist())
    assert sum(counts.values()) == 25 and set(counts.values()) == {2, 3}  # remainder spread one each
    small = np.array([0] * 3 + [1] * 10)
    assert Counter(small[data.subset_indices(small, 10, seed=0)].tolist()) == {0: 3, 1: 5}


def test_subset_dataset(image_folder):
    ds = data.build_dataset(image_folder, "train", subset=30, subset_seed=0, return_index=True)
    assert len(ds) == 30 and Counter(ds.labels.tolist()) == {c: 3 for c in range(10)}
    assert ds.num_classes == 10 and [ds[i][1] for i in range(30)] == ds.labels.tolist()
    assert [ds[i][2] for i in range(30)] == list(range(30))  # positions in the subset, for dedupe


def hf_dataset(image_folder, split, n):
    import datasets

    files = sorted((image_folder / split).glob("*/*.jpg"))[:n]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    images = [Image.open(f).convert("RGB") for f in files]
    labels = [CLASSES.index(f.parent.name) for f in files]
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


def test_hf_saved_to_disk(image_folder, tmp_path):
    import datasets

    dd = datasets.DatasetDict(train=hf_dataset(image_folder, "train", 40),
                              test=hf_dataset(image_folder, "test", 30))
    dd.save_to_disk(tmp_path / "dd")
    ds = data.build_dataset(f"hf:{tmp_path / 'dd'}", "train", data.pretrain_transform("cifar10"))
    (v1, v2), y = ds[5]
    assert len(ds) == 40 and ds.num_classes == 10 and ds.classes == CLASSES
    assert v1.shape == v2.shape == (3, 32, 32) and y == ds.labels[5]
    assert len(data.build_dataset(f"hf:{tmp_path / 'dd'}", "test")) == 30
    again = pickle.loads(pickle.dumps(ds))  # DataLoader workers under spawn (macOS) get a pickled copy
    assert again[5][1] == y and again[5][0][0].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data.build_dataset(f"hf:{tmp_path / 'nowhere'}", "train")
    dd["train"].save_to_disk(tmp_path / "single")  # a single Dataset serves its own split only
    assert len(data.build_dataset(f"hf:{tmp_path / 'single'}", "train")) == 40
    with pytest.raises(FileNotFoundError, match="no split"):
        data.build_dataset(f"hf:{tmp_path / 'single'}", "test")
    # other column names: given explicitly
    renamed = dd["train"].rename_columns({"img": "pixels", "label": "y"})
    renamed.save_to_disk(tmp_path / "renamed")
    with pytest.raises(KeyError):
        data.build_dataset(f"hf:{tmp_path / 'renamed'}", "train")
    ds = data.build_dataset(f"hf:{tmp_path / 'renamed'}", "train", image_key="pixels", label_key="y")
    assert ds[3][0].size == (32, 32)


def test_hf_prefers_validation_and_refuses_unlabeled_splits(image_folder, tmp_path):
    """As the hub's imagenet-1k: train / validation / test, the test labels all -1."""
    import datasets

    test = hf_dataset(image_folder, "test", 20)
    unlabeled = test.map(lambda row: {"label": -1}, features=test.features)
    dd = datasets.DatasetDict(train=hf_dataset(image_folder, "train", 40), validation=hf_dataset(image_folder, "test", 30),
                              test=unlabeled)
    dd.save_to_disk(tmp_path / "in1k_like")
    ds = data.build_dataset(f"hf:{tmp_path / 'in1k_like'}", "test")
    assert len(ds) == 30 and ds.labels.min() >= 0  # validation, not the unlabeled test split
    datasets.DatasetDict(train=dd["train"], test=unlabeled).save_to_disk(tmp_path / "only_test")
    with pytest.raises(ValueError, match=r"split 'test' has no labels \(20 of 20 rows"):
        data.build_dataset(f"hf:{tmp_path / 'only_test'}", "test")


def test_hf_imagefolder(image_folder, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep ~ clean
    ds = data.build_dataset(f"hf:{image_folder}", "test", data.eval_transform("cifar10"))
    assert len(ds) == 100 and ds.classes == CLASSES
    assert Counter(ds.labels.tolist()) == {c: 10 for c in range(10)}
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == ds.labels[0]


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_torchvision_cifar_format(tmp_path, monkeypatch, kind):
    # A fake python-pickle CIFAR folder, laid out and keyed like the real one.
    cls = torchvision.datasets.CIFAR10 if kind == "cifar10" else torchvision.datasets.CIFAR100
    n_cls, label_key = (10, "labels") if kind == "cifar10" else (100, "fine_labels")
    folder = tmp_path / cls.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name, _ in cls.train_list + cls.test_list:
        batches[name] = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8),
                         label_key: rng.integers(0, n_cls, 8).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names = [f"c{i}" for i in range(n_cls)]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: names}))

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    # torchvision checks the real files' md5 sums; swap in the fake files' ones
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})

    for path in (tmp_path, folder):  # the parent folder or the folder itself
        train = data.build_dataset(path, "train")
        test = data.build_dataset(path, "test", data.eval_transform(kind))
        assert len(train) == 8 * len(cls.train_list) and len(test) == 8
        assert train.num_classes == n_cls and train.classes == names
        first = batches[cls.train_list[0][0]]
        img, y = train[0]
        assert np.array_equal(np.asarray(img), first["data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
        assert y == first[label_key][0] and test[0][0].shape == (3, 32, 32)


def test_prepare_cifar10(tmp_path, capsys):
    tar = mini_cifar_tar(tmp_path / "mini.tar.gz")
    dest = data.prepare_cifar10(tmp_path / "data" / "cifar10", tar)
    assert (dest / ".extracted").is_file() and len(data.build_dataset(dest, "test")) == 2
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar10"]  # no temp folder left
    tar.unlink()
    assert data.prepare_cifar10(dest, tar) == dest  # idempotent: does not need the tarball again
    with pytest.raises(FileNotFoundError, match="--download"):
        data.prepare_cifar10(tmp_path / "other", tar)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not CIFAR-10")
    with pytest.raises(FileExistsError, match="holds no train/ folder"):  # config.USER_ERRORS: one line
        data.prepare_cifar10(tmp_path / "foreign", tar)
    (tmp_path / "empty").mkdir()  # made by hand beforehand: filled, not refused
    tar = mini_cifar_tar(tmp_path / "mini.tar.gz")
    assert len(data.build_dataset(data.prepare_cifar10(tmp_path / "empty", tar), "test")) == 2
    shutil.copytree(tmp_path / "empty" / "train", tmp_path / "own" / "train")  # a copy made by hand: used as it is
    assert data.prepare_cifar10(tmp_path / "own", tmp_path / "none.tar.gz") == tmp_path / "own"


def mini_cifar_tar(path):
    """A tarball laid out as the CIFAR-10 JPEG one: cifar10/{train,test}/{a,b}/0000.jpg."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            for c in ("a", "b"):
                info = tarfile.TarInfo(f"cifar10/{split}/{c}/0000.jpg")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_default_data_is_made_where_said_and_says_so(tmp_path, capsys, monkeypatch):
    """The trainers' default data_path, data/cifar10, is relative to the current directory: a
    trainer started elsewhere extracts the tarball there and prints one line naming both; without a
    tarball the download is announced the same way before it is tried."""
    tar = mini_cifar_tar(tmp_path / "mini.tar.gz")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    p = subprocess.run([sys.executable, str(REPO / "train_us3l.py"), "--arch=resnet18_cifar_tiny", "--max_steps=1",
                        "--num_workers=0", f"--out_dir={tmp_path / 'out'}"], cwd=run_dir, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "CIFAR10_TAR": str(tar)})
    dest = (run_dir / "data" / "cifar10").resolve()
    said = [line for line in p.stdout.splitlines() if line.startswith("CIFAR-10:")]
    assert said == [f"CIFAR-10: extracting {tar} into {dest} (once)"], p.stdout + p.stderr[-2000:]
    assert (dest / ".extracted").is_file() and not (REPO / "data" / "cifar10" / "a").exists()
    assert p.returncode == 1 and "exceeds the 2 training images" in p.stderr  # 4 images: a tarball stand-in

    assert data.prepare_cifar10(dest, tar) == dest and capsys.readouterr().out == ""  # ready: silent

    def offline(root, download):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(FileNotFoundError, match="the download failed"):
        data.prepare_cifar10(tmp_path / "dl" / "cifar10", tmp_path / "none.tar.gz", download=True)
    assert capsys.readouterr().out == (f"CIFAR-10: no tarball at {tmp_path / 'none.tar.gz'}: downloading it with "
                                       f"torchvision into {(tmp_path / 'dl' / 'cifar10').resolve()} (once)\n")


# --- normalization: the mean/std keys and `python data.py stats` -----------------------------------


def test_normalization_keys():
    """Both empty: the dataset's preset; both given: them; anything else a ConfigError naming the key."""
    assert data.normalization("cifar100") == data.MEAN_STD["cifar100"]
    assert data.normalization("imagenet", [0.5, 0.4, 0.3], [0.2, 0.2, 0.25]) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.25))
    for mean, std, message in (
            ([0.5, 0.4, 0.3], [], "config error: mean=[0.5, 0.4, 0.3] without std: give both"),
            ([], [0.2, 0.2, 0.2], "config error: std=[0.2, 0.2, 0.2] without mean: give both"),
            ([0.5, 0.4], [0.2, 0.2, 0.2], "config error: mean=[0.5, 0.4]: 3 values needed (R, G, B), got 2"),
            ([0.5, 0.4, 0.3], [0.2, 0.2, 0.2, 0.2], "config error: std=[0.2, 0.2, 0.2, 0.2]: 3 values needed"),
            ([0.5, 0.4, 0.3], [0.2, 0.0, 0.2], "config error: std=[0.2, 0.0, 0.2]: each must lie in (0, 1]"),
            ([0.5, 0.4, 0.3], [0.2, -0.1, 0.2], "config error: std=[0.2, -0.1, 0.2]: each must lie in (0, 1]"),
            ([123.7, 116.3, 103.5], [58.4, 57.1, 57.4], "config error: mean=[123.7, 116.3, 103.5]: each must lie "
                                                        "in [0, 1] (pixels are scaled to [0, 1] first")):
        with pytest.raises(ConfigError) as e:
            data.normalization("cifar10", mean, std)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="dataset='svhn', allowed: cifar10, cifar100, imagenet"):
        data.normalization("svhn")


@pytest.mark.parametrize("script", ["train_us3l.py", "train_dspnet.py", "eval_knn.py", "eval_linear.py", "export.py"])
def test_bad_mean_std_is_one_line_before_any_data(script, tmp_path, monkeypatch, fresh_accelerate):
    """Each script with the keys refuses a bad pair in one line naming the key, before reading any data
    (data_path does not exist here)."""
    import eval_knn
    import eval_linear
    import export
    import train_dspnet
    import train_us3l
    from tests.test_train_us3l import cli

    module = {"train_us3l.py": train_us3l, "train_dspnet.py": train_dspnet, "eval_knn.py": eval_knn,
              "eval_linear.py": eval_linear, "export.py": export}[script]
    argv = [f"--data_path={tmp_path / 'nowhere'}", f"--{'out' if script == 'export.py' else 'out_dir'}={tmp_path / 'o'}",
            "--arch=resnet18_cifar_tiny", "--mean=0.5,0.5", "--std=0.2,0.2,0.2"]
    said = cli(module.main, module.Config, argv, monkeypatch)
    assert said == "config error: mean=[0.5, 0.5]: 3 values needed (R, G, B), got 2", said


def test_stats_command(tmp_path):
    """`python data.py stats DIR`: the per-channel mean and std over every pixel of DIR's training images
    (any sizes, RGB in [0, 1]), printed as the YAML lines of the mean/std keys, which a recipe then loads;
    a folder with no images is one line."""
    import train_us3l

    rng = np.random.default_rng(0)
    pixels = []
    for c, (w, h) in enumerate([(16, 12), (9, 20), (31, 7)]):  # 3 classes, images of different sizes
        (tmp_path / "d" / "train" / f"c{c}").mkdir(parents=True)
        for k in range(2):
            a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            a[..., 0] //= 2 + c  # channels with different statistics
            Image.fromarray(a).save(tmp_path / "d" / "train" / f"c{c}" / f"{k}.png")  # lossless
            pixels.append(a.reshape(-1, 3) / 255)
    pixels = np.concatenate(pixels)
    p = subprocess.run([sys.executable, "data.py", "stats", str(tmp_path / "d"), "--num_workers=0"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == f"# 6 training images of {tmp_path / 'd'}, per channel over every pixel, RGB in [0, 1]"
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(p.stdout)
    cfg = parse_config(train_us3l.Config, ["--config", str(recipe)])  # the lines, pasted into a recipe
    np.testing.assert_allclose(cfg.mean, pixels.mean(0), atol=5e-5)  # printed to 4 decimals
    np.testing.assert_allclose(cfg.std, pixels.std(0), atol=5e-5)
    assert data.normalization(cfg.dataset, cfg.mean, cfg.std) == (tuple(cfg.mean), tuple(cfg.std))
    mean, std, n = data.image_stats(tmp_path / "d")  # the function behind it, unrounded
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)
    assert n == 6
    (tmp_path / "empty").mkdir()
    p = subprocess.run([sys.executable, "data.py", "stats", str(tmp_path / "empty")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith(f"error: data_path {tmp_path / 'empty'} is an empty folder")
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_mean_std_keys_reach_every_eval_path(image_folder, tmp_path):
    """knn.build_knn_loaders with the keys' normalization: the torch, cached, device and ffcv paths serve
    each image as data.eval_transform with that normalization makes it, and the calibration set too."""
    from torch.utils.data import DataLoader

    import knn

    mean_std = data.normalization("cifar10", [0.3, 0.5, 0.7], [0.1, 0.2, 0.4])
    want = [[tuple(t) for t in DataLoader(data.build_dataset(image_folder, split, data.eval_transform(
        "cifar10", mean_std=mean_std), return_index=True), batch_size=50)] for split in ("train", "test")]
    default = data.build_dataset(image_folder, "test", data.eval_transform("cifar10"))[0][0]
    assert not torch.allclose(want[1][0][0][0], default, atol=0.1)  # not the preset
    kinds = [{}, {"cache": True}, {"loader": "device"}]
    if importlib.util.find_spec("ffcv"):  # FFCV's batches are normalized by knn.py itself: a raw .beton's pixels
        ffcv_data.write_beton(image_folder, tmp_path / "beton", raw=True, num_workers=1)
        kinds.append({"loader": "ffcv", "ffcv_path": str(tmp_path / "beton")})
    for kw in kinds:
        got = knn.build_knn_loaders(image_folder, "cifar10", 50, mean_std=mean_std, **kw)
        for loader, ref in zip(got, want, strict=True):
            for b, r in zip(loader, ref, strict=True):
                torch.testing.assert_close(b[0].cpu(), r[0], atol=1e-5, rtol=0, msg=str(kw))
                assert torch.equal(b[1].cpu(), r[1]) and torch.equal(b[2].cpu(), r[2])
    calib = knn.fixed_calibration_batches(image_folder, "cifar10", 0, 20, 10, mean_std=mean_std)
    train = data.build_dataset(image_folder, "train", data.eval_transform("cifar10", mean_std=mean_std))
    assert all(torch.equal(a, b) for a, b in zip(calib, knn.calibration_shard(train, 20, 10), strict=True))


# --- augmentation --------------------------------------------------------------------------------


def test_augmentation_parameters():
    def ops(t):
        return {type(o).__name__: o for o in t.transforms}

    for dataset, size in (("cifar10", 32), ("imagenet", 224)):
        views = data.pretrain_transform(dataset)
        for view, blur_p, solarize_p in ((views.t1, 1.0, 0.0), (views.t2, 0.1, 0.2)):
            o = ops(view)
            assert o["RandomResizedCrop"].size == (size, size) and o["RandomResizedCrop"].scale == (0.08, 1.0)
            jitter = o["RandomApply"]
            assert jitter.p == 0.8
            cj = jitter.transforms[0]
            assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                                          (-0.1, 0.1))
            assert o["RandomGrayscale"].p == 0.2 and o["RandomSolarize"].p == solarize_p
            assert ("GaussianBlur" not in o) if dataset == "cifar10" else o["GaussianBlur"].p == blur_p
            assert tuple(o["Normalize"].mean) == data.MEAN_STD[dataset][0]
        # aug=mocov2 (the US3L release's recipe): one transform for both views, saturation 0.4, blur
        # p=0.5 off CIFAR, no solarize, bilinear crops of the requested min_scale (MoCo v2: 0.2)
        views = data.pretrain_transform(dataset, min_scale=0.2, aug="mocov2")
        assert views.t1 is views.t2
        o = ops(views.t1)
        crop = o["RandomResizedCrop"]
        assert crop.size == (size, size) and crop.scale == (0.2, 1.0)
        assert crop.interpolation == torchvision.transforms.InterpolationMode.BILINEAR
        assert o["RandomApply"].p == 0.8 and o["RandomGrayscale"].p == 0.2 and o["RandomHorizontalFlip"].p == 0.5
        cj = o["RandomApply"].transforms[0]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
        assert "RandomSolarize" not in o
        assert ("GaussianBlur" not in o) if dataset == "cifar10" else o["GaussianBlur"].p == 0.5
        assert tuple(o["Normalize"].mean) == data.MEAN_STD[dataset][0]
    with pytest.raises(ValueError, match="aug must be byol or mocov2"):
        data.pretrain_transform("cifar10", aug="simclr")


@pytest.mark.parametrize("aug", ["byol", "mocov2"])
def test_two_views_cifar(image_folder, aug):
    img = Image.open(next((image_folder / "train" / "cat").glob("*.jpg")))
    torch.manual_seed(0)
    v1, v2 = data.pretrain_transform("cifar10", aug=aug)(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == v2.dtype == torch.float32
    assert not torch.equal(v1, v2)


def test_two_views_imagenet(image_folder):
    img = Image.open(next((image_folder / "train" / "dog").glob("*.jpg"))).resize((96, 80))
    torch.manual_seed(0)
    v1, v2 = data.pretrain_transform("imagenet", size=64)(img)
    assert v1.shape == v2.shape == (3, 64, 64) and v1.dtype == torch.float32 and not torch.equal(v1, v2)
    x = data.eval_transform("imagenet", size=64)(img)
    assert x.shape == (3, 64, 64)
    blur = data.GaussianBlur(p=1.0, sigma=(2.0, 2.0))  # blurring lowers the pixel variance
    assert np.asarray(blur(img), dtype=float).std() < np.asarray(img, dtype=float).std()


def test_eval_transform_sizes(image_folder):
    """CIFAR as stored for a network that takes any size (None) or 32 px; at another size (a network that fixes
    it, the release's 224 px ViT) upsampled as the release's ViT probe tests: Resize(256) + CenterCrop(224), scaled
    to the size, bicubic, on the normalized tensor, last. ImageNet as before."""
    import torchvision.transforms as T

    img = Image.open(next((image_folder / "test" / "ship").glob("*.jpg")))
    mean, std = data.MEAN_STD["cifar10"]
    as_is = data.eval_transform("cifar10")
    assert [type(t) for t in as_is.transforms] == [T.ToTensor, T.Normalize]
    for same in (data.eval_transform("cifar10", 32), data.eval_transform("cifar10", 0)):
        assert torch.equal(same(img), as_is(img))
    for size, resized in ((224, 256), (48, 55)):
        t = data.eval_transform("cifar10", size)
        assert [type(o) for o in t.transforms] == [T.ToTensor, T.Normalize, T.Resize, T.CenterCrop]
        resize, crop = t.transforms[2:]
        assert resize.size == resized and resize.interpolation == T.InterpolationMode.BICUBIC and resize.antialias
        assert crop.size == (size, size)
        x = t(img)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        # the two ops on the 32 px tensor (how knn.py upsamples cached batches), and close to PIL's bicubic
        # resize of the image (which rounds to 8 bits and clips the overshoot)
        assert torch.equal(T.Compose(t.transforms[2:])(as_is(img)), x)
        pil = T.Compose([T.Resize(resized, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                         T.ToTensor(), T.Normalize(mean, std)])(img)
        assert (pil - x).abs().mean() < 0.02
    # ImageNet: Resize + CenterCrop on the image, then ToTensor + Normalize, as before
    assert [type(o) for o in data.eval_transform("imagenet", 64).transforms] == [T.Resize, T.CenterCrop, T.ToTensor,
                                                                                 T.Normalize]


# --- loader: the trainers' torch path (augment.TorchLoader over data.EpochSampler + data.SeededViews) ---


def epoch_batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(v1, v2, y) for (v1, v2), y in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b), f"{len(a)} batches, expected {len(b)}"
    for k, (x, y) in enumerate(zip(a, b)):
        for name, s, t in zip(("view 1", "view 2", "labels"), x, y):
            same = torch.equal(s, t)
            assert same, f"batch {k}: {name} differ"


def test_torch_loader_views_are_a_function_of_seed_epoch_and_index(image_folder):
    """The views of an image depend on (seed, epoch, index) only: not on the number of DataLoader
    workers, nor on the process count (for one global batch, the ranks' batches of world=2 side by side
    are world=1's, view for view), and a run resumed mid-epoch (start=k) gets exactly the rest of the
    uninterrupted epoch. 80 images at 16 px: the contract does not depend on the size."""
    def loader(batch_size, rank=0, world=1, num_workers=0):
        return A.build_train_loader("torch", image_folder, "", "cifar10", 16, batch_size, subset=80, seed=5,
                                    rank=rank, world=world, num_workers=num_workers)

    one = epoch_batches(loader(16), epoch=2)  # 5 global batches of 16
    assert len(one) == 5 and one[0][0].shape == (16, 3, 16, 16) and not torch.equal(one[0][0], one[0][1])
    assert_same_batches(epoch_batches(loader(16, num_workers=2), epoch=2), one)
    ranks = [epoch_batches(loader(8, rank, world=2), epoch=2) for rank in (0, 1)]
    assert_same_batches([tuple(torch.cat(t) for t in zip(a, b)) for a, b in zip(*ranks)], one)
    assert_same_batches(epoch_batches(loader(16), epoch=2, start=3), one[3:])
    other = epoch_batches(loader(16), epoch=3)  # a new epoch: a new order and new views
    assert not torch.equal(other[0][2], one[0][2]) and not torch.equal(other[0][0], one[0][0])


def test_bad_images_policy_reaches_the_loader_workers(image_folder, tmp_path, monkeypatch):
    """bad_images through the trainers' torch loader with 2 DataLoader workers. fail: the worker's
    BadImageError, naming the file and bad_images=skip, is raised here. skip: the next image stands in,
    with the views of the bad one's (seed, epoch, index). Linux forks the workers (they inherit
    data.BAD_IMAGES); spawned ones (macOS, Windows) unpickle the dataset in a fresh interpreter, where
    data.BAD_IMAGES is "fail": the policy must travel with the dataset (the last check)."""
    root, standin = tmp_path / "bad", tmp_path / "standin"
    for folder in (root, standin):
        for name in ("bird", "cat", "dog"):  # 60 images
            shutil.copytree(image_folder / "train" / name, folder / "train" / name)
    cat = sorted((image_folder / "train" / "cat").glob("*.jpg"))
    jpeg = cat[5].read_bytes()
    (root / "train" / "cat" / cat[5].name).write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    shutil.copy(cat[6], standin / "train" / "cat" / cat[5].name)  # what skip serves in its place

    def batches(path):
        loader = A.build_train_loader("torch", path, "", "cifar10", 16, 20, seed=1, num_workers=2)
        return epoch_batches(loader, epoch=0)  # 3 batches of 20: every image read

    with pytest.raises(data.BadImageError, match=f"(?s)in DataLoader worker.*unreadable image .*cat/{cat[5].name} "
                                                 ".*bad_images=skip") as failed:
        batches(root)
    # the traceback's frames hold the DataLoader iterator in a reference cycle: left to the garbage
    # collector, its shutdown waits out a 5 s join timeout per worker (measured: 10 s); freed here at once
    traceback.clear_frames(failed.value.__traceback__)
    monkeypatch.setattr(data, "BAD_IMAGES", "skip")
    assert_same_batches(batches(root), batches(standin))
    ds = data.build_dataset(root, "train")
    i = [path for path, _ in ds.base.samples].index(str(root / "train" / "cat" / cat[5].name))
    monkeypatch.setattr(data, "BAD_IMAGES", "fail")  # as in a spawned worker
    spawned = pickle.loads(pickle.dumps(data.SeededViews(ds)))
    with pytest.warns(UserWarning, match=f"skipped unreadable image .*{cat[5].name}"):
        img, y = spawned[0, i]
    assert y == 1 and np.array_equal(np.array(img), np.array(Image.open(cat[6])))  # the next image, a cat


def unlabelled_folder(image_folder, root):
    """train/ with the images and no class folders (and no test/): unlabelled data."""
    (root / "train").mkdir(parents=True)
    for i, path in enumerate(sorted((image_folder / "train").rglob("*.jpg"))[:48]):
        shutil.copy(path, root / "train" / f"{i:03d}.jpg")
    return root


def test_unlabelled_folder_pretrains_without_the_knn_monitor(image_folder, tmp_path, monkeypatch, fresh_accelerate):
    """An image folder without class folders loads as one unlabelled class; both trainers pretrain on it
    with knn_monitor=false (no test split needed; the collapse monitor is logged) and name the key
    otherwise, in one line."""
    import train_dspnet
    import train_us3l
    from tests.test_dspnet import tiny_args as dspnet_args
    from tests.test_train_us3l import cli, read_log
    from tests.test_train_us3l import tiny_args as us3l_args

    root = unlabelled_folder(image_folder, tmp_path / "flat")
    ds = data.build_dataset(root, "train")
    assert len(ds) == 48 and ds.classes == [data.UNLABELLED] and set(ds.labels) == {0}
    assert data.is_unlabelled(root) and not data.is_unlabelled(image_folder)
    img, y = ds[0]
    assert img.size == (32, 32) and y == 0
    for module, args in ((train_us3l, us3l_args), (train_dspnet, dspnet_args)):
        out = tmp_path / module.__name__
        msg = cli(module.main, module.Config, args(root, out, max_steps=2, batch_size=16), monkeypatch)
        assert msg == (f"config error: {root}/train holds images without class folders (unlabelled): the kNN "
                       f"monitor needs labels and a test split; set knn_monitor=false")
        fresh_accelerate()
        results = module.main(parse_config(module.Config, args(root, out, max_steps=2, batch_size=16,
                                                               knn_monitor="false", log_every=1)))
        fresh_accelerate()
        assert results["knn_top1"] == {} and results["knn_top1_init"] == {}
        assert any(k.startswith("collapse_std/") for k in read_log(out)[-1])
        assert (out / "backbone.pt").is_file()
