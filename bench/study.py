"""The papers' central claims at CPU scale: every run of the study, then docs/results.md and its plots.

    python bench/study.py                          # every run not finished yet (seeds 0-2), then the report
    python bench/study.py --claims C1 --seeds 0    # a part of it; run again later to continue
    python bench/study.py --report                 # only rewrite docs/results.md from docs/results/*.json

Three claims, each a comparison of arms; an arm is one run or several (one per network):
  C1 collapse (US3L Table 1, Table 7 cases 1-2, Table 8): plain SimSiam on a slimmable network,
     SimSiam + inplace distillation, the full US3L method (both strategies)
  C2 one slimmable run against each width pretrained alone (US3L Table 2, DSPNet Fig. 4): the full
     method's run of C1 against `--individual=w` runs of the same recipe and steps, one per width
  C3 DSPNet with depth: a DN list with shallower slices of the network (ResNet-10 depths inside the
     quick recipe's ResNet-18) in one run, against each DN pretrained alone (`--individual=DN`)
Each run is a committed recipe at its quick CPU budget (yaml/us3l_ablations/*, yaml/dspnet_cifar10_quick.yaml),
logging every step (so the cost replays exactly from log.jsonl), then the cached linear probe
(eval_linear.py, 10k class-balanced training images, the whole test split). Run folders go under
--out (out/study, not committed); a finished run (results.json with the end kNN and the probe's
results) is skipped, and a killed one resumes: the same command continues the study in another sitting.
Each run leaves a small record in docs/results/<run>_seed<k>.json (committed): kNN top-1 per network
at init and end, probe top-1, the collapse std at the end, wall times and the training compute.
Timed runs: nothing else on the machine (the wall times are part of the results).
"""

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

A = "yaml/us3l_ablations/"
US3L_WIDTHS = ["1.0", "0.75", "0.5", "0.25"]
C3_DNS = [[1.0], [1.0, 1, 1, 1, 1], [0.5], [0.5, 1, 1, 1, 1]]  # ResNet-18 and ResNet-10 depths, widths 1 and 0.5


def dn_key(dn):  # the trainers' key (eval_knn.net_name) of a DN given as [width] or [width, depths...]
    return repr(round(float(dn[0]), 4)) + (f"_d{'-'.join(str(d) for d in dn[1:])}" if len(dn) > 1 else "")


MONITOR = [f"--knn_widths=[{','.join(US3L_WIDTHS)}]"]  # kNN and collapse at every width, not only the ends
# run name -> (trainer, config files, extra arguments)
RUNS = {
    "simsiam": ("train_us3l.py", [A + "t7_case01.yaml"], MONITOR),
    "simsiam_distill": ("train_us3l.py", [A + "t7_case02.yaml"], MONITOR),
    "us3l": ("train_us3l.py", [A + "t8_dynamic_groupreg.yaml"], MONITOR),
    "random_init": (None, [], ["--arch=resnet18_cifar_s2"]),  # no training: the probe of the initial weights
    **{f"us3l_alone_{w}": ("train_us3l.py", [A + "t8_dynamic_groupreg.yaml"], [f"--individual={w}"])
       for w in US3L_WIDTHS},
    "dspnet_depth": ("train_dspnet.py", ["yaml/dspnet_cifar10_quick.yaml"],
                     [f"--dns={json.dumps(C3_DNS, separators=(',', ':'))}"]),
    **{f"dspnet_alone_{dn_key(dn)}": ("train_dspnet.py", ["yaml/dspnet_cifar10_quick.yaml"],
                                      [f"--individual={json.dumps(dn, separators=(',', ':'))}"]) for dn in C3_DNS},
}
# claim -> (title, {arm label: runs}, the comparisons (arm a, arm b) whose paired difference a - b is
# reported per network and seed); an arm's networks are every network its runs evaluate
SIMSIAM, DISTILL, US3L = "SimSiam (T7 case 1)", "+ inplace distillation (T7 case 2)", "US3L, both strategies (T8)"
CLAIMS = {
    "C1": ("Collapse: SimSiam on a slimmable network, with inplace distillation, and the full US3L method",
           {SIMSIAM: ["simsiam"], DISTILL: ["simsiam_distill"], US3L: ["us3l"], "random init (probe only)": ["random_init"]},
           [(DISTILL, SIMSIAM), (US3L, SIMSIAM), (US3L, DISTILL)]),
    "C2": ("One slimmable US3L run against each width pretrained alone",
           {"US3L, one run": ["us3l"], "each width alone": [f"us3l_alone_{w}" for w in US3L_WIDTHS],
            "random init (probe only)": ["random_init"]}, [("US3L, one run", "each width alone")]),
    "C3": ("DSPNet with depth: one run of four DNs against each DN pretrained alone",
           {"DSPNet, one run": ["dspnet_depth"], "each DN alone": [f"dspnet_alone_{dn_key(d)}" for d in C3_DNS]},
           [("DSPNet, one run", "each DN alone")]),
}
PROBE = ["--train_subset=10000"]  # the cached probe on 10k class-balanced training images (1k per class)


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def train_macs(run_dir):
    """Backbone forward MACs x images of the training, summed over the networks of every step (as
    log.jsonl lists them: the study logs every step) at the training resolution; a backward costs
    about twice a forward on top."""
    import torch

    from models import ARCHS, profile
    cfg = run_config(run_dir)
    world = json.load(open(os.path.join(run_dir, "results.json")))["num_processes"]
    model, cache, total = ARCHS[cfg["arch"]](), {}, 0
    size = cfg.get("image_size") or 32
    with torch.no_grad():
        for line in open(os.path.join(run_dir, "log.jsonl")):
            rec = json.loads(line)
            if rec["step"] > cfg["max_steps"]:
                continue
            nets = rec["widths"] if "widths" in rec else rec["dns"]
            for n in nets:  # US3L: a width; DSPNet: '0.5' or '0.5_d1-1-1-1'
                if n not in cache:
                    w, _, d = str(n).partition("_d")
                    cache[n] = profile(model, float(w), [int(x) for x in d.split("-")] if d else None, size)[1]
                total += cache[n] * 2 * cfg["batch_size"] * world  # two views per image
    return total


