"""eval_linear.py: the head separates separable features, the backbone is never changed, label
fractions are class-balanced and reproducible, label lists parse (and name what they cannot match),
the recipes load, the lr schedules (cosine, step) reach every optimizer, the US3L release's probe
(recipe, transforms) runs, and the CLI writes results.json and the plot (1 and 2 processes)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import eval_linear
from config import ConfigError, parse_config
from data import MEAN_STD, build_dataset
from eval_linear import Config, accuracy, labeled_indices, read_label_list, train_head_cached
from models import BasicBlock, ResNet
from tests.test_eval_knn_cli import FeatureLog
from tests.test_multiprocess import free_port, thread_env, two_ranks

REPO = Path(__file__).resolve().parents[1]


def test_head_separable_features():
    """Separable classes, far from the origin and badly scaled: the standardizing head gets 100%."""
    g = torch.Generator().manual_seed(0)
    C, D = 10, 32
    y, y_test = torch.arange(500) % C, torch.arange(200) % C
    scale = torch.logspace(-2, 2, D)  # per-feature scales over 4 decades: the BN standardization handles them

    def feats(labels):
        return (F.one_hot(labels, D).float() + 0.1 * torch.randn(len(labels), D, generator=g)) * scale + 50.0

    x, x_test = feats(y), feats(y_test)
    head = train_head_cached(x, y, C, epochs=10, batch_size=64, base_lr=0.1)
    assert accuracy(head, x, y) == (1.0, 1.0)
    assert accuracy(head, x_test, y_test) == (1.0, 1.0)
    # deterministic: the same seed trains the same head (every rank trains it under N processes)
    again = train_head_cached(x, y, C, epochs=10, batch_size=64, base_lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    # BYOL's plain Linear head (head_bn=false): no standardization, so features of a sane scale
    plain = train_head_cached(x / scale - 50.0 / scale, y, C, epochs=10, batch_size=64, base_lr=0.2, bn=False)
    assert len(plain) == 1 and accuracy(plain, x_test / scale - 50.0 / scale, y_test) == (1.0, 1.0)


def tiny_cfg(data, out, **over):
    cfg = Config(data_path=str(data), out_dir=str(out), widths=[1.0, 0.5], epochs=3, batch_size=50,
                 calib_images=40, autocast=False)
    return replace(cfg, **over)


def tiny_resnet():
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], widths=(8, 16, 32, 64), stem="cifar")


def test_backbone_unchanged_and_guarded(image_folder, tmp_path, monkeypatch):
    model = tiny_resnet()
    params = {n: p.clone() for n, p in model.named_parameters()}
    res = eval_linear.main(tiny_cfg(image_folder, tmp_path / "a"), backbone=model)
    assert set(res) == {"1.0", "0.5"} and res["0.5"]["dim"] == 32
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())

    # the check at the end catches a backbone that changed during the evaluation
    real = eval_linear.train_head_cached

    def tampering(*args, **kw):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        return real(*args, **kw)

    monkeypatch.setattr(eval_linear, "train_head_cached", tampering)
    with pytest.raises(RuntimeError, match="changed the backbone"):
        eval_linear.main(tiny_cfg(image_folder, tmp_path / "b"), backbone=model)


def test_augment_mode_few_steps(image_folder, tmp_path):
    """Augment mode runs (1 epoch of 4 augmented batches here) and leaves the backbone be."""
    model = tiny_resnet()
    params = [p.clone() for p in model.parameters()]
    res = eval_linear.main(tiny_cfg(image_folder, tmp_path, mode="augment", epochs=1, widths=[0.5]), backbone=model)
    assert 0 <= res["0.5"]["top1"] <= res["0.5"]["top5"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_finetune_trains_each_subnetwork_and_reports_every_width(image_folder, tmp_path, monkeypatch, capsys):
    """finetune=true: each width fine-tunes its own copy of the sub-network (weights move, BN in train
    mode); the pretrained backbone stays as it was and results.json has the linear probe's shape for
    every width. By default BYOL's schedule: 20 epochs at 10% of the labels, 30 at 1%."""
    assert eval_linear.schedule(Config(finetune=True), 128_116, 1_281_167) == (20, 0.01)
    assert eval_linear.schedule(Config(finetune=True), 12_811, 1_281_167) == (30, 0.01)  # SimCLR's 1% list
    assert eval_linear.schedule(Config(), 100, 100) == (100, 0.1)
    assert eval_linear.schedule(Config(head_bn=False, epochs=80), 100, 100) == (80, 0.2)
    from slim import SlimBatchNorm2d

    model = tiny_resnet()
    params = [p.clone() for p in model.parameters()]
    tuned, bn_modes = {}, []
    real = eval_linear.finetune_network

    def spy(backbone, width, depth, *args, **kw):
        def hook(m, args):
            if isinstance(m, SlimBatchNorm2d):
                bn_modes.append(m.training)

        handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        try:
            net, head = real(backbone, width, depth, *args, **kw)
        finally:
            handle.remove()
        tuned[width] = [p.clone() for p in net.parameters()]
        return net, head

    monkeypatch.setattr(eval_linear, "finetune_network", spy)
    cfg = tiny_cfg(image_folder, tmp_path, finetune=True, label_fraction=0.1, epochs=2, batch_size=10, base_lr=0.5)
    assert eval_linear.linear_kind(cfg) == "finetune_10pct"
    res = eval_linear.main(cfg, backbone=model)
    out = capsys.readouterr().out
    assert "20 labeled training images (2-2 per class)" in out and "2 epochs, lr 0.0195312" in out
    assert list(res) == ["1.0", "0.5"] and json.loads((tmp_path / "results.json").read_text()).keys() == res.keys()
    for name, w in (("1.0", 1.0), ("0.5", 0.5)):
        r = res[name]
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["macs"] > 0 and r["params"] > 0 and r["width"] == w
        assert r["weight_change"] > 0 and r["seconds"]["finetune"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(tuned[w], params))  # the fine-tuned copy moved
    assert res["1.0"]["dim"] == 64 and res["0.5"]["dim"] == 32
    assert bn_modes and all(bn_modes)  # BN in train mode throughout the fine-tuning
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # the pretrained weights stay


