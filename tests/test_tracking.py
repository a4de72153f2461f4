"""Trackers (config key `tracker` of every script): TensorBoard files of tiny real runs (the shared
runs of conftest.py, evaluations) hold the log.jsonl records, the kNN monitor per width or DN and
the evaluations' per-network results; the config is flattened for hyper-parameter logging; W&B (a
stand-in package here: the real one is optional and needs an account) gets out_dir, and a resumed
run continues its run id; a tracker that cannot run is a one-line error before anything starts.
Also: where evaluations write by default (beside the checkpoint, one folder per protocol)."""

import json
import shutil
import sys
from dataclasses import replace

import pytest
import torch

import eval_knn
import eval_linear
import train_dspnet
import train_us3l
import yaml
from config import ConfigError, parse_config
from models import ARCHS
from tests.test_dspnet import tiny_args as dspnet_args
from tests.test_train_us3l import REPO, cli, read_log, run
from tests.test_train_us3l import tiny_args as us3l_args
from utils import check_tracker, tracker_config

FAST_KNN = ["--bank_subset=60", "--test_subset=30", "--calib_images=40", "--batch_size=20", "--k=5,20"]


def scalars(folder):
    """{tag: [(step, value), ...]} of the TensorBoard event files in `folder` (not its subfolders)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_config_flattened_for_hparams(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    cfg = parse_config(train_dspnet.Config, ["--config", str(REPO / "yaml" / "resnet_dn9_in.yaml")])
    flat = tracker_config(cfg)
    assert set(flat) == set(vars(cfg)) and all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert json.loads(flat["dns"]) == cfg.dns and flat["arch"] == "resnet34_w96" and flat["base_lr"] == 0.2
    assert tracker_config(eval_knn.Config())["depth"] == "null"
    with SummaryWriter(tmp_path) as w:  # what failed at start with the raw config (a list of lists)
        w.add_hparams(flat, metric_dict={})


def test_unusable_tracker_is_one_line_before_anything(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"tracker='mlflow', allowed: tensorboard, wandb, or empty"):
        check_tracker("mlflow")
    check_tracker("")
    check_tracker("tensorboard")  # in requirements.txt
    monkeypatch.setattr("accelerate.utils.is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="tracker=tensorboard needs the tensorboard package.*requirements.txt"):
        train_us3l.check_config(replace(train_us3l.Config(), tracker="tensorboard"))
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match="tracker=wandb needs the wandb package, which is optional.*pip install wandb"):
        eval_knn.main(replace(eval_knn.Config(), arch="resnet18_cifar", tracker="wandb"))
    with pytest.raises(ConfigError, match="pip install wandb"):
        eval_linear.main(replace(eval_linear.Config(), tracker="wandb", out_dir=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_missing_stops_a_trainer_in_one_line(image_folder, tmp_path, monkeypatch, capsys):
    code = cli(train_dspnet.main, train_dspnet.Config, [*dspnet_args(image_folder, tmp_path / "o"), "--tracker=wandb"],
               monkeypatch)  # in this process; the exit code is the one line a failed run prints
    assert code == ("config error: tracker=wandb needs the wandb package, which is optional and not installed: pip "
                    "install wandb (then `wandb login`, or WANDB_MODE=offline to log without an account)")
    assert capsys.readouterr().err == ""  # nothing else, no traceback
    assert not (tmp_path / "o").exists()  # nothing ran


def test_tensorboard_us3l_run(us3l_run, tmp_path, capsys, fresh_accelerate):
    """The shared run (8 steps, logged every 2): every log.jsonl record and the kNN monitor (random
    init at step 0, eval_every's at step 4, the end at step 8) per monitored width, under out_dir/us3l/."""
    out = tmp_path / "run"
    shutil.copytree(us3l_run.out, out)  # a copy: the resume below changes it
    res = json.loads((out / "results.json").read_text())
    tb = scalars(out / "us3l")
    for w in ("1.0", "0.25"):  # the monitored widths: 1.0 and width_min
        assert tb[f"knn_top1/{w}"] == [(0, pytest.approx(res["knn_top1_init"][w])),
                                       (4, pytest.approx(res["knn_top1_history"]["4"][w])),
                                       (8, pytest.approx(res["knn_top1"][w]))]
        assert tb[f"collapse_std_end/{w}"] == [(8, pytest.approx(res["collapse_std"][w]))]
    log = read_log(out)
    for key in ("loss/1.0", "lr", "tau", "img_per_s", "data_wait", "epoch", "collapse_std/1.000"):
        assert [s for s, _ in tb[key]] == [r["step"] for r in log] == [2, 4, 6, 8], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in log], rel=1e-6), key
    assert "widths/0" in tb and "step" not in tb
    hparams = list((out / "us3l").rglob("hparams.yml"))
    assert hparams and yaml.safe_load(hparams[0].read_text())["tracker"] == "tensorboard"

    # as if killed after logging step 8 but before checkpointing it: the resumed run logs step 8
    # again, and TensorBoard keeps only the new records (purge_step), not both
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**ckpt, "step": 6}, out / "checkpoints" / "last.pt")
    train_us3l.main(replace(us3l_run.cfg, out_dir=str(out)))  # in this process
    assert "at step 6" in capsys.readouterr().out
    tb = scalars(out / "us3l")
    assert [s for s, _ in tb["loss/1.0"]] == [2, 4, 6, 8] and [s for s, _ in tb["knn_top1/1.0"]] == [0, 4, 8]
    assert [r["step"] for r in read_log(out)] == [2, 4, 6, 8]


