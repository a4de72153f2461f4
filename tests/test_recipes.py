"""Every yaml recipe loads against its script's Config, and the README's commands run as written
(with tiny overrides where the real command would take minutes)."""

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import train_dspnet
import train_us3l
from config import parse_config
from models import ARCHS, projection_mlp
from tests.test_multiprocess import thread_env
from train_us3l import Config, check_config
from utils import ema_update_

REPO = Path(__file__).resolve().parents[1]
US3L_RECIPES = ["cifar10_quick", "r18_cifar100", "r50_cifar100", "mbv2_cifar100", "r18_in", "r50_in",
                "r18_in_release", "r50_in_release", "vit_tiny_cifar10", "vit_tiny_cifar10_release"]
LINEAR_RECIPES = ["linear_cifar", "linear_in", "linear_byol_in", "linear_us3l_cifar", "finetune_dspnet_in"]  # eval_linear.py; loaded
# in tests/test_linear.py
DSPNET_RECIPES = ["dspnet_cifar10_quick", "mbv3_in", "resnet_dn9_in"]
# US3L Tables 7-9, one recipe per row (rows that are the same run share a file: docs/reproduce.md, Table 7)
ABLATIONS = ([f"t7_case{c:02d}" for c in range(1, 18)] + ["t8_dynamic", "t8_groupreg", "t8_dynamic_groupreg",
                                                           "t9_random_widths", "t9_random_widths_dynamic"])


@pytest.mark.parametrize("name", US3L_RECIPES)
def test_us3l_recipe_loads(name):
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    check_config(cfg)


