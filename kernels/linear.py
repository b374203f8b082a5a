"""fp32 linears for the CPU decode step, where a few activation rows meet a large weight (a "skinny" matmul).

A MusicGen decode step under classifier-free guidance multiplies 2 rows by every weight matrix once, so it runs at
the speed the weights stream from memory. `F.linear` hands that product to torch's BLAS, MKL, whose fast paths
are chosen by CPU vendor: on an Intel Xeon it reads a skinny fp32 weight near the memory bandwidth, but on an AMD
EPYC it takes a generic path (MKL_VERBOSE names it "Intel(R) Architecture processors") that reads it at 4-9 GB/s,
a fifth to a third of what the same machine's `sum` reaches. The same MKL is fast there for another arrangement of
the same product, measured on a 2-core EPYC of family 25 model 17 (Zen 4, AVX-512; 1 thread, 2 rows, by thread CPU
time on a busy machine: benchmarks/RESULTS.md):

    y (M, N) = x (M, K) @ W (N, K)^T                       F.linear: 5-9 GB/s
    y^T (N, M) = W (N, K) @ x^T (K, M), x^T a view of x    15-19 GB/s for K <= 1536, 8-9 GB/s for K = 4096
    the same with W's inputs in contiguous blocks of 1024  14-18 GB/s for K = 4096 too

so `BlockedLinear` stores its weight as `blocks` (K / Kc, N, Kc), Kc = K split into blocks of at most
`BLOCK` inputs (one block, a view of the original tensor, when K <= BLOCK: no copy), and computes
`W_0 @ x_0^T + W_1 @ x_1^T + ...` for up to `SKINNY_ROWS` rows. That is faster at 2 rows only (1 row runs as
fast either way; at 4-8 rows both take MKL's slow path, and the transposed form is the slower): more rows (a
prefill, several prompts) go through `F.linear` on each block. Which layers get it is decided once per process
from what the CPU reports (`route()`), not from a timing that moves with the machine's load:

    route "blocked"  AMD (and Hygon) x86 CPUs with MKL as torch's BLAS, whatever their vector extensions
                     (the EPYC measured has AVX-512 and VNNI: MKL's vendor check, not the ISA, picks the path)
    route "linear"   everything else: Intel CPUs (MKL's own fast path; unchanged), ARM, other BLAS builds

MUSICLM_LINEAR=linear|blocked overrides the choice (tests, debugging, measuring the other route). `relayout`
swaps the layers of a module in place, as `kernels/quant.py`'s `quantize_weights` does; `MusicGen.from_pretrained`
calls it. The layer's `state_dict` writes the original (N, K) `weight`, so checkpoints saved from it are the same.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.kernels.switch import env_route

ROUTES = ("linear", "blocked")
ENV = "MUSICLM_LINEAR"
BLOCK = 1024  # most inputs per weight block: MKL's fast skinny path held up to K = 1536 and fell off from 2048
SKINNY_ROWS = 2  # rows up to which the transposed product is the faster one (measured: 1, 2 yes; 4, 8 no)
BLOCKED_VENDORS = ("AuthenticAMD", "HygonGenuine")  # x86 vendors on which MKL takes its generic path
# The vector extensions that decide which kernels run fast, as /proc/cpuinfo spells them.
EXTENSIONS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# ---------------------------------------------------------------------------------------------------------------
# What the CPU reports


@dataclass(frozen=True)
class CpuInfo:
    vendor: str  # /proc/cpuinfo vendor_id: "GenuineIntel", "AuthenticAMD", ... ("" where there is none)
    model: str   # model name (a VM may shorten it: "AMD EPYC")
    flags: frozenset[str]
    family: str = ""  # "family 25 model 17" (AMD Zen 4): tells the generations apart where the name does not

    def extensions(self) -> list[str]:
        """Which of `EXTENSIONS` the CPU has, in that order."""
        return [name for name in EXTENSIONS if name in self.flags]


def parse_cpuinfo(text: str) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (its first processor: all cores of a machine report the same)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's block
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    family = f"family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    return CpuInfo(fields.get("vendor_id", ""), fields.get("model name", ""),
                   frozenset(fields.get("flags", "").split()), family)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo (read once); an empty one where there is no /proc/cpuinfo."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuInfo("", "", frozenset())


def choose_route(info: CpuInfo, *, mkl: bool) -> str:
    """"blocked" where `F.linear`'s skinny fp32 products are slow (an AMD x86 CPU, MKL as the BLAS), else
    "linear". Decided from the vendor: the vector extensions do not tell the cases apart (see the docstring)."""
    return "blocked" if mkl and info.vendor in BLOCKED_VENDORS else "linear"


@functools.cache
def route() -> str:
    """This process's route: MUSICLM_LINEAR if set, else `choose_route` for this CPU (decided once)."""
    return env_route(ENV, ROUTES) or choose_route(cpu_info(), mkl=torch.backends.mkl.is_available())


# ---------------------------------------------------------------------------------------------------------------
# The layer


