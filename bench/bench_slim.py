"""P1: forward+backward time of a slimmable network at width w against its exported plain network.

Both run side by side in one process, interleaved (slim, plain, slim, plain, ...) so machine noise
hits both alike; the ratio slim/plain is what to read (target <= 1.10, docs/design.md, Performance targets).

    python bench/bench_slim.py                      # CPU, fp32: ResNet-18 CIFAR b64 and ResNet-50 224px b8
    python bench/bench_slim.py --precision bf16 --channels_last
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models import ARCHS, calibrate_bn, export, set_active  # noqa: E402


def step_time(model, x, autocast):
    t0 = time.perf_counter()
    model.zero_grad(set_to_none=True)  # as a training step does
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = model(x)
    out.float().square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(arch, size, batch, widths, repeats, device, autocast, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = ARCHS[arch]().to(device, memory_format=fmt)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
    rows = []
    for w in widths:
        calibrate_bn(model, [x], width=w)
        plain = export(model, width=w).to(device, memory_format=fmt).train()
        set_active(model, w)
        model.train()
        ts, tp = [], []
        for i in range(repeats + 2):  # the first two rounds warm up
            a, b = step_time(model, x, autocast), step_time(plain, x, autocast)
            if i >= 2:
                ts.append(a)
                tp.append(b)
        s, p = statistics.median(ts), statistics.median(tp)
        rows.append((arch, size, batch, w, s, p, s / p))
        print(f"{arch:>16} {size:>4}px b{batch:<3} w={w:<5} slim {s * 1e3:8.1f} ms  plain {p * 1e3:8.1f} ms  "
              f"ratio {s / p:5.3f}", flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--channels_last", action="store_true")
    args = ap.parse_args()
    print(f"P1 on {args.device}, {torch.get_num_threads()} threads, precision={args.precision}, "
          f"channels_last={args.channels_last}; median of {args.repeats} interleaved steps")
    rows = []
    for arch, size, batch in [("resnet18_cifar", 32, 64), ("resnet50", 224, 8)]:
        rows += bench(arch, size, batch, [1.0, 0.5, 0.25], args.repeats, torch.device(args.device),
                      args.precision == "bf16", args.channels_last)
    worst = max(r[-1] for r in rows)
    print(f"worst ratio {worst:.3f} (target <= 1.10): {'OK' if worst <= 1.10 else 'ABOVE TARGET'}")
