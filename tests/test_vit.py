"""models.ViT: MoCo v3's sin-cos position embedding, frozen patch projection and init; the two ways of slimming
(slim="embed": the embedding dimension, as the US3L paper words it; slim="input": each Linear's input only, as
its release ran Table 3): exact export, params/MACs, minimum width, individual networks. Small ViTs throughout
(dims 48-128, 1-2 blocks, 16 px images); the 224 px archs are only built, never run."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from models import (ARCHS, ViT, calibrate_bn, export, make_individual_, min_width, profile, reinit, set_active,
                    slice_index)
from slim import SLIM, SlimLinear, make_divisible
from tests.test_models import counted_macs


def tiny_mocov3_vit():
    """dim 48, 2 heads (width unit 16: active widths 16, 32, 48), 4 x 4 patches of a 16 px image."""
    return ViT(48, 1, 2, img_size=16, patch_size=4, pos_embed="sincos", frozen_patch_embed=True, init="mocov3")


def tiny_input_vit(dim=64, depth=2):
    """The release's ViT in small: MoCo v3's recipe, each Linear's input slimmed; 17 tokens of 16 px images."""
    return ViT(dim, depth, 2, img_size=16, patch_size=4, pos_embed="sincos", frozen_patch_embed=True, init="mocov3",
               slim="input")


def is_uniform(w, bound, tol=0.05):
    """w looks like a U(-bound, bound) draw: inside the bound, reaching it, standard deviation bound / sqrt(3)."""
    top = w.abs().max().item()
    return 0.97 * bound < top <= bound and abs(w.std().item() * math.sqrt(3) / bound - 1) < tol


def input_linears(model):
    return [m for m in model.modules() if isinstance(m, SlimLinear) and m.slim_in]


# ----------------------------------------------------------------------------------------------
# MoCo v3's ViT: sin-cos position embedding, frozen patch projection, init

