"""kernels/packed.py: oneDNN matmuls against weights packed once, cached per weight until it changes."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from musiclm_core.kernels import packed

pytestmark = pytest.mark.skipif(not packed.ONEDNN, reason="torch built without oneDNN")

TOL = 1e-5  # fp32 sums in another order, on outputs of order 1-5


def test_linear_matches_f_linear():
    """Whole weight with and without a bias on 2-D and 3-D input, a row range, a stacked weight's matrix, a 1x1
    convolution's channels-last weight on a permuted (strided) input, and the fused exact GELU."""
    torch.manual_seed(0)
    x = torch.randn(2, 17, 48)
    w, b = torch.randn(40, 48) / 7, torch.randn(40)
    with torch.no_grad():
        assert (packed.linear(x, w, b) - F.linear(x, w, b)).abs().max() <= TOL
        assert (packed.linear(x[0], w) - F.linear(x[0], w)).abs().max() <= TOL
        assert (packed.linear(x, w, b[8:24], part=(8, 24)) - F.linear(x, w[8:24], b[8:24])).abs().max() <= TOL
        assert (packed.linear(x, w, b, post="gelu") - F.gelu(F.linear(x, w, b))).abs().max() <= TOL
        U = torch.randn(5, 40, 48) / 7
        assert (packed.linear(x, U, part=3) - F.linear(x, U[3])).abs().max() <= TOL
        conv = torch.nn.Conv2d(48, 40, 1).to(memory_format=torch.channels_last)
        image = torch.randn(2, 48, 6, 5).contiguous(memory_format=torch.channels_last)
        y = packed.linear(image.permute(0, 2, 3, 1), conv.weight, conv.bias).permute(0, 3, 1, 2)
        assert (y - conv(image)).abs().max() <= TOL


def test_cached_until_the_weight_changes():
    """One packed copy per (weight, part), reused; an in-place update of the weight makes a new one, whose
    results follow the new values; a dead weight's entry goes with it."""
    torch.manual_seed(0)
    x = torch.randn(20, 16)
    layer = torch.nn.Linear(16, 12)
    with torch.no_grad():
        first = packed.cached(layer.weight)
        assert packed.cached(layer.weight) is first
        assert packed.cached(layer.weight, (0, 6)) is not first  # a part has its own copy
        layer.weight.mul_(2)
        assert packed.cached(layer.weight) is not first
        assert (packed.linear(x, layer.weight, layer.bias) - layer(x)).abs().max() <= TOL
        layer.weight = torch.nn.Parameter(torch.randn(12, 16))  # another tensor, maybe at the same address
        assert (packed.linear(x, layer.weight, layer.bias) - layer(x)).abs().max() <= TOL
    before = len(packed._PACKED)
    weight = torch.randn(8, 16)
    packed.cached(weight)
    assert len(packed._PACKED) == before + 1
    del weight
    gc.collect()
    assert len(packed._PACKED) == before


def test_modules_stay_copyable():
    """The packed copies (opaque tensors, which deepcopy cannot copy) are not stored on the modules: a model that
    has run through the route deep-copies and state_dicts as before."""
    layer = torch.nn.Linear(16, 12)
    with torch.no_grad():
        packed.linear(torch.randn(20, 16), layer.weight, layer.bias)
    clone = copy.deepcopy(layer)
    assert set(clone.state_dict()) == {"weight", "bias"}
    assert torch.equal(clone.weight, layer.weight)


def test_available_only_for_cpu_fp32_without_gradients():
    w = torch.randn(4, 3)
    assert packed.available(torch.randn(2, 3), w)
    assert not packed.available(torch.randn(2, 3, dtype=torch.bfloat16), w)
    assert not packed.available(torch.randn(2, 3, requires_grad=True), w)
    with torch.no_grad():
        assert packed.available(torch.randn(2, 3, requires_grad=True), w)
    assert packed.packable(w) and not packed.packable(w.double())
    assert not packed.packable(w.requires_grad_()) and not packed.available(torch.randn(2, 3), w)
    with torch.no_grad():
        assert packed.packable(w)
