"""The CPU's choice of fp32 linear (kernels/linear.py): the dispatch from what /proc/cpuinfo reports, and the
blocked layout against F.linear.

Tolerances: `blocked_linear` / `BlockedLinear` against `F.linear` with the same weight: max abs error <= 1e-5 on
outputs of magnitude ~1 (the same products summed in another order; measured <= 3e-6). The tiny MusicGen LM with
its linears relaid against the same LM as built: logits max abs error <= 1e-5, greedy tokens identical. Layout
round trips (state_dict, save / load) move the same numbers and are exact.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musiclm_core import generate as G
from musiclm_core.kernels import linear as L
from musiclm_core.kernels.linear import BlockedLinear, blocked_linear, block_weight, relayout
from musiclm_core.kernels.quant import Int8Linear, quantize_weights
from musiclm_core.musicgen import PRESETS, MusicGenLM

TOL = 1e-5

# /proc/cpuinfo of the machines the project runs on (first processor; flags cut to the ones that matter and a
# few others), and of an ARM machine, which has no vendor_id.
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) CPU @ 2.50GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.50GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl
"""
SAPPHIRE = XEON.replace("avx512vl", "avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8")
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 avx avx2 fma sse4a
"""
EPYC_AVX512 = EPYC_AVX2.replace("7B12", "9B14").replace("sse4a", "sse4a avx512f avx512_vnni avx512_bf16")
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo():
    xeon = L.parse_cpuinfo(XEON)
    assert (xeon.vendor, xeon.model) == ("GenuineIntel", "Intel(R) Xeon(R) CPU @ 2.50GHz")
    assert xeon.family == "family 6 model 85" and L.parse_cpuinfo(EPYC_AVX2).family == "family 23 model 49"
    assert xeon.extensions() == ["avx2", "avx512f"]
    assert L.parse_cpuinfo(SAPPHIRE).extensions() == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                                       "amx_int8"]
    assert L.parse_cpuinfo(EPYC_AVX2).extensions() == ["avx2"]
    assert L.parse_cpuinfo(ARM) == L.CpuInfo("", "", frozenset())
    here = L.cpu_info()  # this machine: whatever it is, read without error and the same on a second call
    assert here is L.cpu_info()


@pytest.mark.parametrize("text,mkl,expected", [
    (XEON, True, "linear"),         # MKL's own fast path: F.linear as before
    (SAPPHIRE, True, "linear"),
    (EPYC_AVX2, True, "blocked"),   # MKL's generic path on AMD ...
    (EPYC_AVX512, True, "blocked"),  # ... whatever the vector extensions
    (EPYC_AVX2, False, "linear"),   # another BLAS: not measured, left alone
    (ARM, False, "linear"),
    ("", True, "linear"),
])
def test_choose_route(text, mkl, expected):
    assert L.choose_route(L.parse_cpuinfo(text), mkl=mkl) == expected


def test_route_is_decided_once_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv(L.ENV, raising=False)
    L.route.cache_clear()
    try:
        chosen = L.route()
        assert chosen == L.choose_route(L.cpu_info(), mkl=torch.backends.mkl.is_available())
        other = "linear" if chosen == "blocked" else "blocked"
        monkeypatch.setenv(L.ENV, other)
        assert L.route() == chosen  # decided once per process: a later change is not seen
        L.route.cache_clear()
        assert L.route() == other  # the override, read when the route is decided
        monkeypatch.setenv(L.ENV, "fast")
        L.route.cache_clear()
        with pytest.raises(ValueError, match="MUSICLM_LINEAR='fast': expected linear or blocked"):
            L.route()
    finally:
        monkeypatch.delenv(L.ENV, raising=False)
        L.route.cache_clear()


# ---------------------------------------------------------------------------------------------------------------
# The blocked layout against F.linear


def _linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)  # weights ~ U(-1/sqrt(K), 1/sqrt(K)): outputs of magnitude ~1


@pytest.mark.parametrize("n_in,n_out,block,blocks", [
    (256, 96, 1024, 1),   # K <= block: one block, the weight itself
    (256, 96, 64, 4),     # MusicGen's ffn_out shape class (K = 4 blocks), at a small size
    (192, 40, 128, 2),    # K = 1.5 blocks: two blocks of 96
    (130, 24, 64, 1),     # 130 does not split into 3 equal blocks: one block
])
@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_matches_f_linear(n_in, n_out, block, blocks, bias):
    lin = _linear(n_in, n_out, bias)
    layer = BlockedLinear.from_linear(lin, block)
    assert tuple(layer.blocks.shape) == (blocks, n_out, n_in // blocks)
    for lead in [(1,), (2,), (1, 2), (3,), (2, 1, 1), (17,), (2, 5)]:  # 1 and 2 rows take the skinny path
        x = torch.randn(*lead, n_in)
        ref = F.linear(x, lin.weight, lin.bias)
        for out in (layer(x), blocked_linear(x, layer.blocks, layer.bias)):
            assert out.shape == ref.shape and out.is_contiguous()
            assert (out - ref).abs().max() <= TOL, lead
        assert (layer(x + 0.1) - ref).abs().max() > 1e3 * TOL  # the input matters far beyond the tolerance
    with pytest.raises(ValueError, match=rf"input of {n_in + 1} features for blocks"):
        layer(torch.randn(2, n_in + 1))


@pytest.mark.parametrize("route", L.ROUTES)
def test_both_routes_match_f_linear(route):
    """A module relaid for either route computes what its nn.Linear layers did."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64, bias=False))
    ref_model = copy.deepcopy(model)
    relayout(model, route_name=route, block=64)
    kinds = [type(m) for m in model if not isinstance(m, nn.GELU)]
    assert kinds == ([nn.Linear] * 2 if route == "linear" else [BlockedLinear] * 2)
    for rows in (1, 2, 9):
        x = torch.randn(rows, 64)
        assert (model(x) - ref_model(x)).abs().max() <= TOL


