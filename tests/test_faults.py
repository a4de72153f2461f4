"""Faults (docs/design.md, Run folder, checkpoints and logs): SIGKILL at random points then the
same command, a checkpoint never read half-written, a NaN injected into one process, bad images
and bad config: each ends with a clear message and nothing lost. The trainers run the tiny ResNet-18
on 16 px images: none of these properties depends on the network's size."""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import eval_knn
import eval_linear
import ffcv_data
import train_dspnet
import train_us3l
from accelerate.state import AcceleratorState
from models import ARCHS
from tests.test_dspnet import tiny_args as dspnet_args
from tests.test_multiprocess import free_port, thread_env
from tests.test_train_us3l import REPO, cli, run
from tests.test_train_us3l import tiny_args as us3l_args

TRAINERS = {"train_us3l.py": us3l_args, "train_dspnet.py": dspnet_args}
TINY = {"arch": "resnet18_cifar_tiny", "image_size": 16, "batch_size": 16}


def steps_logged(out):
    steps = []
    for line in (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return steps


# --- kill and resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("script", TRAINERS)
def test_killed_at_random_points_resumes_exactly(script, image_folder, tmp_path):
    """SIGKILL three times at random moments (a checkpoint is written every step, so some kills land
    mid-write), then the same command finishes: weights, kNN and log equal an uninterrupted run's.
    Every run has the same thread count: runs that differ in it need not agree bit for bit."""
    # a checkpoint every step: by step count for DSPNet (with momentum-BN target statistics, which must
    # survive too), by the minutes-based cadence (0 minutes: every step) for US3L
    extra = {"momentum_bn": "true", "save_every": 1} if script == "train_dspnet.py" else {"save_every_min": 0}
    args = lambda out, **kw: TRAINERS[script](image_folder, out, **TINY, **kw, max_steps=8, log_every=1)  # noqa: E731
    ref, out, threads = tmp_path / "ref", tmp_path / "killed", thread_env()
    p = run([sys.executable, script, *args(ref)], env=threads)  # the reference saves at the end only
    assert p.returncode == 0, p.stderr[-3000:]
    # a step's time, checkpoint included (log_every=1): each kill lands within a step of a logged one
    step_s = statistics.median(TINY["batch_size"] / json.loads(line)["img_per_s"]
                               for line in (ref / "log.jsonl").open())
    cmd = [sys.executable, script, *args(out, **extra)]
    rng, kills = random.Random(0), 0
    for _ in range(3):
        before = len(steps_logged(out))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **threads})
        deadline = time.time() + 300
        while proc.poll() is None and len(steps_logged(out)) <= before and time.time() < deadline:
            time.sleep(0.01)  # until this attempt has trained a step past what was logged
        time.sleep(rng.uniform(0.0, step_s))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        ckpt = out / "checkpoints" / "last.pt"
        if ckpt.exists():  # whatever the moment of the kill, the checkpoint on disk is a whole one
            assert torch.load(ckpt, weights_only=True)["step"] >= 1
    assert kills >= 2, "the run finished before it could be killed"
    p = run(cmd, env=threads)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    a, b = (torch.load(d / "backbone.pt", weights_only=True) for d in (ref, out))
    for key in ("backbone", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    res_a, res_b = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert res_a["knn_top1"] == res_b["knn_top1"]
    assert steps_logged(out) == steps_logged(ref) == list(range(1, 9))  # no step twice, none missing
    assert not list((out / "checkpoints").glob("*.tmp"))  # a killed write's temp file is cleaned up


CHILD = textwrap.dedent("""
    import sys, torch
    from utils import atomic_save
    for i in range(10_000):
        atomic_save({"i": i, "w": torch.full((2_000_000,), float(i))}, sys.argv[1])  # 8 MB
        print(i, flush=True)
""")


def writing(folder):
    """Whether a save of last.pt is under way: a temp file with some bytes in it (renamed at any moment)."""
    for f in folder.glob(".last.pt.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if f.stat().st_size:
                return True
    return False


def test_checkpoint_never_read_half_written(tmp_path):
    """SIGKILL a process that saves an 8 MB checkpoint over and over, at a random moment once its temp
    file is being written: the kill lands mid-write (the temp file stays behind: utils._atomic_write's
    .last.pt.*.tmp) and the file on disk is still a whole checkpoint, the last save reported or the next."""
    path, script = tmp_path / "last.pt", tmp_path / "child.py"
    script.write_text(CHILD)
    rng, mid_write = random.Random(0), 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", **thread_env()})
        saved = [int(proc.stdout.readline())]  # one save done, which also removed a killed writer's temp file
        time.sleep(rng.uniform(0.0, 0.05))
        deadline = time.time() + 60
        while not writing(tmp_path) and time.time() < deadline:
            time.sleep(0.001)  # until a save has written part of its temp file
        proc.send_signal(signal.SIGKILL)
        saved += [int(i) for i in proc.stdout.read().split()]
        proc.wait()
        mid_write += bool(list(tmp_path.glob(".last.pt.*.tmp")))
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["i"] in (saved[-1], saved[-1] + 1)  # the next save may have been renamed, not reported
        assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["i"])))
    assert mid_write >= 1, "no kill landed mid-write"


