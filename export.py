"""Take a sub-network out of a slimmable checkpoint: plain weights, TorchScript, ONNX or torchvision
weights, its BN recalibrated, each file checked against the slimmed network, its latency measured.

A US3L or DSPNet run keeps every width (and ResNet depth) in one set of weights whose BN running
statistics were never updated (training normalizes with batch statistics), under this repo's layer
names. For each sub-network asked for, this script recalibrates BN exactly on `calib_images` training
images with the evaluations' own code path and turns the slice into a plain network, as
models.load_subnet does (knn.fixed_calibration_batches, then models.subnet: calibrate_bn on the same
images, batches and autocast as eval_knn.py with its defaults, then models.export), writes it in the
formats asked for, loads each file back
and checks its output against the slimmed network in eval mode (max |difference| <= 1e-4, 1e-3 for
ONNX, times the largest output where it exceeds 1), then describes it in OUT.json.

    python export.py --ckpt out/cifar10_quick/backbone.pt --width 0.5 --out exports/r18c_w050
    python export.py --ckpt out/cifar10_quick/backbone.pt --widths 1.0,0.5 --formats pt,torchscript,onnx --latency
    python export.py --ckpt out/cifar10_quick/backbone.pt --budget_ms 6.0 --batch_size 1   # widest that fits
    python export.py --ckpt out/dspnet_cifar10_quick/backbone.pt --dn 2          # or --dn 0.5 (a DN's entry)
    python export.py --ckpt out/dspnet_resnet_dn9_in/backbone.pt --dn 0.6667,2,2,2,2 --formats torchvision  # ResNet-18
    python export.py --arch resnet18_cifar --width 0.37 --formats pt,onnx       # seeded random init (baseline)

Files, OUT = --out for a single network, else <out>_w<name> (default out: exports/<arch>):
    OUT.pt              plain state_dict: torch.load(OUT.pt, weights_only=True). Rebuilding the module needs
                        this repo: models.export(models.ARCHS[arch](), width, depth, check_stats=False)
    OUT.torchscript.pt  traced TorchScript: torch.jit.load(path) runs it with no access to this repo
    OUT.onnx            input "images" (B, 3, H, W) normalized as OUT.json says, output "features" (B, D)
    OUT.torchvision.pt  torchvision key names, no classifier (ImageNet ResNet-18/34/50, MobileNetV2/V3-Large)
    OUT.json            arch, width, depth, input size, normalization, params, MACs, accuracy, latency, files
"""

import contextlib
import copy
import io
import json
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn

from config import ConfigError, run
from eval_knn import eval_data, load_network, net_name, networks_to_eval
from knn import fixed_calibration_batches, maybe_autocast
from models import ARCHS, export, profile, set_active, subnet

FORMATS = ("pt", "torchscript", "onnx", "torchvision")
# max |output difference| allowed, times max(1, max |output|): float32 sums in another order (ONNX Runtime's
# kernels) differ by about 1e-7 of the output's scale per layer, and a random-init ResNet-50's features reach 12
TOLERANCE = {"pt": 1e-4, "torchscript": 1e-4, "onnx": 1e-3, "torchvision": 1e-4}