def test_tensorboard_dspnet_run(dspnet_run):
    """DSPNet's config holds a list (dns): it used to stop the run at start."""
    tb = scalars(dspnet_run.out / "dspnet")
    assert [s for s, _ in tb["knn_top1/1.0"]] == [s for s, _ in tb["knn_top1/0.25_d1-1-1-1"]] == [0, 4, 8]
    assert [s for s, _ in tb["loss/1.0"]] == [2, 4, 6, 8] and "lr" in tb and "tau" in tb and "bn_momentum" in tb
    hparams = yaml.safe_load(next((dspnet_run.out / "dspnet").rglob("hparams.yml")).read_text())
    assert json.loads(hparams["dns"]) == [[1.0], [0.5], [0.5, 1, 1, 1, 1], [0.25, 1, 1, 1, 1]]


FAKE_WANDB = '''
"""A stand-in for wandb: records what Accelerate's tracker asks of it in $FAKE_WANDB_LOG."""
import json, os


def _note(**rec):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(rec) + "\\n")


class _Config:
    def update(self, values, allow_val_change=False):
        _note(call="config", values=values)


class _Run:
    def __init__(self, id):
        self.id = id

    def log(self, values, step=None):
        _note(call="log", values=values, step=step)

    def finish(self):
        _note(call="finish")


config = _Config()


def init(project=None, **kwargs):
    _note(call="init", project=project, **kwargs)
    return _Run(kwargs.get("id") or "fakerun1")
'''


