"""The one attention entry point every model calls.

    out = attention(q, k, v, causal=..., q_offset=..., key_mask=..., bias=..., scale=...)

q: (B, H, Tq, D); k, v: (B, H, Tk, D); out: (B, H, Tq, D).

* `causal`: query t sits at absolute position `q_offset + t` and sees keys 0 .. q_offset + t. With a static
  KV cache of Tk = max_len slots this also hides the slots not written yet, so prefill (Tq = chunk) and decode
  (Tq = 1) are the same call. `q_offset` may be a 0-dim tensor so that a captured decode step stays static.
* `key_mask`: (B, Tk) bool, True where a key may be attended (padded text tokens are False).
* `bias`: additive scores (B or 1, H or 1, Tq, Tk), e.g. T5's relative position bias.
* `scale`: multiplies q·k; default D ** -0.5 (T5 passes 1.0).

A query row whose keys are all masked (the null condition of classifier-free guidance) returns zeros, never NaN.

`attention_reference` is the plain PyTorch (SDPA) path; it is what the tests hold every faster path to.
`triton_attention.py` holds the fast path (flash attention, split-K for decode steps). `select_backend` says which
one a call takes:

* `backend=None` reads the environment variable MUSICLM_ATTENTION (`torch` | `triton` | unset = auto) at call
  time, so a test or a benchmark can switch a whole model without touching its code;
* auto takes Triton for CUDA tensors when triton is installed and the inputs fit its kernels, else the reference;
* `triton` forces it, and raises when it cannot run: CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter,
  which the kernel tests use). Auto never picks the interpreter: it runs ~1e4 times slower than SDPA and would
  make every model test on a GPU-less machine crawl;
* `bias` always takes the reference: T5's relative position bias has no Triton kernel.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor


def _allowed(q: Tensor, k: Tensor, causal: bool, q_offset: int | Tensor, key_mask: Tensor | None) -> Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask of the pairs a query may attend, or None when everything is allowed."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    allowed = None
    if causal:
        q_pos = torch.arange(Tq, device=q.device) + q_offset  # (Tq,) absolute positions of the queries
        allowed = (torch.arange(Tk, device=q.device)[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Tq, Tk)
    if key_mask is not None:
        keys = key_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Tk)
        allowed = keys if allowed is None else allowed & keys
    return allowed


def mask_scores(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive scores for a boolean mask: 0 where allowed, finfo(dtype).min where not."""
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, q_offset: int | Tensor = 0,
                        key_mask: Tensor | None = None, bias: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    if causal and q.is_cpu and (offset := int(q_offset)) >= 0:
        # Keys past the last query's position are masked anyway. On the CPU (nothing is captured, and reading
        # q_offset costs no sync) leave them out: a decode step into a static cache then reads only the slots
        # written so far (MusicGen small, 1500-slot cache, 100 visible: 0.2 ms instead of 6 ms per layer), and a
        # single query sees every key that is left, so it needs no mask at all.
        end = offset + q.shape[-2]
        k, v = k.narrow(-2, 0, end), v.narrow(-2, 0, end)  # narrow: a third of the cost of k[..., :end, :]
        key_mask = None if key_mask is None else key_mask[..., :end]
        bias = None if bias is None else bias[..., :end]
        causal = q.shape[-2] > 1
    allowed = _allowed(q, k, causal, q_offset, key_mask)
    attn_bias = bias
    if allowed is not None:
        # finfo.min rather than -inf: a fully masked row then stays finite (softmax of equal scores), and is
        # zeroed below. -inf would give NaN there (G6 in specs/musicgen.md).
        masked = mask_scores(allowed, q.dtype)
        attn_bias = masked if attn_bias is None else attn_bias + masked
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    if allowed is not None:
        out = out * allowed.any(dim=-1, keepdim=True)  # fully masked rows -> exactly 0
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, q_offset: int | Tensor = 0,
              key_mask: Tensor | None = None, bias: Tensor | None = None, scale: float | None = None,
              backend: str | None = None) -> Tensor:
    if select_backend(q, k, v, key_mask=key_mask, bias=bias, backend=backend) == "triton":
        return _triton().triton_attention(q, k, v, causal=causal, q_offset=q_offset, key_mask=key_mask,
                                          scale=scale)
    return attention_reference(q, k, v, causal=causal, q_offset=q_offset, key_mask=key_mask, bias=bias,
                               scale=scale)


def _triton() -> ModuleType | None:
    """The Triton kernels, imported on first use (triton is optional), or None when triton is not installed."""
    try:  # after the first time a lookup in sys.modules
        from musiclm_core.kernels import triton_attention
    except ImportError:
        return None
    return triton_attention


def select_backend(q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, bias: Tensor | None = None,
                   backend: str | None = None) -> str:
    """"torch" or "triton": the path `attention` takes for these inputs (see the module docstring)."""
    choice = backend or os.environ.get("MUSICLM_ATTENTION") or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"attention backend {choice!r} (argument or MUSICLM_ATTENTION): "
                         "expected auto, torch or triton")
    if choice == "torch" or bias is not None:
        return "torch"
    if choice == "auto":
        # CPU tensors never import triton here: auto on the CPU is always the reference.
        fits = q.is_cuda and _triton() is not None and _triton().supports(q, k, v, key_mask) is None
        return "triton" if fits else "torch"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention backend 'triton' asked for with tensors on {q.device}: Triton runs on CUDA, "
                         "or on the CPU in its interpreter with TRITON_INTERPRET=1 set before triton is imported")
    if _triton() is None:
        raise RuntimeError("attention backend 'triton' asked for, but triton is not installed (pip install triton)")
    reason = _triton().supports(q, k, v, key_mask)
    if reason is not None:
        raise ValueError(f"attention backend 'triton' cannot take these inputs: {reason}")
    return "triton"