@dataclass
class Config:
    ckpt: str = ""  # backbone.pt of train_us3l.py / train_dspnet.py; empty = seeded random init of arch
    teacher: bool = False  # export the checkpoint's EMA teacher (DSPNet: target) instead of the online weights
    arch: str = ""  # models.ARCHS key; required without ckpt, checked against it
    width: float | None = None  # one width in (0, 1], not below the ckpt's smallest trained width
    widths: list[float] = field(default_factory=list)  # several widths (the budget's candidates); empty = ckpt's
    depth: list[int] | None = None  # blocks per stage (ResNets) for every width; None = full depth
    dn: list[float] = field(default_factory=list)  # a DSPNet DN: [i] = the ckpt's i-th (largest first), or [w, d1..d4]
    formats: list[str] = field(default_factory=lambda: ["pt"])  # pt | torchscript | onnx | torchvision
    out: str = ""  # output path without extension (see above); empty = exports/<arch>_w<name>
    data_path: str = "data/cifar10"  # the checkpoint's training images (BN calibration needs no labels)
    dataset: str = ""  # cifar10 | cifar100 | imagenet (normalization; 32 or 224 px); empty = the ckpt's, or cifar10
    mean: list[float] = field(default_factory=list)  # per-channel input normalization, RGB in [0, 1], with std;
    # [] = the ckpt's training run's (its mean/std keys), else the dataset's preset (data.MEAN_STD)
    std: list[float] = field(default_factory=list)  # per-channel std, given with mean; [] = as mean
    calib_images: int = 2000  # BN calibration images per sub-network, as the evaluations (US-Nets: about 2000)
    calib_batch_size: int = 128  # the evaluations' batch: train-mode BN depends on it, 128 gives their statistics
    autocast: bool = True  # calibrate under bf16 autocast where supported, as the evaluations do; false: fp32
    num_workers: int = 0  # DataLoader workers for the calibration images
    results: list[str] = field(default_factory=list)  # eval_knn.py / eval_linear.py results.json, labelled by folder
    latency: bool = False  # measure each sub-network's latency: a table, and a plot when results are given
    budget_ms: float = 0.0  # > 0: export only the widest (by MACs) candidate whose median latency fits
    batch_size: int = 1  # images per forward when timing (calibration uses calib_batch_size)
    latency_warmup: int = 10  # untimed forwards first (allocator, oneDNN kernel selection, cudnn autotune)
    latency_repeats: int = 50  # timed forwards; the median is reported
    device: str = ""  # where latency is measured: cpu | cuda; empty = cuda when available. Files are CPU tensors
    onnx_dynamo: bool = True  # torch.export-based ONNX exporter (5-15 s/network here); false: legacy one (~1 s)
    # (the legacy TorchScript-based exporter is deprecated since torch 2.9; its files are checked the same way)
    seed: int = 0  # random-init weights and the calibration draw (the evaluations draw with seed 0)


# ------------------------------------------------------------------------------------------------
# Which sub-networks

def networks(cfg, ckpt, model):
    """[(name, width, depth)] from width | widths | dn (at most one), else the ckpt's widths or DNs."""
    given = [k for k in ("width", "widths", "dn") if getattr(cfg, k) not in (None, [])]
    if len(given) > 1:
        raise ConfigError(f"config error: {' and '.join(given)} given; allowed: one of width, widths, dn")
    if cfg.budget_ms and given and given != ["widths"]:
        raise ConfigError(f"config error: budget_ms chooses among widths (or the ckpt's), not a fixed {given[0]}")
    if cfg.width is not None and not 0.0 < cfg.width <= 1.0:
        raise ConfigError(f"config error: width={cfg.width} must lie in (0, 1]")
    if not cfg.dn:
        return networks_to_eval(replace(cfg, widths=[cfg.width] if cfg.width else cfg.widths), ckpt, model)
    if cfg.depth is not None:
        raise ConfigError("config error: dn sets the depth: drop depth, or give width and depth instead of dn")
    if len(cfg.dn) == 1:  # an index into the checkpoint's DN list (train_dspnet.py's order)
        dns, i = ckpt.get("dns") or [], cfg.dn[0]
        if not dns:
            where = cfg.ckpt or "a random init"
            raise ConfigError(f"config error: dn={i:g}: {where} holds no DN list (train_dspnet.py writes one); "
                              "allowed: dn as [width, d1, d2, d3, d4], or width and depth")
        if i != int(i) or not 0 <= i < len(dns):
            listed = ", ".join(f"{j}: {net_name(d['width'], d['depth'])}" for j, d in enumerate(dns))
            raise ConfigError(f"config error: dn={i:g}: allowed DN indices of {cfg.ckpt}: {listed}")
        width, depth = dns[int(i)]["width"], dns[int(i)]["depth"]
    else:
        width, depth = cfg.dn[0], cfg.dn[1:]
        if any(d != int(d) for d in depth):
            raise ConfigError(f"config error: dn={cfg.dn}: the blocks per stage after the width must be integers")
        depth = [int(d) for d in depth]
    return networks_to_eval(replace(cfg, widths=[width], depth=depth), ckpt, model)


def out_prefix(cfg, arch, name, several):
    return cfg.out if cfg.out and not several else f"{cfg.out or os.path.join('exports', arch)}_w{name}"


def read_results(paths):
    """{label: {network name: {"top1", "top5", ...}}}: eval results.json files labelled by their folder."""
    out = {}
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"config error: results file not found: {path}")
        label = os.path.basename(os.path.dirname(os.path.abspath(path)))
        with open(path) as f:
            out[label if label not in out else path] = json.load(f)
    return out