class RandomImages(torch.utils.data.Dataset):  # (x, y, index) as build_dataset(..., return_index=True)
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g, dtype=torch.float64), i % 10, i

    def __len__(self):
        return 48


@pytest.fixture
def restore_threads():
    """For a test that sets this process's thread count: the tests after it get theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def finetune_in_fp64(rank=None):
    torch.set_num_threads(1)  # here and in both ranks: a thread count cannot change a sum's order
    cfg = Config(epochs=2, batch_size=24 if rank is None else 12, base_lr=0.5, autocast=False, dataset="cifar10")
    net, head = eval_linear.finetune_network(tiny_resnet().double(), 0.5, None, RandomImages(), 10,
                                             torch.device("cpu"), cfg)
    return [p.clone() for p in (*net.parameters(), *head.parameters())]


def test_finetune_two_processes_equal_one(tmp_path, restore_threads):
    """Fine-tuning under 2 processes (half the batch each, sync BN, averaged gradients) trains what
    one process trains, to fp64 rounding; every rank holds the same network."""
    ref, (a, b) = finetune_in_fp64(), two_ranks(finetune_in_fp64, tmp_path)
    init = list(tiny_resnet().double().parameters())
    assert max((p - q).abs().max().item() for p, q in zip(ref, init)) > 1e-4  # it trained
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert max((p - q).abs().max().item() for p, q in zip(ref, a)) < 1e-12


class Labels:  # labeled_indices needs only .labels and len()
    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)


def test_label_fraction_balanced_and_reproducible():
    ds = Labels(np.repeat(np.arange(10), 500))  # 5000 images, 500 per class, sorted by class
    cfg = Config(label_fraction=0.01)
    pool, lab = labeled_indices(ds, cfg)
    assert len(pool) == 5000 and len(lab) == 50
    assert np.bincount(ds.labels[lab]).tolist() == [5] * 10  # class-balanced
    assert np.array_equal(lab, labeled_indices(ds, cfg)[1])  # reproducible
    other = labeled_indices(ds, replace(cfg, seed=1))[1]
    assert not np.array_equal(lab, other) and np.bincount(ds.labels[other]).tolist() == [5] * 10
    # a fraction of a train subset stays inside the subset
    pool, lab = labeled_indices(ds, replace(cfg, label_fraction=0.1, train_subset=1000))
    assert len(pool) == 1000 and len(lab) == 100 and set(lab) <= set(pool)
    assert np.bincount(ds.labels[lab]).tolist() == [10] * 10
    with pytest.raises(ConfigError, match="label_fraction"):
        labeled_indices(ds, replace(cfg, label_fraction=1.5))


def test_label_list(image_folder, tmp_path):
    ds = build_dataset(image_folder, "train")
    root = Path(ds.base.root)
    rel = [Path(p).relative_to(root).as_posix() for p, _ in ds.base.samples]
    f = tmp_path / "list.txt"
    f.write_text(f"# a list\n{rel[3]}\n./{rel[40]}\n\n{rel[77]}\n12\n{rel[3]}\n")
    assert read_label_list(f, ds).tolist() == [3, 12, 40, 77]  # sorted, duplicates once
    f.write_text(f"{rel[0]}\nno_such_class/0001.jpg\n{len(ds)}\n")
    with pytest.raises(ValueError, match=r"2 of 3 lines.*no_such_class/0001.jpg"):
        read_label_list(f, ds)
    # CIFAR's file names repeat across class folders: a bare name is ambiguous, and said to be
    f.write_text(f"{Path(rel[0]).name}\n")
    with pytest.raises(ValueError, match="several class folders"):
        read_label_list(f, ds)
    # via the config: the labeled images are the listed ones, the pool is the whole train split
    f.write_text("0\n1\n2\n")
    pool, lab = labeled_indices(ds, Config(label_list=str(f)))
    assert lab.tolist() == [0, 1, 2] and len(pool) == len(ds)
    with pytest.raises(ConfigError, match="excludes"):
        labeled_indices(ds, Config(label_list=str(f), label_fraction=0.1))


def test_label_list_simclr_names(tmp_path):
    """SimCLR's ImageNet lists hold bare file names (n01440764_10026.JPEG), unique in the split."""
    from PIL import Image

    for wnid in ("n01440764", "n01443537"):
        for k in (10026, 10027):
            (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4)).save(tmp_path / "train" / wnid / f"{wnid}_{k}.JPEG", format="JPEG")
    ds = build_dataset(tmp_path, "train")
    f = tmp_path / "1percent.txt"
    f.write_text("n01440764_10027.JPEG\nn01443537_10026.JPEG\n")
    assert read_label_list(f, ds).tolist() == [1, 2]


