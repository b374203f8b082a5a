"""Flash attention in Triton: the fast path behind `musiclm_core.kernels.attention`.

Same maths as `attention_reference` (without `bias`): softmax(scale * q·k + mask) · v, where the mask hides keys
past the causal position (`q_offset + t`) and keys whose `key_mask` is False, and a query row with no visible key
returns exactly zero.

Two kernels:

* `_attn_fwd` walks the keys of one block of queries in tiles of BLOCK_N, keeping the running row maximum `m`,
  the running denominator `l` and the unnormalised output `acc` in fp32 (online softmax, FlashAttention
  arXiv:2205.14135). Grid (query blocks, B * H, SPLITS).
  - SPLITS == 1 (prefill, a chunk, cross-attention, or any call that is short anyway): it writes `acc / l`.
  - SPLITS > 1 (one decode step against a long cache, "flash-decoding"): Tq is tiny, so B * H programs alone
    would leave most of the GPU idle. Each program takes one slice of the keys and writes its partial (m, l, acc);
    `_combine` merges the slices. The slices are cut at run time from the number of visible keys, so the work
    stays evenly spread as the position grows while the grid itself stays fixed.
* `_combine`: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.

The causal position is read from device memory when `q_offset` is a tensor: a captured CUDA graph then stays
valid when the caller writes the next position into that tensor. Scores are kept in base 2 (scale * log2 e folded
in, then exp2), which is what the hardware's exponential computes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 128  # larger heads would need smaller tiles to fit the registers; they use the reference path
LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd(
    Q, K, V, Out, KeyMask, Offset, PartM, PartL, PartAcc,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_mb, stride_mt,
    H, Tq, Tk, D, offset_value, qk_scale,
    CAUSAL: tl.constexpr, OFFSET_IN_MEMORY: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    SPLITS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b may pass 2**31 in a large cache
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D is D rounded up to a power of two; the extra lanes load zeros
    d_ok = offs_d < D

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)

    # Keys this block of queries may see: with causality, none past the position of its last row. Past that the
    # static cache holds slots not written yet (or stale ones), so they are never even loaded.
    hi = Tk
    if CAUSAL:
        if OFFSET_IN_MEMORY:
            offset = tl.load(Offset).to(tl.int32)
        else:
            offset = offset_value
        q_pos = offset + offs_m  # absolute positions of the query rows
        hi = tl.minimum(Tk, offset + tl.minimum(Tq, (pid_m + 1) * BLOCK_M))
    lo = 0
    if SPLITS > 1:
        # Cut the visible keys into SPLITS slices of whole tiles; this program takes slice pid_s.
        tiles_per_split = tl.cdiv(tl.cdiv(hi, BLOCK_N), SPLITS)
        lo = pid_s * tiles_per_split * BLOCK_N
        hi = tl.minimum(hi, lo + tiles_per_split * BLOCK_N)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if FP32_DOT:
            # fp32 inputs: full fp32 products (TF32 would cost ~1e-3 relative error against the reference)
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits

        allowed = col_ok[None, :]
        if HAS_KEY_MASK:
            keep = tl.load(KeyMask + b * stride_mb + cols * stride_mt, mask=col_ok, other=0)
            allowed = allowed & (keep != 0)[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen no visible key its maximum is -inf; subtracting 0 instead keeps exp2 at 0
        # rather than exp2(-inf - -inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLITS == 1:
        # A row with no visible key has l = 0 and acc = 0: its output is exactly 0, not 0 / 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Tq) & d_ok[None, :])
    else:
        # Partials laid out (B * H, SPLITS, Tq) and (B * H, SPLITS, Tq, BLOCK_D), contiguous.
        row = (pid_bh * SPLITS + pid_s) * Tq + offs_m
        tl.store(PartM + row, m_i, mask=offs_m < Tq)
        tl.store(PartL + row, l_i, mask=offs_m < Tq)
        tl.store(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=offs_m[:, None] < Tq)


@triton.jit
def _combine(
    Out, PartM, PartL, PartAcc,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, Tq, D,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # grid (B * H, Tq): one program per output row
    t = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS

    row = (pid_bh * SPLITS + offs_s) * Tq + t  # (BLOCK_S,) this output row in each slice
    m = tl.load(PartM + row, mask=s_ok, other=float("-inf"))
    l = tl.load(PartL + row, mask=s_ok, other=0.0)
    acc = tl.load(PartAcc + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)

    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # slices that saw no key weigh 2^-inf = 0
    w = tl.exp2(m - m_safe)
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + t * stride_ot + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(BH: int, Tk: int, block_n: int, device: torch.device) -> int:
    """Key slices per (batch, head) for a decode step: enough programs to fill the GPU about four times over."""
    target = 4 * _sm_count(device) if device.type == "cuda" else 4  # the CPU interpreter gains nothing from many
    return max(1, min(triton.cdiv(Tk, block_n), triton.cdiv(target, BH), 64))


def supports(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> str | None:
    """Why these inputs cannot take the Triton path, or None when they can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        return f"needs q (B, H, Tq, D) and k, v (B, H, Tk, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: needs one of float32, float16, bfloat16 for all three"
    if not (q.device == k.device == v.device):
        return f"q, k, v on different devices: {q.device}, {k.device}, {v.device}"
    if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[-1] != k.shape[2]
                                 or key_mask.shape[0] not in (1, q.shape[0])):
        return f"key_mask must be (B or 1, Tk) = ({q.shape[0]}, {k.shape[2]}), got {tuple(key_mask.shape)}"
    return None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, q_offset: int | Tensor = 0,
                     key_mask: Tensor | None = None, scale: float | None = None,
                     num_splits: int | None = None, block_n: int | None = None) -> Tensor:
    """`attention_reference` without `bias`, in Triton. q (B, H, Tq, D); k, v (B, H, Tk, D) -> (B, H, Tq, D).

    `num_splits` and `block_n` override the tiling (tests use them to cover several slices and tiles on small
    inputs); by default a decode step (Tq <= 16) against a long cache is split, everything else is not.
    """
    reason = supports(q, k, v, key_mask)
    if reason is not None:
        raise ValueError(f"triton_attention: {reason}")
    if isinstance(q_offset, Tensor) and (q_offset.numel() != 1 or q_offset.dtype.is_floating_point):
        raise ValueError(f"q_offset tensor must hold one integer, got {q_offset.dtype} {tuple(q_offset.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        # torch.compile cannot trace a kernel launch made from Python; as an opaque operator the call stays
        # inside one graph. Eager calls skip the operator: its dispatch costs tens of microseconds per call.
        offset_tensor, offset_value = (q_offset, 0) if isinstance(q_offset, Tensor) else (None, int(q_offset))
        return _attention_op(q, k, v, causal, offset_tensor, offset_value, key_mask, scale, num_splits or 0,
                             block_n or 0)
    return _launch(q, k, v, causal, q_offset, key_mask, scale, num_splits, block_n)


@torch.library.custom_op("musiclm::triton_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, offset_tensor: Tensor | None, offset_value: int,
                  key_mask: Tensor | None, scale: float, num_splits: int, block_n: int) -> Tensor:
    q_offset = offset_value if offset_tensor is None else offset_tensor
    return _launch(q, k, v, causal, q_offset, key_mask, scale, num_splits or None, block_n or None)


@_attention_op.register_fake
def _(q, k, v, causal, offset_tensor, offset_value, key_mask, scale, num_splits, block_n):
    return q.new_empty(q.shape)


def _launch(q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int | Tensor, key_mask: Tensor | None,
            scale: float, num_splits: int | None, block_n: int | None) -> Tensor:
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs every tile side >= 16
    BLOCK_M = 16 if Tq <= 16 else 64
    BLOCK_N = block_n or 64
    if num_splits is None:
        num_splits = _num_splits(B * H, Tk, BLOCK_N, q.device) if Tq <= 16 else 1

    offset_in_memory = isinstance(q_offset, Tensor)
    if offset_in_memory:
        offset_ptr, offset_value = q_offset.to(q.device), 0
    else:
        offset_ptr, offset_value = q, q_offset  # the pointer is unused when the offset is a plain int
    if key_mask is not None:
        # bytes 0 / 1 (a bool view: no copy), which the kernel loads as plain integers
        key_mask = key_mask.to(device=q.device, dtype=torch.bool).expand(B, Tk).view(torch.uint8)
        mask_ptr, stride_mb, stride_mt = key_mask, key_mask.stride(0), key_mask.stride(1)
    else:
        mask_ptr, stride_mb, stride_mt = q, 0, 0

    out = torch.empty((B, H, Tq, D), dtype=q.dtype, device=q.device)
    if num_splits > 1:
        part_m = torch.empty((B * H, num_splits, Tq), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B * H, num_splits, Tq), dtype=torch.float32, device=q.device)
        part_acc = torch.empty((B * H, num_splits, Tq, BLOCK_D), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused

    grid = (triton.cdiv(Tq, BLOCK_M), B * H, num_splits)
    _attn_fwd[grid](
        q, k, v, out, mask_ptr, offset_ptr, part_m, part_l, part_acc,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_mb, stride_mt,
        H, Tq, Tk, D, offset_value, scale * LOG2E,
        CAUSAL=causal, OFFSET_IN_MEMORY=offset_in_memory, HAS_KEY_MASK=key_mask is not None,
        SPLITS=num_splits, FP32_DOT=q.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _combine[(B * H, Tq)](
            out, part_m, part_l, part_acc, *out.stride(), H, Tq, D,
            SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
        )
    return out