@pytest.mark.parametrize("name", DSPNET_RECIPES)
def test_dspnet_recipe_loads(name):
    cfg = parse_config(train_dspnet.Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    dns, _ = train_dspnet.parse_dns(cfg, ARCHS[cfg.arch]())  # every DN fits the arch
    assert dns[0]["width"] == 1.0 and len(dns) == len(cfg.dns)


@pytest.mark.parametrize("name", ["r18_in", "r50_in", "r18_in_release", "r50_in_release", "mbv3_in", "resnet_dn9_in"])
def test_imagenet_recipes_default_to_ffcv(name, tmp_path):
    """The ImageNet pretraining recipes read a .beton; the recipe says how to write it, and so does the
    error when it is missing."""
    from augment import build_train_loader

    script = train_us3l if name in US3L_RECIPES else train_dspnet
    cfg = parse_config(script.Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    assert (cfg.loader, cfg.ffcv_path) == ("ffcv", "data/imagenet_ffcv")
    assert ("python ffcv_data.py --data_path data/imagenet --out data/imagenet_ffcv\n# --max_resolution 256"
            in (REPO / "yaml" / f"{name}.yaml").read_text())
    with pytest.raises(FileNotFoundError, match=f"--out {tmp_path} --max_resolution 256"):
        build_train_loader(cfg.loader, cfg.data_path, str(tmp_path), cfg.dataset, 224, cfg.batch_size)


def test_every_recipe_has_a_test():
    assert sorted(p.stem for p in (REPO / "yaml").glob("*.yaml")) == sorted(US3L_RECIPES + LINEAR_RECIPES
                                                                             + DSPNET_RECIPES)
    assert sorted(p.stem for p in (REPO / "yaml" / "us3l_ablations").glob("*.yaml")) == sorted(ABLATIONS + ["paper"])
    assert sorted(p.name for p in (REPO / "yaml").iterdir() if p.is_dir()) == ["us3l_ablations"]
    # the paper row -> file table (docs/reproduce.md, Table 7; the README links there)
    rows = [line for line in (REPO / "docs" / "reproduce.md").read_text().splitlines() if line.startswith("|")]
    assert all(any(f"`yaml/us3l_ablations/{name}.yaml`" in row for row in rows) for name in ABLATIONS)
    assert "docs/reproduce.md" in (REPO / "README.md").read_text()


TABLE7 = {  # case: (base_loss, distill_loss, aux_head, momentum_target_base, momentum_target_sub), US3L Table 7
    1: ("mse", "none", 0, 0, 0), 2: ("mse", "mse", 0, 0, 0), 3: ("mse", "mse", 0, 1, 1), 4: ("mse", "mse", 1, 1, 1),
    5: ("mse", "infonce", 0, 0, 0), 6: ("mse", "infonce", 0, 0, 1), 7: ("mse", "infonce", 0, 1, 1),
    8: ("mse", "infonce", 1, 1, 1), 9: ("infonce", "none", 0, 0, 0), 10: ("infonce", "mse", 0, 0, 0),
    11: ("infonce", "mse", 0, 0, 1), 12: ("infonce", "mse", 0, 1, 1), 13: ("infonce", "mse", 1, 1, 1),
    14: ("infonce", "infonce", 0, 0, 0), 15: ("infonce", "infonce", 0, 0, 1), 16: ("infonce", "infonce", 0, 1, 1),
    17: ("infonce", "infonce", 1, 1, 1)}
STRATEGIES = {  # name: (sandwich, dynamic_sampling, group regularization on), Tables 8 and 9
    "t8_dynamic": (True, True, False), "t8_groupreg": (True, False, True), "t8_dynamic_groupreg": (True, True, True),
    "t9_random_widths": (False, False, False), "t9_random_widths_dynamic": (False, True, False)}


# The ablation recipes whose 2-step run goes through train_us3l.main's whole loop (data, EMA teacher,
# optimizer, logging, kNN monitor, checkpoint): together they take every branch that main's loop takes
# on these keys (no teacher at all and a predictor; teacher, aux head, dynamic sampling and group
# regularization; no sandwich). The other rows run forward_backward in-process (ablation_steps).
WHOLE_LOOP = ["t7_case01", "t8_dynamic_groupreg", "t9_random_widths_dynamic"]


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two fighting
    other processes for the cores (measured here: 30 s against 5 s for one ablation run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ablation_recipe(name):
    """The recipe, checked, after asserting that it holds its paper row's switches at the paper's loss scale."""
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "us3l_ablations" / f"{name}.yaml")])
    check_config(cfg)
    if name.startswith("t7"):
        switches, strategies = TABLE7[int(name[-2:])], (True, False, False)  # Table 7: case 13's baseline
    else:
        switches, strategies = TABLE7[13], STRATEGIES[name]
    assert (cfg.base_loss, cfg.distill_loss, cfg.aux_head, cfg.momentum_target_base, cfg.momentum_target_sub) == \
        tuple(bool(v) if i > 1 else v for i, v in enumerate(switches))
    assert (cfg.sandwich, cfg.dynamic_sampling, cfg.group_reg_alpha > 0) == strategies
    assert (cfg.infonce_negatives, cfg.temperature, cfg.loss_views) == ("both_views", 0.5, "mean")
    # the InfoNCE rows at the paper's lr 0.5 (base_lr 0.25), wd 1e-4; the MSE rows (cases 1-8) at the release's
    # SimSiam/BYOL settings: lr 0.05 at batch 512, wd 5e-4, 3-layer 2048-d heads
    mse = cfg.base_loss == "mse"
    assert (cfg.base_lr, cfg.weight_decay) == ((0.025, 5e-4) if mse else (0.25, 1e-4))
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers) == ((2048, 2048, 3) if mse else (2048, 128, 2))
    return cfg


@pytest.mark.parametrize("name", WHOLE_LOOP)
def test_us3l_ablation_recipe_trains(name, image_folder, tmp_path, one_thread, fresh_accelerate):
    """The recipe trains 2 steps (the second with sub-networks) through train_us3l.main on a tiny
    override of its budget: the tiny ResNet-18 (the switches do not depend on the backbone's size), 16 px."""
    cfg = ablation_recipe(name)
    tiny = {"data_path": str(image_folder), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8, "image_size": 16,
            "arch": "resnet18_cifar_tiny", "precision": "no", "log_every": 1, "proj_hidden": 32, "proj_dim": 16,
            "knn_bank_subset": 20, "knn_test_subset": 10, "knn_batch_size": 20, "knn_k": 5, "channels_last": False}
    results = train_us3l.main(dataclasses.replace(cfg, **tiny))
    assert set(results["knn_top1"]) == {"1.0", "0.25"}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [len(r["widths"]) for r in log] == ([1, 3] if cfg.dynamic_sampling else [3, 3])
    assert (log[-1]["widths"][0] == 1.0) == cfg.sandwich
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k.startswith("loss/"))


