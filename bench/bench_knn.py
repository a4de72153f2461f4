"""Cost of the kNN evaluation per width on CPU: BN calibration, feature extraction, search (issue 4).

Four widths (1.0, 0.75, 0.5, 0.25) of resnet18_cifar (seeded random init, or --ckpt) run through
eval_knn's own functions, as eval_knn.py runs them: the fixed calibration set
(fixed_calibration_batches, 2000 training images), then knn_eval per width (calibrate_bn;
extract_features of the bank, the 50k CIFAR-10 training images, and of the 10k test images; the
chunked matmul + topk search). Prints each part's seconds per width and the fraction spent in the
search; target: search < 10% of the total (the network, not the search, should be the cost).
Two untimed forwards per width warm the kernels up first; loading the data is timed apart.

With --bank / --test subsets (the small mode) the search fraction says little about the full
sizes (the search grows as bank x test, the extraction as bank + test), so the small mode also
times the search alone at the full sizes on random unit features of each width's dimension (a
matmul and a topk: their cost barely depends on the values) and projects the full run, with the
extraction at the measured img/s.

    python bench/bench_knn.py                                       # full: 50k bank x 10k test, 4 widths
    python bench/bench_knn.py --bank 2000 --test 500                # small mode
    python bench/bench_knn.py --ckpt out/cifar10_quick/backbone.pt --no_cache --precision no
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import eval_knn  # noqa: E402
import knn  # noqa: E402
from data import build_dataset  # noqa: E402
from knn import build_knn_loaders, fixed_calibration_batches, knn_accuracy, knn_eval  # noqa: E402
from models import set_active  # noqa: E402


@torch.no_grad()
def warm_up(model, width, x, autocast):
    """Two untimed forwards of a calibration batch at width, as extract_features runs them (oneDNN
    builds kernels for new shapes on first use); train mode (batch statistics) needs no calibration
    and leaves the BN buffers as they are. Returns the feature size at width."""
    was_training = model.training
    set_active(model, width)
    model.train()
    x = x.contiguous(memory_format=torch.channels_last)
    with knn._autocast(x.device, autocast):
        dims = [model(x).shape[1] for _ in range(2)]
    set_active(model, 1.0)
    model.train(was_training)
    return dims[0]


def full_search_seconds(dim, n_bank, n_test, num_classes, k, temperature, device):
    """Seconds of the search alone at the full sizes, on random unit features of dimension dim."""
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n_bank, dim, generator=g), dim=1).to(device)
    test = F.normalize(torch.randn(n_test, dim, generator=g), dim=1).to(device)
    bank_y = torch.randint(0, num_classes, (n_bank,), generator=g).to(device)
    test_y = torch.randint(0, num_classes, (n_test,), generator=g).to(device)
    t0 = time.perf_counter()
    knn_accuracy(bank, bank_y, test, test_y, num_classes, ks=[k], temperature=temperature)  # syncs (.tolist)
    return time.perf_counter() - t0


def print_row(w, t, top1="", img_s=""):
    total = sum(t.values())
    print(f"{w:>6g} {top1:>7} {t['calibrate']:>10.2f} {t['extract']:>8.2f} {img_s:>6} {t['search']:>7.2f} "
          f"{total:>7.2f} {100 * t['search'] / total:>7.1f}%", flush=True)


def summary(label, rows):
    """The target line: the search's share of all widths' time (and the worst width's share)."""
    parts = {key: sum(t[key] for t in rows.values()) for key in ("calibrate", "extract", "search")}
    frac = parts["search"] / sum(parts.values())
    worst = max(rows, key=lambda w: rows[w]["search"] / sum(rows[w].values()))
    print(f"{label}: " + ", ".join(f"{key} {v:.1f} s" for key, v in parts.items())
          + f"; search {100 * frac:.1f}% of {sum(parts.values()):.1f} s (target < 10%): "
          + ("OK" if frac < 0.10 else "ABOVE TARGET")
          + f"; largest share at one width: {100 * rows[worst]['search'] / sum(rows[worst].values()):.1f}% ({worst:g}x)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_path", default="data/cifar10")
    ap.add_argument("--ckpt", default="", help="a backbone.pt; default: random init of --arch")
    ap.add_argument("--arch", default="resnet18_cifar")
    ap.add_argument("--widths", default="1.0,0.75,0.5,0.25")
    ap.add_argument("--bank", type=int, default=0, help="class-balanced bank subset, 0 = all 50k")
    ap.add_argument("--test", type=int, default=0, help="class-balanced test subset, 0 = all 10k")
    ap.add_argument("--calib_images", type=int, default=2000)
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "no"], help="autocast of the network")
    ap.add_argument("--no_cache", action="store_true", help="decode JPEGs during extraction (eval_knn.py's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, widths = torch.device(args.device), [float(w) for w in args.widths.split(",")]
    autocast = args.precision == "bf16"

    cfg = eval_knn.Config(ckpt=args.ckpt, arch="" if args.ckpt else args.arch, data_path=args.data_path)
    model, _ = eval_knn.load_network(cfg)  # seeded random init without --ckpt
    model = model.to(device)
    t0 = time.perf_counter()
    bank_loader, test_loader = build_knn_loaders(args.data_path, "cifar10", args.batch_size, args.bank, args.test,
                                                 cache=not args.no_cache)
    calib = fixed_calibration_batches(args.data_path, "cifar10", args.bank, args.calib_images, args.batch_size)
    n_bank, n_test = len(bank_loader.dataset), len(test_loader.dataset)
    print(f"kNN k={args.k} of {args.arch if not args.ckpt else args.ckpt} ({'random init' if not args.ckpt else 'ckpt'}),"
          f" bank {n_bank} x test {n_test}, {len(calib)} calibration batches, batch {args.batch_size}, "
          f"precision {args.precision}, cache {not args.no_cache}, {device}, {torch.get_num_threads()} threads; "
          f"data loading {time.perf_counter() - t0:.1f} s (not counted below)")
    print(f"{'width':>6} {'top-1':>7} {'calibrate':>10} {'extract':>8} {'img/s':>6} {'search':>7} {'total':>7} "
          f"{'search %':>8}")
    rows, dims = {}, {}
    for w in widths:
        dims[w] = warm_up(model, w, calib[0].to(device), autocast)
        t = rows[w] = {}
        top1 = knn_eval(model, bank_loader, test_loader, calib, [w], device, k=args.k,
                        temperature=args.temperature, autocast=autocast, timings=t)[w]
        print_row(w, t, f"{100 * top1:>6.2f}%", f"{(n_bank + n_test) / t['extract']:>6.0f}")
    summary("all widths", rows)

    train = build_dataset(args.data_path, "train")
    full_bank, full_test = len(train), len(build_dataset(args.data_path, "test"))
    if (n_bank, n_test) == (full_bank, full_test):
        return
    print(f"projected to the full {full_bank} x {full_test}: extraction at the measured img/s, calibration as "
          f"measured, search timed alone on random unit features")
    proj = {}
    for w, t in rows.items():
        proj[w] = {"calibrate": t["calibrate"], "extract": t["extract"] * (full_bank + full_test) / (n_bank + n_test),
                   "search": full_search_seconds(dims[w], full_bank, full_test, train.num_classes, args.k,
                                                 args.temperature, device)}
        print_row(w, proj[w])
    summary("projected, all widths", proj)

if __name__ == "__main__":
    main()
