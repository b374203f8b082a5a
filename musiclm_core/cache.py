"""The decoder's caches, made by the caller and passed to `forward` explicitly.

* `KVCache`: the self-attention keys and values of every layer, preallocated to the longest sequence and written
  by position. Its shapes never change, so one decode step has static shapes (the step can be captured as a
  CUDA graph or `torch.compile`d with the position passed as a tensor).
* `CrossMemory`: the cross-attention keys and values of the (projected) text, computed once per generation.

Each holds one tensor over all layers and, in `layers`, each layer's part of it (`LayerCache`, `LayerMemory`:
views, made once), which is what a decoder layer is given: a decode step then does not index the whole tensor
twice per layer (on a CPU that is ~100 small calls a step) and a layer needs no idea of which one it is.

The caches are for inference. Writing keys that carry gradients into views made in advance is something
autograd refuses, so `LayerCache.update` raises a clear error for them: decode under `torch.inference_mode()`
or `torch.no_grad()`, as `generate` does. Training runs the full forward, without a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from musiclm_core.kernels.attention import mask_scores


@dataclass
class LayerCache:
    """One layer's self-attention keys and values, (B, H, max_len + 1, D) views into the `KVCache`."""

    k: Tensor
    v: Tensor

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, D) at `positions` (T,); return the layer's whole (B, H, max_len + 1, D) cache.

        Slots past the last written position hold stale or zero values: the causal mask hides them.
        """
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise ValueError("the KV cache takes no keys or values that require grad: decode under "
                             "torch.inference_mode() or torch.no_grad() (training runs without a cache)")
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v


class KVCache:
    """Keys and values of L layers for `max_len` positions: two (L, B, H, max_len + 1, D) tensors, slot p
    holding position p.

    The last slot is never written. It keeps the part a step attends to (slots 0 .. p) from ever being the whole
    tensor: that view would be contiguous where all the others are not, and `MusicGenLM.compile_decode` would
    compile a second graph for the last step of every generation.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if min(num_layers, batch_size, num_heads, max_len, head_dim) <= 0:
            raise ValueError(f"KVCache sizes must be positive, got layers={num_layers} batch={batch_size} "
                             f"heads={num_heads} max_len={max_len} head_dim={head_dim}")
        shape = (num_layers, batch_size, num_heads, max_len + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = self._layer_views()

    def _layer_views(self) -> list[LayerCache]:
        # Indexing, not unbind: autograd refuses in-place writes into views that one call made together, even
        # of tensors that need no grad (a decode step outside no_grad / inference_mode).
        return [LayerCache(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    @property
    def max_len(self) -> int:
        return self.k.shape[3] - 1  # the spare slot is not a position

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def to(self, *args, **kwargs) -> "KVCache":
        """Move/cast in place, with the arguments of `Tensor.to`; returns self."""
        self.k = self.k.to(*args, **kwargs)
        self.v = self.v.to(*args, **kwargs)
        self.layers = self._layer_views()
        return self


@dataclass
class LayerMemory:
    """One layer's cross-attention keys and values (B, H, Lt, D), with the text mask in the form the attention
    takes: `scores` (B, 1, 1, Lt), 0 or finfo.min, and `attends` (B, 1, 1, 1), False for rows with no key."""

    k: Tensor
    v: Tensor
    scores: Tensor
    attends: Tensor


@dataclass
class CrossMemory:
    """Cross-attention keys and values of each layer, (L, B, H, Lt, D), and the text mask (B, Lt), True = attend.

    Rows whose mask is all False (the null condition of classifier-free guidance) attend to nothing: their
    cross-attention output is exactly zero. The mask is also kept in the form the attention uses, made once per
    generation rather than in each of the 24-48 cross-attentions of every decode step (on a CPU that costs about
    as much as the attention itself): `scores` and `attends`, shared by every layer's `LayerMemory`.
    """

    k: Tensor
    v: Tensor
    mask: Tensor

    def __post_init__(self):
        keys = self.mask.to(device=self.k.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, Lt)
        self.mask = keys[:, 0, 0]
        self.scores = mask_scores(keys, self.k.dtype)
        self.attends = keys.any(dim=-1, keepdim=True)
        self.layers = [LayerMemory(k, v, self.scores, self.attends)
                       for k, v in zip(self.k.unbind(0), self.v.unbind(0))]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def to(self, *args, **kwargs) -> "CrossMemory":
        """Move/cast in place (the mask keeps its bool dtype); returns self."""
        self.k = self.k.to(*args, **kwargs)
        self.v = self.v.to(*args, **kwargs)
        self.__post_init__()
        return self
