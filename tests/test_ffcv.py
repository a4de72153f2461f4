"""ffcv_data.py: .beton writer (python and CLI), two-view and eval loaders, data order. CPU, the
generated CIFAR-like image folder (the image_folder fixture): no real data. Most of the time is ffcv's
import and numba compiling each loader's pipeline (a few seconds per loader), so the tests share three
loaders."""

import contextlib
import io
import runpy
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import data
import ffcv_data


@pytest.fixture(autouse=True, scope="module")
def needs_ffcv():
    """Skips without ffcv. Imported when the first test here runs, not at collection: ffcv (numba, cv2)
    takes about 3.5 s of CPU to import, which every xdist worker would pay before its first test."""
    pytest.importorskip("ffcv")


# NOTE: numba's finalizers raise KeyError when a compiled ffcv loader is garbage collected (ffcv 1.0.2,
# numba); harmless, but pytest reports each as a warning: the tests keep their loaders alive.
ALIVE = []

REPO = Path(__file__).resolve().parents[1]
B = 16  # batch size of the pretraining loader: 200 train images -> 12 steps at world 1, 6 at world 2


def source_pixels(ds):
    """(N, 3, 32, 32) uint8 of a build_dataset dataset, as its PIL images hold them."""
    return torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(len(ds))])


def cli(*args):
    """`python ffcv_data.py ARGS` run in this process (a subprocess would spend ~8 s importing
    torch and ffcv again): returns the SystemExit message of an error, else None."""
    with mock.patch.object(sys, "argv", ["ffcv_data.py", *map(str, args)]):
        try:
            runpy.run_path(str(REPO / "ffcv_data.py"), run_name="__main__")
        except SystemExit as e:
            return str(e.code)


@pytest.fixture(scope="module")
def betons(image_folder, tmp_path_factory):
    """raw/{train,test}.beton written by write_beton, jpg/{train,test}.beton by the CLI."""
    root = tmp_path_factory.mktemp("betons")
    paths = ffcv_data.write_beton(image_folder, root / "raw", raw=True, num_workers=1)
    assert paths == {"train": root / "raw/train.beton", "test": root / "raw/test.beton"}
    assert cli("--data_path", image_folder, "--out", root / "jpg", "--max_resolution", 32, "--jpeg_quality", 90,
               "--num_workers", 1) is None
    assert (root / "jpg/train.beton").is_file() and (root / "jpg/test.beton").is_file()
    return root


@pytest.fixture(scope="module")
def train_loader(betons):
    """One two-view loader (numba compiles once), moved between epochs with set_epoch."""
    ALIVE.append(loader := ffcv_data.build_ffcv_loader(betons / "raw/train.beton", B, 32, seed=3, num_workers=1))
    return loader


def collect(loader):
    """Clone every batch: ffcv reuses its output buffers."""
    return [((v1.clone(), v2.clone()), y.clone()) for (v1, v2), y in loader]


# --- writer ---------------------------------------------------------------------------------------


def test_raw_round_trip_exact(image_folder, betons):
    ds = data.build_dataset(image_folder, "test")
    assert np.array_equal(ffcv_data.beton_labels(betons / "raw/test.beton"), ds.labels)
    ALIVE.append(loader := ffcv_data.build_ffcv_eval_loader(betons / "raw/test.beton", 64, 32, num_workers=1))
    batches = [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]
    assert [len(y) for _, y, _ in batches] == [64, 36]  # no drop_last in eval
    x, y, idx = (torch.cat(t) for t in zip(*batches))
    assert x.dtype == torch.uint8 and x.shape == (100, 3, 32, 32)
    assert torch.equal(idx, torch.arange(100)) and torch.equal(y, torch.from_numpy(ds.labels))
    assert torch.equal(x, source_pixels(ds))  # raw mode, crop ratio 1 at 32 px: the stored pixels


def pil_jpeg_pixels(ds, quality):
    """(N, 3, H, W) uint8 of ds's images after a JPEG round trip through PIL at quality."""
    def round_trip(img):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)

    return torch.stack([round_trip(ds[i][0]) for i in range(len(ds))])


