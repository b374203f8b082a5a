"""Opt-in reduced-precision weights for the memory-bound decode step.

A decode step multiplies a few activation rows (2 under CFG) by every weight matrix once, so on a CPU it runs at
the speed memory delivers the weights: MusicGen small reads 1.44 GB of fp32 weights per step. Storing them in
fewer bytes raises that ceiling:

    quantize_weights(lm, "bf16")   every nn.Linear -> BF16Linear: bf16 weights (2 B/param)
    quantize_weights(lm, "int8")   every nn.Linear -> Int8Linear: int8 weights (1 B/param) with one symmetric
                                   scale per output channel, dequantised inside the matmul
    quantize_weights(lm, "int4")   every nn.Linear -> Int4Linear: 4-bit weights (0.5 B/param + 4 B per group of
                                   32) with a scale and an offset per group of 32 inputs; CPU only

It is weight-only: LayerNorms, embeddings, the KV cache and the sampling stay in the model's dtype, and the
layers keep the interface of `nn.Linear` (any leading dims, optional bias). It is an inference path: do it
after loading, do not train or `save_pretrained` the result.

Each layer has two ways to compute (`int8_linear` / `bf16_linear` with `backend=`; every layer's `backend`
attribute):

* "reference": plain PyTorch in the activation dtype, `x @ W^T` with W upcast (int8: `(x @ Q^T) * scale`; int4:
  the dequantised weight). Exact with respect to the dequantised weights; it is what the tests hold the fast path
  to, and what runs off the CPU (int8, bf16: int4 weights are packed for the CPU kernel and stay on the CPU).
* "cpu": the fastest path measured on a 2-core AVX-512 Xeon without native bf16 (benchmarks/RESULTS.md):
  - int8: `torch.ops.aten._weight_int8pack_mm`, whose vectorised kernel takes bf16 activations (with fp32
    activations the same op runs a slow generic loop, ~20x slower). Activations are rounded to bf16 and the
    product comes back in bf16: relative error ~2^-9 per output on top of the int8 rounding (~1e-2), which
    dominates. At 2 rows it multiplies 8.7-14 G int8 weights/s on 2 threads against ~5 G fp32 weights/s for
    `F.linear` (memory-bound). Measured against the alternatives: fp32 upcast of the int8 weights per matmul (in
    blocks or whole), torch.compile'd dequantise-and-reduce and `torch._int_mm` were all slower; fbgemm's
    dynamic int8 linear is about as fast but also quantises the activations and its API is deprecated.
  - int4: `torch.ops.aten._weight_int4pack_mm_for_cpu` (the CPU "tinygemm" kernel, bf16 activations and
    output, like int8's). It runs at 14-19 G weights/s on 2 threads: int8's kernel reaches that only at
    K = 4096, and spends about half its time per output row at K = 1024 (measured on MusicGen small's shapes:
    all linears 23 ms int4 against 36 ms int8 and 75 ms fp32 per step). 16 levels per group instead of 255 per
    row: a coarser approximation of the weights (RESULTS.md: what it does to the logits and tokens).
  - bf16: oneDNN's bf16 matmul (`F.linear` on bf16 activations and weights, fp32 accumulation, bf16 out).
    Without AVX512-BF16/AMX it emulates bf16 arithmetic and is compute-bound: see RESULTS.md for whether it
    beats fp32 on a given machine.
  `backend=None` (auto) takes "cpu" for CPU tensors and "reference" elsewhere; MUSICLM_QUANT=reference forces
  the reference everywhere (tests, debugging).

The int8 scales are rounded up to bf16 values before quantising, so the CPU kernel (which takes its scales in
the activation dtype, bf16) and the reference multiply by exactly the same numbers.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.kernels.linear import BlockedLinear

MODES = ("bf16", "int8", "int4")
BACKENDS = ("cpu", "reference")
ENV = "MUSICLM_QUANT"


def _backend(x: Tensor, backend: str | None) -> str:
    choice = backend or os.environ.get(ENV) or "auto"
    if choice not in ("auto", *BACKENDS):
        raise ValueError(f"quantised linear backend {choice!r} (argument or MUSICLM_QUANT): expected auto, "
                         f"{' or '.join(BACKENDS)}")
    if choice == "auto":
        return "cpu" if x.device.type == "cpu" else "reference"
    if choice == "cpu" and x.device.type != "cpu":
        raise ValueError(f"quantised linear backend 'cpu' asked for with activations on {x.device}")
    return choice


# ---------------------------------------------------------------------------------------------------------------
# int8


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float weight -> (int8 (N, K), bf16 scales (N,)) with weight ~= q * scale[:, None].

    Symmetric, per output channel: scale = max|w_row| / 127, rounded *up* to a bf16 value (so |q| <= 127 still
    holds and the bf16 kernel and the fp32 reference see the same scale). An all-zero row gets scale 1.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 takes a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach()
    amax = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # (N,) max |w_row|, without a |w| copy
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    rounded = scale.to(torch.bfloat16)
    up = rounded.float() < scale  # bf16 rounding went down: step to the next bf16 value
    rounded = torch.where(up, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)
    # In blocks of rows: whole-matrix fp32 temporaries (a weight of MusicGen small is up to 16 MB) would be
    # freed into the allocator's heap between the int8 weights made so far, which keep it from shrinking
    # (measured: the load peak of the int8 MusicGen small went from ~2.4 GB of weights to 3.3-4.3 GB).
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for start in range(0, w.shape[0], 256):
        rows = slice(start, start + 256)
        q[rows] = torch.round(w[rows].float() / rounded[rows].float()[:, None]).clamp_(-127, 127)
    return q, rounded


def int8_linear_reference(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ (weight (N, K) int8 * scale (N,))^T + bias, in the activation dtype."""
    y = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                backend: str | None = None) -> Tensor:
    """`int8_linear_reference`, on the CPU through the bf16 int8-weight kernel (see the module docstring)."""
    if _backend(x, backend) == "reference":
        return int8_linear_reference(x, weight, scale, bias)
    return _int8_linear_cpu(x, weight, scale, bias)


