"""export.py: every format reproduces the slimmed, BN-calibrated network (pt and TorchScript within 1e-4,
ONNX within 1e-3, times the largest output where it exceeds 1) at an off-grid width and a ResNet depth
list; torchvision weights load strictly and give the same features; TorchScript and the plain weights load
in a process without this repo; the latency budget and bad options are one-line errors."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from config import ConfigError
from data import build_dataset, eval_transform
from knn import _autocast, fixed_calibration_batches
from export import CLASSIFIER, Config, main, torchvision_model
from models import ARCHS, calibrate_bn, export, set_active

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated, still the format asked for
CALIB = {"calib_images": 40, "calib_batch_size": 20}  # 2 batches: the pooled statistics span batches


def run_export(data, out, **over):
    return main(replace(Config(), data_path=str(data), out=str(out), **CALIB, **over))


def images(data, n=6):
    ds = build_dataset(str(data), "test", eval_transform("cifar10"))
    return torch.stack([ds[i][0] for i in range(0, len(ds), len(ds) // n)][:n])  # several classes


@torch.no_grad()
def reference(arch, width, depth, data, x):
    """The slimmed network in eval mode after the evaluations' calibration, computed here independently."""
    torch.manual_seed(0)  # export.py's random init (eval_knn.load_network, seed 0)
    model = ARCHS[arch]()
    calib = fixed_calibration_batches(str(data), "cifar10", 0, CALIB["calib_images"], CALIB["calib_batch_size"])
    with _autocast(torch.device("cpu"), True):
        calibrate_bn(model, calib, width, depth)
    set_active(model, width, depth)
    return model.eval()(x)


@pytest.mark.parametrize("arch,width,depth,dynamo", [
    ("resnet18_cifar", 0.37, None, True),  # the default ONNX exporter; the others use the fast legacy one
    ("resnet18_cifar", 0.5, [1, 2, 1, 1], False),
    ("resnet50", 0.37, None, False),
    ("mobilenetv3_large", 0.37, None, False),
    ("vit_tiny_cifar", 0.37, None, False),
    ("vit_tiny_cifar_mocov3", 0.37, None, False),  # fixed sin-cos buffer, frozen patch projection
])
def test_every_format_equals_the_slimmed_network(arch, width, depth, dynamo, cifar_small, tmp_path):
    import onnxruntime

    run_export(cifar_small, tmp_path / "net", arch=arch, width=width, depth=depth,
               formats=["pt", "torchscript", "onnx"], onnx_dynamo=dynamo)
    x = images(cifar_small)  # other images, another batch size than the export's
    ref = reference(arch, width, depth, cifar_small, x)
    info = json.loads((tmp_path / "net.json").read_text())
    assert (info["arch"], info["width"], info["depth"], info["input"]["shape"]) == (arch, width, depth, [3, 32, 32])
    assert info["feature_dim"] == ref.shape[1] < ARCHS[arch]().feature_dim
    assert set(info["files"]) == {"pt", "torchscript", "onnx"}

    state = torch.load(tmp_path / "net.pt", weights_only=True)  # plain tensors
    net = export(ARCHS[arch](), width, depth, check_stats=False)
    net.load_state_dict(state)
    assert sum(p.numel() for p in net.parameters()) == info["params"]
    with torch.no_grad():
        out_pt = net.eval()(x)
        out_ts = torch.jit.load(tmp_path / "net.torchscript.pt")(x)
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    out_onnx = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    scale = max(1.0, ref.abs().max().item())  # export.TOLERANCE: of the output's scale where it exceeds 1
    assert (out_pt - ref).abs().max() <= 1e-4 * scale
    assert (out_ts - ref).abs().max() <= 1e-4 * scale
    assert (out_onnx - ref).abs().max() <= 1e-3 * scale
    assert ref.abs().max() > 1e-2  # not a trivially small output


