"""P4 (docs/design.md, Performance targets): two-view BYOL augmentation throughput of the batched on-device path
(augment.DeviceLoader + TwoViewAugment) over the torchvision per-sample DataLoader (data.SeededViews
+ data.pretrain_transform + data.EpochSampler, as train_us3l.py builds it; workers kept alive here,
so its rate is the steady state, and the worker start that train_us3l.py pays every epoch is
printed apart); target >= 3x. Both are also set against the training step they feed (ResNet-18,
bf16 + channels_last, forward + backward of the two views), side by side in one run, epochs
interleaved so that machine noise hits all alike. On CUDA the DataLoader's batches are copied to
the device (pinned, non_blocking), as the trainer does.

32 px: CIFAR-10 images (data/cifar10). 224 px: the same images upscaled to 224 px JPEGs in a temp
folder (ImageNet recipe, blur on). The batched path decodes every image once up front (reported,
not in its rate: it keeps uint8 images in device memory); the DataLoader decodes per sample.
Rates are images (= two-view pairs) per second.

    python bench/bench_data.py                    # 5000 images at 32 px, 1000 at 224 px, CPU or GPU
    python bench/bench_data.py --images 512       # quick: 512 at 32 px, 102 at 224 px
    python bench/bench_data.py --threads 1        # a CPU shared with other jobs (see NOTE)
    python bench/bench_data.py --images 0         # only FFCV's two views: decode once against twice
    python bench/bench_data.py --copies_only      # only the copy line (below)

FFCV pairs (--ffcv_images, needs ffcv): CIFAR images upscaled to 256 px JPEGs, written to a .beton
(max_resolution 256, as an ImageNet one), read as two 224 px views per image by
ffcv_data.build_ffcv_loader (one decode, two crops and flips) and by two FFCV pipelines on the image
field (the loader before: two decodes), epochs interleaved; prints the rates and their ratio.

The copy line (printed first): a two-view batch copied to the device (224 px, batch 64, fp32): the old path,
torch.cat([x1, x2]).to(device) (a new pageable host tensor per batch), against augment.to_device's
(each view on its own, pinned on CUDA as TorchLoader pins, non_blocking, then the trainer's cat on the
device), per batch, side by side. On a CPU no copy exists: it measures the host-side cost of where
the concatenation happens.

NOTE (2-core CPU, AVX512-BF16, shared with other jobs): multi-threaded torch ops wait for
descheduled threads at every op (batched 32 px: 0.9k img/s with 2 threads, 4.6k with 1), so take
figures on an idle machine or with --threads 1; the DataLoader workers run 1 thread each. glibc
hands freed MiB-size blocks back to the OS and page-faults them in again on every op: with
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 in the environment (or jemalloc)
the batched path ran 1.7x faster at 32 px (batch 256) and 1.5x at 224 px, 1 thread.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
from augment import DeviceLoader, TwoViewAugment, decode_dataset  # noqa: E402
from models import ARCHS  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_epoch(loader, epoch, device):
    """One epoch of the torch path with persistent workers (started in the warm-up epoch).
    Returns (img/s, seconds to the first batch)."""
    loader.sampler.epoch = epoch
    t0, n, t_first = time.perf_counter(), 0, None
    for (x1, x2), _ in loader:
        t_first = t_first or time.perf_counter()
        if device.type == "cuda":
            x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        n += x1.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0), t_first - t0


def device_epoch(loader, epoch, device):
    loader.set_epoch(epoch)
    sync(device)
    t0, n = time.perf_counter(), 0
    for (x1, x2), _ in loader:
        n += x1.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def step_rate(arch, size, batch_size, device, repeats):
    """img/s of a bf16 + channels_last forward + backward of both views (2 x batch_size) of arch."""
    torch.manual_seed(0)
    model = ARCHS[arch]().to(device, memory_format=torch.channels_last)
    x = torch.randn(2 * batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    times = []
    for r in range(repeats + 1):  # round 0 warms up
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        if r:
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def compare(name, root, subset, recipe, size, args, device, arch):
    """The three rates for one image folder (subset > 0: a class-balanced subset) and one recipe, printed
    and returned: {"torchvision_img_per_s", "batched_img_per_s", "step_img_per_s", "p4"}."""
    ds = data.build_dataset(root, "train", subset=subset)  # PIL images
    t0 = time.perf_counter()
    images, labels = decode_dataset(ds)
    decode_s = time.perf_counter() - t0
    batch = args.batch_size if size == 32 else args.batch_size_224
    aug = TwoViewAugment(recipe, size).to(device)
    fast = DeviceLoader((images, labels), batch, device, aug, seed=0)
    views = data.SeededViews(data.build_dataset(root, "train", data.pretrain_transform(recipe, size), subset=subset))
    ref = torch.utils.data.DataLoader(views, batch, sampler=data.EpochSampler(len(ds), batch, 0), drop_last=True,
                                      num_workers=args.workers, persistent_workers=args.workers > 0,
                                      pin_memory=device.type == "cuda")
    _, start = torch_epoch(ref, 0, device)  # warm-up: workers start (train_us3l.py starts them every epoch)
    device_epoch(fast, 0, device)  # warm-up: allocator, CUDA kernels
    rates = {"torchvision": [], "batched": []}
    for r in range(1, args.repeats + 1):  # interleaved
        rates["torchvision"].append(torch_epoch(ref, r, device)[0])
        rates["batched"].append(device_epoch(fast, r, device))
    tv, bt = statistics.median(rates["torchvision"]), statistics.median(rates["batched"])
    step_batch = args.step_batch if size == 32 else args.step_batch_224
    step = step_rate(arch, size, step_batch, device, args.step_repeats)
    print(f"\n{name}: {len(ds)} images, batch {batch}, {size} px, recipe {recipe}")
    print(f"  torchvision DataLoader ({args.workers} workers) {tv:9.0f} img/s   (worker start + first batch: "
          f"{start:.2f} s, paid every epoch by train_us3l.py)")
    print(f"  batched on-device (augment.py)    {bt:9.0f} img/s   (decode once up front: {decode_s:.1f} s, "
          f"{len(ds) / decode_s:.0f} img/s, not in the rate)")
    print(f"  {arch} step (bf16, channels_last) {step:9.0f} img/s   (forward + backward of both views)")
    print(f"  P4 = {bt / tv:.2f}x (target >= 3); augmentation / step: torchvision {tv / step:.2f}x, "
          f"batched {bt / step:.2f}x (>= 1: the step, not the data, is the bottleneck)")
    return {"torchvision_img_per_s": tv, "batched_img_per_s": bt, "step_img_per_s": step, "p4": bt / tv}


def copies(device, batch=64, size=224, repeats=20):
    """ms per two-view batch of the old copy path and of augment.to_device's, and their ratio (printed)."""
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]  # as the DataLoader hands them
    pinned = [v.pin_memory() for v in views] if device.type == "cuda" else views  # pinned by its pin thread
    paths = {"old": lambda: torch.cat(views).to(device),
             "new": lambda: torch.cat([v.to(device, non_blocking=True) for v in pinned])}
    times = {k: [] for k in paths}
    for r in range(repeats + 1):  # round 0 warms up; interleaved
        for name, fn in paths.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
    old, new = (1e3 * statistics.median(times[k]) for k in paths)
    print(f"copy of a two-view batch ({batch} x 2 x 3 x {size} x {size} fp32) to {device}: old (cat on the host, "
          f"pageable) {old:.1f} ms, new (per view{', pinned, non_blocking' if device.type == 'cuda' else ''}, cat on "
          f"the device) {new:.1f} ms; new / old = {new / old:.2f}")
    if device.type != "cuda":
        print("  (CPU: no host-to-device copy exists and both paths are one concatenation in host memory: the "
              "ratio only says that the per-view path adds no host-side cost; on CUDA it measures the real copy)")
    return {"old_ms": old, "new_ms": new, "ratio": new / old}


