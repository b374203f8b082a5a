"""CPU fp32 matmuls against weights reordered once into oneDNN's blocked layout, cached per weight.

    y = linear(x, w, bias)                     = F.linear(x, w, bias) for w (N, K); x (..., K) -> (..., N)
    y = linear(x, w, bias, post="gelu")        = GELU(F.linear(x, w, bias)) (exact, erf), fused
    y = linear(x, w, bias, part=(a, b))        the same with the rows a:b of w
    y = linear(x, U, part=i)                   the same with U[i] for a stack of matrices U (n, N, K)

oneDNN's matmul (torch.ops.mkldnn._linear_pointwise, as the UNet and the Winograd convolutions call it) takes its
weight either as a plain (N, K) tensor, which it reorders into its blocked layout on every call, or as an opaque
tensor already in that layout (torch.ops.mkldnn._reorder_linear_weight, what torch's compiler does to frozen
weights). The reorder is a pass over the weight, read strided and written packed: at the few rows the UNet's low
resolutions and one stream's row give its GEMMs (16-64 tiles or tokens against 384-1280 channels), it costs as
much as the product. Measured on one core of the 2-core AMD EPYC (Zen 4), the weights cold as in a UNet step
(six layers' worth cycled), per Winograd convolution ((n, rows, C -> K) = its n GEMMs): (36, 16, 384 -> 384)
4.5 -> 2.7 ms, (16, 16, 640 -> 640) 4.0 -> 2.9, (36, 64, 256 -> 256) 4.5 -> 3.6, (36, 256, 128 -> 128) 3.8 -> 3.5
(cycled over 6 layers: 5.9 -> 4.1 in another run), (36, 256, 384 -> 128) 10.6 -> 10.6; per linear (rows, K -> N)
(64, 640 -> 2560) 2.53 -> 2.18 ms, (256, 384 -> 1536) 3.20 -> 2.89, (1024, 256 -> 1024) 5.77 -> 5.08. The size
hint the reorder can take (the expected row count) made no difference at 16-1024 rows, so none is given: one
packed weight serves any row count. Same sums as the plain call (a few 1e-7 relative).

Two ways to hold them. A module's own weight (the UNet's linears and 1x1 skips): `linear(x, layer.weight, ...)`
packs it on first use into a table keyed by the weight tensor itself (weakly: the copy dies with its weight) and
packs again when the weight changes (another storage, an in-place update, device, dtype or shape); nothing is
stored on the modules, so state_dict, deepcopy (which an opaque tensor does not support) and the LoRA adapters
see the usual nn.Linear / nn.Conv2d. The copy sits beside the weight: +326 MB for MusicLDM's UNet, ~+620 MB for
AudioLDM 2's (~45 % of their parameters), for 2.5 % of a 2-thread step and 7 % of a 1-thread one (measured).
A derived weight that nothing else reads (the Winograd convolutions' transformed weights): `Packed(U, parts)` is
what its owner caches in place of U (kernels/winograd.py `for_gemms`): no second copy.

`available(x, w)` says whether a call can take the route: torch built with oneDNN, CPU fp32 operands, no
gradient wanted (an opaque tensor has no autograd); `packable(w)` the same for a weight packed ahead of its calls.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

ONEDNN = torch.backends.mkldnn.is_available()

# id(weight) -> (weak reference to it, its state when packed, {part: packed copy}). By id, not a WeakKeyDictionary:
# that compares colliding keys with ==, which for tensors is elementwise. The reference's callback drops the entry
# when the weight dies.
_PACKED: dict[int, tuple[weakref.ref, tuple, dict]] = {}
_LOCK = threading.Lock()  # the UNet's streams call the same layers from two threads


def packable(weight: Tensor) -> bool:
    """Whether weight can be packed here: oneDNN in this torch, fp32 on the CPU, no gradient needed for it."""
    return (ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and weight.requires_grad))


def available(x: Tensor, weight: Tensor) -> bool:
    """Whether linear(x, weight) can run here: weight `packable`, x fp32 on the CPU too, no gradient for it."""
    return (packable(weight) and x.device.type == "cpu" and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad))


Part = int | tuple[int, int] | None


class Packed:
    """Parts of a weight, each packed into oneDNN's layout, without the plain weight: what a cache holds when the
    plain copy is of no other use (the Winograd convolutions' transformed weights). `linear(x, p, part=q)` takes
    part q; `shape` is the weight's. `cached` says what a part is."""

    def __init__(self, weight: Tensor, parts: list[Part]):
        self.shape = weight.shape
        self.parts = {part: _reorder(weight, part) for part in parts}


def linear(x: Tensor, weight: Tensor | Packed, bias: Tensor | None = None, *, part: Part = None,
           post: str = "none") -> Tensor:
    """x (..., K) @ W^T + bias, then `post` ("none" or "gelu", oneDNN's post-op), W the packed part `part` of
    weight: of a `Packed`, or the cached copy `cached(weight, part)` of a tensor. Callers check `available` first;
    bias matches W's rows."""
    w = weight.parts[part] if isinstance(weight, Packed) else cached(weight, part)
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, post, [], "none" if post == "gelu" else "")


def cached(weight: Tensor, part: Part = None) -> Tensor:
    """The cached packed copy of weight (N, K) (or a 1x1 convolution's (N, K, 1, 1)) for part None, of its rows
    a:b for part (a, b), of weight[part] for a stack weight (n, N, K) and an int part."""
    version = -1 if weight.is_inference() else weight._version  # inference tensors have no version counter
    state = (weight.data_ptr(), version, weight.dtype, weight.device, tuple(weight.shape))
    key = id(weight)
    with _LOCK:
        entry = _PACKED.get(key)
        if entry is None or entry[0]() is not weight or entry[1] != state:
            ref = weakref.ref(weight, lambda _: _PACKED.pop(key, None))
            entry = _PACKED[key] = (ref, state, {})
        copies = entry[2]
        if part not in copies:
            copies[part] = _reorder(weight, part)
        return copies[part]


def _reorder(weight: Tensor, part: Part) -> Tensor:
    """Part `part` of weight (`cached`) as an opaque oneDNN tensor (N', K)."""
    w = weight.detach()
    if isinstance(part, int):
        w = w[part]
    else:
        w = w.reshape(w.shape[0], -1)  # a view: (N, K, 1, 1) in either memory format is (N, K)
        w = w if part is None else w[part[0]:part[1]]
    return torch.ops.mkldnn._reorder_linear_weight(w)
