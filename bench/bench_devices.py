"""What each process of a multi-GPU run does on its device: two checks for bench/gpu_check.py (parts sync_bn
and ffcv_contexts), or alone.

sync_bn        forward + backward of synchronized BN (slim.py) at ResNet-50's BN shapes (224 px, batch 64 per
               GPU; 256 x 56^2, 512 x 28^2, 1024 x 14^2, 2048 x 7^2) and a 4096-wide head BatchNorm1d (batch
               128), bf16 inputs in channels_last, one process per GPU (NCCL), with torch's fused kernels
               (slim's default on CUDA) and with the reference Function (SLIM_SYNC_BN=python), interleaved, and
               per-process BN (no sync: cudnn) as the floor; median ms of the five layers per mode. One GPU: a
               process group of one with the sync path forced (its collectives are copies, so the difference is
               the kernels' passes over the batch). CPU: gloo, the Function and the floor only (no CPU kernels).
ffcv_contexts  (2+ GPUs) a fresh process on cuda:1 reads a small .beton twice with ffcv_data's loader, then
               with ffcv's own Loader, and asks nvidia-smi after each which GPUs hold a context of that process
               and how much memory GPU 0 uses. ffcv 1.0.2's epoch thread starts on GPU 0: as is, every rank
               but rank 0 opens a context there (some 500 MB each); ffcv_data's loader sets the thread's device.
               One GPU cannot show it (rank 0's device is GPU 0): {"checked": false} and why.

    python bench/bench_devices.py                 # both, on the GPUs at hand (sync_bn: one process per GPU)
    python bench/bench_devices.py --smoke         # toy sizes (the CPU test of this script)
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import slim  # noqa: E402
from slim import BatchNorm1d, SlimBatchNorm2d  # noqa: E402

SIZES = {  # (channels, spatial side; 0: a head BatchNorm1d on 2 x batch rows), batch per process, repeats
    "gpu": dict(shapes=[(256, 56), (512, 28), (1024, 14), (2048, 7), (4096, 0)], batch=64, warmup=3, repeats=10),
    "smoke": dict(shapes=[(16, 8), (32, 4), (64, 0)], batch=2, warmup=1, repeats=1),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_rank(rank, world, port, size, out):
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120),
                            **({"device_id": device} if cuda else {}))  # barriers on this GPU, not GPU 0
    try:
        if world == 1:  # one GPU: the sync path on a group of one
            slim._sync_active = lambda: True
        torch.manual_seed(rank)
        layers, tensors = [], []
        for c, side in size["shapes"]:
            layers.append((SlimBatchNorm2d(c) if side else BatchNorm1d(c)).to(device))
            x = torch.randn((size["batch"], c, side, side) if side else (2 * size["batch"], c), device=device)
            x = x.to(torch.bfloat16, memory_format=torch.channels_last if side else torch.contiguous_format)
            tensors.append((x.requires_grad_(), torch.randn_like(x)))  # (x, dy)

        def step(mode):  # the five layers' forward + backward
            slim.SYNC_BN_KERNELS = "python" if mode == "python" else "fused"
            for bn, (x, dy) in zip(layers, tensors):
                bn.sync = mode != "local"
                bn(x).backward(dy)

        modes = ["fused", "python", "local"] if cuda else ["python", "local"]
        times = {m: [] for m in modes}
        for r in range(size["warmup"] + size["repeats"]):
            for m in modes:  # interleaved: noise hits every mode alike
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(m)
                if cuda:
                    torch.cuda.synchronize(device)
                if r >= size["warmup"]:
                    times[m].append(time.perf_counter() - t0)
        if rank == 0:
            ms = {f"{m}_ms": 1e3 * statistics.median(t) for m, t in times.items()}
            res = {"world": world, "backend": dist.get_backend(), "batch": size["batch"], "dtype": "bf16",
                   "shapes": size["shapes"], **ms, "fused_ms": ms.get("fused_ms"),
                   "python_over_fused": ms["python_ms"] / ms["fused_ms"] if "fused_ms" in ms else None}
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        dist.destroy_process_group()


def sync_bn(smoke=False):
    """The sync_bn check: one spawned process per GPU (1 on a CPU). -> {"fused_ms", "python_ms", "local_ms",
    "python_over_fused", "world", ...}."""
    world = min(torch.cuda.device_count(), 8) if torch.cuda.is_available() else 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sync_bn.json")
        mp.start_processes(_sync_bn_rank, args=(world, free_port(), SIZES["smoke" if smoke else "gpu"], out),
                           nprocs=world, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def parse_smi(gpus_csv, apps_csv, pid):
    """nvidia-smi's `--query-gpu=index,pci.bus_id,memory.used` and `--query-compute-apps=pid,gpu_bus_id`
    (csv, noheader, nounits) -> {"pid_on": GPU indices holding a context of pid, "used_mib": per GPU}."""
    gpus = {}
    for line in gpus_csv.strip().splitlines():
        index, bus, used = (v.strip() for v in line.split(","))
        gpus[bus.lower()] = (int(index), float(used))
    pid_on = set()
    for line in apps_csv.strip().splitlines():  # none: empty, or a line such as "No running processes found"
        p, bus = ([v.strip() for v in line.split(",")] + [""])[:2]
        if p.isdigit() and int(p) == pid and bus.lower() in gpus:
            pid_on.add(gpus[bus.lower()][0])
    return {"pid_on": sorted(pid_on), "used_mib": [used for _, used in sorted(gpus.values())]}


def _gpu_use(pid):
    def smi(query):
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=30, check=True).stdout
    return parse_smi(smi("--query-gpu=index,pci.bus_id,memory.used"), smi("--query-compute-apps=pid,gpu_bus_id"),
                     pid)


def _ffcv_probe(folder, out):
    """In a fresh process: work on cuda:1 only, read a .beton with ffcv_data's loader, then with ffcv's Loader."""
    import ffcv_data
    from ffcv.loader import Loader

    beton = ffcv_data.write_beton(folder, os.path.join(folder, "ffcv"), splits=("train",), raw=True, num_workers=1)
    torch.cuda.set_device(1)  # the writer's processes forked before CUDA is up
    torch.zeros(1, device="cuda")  # the one context this process should have: on GPU 1
    res = {"pid": os.getpid(), "before": _gpu_use(os.getpid())}
    for name in ("ffcv_data", "ffcv_as_is"):
        if name == "ffcv_as_is":  # ffcv's own Loader: its epoch thread left on GPU 0
            ffcv_data._device_loader = lambda: lambda *a, device, **k: Loader(*a, **k)
        loader = ffcv_data.build_ffcv_eval_loader(beton["train"], 16, 32, device="cuda:1", num_workers=2)
        for _ in range(2):
            for _batch in loader:
                pass
        torch.cuda.synchronize()
        loader.close()
        res[name] = _gpu_use(os.getpid())
    with open(out, "w") as f:
        json.dump(res, f)


def ffcv_contexts():
    """The ffcv_contexts check. -> {"checked", "stray_context" (ffcv_data's loader / ffcv's own: does the
    process on cuda:1 hold a context on GPU 0), "gpu0_mib_added", the raw readings} or {"checked": False, "why"}."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        return {"checked": False, "gpus": gpus, "why": "needs 2+ GPUs: with one, every rank is on GPU 0, so a "
                "stray context there cannot show"}
    with tempfile.TemporaryDirectory() as tmp:
        g = np.random.default_rng(0)
        for k in range(64):  # a small image folder: 2 classes of 32 px images
            os.makedirs(os.path.join(tmp, "train", f"c{k % 2}"), exist_ok=True)
            Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                os.path.join(tmp, "train", f"c{k % 2}", f"{k:03d}.png"))
        out = os.path.join(tmp, "probe.json")
        p = mp.get_context("spawn").Process(target=_ffcv_probe, args=(tmp, out))
        p.start()
        p.join(300)
        if p.exitcode != 0:
            raise RuntimeError(f"the FFCV probe process failed (exit code {p.exitcode}): see its output above")
        with open(out) as f:
            res = json.load(f)
    visible = 1 in res["ffcv_data"]["pid_on"]  # nvidia-smi lists this process at all (PID namespaces may hide it)
    used0 = [res[k]["used_mib"][0] for k in ("before", "ffcv_data", "ffcv_as_is")]
    return {"checked": visible, "gpus": gpus,
            "stray_context": {k: (0 in res[k]["pid_on"]) if visible else None for k in ("ffcv_data", "ffcv_as_is")},
            "gpu0_mib_added": {"ffcv_data": used0[1] - used0[0], "ffcv_as_is": used0[2] - used0[1]}, "raw": res,
            **({} if visible else {"why": "nvidia-smi does not list this process (PID namespace): see gpu0_mib_added"})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes (the CPU test of this script)")
    args = ap.parse_args()
    print(json.dumps({"sync_bn": sync_bn(args.smoke), "ffcv_contexts": ffcv_contexts()}, indent=1))


if __name__ == "__main__":
    main()
