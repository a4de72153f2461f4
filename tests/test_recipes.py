"""Every yaml recipe loads against its script's Config, and the README's commands run as written
(with tiny overrides where the real command would take minutes)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_dspnet
import yaml
from config import parse_config
from models import ARCHS
from train_us3l import Config, check_config

REPO = Path(__file__).resolve().parents[1]
US3L_RECIPES = ["cifar10_quick", "r18_cifar100", "r50_cifar100", "mbv2_cifar100", "r18_in", "r50_in",
                "vit_tiny_cifar10"]
LINEAR_RECIPES = ["linear_cifar", "linear_in"]  # eval_linear.py; loaded in tests/test_linear.py
DSPNET_RECIPES = ["dspnet_cifar10_quick", "mbv3_in", "resnet_dn9_in"]


@pytest.mark.parametrize("name", US3L_RECIPES)
def test_us3l_recipe_loads(name):
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    check_config(cfg)


@pytest.mark.parametrize("name", DSPNET_RECIPES)
def test_dspnet_recipe_loads(name):
    cfg = parse_config(train_dspnet.Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    dns, _ = train_dspnet.parse_dns(cfg, ARCHS[cfg.arch]())  # every DN fits the arch
    assert dns[0]["width"] == 1.0 and len(dns) == len(cfg.dns)


def test_every_recipe_has_a_test():
    assert sorted(p.stem for p in (REPO / "yaml").glob("*.yaml")) == sorted(US3L_RECIPES + LINEAR_RECIPES
                                                                             + DSPNET_RECIPES)


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def test_readme_lists_the_two_setup_commands_first():
    assert readme_commands()[:2] == ["make quick", "make test"]


def written_out_dir(readme_cmd, cmd):
    """(the out_dir a README command writes to as written, the one it wrote to here): the last --out_dir
    given wins, else its --config recipe's out_dir; `make quick` runs yaml/cifar10_quick.yaml."""
    def last(c):
        found = re.findall(r"--out_dir=(\S+)", c)
        return found[-1] if found else None

    orig = last(readme_cmd)
    if orig is None and readme_cmd.startswith("make quick"):
        orig = "out/cifar10_quick"
    elif orig is None and (m := re.search(r"--config (\S+)", readme_cmd)):
        orig = yaml.safe_load((REPO / m[1]).read_text()).get("out_dir")
    return orig, last(cmd)


def remap_paths(cmd, written):
    """out/... paths of a README command -> where the earlier commands of this test wrote them."""
    def sub(m):
        for orig in sorted(written, key=len, reverse=True):  # out/cifar10_quick/knn before out/cifar10_quick
            if m[0] == orig or m[0].startswith(orig + "/"):
                return written[orig] + m[0][len(orig):]
        return m[0]
    return re.sub(r"(?<=[ =,])out/[^ ,]+", sub, cmd)


def test_readme_commands_run(cifar_small, tmp_path):
    """Each README command, as written, with overrides that make the training ones take seconds and
    the evaluations and exports run on a few images. The evaluations read the checkpoint of the tiny
    `make quick` run (its out_dir stands in for out/cifar10_quick), which the README lists before them;
    the exports read the checkpoints and results.json files of the commands before them, wherever this
    test wrote them."""
    tiny = (f"--data_path={cifar_small} --out_dir={tmp_path}/run --max_steps=2 --batch_size=16 --log_every=1 "
            "--knn_bank_subset=50 --knn_test_subset=20 --proj_hidden=64 --proj_dim=32 --knn_k=10")
    tiny_eval = {"eval_knn.py": "--bank_subset=60 --test_subset=30 --calib_images=40 --batch_size=20 --k=5,20",
                 "eval_linear.py": "--test_subset=30 --calib_images=40 --batch_size=20 --epochs=2"}
    # exports: the legacy ONNX exporter (seconds; tests/test_export.py covers the default one), a latency
    # budget every network meets (no timing in tests) and the files in tmp_path (the last --out wins)
    tiny_export = (f"--data_path={cifar_small} --calib_images=40 --calib_batch_size=20 --latency_warmup=1 "
                   "--latency_repeats=3 --onnx_dynamo=false")
    accelerate = str(Path(sys.executable).parent / "accelerate")  # what `source .venv/bin/activate` gives
    ran, evals, launched, exports, written = 0, 0, 0, 0, {}
    for cmd in readme_commands():
        if cmd in ("make test", "source .venv/bin/activate"):
            continue  # make test is this suite; activation is implicit
        readme_cmd = cmd
        is_eval = cmd.split()[:2] in (["python", "eval_knn.py"], ["python", "eval_linear.py"])
        is_export = cmd.startswith("python export.py")
        env = dict(os.environ)
        if "accelerate launch" in cmd:  # ImageNet recipes: 2 steps of batch 4 at 64 px on the CIFAR images
            cmd = cmd.replace("accelerate launch", f"{accelerate} launch", 1)
            small = "--batch_size=4 --image_size=64" if "_in.yaml" in cmd else ""
            cmd = f"{cmd} {tiny} {small} --num_workers=0 --out_dir={tmp_path}/launch{launched}"
            launched += 1
            if "--num_processes 2" in cmd:
                env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
        elif cmd.startswith("make quick"):
            cmd = f'make quick QUICK_ARGS="{tiny}"'
        elif cmd.startswith("python train_us3l.py"):
            cmd = f"{cmd} {tiny}"
        elif cmd.startswith("python train_dspnet.py"):  # its own out_dir (the last --out_dir wins)
            cmd = f"{cmd} {tiny} --out_dir={tmp_path}/dspnet"
        elif is_eval:
            cmd = cmd.replace("out/cifar10_quick/backbone.pt", f"{tmp_path}/run/backbone.pt")
            cmd = f"{cmd} {tiny_eval[cmd.split()[1]]} --data_path={cifar_small} --out_dir={tmp_path}/eval{evals}"
            evals += 1
        elif is_export:
            cmd = remap_paths(cmd, written)
            budget = " --budget_ms=1e9" if "--budget_ms" in cmd else ""
            cmd = f"{cmd} {tiny_export}{budget} --out={tmp_path}/export{exports}/net"
            exports += 1
        cmd = cmd.replace("python ", f"{sys.executable} ", 1) if cmd.startswith("python ") else cmd
        p = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"README command failed: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        ran += 1
        orig, out_dir = written_out_dir(readme_cmd, cmd)
        if orig and out_dir:
            written[orig] = out_dir
        if is_export:  # checked files and their description (OUT.json per network)
            infos = [json.loads(f.read_text()) for f in (tmp_path / f"export{exports - 1}").glob("*.json")]
            assert infos and all(i["max_abs_diff"] for i in infos), p.stdout
            if "--latency" in readme_cmd.split():  # the table, and the accuracy-latency plot with --results
                assert "median latency" in p.stdout and "MMACs" in p.stdout, p.stdout
                assert "--results" not in readme_cmd or any((tmp_path / f"export{exports - 1}").glob("*_latency.png"))
        if is_eval:  # a table and results.json for the 4 widths (the last --out_dir wins)
            res = json.loads((tmp_path / f"eval{evals - 1}" / "results.json").read_text())
            assert "MMACs" in p.stdout and sorted(float(w) for w in res) == [0.25, 0.5, 0.75, 1.0], p.stdout
    assert ran >= 4 and evals >= 4 and launched >= 4 and exports >= 4