def _int8_linear_cpu(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    *lead, K = x.shape
    N = weight.shape[0]
    # One cast that also makes the rows contiguous (the kernel wants 2-D, unit stride): every extra op here runs
    # ~200 times per decode step and costs about as much as the int8 weights save (measured: 6 ms of 87 ms).
    rows = x.reshape(-1, K).to(torch.bfloat16, memory_format=torch.contiguous_format)  # (M, K)
    if scale.dtype != torch.bfloat16:
        scale = scale.to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(rows, weight, scale).to(x.dtype).view(*lead, N)  # bf16 (M, N) -> x.dtype
    return y if bias is None else y + bias.to(x.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8 `nn.Linear`: buffers `weight` (N, K) int8 and `scale` (N,) bf16, optional `bias`."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or tuple(scale.shape) != (weight.shape[0],):
            raise ValueError(f"Int8Linear needs an int8 (N, K) weight and (N,) scales, got {weight.dtype} "
                             f"{tuple(weight.shape)} and {tuple(scale.shape)}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.backend: str | None = None  # None = auto; "cpu" / "reference" to force one

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight  # read once: a BlockedLinear's is assembled from its blocks
        q, scale = quantize_int8(weight)
        return cls(q.to(weight.device), scale.to(weight.device), linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]  # (N, K)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend is None and x.is_cpu and ENV not in os.environ:
            # The common case without the dispatch: it runs ~200 times per decode step (-20 us a call).
            return _int8_linear_cpu(x, self.weight, self.scale, self.bias)
        return int8_linear(x, self.weight, self.scale, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------------------------
# int4

INT4_GROUP = 32  # inputs sharing one scale and offset


def quantize_int4(weight: Tensor, group_size: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """(N, K) float weight -> (codes uint8 (N, K) in 0..15, bf16 scales_and_zeros (K / group_size, N, 2)).

    Asymmetric, per group of `group_size` consecutive inputs of a row: weight ~= (code - 8) * scale + zero, the
    convention of the CPU kernel, with scale = (max - min) / 15 and zero = min + 8 * scale, both rounded to bf16
    first (the kernel reads them as bf16) and the codes computed from the rounded values. A constant group gets
    a span of its own magnitude (all codes 0), so it comes back to within bf16 rounding, zeros as zeros.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int4 takes a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"int4 quantisation groups {group_size} inputs: the weight's {K} inputs are not a multiple")
    codes = torch.empty(N, K, dtype=torch.uint8, device=weight.device)
    scales, zeros = [], []
    for start in range(0, N, 256):  # in blocks of rows, as quantize_int8 and for the same reason
        groups = weight[start:start + 256].detach().float().view(-1, K // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (rows, K/G)
        span = torch.where(high > low, high - low, low.abs().clamp(min=1e-6))  # constant group: its own size
        scale = (span / 15).to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        block = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15)
        codes[start:start + 256] = block.view(-1, K)
        scales.append(scale)
        zeros.append(zero)
    scales_and_zeros = torch.stack([torch.cat(scales), torch.cat(zeros)], dim=-1).transpose(0, 1)
    return codes, scales_and_zeros.to(torch.bfloat16).contiguous()


def dequantize_int4(codes: Tensor, scales_and_zeros: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes (N, K) in 0..15 and scales_and_zeros (K / G, N, 2) -> the (N, K) weight they stand for."""
    N, K = codes.shape
    scale, zero = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (N, K/G) each
    G = K // scale.shape[1]
    return ((codes.view(N, K // G, G).to(dtype) - 8) * scale[..., None] + zero[..., None]).view(N, K)


class Int4Linear(nn.Module):
    """Weight-only int4 `nn.Linear` for the CPU: buffers `weight` (packed), `scales_and_zeros`, optional `bias`.

    `weight` is the (N, K / 2) uint8 tensor the kernel packs for itself (`_convert_weight_to_int4pack_for_cpu`;
    its layout is the kernel's and may change with the CPU or the torch version, so nothing here decodes it by
    hand). `codes()` reads the codes back through the kernel: with unit scales and zero offsets, multiplying by
    the identity returns code - 8, a small integer, exactly. The reference path dequantises those codes.
    """

    def __init__(self, codes: Tensor, scales_and_zeros: Tensor, bias: Tensor | None = None):
        super().__init__()
        N, K = codes.shape
        groups = scales_and_zeros.shape[0]
        if (codes.dtype != torch.uint8 or tuple(scales_and_zeros.shape) != (groups, N, 2) or groups == 0
                or K % groups or scales_and_zeros.dtype != torch.bfloat16):
            raise ValueError(f"Int4Linear needs uint8 codes (N, K) and bf16 scales_and_zeros (K / G, N, 2), got "
                             f"{codes.dtype} {tuple(codes.shape)} and {scales_and_zeros.dtype} "
                             f"{tuple(scales_and_zeros.shape)}")
        if not self.fits(N, K, K // groups) or codes.device.type != "cpu":
            raise ValueError(f"Int4Linear runs on the CPU kernel, which takes N a multiple of 64 and groups of a "
                             f"multiple of 32 inputs: got N={N}, K={K}, group {K // groups}, on {codes.device}")
        self.in_features, self.out_features, self.group_size = K, N, K // groups
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.backend: str | None = None

    @staticmethod
    def fits(out_features: int, in_features: int, group_size: int = INT4_GROUP) -> bool:
        """Whether the CPU kernel takes this shape: N a multiple of 64, groups of a multiple of 32 inputs."""
        return out_features % 64 == 0 and group_size % 32 == 0 and in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        codes, scales_and_zeros = quantize_int4(linear.weight)
        return cls(codes, scales_and_zeros, linear.bias)

    def codes(self) -> Tensor:
        """(N, K) uint8 codes, read back through the kernel (a (K, K) product: for tests and debugging)."""
        K, N = self.in_features, self.out_features
        unit = torch.zeros(K // self.group_size, N, 2, dtype=torch.bfloat16)
        unit[..., 0] = 1
        eye = torch.eye(K, dtype=torch.bfloat16)
        return (torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, unit).T + 8).to(
            torch.uint8)  # (N, K)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(self.codes(), self.scales_and_zeros, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cpu:
            raise ValueError(f"Int4Linear runs on the CPU only, got activations on {x.device} (use int8 or bf16)")
        if (self.backend is not None or ENV in os.environ) and _backend(x, self.backend) == "reference":
            y = F.linear(x, self.dequantized_weight(x.dtype))
        else:  # as Int8Linear: the common case without the dispatch
            *lead, K = x.shape
            rows = x.reshape(-1, K).to(torch.bfloat16, memory_format=torch.contiguous_format)  # as in int8
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size,
                                                           self.scales_and_zeros).to(x.dtype).view(*lead, -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


# ---------------------------------------------------------------------------------------------------------------
# bf16


def bf16_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight (N, K)^T + bias with the bf16 weight upcast to the activation dtype."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def bf16_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """`bf16_linear_reference`, on the CPU as a bf16 matmul (activations rounded to bf16, fp32 accumulation)."""
    if _backend(x, backend) == "reference":
        return bf16_linear_reference(x, weight, bias)
    return _bf16_linear_cpu(x, weight, bias)


def _bf16_linear_cpu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = F.linear(x.to(torch.bfloat16), weight).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


class BF16Linear(nn.Module):
    """Weight-only bf16 `nn.Linear`: buffer `weight` (N, K) bf16, optional `bias` (kept in its dtype)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"BF16Linear needs a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        # A buffer, not a parameter: `module.to(dtype)` would otherwise turn it back into fp32.
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BF16Linear":
        return cls(linear.weight, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.backend is None and x.is_cpu and ENV not in os.environ:
            return _bf16_linear_cpu(x, self.weight, self.bias)  # as in Int8Linear.forward
        return bf16_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------------------------

LAYERS = (BF16Linear, Int8Linear, Int4Linear)  # what quantize_weights puts in place of nn.Linear


def quantize_weights(module: nn.Module, mode: str = "int8") -> nn.Module:
    """Replace every `nn.Linear` inside `module` (in place) by its weight-only `mode` variant; returns `module`.

    mode: "bf16", "int8" or "int4". E.g. `quantize_weights(mg.lm, "int8")` for the MusicGen LM (its layers, heads
    and text projection); the fp32 `BlockedLinear`s of `kernels/linear.py` (what a load gives on some CPUs) are
    linears too, quantised from their (N, K) weight. Other modules (norms, embeddings) and buffers are left as they
    are. int4: a linear whose shape the CPU kernel cannot take (`Int4Linear.fits`; e.g. MusicGen Melody's 12-bin
    chroma projection, which runs once per generation) keeps its weights.
    """
    if mode not in MODES:
        raise ValueError(f"quantize_weights mode must be one of {MODES}, got {mode!r}")
    if not isinstance(module, nn.Module):
        raise ValueError(f"quantize_weights takes an nn.Module, got {type(module).__name__}")
    if isinstance(module, (nn.Linear, BlockedLinear)):
        raise ValueError("quantize_weights replaces the nn.Linear layers *inside* a module; wrap a lone "
                         "nn.Linear (Int8Linear.from_linear / BF16Linear.from_linear)")
    make = {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear}[mode].from_linear
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, (nn.Linear, BlockedLinear))]
    if not targets:
        raise ValueError(f"{type(module).__name__} holds no nn.Linear to quantise")
    if mode == "int4":
        fitting = [(name, linear) for name, linear in targets if Int4Linear.fits(linear.out_features,
                                                                                  linear.in_features)]
        if not fitting:
            raise ValueError(f"none of the {len(targets)} nn.Linear of {type(module).__name__} fits the int4 "
                             f"kernel (out_features a multiple of 64, in_features of {INT4_GROUP})")
        targets = fitting
    while targets:  # popped, so that each fp32 layer is freed as soon as its replacement is in place
        name, linear = targets.pop()
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        with torch.no_grad():
            setattr(parent, attr, make(linear))
        del linear
    return module