def test_layout_keeps_memory_and_state_dict():
    lin = _linear(256, 96, True)
    one = BlockedLinear.from_linear(lin)  # K <= BLOCK: a view, no copy
    assert one.blocks.data_ptr() == lin.weight.data_ptr() and one.weight.data_ptr() == lin.weight.data_ptr()
    four = BlockedLinear.from_linear(lin, 64)  # a copy that replaces the original: the same number of floats
    assert four.blocks.is_contiguous() and four.blocks.numel() == lin.weight.numel()
    assert torch.equal(four.blocks, block_weight(lin.weight, 64)) and torch.equal(four.blocks[1], lin.weight[:, 64:128])
    for layer in (one, four):
        state = layer.state_dict()  # nn.Linear's keys and layout
        assert list(state) == ["weight", "bias"] and torch.equal(state["weight"], lin.weight)
        assert torch.equal(layer.weight, lin.weight) and torch.equal(state["bias"], lin.bias)
    fresh = BlockedLinear.from_linear(_linear(256, 96, True, seed=5), 64)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh.weight, lin.weight) and torch.equal(fresh.bias, lin.bias)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .*\(95, 256\)"):
        fresh.load_state_dict({"weight": torch.zeros(95, 256), "bias": torch.zeros(96)})
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        fresh.load_state_dict({"weight": lin.weight})
    with pytest.raises(RuntimeError, match="Unexpected key.*scale"):
        fresh.load_state_dict({**lin.state_dict(), "scale": torch.ones(1)})


