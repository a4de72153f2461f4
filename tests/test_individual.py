"""Individually pretrained baselines (train_us3l.py individual=w, train_dspnet.py individual=DN):
one plain network of its own size and init inside the slimmable layout, every other weight zero,
and only it trained; the evaluation scripts read it and refuse any other slice."""

import json
import math

import pytest
import torch

import eval_knn
import models
import train_dspnet
import train_us3l
from config import parse_config
from tests.conftest import recorded_run
from tests.test_train_us3l import cli, tiny_args
from tests.test_dspnet import tiny_args as dspnet_args


def narrow_resnet(depth=(2, 2, 2, 2)):
    """resnet18_cifar_tiny (stage widths 16/32/64/128) at width 0.5, built directly: the reference."""
    return models.ResNet(models.BasicBlock, list(depth), widths=(8, 16, 32, 64), stem="cifar")


def nonzero(sd):
    return sum(int((t != 0).sum()) for k, t in sd.items() if "running" not in k and "num_batches" not in k)


@pytest.mark.parametrize("depth", [None, [1, 1, 1, 1]])
def test_make_individual_is_a_plain_network_of_its_own_init(depth):
    torch.manual_seed(0)
    model = models.make_individual_(models.ARCHS["resnet18_cifar_tiny"](), 0.5, depth)
    ref = narrow_resnet(depth or (2, 2, 2, 2))
    net = models.export(model, 0.5, depth, check_stats=False).train()  # batch statistics, as the model's
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
    # every parameter outside the slice is zero: the nonzero count is at most the narrow network's
    in_slice = sum(int((p != 0).sum()) for p in net.parameters())
    assert sum(int((p != 0).sum()) for p in model.parameters()) == in_slice
    # the slimmed model at (0.5, depth) is the exported plain network
    x = torch.randn(4, 3, 16, 16)
    models.set_active(model, 0.5, depth)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    # initialized as a network of width 0.5 (Kaiming fan-out of its own channels), not as a slice of
    # the full width's init (std smaller by sqrt(2) here)
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        if p.ndim == 4 and p.numel() >= 1000:
            assert p.shape == q.shape
            want = math.sqrt(2 / (p.shape[0] * p.shape[2] * p.shape[3]))
            assert abs(p.std().item() / want - 1) < 0.1, name


def test_us3l_individual_trains_only_its_width(image_folder, tmp_path, capsys, monkeypatch, fresh_accelerate):
    cfg = parse_config(train_us3l.Config, tiny_args(image_folder, tmp_path / "run", individual=0.5, max_steps=4,
                                                    group_reg_alpha=0.05))
    seen = recorded_run(train_us3l, cfg)
    out = capsys.readouterr().out
    assert "individual=0.5: one network, so" in out and "group_reg_alpha=0.0" in out and "aux_head=False" in out
    assert "aux" not in seen.state["student"]
    assert all(alpha == 0.0 for _, _, alpha in seen.decay)  # plain L2, as a plain network
    ckpt = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)
    assert ckpt["widths"] == [0.5] and ckpt["individual"] == {"width": 0.5, "depth": None}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["knn_top1"]) == {"0.5"}
    # the initial weights, as the trainer built them (seeded before the model)
    torch.manual_seed(cfg.seed)
    init = models.make_individual_(models.ARCHS[cfg.arch](), 0.5).state_dict()
    n_narrow = sum(p.numel() for p in narrow_resnet().parameters())
    for key in ("backbone", "teacher"):
        sd = ckpt[key]
        # the slice moved (every entry: biases and BN shifts start at 0), nothing else did
        assert nonzero(sd) == n_narrow, key
        moved = sum(int((sd[k] != init[k]).sum()) for k in sd if "running" not in k and "num_batches" not in k)
        assert 0.9 * n_narrow < moved <= n_narrow, key
    # the evaluation scripts evaluate that network and refuse any other slice of it
    msg = cli(eval_knn.main, eval_knn.Config, [f"--ckpt={tmp_path / 'run' / 'backbone.pt'}", "--widths=1.0,0.5"],
              monkeypatch)
    assert "individually pretrained network, 0.5 only" in msg and "1.0 was never trained" in msg