def tiny_student(cfg):
    """(student, teacher) as train_us3l.main builds them for cfg, on the tiny ResNet-18 with small heads:
    a predictor for an MSE base loss, an aux head g when the sub-networks distill through one."""
    torch.manual_seed(0)
    backbone = ARCHS["resnet18_cifar_tiny"]()
    student = nn.ModuleDict({"backbone": backbone, "projector": projection_mlp(backbone.feature_dim, 32, 16)})
    if cfg.base_loss == "mse" or cfg.predictor:
        student["predictor"] = projection_mlp(16, 32, 16)
    if cfg.aux_head and cfg.distill_loss != "none":
        student["aux"] = projection_mlp(16, 32, 16)
    online = nn.ModuleDict({k: student[k] for k in ("backbone", "projector")})
    return student, online, copy.deepcopy(online).requires_grad_(False)


@pytest.mark.parametrize("name", [n for n in ABLATIONS if n not in WHOLE_LOOP])
def test_us3l_ablation_recipe_steps(name, one_thread):
    """The recipe's widths for the 2 steps of a 2-step run, and those steps (train_us3l.forward_backward,
    an SGD step, the EMA update) on random images: every loss finite, a finite gradient in every head the
    row has, the aux head g trained by sub-networks only; the losses that read the teacher's keys are
    those of the row's momentum-target columns."""
    cfg = ablation_recipe(name)
    student, online, teacher = tiny_student(cfg)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    widths = [train_us3l.sample_widths(step, 2, cfg) for step in range(2)]
    assert [len(w) for w in widths] == ([1, 3] if cfg.dynamic_sampling else [3, 3])
    assert (widths[1][0] == 1.0) == cfg.sandwich and widths[1] == sorted(widths[1], reverse=True)
    x = torch.randn(2 * 8, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 2 views of 8 images

    def step(w, teacher):
        opt.zero_grad()
        return train_us3l.forward_backward(student, teacher, x, w, cfg, contextlib.nullcontext, log=True)

    for w in widths:
        losses_, stats = step(w, teacher)
        assert losses_.shape == (len(w),) and torch.isfinite(losses_).all() and len(stats) == len(w)
        trained = {k for k, m in student.items() if all(p.grad is not None for p in m.parameters())}
        assert trained == set(student) - ({"aux"} if len(w) == 1 else set()), (w, trained)
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        ema_update_(teacher, online, 0.99)
    other = copy.deepcopy(teacher)  # another teacher changes exactly the losses against its keys
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    changed = (step(widths[1], teacher)[0] != step(widths[1], other)[0]).tolist()
    assert changed == [cfg.momentum_target_base] + [cfg.momentum_target_sub] * (len(widths[1]) - 1)


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


def tiny_network(cmd):
    """The --arch/--image_size overrides of a README training command (the last one given wins): the
    tiny ResNet-18 at 16 px where its recipe trains a ResNet whose DNs (if any) are widths only (the
    evaluations and exports of its checkpoint then read a tiny one too); resnet34_w96's 9 DNs, which
    slice depth, on its quarter-width stand-in resnet34_w24_cifar at 16 px (a sixteenth of the parameters,
    checkpoints and disk writes); otherwise (a MobileNetV3) the recipe's own network at 32 px."""
    m = re.search(r"--config[= ](\S+)", cmd)
    path = m[1] if m else "yaml/cifar10_quick.yaml" if cmd.startswith("make quick") else None
    recipe = yaml.safe_load((REPO / path).read_text()) if path else {}
    arch = recipe.get("arch", Config.arch)
    if arch.startswith("resnet") and all(len(dn) == 1 for dn in recipe.get("dns", [])):
        return "--arch=resnet18_cifar_tiny --image_size=16"
    if arch == "resnet34_w96":
        return "--arch=resnet34_w24_cifar --image_size=16"
    return "--image_size=32"


def test_readme_commands_run(image_folder, tmp_path):
    """Each README command, as written, with overrides that make the training ones take seconds (tiny
    networks: see tiny_network) and the evaluations and exports run on a few images. The evaluations read
    the checkpoint of the tiny `make quick` run (its out_dir stands in for out/cifar10_quick), which the
    README lists before them, or a random init of the tiny network; the exports read the checkpoints and
    results.json files of the commands before them, wherever this test wrote them."""
    tiny = (f"--data_path={image_folder} --out_dir={tmp_path}/run --max_steps=2 --batch_size=16 --log_every=1 "
            "--knn_bank_subset=50 --knn_test_subset=20 --proj_hidden=64 --proj_dim=32 --knn_k=10")
    tiny_eval = {"eval_knn.py": "--bank_subset=60 --test_subset=30 --calib_images=40 --batch_size=20 --k=5,20",
                 "eval_linear.py": "--test_subset=30 --calib_images=40 --batch_size=20 --epochs=2"}
    # exports: the legacy ONNX exporter (seconds; tests/test_export.py covers the default one), a latency
    # budget every network meets (no timing in tests) and the files in tmp_path (the last --out wins)
    tiny_export = (f"--data_path={image_folder} --calib_images=40 --calib_batch_size=20 --latency_warmup=1 "
                   "--latency_repeats=3 --onnx_dynamo=false")
    accelerate = str(Path(sys.executable).parent / "accelerate")  # what `source .venv/bin/activate` gives
    ran, evals, launched, exports, written, standins = 0, 0, 0, 0, {}, set()
    for cmd in readme_commands():
        if cmd in ("make test", "source .venv/bin/activate"):
            continue  # make test is this suite; activation is implicit
        readme_cmd = cmd
        is_eval = cmd.split()[:2] in (["python", "eval_knn.py"], ["python", "eval_linear.py"])
        is_export = cmd.startswith("python export.py")
        env = dict(os.environ)
        if "accelerate launch" in cmd:  # ImageNet recipes: 2 steps of batch 4 on the CIFAR-like images
            cmd = cmd.replace("accelerate launch", f"{accelerate} launch", 1)
            # the ImageNet recipes read a .beton (loader=ffcv): here the torch reference path on CIFAR images;
            # their kNN monitor runs at 224 px whatever the training size: one bank and one test image per class
            small = ("--batch_size=4 --loader=torch --knn_bank_subset=10 --knn_test_subset=10 --knn_k=5"
                     if re.search(r"_in(_release)?\.yaml", cmd) else "")
            cmd = f"{cmd} {tiny} {tiny_network(cmd)} {small} --num_workers=0 --out_dir={tmp_path}/launch{launched}"
            launched += 1
            if "--num_processes 2" in cmd:  # the 2 processes share this one's threads
                env.update(thread_env(2))
        elif cmd.startswith("make quick"):
            cmd = f'make quick QUICK_ARGS="{tiny} {tiny_network(cmd)}"'
        elif cmd.startswith("python train_us3l.py"):
            cmd = f"{cmd} {tiny} {tiny_network(cmd)}"
        elif cmd.startswith("python train_dspnet.py"):  # its own out_dir (the last --out_dir wins)
            cmd = f"{cmd} {tiny} {tiny_network(cmd)} --out_dir={tmp_path}/dspnet"
        elif is_eval:
            cmd = remap_paths(cmd, written)  # a checkpoint an earlier README command wrote
            cmd = cmd.replace("out/cifar10_quick/backbone.pt", f"{tmp_path}/run/backbone.pt")
            if "linear_us3l_cifar.yaml" in cmd:  # its lr drops at epochs 60 and 80 of 100; here at 1 of 2
                cmd += " --lr_milestones=1"
            arch = " --arch=resnet18_cifar_tiny" if "--arch" in cmd else ""  # a random init (the last --arch wins)
            cmd = (f"{cmd} {tiny_eval[cmd.split()[1]]}{arch} --data_path={image_folder} "
                   f"--out_dir={tmp_path}/eval{evals}")
            evals += 1
        elif is_export:
            # a torchvision file needs ResNet-18's widths, which the stand-in for resnet34_w96 lacks: plain
            # weights here (tests/test_export.py converts resnet34_w96's DN to a torchvision ResNet-18)
            standin = any(orig in cmd and out in standins for orig, out in written.items())
            cmd = remap_paths(cmd, written) + (" --formats=pt" if standin else "")
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
            if "resnet34_w24_cifar" in cmd:
                standins.add(out_dir)
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


PAPER = ["--config", str(REPO / "yaml" / "us3l_ablations" / "paper.yaml")]
PAPER_SCALE = {"dataset": "cifar100", "arch": "resnet18_cifar", "epochs": 400, "max_steps": 0, "batch_size": 512,
               "num_widths": 3, "momentum": 0.99, "momentum_cosine": False, "knn_bank_subset": 0}


@pytest.mark.parametrize("name", ABLATIONS)
def test_paper_scale_overlay_keeps_the_row(name):
    """--config ROW --config paper.yaml: the paper's CIFAR-100 scale, the row's switches and hyper-parameters."""
    row = ablation_recipe(name)
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "us3l_ablations" / f"{name}.yaml"), *PAPER,
                                "--out_dir=out/x"])
    check_config(cfg)
    assert {k: getattr(cfg, k) for k in PAPER_SCALE} == PAPER_SCALE
    assert (cfg.aug, cfg.min_scale) == ("mocov2", 0.2)  # the release's CIFAR views
    scale = set(PAPER_SCALE) | {"data_path", "out_dir", "loader", "num_workers", "knn_test_subset", "knn_widths",
                                "eval_every", "log_every", "image_size", "aug", "min_scale"}
    assert {k: v for k, v in dataclasses.asdict(row).items() if k not in scale} == \
        {k: v for k, v in dataclasses.asdict(cfg).items() if k not in scale}


