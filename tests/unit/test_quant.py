"""Weight-only bf16 / int8 / int4 linears (kernels/quant.py): the fast CPU path against the dequantised reference,
and the MusicGen LM with quantised weights.

Tolerances:
* int8 reference path vs F.linear with the dequantised fp32 weight: max abs error <= 1e-5 (same maths, fp32).
* CPU paths vs the reference on the same rounded inputs (activations rounded to bf16, as the kernels do), computed
  in float64: |y - ref| <= 2^-8 |ref| + 1e-5 * (|x| @ |W|^T), i.e. one bf16 rounding of the output plus fp32
  accumulation-order noise.
* int4: codes within half a step of the weight (scale / 2, plus bf16 rounding of the offset); the kernel against the
  dequantised reference with the same bound as int8.
* Tiny MusicGen LM, logits vs fp32: max abs error <= 1% (bf16) / 2% (int8) / 10% (int4) of the largest fp32 logit
  (measured: 0.37% / 0.53% / 6.7%), and > 0 (the weights really changed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from musiclm_core import generate as G
from musiclm_core.kernels import quant
from musiclm_core.kernels.quant import (BF16Linear, Int4Linear, Int8Linear, quantize_int4, quantize_int8,
                                        quantize_weights)
from musiclm_core.musicgen import PRESETS, MusicGenLM


def _linear(n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight[3].mul_(20.0)  # rows of different ranges: the scales must be per output channel
        lin.weight[5].zero_()     # an all-zero row
    return lin


def _bound(x_rounded: torch.Tensor, w: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """One bf16 rounding of the product (before any bias) plus fp32 accumulation noise."""
    return 2.0 ** -8 * product.abs() + 1e-5 * (x_rounded.abs().double() @ w.abs().double().T)


def test_quantize_int8_scales_and_rounding():
    w = _linear(96, 40, False, 0).weight.detach()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (40,)
    assert int(q.abs().max()) == 127 and int(q.abs().min()) == 0  # the full range is used
    amax = w.abs().amax(dim=1)
    nonzero = amax > 0
    assert bool((scale.float()[nonzero] >= amax[nonzero] / 127).all())       # rounded up, never down
    assert bool((scale.float()[nonzero] <= amax[nonzero] / 127 * (1 + 2 ** -7)).all())  # by at most one bf16 step
    assert float(scale[5]) == 1.0 and not q[5].any()                        # zero row: scale 1, codes 0
    error = (q.float() * scale.float()[:, None] - w).abs()
    assert bool((error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all())  # round to nearest
    assert scale[3] > 10 * scale[0]  # per-channel: the scaled-up row has its own scale


@pytest.mark.parametrize("bias", [False, True])
def test_int8_reference_is_the_dequantised_linear(bias):
    layer = Int8Linear.from_linear(_linear(64, 48, bias, 1))
    x = torch.randn(2, 7, 64)
    ref = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    out = quant.int8_linear(x, layer.weight, layer.scale, layer.bias, backend="reference")
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", [(2, 1, 1024), (3, 64), (1, 5, 2, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_cpu_kernel_matches_reference(shape, bias):
    K = shape[-1]
    layer = Int8Linear.from_linear(_linear(K, 200, bias, 2))
    x = torch.randn(*shape) * 3
    layer.backend = "cpu"
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (*shape[:-1], 200)
    xr = x.to(torch.bfloat16).double()  # the kernel's activations
    w = layer.dequantized_weight(torch.float64)
    product = xr @ w.T  # rounded to bf16 by the kernel, before the bias is added
    ref = product + (0 if layer.bias is None else layer.bias.double())
    assert bool(((out.double() - ref).abs() <= _bound(xr, w, product) + 1e-6).all())


def test_int8_cpu_kernel_takes_non_contiguous_input():
    layer = Int8Linear.from_linear(_linear(64, 32, False, 3))
    x = torch.randn(64, 4).T  # (4, 64), stride 1 on the wrong dim
    assert torch.equal(quant.int8_linear(x, layer.weight, layer.scale, backend="cpu"),
                       quant.int8_linear(x.contiguous(), layer.weight, layer.scale, backend="cpu"))


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_paths_match_reference(bias):
    lin = _linear(128, 96, bias, 4)
    layer = BF16Linear.from_linear(lin)
    x = torch.randn(2, 3, 128)
    w = layer.dequantized_weight(torch.float64)
    # reference: fp32 activations, bf16 weights upcast
    layer.backend = "reference"
    ref = x.double() @ w.T + (0 if lin.bias is None else lin.bias.detach().double())
    assert (layer(x).double() - ref).abs().max() <= 1e-5
    # cpu: bf16 activations too, bf16 out
    layer.backend = "cpu"
    xr = x.to(torch.bfloat16).double()
    product = xr @ w.T
    ref = product + (0 if lin.bias is None else lin.bias.detach().double())
    out = layer(x)
    assert out.dtype == torch.float32
    assert bool(((out.double() - ref).abs() <= _bound(xr, w, product) + 1e-6).all())


def test_backend_switch(monkeypatch):
    layer = Int8Linear.from_linear(_linear(64, 32, True, 5))
    x = torch.randn(3, 64)
    ref = quant.int8_linear_reference(x, layer.weight, layer.scale, layer.bias)
    fast = quant.int8_linear(x, layer.weight, layer.scale, layer.bias, backend="cpu")
    assert not torch.equal(fast, ref)  # the two paths differ (bf16 activations), so the switch is observable
    assert torch.equal(layer(x), fast)  # auto on the CPU
    monkeypatch.setenv("MUSICLM_QUANT", "reference")
    assert torch.equal(layer(x), ref)
    monkeypatch.setenv("MUSICLM_QUANT", "triton")
    with pytest.raises(ValueError, match="MUSICLM_QUANT"):
        layer(x)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mode"):
        quantize_weights(nn.Sequential(nn.Linear(4, 4)), "int2")
    with pytest.raises(ValueError, match="inside"):
        quantize_weights(nn.Linear(4, 4), "int8")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_weights(nn.Sequential(nn.LayerNorm(4)), "bf16")
    with pytest.raises(ValueError, match="nn.Module"):
        quantize_weights(torch.zeros(3), "int8")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_int8(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8 \\(N, K\\)"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="activations on meta"):
        quant.int8_linear(torch.zeros(2, 4, device="meta"), torch.zeros(4, 4, dtype=torch.int8),
                          torch.ones(4, dtype=torch.bfloat16), backend="cpu")


# ---------------------------------------------------------------------------------------------------------------
# int4


def test_quantize_int4_groups_and_rounding():
    w = _linear(96, 64, False, 6).weight.detach().clone()
    w[7, 32:64] = 0.25  # a constant group
    codes, sz = quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 96) and int(codes.max()) == 15
    assert sz.dtype == torch.bfloat16 and sz.shape == (3, 64, 2)  # (K / 32 groups, N, scale and zero)
    scale = sz[..., 0].float().T.repeat_interleave(32, dim=1)  # (N, K)
    back = quant.dequantize_int4(codes, sz)
    assert bool(((back - w).abs() <= scale / 2 * 1.02 + 1e-6).all())  # nearest code (bf16 scale and zero)
    assert bool((back[7, 32:64] == back[7, 32]).all()) and abs(float(back[7, 32]) - 0.25) <= 0.25 * 2 ** -7
    assert not back[5].any()  # an all-zero row comes back as zeros
    assert sz[0, 3, 0] > 10 * sz[0, 0, 0]  # per group: the scaled-up row has its own scales


@pytest.mark.parametrize("bias", [False, True])
def test_int4_kernel_matches_reference(bias):
    lin = _linear(128, 192, bias, 7)
    layer = Int4Linear.from_linear(lin)
    assert torch.equal(layer.codes(), quantize_int4(lin.weight)[0])  # read back through the kernel, exactly
    w = layer.dequantized_weight().double()
    x = torch.randn(2, 5, 128)[:, ::2]  # non-contiguous rows
    xr = x.to(torch.bfloat16).double()
    product = xr @ w.T
    ref = product + (0 if lin.bias is None else lin.bias.detach().double())
    out = layer(x)
    assert out.shape == (2, 3, 192) and out.dtype == torch.float32
    assert bool(((out.double() - ref).abs() <= _bound(xr, w, product) + 1e-6).all())
    layer.backend = "reference"
    exact = torch.nn.functional.linear(x.double(), w, None if lin.bias is None else lin.bias.detach().double())
    assert (layer(x).double() - exact).abs().max() <= 1e-4


def test_int4_bad_inputs_raise():
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_int4(torch.zeros(64, 48))
    with pytest.raises(ValueError, match="N a multiple of 64"):
        Int4Linear.from_linear(nn.Linear(64, 96))
    with pytest.raises(ValueError, match="uint8 codes"):
        Int4Linear(torch.zeros(64, 64, dtype=torch.int8), torch.ones(2, 64, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="none of the 1 nn.Linear of Sequential fits the int4 kernel"):
        quantize_weights(nn.Sequential(nn.Linear(12, 64)), "int4")
    layer = Int4Linear.from_linear(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="CPU only"):
        layer(torch.zeros(2, 64, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# The MusicGen LM


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    lm = MusicGenLM(PRESETS["tiny"]).eval()
    B, Lt = 2, 6
    states = torch.randn(B, Lt, lm.config.text_dim)
    mask = torch.ones(B, Lt, dtype=torch.long)
    mask[1, 3:] = 0
    codes = torch.randint(0, lm.config.card, (B, lm.config.num_codebooks, 20))
    return lm, states, mask, codes


@pytest.mark.parametrize("mode,bound", [("bf16", 0.01), ("int8", 0.02), ("int4", 0.1)])
def test_quantised_tiny_lm_logits_close_to_fp32(tiny, mode, bound):
    lm, states, mask, codes = tiny
    q = quantize_weights(copy.deepcopy(lm), mode)
    kind = {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear}[mode]
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert sum(isinstance(m, kind) for m in q.modules()) == sum(isinstance(m, nn.Linear) for m in lm.modules())
    with torch.no_grad():
        ref = lm(codes, memory=lm.cross_memory(states, mask))
        out = q(codes, memory=q.cross_memory(states, mask))
    error = (out - ref).abs().max() / ref.abs().max()
    assert 0 < error <= bound


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantised_lm_runs_the_generate_loop(tiny, mode):
    lm, states, mask, _ = tiny
    q = quantize_weights(copy.deepcopy(lm), mode)
    assert q.dtype == torch.float32  # the cache and the sampling stay fp32
    codes = G.generate_codes(q, states, mask, max_new_tokens=12, guidance_scale=3.0, top_k=50,
                             generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, lm.config.num_codebooks, 12 - max(lm.config.delays))
    assert 0 <= int(codes.min()) and int(codes.max()) < lm.config.card