@pytest.mark.parametrize("name", ["linear_cifar", "linear_in"])
def test_linear_recipe_loads(name):
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / f"{name}.yaml")])
    assert cfg.mode == "augment" and cfg.epochs == 100


def test_byol_recipes_load():
    """BYOL's linear protocol (DSPNet's) and DSPNet's 10% fine-tuning, as the recipes state them."""
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "linear_byol_in.yaml")])
    assert (cfg.mode, cfg.epochs, cfg.base_lr, cfg.weight_decay, cfg.head_bn, cfg.finetune) == ("augment", 80, 0.2, 0,
                                                                                                 False, False)
    head = eval_linear.make_head(512, 1000, cfg.head_bn)
    assert len(head) == 1 and isinstance(head[0], torch.nn.Linear)  # no BN in front
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "finetune_dspnet_in.yaml")])
    assert cfg.finetune and cfg.label_fraction == 0.1 and cfg.weight_decay == 0 and cfg.momentum == 0.9
    assert eval_linear.schedule(cfg, 128_116, 1_281_167) == (20, 0.01)
    assert eval_linear.linear_kind(cfg) == "finetune_10pct"


@contextlib.contextmanager
def recorded_lrs():
    """The lr of every optimizer step taken inside the block (first param group), in order."""
    lrs = type("Lrs", (list,), {})()  # a list; .nesterov: the optimizers' Nesterov flags
    lrs.nesterov = set()

    def hook(opt, args, kwargs):
        lrs.append(opt.param_groups[0]["lr"])
        lrs.nesterov.add(opt.param_groups[0]["nesterov"])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield lrs
    finally:
        handle.remove()