def test_paper_scale_overlay_needs_an_out_dir_and_trains(image_folder, tmp_path, one_thread, fresh_accelerate):
    row = ["--config", str(REPO / "yaml" / "us3l_ablations" / "t7_case02.yaml")]
    with pytest.raises(SystemExit, match="out_dir is empty: name the run's folder"):
        train_us3l.main(parse_config(Config, row + PAPER))
    cfg = parse_config(Config, row + PAPER)
    tiny = {"data_path": str(image_folder), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8, "image_size": 16,
            "arch": "resnet18_cifar_tiny", "precision": "no", "log_every": 1, "proj_hidden": 32, "proj_dim": 16,
            "knn_bank_subset": 20, "knn_test_subset": 10, "knn_batch_size": 20, "knn_k": 5, "num_workers": 0}
    results = train_us3l.main(dataclasses.replace(cfg, **tiny))
    assert set(results["knn_top1"]) == {"1.0", "0.75", "0.5", "0.25"}


@pytest.mark.parametrize("name", ["r18_in_release", "r50_in_release"])
def test_release_recipes(name, image_folder, tmp_path, one_thread, fresh_accelerate):
    """The release's ImageNet run: BYOL base + g + cosine distillation (case 4's design), a step per width,
    the release's group regularization after a 50-epoch plain-L2 warm-up, lr 0.05 at the release's batch;
    2 steps on the torch loader (the recipe reads a .beton)."""
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    check_config(cfg)
    assert (cfg.base_loss, cfg.distill_loss, cfg.aux_head, cfg.momentum_target_base, cfg.momentum_target_sub) == \
        ("mse", "mse", True, True, True)
    assert (cfg.step_per_width, cfg.group_reg_form, cfg.group_reg_warmup_epochs, cfg.dynamic_sampling) == \
        (True, "release", 50, True)
    assert (cfg.momentum, cfg.momentum_cosine, cfg.proj_layers, cfg.proj_last_bn) == (0.99, False, 3, False)
    assert cfg.base_lr * cfg.batch_size * 8 / 256 == pytest.approx(0.05, rel=1e-5)  # 8 GPUs
    tiny = {"data_path": str(image_folder), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8, "image_size": 16,
            "arch": "resnet18_cifar_tiny", "precision": "no", "log_every": 1, "proj_hidden": 32, "proj_dim": 16,
            "loader": "torch", "knn_bank_subset": 10, "knn_test_subset": 10, "knn_batch_size": 10, "knn_k": 5,
            "num_workers": 0, "epochs": 4}
    results = train_us3l.main(dataclasses.replace(cfg, **tiny))
    assert set(results["knn_top1"]) == {"1.0", "0.25"}


