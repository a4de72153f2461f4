"""bench/study.py: a run is trained, probed and recorded once (a finished one is skipped), its training
compute replays log.jsonl exactly, and the report has every arm of every claim, mean ± std over
seeds, plots, and keeps the hand-written readings when it is regenerated."""

import argparse
import importlib.util
import json
import os
import sys

import pytest

from models import ARCHS, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "bench", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_one_records_once_and_replays_the_compute(image_folder, tmp_path, monkeypatch):
    study = load_study()
    args = argparse.Namespace(
        out=str(tmp_path / "out"), results=str(tmp_path / "results"), data_path=str(image_folder), machine="test",
        extra=["--arch=resnet18_cifar_tiny", "--image_size=16", "--batch_size=16", "--max_steps=3",
               "--knn_bank_subset=100", "--knn_test_subset=50", "--knn_batch_size=50", "--proj_hidden=64",
               "--proj_dim=32", "--knn_k=20", "--loader=torch"],
        probe_extra=["--train_subset=100", "--epochs=2"])
    os.makedirs(args.results)
    study.run_one("us3l_alone_0.5", 0, args)
    rec = json.loads((tmp_path / "results" / "us3l_alone_0.5_seed0.json").read_text())
    assert set(rec["knn_top1"]) == set(rec["linear_top1"]) == set(rec["collapse_std"]) == {"0.5"}
    assert rec["command"].startswith("python train_us3l.py --config yaml/us3l_ablations/t8_dynamic_groupreg.yaml")
    assert "--individual=0.5" in rec["command"] and rec["steps"] == 3
    # one network per step: 3 steps x 2 views x 16 images x the width-0.5 network's MACs at 16 px
    assert rec["train_macs"] == 3 * 2 * 16 * profile(ARCHS["resnet18_cifar_tiny"](), 0.5, None, 16)[1]
    assert rec["macs"]["0.5"] == profile(ARCHS["resnet18_cifar_tiny"](), 0.5, None, 32)[1]  # the probe's, at 32 px
    assert rec["train_wall_s"] >= 0 and rec["probe_wall_s"] >= 0 and rec["machine"] == "test"

    def fail(cmd, log):
        raise AssertionError(f"a finished run ran again: {cmd}")
    monkeypatch.setattr(study, "run", fail)
    study.run_one("us3l_alone_0.5", 0, args)  # skipped
    (tmp_path / "results" / "us3l_alone_0.5_seed0.json").unlink()
    study.run_one("us3l_alone_0.5", 0, args)  # recorded again from the finished run, nothing retrained
    assert json.loads((tmp_path / "results" / "us3l_alone_0.5_seed0.json").read_text()) == rec


def fake_record(study, name, seed):
    trainer, _, extra = study.RUNS[name]
    if name.startswith("us3l_alone_") or name.startswith("dspnet_alone_"):
        nets = [name.split("_alone_")[1]]
    elif trainer == "train_dspnet.py":
        nets = [study.dn_key(d) for d in study.C3_DNS]
    else:
        nets = study.US3L_WIDTHS
    acc = {n: 0.3 + 0.01 * seed + 0.001 * i for i, n in enumerate(nets)}
    if trainer is None:  # the random-init baseline: a probe only
        return {"run": name, "seed": seed, "knn_top1_init": {}, "knn_top1": {}, "linear_top1": {n: 0.2 for n in nets},
                "macs": {n: 1e6 * (i + 1) for i, n in enumerate(nets)}, "collapse_std": {}, "proj_dim": None,
                "train_wall_s": 0, "train_macs": 0, "machine": "test machine"}
    return {"run": name, "seed": seed, "knn_top1_init": {n: 0.2 for n in nets}, "knn_top1": acc,
            "linear_top1": {n: a + 0.1 for n, a in acc.items()}, "macs": {n: 1e6 * (i + 1) for i, n in enumerate(nets)},
            "collapse_std": {n: (0.4 if name == "simsiam" else 0.5) / 32 for n in nets}, "proj_dim": 1024,
            "train_wall_s": 60 * (seed + 1), "train_macs": 2e12, "machine": "test machine"}