def upscaled_folder(src, n, size, out):
    """n CIFAR images of src as size-px JPEGs in out/train/<class>/ (bicubic, quality 90)."""
    for k in range(n):
        img, y = src[k]
        folder = os.path.join(out, "train", src.classes[y])
        os.makedirs(folder, exist_ok=True)
        img.resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{k:05d}.jpg"), quality=90)
    return out


def ffcv_pairs(src, n, args, device):
    """img/s of decode-once (build_ffcv_loader) and decode-twice two-view FFCV loaders over n upscaled
    JPEGs, and their ratio."""
    import ffcv_data
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.pipeline import PipelineSpec

    with tempfile.TemporaryDirectory() as tmp:
        upscaled_folder(src, n, 256, tmp)
        beton = ffcv_data.write_beton(tmp, os.path.join(tmp, "ffcv"), ("train",), max_resolution=256,
                                      num_workers=args.workers or 1)["train"]
        batch, workers = args.batch_size_224, args.ffcv_workers or os.cpu_count()
        once = ffcv_data.build_ffcv_loader(beton, batch, 224, device=device, num_workers=workers)
        crop = [RandomResizedCropRGBImageDecoder((224, 224), scale=(0.08, 1.0)) for _ in range(2)]
        pipes = {"image": [crop[0], *ffcv_data._to_device_image(device, flip=True)],
                 "image2": PipelineSpec("image", decoder=crop[1], transforms=ffcv_data._to_device_image(device, True))}
        twice = ffcv_data.FFCVLoader(beton, batch, pipes, "view", device, once.epoch_order, num_workers=workers)
        rates = {"once": [], "twice": []}
        for r in range(args.repeats + 1):  # interleaved; epoch 0 warms up (numba compiles on first use)
            for name, loader in (("once", once), ("twice", twice)):
                loader.set_epoch(r)
                t0, count = time.perf_counter(), 0
                for batch_out in loader:
                    count += len(batch_out[1])
                sync(device)
                if r:
                    rates[name].append(count / (time.perf_counter() - t0))
    once_s, twice_s = statistics.median(rates["once"]), statistics.median(rates["twice"])
    print(f"\nFFCV two views at 224 px: {n} CIFAR images as 256 px JPEGs, batch {batch}, {workers} FFCV threads")
    print(f"  decode twice (two pipelines)      {twice_s:9.0f} img/s")
    print(f"  decode once (build_ffcv_loader)   {once_s:9.0f} img/s   = {once_s / twice_s:.2f}x")
    return {"decode_once_img_per_s": once_s, "decode_twice_img_per_s": twice_s, "ratio": once_s / twice_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="data/cifar10")
    ap.add_argument("--images", type=int, default=5000, help="32 px images (class-balanced subset)")
    ap.add_argument("--images_224", type=int, default=-1, help="224 px JPEGs from CIFAR; -1: images / 5; 0: skip")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--batch_size_224", type=int, default=32,
                    help="CPU: larger 224 px batches make > 32 MiB tensors, which glibc maps afresh each time")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved epochs per path (median)")
    ap.add_argument("--step_batch", type=int, default=128)
    ap.add_argument("--step_batch_224", type=int, default=16)
    ap.add_argument("--step_repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="> 0: torch threads of the main process")
    ap.add_argument("--ffcv_images", type=int, default=512, help="FFCV pairs: upscaled JPEGs in the .beton; 0: skip")
    ap.add_argument("--ffcv_workers", type=int, default=0, help="FFCV threads; 0: one per CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--copies_only", action="store_true", help="only the copy line (224 px, batch 64)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.images_224 < 0:
        args.images_224 = args.images // 5
    device = torch.device(args.device)
    copies(device)
    if args.copies_only:
        return
    print(f"\nP4 on {device}, {torch.get_num_threads()} threads in the main process, {os.cpu_count()} CPUs")

    if args.images:
        compare("CIFAR-10", args.data_path, args.images, "cifar10", 32, args, device, "resnet18_cifar")
    if args.images_224:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            src = data.build_dataset(args.data_path, "train", subset=args.images_224)
            upscaled_folder(src, args.images_224, 224, tmp)
            print(f"\n(wrote {args.images_224} 224 px JPEGs in {time.perf_counter() - t0:.1f} s)")
            compare("CIFAR-10 upscaled to 224 px JPEGs", tmp, 0, "imagenet", 224, args, device, "resnet18")
    if args.ffcv_images:
        ffcv_pairs(data.build_dataset(args.data_path, "train", subset=args.ffcv_images), args.ffcv_images, args, device)


if __name__ == "__main__":
    main()