def test_relayout_leaves_other_layers_and_checks_its_input():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.LayerNorm(8))
    relayout(model, route_name="blocked")
    assert [type(m) for m in model] == [BlockedLinear, nn.Linear, nn.LayerNorm]  # fp32 only
    relayout(model, route_name="blocked")  # again: nothing left to change
    assert type(model[0]) is BlockedLinear
    with pytest.raises(ValueError, match="route must be one of"):
        relayout(model, route_name="fast")
    with pytest.raises(ValueError, match="inside"):
        relayout(nn.Linear(4, 4), route_name="blocked")
    with pytest.raises(ValueError, match="2-D float weight"):
        BlockedLinear(torch.zeros(4, dtype=torch.int8))


def test_quantize_a_relaid_module():
    """quantize_weights takes BlockedLinear layers as the linears they are: the same int8 weights."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 128, bias=False))
    plain = quantize_weights(copy.deepcopy(model), "int8")
    relaid = quantize_weights(relayout(model, route_name="blocked", block=64), "int8")
    for a, b in zip(plain, relaid):
        assert isinstance(b, Int8Linear)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    with pytest.raises(ValueError, match="inside"):
        quantize_weights(BlockedLinear(torch.zeros(4, 4)), "int8")


# ---------------------------------------------------------------------------------------------------------------
# The MusicGen LM


@torch.no_grad()
def test_relaid_musicgen_lm(tmp_path):
    torch.manual_seed(0)
    lm = MusicGenLM(PRESETS["tiny"]).eval()
    relaid = relayout(copy.deepcopy(lm), route_name="blocked", block=128)  # ffn_out (K = 256): two blocks
    assert relaid.layers[0].ffn_out.blocks.shape[0] == 2 and relaid.heads[0].blocks.shape[0] == 1
    states = torch.randn(1, 6, lm.config.text_dim)
    mask = torch.ones(1, 6, dtype=torch.long)
    codes = torch.randint(0, lm.config.card, (2, lm.config.num_codebooks, 9))
    ref = lm(codes, memory=lm.cross_memory(states.expand(2, -1, -1), mask.expand(2, -1)))
    out = relaid(codes, memory=relaid.cross_memory(states.expand(2, -1, -1), mask.expand(2, -1)))
    assert (out - ref).abs().max() <= TOL
    # Decode steps (2 rows under CFG: the skinny path) give the same greedy tokens, and the text matters.
    greedy = G.generate_codes(lm, states, mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(G.generate_codes(relaid, states, mask, max_new_tokens=12, do_sample=False), greedy)
    assert not torch.equal(G.generate_codes(relaid, -states, mask, max_new_tokens=12, do_sample=False), greedy)
    # Saved in nn.Linear's layout: the folder is the one the original writes.
    relaid.save_pretrained(tmp_path / "lm")
    loaded = MusicGenLM.from_pretrained(tmp_path / "lm")
    reference = lm.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("melody", [False, True], ids=["musicgen", "melody"])
@pytest.mark.parametrize("route", L.ROUTES)
def test_native_lm_is_read_not_mapped_on_the_blocked_route(tmp_path, monkeypatch, route, melody):
    """relayout copies the LM's fp32 weights into blocks: mapped, the file's pages would stay resident next to the
    copy (one mapping backs every tensor of the file), so the blocked route reads the native file instead. The
    Melody LM gets the same layout when loaded on its own."""
    from musiclm_core import hub
    from musiclm_core import melody as M

    cls, config = (M.MusicGenMelodyLM, M.PRESETS["tiny"]) if melody else (MusicGenLM, PRESETS["tiny"])
    cls(config).save_pretrained(tmp_path / "lm")
    seen = []
    load_tensors = hub.load_tensors
    monkeypatch.setattr(hub, "load_tensors", lambda path, **kw: seen.append(kw.get("mmap")) or load_tensors(path, **kw))
    monkeypatch.setenv(L.ENV, route)
    L.route.cache_clear()
    try:
        lm = cls.from_pretrained(tmp_path / "lm")
    finally:
        monkeypatch.delenv(L.ENV)
        L.route.cache_clear()
    assert seen == [route != "blocked"]
    assert isinstance(lm.layers[0].ffn_in, BlockedLinear if route == "blocked" else nn.Linear)