def test_lr_at_step_and_cosine():
    """lr_schedule=step as the release: 30 through epoch 59, 3 from epoch 60, 0.3 from epoch 80, constant
    within an epoch (any step of it); cosine, the default, from the peak to 0."""
    spe = 7  # steps per epoch

    def at(epoch, k=0):
        return eval_linear.lr_at(epoch * spe + k, spe, 100, 30.0, "step", [60, 80])

    assert at(0) == at(0, spe - 1) == at(59) == at(59, spe - 1) == 30.0
    assert at(60) == at(79) == at(79, spe - 1) == pytest.approx(3.0, rel=1e-12)
    assert at(80) == at(99, spe - 1) == pytest.approx(0.3, rel=1e-12)
    cos = [eval_linear.lr_at(k, spe, 100, 30.0) for k in (0, 350, 700)]
    assert cos == [30.0, pytest.approx(15.0), pytest.approx(0.0, abs=1e-12)]
    with pytest.raises(ValueError, match="linear"):
        eval_linear.lr_at(0, spe, 100, 30.0, "linear")


def test_step_schedule_reaches_cached_head_and_finetuning(restore_threads):
    """The lr each optimizer step used: the cached head and fine-tuning follow lr_schedule=step (the augment
    mode: test_us3l_recipe_runs), and the cached head's default is still the cosine."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 16, generator=g), torch.arange(128) % 4
    peak = 0.4 * 64 / 256  # 2 steps an epoch
    with recorded_lrs() as lrs:
        train_head_cached(x, y, 4, epochs=3, batch_size=64, base_lr=0.4, schedule="step", milestones=[1, 2])
    assert lrs == pytest.approx([peak, peak, peak / 10, peak / 10, peak / 100, peak / 100], rel=1e-12)
    with recorded_lrs() as lrs:
        train_head_cached(x, y, 4, epochs=3, batch_size=64, base_lr=0.4)
    assert lrs == pytest.approx([peak * 0.5 * (1 + np.cos(np.pi * k / 6)) for k in range(6)], rel=1e-12)

    cfg = Config(epochs=3, batch_size=24, base_lr=0.5, lr_schedule="step", lr_milestones=[1, 2], autocast=False,
                 dataset="cifar10")
    peak = 0.5 * 24 / 256  # 48 images: 2 steps an epoch
    torch.set_num_threads(1)
    with recorded_lrs() as lrs:
        eval_linear.finetune_network(tiny_resnet(), 0.5, None, RandomImages(), 10, torch.device("cpu"), cfg)
    assert lrs == pytest.approx([peak, peak, peak / 10, peak / 10, peak / 100, peak / 100], rel=1e-12)


@pytest.mark.parametrize("over, match", [
    ({"lr_schedule": "step"}, "lr_milestones is empty"),
    ({"lr_schedule": "step", "lr_milestones": [80, 60]}, r"lr_milestones=\[80, 60\]: must increase strictly"),
    ({"lr_schedule": "step", "lr_milestones": [60, 60]}, r"lr_milestones=\[60, 60\]: must increase strictly"),
    ({"lr_schedule": "step", "lr_milestones": [0, 60]}, r"lr_milestones=\[0, 60\]: .* in 1\.\.99"),
    ({"lr_schedule": "step", "lr_milestones": [60, 100]}, r"lr_milestones=\[60, 100\]: .* in 1\.\.99"),
    ({"lr_milestones": [60, 80]}, "lr_milestones=.* needs lr_schedule=step"),
    ({"probe_aug": "us3l"}, "probe_aug=us3l augments the training images: it needs mode=augment"),
    ({"probe_aug": "us3l", "mode": "augment", "loader": "ffcv"}, "probe_aug=us3l .* loader=ffcv"),
])
def test_bad_schedule_or_probe_is_a_config_error(over, match):
    with pytest.raises(ConfigError, match=match) as e:
        eval_linear.check_protocol(replace(Config(), **over), "cifar10", 100)
    assert "\n" not in str(e.value)


def test_good_schedule_and_probe_pass():
    for over in ({}, {"lr_schedule": "step", "lr_milestones": [1, 99]}, {"probe_aug": "us3l", "mode": "augment"},
                 {"probe_aug": "us3l", "finetune": True, "loader": "device"}):
        eval_linear.check_protocol(replace(Config(), **over), "cifar100", 100)
    with pytest.raises(ConfigError, match="probe_aug=us3l is the release's CIFAR probe, not for dataset=imagenet"):
        eval_linear.check_protocol(Config(probe_aug="us3l", mode="augment"), "imagenet", 100)


@pytest.mark.parametrize("over, match", [
    ({"lr_schedule": "linear"}, "lr_schedule='linear', allowed: cosine, step"),
    ({"probe_aug": "release"}, "probe_aug='release', allowed: default, us3l"),
    ({"lr_schedule": "step", "lr_milestones": [3]}, r"lr_milestones=\[3\]: .* in 1\.\.2 \(epochs=3\)"),
])
def test_main_checks_schedule_and_probe(image_folder, tmp_path, monkeypatch, over, match):
    """main refuses them before it reads any image (epochs=3 in tiny_cfg)."""
    monkeypatch.setattr(eval_linear, "calibration_shard", None)  # reached only past the checks
    with pytest.raises(ConfigError, match=match):
        eval_linear.main(tiny_cfg(image_folder, tmp_path, **over), backbone=tiny_resnet())


def test_us3l_recipe_is_the_release_probe():
    """yaml/linear_us3l_cifar.yaml holds the release's probe (workers/linear.py, configs/cifar/*_linear_eval_cifar
    .yaml): lr 30 at batch 512, x0.1 at epochs 60 and 80 of 100, no weight decay, a plain Linear; its transforms:
    RandomResizedCrop(32, scale (0.8, 1), bicubic) + flip, test Resize(36) + CenterCrop(32), bicubic."""
    cfg = parse_config(Config, ["--config", str(REPO / "yaml" / "linear_us3l_cifar.yaml")])
    assert (cfg.mode, cfg.probe_aug, cfg.head_bn, cfg.finetune) == ("augment", "us3l", False, False)
    assert (cfg.epochs, cfg.lr_schedule, cfg.lr_milestones) == (100, "step", [60, 80])
    assert (cfg.weight_decay, cfg.momentum, cfg.base_lr * cfg.batch_size / 256) == (0.0, 0.9, 30.0)  # 1 process
    assert cfg.nesterov is False  # the release's plain momentum
    eval_linear.check_protocol(cfg, "cifar100", cfg.epochs)
    assert eval_linear.linear_kind(cfg) == "linear_augment_us3l"  # not the default probe's folder
    mean, std = MEAN_STD["cifar100"]

    crop, flip, _, norm = eval_linear.augment_transform("cifar100", cfg.probe_aug).transforms
    assert type(crop) is T.RandomResizedCrop and crop.size == (32, 32) and crop.scale == (0.8, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3)) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert type(flip) is T.RandomHorizontalFlip and flip.p == 0.5
    assert (tuple(norm.mean), tuple(norm.std)) == (mean, std)  # the pretraining's normalization

    test = eval_linear.probe_test_transform("cifar100", cfg.probe_aug)
    resize, center = test.transforms[:2]
    assert type(resize) is T.Resize and resize.size == 36 and resize.interpolation == T.InterpolationMode.BICUBIC
    assert type(center) is T.CenterCrop and center.size == (32, 32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    zoomed = img.resize((36, 36), Image.BICUBIC).crop((2, 2, 34, 34))  # the centre 32 px of the 36 px image
    want = (torch.from_numpy(np.array(zoomed)).permute(2, 0, 1) / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(test(img), want, rtol=0, atol=1e-5)

    # the default probe is unchanged: RandomCrop(32, pad 4) + flip, test images as stored
    assert type(eval_linear.augment_transform("cifar10").transforms[0]) is T.RandomCrop
    assert [type(t) for t in eval_linear.probe_test_transform("cifar10").transforms] == [T.ToTensor, T.Normalize]


def test_us3l_recipe_runs(image_folder, tmp_path, monkeypatch, capsys):
    """The recipe, 2 epochs with the drop at epoch 1, on the generated folder with the tiny ResNet-18: augment
    mode steps at the step schedule's lr, a plain Linear head, the release's train transform for the head and
    its test transform for the test features and the BN calibration images."""
    args = ["--config", str(REPO / "yaml" / "linear_us3l_cifar.yaml"), "--arch=resnet18_cifar_tiny",
            f"--data_path={image_folder}", f"--out_dir={tmp_path}", "--widths=1.0,0.25", "--epochs=2",
            "--lr_milestones=1", "--batch_size=50", "--num_workers=0", "--calib_images=40", "--autocast=false"]
    cfg = parse_config(Config, args)
    built, heads, real_build, real_head = [], [], eval_linear.build_dataset, eval_linear.make_head

    def build(path, split, transform=None, **kw):
        built.append((split, type(transform.transforms[0]).__name__))
        return real_build(path, split, transform, **kw)

    def head(*args, **kw):
        heads.append(real_head(*args, **kw))
        return heads[-1]

    monkeypatch.setattr(eval_linear, "build_dataset", build)
    monkeypatch.setattr(eval_linear, "make_head", head)
    with recorded_lrs() as lrs:
        res = eval_linear.main(cfg)
    peak = 15.0 * 50 / 256  # 200 training images: 4 steps an epoch, per width
    assert lrs == pytest.approx(2 * ([peak] * 4 + [peak / 10] * 4), rel=1e-12)
    assert lrs.nesterov == {False}  # nesterov=false reaches the head's SGD
    assert sorted(built) == [("test", "Resize"), ("train", "RandomResizedCrop"), ("train", "Resize")]
    assert len(heads) == 2 and all(len(h) == 1 and isinstance(h[0], torch.nn.Linear) for h in heads)
    assert set(res) == {"1.0", "0.25"} and all(0 <= r["top1"] <= r["top5"] <= 1 for r in res.values())
    out = capsys.readouterr().out
    assert "2 epochs, lr 2.92969 x0.1 at epochs 1, probe_aug=us3l" in out


def cli_args(data, out, **over):
    args = {"arch": "resnet18_cifar_tiny", "data_path": data, "out_dir": out, "widths": "1.0,0.25", "epochs": 5,
            "batch_size": 25, "calib_images": 60, "test_subset": 50, "train_subset": 100, "label_fraction": 0.5,
            "autocast": "false", **over}
    return [f"--{k}={v}" for k, v in args.items()]


def check_outputs(out, stdout, processes):
    assert f"{processes} process(es)" in stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"1.0", "0.25"}
    for r in res.values():
        assert 0 <= r["top1"] <= r["top5"] <= 1 and isinstance(r["params"], int) and isinstance(r["macs"], int)
    assert res["1.0"]["macs"] > res["0.25"]["macs"] > 0 and res["1.0"]["params"] > res["0.25"]["params"]
    assert (out / "linear.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()
    # semi-supervised in a train subset: half of a 100-image pool labeled, 50 test images
    assert "50 labeled training images (5-5 per class), pool 100, 50 test images" in stdout
    assert "top-1" in stdout and "MMACs" in stdout
    return res


@pytest.fixture(scope="module")
def one_process(image_folder, tmp_path_factory):
    """The 1-process run (in-process: no interpreter start-up), checked by one test and the reference of the
    2-process one; with the thread count each of the 2 processes gets: a thread count cannot change a sum's order."""
    out, stdout, threads = tmp_path_factory.mktemp("linear_one") / "run", io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(int(thread_env(2)["OMP_NUM_THREADS"]))
    try:
        with contextlib.redirect_stdout(stdout):
            eval_linear.main(parse_config(Config, cli_args(image_folder, out)))
    finally:
        torch.set_num_threads(threads)
    return out, stdout.getvalue()


