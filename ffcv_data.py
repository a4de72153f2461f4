"""FFCV (.beton) data: write once, then decode (once per image for both views), crop and flip in FFCV's
compiled threads and get uint8 batches on the device; the rest of the BYOL augmentation runs batched
there (augment.py). The loader for ImageNet-size runs (loader=ffcv in the trainers and the evaluations).

    python ffcv_data.py --data_path data/cifar10 --out data/cifar10-ffcv --raw            # CIFAR, once
    python ffcv_data.py --data_path hf:NAME_OR_PATH --out DIR --max_resolution 256        # ImageNet, JPEG

    loader = build_ffcv_loader("DIR/train.beton", 256, 224, rank=r, world=w, device=dev)  # once
    loader.set_epoch(epoch, start)   # then: for (v1, v2), y in loader: ...  uint8 (B, 3, 224, 224)

ffcv is optional and slow to import (numba): it is imported inside these functions only. Accelerate:
these loaders are NOT passed to prepare; each process builds its own after Accelerator() exists, with
rank=accelerator.process_index, world=accelerator.num_processes, device=accelerator.device. NOTE:
sharding is by explicit rows per rank, not ffcv's distributed=True (which needs torch.distributed up
and uses DistributedSampler's order, not data.EpochSampler's). The rows of a .beton are build_dataset's
order, so the same subset indices select the same images on either path.
"""

import argparse
import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import data
from config import UserError
from data import BadImageError, EpochSampler, build_dataset
from utils import cpus_per_rank


def require_ffcv():
    """One line, not an ImportError's traceback, where FFCV is not installed (make install FFCV=0)."""
    try:
        import ffcv  # noqa: F401
    except ImportError:
        raise UserError("loader=ffcv needs FFCV, which is not installed: `make install` (with FFCV's Debian "
                        "packages), or pip install ffcv==1.0.2 once libturbojpeg, OpenCV and pkg-config are there; "
                        "loader=torch (any data) and loader=device (CIFAR) need none") from None


def write_beton(data_path, out, splits=("train", "test"), max_resolution=None, jpeg_quality=90, raw=False,
                num_workers=None, overwrite=False, image_key=None, label_key=None):
    """Write OUT/<split>.beton (fields image: RGBImageField, label: IntField) for each split of anything
    build_dataset reads (image folder, torchvision CIFAR, hf:...; 'test' falls back to val as there).
    raw: store pixels (small images such as CIFAR: no decoding); else JPEG at jpeg_quality.
    max_resolution: cap on the longer side (FFCV shrinks with INTER_AREA), required for JPEG: FFCV's
    loaders allocate a pinned decode buffer per batch row for the largest stored image, and ImageNet has
    images over 4000 px. Each file is written beside its final name and renamed when complete.
    Returns {split: path}."""
    if not raw and not max_resolution:
        raise ValueError("JPEG .beton files need --max_resolution (max_resolution=), the cap on the longer side: "
                         "256-384 for ImageNet at 224 px (FFCV's ImageNet example: ~256-512); --raw for CIFAR")
    out = Path(out).expanduser()
    targets = {s: out / f"{s}.beton" for s in splits}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exists: pass --overwrite (overwrite=True) to replace it")
    sources = {s: build_dataset(data_path, s, image_key=image_key, label_key=label_key) for s in splits}
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField  # after the checks: a bad path fails fast
    from ffcv.writer import DatasetWriter

    out.mkdir(parents=True, exist_ok=True)
    image = RGBImageField(write_mode="raw" if raw else "jpg", max_resolution=max_resolution,
                          jpeg_quality=jpeg_quality)
    for s, ds in sources.items():
        tmp = targets[s].with_name(f".{s}.beton.tmp")
        print(f"{s}: {len(ds)} images from {data_path} -> {targets[s]}")
        errors = tmp.with_suffix(".errors")
        errors.unlink(missing_ok=True)
        try:  # DatasetWriter forks num_workers processes, each reading (PIL RGB image, int) from ds
            writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                                   num_workers=num_workers or min(8, os.cpu_count() or 1))
            writer.from_indexed_dataset(_NoteErrors(ds, errors))
            if errors.exists():
                said = errors.read_text().splitlines()
                raise BadImageError(f"{len(said)} image(s) of {data_path} ({s}) could not be written; the first: "
                                    f"{said[0]}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            errors.unlink(missing_ok=True)
        os.replace(tmp, targets[s])
    return targets


class _NoteErrors(Dataset):
    """ds for FFCV's writer processes, which hang when one raises: an image that fails is noted in
    the file `errors` (one line each, appended by any process) and written as an 8x8 placeholder;
    write_beton then raises, naming it, and deletes the partial file."""

    def __init__(self, ds, errors):
        self.ds, self.errors = ds, errors

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]
        except Exception as e:
            with open(self.errors, "a") as f:
                f.write(f"{type(e).__name__}: {e}".replace("\n", " ") + "\n")
            return Image.new("RGB", (8, 8)), 0