def test_sincos_pos_embed_is_fixed_and_right_at_every_width():
    torch.manual_seed(0)
    model = tiny_mocov3_vit()
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" in model.state_dict()
    assert "pos_embed" not in dict(model.named_parameters())
    pe = model.pos_embed[0].double()
    assert pe.shape == (17, 48) and not pe[0].any()  # the class token's row is zero
    for n in range(16):  # direct formula: patch n at row n // 4, column n % 4; 4 channels per frequency
        h, w = divmod(n, 4)
        for i in range(12):
            om = 10000.0 ** (-i / 12)
            want = [math.sin(w * om), math.cos(w * om), math.sin(h * om), math.cos(h * om)]
            torch.testing.assert_close(pe[1 + n, 4 * i:4 * i + 4], torch.tensor(want, dtype=pe.dtype), atol=1e-6,
                                       rtol=0)
    x = torch.randn(3, 3, 16, 16)
    for c in (16, 32, 48):  # each width's slice: a sin-cos of both axes, every position distinct
        sl = pe[1:, :c].reshape(4, 4, c // 4, 4)  # (row, column, frequency, sin w|cos w|sin h|cos h)
        torch.testing.assert_close(sl[..., 0] ** 2 + sl[..., 1] ** 2, torch.ones_like(sl[..., 0]))
        torch.testing.assert_close(sl[..., 2] ** 2 + sl[..., 3] ** 2, torch.ones_like(sl[..., 2]))
        assert torch.equal(sl[..., :2], sl[:1, :, :, :2].expand_as(sl[..., :2]))  # column code: same in every row
        assert torch.equal(sl[..., 2:], sl[:, :1, :, 2:].expand_as(sl[..., 2:]))  # row code: same in every column
        assert len({tuple(r.tolist()) for r in pe[1:, :c]}) == 16
        # the forward at width c adds exactly the leading c channels
        set_active(model, c / 48)
        with torch.no_grad():
            ref = model(x)
            saved = model.pos_embed.clone()
            model.pos_embed[..., c:] = 7.0
            same = model(x)
            model.pos_embed[..., :c] += 1.0
            moved = model(x)
            model.pos_embed.copy_(saved)
        assert torch.equal(ref, same) and not torch.allclose(ref, moved)
    set_active(model, 1.0)


@pytest.mark.parametrize("init", ["trunc_normal", "mocov3"])
def test_frozen_patch_projection_is_xavier_zero_bias_and_never_trained(init):
    """MoCo v3's stop-grad patch projection (the release's --stop-grad-conv1): Xavier-uniform over the (D, 3 p^2)
    weight, zero bias, neither trained; exported slices keep both."""
    torch.manual_seed(0)
    model = ViT(48, 1, 2, img_size=16, patch_size=4, pos_embed="sincos", frozen_patch_embed=True, init=init)
    pe = model.patch_embed
    assert not pe.weight.requires_grad and not pe.bias.requires_grad and not pe.bias.any()
    assert is_uniform(pe.weight, math.sqrt(6 / (3 * 4 * 4 + 48)), tol=0.1)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("patch_embed"))
    set_active(model, 0.5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert pe.weight.grad is None and pe.bias.grad is None and model.blocks[0].fc1.weight.grad is not None
    net = export(model, 0.5)
    assert isinstance(net.pos_embed, torch.Tensor) and not isinstance(net.pos_embed, nn.Parameter)
    assert net.pos_embed.shape == (1, 17, 32) and torch.equal(net.pos_embed, model.pos_embed[..., :32])
    assert net.patch_embed.weight.shape == (32, 3, 4, 4) and not net.patch_embed.bias.any()
    assert not net.patch_embed.weight.requires_grad and not net.patch_embed.bias.requires_grad
    with pytest.raises(ValueError, match="pos_embed='fixed', allowed: learned, sincos"):
        ViT(48, 1, 2, img_size=16, patch_size=4, pos_embed="fixed")
    with pytest.raises(ValueError, match="init='xavier', allowed: trunc_normal, mocov3"):
        ViT(48, 1, 2, img_size=16, patch_size=4, init="xavier")
    with pytest.raises(ValueError, match="slim='heads', allowed: embed, input"):
        ViT(48, 1, 2, img_size=16, patch_size=4, slim="heads")


def check_mocov3_init(net):
    """Every Linear Xavier-uniform from its own shape, qkv as three (D_out/3, D_in) blocks; zero biases; class
    token N(0, 1e-6^2); patch projection Xavier over (D, 3 p^2) with a zero bias; LayerNorms 1 and 0."""
    for blk in net.blocks:
        w = blk.attn.qkv.weight
        d, cin = w.shape[0] // 3, w.shape[1]
        for part in w.detach().chunk(3):  # q, k, v
            assert is_uniform(part, math.sqrt(6 / (d + cin)))
        assert w.abs().max() > 1.1 * math.sqrt(6 / (3 * d + cin))  # not the fused (3D, D_in) layer's bound
        for m in (blk.attn.proj, blk.fc1, blk.fc2):
            assert is_uniform(m.weight, math.sqrt(6 / sum(m.weight.shape))), m
        for m in (blk.norm1, blk.norm2):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
    assert all(not m.bias.any() for m in net.modules() if isinstance(m, nn.Linear))
    assert 0 < net.cls_token.abs().max() < 1e-5
    w = net.patch_embed.weight  # (D, 3, p, p)
    assert is_uniform(w, math.sqrt(6 / (w[0].numel() + w.shape[0])), tol=0.1)  # fan_in 3 p^2, fan_out D
    assert w.abs().max() > 1.5 * math.sqrt(6 / (w[0].numel() + w.shape[0] * w[0, 0].numel()))  # not torch's 4-D fans
    assert not net.patch_embed.bias.any()


def test_mocov3_init_from_each_layers_own_shape():
    torch.manual_seed(0)
    model = ViT(128, 1, 2, img_size=16, patch_size=4, pos_embed="sincos", init="mocov3")  # patch projection trained
    assert model.patch_embed.weight.requires_grad
    check_mocov3_init(model)
    # models.reinit of an exported slice: a network of the slice's own shapes, initialized as one
    for slim, width, shape in (("embed", 0.5, (192, 64)), ("input", 0.37, (192, 48))):  # input: 1 head of 64 dims
        torch.manual_seed(0)
        model = ViT(128, 1, 2, img_size=16, patch_size=4, pos_embed="sincos", init="mocov3", slim=slim)
        net = reinit(export(model, width, check_stats=False))
        qkv = net.blocks[0].attn.qkv
        assert type(qkv) is nn.Linear and qkv.weight.shape == shape
        check_mocov3_init(net)
    # the other archs keep their init (timm / DeiT): trunc N(0, 0.02^2)
    torch.manual_seed(0)
    model = ViT(128, 1, 2, img_size=16, patch_size=4)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() / 0.02 - 1) < 0.05
    assert abs(model.cls_token.std().item() / 0.02 - 1) < 0.5


