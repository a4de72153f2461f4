"""models.py: shapes at any width/depth, exact export, MACs/params against reference figures and
against PyTorch's own FLOP counter, exact BN calibration. The ViT's own features: tests/test_vit.py."""

import io

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import ARCHS, calibrate_bn, export, profile, projection_mlp, set_active
from slim import SlimBatchNorm2d, make_divisible

RESNETS = [a for a in ARCHS if a.startswith("resnet")]


def small_input(arch, model, n=4):
    """The smallest images that still reach every layer with some spatial extent: 16 px through a CIFAR
    stem, 32 px through an ImageNet one (1 x 1 at the last stage); a ViT takes its own size."""
    size = getattr(model, "img_size", 16 if "cifar" in arch else 32)
    return torch.randn(n, 3, size, size)


def counted_macs(net, size):
    """MACs of one image through a plain network as PyTorch's FlopCounterMode counts them (FLOPs / 2:
    convolutions, linear layers and matmuls), independently of models.profile's forward hooks. NOTE: the
    fused CPU attention kernel is not in its table: the math kernel runs attention as two counted bmm."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


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
        with torch.no_grad():
            y = model(x)
        assert y.ndim == 2 and y.shape[0] == 2 and torch.isfinite(y).all()
        dims.append(y.shape[1])
    assert dims[0] == model.feature_dim
    if arch.startswith("mobilenetv2") or getattr(model, "slim", None) == "input":  # features at full width at
        assert set(dims) == {model.feature_dim}  # every width: MobileNetV2's 1280-d last layer, the release's ViT
    else:
        assert dims[2] < dims[1] < dims[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_equals_slimmed_network(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    other = ARCHS[arch]()  # what a user rebuilds the plain network from: same shapes, other weights
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
        file = io.BytesIO()  # plain tensors, as export.py writes them (in memory: up to 200 MB each)
        torch.save(net.state_dict(), file)
        file.seek(0)
        fresh = export(other, width, depth, check_stats=False)
        fresh.load_state_dict(torch.load(file, weights_only=True))
        with torch.no_grad():
            out = fresh.eval()(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4, (width, depth)
        # the plain net holds only what the sub-network runs: every parameter takes part in the output
        net.requires_grad_(True)(x[:1]).square().sum().backward()
        assert [n for n, p in net.named_parameters() if p.grad is None] == [], (width, depth)
        # models.profile's figures: the plain net's parameters, and its MACs as PyTorch counts them
        size = x.shape[-1]
        params = sum(p.numel() for p in net.parameters())
        assert profile(model, width, depth, input_size=size) == (params, counted_macs(net, size)), (width, depth)


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


def test_cifar_s2_stem_is_resnet18_cifar_at_a_quarter_of_the_macs():
    """The quick runs' network: resnet18_cifar's weights, a stride-2 stem (16x16 first stage at 32 px)."""
    full, s2 = ARCHS["resnet18_cifar"](), ARCHS["resnet18_cifar_s2"]()
    assert {k: v.shape for k, v in full.state_dict().items()} == {k: v.shape for k, v in s2.state_dict().items()}
    assert s2.stem[0].stride == (2, 2) and full.stem[0].stride == (1, 1)
    for w in (1.0, 0.25):
        p, m = profile(full, w, input_size=32)
        p2, m2 = profile(s2, w, input_size=32)
        assert p == p2 and 0.24 < m2 / m < 0.26, (w, m2 / m)


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
    model = ARCHS["resnet18_cifar_tiny"]()
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


def test_projection_mlp_three_layers_mocov3():
    torch.manual_seed(0)
    mlp = projection_mlp(48, 32, 16, last_bn=True, layers=3)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["SlimLinear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert [m.bias is None for m in mlp if isinstance(m, torch.nn.Linear)] == [True, True, True]
    assert not mlp[-1].affine and mlp[1].affine and mlp[4].affine
    z = mlp.train()(torch.randn(64, 48))
    assert z.shape == (64, 16)
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)  # BN after the last layer
    assert [type(m).__name__ for m in projection_mlp(48, 32, 16)] == ["SlimLinear", "BatchNorm1d", "ReLU", "Linear"]