# ------------------------------------------------------------------------------------------------
# torchvision key names. Our plain ResNet is stem / stages.i.j (.shortcut), torchvision's conv1 / bn1 /
# layer{i+1}.j (.downsample); our MobileNets' blocks are layers.k = (conv, bn[, act]) triples, torchvision's
# V2 ends a block with a bare Conv2d and BatchNorm2d (conv.k, conv.k+1), V3 calls the triples block.k.
# Our MobileNetV3 keeps the 960 -> 1280 Linear (+ hardswish) as part of the backbone (`fc`): in torchvision
# it is classifier.0, so its features come out of classifier.2 once classifier.3 is an Identity.

TORCHVISION = {  # our arch -> torchvision models that its sub-networks can match, shape for shape
    "resnet18": ("resnet18",), "resnet34": ("resnet18", "resnet34"), "resnet50": ("resnet50",),
    "resnet34_w96": ("resnet18", "resnet34"),  # DSPNet's width-2/3 DNs at depth [2,2,2,2] / [3,4,6,3]
    "mobilenetv2": ("mobilenet_v2",), "mobilenetv3_large": ("mobilenet_v3_large",)}
CLASSIFIER = {"resnet18": "fc", "resnet34": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
              "mobilenet_v3_large": "classifier.3"}  # the layer left out (replaced by Identity to load)


def torchvision_keys(state_dict, arch):
    """Our plain network's state_dict under torchvision's names (the same tensors; see above)."""
    if arch.startswith("resnet"):
        rename = [(r"^stem\.0\.0\.", "conv1."), (r"^stem\.0\.1\.", "bn1."), (r"\.shortcut\.", ".downsample.")]
        out = {}
        for k, v in state_dict.items():
            k = re.sub(r"^stages\.(\d+)\.", lambda m: f"layer{int(m[1]) + 1}.", k)
            for pattern, new in rename:
                k = re.sub(pattern, new, k)
            out[k] = v
        return out
    if arch == "mobilenetv3_large":
        return {re.sub(r"^fc\.", "classifier.0.", k.replace(".layers.", ".block.")): v
                for k, v in state_dict.items()}
    last = {}  # mobilenetv2: block index -> index of its projection (conv, bn) pair
    for k in state_dict:
        if m := re.match(r"features\.(\d+)\.layers\.(\d+)\.", k):
            last[m[1]] = max(last.get(m[1], 0), int(m[2]))
    out = {}
    for k, v in state_dict.items():
        if m := re.match(r"features\.(\d+)\.layers\.(\d+)\.(\d+)\.(.+)", k):
            block, layer, i, rest = m[1], int(m[2]), int(m[3]), m[4]
            k = (f"features.{block}.conv.{layer + i}.{rest}" if layer == last[block]
                 else f"features.{block}.conv.{layer}.{i}.{rest}")
        out[k] = v
    return out


def torchvision_model(name, device=None):
    """torchvision.models.<name>() with its last classifier layer an Identity: its output is the backbone
    features. MobileNetV3-Large gets BatchNorm eps 1e-5 (ours and PyTorch's default; torchvision's is 1e-3)."""
    import torchvision

    kw = {"norm_layer": partial(nn.BatchNorm2d, eps=1e-5, momentum=0.01)} if name == "mobilenet_v3_large" else {}
    with torch.device(device or "cpu"):
        m = getattr(torchvision.models, name)(**kw)
    parent, _, attr = CLASSIFIER[name].rpartition(".")
    setattr(m.get_submodule(parent), attr, nn.Identity())
    return m.eval()


def torchvision_match(arch, net):
    """The torchvision model whose state_dict (without classifier) has exactly net's keys and shapes, or None."""
    ours = {k: tuple(v.shape) for k, v in torchvision_keys(net.state_dict(), arch).items()}
    for name in TORCHVISION.get(arch, ()):
        theirs = torchvision_model(name, "meta").state_dict()  # meta: shapes only, no memory, no init cost
        if ours == {k: tuple(v.shape) for k, v in theirs.items()}:
            return name
    return None


# ------------------------------------------------------------------------------------------------
# Writing, checking, timing