def run_config(run_dir):
    import yaml
    return yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))


def run(cmd, log_path):
    """Run cmd from the repository root, its output appended to log_path; its wall seconds."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"error: exit code {code} from {' '.join(cmd)}; its output: {log_path}")
    return time.time() - t0


def run_one(name, seed, args):
    """Train and probe one run (skipped when recorded); write its record under args.results. A run
    without a trainer (the random-init baseline) is a probe of the seeded init of its --arch only."""
    trainer, configs, extra = RUNS[name]
    out = os.path.join(args.out, name, f"seed{seed}")
    record_path = os.path.join(args.results, f"{name}_seed{seed}.json")
    if os.path.exists(record_path):
        return  # recorded (docs/results/ is committed): finished here or in another clone
    os.makedirs(out, exist_ok=True)
    times_path, log = os.path.join(out, "study_times.json"), os.path.join(out, "study.log")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    res_path, probe_path = os.path.join(out, "results.json"), os.path.join(out, "linear", "results.json")
    data = [f"--data_path={args.data_path}"] if args.data_path else []
    train_args = [*sum((["--config", c] for c in configs), []), f"--seed={seed}", *extra]
    if trainer and "knn_top1" not in (json.load(open(res_path)) if os.path.exists(res_path) else {}):
        print(f"[{time.strftime('%H:%M:%S')}] train {name} seed {seed} -> {out}", flush=True)
        cmd = [sys.executable, trainer, *train_args, f"--out_dir={out}", "--log_every=1", *data, *args.extra]
        times["train_s"] = times.get("train_s", 0) + run(cmd, log)
        json.dump(times, open(times_path, "w"))
    if not os.path.exists(probe_path):
        print(f"[{time.strftime('%H:%M:%S')}] probe {name} seed {seed}", flush=True)
        net = [f"--ckpt={out}/backbone.pt"] if trainer else extra
        times["probe_s"] = run([sys.executable, "eval_linear.py", *net, f"--out_dir={out}/linear", f"--seed={seed}",
                                *PROBE, *data, *args.probe_extra], log)
        json.dump(times, open(times_path, "w"))
    probe = json.load(open(probe_path))
    res, cfg = (json.load(open(res_path)), run_config(out)) if trainer else ({}, {})
    record = {"run": name, "seed": seed,
              "command": f"python {trainer} {' '.join(train_args)}" if trainer else
              f"python eval_linear.py {' '.join(extra)} --seed={seed}",
              "knn_top1_init": res.get("knn_top1_init", {}), "knn_top1": res.get("knn_top1", {}),
              "linear_top1": {k: round(v["top1"], 4) for k, v in probe.items()},
              "macs": {k: v["macs"] for k, v in probe.items()}, "collapse_std": res.get("collapse_std", {}),
              "proj_dim": cfg.get("proj_dim"), "steps": cfg.get("max_steps", 0),
              "train_macs": train_macs(out) if trainer else 0, "train_wall_s": round(times.get("train_s", 0)),
              "probe_wall_s": round(times.get("probe_s", 0)), "machine": args.machine, "date": str(date.today())}
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)


# -----------------------------------------------------------------------------
# The report

def mean_std(xs, scale=100.0, digits=1):
    xs = [scale * x for x in (xs.values() if isinstance(xs, dict) else xs)]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.{digits}f}" + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def arm_table(records, arms):
    """{arm: {net: {"knn": {seed: top-1}, "init": {...}, "linear": {...}, "collapse": {...}, "macs": m}},
    {arm: {"wall": [per seed, summed over the arm's runs], "train_macs": [...], "seeds": [...]}}}."""
    nets, costs = {}, {}
    for arm, runs in arms.items():
        per_seed = {}
        for r in records:
            if r["run"] in runs:
                per_seed.setdefault(r["seed"], []).append(r)
        done = {s: rs for s, rs in per_seed.items() if len(rs) == len(runs)}  # seeds with every run of the arm
        nets[arm] = {}
        for s, rs in sorted(done.items()):
            for r in rs:
                for n in r["linear_top1"]:
                    e = nets[arm].setdefault(n, {"knn": {}, "init": {}, "linear": {}, "collapse": {}, "macs": 0})
                    if n in r["knn_top1"]:  # the random-init baseline has none
                        e["knn"][s], e["init"][s] = r["knn_top1"][n], r["knn_top1_init"][n]
                    e["linear"][s] = r["linear_top1"][n]
                    if n in r["collapse_std"]:
                        e["collapse"][s] = r["collapse_std"][n] * math.sqrt(r["proj_dim"])
                    e["macs"] = r["macs"].get(n, 0)
        costs[arm] = {"wall": [sum(r["train_wall_s"] for r in rs) for rs in done.values()],
                      "train_macs": [sum(r["train_macs"] for r in rs) for rs in done.values()], "seeds": sorted(done)}
    return nets, costs


def paired(nets, a, b, key):
    """Per network of both arms: arm a - arm b at each seed both have ({} where either has no `key`)."""
    return {n: {s: v - nets[b][n][key][s] for s, v in nets[a][n][key].items() if s in nets[b][n][key]}
            for n in nets[a] if n in nets[b]}


def plot(claim, title, nets, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (arm, per_net) in enumerate(nets.items()):
        order = sorted(per_net, key=lambda n: per_net[n]["macs"])
        x = [per_net[n]["macs"] / 1e6 for n in order]
        for ax, key in zip(axes, ("knn", "linear")):
            ys = [[100 * v for v in per_net[n][key].values()] for n in order]
            if x and all(ys):  # (the random-init arm: the probe panel only)
                ax.errorbar(x, [statistics.mean(y) for y in ys], [statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                            marker="o", capsize=3, label=arm, color=f"C{i}")
    ticks = {per_net[n]["macs"] / 1e6: n for per_net in nets.values() for n in per_net}  # each network at its MACs
    for ax, what in zip(axes, ("kNN top-1 (%)", "linear probe top-1 (%)")):
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [f"{ticks[m]}\n{m:.0f}" for m in sorted(ticks)], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("network and its MMACs per image (32 px)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)  # the probe panel has every arm
    fig.suptitle(f"{claim}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def keep_readings(path):
    """The hand-written readings of an existing report: the text between '<!-- reading CX -->' and
    '<!-- end reading -->', kept across regenerations."""
    readings, text = {}, open(path).read() if os.path.exists(path) else ""
    for part in text.split("<!-- reading ")[1:]:
        claim, _, rest = part.partition(" -->")
        readings[claim] = rest.split("<!-- end reading -->")[0].strip("\n")
    return readings


def report(args):
    records = [json.load(open(os.path.join(args.results, f))) for f in sorted(os.listdir(args.results))
               if f.endswith(".json")] if os.path.isdir(args.results) else []
    readings = keep_readings(args.report_path)
    lines = ["# Results: the papers' claims at CPU scale", "",
             "Written by `python bench/study.py` (the tables, plots and docs/results/*.json; the readings are",
             "written by hand and kept when the tables are regenerated). Each run is a committed recipe at its quick",
             "CPU budget; the probe is eval_linear.py's cached linear probe on 10k class-balanced training images.",
             "Numbers are mean ± std over n seeds (listed in each cost table); accuracy in %. `collapse` is the",
             "end-of-run collapse std x sqrt(d) (1 = a uniform spread on the sphere, 0 = collapsed). A paired",
             "difference compares two arms seed by seed, so its std is the seed spread of the effect itself.",
             "Costs: the training's wall time on the machine named below and its compute (backbone forward MACs",
             "x images, summed over every trained network; a backward adds about twice that).", ""]
    machines = sorted({r["machine"] for r in records})
    train_s, probe_s = sum(r["train_wall_s"] for r in records), sum(r.get("probe_wall_s", 0) for r in records)
    lines += [f"Machine: {m}" for m in machines]
    train_min, probe_min = round(train_s / 60), round(probe_s / 60)
    lines += [f"The {len(records)} recorded runs took {train_min + probe_min} min alone on it: {train_min} training "
              f"(kNN monitors and data decoding included), {probe_min} probing.", ""]
    for claim, (title, arms, comparisons) in CLAIMS.items():
        nets, costs = arm_table(records, arms)
        lines += [f"## {claim}: {title}", ""]
        if not any(nets.values()):
            lines += [f"No run recorded yet: `python bench/study.py --claims {claim}`.", "",
                      f"<!-- reading {claim} -->", readings.get(claim, "Reading: not written yet."),
                      "<!-- end reading -->", ""]
            continue
        lines += ["| arm | network | MMACs | kNN init | kNN end | linear | collapse | n |", "|---|---|---|---|---|---|---|---|"]
        for arm, per_net in nets.items():
            for n in sorted(per_net, key=lambda n: -per_net[n]["macs"]):
                e = per_net[n]
                col = mean_std(e["collapse"], 1.0, 2)
                lines.append(f"| {arm} | {n} | {e['macs'] / 1e6:.0f} | {mean_std(e['init'])} | {mean_std(e['knn'])} | "
                             f"{mean_std(e['linear'])} | {col} | {len(e['linear'])} |")
        rows = []
        for a, b in comparisons:
            knn, lin, col = (paired(nets, a, b, key) for key in ("knn", "linear", "collapse"))
            rows += [f"| {a} - {b} | {n} | {mean_std(knn[n])} | {mean_std(lin[n])} | {mean_std(col[n], 1.0, 2)} | "
                     f"{len(lin[n])} |" for n in sorted(lin, key=lambda n: -nets[a][n]["macs"]) if lin[n]]
        if rows:
            lines += ["", "Paired differences a - b (accuracy in points), over the seeds both arms have:", "",
                      "| a - b | network | kNN end | linear | collapse | n |", "|---|---|---|---|---|---|", *rows]
        lines += ["", "| arm | training wall time (min) | training compute (forward TMACs) | seeds |", "|---|---|---|---|"]
        for arm, c in costs.items():
            lines.append(f"| {arm} | {mean_std([w / 60 for w in c['wall']], 1.0)} | "
                         f"{mean_std([m / 1e12 for m in c['train_macs']], 1.0)} | {', '.join(map(str, c['seeds'])) or '-'} |")
        png = os.path.join(args.results, f"{claim}.png")
        if any(nets.values()):
            plot(claim, title, nets, png)
            lines += ["", f"![{claim}]({os.path.relpath(png, os.path.dirname(args.report_path))})"]
        lines += ["", f"<!-- reading {claim} -->", readings.get(claim, "Reading: not written yet."), "<!-- end reading -->", ""]
    with open(args.report_path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.report_path} ({len(records)} run records)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--claims", default="C1,C2,C3", help="comma-separated: C1, C2, C3")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", default="out/study", help="run folders (not committed)")
    p.add_argument("--results", default="docs/results", help="the committed per-run records and plots")
    p.add_argument("--report_path", default="docs/results.md")
    p.add_argument("--data_path", default="", help="CIFAR-10 folder (default: each recipe's data/cifar10)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the records")
    p.add_argument("--extra", default="", help="more trainer arguments, one string (the tests' tiny runs)")
    p.add_argument("--probe_extra", default="", help="more eval_linear.py arguments, one string")
    args = p.parse_args()
    args.extra, args.probe_extra = shlex.split(args.extra), shlex.split(args.probe_extra)
    os.chdir(ROOT)
    claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    if bad := [c for c in claims if c not in CLAIMS]:
        sys.exit(f"error: unknown claim {bad[0]!r}; known: {', '.join(CLAIMS)}")
    os.makedirs(args.results, exist_ok=True)
    if not args.report:
        args.machine = machine()
        t0 = time.time()
        for seed in [int(s) for s in args.seeds.split(",")]:
            for claim in claims:
                for runs in CLAIMS[claim][1].values():
                    for name in runs:
                        run_one(name, seed, args)
        print(f"study: {time.time() - t0:.0f} s in this sitting")
    report(args)


if __name__ == "__main__":
    main()