# --- non-finite loss -------------------------------------------------------------------------------

POISON = textwrap.dedent("""
    import os, sys
    import {module} as trainer
    from config import run

    step_fn, calls = trainer.{fn}, [0]

    def poisoned(model, target, x, *args, **kw):  # rank 1's 5th step sees NaN images: NaN loss and weights
        calls[0] += 1
        if calls[0] == 5 and os.environ.get("RANK") == "1":
            x = x * float("nan")
        return step_fn(model, target, x, *args, **kw)

    trainer.{fn} = poisoned
    run(trainer.main, trainer.Config)
""")


@pytest.mark.parametrize("script,fn", [("train_us3l.py", "forward_backward"), ("train_dspnet.py", "train_step")])
def test_nan_in_one_process_stops_all_and_keeps_the_last_good_checkpoint(script, fn, image_folder, tmp_path):
    wrapper, out = tmp_path / "poisoned.py", tmp_path / "run"
    wrapper.write_text(POISON.format(module=script[:-3], fn=fn))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(wrapper),
           *TRAINERS[script](image_folder, out, **{**TINY, "batch_size": 8}, log_every=2, save_every=2,
                             max_steps=8)]
    p = run(cmd, env={"ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), **thread_env(2)})
    out_text = p.stdout + p.stderr
    assert p.returncode != 0
    assert "terminate called" not in out_text and "SIGABRT" not in out_text, out_text[-3000:]
    msgs = re.findall(r"FloatingPointError: non-finite loss at step 6: .*loss/1\.0=nan", out_text)
    assert len(msgs) == 2, out_text[-3000:]  # both processes, the same step and per-width losses
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4  # the last good one, untouched by the diverged steps 5 and 6
    for part in ckpt.values():
        if isinstance(part, dict) and all(isinstance(t, torch.Tensor) for t in part.values()):
            assert all(torch.isfinite(t).all() for t in part.values() if t.is_floating_point())
    assert not (out / "backbone.pt").exists()
    assert steps_logged(out) == [2, 4]


# --- bad images ------------------------------------------------------------------------------------

def bad_folder(image_folder, root):
    """The train split of image_folder plus every kind of bad input; test/ as it is."""
    shutil.copytree(image_folder, root)
    train = root / "train"
    rgb = next((train / "cat").glob("*.jpg")).read_bytes()
    (train / "cat" / "truncated.jpg").write_bytes(rgb[: len(rgb) // 2])
    (train / "dog" / "not_an_image.jpg").write_text("<html>404</html>")
    (train / "dog" / "notes.txt").write_text("a stray file")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(train / "frog" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)).save(train / "frog" / "rgba.png")
    return root


def test_bad_images_fail_or_skip(image_folder, tmp_path, monkeypatch):
    root = bad_folder(image_folder, tmp_path / "bad")
    ds = data.build_dataset(root, "train")  # fail (the default)
    names = [p.split("/")[-1] for p, _ in ds.base.samples]
    assert "notes.txt" not in names and len(ds) == 200 + 4
    for name in ("gray.png", "rgba.png"):  # converted, not refused
        img, _ = ds[names.index(name)]
        assert img.mode == "RGB" and img.size == (32, 32)
    for name in ("truncated.jpg", "not_an_image.jpg"):
        with pytest.raises(data.BadImageError, match=f"unreadable image .*{name}.*bad_images=skip"):
            ds[names.index(name)]
    monkeypatch.setattr(data, "BAD_IMAGES", "skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.build_dataset(root, "train")
        labels = [ds[i][1] for i in range(len(ds))]
    said = [str(w.message) for w in caught]
    assert any("ignored 1 file(s) without an image extension" in m and "notes.txt" in m for m in said)
    skipped = [m for m in said if m.startswith("bad_images=skip: skipped unreadable image")]
    assert len(skipped) == 2 and "2 skipped so far" in skipped[-1]
    i = names.index("truncated.jpg")  # stands in: the next readable image, with its own label
    assert labels[i] == ds.labels[i + 1]


def test_empty_class_folder(image_folder, tmp_path, monkeypatch):
    root = tmp_path / "empty"
    shutil.copytree(image_folder, root)
    for f in (root / "train" / "ship").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="ship.*bad_images=skip"):
        data.build_dataset(root, "train")
    monkeypatch.setattr(data, "BAD_IMAGES", "skip")
    with pytest.warns(UserWarning, match=r"1 empty class folder\(s\).*ship"):
        ds = data.build_dataset(root, "train")
    assert ds.num_classes == 10 and len(ds) == 180  # labels keep their indices: train and test agree


def test_trainer_on_bad_images(image_folder, tmp_path):
    root = bad_folder(image_folder, tmp_path / "bad")
    args = us3l_args(root, tmp_path / "o", **{**TINY, "batch_size": 102}, max_steps=2)  # 204 images: all read
    p = run([sys.executable, "train_us3l.py", *args], env=thread_env())
    assert p.returncode == 1 and "BadImageError: unreadable image" in p.stderr, p.stderr[-3000:]
    assert "not_an_image.jpg" in p.stderr or "truncated.jpg" in p.stderr
    p = run([sys.executable, "train_us3l.py", *args, "--bad_images=skip"], env=thread_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped unreadable image" in p.stderr and "2 skipped so far" in p.stderr


def test_write_beton_on_bad_images(image_folder, tmp_path, monkeypatch):
    """FFCV's writer processes hang when one raises: the bad image must still end the write, named."""
    root = bad_folder(image_folder, tmp_path / "bad")
    with pytest.raises(data.BadImageError, match=r"2 image\(s\) .* could not be written; the first: .*\.jpg"):
        ffcv_data.write_beton(root, tmp_path / "b", splits=["train"], raw=True, num_workers=1)
    assert not list((tmp_path / "b").iterdir())  # no partial .beton
    monkeypatch.setattr(data, "BAD_IMAGES", "skip")
    path = ffcv_data.write_beton(root, tmp_path / "b", splits=["train"], raw=True, num_workers=1)["train"]
    assert len(ffcv_data.beton_labels(path)) == 204


def test_decompression_bomb_follows_the_policy(tmp_path, monkeypatch):
    """An image of more than twice Image.MAX_IMAGE_PIXELS makes PIL raise DecompressionBombError,
    an Exception but not an OSError: like any image that does not decode it follows bad_images, in
    the datasets and in the FFCV writer (a tiny image and a lowered limit stand in for a huge one)."""
    root = tmp_path / "bomb"
    for split in ("train", "test"):
        for c, color in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            (root / split / c).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (8, 8), color).save(root / split / c / f"{k}.png")
    Image.new("RGB", (64, 64)).save(root / "train" / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000; 8 x 8 is far below
    ds = data.build_dataset(root, "train")
    big = [p.split("/")[-1] for p, _ in ds.base.samples].index("big.png")
    with pytest.raises(data.BadImageError, match=r"unreadable image .*big\.png \(DecompressionBombError: .*bad_images=skip"):
        ds[big]
    monkeypatch.setattr(data, "BAD_IMAGES", "skip")
    ds = data.build_dataset(root, "train")
    with pytest.warns(UserWarning, match=r"skipped unreadable image .*big\.png \(DecompressionBombError"):
        img, y = ds[big]
    assert img.size == (8, 8) and y == ds.labels[big + 1] == 1  # the next readable image, b/0.png

    pytest.importorskip("ffcv")
    path = ffcv_data.write_beton(root, tmp_path / "b", splits=["train"], raw=True, num_workers=1)["train"]
    assert len(ffcv_data.beton_labels(path)) == 5
    monkeypatch.setattr(data, "BAD_IMAGES", "fail")
    with pytest.raises(data.BadImageError, match=r"1 image\(s\) .* could not be written; the first: .*big\.png"):
        ffcv_data.write_beton(root, tmp_path / "c", splits=["train"], raw=True, num_workers=1)


# --- bad config and arguments: one line naming the key and what is allowed -------------------------

SCRIPTS = {"train_us3l.py": train_us3l, "train_dspnet.py": train_dspnet, "eval_knn.py": eval_knn,
           "eval_linear.py": eval_linear}


def fake_checkpoint(path, arch):
    torch.save({"student": {}, "step": 3, "config": {"arch": arch}}, path)
    return path


def script_args(script, image_folder, tmp_path, args):
    """The command line of a bad-config case: a small run of `script` on resnet18_cifar (the minimum
    widths named are that arch's) with `args`; the checkpoints that args name under {tmp}."""
    if "{tmp}/r50.pt" in args[0]:
        fake_checkpoint(tmp_path / "r50.pt", "resnet50")
    if "{tmp}/junk.pt" in args[0]:
        (tmp_path / "junk.pt").write_text("not a checkpoint")
    if "{tmp}/ck.pt" in args[0]:
        torch.save({"arch": "resnet18_cifar_tiny", "backbone": ARCHS["resnet18_cifar_tiny"]().state_dict(),
                    "width_min": 0.5}, tmp_path / "ck.pt")
    base = (TRAINERS[script](image_folder, tmp_path / "o", arch="resnet18_cifar") if script in TRAINERS
            else [f"--data_path={image_folder}", f"--out_dir={tmp_path / 'o'}"])
    return [*base, *(a.replace("{tmp}", str(tmp_path)) for a in args)]


@pytest.mark.parametrize("script,args,message", [
    ("train_us3l.py", ["--width_min=1.5"], "config error: width_min=1.5 must be in (0, 1]"),
    ("train_us3l.py", ["--num_widths=1"], "config error: num_widths=1: the sandwich needs >= 2"),
    ("train_us3l.py", ["--width_min=0.01"], "width_min=0.01 is below resnet18_cifar's minimum width 0.01562"),
    ("train_dspnet.py", ["--dns=[[1.0],[0.01]]"], "width 0.01 is below resnet18_cifar's minimum width 0.01562"),
    ("train_us3l.py", ["--batch_size=300"], "config error: batch_size=300 x 1 process(es) exceeds the 200 training"),
    ("train_us3l.py", ["--resume={tmp}/nope.pt"], "config error: resume={tmp}/nope.pt: no such checkpoint"),
    ("train_us3l.py", ["--resume={tmp}/r50.pt"], "another arch (arch='resnet50' there, 'resnet18_cifar' here)"),
    ("train_dspnet.py", ["--dns=[[1.0],[0.5,1,1]]"], "config error: dns entry [0.5, 1.0, 1.0] does not fit"),
    ("train_dspnet.py", ["--dns=[[1.0,1,1,1,1],[0.5]]"], "config error: dns must include the whole network, [1.0] or "
                                                         "[1.0, 2, 2, 2, 2]"),
    ("eval_knn.py", ["--ckpt={tmp}/ck.pt", "--widths=1.0,0.2"], "widths [0.2] lie below 0.5, the smallest width"),
    ("eval_knn.py", ["--arch=resnet18_cifar", "--depth=[1,1]"], "config error: depth=[1, 1]: depth must list 4"),
    ("eval_knn.py", ["--arch=resnet18_cifar", "--widths=1.0,0.01"], "widths [0.01] lie below resnet18_cifar's minimum"),
    ("eval_linear.py", ["--ckpt={tmp}/missing.pt"], "config error: checkpoint not found"),
    ("eval_knn.py", ["--ckpt={tmp}"], "is a folder: pass the backbone.pt in it"),
    ("eval_linear.py", ["--widths=1.0"], "config error: give --ckpt, or --arch"),  # no silent default network
    ("eval_knn.py", ["--ckpt={tmp}/junk.pt"], "is not a checkpoint this code can read (UnpicklingError"),
    ("eval_linear.py", ["--arch=resnet18_cifar", "--mode=full"], "config error: mode='full', allowed: cached, augment"),
])
def test_config_errors_are_one_line(script, args, message, image_folder, tmp_path, monkeypatch, capsys):
    """In this process, as the command line runs it (config.run reads sys.argv): the script exits with
    one line naming the problem (Python prints it, exit code 1), no traceback."""
    module = SCRIPTS[script]
    monkeypatch.setattr(sys, "argv", [script, *script_args(script, image_folder, tmp_path, args)])
    monkeypatch.setattr(data, "BAD_IMAGES", data.BAD_IMAGES)  # main sets it from the config
    try:
        with pytest.raises(SystemExit) as exit_:
            config.run(module.main, module.Config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next Accelerator may want another precision
    said, err = exit_.value.code, capsys.readouterr().err
    assert isinstance(said, str) and "Traceback" not in err, err[-3000:]  # else: exit code 1 after a traceback
    assert "\n" not in said and message.replace("{tmp}", str(tmp_path)) in said, said


def test_config_error_on_the_command_line(image_folder, tmp_path):
    """One case of the above as a real process: exit code 1, the one line last on stderr, no traceback,
    after an Accelerator, the data and the resume have been set up."""
    args = script_args("train_us3l.py", image_folder, tmp_path, ["--resume={tmp}/r50.pt"])
    p = run([sys.executable, "train_us3l.py", *args], env=thread_env())
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and lines, p.stderr[-3000:]
    assert "another arch (arch='resnet50' there, 'resnet18_cifar' here)" in lines[-1], p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


def no_test_split(image_folder, tmp_path):
    shutil.copytree(image_folder / "train", tmp_path / "notest" / "train")
    return tmp_path / "notest"


@pytest.mark.parametrize("case,args,message", [
    ("missing data", ["--data_path={tmp}/nowhere"], "error: "),
    ("no test split", ["--data_path={notest}"], "error: "),
    ("no .beton", ["--loader=ffcv", "--ffcv_path={tmp}/nobeton"], "error: loader=ffcv needs ffcv_path"),
    ("no FFCV", ["--loader=ffcv", "--ffcv_path={tmp}/nobeton"], "error: loader=ffcv needs FFCV, which is not installed"),
])
def test_user_errors_are_one_line(case, args, message, image_folder, tmp_path, monkeypatch, capsys):
    """Data a user got wrong ends in one line naming the problem (config.USER_ERRORS), exit code 1, no
    traceback; DEBUG=1 adds the traceback."""
    if case == "no FFCV":
        monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv now raises ImportError
    notest = no_test_split(image_folder, tmp_path) if case == "no test split" else None
    argv = us3l_args(image_folder, tmp_path / "o") + [a.format(tmp=tmp_path, notest=notest) for a in args]
    monkeypatch.setattr(sys, "argv", ["train_us3l.py", *argv])
    monkeypatch.setattr(data, "BAD_IMAGES", data.BAD_IMAGES)
    try:
        with pytest.raises(SystemExit) as exit_:
            config.run(train_us3l.main, train_us3l.Config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    said, err = exit_.value.code, capsys.readouterr().err
    assert isinstance(said, str) and said.startswith(message) and "\n" not in said, said
    assert "Traceback" not in err, err[-3000:]
    if case == "missing data":
        assert "nowhere" in said
        monkeypatch.setenv("DEBUG", "1")
        try:
            with pytest.raises(SystemExit):
                config.run(train_us3l.main, train_us3l.Config)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        assert "Traceback" in capsys.readouterr().err


def empty_data(case, root):
    """A data_path that holds no training image, and the start of its one-line error."""
    if case == "empty folder":
        root.mkdir()
        return f"error: data_path {root} is an empty folder. For CIFAR-10 run"
    (root / "train").mkdir(parents=True)
    if case == "train/ with a stray file":
        (root / "train" / "notes.txt").write_text("not an image")
    if case in ("empty train/", "train/ with a stray file"):
        return f"error: {root}/train holds no images and no class folders. For CIFAR-10 run"
    for name in ("cat", "dog"):  # class folders without images
        (root / "train" / name).mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return f"error: {root}/train holds no images: its 2 class folder(s) (cat, dog) are empty. For CIFAR-10 run"


@pytest.mark.parametrize("args", [[], ["--knn_monitor=false"], ["--bad_images=skip"]])
@pytest.mark.parametrize("case", ["empty folder", "empty train/", "train/ with a stray file", "empty class folders"])
def test_data_without_images_is_one_line(case, args, tmp_path, monkeypatch, capsys, fresh_accelerate):
    """data_path an existing folder with no training image: one line naming it (no traceback, not the kNN
    monitor's key nor bad_images=skip, which would not help), the same with the monitor off or bad_images=skip."""
    message = empty_data(case, tmp_path / "d")
    monkeypatch.setattr(data, "BAD_IMAGES", data.BAD_IMAGES)  # main sets it from the config
    said = cli(train_us3l.main, train_us3l.Config, us3l_args(tmp_path / "d", tmp_path / "o", **TINY) + args,
               monkeypatch)
    assert isinstance(said, str) and "\n" not in said and "Traceback" not in capsys.readouterr().err
    assert said.startswith(message), said


def test_default_data_path_empty_or_foreign(tmp_path, monkeypatch, capsys, fresh_accelerate):
    """The trainers' default data_path, data/cifar10 (relative to the current directory), made by hand: empty,
    CIFAR-10 is extracted into it; holding something else, one line naming it (config.USER_ERRORS)."""
    from tests.test_data import mini_cifar_tar

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIFAR10_TAR", str(mini_cifar_tar(tmp_path / "mini.tar.gz")))
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    argv = [f"--out_dir={tmp_path / 'o'}", "--arch=resnet18_cifar_tiny", "--num_workers=0", "--max_steps=1"]
    said = cli(train_us3l.main, train_us3l.Config, argv, monkeypatch)
    assert (tmp_path / "data" / "cifar10" / ".extracted").is_file()
    assert said.startswith("config error: batch_size=512 x 1 process(es) exceeds the 2 training images"), said
    fresh_accelerate()
    shutil.rmtree(tmp_path / "data" / "cifar10")
    (tmp_path / "data" / "cifar10").mkdir()
    (tmp_path / "data" / "cifar10" / "notes.txt").write_text("mine")
    said = cli(train_us3l.main, train_us3l.Config, argv, monkeypatch)
    assert said.startswith("error: data/cifar10 exists, holds no train/ folder and prepare_cifar10 did not make it")
    assert "\n" not in said and "Traceback" not in capsys.readouterr().err


def test_hf_dataset_not_cached_offline_is_one_line(tmp_path):
    """data_path=hf:NAME of a hub dataset that is not in the local cache, offline (HF_DATASETS_OFFLINE=1, an
    empty HF_HOME: no network touched): one line naming the dataset, the cache and how to fetch it or where
    to point data_path instead, exit code 1, no traceback."""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), **thread_env()}
    args = us3l_args("hf:nobody/no-such-dataset", tmp_path / "o", **TINY, max_steps=1)
    p = run([sys.executable, "train_us3l.py", *args], env=env)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1] == (
        f"error: HuggingFace dataset 'nobody/no-such-dataset' is not in the local cache ({tmp_path / 'hf'}/datasets) "
        "and cannot be fetched (offline: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set). Fetch it once where the hub "
        "is reachable, into the same cache (HF_HOME): python -c \"import datasets; datasets.load_dataset("
        "'nobody/no-such-dataset')\"; or point data_path to a local copy: hf:FOLDER (a save_to_disk folder, or a "
        "clone of the hub repository) or an image folder DIR"), lines[-1]


# --- one rank fails alone --------------------------------------------------------------------------

ALONE = textwrap.dedent("""
    import time
    from dataclasses import dataclass

    import torch
    from accelerate import Accelerator
    from config import run

    def main(cfg):
        accelerator = Accelerator()
        model = accelerator.prepare(torch.nn.Linear(4, 4))  # DDP: the group has a user, as in a trainer
        if accelerator.process_index == 1:
            time.sleep(1)  # rank 0 is in the all_reduce by now
            raise RuntimeError("rank 1 failed alone")
        torch.distributed.all_reduce(torch.ones(1))  # never joined: waits until the group's timeout
        print("rank 0 got past the collective", model)

    @dataclass
    class Config:
        pass

    run(main, Config)
""")


def test_a_rank_that_fails_alone_ends_the_launch_promptly(tmp_path, monkeypatch):
    """Rank 1 raises outside any collective while rank 0 waits in one: config.run exits rank 1 at once
    (os._exit, no collective teardown), the launcher stops rank 0, and the launch ends in seconds with
    rank 1's error and a nonzero code, not after the 30-minute collective timeout."""
    script = tmp_path / "alone.py"
    script.write_text(ALONE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script)]
    start = time.monotonic()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), **thread_env(2)}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    took, out_text = time.monotonic() - start, p.stdout + p.stderr
    assert p.returncode != 0, out_text[-3000:]
    assert "RuntimeError: rank 1 failed alone" in out_text, out_text[-3000:]
    assert "rank 0 got past the collective" not in out_text
    assert took < 60, f"{took:.0f} s"
