"""The Triton attention kernels against `attention_reference`, and the choice between the two.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), on small shapes
chosen to cross tile boundaries: lengths that are not multiples of the tile, several tiles, several key slices,
slices with no key at all, rows with no visible key. With a GPU the same cases run compiled (`-m cuda`), in fp32,
fp16 and bf16, plus the MusicGen shapes, a captured CUDA graph and torch.compile.

Tolerances: fp32 max abs error <= 1e-5 against the fp32 reference (the kernels use full-fp32 products);
fp16 / bf16 ||out - ref|| / ||ref|| <= 2e-3 / 1e-2 against the fp32 reference on the same (rounded) inputs.
bf16 is CUDA-only: the interpreter of triton 3.9 multiplies bf16 tiles as their raw uint16 bits in tl.dot.
"""

from __future__ import annotations

import os

import pytest
import torch

from musiclm_core.kernels import attention, attention_reference
from musiclm_core.kernels.attention import select_backend

pytest.importorskip("triton")  # in the `test` extra; without it only the reference path exists
from musiclm_core.kernels import triton_attention as ta  # noqa: E402  (after the interpreter switch, conftest.py)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not 1 (conftest.py sets it when there "
                                                         "is no GPU); on a GPU the same cases run under -m cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs a CUDA device, with TRITON_INTERPRET unset")

NULL_TEXT = 2  # in the cross-attention cases, batch row 2 is the CFG null condition: its text mask is all False

# Each case: shapes, the attention arguments, and the tiling to force (block_n, num_splits) so that small inputs
# still cross several tiles and slices. `offset_tensor` passes q_offset as a 0-dim tensor (the decode path that a
# CUDA graph captures). For causal cases the cache slots past the last query are filled with NaN: the kernel must
# never read them (a static cache holds stale or unwritten slots there).
CASES = [
    pytest.param(dict(B=1, H=2, Tq=70, Tk=70, D=32, causal=True), id="prefill-causal-2x2-tiles-d32"),
    pytest.param(dict(B=2, H=1, Tq=19, Tk=45, D=16, scale=1.0, block_n=16), id="noncausal-odd-lengths-d16-scale1"),
    pytest.param(dict(B=1, H=2, Tq=7, Tk=40, D=64, causal=True, q_offset=21, block_n=16, strided=True),
                 id="chunk-into-static-cache-strided-d64"),
    pytest.param(dict(B=2, H=2, Tq=1, Tk=50, D=64, causal=True, q_offset=33, block_n=16, num_splits=3),
                 id="decode-split3-d64"),
    pytest.param(dict(B=1, H=1, Tq=1, Tk=40, D=128, causal=True, q_offset=0, block_n=16, num_splits=4),
                 id="decode-first-step-empty-slices-d128"),
    pytest.param(dict(B=1, H=2, Tq=1, Tk=40, D=32, causal=True, q_offset=39, offset_tensor=True, block_n=16,
                      num_splits=2), id="decode-last-slot-offset-tensor-d32"),
    pytest.param(dict(B=1, H=1, Tq=4, Tk=48, D=16, causal=True, q_offset=17, offset_tensor=True, block_n=16,
                      num_splits=3), id="decode-tq4-split3-d16"),
    pytest.param(dict(B=3, H=2, Tq=23, Tk=12, D=32, text_mask=True), id="cross-prefill-padded-and-null-text"),
    pytest.param(dict(B=3, H=1, Tq=1, Tk=20, D=64, text_mask=True, block_n=16, num_splits=2),
                 id="cross-decode-split2-padded-and-null-text"),
    pytest.param(dict(B=2, H=1, Tq=21, Tk=21, D=16, causal=True, left_pad=3, block_n=16),
                 id="causal-and-left-padding-rows-with-no-key"),
    pytest.param(dict(B=2, H=1, Tq=3, Tk=10, D=40, shared_int_mask=True), id="int64-mask-shared-by-the-batch-d40"),
]


