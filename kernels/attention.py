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
"""

from __future__ import annotations

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


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, q_offset: int | Tensor = 0,
                        key_mask: Tensor | None = None, bias: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    allowed = _allowed(q, k, causal, q_offset, key_mask)
    attn_bias = bias
    if allowed is not None:
        # finfo.min rather than -inf: a fully masked row then stays finite (softmax of equal scores), and is
        # zeroed below. -inf would give NaN there (G6 in specs/musicgen.md).
        masked = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~allowed, torch.finfo(q.dtype).min)
        attn_bias = masked if attn_bias is None else attn_bias + masked
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    if allowed is not None:
        out = out * allowed.any(dim=-1, keepdim=True).to(out.dtype)  # fully masked rows -> exactly 0
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, q_offset: int | Tensor = 0,
              key_mask: Tensor | None = None, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    return attention_reference(q, k, v, causal=causal, q_offset=q_offset, key_mask=key_mask, bias=bias,
                               scale=scale)
