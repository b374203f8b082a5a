"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions (kernels/winograd.py) against torch's F.conv2d, and which
path a call takes.

Tolerance: max abs difference from F.conv2d <= 2e-5 + 2e-6 * (output max abs) for F(2x2, 3x3), <= 2e-5 + 1e-5 *
(output max abs) for F(4x4, 3x3), in fp32, inputs of unit scale and weights scaled by 1 / sqrt(9 C) (outputs of
magnitude ~1-6). Against an fp64 convolution on these shapes F(2x2)'s error measured <= 3e-6 (as oneDNN's),
F(4x4)'s <= 2e-5 here and 5e-5 at 256 channels (its transforms' constants, up to 8, enlarge the GEMMs' rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musiclm_core.kernels import winograd as W


def close(y: torch.Tensor, ref: torch.Tensor, m: int = 2) -> float:
    """Max abs difference, checked against the tolerance above for output tile m."""
    err = (y - ref).abs().max().item()
    assert err <= 2e-5 + (2e-6 if m == 2 else 1e-5) * ref.abs().max().item(), err
    return err


def make(B, C, K, H, Wd, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, Wd, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(K, C, 3, 3, generator=g) / (9 * C) ** 0.5
    return x, weight, torch.randn(K, generator=g)


# Odd and even sizes, 1-pixel images (the padding is all the tile sees), sizes that leave a cut-off last tile.
SHAPES = [(1, 8, 5, 1, 1), (2, 8, 5, 3, 5), (1, 4, 6, 7, 2), (2, 16, 16, 9, 9), (1, 3, 4, 2, 3), (2, 32, 24, 16, 6),
          (1, 24, 40, 5, 16)]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_matches_conv2d(shape, channels_last, m):
    x, weight, bias = make(*shape, channels_last=channels_last)
    U = W.winograd_weight(weight, m)
    assert U.shape == ((m + 2) ** 2, shape[2], shape[1])
    ref = W.conv3x3_reference(x, weight, bias)
    y = W.conv3x3(x, U, bias)
    assert y.shape == ref.shape
    close(y, ref, m)
    close(W.conv3x3(x, U), W.conv3x3_reference(x, weight), m)  # without a bias


@pytest.mark.parametrize("m", [2, 4])
def test_matmul_fallback(monkeypatch, m):
    """Without oneDNN the 16 (36) GEMMs are torch.matmul calls on the plain weights: same result."""
    from musiclm_core.kernels import packed

    x, weight, bias = make(2, 16, 12, 5, 6)
    U = W.winograd_weight(weight, m)
    monkeypatch.setattr(packed, "ONEDNN", False)
    close(W.conv3x3(x, U, bias), F.conv2d(x, weight, bias, padding=1), m)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("tiles", [1, 3, 8])
def test_bands_match_whole(tiles, m):
    """Images of more than 2 * tiles tiles go in bands of tile rows per batch item: same result, also when the
    last band is short and the image is not a multiple of the tile."""
    x, weight, bias = make(2, 16, 12, 23, 14, seed=1)
    U = W.winograd_weight(weight, m)
    ref = F.conv2d(x, weight, bias, padding=1)
    close(W.conv3x3(x, U, bias, tiles=tiles), ref, m)
    assert (W.conv3x3(x, U, bias, tiles=tiles) - W.conv3x3(x, U, bias, tiles=10 ** 6)).abs().max() < 1e-5


@pytest.mark.parametrize("m", [2, 4])
def test_output_layout_and_listening(m):
    """The result is channels-last in memory (what the models feed on), and moves when the input does."""
    x, weight, bias = make(2, 16, 16, 8, 6)
    U = W.winograd_weight(weight, m)
    y = W.conv3x3(x, U, bias)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x2 = x.clone()
    x2[0, 3, 4, 2] += 1.0  # one pixel: moves the 3x3 neighbourhood around it, nothing else
    changed = (W.conv3x3(x2, U, bias) - y).abs().amax(dim=1) > 1e-5  # (B, H, W)
    expected = torch.zeros_like(changed)
    expected[0, 3:6, 1:4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("m", [2, 4])
def test_weight_transform_in_float64(m):
    """U = G g G^T: a 3x3 kernel with a single 1 at (r, s) gives the outer product of G's columns r and s."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 0, 2] = 1.0
    g = torch.tensor(W.G if m == 2 else W.G4, dtype=torch.float64)
    expected = torch.outer(g[:, 0], g[:, 2]).reshape((m + 2) ** 2).float()  # rounded once, as winograd_weight's
    assert torch.equal(W.winograd_weight(weight, m)[:, 0, 0], expected)
    with pytest.raises(ValueError, match="output tile 3"):
        W.winograd_weight(weight, 3)


@pytest.mark.parametrize("block", [W.TRANSFORM_BLOCK, 12, 1])
def test_weight_transforms_in_blocks(monkeypatch, block):
    """Both transforms made in blocks of output channels (several, a short last one, one channel each) equal the
    sandwich g w g^T of every kernel computed whole in float64 (to fp32 rounding: the sums run in another order)."""
    monkeypatch.setattr(W, "TRANSFORM_BLOCK", block)
    weight = torch.randn(7, 5, 3, 3)
    for m, g in ((2, W.G), (4, W.G4)):
        g = torch.tensor(g, dtype=torch.float64)
        expected = torch.einsum("ar,kcrs,bs->abkc", g, weight.double(), g).reshape((m + 2) ** 2, 7, 5).float()
        torch.testing.assert_close(W.winograd_weight(weight, m), expected, rtol=0, atol=1e-6)
    p = torch.tensor(W.UPSAMPLE_TAPS, dtype=torch.float64)
    Wpq = torch.einsum("pr,kcrs,qs->pqkc", p, weight.double(), p)  # (3, 3, K, C)
    order = [(0, 0), (0, 2), (2, 0), (2, 2), (0, 1), (2, 1), (1, 0), (1, 2), (1, 1)]  # DD, Dx, xD, xx
    expected = torch.cat([Wpq[a, b] for a, b in order]).float()
    torch.testing.assert_close(W.upsample_weight(weight), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [2, 4])
def test_tables_are_minimal_filtering(m):
    """In exact (fp64) arithmetic A^T [(G g) * (B^T d)] is the correlation of d (m + 2 values) with g (3): the
    tables are right whatever the transform code does with them."""
    BT, G, AT = (W.BT, W.G, W.AT) if m == 2 else (W.BT4, W.G4, W.AT4)
    BT, G, AT = (torch.tensor(t, dtype=torch.float64) for t in (BT, G, AT))
    d, g = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([d[i:i + 3] @ g for i in range(m)])
    assert torch.allclose(AT @ ((G @ g) * (BT @ d)), expected, atol=1e-12)


def test_f4_transform_code_matches_tables():
    """_bt6 and _at6 (the shared-term sums) apply BT4 and AT4."""
    d = torch.randn(6, 5, 7, dtype=torch.float64)
    out = torch.empty_like(d)
    W._bt6(list(d), out)
    assert torch.allclose(out, torch.einsum("rs,sij->rij", torch.tensor(W.BT4, dtype=torch.float64), d))
    outs = [torch.empty(5, 7, dtype=torch.float64) for _ in range(4)]
    W._at6(list(d), outs)
    assert torch.allclose(torch.stack(outs), torch.einsum("rs,sij->rij", torch.tensor(W.AT4, dtype=torch.float64), d))


def test_f4_accuracy_against_fp64():
    """At 128 channels F(4x4, 3x3)'s error against an fp64 convolution stays within 2e-5 * (output max abs)
    (measured 8e-6 relative; F(2x2)'s 4e-7, oneDNN's 2e-7)."""
    x, weight, bias = make(1, 128, 128, 16, 16)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    err = (W.conv3x3(x, W.winograd_weight(weight, 4), bias).double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), err


@pytest.mark.parametrize("m", [2, 4])
def test_wrong_channels_raise(m):
    x, weight, _ = make(1, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="8 channels"):
        W.conv3x3(x, W.winograd_weight(weight[:, :6], m))


# -- the x2 upsampling convolution ------------------------------------------------------------------------------


def upsampled_reference(x, weight, bias=None):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("pixels", [1, 5, 10 ** 6])
@pytest.mark.parametrize("shape", [(1, 8, 5, 1, 1), (2, 8, 5, 3, 5), (2, 16, 12, 9, 4), (1, 24, 40, 5, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv3x3_matches_conv2d(shape, pixels, channels_last):
    """conv3x3 after a nearest x2 upsampling, in bands of every size (one row, a short last band, whole), against
    F.interpolate + F.conv2d; channels-last result; without a bias too."""
    x, weight, bias = make(*shape, channels_last=channels_last)
    U = W.upsample_weight(weight)
    assert U.shape == (9 * shape[2], shape[1])
    ref = upsampled_reference(x, weight, bias)
    y = W.upsample_conv3x3(x, U, bias, pixels=pixels)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    close(y, ref)
    close(W.upsample_conv3x3(x, U, pixels=pixels), upsampled_reference(x, weight))


def test_upsample_conv3x3_listens_and_checks():
    """One input pixel moves the 4x4 output block around its 2x2 copy, nothing else; a weight of other input
    channels is an error naming both."""
    x, weight, bias = make(1, 8, 6, 5, 4)
    U = W.upsample_weight(weight)
    y = W.upsample_conv3x3(x, U, bias)
    x2 = x.clone()
    x2[0, 2, 2, 1] += 1.0
    changed = (W.upsample_conv3x3(x2, U, bias) - y).abs().amax(dim=1) > 1e-5  # (B, 2H, 2W)
    expected = torch.zeros_like(changed)
    expected[0, 3:7, 1:5] = True
    assert torch.equal(changed, expected)
    with pytest.raises(ValueError, match="input of 8 channels"):
        W.upsample_conv3x3(x, W.upsample_weight(weight[:, :6]))


# -- dispatch ---------------------------------------------------------------------------------------------------


@pytest.fixture
def route(monkeypatch):
    """Set MUSICLM_CONV3X3 for one test (route() is read once per process: its cache is cleared around it)."""
    def set_route(value: str | None):
        if value is None:
            monkeypatch.delenv(W.ENV, raising=False)
        else:
            monkeypatch.setenv(W.ENV, value)
        W.route.cache_clear()
    yield set_route
    W.route.cache_clear()


def test_route_default_and_override(route):
    route(None)
    assert W.route() == "winograd"
    for name in ("conv", "winograd2", "winograd4", "winograd"):
        route(name)
        assert W.route() == name
    route("fast")
    with pytest.raises(ValueError, match="MUSICLM_CONV3X3='fast'"):
        W.route()


def test_eligible_calls():
    x = torch.randn(1, 256, 4, 4)
    w = torch.randn(256, 256, 3, 3)
    assert W.eligible(x, w)
    assert not W.eligible(x, torch.randn(256, 256, 1, 1))                           # not 3x3
    assert not W.eligible(x, w, stride=2)
    assert not W.eligible(x, w, padding=0)
    assert not W.eligible(x, w, dilation=2)
    assert not W.eligible(x, w, groups=2)
    assert not W.eligible(x, w, padding_mode="reflect")
    assert not W.eligible(x.double(), w.double())
    assert not W.eligible(x, w.requires_grad_())                 # training: autograd through F.conv2d
    with torch.no_grad():
        assert W.eligible(x, w)                                  # the same weight without gradients


def test_tile_choice(route):
    """F(4x4) from 128 channels on one thread (256 on more), F(2x2) from 256 where F(4x4)'s cut-off tiles would
    need more products (a 2-wide image), F.conv2d below; the routes winograd2 / winograd4 force one tile size
    (still from its channel count), conv none."""
    def t(C, K, H, Wd):
        return W.tile(torch.randn(1, C, H, Wd), torch.randn(K, C, 3, 3))
    route(None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert [t(256, 256, 16, 8), t(128, 128, 16, 8), t(128, 256, 16, 8), t(64, 256, 16, 8)] == [4, 4, 4, 0]
        assert [t(640, 640, 32, 2), t(128, 128, 32, 2), t(256, 256, 4, 4), t(256, 256, 1, 1)] == [2, 0, 4, 2]
        torch.set_num_threads(2)  # F(4x4) from 256 channels with more than one thread
        assert [t(256, 256, 16, 8), t(128, 128, 16, 8), t(128, 256, 16, 8)] == [4, 0, 0]
    finally:
        torch.set_num_threads(threads)
    assert not W.uses_winograd(torch.randn(1, 64, 8, 8), torch.randn(64, 64, 3, 3))
    assert W.tile(torch.randn(1, 256, 8, 8), torch.randn(256, 256, 3, 3), stride=2) == 0  # not eligible
    route("winograd2")
    assert [t(256, 256, 16, 8), t(128, 128, 16, 8), t(640, 640, 32, 2)] == [2, 0, 2]
    route("winograd4")
    assert [t(256, 256, 16, 8), t(128, 128, 16, 8), t(640, 640, 32, 2), t(64, 64, 16, 8)] == [4, 4, 4, 0]
    route("conv")
    assert [t(256, 256, 16, 8), t(128, 128, 16, 8)] == [0, 0]
    assert not W.uses_winograd(torch.randn(1, 256, 8, 8), torch.randn(256, 256, 3, 3))


def test_upsample_choice(route):
    """The upsampling route: any route but conv, from 256 channels in and out, eligible calls only."""
    x, w = torch.randn(1, 256, 4, 4), torch.randn(256, 256, 3, 3)
    for name, expect in ((None, True), ("winograd2", True), ("winograd4", True), ("conv", False)):
        route(name)
        assert W.uses_upsample_winograd(x, w) == expect, name
    route(None)
    assert not W.uses_upsample_winograd(torch.randn(1, 128, 4, 4), torch.randn(128, 128, 3, 3))
    assert not W.uses_upsample_winograd(x.double(), w.double())
    assert not W.uses_upsample_winograd(x, w.requires_grad_())


def test_layer_dispatch_and_cache(route, monkeypatch):
    """WinogradConv2d takes conv3x3 with the tile `tile` says, matches nn.Conv2d either way, and transforms its
    weight again after the weight changes in place."""
    monkeypatch.setattr(W, "MIN_CHANNELS", {2: 8, 4: 8})  # a small layer stands for a 256-channel one
    monkeypatch.setattr(W, "MIN_CHANNELS_THREADED", 8)
    torch.manual_seed(0)
    layer = W.WinogradConv2d(8, 12, 3, padding=1)
    plain = torch.nn.Conv2d(8, 12, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, 5)
    calls = []
    real = W.conv3x3
    monkeypatch.setattr(W, "conv3x3", lambda x, U, *a, **k: calls.append(U.shape[0]) or real(x, U, *a, **k))
    for name, expect in (("winograd", [36]), ("winograd2", [16]), ("winograd4", [36]), ("conv", [])):
        route(name)
        calls.clear()
        with torch.no_grad():
            close(layer(x), plain(x), 4)
        assert calls == expect, name
    route("winograd")
    with torch.no_grad():
        U4, U2 = layer.winograd_weight(4), layer.winograd_weight(2)
        assert layer.winograd_weight(4) is U4 and layer.winograd_weight(2) is U2  # cached, each tile size
        layer.weight.mul_(2)
        plain.weight.mul_(2)
        Uup = layer.upsample_weight()
        assert layer.upsample_weight() is Uup
        layer.weight.mul_(2)
        plain.weight.mul_(2)
        assert layer.winograd_weight(4) is not U4 and layer.upsample_weight() is not Uup  # remade after the update
        close(layer(x), plain(x), 4)
        close(W.upsample_conv3x3(x, layer.upsample_weight(), layer.bias), plain(F.interpolate(x, scale_factor=2.0)))
    calls.clear()
    y = layer(x)  # gradients on: nn.Conv2d's own forward, differentiable
    assert not calls and y.requires_grad
    assert set(layer.state_dict()) == {"weight", "bias"}  # the cache is never saved


# -- in the models ----------------------------------------------------------------------------------------------


def test_unet_fast_routes_match_plain(route, monkeypatch):
    """A tiny UNet (latent height 14: one upsampling x2, one 4 -> 7) with its CPU routes on (Winograd for every
    3x3 conv of 16+ channels, the folded x2 upsampling convs, oneDNN linears) against the same UNet with them off
    (route "conv", MKL linears, upsampling by F.interpolate + conv): max abs <= 1e-5 on outputs of order 1."""
    import musiclm_core.unet as unet_module
    from musiclm_core.unet import PRESETS, UNet, UpsampleConv

    torch.manual_seed(0)
    model = UNet(PRESETS["tiny-audioldm2"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 8, 14, 8)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 5, 24), encoder_hidden_states_1=torch.randn(2, 7, 40))
    monkeypatch.setattr(W, "MIN_CHANNELS", {2: 16, 4: 16})
    monkeypatch.setattr(W, "MIN_CHANNELS_THREADED", 16)
    route("winograd")
    calls = []
    real = W.conv3x3
    monkeypatch.setattr(W, "conv3x3", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fast = model(x, 10, **kwargs)
    assert calls  # Winograd did run

    route("conv")
    monkeypatch.setattr(unet_module, "ONEDNN_LINEAR", False)
    monkeypatch.setattr(UpsampleConv, "forward",
                        lambda self, h, size: torch.nn.Conv2d.forward(self, F.interpolate(h, size=size)))
    with torch.no_grad():
        plain = model(x, 10, **kwargs)
        assert (model(x, 20, **kwargs) - plain).abs().max() > 1e-3  # the comparison can fail
    assert (fast - plain).abs().max().item() <= 1e-5


def test_unet_dense_matches_f_linear(monkeypatch):
    """unet.dense (oneDNN's matmul on 16+ rows) against F.linear, with and without a bias, 3-D input; a layer that
    is not a plain nn.Linear (a LoRA adapter) is called as it is."""
    import musiclm_core.unet as unet_module

    monkeypatch.setattr(unet_module, "ONEDNN_LINEAR", True)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 17, 48)
    for bias in (True, False):
        layer = torch.nn.Linear(48, 40, bias=bias)
        with torch.no_grad():
            close(unet_module.dense(layer, x), F.linear(x, layer.weight, layer.bias))
    assert len(calls) == 2

    class Adapter(torch.nn.Linear):
        def forward(self, h):
            return super().forward(h) + 1.0

    adapter = Adapter(48, 40)
    with torch.no_grad():
        close(unet_module.dense(adapter, x), F.linear(x, adapter.weight, adapter.bias) + 1.0)
    assert len(calls) == 2


def test_layer_cache_is_packed_and_left_out_of_copies(route):
    """WinogradConv2d keeps its transformed weight packed for oneDNN (no plain copy besides); a deep copy or a
    pickle of a layer that has run leaves the cache behind, and the copy computes the same on its own."""
    import copy
    import pickle

    from musiclm_core.kernels import packed

    if not packed.ONEDNN:
        pytest.skip("torch built without oneDNN")
    route("winograd")
    torch.manual_seed(0)
    layer = W.WinogradConv2d(256, 256, 3, padding=1)
    x = torch.randn(1, 256, 12, 8)
    with torch.no_grad():
        y = layer(x)
        assert all(isinstance(U, packed.Packed) for _, U in layer._winograd.values()) and layer._winograd
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._winograd == {}
            assert (clone(x) - y).abs().max() <= 1e-5
        close(y, F.conv2d(x, layer.weight, layer.bias, padding=1), W.tile(x, layer.weight, padding=1))