def _inputs(case: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v and the keyword arguments of `attention` for one case."""
    g = torch.Generator().manual_seed(seed)
    B, H, Tq, Tk, D = (case[n] for n in "B H Tq Tk D".split())
    if case.get("strided"):
        # q laid out as the projections give it, (B, T, H, D), and k, v as a view of a longer cache buffer
        q = torch.randn(B, Tq, H, D, generator=g).transpose(1, 2)  # (B, H, Tq, D), strided
        k = torch.randn(B, H, Tk + 8, D, generator=g)[:, :, :Tk]  # (B, H, Tk, D), strided
        v = torch.randn(B, H, Tk + 8, D, generator=g)[:, :, :Tk]
    else:
        q, k, v = (torch.randn(B, H, T, D, generator=g) for T in (Tq, Tk, Tk))
    kwargs = dict(causal=case.get("causal", False), q_offset=case.get("q_offset", 0))
    if "scale" in case:
        kwargs["scale"] = case["scale"]
    if case.get("text_mask"):
        lengths = torch.tensor([Tk, Tk - 5, 0])  # full text, padded text, CFG null condition
        kwargs["key_mask"] = torch.arange(Tk)[None, :] < lengths[:, None]  # (B, Tk)
    if case.get("left_pad"):
        mask = torch.ones(B, Tk, dtype=torch.bool)
        mask[0, : case["left_pad"]] = False  # row 0's first queries see only padding: no visible key
        kwargs["key_mask"] = mask
    if case.get("shared_int_mask"):
        kwargs["key_mask"] = (torch.arange(Tk) % 3 != 1).long()[None, :]  # (1, Tk), 0/1 as HF tokenizers give
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    if "key_mask" in kwargs:
        kwargs["key_mask"] = kwargs["key_mask"].to(device)
    return q, k, v, kwargs


def _check(case: dict, device: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, kwargs = _inputs(case, device, dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    visible = min(Tk, Tq + kwargs["q_offset"]) if kwargs["causal"] else Tk
    # The reference sees only the visible keys, in fp32; then the kernel gets NaN in every slot past them.
    ref_kwargs = dict(kwargs)
    if "key_mask" in kwargs:
        ref_kwargs["key_mask"] = kwargs["key_mask"][:, :visible]
    ref = attention_reference(q.float(), k[:, :, :visible].float(), v[:, :, :visible].float(), **ref_kwargs)
    k[:, :, visible:] = float("nan")  # in place: a strided view stays strided
    v[:, :, visible:] = float("nan")
    if case.get("offset_tensor"):
        kwargs["q_offset"] = torch.tensor(kwargs["q_offset"], device=device)
    tiling = {n: case[n] for n in ("block_n", "num_splits") if n in case}

    with monkeypatch.context() as m:
        # Every float buffer the kernels allocate starts as NaN, so an output element or a partial result that no
        # program writes cannot pass for a plausible value (fresh memory is often zero, like a masked row).
        empty = torch.empty

        def poisoned(*args, **kw):
            t = empty(*args, **kw)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        m.setattr(torch, "empty", poisoned)
        out = ta.triton_attention(q, k, v, **kwargs, **tiling)

    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert not out.isnan().any(), "NaN in the output"
    if dtype == torch.float32:
        err = (out - ref).abs().max().item()
        assert err <= 1e-5, f"max abs error {err:.2e} > 1e-5"
    else:
        err = ((out.float() - ref).norm() / ref.norm()).item()
        tol = 2e-3 if dtype == torch.float16 else 1e-2
        assert err <= tol, f"relative error {err:.2e} > {tol}"
    if case.get("text_mask") or case.get("left_pad"):
        # A row with no visible key is exactly zero (the reference multiplies it by 0; the kernel must match).
        no_key = ~(ref != 0).any(dim=-1)  # (B, H, Tq)
        assert no_key.any(), "the case was meant to contain rows with no visible key"
        assert torch.equal(out[no_key], torch.zeros_like(out[no_key]))
    if case.get("text_mask"):
        assert torch.equal(out[NULL_TEXT], torch.zeros_like(out[NULL_TEXT]))


# --- the kernels, in the interpreter --------------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_fp32(case, monkeypatch):
    _check(case, "cpu", torch.float32, monkeypatch)


@interpreter
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[8]])
def test_kernel_matches_reference_fp16(case, monkeypatch):
    _check(case, "cpu", torch.float16, monkeypatch)


@interpreter
def test_decode_reads_the_position_from_memory():
    # One 0-dim tensor, written in place between calls as a captured decode step would: each call must follow it.
    q, k, v, _ = _inputs(dict(B=1, H=2, Tq=1, Tk=40, D=16), "cpu", torch.float32)
    pos = torch.tensor(0)
    for p in (3, 26):
        pos.fill_(p)
        out = ta.triton_attention(q, k, v, causal=True, q_offset=pos, block_n=16, num_splits=2)
        ref = attention_reference(q, k, v, causal=True, q_offset=p)
        assert (out - ref).abs().max().item() <= 1e-5, f"position {p}"


@interpreter
def test_compiles_into_one_graph():
    # Under torch.compile the kernels go through an opaque operator: no graph break, the fake shape is right.
    q, k, v, _ = _inputs(dict(B=1, H=2, Tq=1, Tk=20, D=16), "cpu", torch.float32)
    step = torch.compile(lambda q, k, v, pos: attention(q, k, v, causal=True, q_offset=pos, backend="triton"),
                         backend="aot_eager", fullgraph=True)
    pos = torch.tensor(11)
    out = step(q, k, v, pos)
    assert (out - attention_reference(q, k, v, causal=True, q_offset=11)).abs().max().item() <= 1e-5


# --- the choice of path ---------------------------------------------------------------------------------------------

def _qkv(D: int = 16, device: str = "cpu"):
    return tuple(torch.randn(1, 2, 5, D, device=device) for _ in range(3))


def test_auto_takes_the_reference_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MUSICLM_ATTENTION", raising=False)
    q, k, v = _qkv()
    for interpret in ("1", None):  # the interpreter is for the kernel tests, never chosen by auto
        if interpret is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        assert select_backend(q, k, v) == "torch"
        assert torch.equal(attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True))


@interpreter
def test_override_by_argument_and_environment(monkeypatch):
    calls = []
    kernel = ta.triton_attention
    monkeypatch.setattr(ta, "triton_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    q, k, v = _qkv()
    ref = attention_reference(q, k, v, causal=True)

    monkeypatch.delenv("MUSICLM_ATTENTION", raising=False)
    assert (attention(q, k, v, causal=True, backend="triton") - ref).abs().max() <= 1e-5 and len(calls) == 1
    monkeypatch.setenv("MUSICLM_ATTENTION", "triton")  # read at call time
    assert (attention(q, k, v, causal=True) - ref).abs().max() <= 1e-5 and len(calls) == 2
    assert torch.equal(attention(q, k, v, causal=True, backend="torch"), ref) and len(calls) == 2  # argument wins
    monkeypatch.setenv("MUSICLM_ATTENTION", "torch")
    assert torch.equal(attention(q, k, v, causal=True), ref) and len(calls) == 2


def test_bias_always_takes_the_reference(monkeypatch):
    monkeypatch.setenv("MUSICLM_ATTENTION", "triton")
    q, k, v = _qkv()
    bias = torch.randn(1, 2, 5, 5)  # T5's relative position bias
    assert select_backend(q, k, v, bias=bias) == "torch"
    assert select_backend(q, k, v, bias=bias, backend="triton") == "torch"
    assert torch.equal(attention(q, k, v, bias=bias, backend="triton"), attention_reference(q, k, v, bias=bias))


def test_unknown_backend_is_an_error(monkeypatch):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'cuda-fast'.*expected auto, torch or triton"):
        attention(q, k, v, backend="cuda-fast")
    monkeypatch.setenv("MUSICLM_ATTENTION", "Triton")
    with pytest.raises(ValueError, match="'Triton'.*MUSICLM_ATTENTION"):
        attention(q, k, v)


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="tensors on cpu.*TRITON_INTERPRET=1"):
        attention(q, k, v, backend="triton")


def test_inputs_the_kernels_do_not_take_are_errors():
    q, k, v = _qkv()
    assert ta.supports(q, k, v, None) is None
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        ta.triton_attention(*_qkv(D=256))
    with pytest.raises(ValueError, match=r"k, v \(B, H, Tk, D\)"):
        ta.triton_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match=r"key_mask must be \(B or 1, Tk\) = \(1, 5\), got \(1, 4\)"):
        ta.triton_attention(q, k, v, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtypes"):
        ta.triton_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="q_offset tensor must hold one integer"):
        ta.triton_attention(q, k, v, causal=True, q_offset=torch.tensor(2.0))


@interpreter
def test_forced_triton_names_what_it_cannot_take():
    with pytest.raises(ValueError, match="cannot take these inputs: head dim 256"):
        attention(*_qkv(D=256), backend="triton")


# --- on a GPU (pytest -m cuda) --------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_cuda(case, dtype, monkeypatch):
    _check(case, "cuda", dtype, monkeypatch)


# MusicGen decode steps (CFG batch 2, H = 16 small / 32 large, D = 64) at a static cache of 1500 slots, at default
# tiling: many key slices per (batch, head) on a real GPU.
MUSICGEN = [
    pytest.param(dict(B=2, H=16, Tq=1, Tk=1500, D=64, causal=True, q_offset=q_offset, offset_tensor=True),
                 id=f"decode-pos{q_offset}") for q_offset in (0, 700, 1499)
] + [
    pytest.param(dict(B=2, H=32, Tq=500, Tk=1500, D=64, causal=True), id="prefill-500-into-1500"),
    pytest.param(dict(B=3, H=16, Tq=500, Tk=64, D=64, text_mask=True), id="cross-prefill-500x64"),
    pytest.param(dict(B=3, H=16, Tq=1, Tk=64, D=64, text_mask=True), id="cross-decode-64"),
]


# The diffusion UNets (8 heads, D = channels / 8): self-attention over a 10.24 s latent's 1024 (or 256) tokens with
# q, k, v as strided views of the fused projection, cross-attention to AudioLDM 2's 8 GPT-2 vectors and to T5 states
# with padding.
UNET = [
    pytest.param(dict(B=2, H=8, Tq=1024, Tk=1024, D=D, strided=True), id=f"self-1024-d{D}") for D in (16, 32)
] + [
    pytest.param(dict(B=2, H=8, Tq=256, Tk=256, D=D, strided=True), id=f"self-256-d{D}") for D in (48, 80)
] + [
    pytest.param(dict(B=2, H=8, Tq=1024, Tk=8, D=16), id="cross-gpt2-8"),
    pytest.param(dict(B=3, H=8, Tq=256, Tk=32, D=48, text_mask=True), id="cross-t5-32-padded"),
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MUSICGEN + UNET)
def test_model_shapes_cuda(case, dtype, monkeypatch):
    _check(case, "cuda", dtype, monkeypatch)


@pytest.mark.cuda
@needs_cuda
def test_auto_takes_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("MUSICLM_ATTENTION", raising=False)
    assert select_backend(*_qkv(device="cuda")) == "triton"
    assert select_backend(*_qkv(D=256, device="cuda")) == "torch"  # too large a head: the reference
    q, k, v = _qkv(device="cuda")
    assert select_backend(q, k, v, bias=torch.zeros(1, 1, 5, 5, device="cuda")) == "torch"


@pytest.mark.cuda
@needs_cuda
def test_captured_decode_step_follows_the_position_cuda():
    # A CUDA graph replays the launch with its arguments frozen; the position must come from memory.
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(2, 16, 1500, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    pos = torch.zeros((), dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) outside the capture
        attention(q, k, v, causal=True, q_offset=pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, causal=True, q_offset=pos)
    for p in (0, 1, 63, 64, 900, 1499):
        pos.fill_(p)
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        graph.replay()
        ref = attention_reference(q.float(), k.float(), v.float(), causal=True, q_offset=p)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, f"position {p}: relative error {err:.2e}"


@pytest.mark.cuda
@needs_cuda
def test_compiled_decode_step_cuda():
    k, v = (torch.randn(2, 16, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(2, 16, 1, 64, device="cuda", dtype=torch.bfloat16)
    step = torch.compile(lambda q, k, v, pos: attention(q, k, v, causal=True, q_offset=pos), fullgraph=True)
    for p in (5, 200):
        pos = torch.tensor(p, device="cuda")
        ref = attention_reference(q.float(), k.float(), v.float(), causal=True, q_offset=p)
        err = ((step(q, k, v, pos).float() - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, f"position {p}: relative error {err:.2e}"