def write_formats(net, x, prefix, formats, arch, tv_name, onnx_dynamo):
    """{format: path} of the files written for the plain network `net` (CPU, eval); x: example input."""
    files = {}
    if "pt" in formats:
        files["pt"] = prefix + ".pt"
        torch.save(net.state_dict(), files["pt"])
    if "torchscript" in formats:
        files["torchscript"] = prefix + ".torchscript.pt"
        with warnings.catch_warnings():  # NOTE: torch.jit is deprecated in favour of torch.export, but it is
            warnings.simplefilter("ignore", FutureWarning)  # still the format plain PyTorch runs without our code
            torch.jit.trace(net, x, check_trace=False).save(files["torchscript"])
    if "onnx" in formats:
        files["onnx"] = prefix + ".onnx"
        names = {"input_names": ["images"], "output_names": ["features"], "external_data": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter's, when asked for
            if onnx_dynamo:  # every forward takes `x`: its dim 0 is the batch. NOTE: it prints its
                with contextlib.redirect_stdout(io.StringIO()):  # progress even with verbose=False
                    torch.onnx.export(net, (x,), files["onnx"], dynamo=True, verbose=False,
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)
            else:
                torch.onnx.export(net, (x,), files["onnx"], dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, **names)
    if "torchvision" in formats:
        files["torchvision"] = prefix + ".torchvision.pt"
        torch.save(torchvision_keys(net.state_dict(), arch), files["torchvision"])
    return files


@torch.no_grad()
def check_files(files, arch, width, depth, tv_name, x, ref):
    """{format: max |output - ref|}, each file loaded back as its user would; raises over TOLERANCE."""
    diffs = {}
    for fmt, path in files.items():
        if fmt == "pt":
            net = export(ARCHS[arch](), width, depth, check_stats=False)
            net.load_state_dict(torch.load(path, weights_only=True))
            out = net(x)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                out = torch.jit.load(path).eval()(x)
        elif fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        else:
            net = torchvision_model(tv_name)
            net.load_state_dict(torch.load(path, weights_only=True))  # strict: every key, no other
            out = net(x)
        diffs[fmt] = (out.float() - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        allowed = TOLERANCE[fmt] * max(1.0, ref.abs().max().item())
        if not diffs[fmt] <= allowed:
            raise RuntimeError(f"{path}: output differs from the slimmed network by {diffs[fmt]:.3g} "
                               f"(allowed {allowed:.3g}; shapes {tuple(out.shape)} vs {tuple(ref.shape)})")
    return diffs


@torch.no_grad()
def measure_latency(nets, batch_size, size, device, warmup, repeats):
    """{name: median milliseconds of one forward of batch_size random images} for {name: plain network},
    eval, no_grad, fp32. Interleaved: each repeat times every network once, so a passing load on a shared
    machine slows all of them alike instead of whichever was being timed. NOTE: on this 2-core machine
    another process busy for a few seconds made every op of the timed network ~40x slower (OpenMP
    threads waiting for a taken core), so the median of interleaved repeats is what stays comparable."""
    runs, times = {}, {name: [] for name in nets}
    for name, net in nets.items():
        net, x = copy.deepcopy(net).eval().to(device), torch.randn(batch_size, 3, size, size, device=device)
        if device.type == "cpu":  # NOTE: oneDNN convolutions: 5-25% faster channels_last (ResNet-18 CIFAR here)
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        runs[name] = net, x
    for i in range(warmup + repeats):
        for name, (net, x) in runs.items():
            t0 = time.perf_counter()
            net(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def print_table(rows, results, where):
    labels = list(results)
    print(f"{'network':>16} {'params (M)':>10} {'MMACs':>8} {'ms':>8} "
          + " ".join(f"{lb + ' top-1':>13}" for lb in labels) + f"   (median latency, {where})")
    for name, r in rows.items():
        acc = [results[lb].get(name, {}).get("top1") for lb in labels]
        print(f"{name:>16} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e6:>8.1f} {r.get('ms', float('nan')):>8.2f} "
              + " ".join(f"{100 * a:>12.2f}%" if a is not None else f"{'-':>13}" for a in acc))


def plot_latency(rows, results, path, where):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, res in results.items():
        names = sorted((n for n in rows if n in res), key=lambda n: rows[n]["ms"])
        ax.plot([rows[n]["ms"] for n in names], [100 * res[n]["top1"] for n in names], "o-", label=label)
        for n in names:
            ax.annotate(n, (rows[n]["ms"], 100 * res[n]["top1"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
    ax.set(xlabel=f"median latency (ms), {where}", ylabel="top-1 (%)", title="accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pick_for_budget(rows, budget_ms, where):
    """(name, message): the widest candidate (most MACs) whose median latency fits budget_ms."""
    order = sorted(rows, key=lambda n: (rows[n]["macs"], n))
    fits = [n for n in order if rows[n]["ms"] <= budget_ms]
    if not fits:
        fast = min(rows, key=lambda n: rows[n]["ms"])
        ms = rows[fast]["ms"]
        raise ConfigError(f"config error: budget_ms={budget_ms:g}: no candidate fits ({where}); the fastest, "
                          f"{fast}, takes {ms:.3g} ms; allowed: budget_ms >= {ms:.3g}, or other widths")
    best = fits[-1]
    wider = order[order.index(best) + 1:]
    why = (f"the next wider, {wider[0]}, takes {rows[wider[0]]['ms']:.3g} ms" if wider
           else "it is the widest candidate")
    return best, (f"budget {budget_ms:g} ms ({where}): {best} is the widest that fits, "
                  f"{rows[best]['ms']:.3g} ms; {why}")


# ------------------------------------------------------------------------------------------------

def check_config(cfg):
    bad = [f for f in cfg.formats if f not in FORMATS]
    if bad or not cfg.formats:
        raise ConfigError(f"config error: formats={cfg.formats}: allowed: any of {', '.join(FORMATS)}")
    for key in ("calib_images", "calib_batch_size", "batch_size", "latency_repeats"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config error: {key}={getattr(cfg, key)} must be >= 1")
    if cfg.budget_ms < 0 or cfg.latency_warmup < 0:
        raise ConfigError("config error: budget_ms and latency_warmup must be >= 0")
    if cfg.device not in ("", "cpu", "cuda") or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"config error: device={cfg.device!r}; allowed: cpu, cuda (when available), or empty")


def main(cfg):
    check_config(cfg)
    model, ckpt = load_network(cfg)  # config errors before any data is read
    arch = ckpt["arch"]
    nets = networks(cfg, ckpt, model)
    dataset, (mean, std) = eval_data(cfg, ckpt)  # the keys, else the checkpoint's training run's
    size = 32 if dataset.startswith("cifar") else 224  # the evaluations' image size
    if getattr(model, "img_size", size) != size:
        raise ConfigError(f"config error: {arch} takes {model.img_size} px images, dataset {dataset} gives "
                          f"{size} px; set dataset")
    tv_names = {}
    if "torchvision" in cfg.formats:
        for name, w, d in nets:
            tv_names[name] = torchvision_match(arch, export(model, w, d, check_stats=False))
            if tv_names[name] is None:
                raise ConfigError(f"config error: formats=torchvision: {arch} at {name} has no torchvision "
                                  "counterpart; allowed: resnet18/resnet34/resnet50/mobilenetv2/mobilenetv3_large at "
                                  "width 1.0 and full depth, resnet34 at depth [2,2,2,2], resnet34_w96 at width "
                                  "0.6667 and depth [2,2,2,2] or [3,4,6,3]")
    results = read_results(cfg.results)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = f"batch {cfg.batch_size}, {size} px, " + (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                      else f"cpu, {torch.get_num_threads()} threads")
    rows = {}
    for name, w, d in nets:
        params, macs = profile(model, w, d, input_size=size)
        rows[name] = {"width": w, "depth": d, "params": params, "macs": macs}
    if cfg.latency or cfg.budget_ms:  # BN statistics change no time (measured: within 3%): time before calibrating
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        plain = {name: export(model, w, d, check_stats=False) for name, w, d in nets}
        ms = measure_latency(plain, cfg.batch_size, size, device, cfg.latency_warmup, cfg.latency_repeats)
        for name in ms:
            rows[name]["ms"] = ms[name]
        print_table(rows, results, where)
        if results:
            path = f"{cfg.out or os.path.join('exports', arch)}_latency.png"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            plot_latency(rows, results, path, where)
            print(f"wrote {path}")
    if cfg.budget_ms:
        best, message = pick_for_budget(rows, cfg.budget_ms, where)
        print(message)
        nets = [n for n in nets if n[0] == best]

    calib = fixed_calibration_batches(cfg.data_path, dataset, 0, cfg.calib_images, cfg.calib_batch_size, cfg.seed,
                                      cfg.num_workers, mean_std=(mean, std))
    x = torch.cat(calib)
    x = x[::max(1, len(x) // 8)][:8]  # check input: real images, spread over the (index-sorted) classes; the
    # example input for tracing and ONNX is 2 of them: the files are checked at another batch size too
    source = f"{cfg.ckpt}{' (teacher)' if cfg.teacher else ''}" if cfg.ckpt else f"random init, seed {cfg.seed}"
    print(f"{arch} from {source}: BN calibrated on {cfg.calib_images} {dataset} images of {cfg.data_path}")
    written = []
    for name, w, d in nets:
        with maybe_autocast(device, cfg.autocast):  # statistics of the network as the evaluations run it
            net = subnet(model.to(device), w, d, calib).cpu()  # as models.load_subnet: calibrate_bn + export
        model.cpu().eval()
        set_active(model, w, d)  # the slimmed network, calibrated, in eval mode: what every file must reproduce
        with torch.no_grad():
            ref = model(x).float()
        prefix = out_prefix(cfg, arch, name, len(nets) > 1)
        os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
        files = write_formats(net, x[:2], prefix, cfg.formats, arch, tv_names.get(name), cfg.onnx_dynamo)
        diffs = check_files(files, arch, w, d, tv_names.get(name), x, ref)
        r = rows[name]
        info = {"arch": arch, "width": w, "depth": d, "name": name, "source": source, "dataset": dataset,
                "input": {"shape": [3, size, size], "preprocess": "RGB in [0, 1], then (x - mean) / std" + (
                          "" if size == 32 else "; ImageNet eval: bicubic resize to 256, center crop 224"),
                          "mean": list(mean), "std": list(std)},
                "feature_dim": ref.shape[1], "params": r["params"], "macs": r["macs"],
                "calibration": {"images": cfg.calib_images, "batch_size": cfg.calib_batch_size, "seed": cfg.seed,
                                "autocast_bf16": cfg.autocast, "data_path": cfg.data_path},
                "files": {f: os.path.basename(p) for f, p in files.items()}, "max_abs_diff": diffs,
                "output_absmax": ref.abs().max().item(),
                "rebuild_pt": f"net = models.export(models.ARCHS[{arch!r}](), {w}, {d}, check_stats=False); "
                              "net.load_state_dict(torch.load(PT_FILE, weights_only=True))"}
        if any(name in res for res in results.values()):  # in [0, 1], as the evaluations write it
            info["accuracy"] = {lb: {k: res[name][k] for k in ("top1", "top5") if k in res[name]}
                                for lb, res in results.items() if name in res}
        if "ms" in r:
            info["latency"] = {"ms_median": r["ms"], "where": where, "repeats": cfg.latency_repeats}
        if name in tv_names:
            tv = tv_names[name]
            layer = re.sub(r"\.(\d+)$", r"[\1]", CLASSIFIER[tv])  # classifier.3 -> classifier[3]
            info["torchvision"] = {
                "model": f"torchvision.models.{tv}", "left_out": f"{CLASSIFIER[tv]}.weight, {CLASSIFIER[tv]}.bias "
                "(the classifier: none was trained)",
                "load": f"m = torchvision.models.{tv}(); m.{layer} = torch.nn.Identity(); m.load_state_dict(sd)"}
            if tv == "mobilenet_v3_large":
                info["torchvision"]["note"] = (
                    "build it with norm_layer=partial(nn.BatchNorm2d, eps=1e-5, momentum=0.01) for these exact "
                    "features (torchvision's BN eps is 1e-3); classifier.0 is our fc (960 -> 1280), part of the "
                    "backbone here")
        with open(prefix + ".json", "w") as f:
            json.dump(info, f, indent=1)
        written.append(prefix)
        print(f"{name}: {', '.join(os.path.basename(p) for p in files.values())} + .json; max |diff| "
              + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
              + f"; {r['params'] / 1e6:.2f}M params, {r['macs'] / 1e6:.1f} MMACs at {size} px")
    return {"written": written, "rows": rows}


if __name__ == "__main__":
    run(main, Config)