@pytest.mark.parametrize("arch,width,depth,tv", [
    ("resnet18", 1.0, None, "resnet18"),
    ("resnet34", 1.0, None, "resnet34"),
    ("resnet50", 1.0, None, "resnet50"),
    ("mobilenetv2", 1.0, None, "mobilenet_v2"),
    ("mobilenetv3_large", 1.0, None, "mobilenet_v3_large"),
    ("resnet34", 1.0, [2, 2, 2, 2], "resnet18"),  # a depth slice that is exactly a ResNet-18
    ("resnet34_w96", 0.6667, [2, 2, 2, 2], "resnet18"),  # DSPNet's smallest ImageNet DN
])
def test_torchvision_format_loads_strictly(arch, width, depth, tv, cifar_small, tmp_path):
    import torchvision

    run_export(cifar_small, tmp_path / "net", arch=arch, width=width, depth=depth, formats=["torchvision"])
    state = torch.load(tmp_path / "net.torchvision.pt", weights_only=True)
    info = json.loads((tmp_path / "net.json").read_text())
    assert info["torchvision"]["model"] == f"torchvision.models.{tv}"
    # the stock builder: everything but the classifier (its last Linear) is filled, nothing is left over
    missing, unexpected = getattr(torchvision.models, tv)().load_state_dict(state, strict=False)
    assert unexpected == [] and sorted(missing) == [f"{CLASSIFIER[tv]}.bias", f"{CLASSIFIER[tv]}.weight"]
    model = torchvision_model(tv)  # classifier layer -> Identity, then strict
    model.load_state_dict(state, strict=True)
    x = images(cifar_small, 4)
    with torch.no_grad():
        out = model(x)
    ref = reference(arch, width, depth, cifar_small, x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4
    assert info["max_abs_diff"]["torchvision"] <= 1e-4


def test_mobilenetv3_torchvision_default_bn_eps_differs(cifar_small, tmp_path):
    """What the README says: torchvision's MobileNetV3 BN eps is 1e-3, ours 1e-5; the weights load into the
    stock model, but exact features need the eps-1e-5 builder (export.torchvision_model)."""
    import torchvision

    run_export(cifar_small, tmp_path / "net", arch="mobilenetv3_large", width=1.0, formats=["torchvision"])
    state = torch.load(tmp_path / "net.torchvision.pt", weights_only=True)
    stock = torchvision.models.mobilenet_v3_large()
    stock.classifier[3] = nn.Identity()
    stock.load_state_dict(state)
    x = images(cifar_small, 4)
    with torch.no_grad():
        diff = (stock.eval()(x) - torchvision_model("mobilenet_v3_large").eval()(x)).abs().max()
    assert stock.features[0][1].eps == 1e-3 and diff > 0  # only eps differs: loaded, but not the same features


def test_torchscript_and_weights_load_without_the_repo(cifar_small, tmp_path):
    run_export(cifar_small, tmp_path / "net", arch="resnet18_cifar", width=0.37, formats=["pt", "torchscript"])
    x = images(cifar_small, 3)
    torch.save({"x": x, "ref": reference("resnet18_cifar", 0.37, None, cifar_small, x)}, tmp_path / "io.pt")
    code = f"""
import sys, torch
repo = {str(REPO)!r}
sys.path[:] = [p for p in sys.path if p not in ("", ".", repo)]
try:
    import models
    sys.exit("this repo's models.py is importable")
except ModuleNotFoundError:
    pass
io = torch.load("io.pt", weights_only=True)
net = torch.jit.load("net.torchscript.pt")
with torch.no_grad():
    err = (net(io["x"]) - io["ref"]).abs().max().item()
state = torch.load("net.pt", weights_only=True)  # plain tensors: no class of the repo needed
assert all(isinstance(v, torch.Tensor) for v in state.values())
print("max_err", err, len(state))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    err = float(p.stdout.split("max_err")[1].split()[0])
    assert err <= 1e-4


def test_budget_picks_the_widest_that_fits_or_says_none_does(cifar_small, tmp_path, capsys):
    fast = {"arch": "resnet18_cifar", "widths": [0.25, 0.5], "latency_warmup": 0, "latency_repeats": 2}
    with pytest.raises(ConfigError) as e:  # no timing asserts: a budget nothing can meet, one that all meet
        run_export(cifar_small, tmp_path / "none", budget_ms=1e-9, **fast)
    msg = str(e.value)
    assert "\n" not in msg and "budget_ms=1e-09" in msg and "no candidate fits" in msg and "fastest, 0.25" in msg
    out = run_export(cifar_small, tmp_path / "net", budget_ms=1e9, **fast)
    assert [Path(p).name for p in out["written"]] == ["net"]  # one network: --out is its exact name
    assert json.loads((tmp_path / "net.json").read_text())["width"] == 0.5
    printed = capsys.readouterr().out
    assert "0.5 is the widest that fits" in printed and "it is the widest candidate" in printed
    assert "ms" in printed and "MMACs" in printed  # the latency table


@pytest.fixture(scope="module")
def dspnet_ckpt(tmp_path_factory):
    """A backbone.pt as train_dspnet.py writes it (untrained weights; teacher != online)."""
    torch.manual_seed(1)
    online, teacher = ARCHS["resnet18_cifar"](), ARCHS["resnet18_cifar"]()
    dns = [{"width": 1.0, "depth": None}, {"width": 0.75, "depth": None}, {"width": 0.5, "depth": [1, 1, 1, 1]},
           {"width": 0.25, "depth": None}]
    path = tmp_path_factory.mktemp("dspnet") / "backbone.pt"
    torch.save({"arch": "resnet18_cifar", "backbone": online.state_dict(), "teacher": teacher.state_dict(),
                "dns": dns, "width_min": 0.25, "widths": [1.0, 0.75, 0.5, 0.25], "config": {"dataset": "cifar10"}},
               path)
    return path, teacher.state_dict()


def test_dn_teacher_results_and_latency(dspnet_ckpt, cifar_small, tmp_path, capsys):
    ckpt, teacher = dspnet_ckpt
    results = tmp_path / "knn" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"0.5_d1-1-1-1": {"top1": 0.3, "top5": 0.8}, "1.0": {"top1": 0.4, "top5": 0.9}}))
    run_export(cifar_small, tmp_path / "dn2", ckpt=str(ckpt), dn=[2], teacher=True, latency=True,
               results=[str(results)], latency_warmup=0, latency_repeats=2)
    info = json.loads((tmp_path / "dn2.json").read_text())
    assert (info["width"], info["depth"], info["name"]) == (0.5, [1, 1, 1, 1], "0.5_d1-1-1-1")
    assert info["accuracy"] == {"knn": {"top1": 0.3, "top5": 0.8}} and info["latency"]["ms_median"] > 0
    assert (tmp_path / "dn2_latency.png").is_file()  # accuracy against latency
    assert "knn top-1" in capsys.readouterr().out
    state = torch.load(tmp_path / "dn2.pt", weights_only=True)  # the teacher's weights, sliced
    w = state["stages.3.0.conv1.weight"]
    assert torch.equal(w, teacher["stages.3.0.conv1.weight"][:w.shape[0], :w.shape[1]])
    assert "stages.0.1.conv1.weight" not in state  # depth 1 in every stage
    run_export(cifar_small, tmp_path / "dn", ckpt=str(ckpt), dn=[0.75, 1, 2, 1, 1])  # a DN given in full
    assert json.loads((tmp_path / "dn.json").read_text())["depth"] == [1, 2, 1, 1]


def test_several_widths_get_one_file_each(cifar_small, tmp_path):
    out = run_export(cifar_small, tmp_path / "r18", arch="resnet18_cifar", widths=[1.0, 0.25])
    assert [Path(p).name for p in out["written"]] == ["r18_w1.0", "r18_w0.25"]
    assert all((tmp_path / f"r18_w{n}.pt").is_file() for n in ("1.0", "0.25"))


@pytest.mark.parametrize("over,match", [
    ({"width": 1.5}, "width=1.5 must lie in (0, 1]"),
    ({"width": 0.1}, "below 0.25"),  # below the checkpoint's smallest trained width
    ({"dn": [7]}, "dn=7: allowed DN indices"),
    ({"dn": [0.5, 1, 1]}, "depth"),
    ({"formats": ["tflite"]}, "formats=['tflite']: allowed"),
    ({"formats": ["torchvision"], "width": 1.0}, "no torchvision counterpart"),  # a CIFAR stem
    ({"width": 0.5, "widths": [0.5]}, "allowed: one of width, widths, dn"),
    ({"budget_ms": 3.0, "width": 0.5}, "budget_ms chooses among widths"),
    ({"results": ["nowhere/results.json"]}, "results file not found"),
    ({"ckpt": "", "arch": ""}, "give --ckpt, or --arch"),
])
def test_bad_options_are_one_line_errors(over, match, dspnet_ckpt, tmp_path):
    cfg = replace(Config(), ckpt=str(dspnet_ckpt[0]), data_path=str(tmp_path / "no_data"), out=str(tmp_path / "x"))
    with pytest.raises(ConfigError) as e:
        main(replace(cfg, **over))  # before any data is read: data_path does not exist
    assert match in str(e.value) and "\n" not in str(e.value)
    assert not any(tmp_path.glob("x*"))


def test_torchvision_at_a_narrow_width_is_refused(tmp_path):
    cfg = replace(Config(), arch="resnet50", width=0.5, formats=["pt", "torchvision"], out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="resnet50 at 0.5 has no torchvision counterpart"):
        main(cfg)