def test_jpg_round_trip_close(image_folder, betons):
    ds = data.build_dataset(image_folder, "train")
    assert np.array_equal(ffcv_data.beton_labels(betons / "jpg/train.beton"), ds.labels)
    ALIVE.append(loader := ffcv_data.build_ffcv_eval_loader(betons / "jpg/train.beton", 200, 32, num_workers=1))
    x, y, idx = next(iter(loader))
    assert torch.equal(idx, torch.arange(200)) and torch.equal(y, torch.from_numpy(ds.labels))
    # re-encoded at quality 90: as close to the source as PIL's own quality-90 round trip (the bound is
    # relative: the JPEG error depends on the images, e.g. on the generated images' noise)
    err, pil_err = ((t.float() - source_pixels(ds).float()).abs() for t in (x, pil_jpeg_pixels(ds, 90)))
    assert 0 < err.mean() < 1.2 * pil_err.mean() and err.quantile(0.99) <= 1.5 * pil_err.quantile(0.99)


def test_hf_source(image_folder, tmp_path):
    import datasets
    from ffcv.reader import Reader

    files = sorted((image_folder / "train").glob("*/*.jpg"))[::5]  # 40 images, all classes
    classes = sorted(p.name for p in (image_folder / "train").iterdir())
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    hf = datasets.Dataset.from_dict({"img": [str(f) for f in files],
                                     "label": [classes.index(f.parent.name) for f in files]}, features=features)
    datasets.DatasetDict(train=hf).save_to_disk(tmp_path / "hf")
    out = ffcv_data.write_beton(f"hf:{tmp_path / 'hf'}", tmp_path / "b", splits=["train"], raw=True, num_workers=1)
    ds = data.build_dataset(f"hf:{tmp_path / 'hf'}", "train")
    assert np.array_equal(ffcv_data.beton_labels(out["train"]), ds.labels) and len(ds) == 40
    meta = Reader(str(out["train"])).metadata["f0"]  # raw pixels at data_ptr: read them without a loader
    for i in (0, 17, 39):
        stored = np.fromfile(out["train"], np.uint8, 32 * 32 * 3, offset=int(meta["data_ptr"][i]))
        assert meta["mode"][i] == 1 and np.array_equal(stored.reshape(32, 32, 3), np.array(ds[i][0]))