def beton_labels(path):
    """The label column of a .beton (int64 numpy), from its metadata: no image decoding."""
    from ffcv.reader import Reader

    if not Path(path).is_file():
        raise FileNotFoundError(f"no .beton file {path}: write one with `python ffcv_data.py`")
    r = Reader(str(path))
    if "label" not in r.field_names:
        raise KeyError(f"{path} has fields {r.field_names}, not image and label (write_beton's)")
    return np.array(r.metadata[f"f{r.field_names.index('label')}"], dtype=np.int64)  # columns f0, f1...


def _device_loader():
    """ffcv's Loader whose epoch thread works on the loader's device (its `device` attribute). NOTE: in
    ffcv 1.0.2 (loader/epoch_iterator.py) the thread that decodes and copies batches starts on CUDA device
    0, whatever device the process set, and leaving `torch.cuda.stream(s)` around each batch sets that
    device's stream current again: every rank but rank 0 opens a CUDA context (some 500 MB) on GPU 0. The
    thread now sets the loader's device first, and the epoch's CUDA streams are made on it. Built here so
    that importing this module does not import ffcv."""
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class DeviceEpochIterator(EpochIterator):
        def __init__(self, loader, order):
            self.device = loader.device  # before EpochIterator.__init__, which starts the thread (run)
            on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
            with on_device:  # the consumer's stream and the epoch's streams: on the loader's device
                super().__init__(loader, order)

        def run(self):  # the epoch thread
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            super().run()

    class DeviceLoader(Loader):
        def __init__(self, *args, device, **kwargs):
            self.device = torch.device(device)
            super().__init__(*args, **kwargs)

        def __iter__(self):  # ffcv 1.0.2's Loader.__iter__, with DeviceEpochIterator for EpochIterator
            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return DeviceEpochIterator(self, selected_order)

    return DeviceLoader


class FFCVLoader:
    """An ffcv Loader reading .beton rows in the order epoch_order(epoch, start) gives (SEQUENTIAL over
    explicit indices), its outputs renamed: ((v1, v2), y) for kind 'views', (v, y) for 'view', (x, y, idx)
    for 'eval', idx the rows. set_epoch switches order without a new ffcv Loader, which would recompile
    its pipeline with numba (about 4 s on 2 busy cores). num_workers: FFCV's decoding threads (numba's),
    default utils.cpus_per_rank() (this process's share of the node's CPUs). Its epoch thread runs on
    `device` (_device_loader). NOTE: ffcv reuses its output buffers: a batch stays valid for about
    batches_ahead batches; clone what you keep longer."""

    def __init__(self, path, batch_size, pipelines, kind, device, epoch_order, epoch=0, start=0,
                 num_workers=None, drop_last=True, batches_ahead=3):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        self.kind, self.batch_size, self.device, self.epoch_order = kind, batch_size, device, epoch_order
        self.epoch_iter = None  # ffcv's EpochIterator (a thread) of the epoch being read: close()
        labels = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(torch.device(device), non_blocking=True)]
        self.loader = _device_loader()(
            str(path), batch_size=batch_size, num_workers=num_workers or cpus_per_rank(),
            order=OrderOption.SEQUENTIAL, indices=np.zeros(0, np.uint64), drop_last=drop_last,
            pipelines={**pipelines, "label": labels}, batches_ahead=batches_ahead, device=device)
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch, start=0):
        order = np.asarray(self.epoch_order(epoch, start), dtype=np.uint64)
        # NOTE: ffcv 1.0.2 keeps the rows in three places: Loader.indices, its traversal order's (which
        # SEQUENTIAL returns as is) and first_traversal_order (which sets len(loader)).
        loader = self.loader
        loader.indices = loader.traversal_order.indices = loader.first_traversal_order = order
        self.order = torch.as_tensor(order.astype(np.int64), device=self.device)

    def __len__(self):
        return len(self.loader)

    def close(self):
        """Stop the epoch in flight, if any: its ffcv thread keeps decoding batches ahead (and holds
        its pinned buffers) until the epoch ends, which never comes when a training loop stops early
        (max_steps, an error). Iterating again starts a new epoch thread."""
        if self.epoch_iter is not None:
            self.epoch_iter.close()
            self.epoch_iter = None

    def __iter__(self):
        self.close()  # one epoch thread at a time
        self.epoch_iter = iter(self.loader)
        for k, batch in enumerate(self.epoch_iter):
            if self.kind == "views":  # (B, 2, H, W, 3) -> two (B, 3, H, W) views of the same buffer
                x, y = batch
                v1, v2 = x.permute(1, 0, 4, 2, 3)
                yield (v1, v2), y
            elif self.kind == "view":
                yield batch
            else:
                yield *batch, self.order[k * self.batch_size: k * self.batch_size + len(batch[1])]