def test_vit_release_recipe(image_folder, tmp_path, monkeypatch, one_thread, fresh_accelerate):
    """yaml/vit_tiny_cifar10_release.yaml, Table 3 as the release ran it (ViT_experiments/run_ofa.sh): us_vit_tiny
    on CIFAR-10 at 224 px, MoCo v3's heads, InfoNCE base and distillation through g to the momentum keys, a step
    per width, AdamW decaying every trained tensor, no group regularization; its header's probe command parses.
    Then 2 steps (the second with 3 widths, an optimizer step each) on a tiny input-slimmed ViT at 48 px through
    the kNN monitor, which serves the 32 px images upsampled to the ViT's size (loader=device, on the CPU)."""
    import functools
    from dataclasses import replace

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import eval_linear
    import knn
    from models import ViT

    path = REPO / "yaml" / "vit_tiny_cifar10_release.yaml"
    cfg = parse_config(Config, ["--config", str(path)])
    check_config(cfg)
    with torch.device("meta"):
        net = ARCHS[cfg.arch]()
    assert (cfg.arch, net.img_size, net.slim, net.feature_dim, cfg.image_size) == ("vit_tiny_us3l", 224, "input", 192, 224)
    assert (cfg.dataset, cfg.aug, cfg.min_scale, cfg.loader) == ("cifar10", "byol", 0.08, "device")
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers, cfg.proj_last_bn, cfg.predictor, cfg.aux_head) == \
        (2048, 256, 3, True, True, True)
    assert (cfg.base_loss, cfg.distill_loss, cfg.infonce_negatives, cfg.temperature, cfg.loss_views) == \
        ("infonce", "infonce", "other_view", 0.2, "sum")
    assert (cfg.momentum_target_base, cfg.momentum_target_sub, cfg.momentum, cfg.momentum_cosine) == (True, True, 0.99, True)
    assert (cfg.width_min, cfg.num_widths, cfg.sandwich, cfg.dynamic_sampling, cfg.step_per_width) == \
        (0.25, 3, True, True, True)
    assert (cfg.optimizer, cfg.weight_decay, cfg.group_reg_alpha, cfg.group_reg_form) == ("adamw", 0.1, 0.0, "release")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.batch_size * 8) == (300, 40, 512)  # 8 GPUs, as run_ofa.sh
    assert cfg.base_lr * cfg.batch_size * 8 / 256 == pytest.approx(3e-4)
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "python eval_linear.py" in line)
    probe = " ".join(lines[start:start + 2]).replace("#", " ").replace("\\", " ").split("eval_linear.py")[1].split()
    probe = parse_config(eval_linear.Config, probe)
    assert (probe.mode, probe.head_bn, probe.nesterov, probe.epochs, probe.base_lr, probe.batch_size) == \
        ("augment", False, False, 90, 0.1, 256)
    assert (probe.probe_aug, probe.lr_schedule, probe.weight_decay, probe.momentum, probe.widths) == \
        ("default", "cosine", 0.0, 0.9, [1.0, 0.75, 0.5, 0.25])

    monkeypatch.setitem(ARCHS, "vit_release_test", functools.partial(
        ViT, 64, 1, 2, img_size=48, patch_size=16, pos_embed="sincos", frozen_patch_embed=True, init="mocov3",
        slim="input"))
    built, real_build = [], train_us3l.build_knn_loaders

    def build(*args, **kw):
        built.append((kw["image_size"], real_build(*args, **kw)))
        return built[-1][1]

    monkeypatch.setattr(train_us3l, "build_knn_loaders", build)
    tiny = {"data_path": str(image_folder), "out_dir": str(tmp_path), "max_steps": 2, "batch_size": 8, "image_size": 48,
            "arch": "vit_release_test", "precision": "no", "log_every": 1, "proj_hidden": 32, "proj_dim": 16,
            "knn_bank_subset": 20, "knn_test_subset": 10, "knn_batch_size": 20, "knn_k": 5, "num_workers": 0,
            "warmup_epochs": 0, "base_lr": 1e-2}
    steps = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kw: steps.append(1))
    try:
        results = train_us3l.main(replace(cfg, **tiny))
    finally:
        handle.remove()
    assert set(results["knn_top1"]) == set(results["knn_top1_init"]) == {"1.0", "0.25"}
    (size, loaders), = built
    assert size == 48 and all(isinstance(ld, knn.Upsampled) for ld in loaders)
    assert next(iter(loaders[0]))[0].shape == (20, 3, 48, 48)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [len(r["widths"]) for r in log] == [1, 3] and len(steps) == 4  # an optimizer step per width
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k.startswith("loss/"))