def test_writer_errors(image_folder, betons, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        ffcv_data.write_beton(image_folder, betons / "raw", raw=True)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ffcv_data.write_beton(tmp_path / "nowhere", tmp_path / "out", max_resolution=256)
    with pytest.raises(ValueError, match="--max_resolution .*256-384"):  # JPEG: FFCV's buffers fit the largest image
        ffcv_data.write_beton(image_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="ffcv_data.py"):
        ffcv_data.beton_labels(tmp_path / "none.beton")


def test_cli_errors(betons, tmp_path, image_folder):
    msg = cli("--data_path", tmp_path / "nowhere", "--out", tmp_path / "out", "--raw")
    assert msg.startswith("error:") and str(tmp_path / "nowhere") in msg and not (tmp_path / "out").exists()
    msg = cli("--data_path", image_folder, "--out", tmp_path / "out")  # JPEG without a cap: one line, the flag
    assert msg.startswith("error:") and "--max_resolution" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    msg = cli("--data_path", image_folder, "--out", betons / "jpg", "--max_resolution", 32)
    assert msg.startswith("error:") and "train.beton" in msg and "--overwrite" in msg


# --- pretraining loader --------------------------------------------------------------------------


def test_two_views(betons, train_loader):
    labels = ffcv_data.beton_labels(betons / "raw/train.beton")
    train_loader.set_epoch(0)
    batches = collect(train_loader)
    assert len(train_loader) == len(batches) == 200 // B
    (v1, v2), y = batches[0]
    assert v1.dtype == v2.dtype == torch.uint8 and v1.shape == v2.shape == (B, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (B,)
    assert (v1 != v2).float().mean() > 0.5  # independent crops of the same images
    order = data.EpochSampler(200, B, 0, seed=3).indices()
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(labels)[order])
    specs = train_loader.loader.pipeline_specs  # one decode per image: no second image pipeline
    assert sorted(specs) == ["image", "label"] and type(specs["image"].decoder).__name__ == "PairDecoder"


def test_views_of_one_decode(tmp_path):
    """Both views of a pair are cut from the row's own image: 20 images of different sizes, red constant
    and distinct per row, green a left-to-right ramp (so crops and flips show), in EpochSampler's order
    with their labels; the two views' crops and flips are independent. One file holds both storage modes
    (ffcv's smart mode: the 10 larger images as JPEG, the others raw), so that one loader (one numba
    compile) runs both branches of the pair decoder."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    for r in range(20):
        ramp = np.zeros((30 + r, 40 + 2 * r, 3), np.uint8)
        ramp[..., 0], ramp[..., 1] = 8 + 12 * r, np.linspace(0, 255, ramp.shape[1])
        (tmp_path / f"src/train/c{r % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ramp).save(tmp_path / f"src/train/c{r % 3}/{r:02d}.png")
    ds = data.build_dataset(tmp_path / "src", "train")
    red = torch.tensor([float(np.array(ds[i][0])[0, 0, 0]) for i in range(len(ds))])
    path = tmp_path / "mixed.beton"
    image = RGBImageField(write_mode="smart", smart_threshold=7000, jpeg_quality=100)  # JPEG above 7000 bytes raw
    DatasetWriter(str(path), {"image": image, "label": IntField()}, num_workers=1).from_indexed_dataset(ds)
    jpg = torch.from_numpy(Reader(str(path)).metadata["f0"]["mode"] == IMAGE_MODES["jpg"])
    assert jpg.sum() == 10
    ALIVE.append(loader := ffcv_data.build_ffcv_loader(path, 4, 16, epoch=1, seed=5, num_workers=1))
    assert torch.equal(loader.order, data.EpochSampler(20, 4, 1, seed=5).indices())
    flips = []
    for k, ((v1, v2), y) in enumerate(loader):
        rows = loader.order[4 * k:4 * k + 4]
        assert v1.shape == v2.shape == (4, 3, 16, 16) and v1.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.equal(y, torch.from_numpy(ds.labels)[rows])
        for v in (v1, v2):  # the row's red (rows 12 apart), within JPEG's error (chroma subsampling), raw exactly
            err = (v[:, 0].float() - red[rows, None, None]).abs().amax((1, 2))
            assert (err <= torch.where(jpg[rows], 5, 0)).all(), (err, jpg[rows])
        assert (v1[:, 1] != v2[:, 1]).float().mean() > 0.5  # different crops of the ramp
        flips.append(torch.stack([v[:, 1, :, -1].float().mean(1) < v[:, 1, :, 0].float().mean(1) for v in (v1, v2)]))
    flips = torch.cat(flips, 1)  # (2 views, 20 pairs): True where the ramp runs right to left
    assert len(flips[0]) == 20 and (flips[0] == flips[1]).any() and (flips[0] != flips[1]).any()  # P(fail) 2^-19


def test_order_by_seed_and_epoch(train_loader):
    orders = {}
    for epoch in (0, 1, 0):
        train_loader.set_epoch(epoch)
        order = train_loader.order.clone()
        assert torch.equal(order, data.EpochSampler(200, B, epoch, seed=3).indices())  # the torch path's
        assert order.equal(orders.setdefault(epoch, order))
    assert not orders[0].equal(orders[1]) and len(set(orders[0].tolist())) == 12 * B


def test_mid_epoch_start(train_loader):
    train_loader.set_epoch(1)
    full = [y for _, y in collect(train_loader)]
    train_loader.set_epoch(1, start=5)
    rest = [y for _, y in collect(train_loader)]
    assert len(train_loader) == len(rest) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))
    train_loader.set_epoch(1, start=len(full))  # a run stopped at an epoch's end: nothing left
    assert len(train_loader) == 0 and list(train_loader) == []


def test_rank_shards(betons):
    path = betons / "raw/train.beton"
    for epoch in (0, 4):
        shards = [ffcv_data.build_ffcv_loader(path, B, 32, epoch=epoch, seed=3, rank=r, world=2, num_workers=1)
                  for r in range(2)]
        orders = [s.order for s in shards]
        assert [len(s) for s in shards] == [6, 6] and not set(orders[0].tolist()) & set(orders[1].tolist())
        for r in range(2):  # the torch path's order for the same rank
            assert torch.equal(orders[r], data.EpochSampler(200, B, epoch, seed=3, rank=r, world=2).indices())
        # global batch k = rank 0's k-th block then rank 1's: together the epoch's seeded permutation
        together = torch.cat([orders[0].view(6, B), orders[1].view(6, B)], 1).flatten()  # (6, 2B) -> flat
        glob = torch.randperm(200, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        assert torch.equal(together, glob[:6 * 2 * B])
    sub = ffcv_data.build_ffcv_loader(path, B, 32, seed=3, indices=np.arange(100, 200), num_workers=1)
    assert len(sub) == 100 // B and set(sub.order.tolist()) <= set(range(100, 200))


def test_eval_shards(betons):
    path = betons / "raw/test.beton"
    shards = [ffcv_data.build_ffcv_eval_loader(path, 16, 32, rank=r, world=3, num_workers=1) for r in range(3)]
    assert [len(s.order) for s in shards] == [34, 34, 34] and [len(s) for s in shards] == [3, 3, 3]
    rows = torch.cat([s.order for s in shards])
    assert torch.equal(rows.unique(), torch.arange(100)) and rows[-2:].tolist() == [0, 1]  # padded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(image_folder, betons):
    ALIVE.append(loader := ffcv_data.build_ffcv_eval_loader(betons / "raw/test.beton", 64, 32, device="cuda"))
    x, y, idx = (torch.cat(t) for t in zip(*[(x.clone(), y.clone(), i.clone()) for x, y, i in loader]))
    ds = data.build_dataset(image_folder, "test")
    assert x.is_cuda and y.is_cuda and idx.is_cuda and torch.equal(x.cpu(), source_pixels(ds))
    ALIVE.append(loader := ffcv_data.build_ffcv_loader(betons / "raw/train.beton", B, 24, device="cuda"))
    (v1, v2), y = next(iter(loader))
    assert v1.is_cuda and v1.dtype == torch.uint8 and v2.shape == (B, 3, 24, 24) and y.device == v1.device


def test_epoch_thread_sets_the_loader_device(betons, monkeypatch):
    """ffcv's epoch thread starts on CUDA device 0 (ffcv 1.0.2): FFCVLoader's sets the loader's device in
    that thread before anything else there, and makes the epoch's streams inside torch.cuda.device(it)
    (torch.cuda mocked: the device is cuda:1 in name only, the pipeline stays on the CPU)."""
    import threading

    ALIVE.append(loader := ffcv_data.build_ffcv_eval_loader(betons / "raw/test.beton", 16, 32, num_workers=1))
    plain = [y.clone() for _, y, _ in loader]
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d, threading.get_ident())))

    @contextlib.contextmanager
    def device(d):
        calls.append(("device", d, threading.get_ident()))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    loader.loader.device = torch.device("cuda", 1)
    for epoch in range(2):
        calls.clear()
        ys = [y.clone() for _, y, _ in loader]
        assert all(torch.equal(a, b) for a, b in zip(ys, plain)) and len(ys) == len(plain) == 7
        (made, d0, main), (kind, d1, thread) = calls  # the streams made on cuda:1, then the thread's device
        assert made == "device" and kind == "set_device" and d0 == d1 == torch.device("cuda", 1)
        assert main == threading.get_ident() != thread == loader.epoch_iter.ident


def test_close_stops_the_epoch_thread(train_loader):
    """A loop that stops after one batch (max_steps) leaves ffcv's epoch thread decoding ahead; close()
    ends it, and the loader reads a whole epoch again afterwards."""
    train_loader.set_epoch(0)
    it = iter(train_loader)
    next(it)
    thread = train_loader.epoch_iter
    assert thread.is_alive()
    train_loader.close()
    thread.join(timeout=30)
    assert not thread.is_alive() and train_loader.epoch_iter is None
    train_loader.set_epoch(0)
    assert len(collect(train_loader)) == 200 // B
