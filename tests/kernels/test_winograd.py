"""Winograd F(2x2, 3x3) convolutions (kernels/winograd.py) against torch's F.conv2d, and which path a call takes.

Tolerance: max abs difference from F.conv2d <= 2e-5 + 2e-6 * (output max abs), in fp32, inputs and weights of
unit scale with the weight scaled by 1 / sqrt(9 C) (outputs of magnitude ~1-5). Both are fp32 sums of the same
products in a different order; against an fp64 convolution Winograd's error measured 2e-6, oneDNN's 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from musiclm_core.kernels import winograd as W


def close(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, checked against the tolerance above."""
    err = (y - ref).abs().max().item()
    assert err <= 2e-5 + 2e-6 * ref.abs().max().item(), err
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_matches_conv2d(shape, channels_last):
    x, weight, bias = make(*shape, channels_last=channels_last)
    U = W.winograd_weight(weight)
    ref = W.conv3x3_reference(x, weight, bias)
    y = W.conv3x3(x, U, bias)
    assert y.shape == ref.shape
    close(y, ref)
    close(W.conv3x3(x, U), W.conv3x3_reference(x, weight))  # without a bias


def test_bmm_fallback(monkeypatch):
    """Without oneDNN the 16 GEMMs are one torch.bmm: same result."""
    x, weight, bias = make(2, 16, 12, 5, 6)
    U = W.winograd_weight(weight)
    monkeypatch.setattr(W, "ONEDNN", False)
    close(W.conv3x3(x, U, bias), F.conv2d(x, weight, bias, padding=1))


@pytest.mark.parametrize("tiles", [1, 3, 8])
def test_bands_match_whole(tiles):
    """Images of more than 2 * tiles tiles go in bands of tile rows per batch item: same result, also when the
    last band is short and the image is odd-sized."""
    x, weight, bias = make(2, 16, 12, 11, 7, seed=1)
    U = W.winograd_weight(weight)
    ref = F.conv2d(x, weight, bias, padding=1)
    close(W.conv3x3(x, U, bias, tiles=tiles), ref)
    assert (W.conv3x3(x, U, bias, tiles=tiles) - W.conv3x3(x, U, bias)).abs().max() < 1e-5


def test_output_layout_and_listening():
    """The result is channels-last in memory (what the models feed on), and moves when the input does."""
    x, weight, bias = make(2, 16, 16, 8, 6)
    U = W.winograd_weight(weight)
    y = W.conv3x3(x, U, bias)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x2 = x.clone()
    x2[0, 3, 4, 2] += 1.0  # one pixel: moves the 3x3 neighbourhood around it, nothing else
    changed = (W.conv3x3(x2, U, bias) - y).abs().amax(dim=1) > 1e-6  # (B, H, W)
    expected = torch.zeros_like(changed)
    expected[0, 3:6, 1:4] = True
    assert torch.equal(changed, expected)


def test_weight_transform_in_float64():
    """U = G g G^T: a 3x3 kernel with a single 1 at (r, s) gives the outer product of G's columns r and s."""
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 0, 2] = 1.0
    g = torch.tensor(W.G)
    assert torch.allclose(W.winograd_weight(weight)[:, 0, 0], torch.outer(g[:, 0], g[:, 2]).reshape(16))


def test_wrong_channels_raise():
    x, weight, _ = make(1, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="8 channels"):
        W.conv3x3(x, W.winograd_weight(weight[:, :6]))


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
    route("conv")
    assert W.route() == "conv"
    route("fast")
    with pytest.raises(ValueError, match="MUSICLM_CONV3X3='fast'"):
        W.route()


def test_eligible_calls():
    x = torch.randn(1, 256, 4, 4)
    w = torch.randn(256, 256, 3, 3)
    assert W.eligible(x, w)
    assert not W.eligible(torch.randn(1, 128, 4, 4), torch.randn(256, 128, 3, 3))  # too few input channels
    assert not W.eligible(x, torch.randn(128, 256, 3, 3))                           # too few output channels
    assert not W.eligible(x, torch.randn(256, 256, 1, 1))                           # not 3x3
    assert not W.eligible(x, w, stride=2)
    assert not W.eligible(x, w, padding=0)
    assert not W.eligible(x, w, dilation=2)
    assert not W.eligible(x, w, padding_mode="reflect")
    assert not W.eligible(x.double(), w.double())
    assert not W.eligible(x, w.requires_grad_())                 # training: autograd through F.conv2d
    with torch.no_grad():
        assert W.eligible(x, w)                                  # the same weight without gradients


def test_layer_dispatch_and_cache(route, monkeypatch):
    """WinogradConv2d takes conv3x3 exactly when uses_winograd says so, matches nn.Conv2d either way, and
    transforms its weight again after the weight changes in place."""
    monkeypatch.setattr(W, "MIN_CHANNELS", 8)  # a small layer stands for a 256-channel one
    torch.manual_seed(0)
    layer = W.WinogradConv2d(8, 12, 3, padding=1)
    plain = torch.nn.Conv2d(8, 12, 3, padding=1)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 6, 5)
    calls = []
    real = W.conv3x3
    monkeypatch.setattr(W, "conv3x3", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, expect in (("winograd", 1), ("conv", 0)):
        route(name)
        calls.clear()
        with torch.no_grad():
            close(layer(x), plain(x))
        assert len(calls) == expect, name
    route("winograd")
    with torch.no_grad():
        U = layer.winograd_weight()
        assert layer.winograd_weight() is U  # cached
        layer.weight.mul_(2)
        plain.weight.mul_(2)
        assert layer.winograd_weight() is not U  # remade after the in-place update
        close(layer(x), plain(x))
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
    monkeypatch.setattr(W, "MIN_CHANNELS", 16)
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
