"""Every yaml recipe loads against its script's Config, and the README's commands run as written
(with tiny overrides where the real command would take minutes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from train_us3l import Config, check_config
from utils import parse_config

REPO = Path(__file__).resolve().parents[1]
US3L_RECIPES = ["cifar10_quick", "r18_cifar100", "r50_cifar100", "mbv2_cifar100", "r18_in", "r50_in",
                "vit_tiny_cifar10"]
LINEAR_RECIPES = ["linear_cifar", "linear_in"]  # eval_linear.py; loaded in tests/test_linear.py


@pytest.mark.parametrize("name", US3L_RECIPES)
def test_us3l_recipe_loads(name):
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    check_config(cfg)


def test_every_recipe_has_a_test():
    assert sorted(p.stem for p in (REPO / "yaml").glob("*.yaml")) == sorted(US3L_RECIPES + LINEAR_RECIPES)


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def test_readme_lists_the_two_setup_commands_first():
    assert readme_commands()[:2] == ["make quick", "make test"]


def test_readme_commands_run(cifar_small, tmp_path):
    """Each README command, as written, with overrides that make the training ones take seconds."""
    tiny = (f"--data_path={cifar_small} --out_dir={tmp_path}/run --max_steps=2 --batch_size=16 --log_every=1 "
            "--knn_bank_subset=50 --knn_test_subset=20 --proj_hidden=64 --proj_dim=32 --knn_k=10")
    ran = 0
    for cmd in readme_commands():
        if cmd in ("make test", "source .venv/bin/activate") or cmd.startswith("accelerate launch"):
            continue  # make test is this suite; activation is implicit; ImageNet needs a GPU node
        if cmd.startswith("make quick"):
            cmd = f'make quick QUICK_ARGS="{tiny}"'
        elif cmd.startswith("python train_us3l.py"):
            cmd = f"{cmd} {tiny}"
        cmd = cmd.replace("python ", f"{sys.executable} ", 1) if cmd.startswith("python ") else cmd
        p = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"README command failed: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        ran += 1
    assert ran >= 3