def block_weight(weight: Tensor, block: int = BLOCK) -> Tensor:
    """(N, K) weight -> (c, N, K / c) blocks of consecutive inputs, c = ceil(K / block) (1 when K does not split
    into c equal blocks). One block is a view of `weight`; more are a contiguous copy."""
    N, K = weight.shape
    c = -(-K // block)
    if c == 1 or K % c:
        return weight.unsqueeze(0)  # (1, N, K)
    return weight.view(N, c, K // c).transpose(0, 1).contiguous()  # (c, N, K/c)


def unblock_weight(blocks: Tensor) -> Tensor:
    """`block_weight` undone: (c, N, Kc) -> (N, c * Kc) (a view for one block, a copy otherwise)."""
    c, N, Kc = blocks.shape
    return blocks[0] if c == 1 else blocks.transpose(0, 1).reshape(N, c * Kc)


def blocked_linear(x: Tensor, blocks: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ W^T + bias with W given as `block_weight(W)` (c, N, K / c); `F.linear(x, W, bias)` up to
    the order of the fp32 sums."""
    *lead, K = x.shape
    c, N, Kc = blocks.shape
    if c * Kc != K:
        raise ValueError(f"blocked_linear: input of {K} features for blocks {tuple(blocks.shape)} ({c * Kc} inputs)")
    rows = x.reshape(-1, K)  # (M, K)
    cols = slice(0, Kc)
    if rows.shape[0] <= SKINNY_ROWS:
        # y^T = sum_i W_i @ x_i^T: x^T is a transposed view (unit stride down its K rows), the layout in which
        # MKL's small-matrix path streams W; a contiguous (K, M) copy of x^T would take the slow path again.
        xt = rows.t()  # (K, M)
        y = torch.mm(blocks[0], xt[cols]) if bias is None else torch.addmm(bias[:, None], blocks[0], xt[cols])
        for i in range(1, c):
            y.addmm_(blocks[i], xt[i * Kc:(i + 1) * Kc])  # (N, M)
        y = y.t().contiguous()  # (M, N): the next layers' matmuls want unit-stride rows
    else:
        y = F.linear(rows[:, cols], blocks[0], bias)  # (M, N)
        for i in range(1, c):
            y.addmm_(rows[:, i * Kc:(i + 1) * Kc], blocks[i].t())
    return y.view(*lead, N)


class BlockedLinear(nn.Module):
    """`nn.Linear` with its weight stored as (c, N, K / c) input blocks (parameter `blocks`, see the module
    docstring); `weight` gives the (N, K) matrix back, and `state_dict` holds it under `weight`, as nn.Linear's."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, block: int = BLOCK):
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"BlockedLinear needs a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.block = block
        self.blocks = nn.Parameter(block_weight(weight.detach(), block), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = BLOCK) -> "BlockedLinear":
        return cls(linear.weight, linear.bias, block)

    @property
    def weight(self) -> Tensor:
        """(N, K): a view for one block, a copy otherwise (for quantising, saving, inspecting)."""
        return unblock_weight(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        return blocked_linear(x, self.blocks, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # nn.Linear's keys and layout, so that a checkpoint does not depend on the CPU it was saved on.
        weight = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "weight"] = weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the current model has {(self.out_features, self.in_features)}")
            else:
                with torch.no_grad():
                    self.blocks.copy_(block_weight(weight.to(self.blocks.dtype), self.block))
        if self.bias is not None:
            if prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
        if strict:
            known = {prefix + "weight", prefix + "bias"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known
                                   and "." not in k[len(prefix):])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocks={self.blocks.shape[0]}")


def relayout(module: nn.Module, *, route_name: str | None = None, block: int = BLOCK) -> nn.Module:
    """Replace every fp32 CPU `nn.Linear` inside `module` (in place) by a `BlockedLinear` when the route
    (`route()` unless given) is "blocked"; otherwise leave it as it is. Returns `module`. `block`: the most inputs
    per weight block (`block_weight`).

    Each layer's original weight is dropped as soon as its replacement is in place, so a weight that is copied
    into blocks is held twice for one layer at a time (read the weights into memory rather than mapping them,
    or the mapped pages stay resident next to the copy: `convert.musicgen.read_state(lm_in_memory=True)`).
    """
    chosen = route_name or route()
    if chosen not in ROUTES:
        raise ValueError(f"relayout route must be one of {ROUTES}, got {chosen!r}")
    if isinstance(module, nn.Linear):
        raise ValueError("relayout replaces the nn.Linear layers *inside* a module; wrap a lone nn.Linear "
                         "(BlockedLinear.from_linear)")
    if chosen == "linear":
        return module
    # fp32 CPU weights only: what was measured (bf16 / fp16 products do not go through MKL's sgemm).
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Linear
               and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"]
    while targets:  # popped, so that each original is freed once its replacement is in place
        name, linear = targets.pop()
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, BlockedLinear(linear.weight, linear.bias, block))
        del linear
    return module