def _to_device_image(device, flip):
    """After an image decoder: (B, H, W, 3) uint8 numpy -> (B, 3, H, W) uint8 on the device, in
    channels_last memory (ToTorchImage permutes)."""
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    tail = [ToTensor(), ToDevice(torch.device(device), non_blocking=True), ToTorchImage()]
    return [RandomHorizontalFlip(), *tail] if flip else tail


def _mirror(image):
    """Flip an (H, W, 3) array left-right in place (numba code; a copy per flip, `image[:, ::-1].copy()`, cost
    the pair decoder 25% of its rate in bench/bench_data.py on 2 CPU threads)."""
    w = image.shape[1]
    for r in range(image.shape[0]):
        for c in range(w // 2):
            for ch in range(3):
                image[r, c, ch], image[r, w - 1 - c, ch] = image[r, w - 1 - c, ch], image[r, c, ch]


def _pair_decoder(size, min_scale):
    """An FFCV decoder that decodes each stored image once (JPEG; raw pixels are used as stored) and
    writes two independent RandomResizedCrop(size, scale=(min_scale, 1)) views of it, each flipped with
    probability 1/2: output (B, 2, size, size, 3) uint8. It exists because FFCV's decoders give one crop
    per decode, and a second PipelineSpec on the same field decodes every JPEG again: at ImageNet size
    the decode, not the crop, is most of the loader's time. The class is built here so that importing
    this module does not import ffcv."""
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class PairDecoder(RandomResizedCropRGBImageDecoder):
        def declare_state_and_memory(self, previous_state):  # the parent's buffers, two views per row
            state, (out, scratch) = super().declare_state_and_memory(previous_state)
            shape = (2, *out.shape)
            return replace(state, shape=shape), (replace(out, shape=shape), scratch)

        def generate_code(self):
            jpg, read, rows = IMAGE_MODES["jpg"], self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            random_crop, mirror_c = Compiler.compile(get_random_crop), Compiler.compile(_mirror)
            scale, ratio = np.array(self.scale), np.array(self.ratio)

            def decode(batch_indices, storage, metadata, storage_state):
                out, scratch = storage  # out (B, 2, size, size, 3); scratch (B, 3 * largest H * W)
                for k in rows(len(batch_indices)):  # numba prange: rows in parallel threads
                    field = metadata[batch_indices[k]]
                    h, w = np.uint32(field["height"]), np.uint32(field["width"])
                    data = read(field["data_ptr"], storage_state)
                    if field["mode"] == jpg:
                        imdecode_c(data, scratch[k], h, w, h, w, 0, 0, 1, 1, False, False)
                        image = scratch[k][:3 * h * w].reshape(h, w, 3)
                    else:
                        image = data.reshape(h, w, 3)
                    for v in range(2):  # crop and flip draws: numba's per-thread RNG, independent per view
                        i, j, ch, cw = random_crop(h, w, scale, ratio)
                        resize_crop_c(image, i, i + ch, j, j + cw, out[k, v])  # needs a contiguous out[k, v]
                        if np.random.rand() < 0.5:
                            mirror_c(out[k, v])
                return out[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return PairDecoder((size, size), scale=(min_scale, 1.0))


def build_ffcv_loader(path, batch_size, size, epoch=0, start=0, seed=0, rank=0, world=1, device="cpu",
                      two_views=True, min_scale=0.08, indices=None, num_workers=None, batches_ahead=3):
    """Pretraining batches from a .beton: per view RandomResizedCrop(size, scale=(min_scale, 1)) and a
    flip in FFCV, both views cut from one decode of each image; yields ((v1, v2), y) (or (v, y) without
    two_views), v uint8 (B, 3, size, size), y int64 (B,), on `device`. Build once, then
    loader.set_epoch(epoch, start) before each epoch. The order is EpochSampler(n, batch_size, epoch,
    start, seed, rank, world)'s (n = len(indices) if given, rows of the file to draw from, else the
    file's size): a function of (seed, epoch), whole global batches, start skips the epoch's first
    batches by dropping their rows. NOTE: unlike SeededViews, crops and flips come from numba's
    per-thread RNG, not from (seed, epoch). NOTE: FFCV resizes crops with INTER_AREA, the reference with
    bicubic."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import ToDevice, ToTensor

    rows = np.arange(len(beton_labels(path))) if indices is None else np.asarray(indices, dtype=np.int64)

    def epoch_order(epoch, start):
        return rows[EpochSampler(len(rows), batch_size, epoch, start, seed, rank, world).indices().numpy()]

    if two_views:  # (B, 2, size, size, 3) on the device; FFCVLoader splits the views
        to_device = ToDevice(torch.device(device), non_blocking=True)
        pipes = {"image": [_pair_decoder(size, min_scale), ToTensor(), to_device]}
    else:
        crop = RandomResizedCropRGBImageDecoder((size, size), scale=(min_scale, 1.0))
        pipes = {"image": [crop, *_to_device_image(device, flip=True)]}
    return FFCVLoader(path, batch_size, pipes, "views" if two_views else "view", device, epoch_order, epoch,
                      start, num_workers, drop_last=True, batches_ahead=batches_ahead)


def build_ffcv_eval_loader(path, batch_size, size, rank=0, world=1, device="cpu", crop_ratio=None,
                           num_workers=None, batches_ahead=3, indices=None):
    """One center crop in file order, for features (kNN, linear): yields (x, y, idx), x uint8
    (B, 3, size, size), idx the rows. Rank r reads the r-th of `world` equal contiguous shares, the
    last padded with the first rows (as DistributedSampler): every rank runs the same batches; dedupe
    by idx after gathering. crop_ratio: crop side / shorter side, resized to size; None: 1.0 at size
    <= 64 (CIFAR: the whole image, as eval_transform) else 224/256 (Resize + CenterCrop).
    indices: only these rows (e.g. a labeled subset), in the given order."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder

    rows = np.arange(len(beton_labels(path))) if indices is None else np.asarray(indices, dtype=np.int64)
    n = len(rows)
    per = -(-n // world)  # ceil
    order = rows[np.arange(per * world)[rank * per:(rank + 1) * per] % n]
    ratio = crop_ratio or (1.0 if size <= 64 else 224 / 256)
    pipes = {"image": [CenterCropRGBImageDecoder((size, size), ratio), *_to_device_image(device, flip=False)]}
    return FFCVLoader(path, batch_size, pipes, "eval", device, lambda epoch, start: order[start * batch_size:],
                      num_workers=num_workers, drop_last=False, batches_ahead=batches_ahead)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write FFCV .beton files (OUT/<split>.beton) from any data_path")
    parser.add_argument("--data_path", required=True, help="image folder, CIFAR folder or hf:PATH_OR_NAME")
    parser.add_argument("--out", required=True, help="folder for the .beton files (created)")
    parser.add_argument("--splits", default="train,test", help="comma-separated; test falls back to val")
    parser.add_argument("--max_resolution", type=int, default=None,
                        help="cap on the longer side, required without --raw: 256-384 for ImageNet at 224 px")
    parser.add_argument("--jpeg_quality", type=int, default=90)
    parser.add_argument("--raw", action="store_true", help="store pixels, not JPEG (small images such as CIFAR)")
    parser.add_argument("--num_workers", type=int, default=None, help="writer processes (default min(8, cores))")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    parser.add_argument("--image_key", default=None, help="HuggingFace image column (default img/image)")
    parser.add_argument("--label_key", default=None, help="HuggingFace label column (default label/fine_label/labels)")
    parser.add_argument("--bad_images", choices=("fail", "skip"), default="fail",
                        help="an image that does not decode: fail (error naming it) or skip (warn, write the next)")
    args = parser.parse_args()
    data.BAD_IMAGES = args.bad_images  # the module default, read by the datasets write_beton builds
    try:
        paths = write_beton(args.data_path, args.out, args.splits.split(","), args.max_resolution, args.jpeg_quality,
                            args.raw, args.num_workers, args.overwrite, args.image_key, args.label_key)
    except (OSError, KeyError, ValueError, BadImageError) as e:  # missing data, an existing output, a foreign
        # folder, JPEG without --max_resolution, a bad image
        raise SystemExit(f"error: {e}")
    print("wrote " + ", ".join(map(str, paths.values())))