def test_wandb_run_continues_on_resume(image_folder, tmp_path):
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    (site / "wandb-0.0.0.dist-info").mkdir()  # Accelerate checks the package's metadata too
    (site / "wandb-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    out, notes = tmp_path / "run", tmp_path / "wandb.jsonl"
    env = {"PYTHONPATH": str(site), "FAKE_WANDB_LOG": str(notes)}

    def calls(kind):
        return [r for r in map(json.loads, notes.read_text().splitlines()) if r["call"] == kind]

    p = run([sys.executable, "train_us3l.py", *us3l_args(image_folder, out, max_steps=2, log_every=1),
             "--tracker=wandb"], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    (init,) = calls("init")
    assert init == {"call": "init", "project": "us3l", "dir": str(out), "id": None, "resume": "allow",
                    "name": str(out)}
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["wandb_id"] == "fakerun1"
    assert json.loads((out / "results.json").read_text())["wandb_id"] == "fakerun1"
    logged = {(k, r["step"]) for r in calls("log") for k in r["values"]}
    assert {("knn_top1/1.0", 0), ("knn_top1/0.25", 2), ("loss/1.0", 1), ("lr", 2), ("data_wait", 2)} <= logged
    assert all(isinstance(v, (bool, int, float, str)) for v in calls("config")[0]["values"].values())

    p = run([sys.executable, "train_us3l.py", *us3l_args(image_folder, out, max_steps=4, log_every=1),
             "--tracker=wandb", "--allow_changed=max_steps"], env=env)  # the same run, longer: resumes from step 2
    assert p.returncode == 0 and "at step 2" in p.stdout, p.stderr[-3000:]
    assert [c["id"] for c in calls("init")] == [None, "fakerun1"] and len(calls("finish")) == 2
    assert {r["step"] for r in calls("log")[-4:]} >= {3, 4}


# --- where evaluations write by default --------------------------------------------------------


def test_default_out_dirs():
    knn = eval_knn.Config(ckpt="out/a/backbone.pt")
    assert eval_knn.default_out_dir(knn, "knn") == "out/a/knn"
    assert eval_knn.default_out_dir(replace(knn, teacher=True), "knn") == "out/a/knn_teacher"
    assert eval_knn.default_out_dir(eval_knn.Config(arch="resnet50"), "knn") == "out/random_init/resnet50/knn"
    assert eval_knn.default_out_dir(eval_knn.Config(arch="resnet50", seed=3), "knn").endswith("resnet50/knn_seed3")
    lin = eval_linear.Config(ckpt="backbone.pt")
    kinds = {eval_linear.linear_kind(replace(lin, **kw)) for kw in (
        {}, {"label_fraction": 0.01}, {"label_fraction": 0.1}, {"label_list": "lists/1percent.txt"},
        {"mode": "augment"}, {"label_fraction": 0.01, "mode": "augment"})}
    assert kinds == {"linear", "linear_1pct", "linear_10pct", "linear_list_1percent", "linear_augment",
                     "linear_1pct_augment"}  # each protocol its own folder
    assert eval_knn.default_out_dir(lin, "linear_1pct") == "./linear_1pct"


def test_evaluations_write_beside_the_checkpoint_and_log(image_folder, tmp_path, monkeypatch, one_thread):
    ckpt = tmp_path / "run" / "backbone.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(1)
    sd = ARCHS["resnet18_cifar_tiny"]().state_dict()
    torch.save({"arch": "resnet18_cifar_tiny", "backbone": sd, "teacher": sd, "widths": [1.0, 0.5], "width_min": 0.5,
                "step": 7, "config": {"dataset": "cifar10"}}, ckpt)
    args = [f"--ckpt={ckpt}", f"--data_path={image_folder}", "--tracker=tensorboard", *FAST_KNN]
    res = eval_knn.main(parse_config(eval_knn.Config, args))
    out = tmp_path / "run" / "knn"
    assert json.loads((out / "results.json").read_text()) == res
    assert yaml.safe_load((out / "config.yaml").read_text())["out_dir"] == str(out)  # rerunnable as is
    tb = scalars(out / "eval_knn")
    for name in ("1.0", "0.5"):
        assert tb[f"knn/top1/{name}"] == [(7, pytest.approx(res[name]["top1"]))]  # at the checkpoint's step
        assert tb[f"knn/top5/{name}"] == [(7, pytest.approx(res[name]["top5"]))]
        assert tb[f"knn/mmacs/{name}"] == [(7, pytest.approx(res[name]["macs"] / 1e6))]
    eval_knn.main(parse_config(eval_knn.Config, [*args[:2], "--teacher", *FAST_KNN]))
    assert (tmp_path / "run" / "knn_teacher" / "results.json").is_file()

    monkeypatch.chdir(tmp_path)  # a random init writes under out/ of the current directory
    cfg = eval_linear.Config(arch="resnet18_cifar_tiny", data_path=str(image_folder), widths=[1.0, 0.25], epochs=2,
                             batch_size=25, calib_images=50, test_subset=30, train_subset=100, label_fraction=0.5,
                             tracker="tensorboard")
    res = eval_linear.main(cfg)
    out = tmp_path / "out" / "random_init" / "resnet18_cifar_tiny" / "linear_50pct"
    assert json.loads((out / "results.json").read_text()).keys() == res.keys() == {"1.0", "0.25"}
    tb = scalars(out / "eval_linear")
    assert tb["linear/top1/0.25"] == [(0, pytest.approx(res["0.25"]["top1"]))] and "linear/mmacs/1.0" in tb