# ----------------------------------------------------------------------------------------------
# slim="input": the release's slimming (each Linear reads the leading features of a full-width input)

def test_input_slimming_is_the_full_network_with_later_input_columns_zeroed():
    """At width w, qkv / proj / fc1 read the leading make_divisible(D w) features, fc2 the leading
    make_divisible(4 D w) hidden units, the residual stream stays full: the release's network, i.e. the
    full-width one with the later input columns of these four weights zeroed. Only what is read is computed
    (q, k, v of the heads proj reads; the hidden units fc2 reads): gradients reach exactly export's slice."""
    torch.manual_seed(0)
    model = tiny_input_vit()
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for w, n, h in ((1.0, 64, 256), (0.5, 32, 128), (0.37, 24, 96), (0.25, 16, 64)):
        set_active(model, w)
        blk = model.blocks[0]
        assert [m.in_active for m in (blk.attn.qkv, blk.attn.proj, blk.fc1, blk.fc2)] == [n, n, n, h]
        assert (blk.attn.qkv.out_active, blk.fc1.out_active) == (3 * 32 * math.ceil(n / 32), h)  # head dim 32
        with torch.no_grad():
            out = model(x)
        ref = copy.deepcopy(model)
        set_active(ref, 1.0)
        with torch.no_grad():
            for m in input_linears(ref):
                m.weight[:, make_divisible(m.in_features * w):] = 0
            want = ref(x)
        assert out.shape == (4, 64)  # features at full width at every width
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        outs.append(out)
        model.zero_grad()
        model(x).square().sum().backward()
        index, linears = slice_index(model, w), set(input_linears(model))
        for mname, m in model.named_modules():
            if m in linears:
                for pname, p in m.named_parameters():
                    inside = torch.zeros(p.numel(), dtype=torch.bool)
                    inside[index[f"{mname}.{pname}"]] = True
                    g = p.grad.view(-1)
                    assert not g[~inside].any(), (w, mname, pname)
                    if p.ndim == 2:  # (biases: k's gets none, softmax is shift-invariant)
                        live = inside.clone()
                        if mname.endswith("qkv"):  # v of a partly read head past n: computed, never read
                            live.view(3, -1, p.shape[1])[2, n:] = False
                        assert g[live].ne(0).float().mean() > 0.99 and not g[inside & ~live].any(), (w, mname)
        # NOTE: norm1 / norm2 affine entries past n scale features no Linear reads (no gradient), as in the release
        assert model.norm.weight.grad.ne(0).all() and model.patch_embed.weight.grad is None
    assert all(not torch.allclose(outs[0], o) for o in outs[1:])
    set_active(model, 1.0)