def test_dspnet_individual_trains_only_its_dn(image_folder, tmp_path):
    cfg = parse_config(train_dspnet.Config, dspnet_args(image_folder, tmp_path / "run", individual="[0.5,1,1,1,1]",
                                                        max_steps=4))
    seen = recorded_run(train_dspnet, cfg)
    ckpt = torch.load(tmp_path / "run" / "backbone.pt", weights_only=True)
    dn = {"width": 0.5, "depth": [1, 1, 1, 1]}
    assert ckpt["dns"] == [dn] and ckpt["individual"] == dn
    assert set(json.loads((tmp_path / "run" / "results.json").read_text())["knn_top1"]) == {"0.5_d1-1-1-1"}
    n_narrow = sum(p.numel() for p in narrow_resnet([1, 1, 1, 1]).parameters())
    assert nonzero(ckpt["backbone"]) == n_narrow and nonzero(ckpt["teacher"]) == n_narrow
    assert len(seen.taus) == 4


@pytest.mark.parametrize("trainer,value,message", [
    (train_us3l, "1.5", "individual=1.5: the width must be in"),
    (train_us3l, "0.001", "individual=0.001: the width must be in [0.0625, 1]"),
    (train_dspnet, "[0.5,9,1,1,1]", "individual=[0.5, 9.0, 1.0, 1.0, 1.0] does not fit resnet18_cifar_tiny"),
])
def test_bad_individual_is_one_line(trainer, value, message, image_folder, tmp_path, monkeypatch,
                                     fresh_accelerate):
    args = (tiny_args if trainer is train_us3l else dspnet_args)(image_folder, tmp_path, individual=value)
    msg = cli(trainer.main, trainer.Config, args, monkeypatch)  # a ConfigError: its one line
    assert isinstance(msg, str) and message in msg and "\n" not in msg


def test_load_subnet_is_the_calibrated_exported_slice(us3l_run, dspnet_run):
    """models.load_subnet (the README's snippet): load, slice, calibrate, export in one call; the same
    network as doing it by hand; DN indices; an individual checkpoint's one network; refusals."""
    path = us3l_run.out / "backbone.pt"
    torch.manual_seed(0)
    calib = [torch.randn(20, 3, 16, 16) for _ in range(2)]
    x = torch.randn(4, 3, 16, 16)
    net = models.load_subnet(path, width=0.5, batches=calib)
    model, _ = models.load_backbone(path)
    models.calibrate_bn(model, calib, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), models.export(model, 0.5)(x))
    assert not any(isinstance(m, models.SlimConv2d) for m in net.modules()) and not net.training
    with pytest.raises(ValueError, match="below 0.25, the smallest width"):
        models.load_subnet(path, width=0.125)
    with pytest.raises(IsADirectoryError, match="is a folder: pass the backbone.pt in it"):
        models.load_subnet(us3l_run.out)
    dn = models.load_subnet(dspnet_run.out / "backbone.pt", dn=2, batches=calib)  # 0.5_d1-1-1-1
    assert [len(stage) for stage in dn.stages] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="an index into"):
        models.load_subnet(dspnet_run.out / "backbone.pt", dn=7)


def test_load_subnet_of_an_individual_checkpoint(tmp_path):
    model = models.make_individual_(models.ARCHS["resnet18_cifar_tiny"](), 0.5)
    torch.save({"arch": "resnet18_cifar_tiny", "backbone": model.state_dict(),
                "individual": {"width": 0.5, "depth": None}}, tmp_path / "b.pt")
    net = models.load_subnet(tmp_path / "b.pt")  # its one network by default
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in narrow_resnet().parameters())
    with pytest.raises(ValueError, match="individually pretrained network"):
        models.load_subnet(tmp_path / "b.pt", width=1.0)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a checkpoint this code can read"):
        models.load_subnet(tmp_path / "junk.pt")