def test_report_tables_plots_and_readings(tmp_path, monkeypatch):
    study = load_study()
    results = tmp_path / "results"
    results.mkdir()
    for seed in (0, 1):
        for name in study.RUNS:
            if (name, seed) not in [("us3l_alone_0.25", 1), ("simsiam", 0)]:  # C2's alone arm misses seed 1, SimSiam seed 0
                (results / f"{name}_seed{seed}.json").write_text(json.dumps(fake_record(study, name, seed)))
    args = argparse.Namespace(results=str(results), report_path=str(tmp_path / "results.md"))
    study.report(args)
    text = (tmp_path / "results.md").read_text()
    assert "Machine: test machine" in text
    for claim, (title, arms, _) in study.CLAIMS.items():
        assert f"## {claim}: {title}" in text and (results / f"{claim}.png").stat().st_size > 1000
        for arm in arms:
            assert f"| {arm} |" in text
    # US3L at 1.0 over seeds 0 and 1: kNN 30 and 31 -> 30.5 ± 0.7; linear 40.5 ± 0.7; collapse 0.5 x sqrt(1024) / 32
    assert "| US3L, one run | 1.0 | 1 | 20.0 ± 0.0 | 30.5 ± 0.7 | 40.5 ± 0.7 | 0.50 ± 0.00 | 2 |" in text
    assert "| each width alone | 1.0 | 1 | 20.0 | 30.0 | 40.0 | 0.50 | 1 |" in text  # seed 0 only: complete
    assert "| random init (probe only) | 1.0 | 1 | - | - | 20.0 ± 0.0 | - | 2 |" in text
    assert "| each width alone | 4.0 | 8.0 | 0 |" in text  # 4 runs x 1 min, 4 x 2 TMACs; seed 1 incomplete
    # paired differences over the seeds both arms have: C2 at seed 0 only, +0.1 at 0.75 (the fakes' per-net offset);
    # C1's SimSiam has seed 1 only: paired with US3L's seed 1, not its seed 0 (which would give -1.0)
    assert "| US3L, one run - each width alone | 0.75 | 0.1 | 0.1 | 0.00 | 1 |" in text
    assert f"| {study.US3L} - {study.SIMSIAM} | 1.0 | 0.0 | 0.0 | 0.10 | 1 |" in text  # collapse 0.5 - 0.4
    assert f"| {study.US3L} - {study.DISTILL} | 0.25 | 0.0 ± 0.0 | 0.0 ± 0.0 | 0.00 ± 0.00 | 2 |" in text
    # a hand-written reading survives a regeneration
    (tmp_path / "results.md").write_text(text.replace("<!-- reading C2 -->\nReading: not written yet.",
                                                      "<!-- reading C2 -->\nHeld: the narrow widths win."))
    study.report(args)
    again = (tmp_path / "results.md").read_text()
    assert "<!-- reading C2 -->\nHeld: the narrow widths win.\n<!-- end reading -->" in again
    assert again.count("Reading: not written yet.") == 2


def test_cli_rejects_an_unknown_claim(tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, "bench/study.py", "--claims", "C9", "--results", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown claim 'C9'; known: C1, C2, C3"


@pytest.mark.parametrize("dn", [[1.0], [0.5, 1, 1, 1, 1]])
def test_dn_key_is_the_trainers_name(dn):
    from eval_knn import net_name
    assert load_study().dn_key(dn) == net_name(dn[0], dn[1:] or None)


def test_random_init_is_probed_only(image_folder, tmp_path):
    study = load_study()
    args = argparse.Namespace(out=str(tmp_path / "out"), results=str(tmp_path / "results"), data_path=str(image_folder),
                              machine="test", extra=[], probe_extra=["--arch=resnet18_cifar_tiny", "--train_subset=100",
                                                                     "--epochs=2", "--test_subset=50"])
    os.makedirs(args.results)
    study.run_one("random_init", 1, args)
    rec = json.loads((tmp_path / "results" / "random_init_seed1.json").read_text())
    assert set(rec["linear_top1"]) == set(study.US3L_WIDTHS) and rec["knn_top1"] == {} and rec["train_macs"] == 0
    assert not (tmp_path / "out" / "random_init" / "seed1" / "results.json").exists()  # nothing trained
    assert rec["command"] == "python eval_linear.py --arch=resnet18_cifar_s2 --seed=1"