@pytest.mark.parametrize("width", [1.0, 0.5, 0.37, 0.25, "min"])
def test_input_export_profile_and_rebuild(width):
    """export: a plain ViT (patch projection, LayerNorms and residual stream at full width; qkv reading n
    features for ceil(n / head_dim) heads, proj reading n, fc1 n -> h, fc2 h -> D) whose output equals the
    slimmed network's, which rebuilds from the arch and loads the saved weights; profile: its parameters and
    MACs, against a formula and against PyTorch's FLOP counter."""
    torch.manual_seed(0)
    model, other = tiny_input_vit(), tiny_input_vit()
    width = min_width(model) if width == "min" else width
    x = torch.randn(3, 3, 16, 16)
    calibrate_bn(model, [x], width)  # no BN in a ViT: only selects the sub-network
    with torch.no_grad():
        ref = model.eval()(x)
    net = export(model, width)
    assert not [n for n, m in net.named_modules() if isinstance(m, SLIM)]
    d, n, h = 64, make_divisible(64 * width), make_divisible(256 * width)
    a = 32 * math.ceil(n / 32)  # the width of the heads computed (head dim 32)
    shapes = [(n, 3 * a), (n, d), (n, h), (h, d)]
    for blk in net.blocks:
        assert [(m.in_features, m.out_features) for m in (blk.attn.qkv, blk.attn.proj, blk.fc1, blk.fc2)] == shapes
        assert blk.norm1.normalized_shape == blk.norm2.normalized_shape == (d,)
    assert net.patch_embed.weight.shape == (d, 3, 4, 4) and not net.patch_embed.weight.requires_grad
    fresh = export(other, width, check_stats=False)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        out = net(x)
        assert torch.equal(fresh(x), out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    T = 17  # tokens: 16 patches + class token
    linear = sum(o * (i + 1) for i, o in shapes)  # weights and biases of a block's four Linears
    full_linear = sum(o * (i + 1) for i, o in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)])
    params, macs = profile(model, width, input_size=16)
    assert params == sum(p.numel() for p in model.parameters()) - 2 * (full_linear - linear)
    assert macs == 16 * d * 48 + 2 * (T * sum(o * i for i, o in shapes) + 2 * T * T * a)
    assert (params, macs) == (sum(p.numel() for p in net.parameters()), counted_macs(net, 16))


def test_input_min_width_and_the_release_archs():
    torch.manual_seed(0)
    model = tiny_input_vit()
    floor = min_width(model)
    assert floor == 8 / 256  # fc2 reads 256 hidden units at full width
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        at_floor = set_active(model, floor)(x)
        assert {m.in_active for m in input_linears(model)} == {8}  # every Linear reads 8 features
        assert torch.equal(set_active(model, floor / 2)(x), at_floor)  # below it: the same network
        assert not torch.equal(set_active(model, 1.5 * floor)(x), at_floor)
    # the release's us_vit_tiny / us_vit_small (built, not run): 224 px, 16 x 16 patches, head dim 32
    for arch, dim, heads in (("vit_tiny_us3l", 192, 6), ("vit_small_us3l", 384, 12)):
        m = ARCHS[arch]()
        assert (m.slim, m.init, m.img_size, m.feature_dim, len(m.blocks), m.blocks[0].attn.heads) == (
            "input", "mocov3", 224, dim, 12, heads)
        assert type(m.patch_embed) is nn.Conv2d and m.patch_embed.kernel_size == (16, 16)
        assert not m.patch_embed.weight.requires_grad and not m.patch_embed.bias.any()
        assert m.pos_embed.shape == (1, 197, dim) and "pos_embed" not in dict(m.named_parameters())
        assert len(input_linears(m)) == 48 and min_width(m) == 8 / (4 * dim)
        assert not any(b.attn.proj.slim_out or b.fc2.slim_out for b in m.blocks)  # the residual stream stays full


def test_make_individual_input_vit():
    """The individual baseline (the release's run.sh: us_vit_tiny trained at one --width-mult): the slice holds
    a plain network of its own init, every unread weight column is zero and stays out of the output."""
    torch.manual_seed(0)
    model = make_individual_(tiny_input_vit(), 0.5)
    net = export(model, 0.5, check_stats=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(set_active(model, 0.5)(x), net(x))
    index = slice_index(model, 0.5)
    for name, p in model.named_parameters():
        outside = torch.ones(p.numel(), dtype=torch.bool)
        outside[index[name]] = False
        assert not p.view(-1)[outside].any(), name
    for m in input_linears(model):  # the unread input columns, in particular
        assert not m.weight[:, m.in_active:].any()
    check_mocov3_init(net)  # Xavier bounds of the (.., 32) and (.., 128) slices, not of the full layers
    assert not model.patch_embed.weight.requires_grad
