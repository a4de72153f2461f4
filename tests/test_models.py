"""models.py: shapes at any width/depth, exact export, MACs/params against reference figures, exact
BN calibration."""

import pytest
import torch

from models import ARCHS, calibrate_bn, export, profile, set_active
from slim import SlimBatchNorm2d, make_divisible

RESNETS = [a for a in ARCHS if a.startswith("resnet")]


def small_input(arch, model, n=4):
    size = getattr(model, "img_size", 32 if "cifar" in arch else 64)
    return torch.randn(n, 3, size, size)


def test_make_divisible():
    assert [make_divisible(v) for v in (3, 8, 12, 16, 23.7, 64 * 0.37, 512 * 0.25)] == [8, 8, 16, 16, 24, 24, 128]
    for c in (16, 64, 100, 960):
        for w in (0.1, 0.25, 0.37, 0.5, 0.9, 1.0):
            v = make_divisible(c * w)
            assert v % 8 == 0 and v >= 8 and v >= 0.9 * c * w


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shapes_at_random_widths(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().train()
    x = small_input(arch, model, 2)
    widths = [1.0, 0.37, 0.25] + torch.empty(2).uniform_(0.25, 1.0).tolist()
    dims = []
    for w in widths:
        depth = [1, 2, 1, 1] if arch in RESNETS and w == 0.37 else None
        set_active(model, w, depth)
        y = model(x)
        assert y.ndim == 2 and y.shape[0] == 2 and torch.isfinite(y).all()
        dims.append(y.shape[1])
    assert dims[0] == model.feature_dim
    if not arch.startswith("mobilenetv2"):  # MobileNetV2 keeps its 1280-d last layer at every width
        assert dims[2] < dims[1] < dims[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_equals_slimmed_network(arch, tmp_path):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    configs = [(1.0, None), (0.5, None), (0.37, None)]
    if arch in RESNETS:
        configs += [(0.75, [1, 2, 1, 2]), (1.0, [2, 1, 1, 1])]
    for width, depth in configs:
        calibrate_bn(model, [small_input(arch, model, 8) for _ in range(2)], width, depth)
        x = small_input(arch, model)
        model.eval()
        set_active(model, width, depth)
        with torch.no_grad():
            ref = model(x)
        net = export(model, width, depth)
        assert not any(isinstance(m, SlimBatchNorm2d) for m in net.modules())
        path = tmp_path / "net.pt"
        torch.save(net.state_dict(), path)
        fresh = export(ARCHS[arch](), width, depth, check_stats=False)  # same shapes, other weights
        fresh.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            out = fresh.eval()(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4, (width, depth)
        # the plain net really is smaller: it holds only the slices the sub-network runs
        assert sum(p.numel() for p in net.parameters()) == profile(model, width, depth)[0]


def test_export_needs_calibration():
    model = ARCHS["resnet18_cifar"]()
    calibrate_bn(model, [torch.randn(4, 3, 32, 32)], width=1.0)
    with pytest.raises(RuntimeError, match="calibrate_bn"):
        export(model, width=0.5)
    set_active(model, 0.5)
    with pytest.raises(RuntimeError, match="calibrate_bn"):
        model.eval()(torch.randn(2, 3, 32, 32))


# Reference figures at 224 px, with a 1000-way classifier (docs/design.md, Slimmable networks)
@pytest.mark.parametrize("arch,kind,ref", [
    ("resnet50", "macs", {0.25: 278e6, 0.5: 1052e6, 0.75: 2323e6, 1.0: 4089e6}),
    ("mobilenetv2", "macs", {0.5: 97e6, 0.75: 209e6, 1.0: 301e6}),
    ("resnet18", "params", {0.25: 0.83e6, 0.5: 3.06e6, 0.75: 6.68e6, 1.0: 11.69e6}),
])
def test_profile_matches_reference(arch, kind, ref):
    model = ARCHS[arch](num_classes=1000)
    for w, value in ref.items():
        params, macs = profile(model, w, input_size=224)
        got = macs if kind == "macs" else params
        assert abs(got - value) / value <= 0.02, (arch, w, got, value)


def test_profile_depth_and_full_networks():
    model = ARCHS["resnet34"](num_classes=1000)
    p34, m34 = profile(model, 1.0)
    p18, m18 = profile(model, 1.0, depth=[2, 2, 2, 2])  # depth-slimmed ResNet-34 == ResNet-18
    assert (p18, m18) == profile(ARCHS["resnet18"](num_classes=1000), 1.0)
    assert abs(p34 - 21.80e6) / 21.80e6 < 0.01 and abs(m34 - 3.67e9) / 3.67e9 < 0.02
    assert abs(profile(ARCHS["vit_small"](num_classes=1000), 1.0)[0] - 22.05e6) / 22.05e6 < 0.01


def bn_inputs(model, batches):
    """Brute force: every BN input of the train-mode forward, concatenated over all batches."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m, []).append(a[0].detach()))
             for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {m: torch.cat(v).double() for m, v in seen.items()}


@pytest.mark.parametrize("width,depth", [(1.0, None), (0.5, [1, 1, 2, 1])])
def test_calibrate_bn_is_exact(width, depth):
    torch.manual_seed(0)
    model = ARCHS["resnet18_cifar"]()
    batches = [torch.randn(6, 3, 16, 16) + i for i in range(3)]  # batches with different statistics
    set_active(model, width, depth)
    inputs = bn_inputs(model, batches)
    calibrate_bn(model, batches, width, depth)
    assert len(inputs) > 0
    for bn, x in inputs.items():
        c = x.shape[1]
        xs = x.transpose(0, 1).reshape(c, -1)
        assert torch.allclose(bn.running_mean[:c].double(), xs.mean(1), rtol=1e-5, atol=1e-6)
        assert torch.allclose(bn.running_var[:c].double(), xs.var(1, unbiased=False), rtol=1e-4, atol=1e-6)
    # one calibration batch: the eval-mode network reproduces the train-mode (batch-statistics) output
    calibrate_bn(model, batches[:1], width, depth)
    with torch.no_grad():
        train_out = model.train()(batches[0])
        eval_out = model.eval()(batches[0])
    assert torch.allclose(train_out, eval_out, rtol=1e-4, atol=1e-4)


def test_set_active_rejects_bad_arguments():
    model = ARCHS["resnet18_cifar"]()
    for w in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="width"):
            set_active(model, w)
    with pytest.raises(ValueError, match="depth"):
        set_active(model, 1.0, [2, 2, 2])
    with pytest.raises(ValueError, match="depth"):
        set_active(model, 1.0, [3, 2, 2, 2])
    with pytest.raises(ValueError, match="only ResNets"):
        set_active(ARCHS["mobilenetv2_cifar"](), 1.0, [1, 1, 1, 1])


def test_slices_share_the_full_weights():
    """Sub-networks are views of one set of weights: a gradient at width 0.25 reaches exactly the
    leading channels of the full tensors."""
    model = ARCHS["resnet18_cifar"]().train()
    set_active(model, 0.25)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    g = model.stages[3][1].conv2.weight.grad
    assert g.shape == (512, 512, 3, 3)
    assert g[:128, :128].abs().sum() > 0 and g[128:].abs().sum() == 0 and g[:, 128:].abs().sum() == 0