def test_cli_random_init(one_process):
    check_outputs(*one_process, 1)


def test_cli_two_cpu_processes_equal_one(image_folder, one_process, tmp_path):
    """2 processes of the command: the same calibration batches (drawn from the pool), gathered features and
    head, so every number of results.json but the timings equals the 1-process run's."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "eval_linear.py", *cli_args(image_folder, tmp_path / "run")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", **thread_env(2)}
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = check_outputs(tmp_path / "run", p.stdout, 2)
    ref = json.loads((one_process[0] / "results.json").read_text())
    for res in (got, ref):
        for r in res.values():
            del r["seconds"]
    assert got == ref


def test_device_and_ffcv_loaders_equal_torch(image_folder, tmp_path, monkeypatch):
    """loader=device and loader=ffcv (a raw .beton: the same pixels, the same rows) feed the backbone the
    torch loader's images: the same test and labeled-train features at every width, in the same order with
    the same labels, so the same heads."""
    import ffcv_data
    pytest.importorskip("ffcv")
    ffcv_data.write_beton(image_folder, tmp_path / "beton", raw=True, num_workers=1)
    features, res = FeatureLog(monkeypatch, eval_linear), {}  # main's features of each pass
    for kind in ("torch", "device", "ffcv"):
        features.kind = kind
        cfg = tiny_cfg(image_folder, tmp_path / kind, loader=kind, ffcv_path=str(tmp_path / "beton"),
                       label_fraction=0.5, test_subset=50)
        res[kind] = eval_linear.main(cfg, backbone=tiny_resnet())
    assert [len(f) for f, _, _ in features["torch"]] == [50, 100, 50, 100]  # test and labeled train, each width
    for kind in ("device", "ffcv"):
        for (f, y, idx), (ref_f, ref_y, ref_idx) in zip(features[kind], features["torch"], strict=True):
            assert torch.equal(y.cpu(), ref_y), kind
            assert kind == "ffcv" or torch.equal(idx.cpu(), ref_idx)  # ffcv's: rows of the .beton, not of a subset
            torch.testing.assert_close(f.cpu(), ref_f, rtol=0, atol=1e-5, msg=kind)
    for r in (*res["torch"].values(), *res["device"].values()):
        del r["seconds"]
    assert res["device"] == res["torch"]


def test_vit_probe_at_its_input_size(image_folder, tmp_path, monkeypatch):
    """A network that fixes its input size (a ViT's img_size: 48 px here, the release's Table 3 ViT 224 px) is
    probed on CIFAR upsampled to it: test and calibration images data.eval_transform(size); augment mode and
    fine-tuning train on MoCo v3's RandomResizedCrop(size) + flip (the release's ViT probe); loader=device keeps
    the 32 px images and upsamples each batch (the torch loader's features); MACs at that size. The release's
    32 px CIFAR probe (probe_aug=us3l) is refused."""
    import functools

    from data import eval_transform
    from models import ViT, profile

    torch.manual_seed(0)
    vit = functools.partial(ViT, 32, 1, 2, img_size=48, patch_size=16, slim="input")()
    transforms, first, real_build, real_extract = [], [], eval_linear.build_dataset, eval_linear.extract_features

    def build(path, split, transform=None, **kw):
        transforms.append((split, transform))
        return real_build(path, split, transform, **kw)

    def extract(model, loader, *args, **kw):  # the first image each pass feeds the network
        first.append(next(iter(loader))[0][0].cpu())
        return real_extract(model, loader, *args, **kw)

    monkeypatch.setattr(eval_linear, "build_dataset", build)
    monkeypatch.setattr(eval_linear, "extract_features", extract)
    res = {kind: eval_linear.main(tiny_cfg(image_folder, tmp_path / kind, loader=kind), backbone=vit)
           for kind in ("torch", "device")}
    for r in (*res["torch"].values(), *res["device"].values()):
        del r["seconds"]
    assert res["device"] == res["torch"]
    assert [(r["params"], r["macs"]) for r in res["torch"].values()] == [profile(vit, w, input_size=48)
                                                                        for w in (1.0, 0.5)]
    test_img = Image.open(image_folder / "test" / "airplane" / "0000.jpg")  # the test split's first image
    want = eval_transform("cifar10", 48)(test_img)
    assert len(first) == 8 and all(torch.equal(x, want) for x in first[::2])  # test passes (train passes between)

    transforms.clear()
    for over in ({"mode": "augment"}, {"finetune": True, "batch_size": 20}):
        res = eval_linear.main(tiny_cfg(image_folder, tmp_path / "aug", epochs=1, widths=[0.5], **over), backbone=vit)
        assert 0 <= res["0.5"]["top1"] <= res["0.5"]["top5"] <= 1
    crops = [t.transforms[0] for split, t in transforms if type(t.transforms[0]) is T.RandomResizedCrop]
    assert len(crops) == 2 and all(c.size == (48, 48) and c.scale == (0.08, 1.0) for c in crops)
    assert all(c.interpolation == T.InterpolationMode.BICUBIC for c in crops)
    assert type(eval_linear.augment_transform("cifar10", size=48).transforms[1]) is T.RandomHorizontalFlip

    with pytest.raises(ConfigError, match="probe_aug=us3l is the release's 32 px CIFAR probe; this network takes "
                                          "48 px inputs") as e:
        eval_linear.main(tiny_cfg(image_folder, tmp_path / "us3l", probe_aug="us3l", mode="augment"), backbone=vit)
    assert "\n" not in str(e.value)
