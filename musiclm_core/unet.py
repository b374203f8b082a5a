"""The latent-diffusion UNet of MusicLDM and AudioLDM 2: predicts the noise in a (B, 8, T, F) VAE latent.

One class covers both checkpoints (specs/ldm.md §10, §11). The layout, for channels (128, 256, 384, 640):

    sample (B, 8, T, F) -> conv_in -> h (B, 128, T, F)                           skips = [h]
    down level i:  layers_per_level x Layer(ResBlock [+ transformers]) -> skips  (level 0 has no transformers)
                   conv stride 2 (all but the last level)                -> skips
    mid:           Layer(ResBlock + transformers), ResBlock
    up level i:    (layers_per_level + 1) x Layer(cat[h, skips.pop()] -> ResBlock [+ transformers])
                   nearest upsampling to the next skip's size + conv (all but the last level)
    out:           GroupNorm -> SiLU -> conv_out -> (B, 8, T, F)

Every ResBlock adds a projection of the embedding `emb`: the timestep's sinusoid (float32, [cos | sin], shift 0)
through two linears, and for MusicLDM the CLAP text vector through `class_proj`, concatenated *after* it (1024-d).

A Layer with attention holds one `Transformer` per context slot (`config.context_dims`), run one after the other.
Each is GroupNorm -> 1x1 projection -> `depth` x [self-attention, second attention, GEGLU feed-forward] -> 1x1
projection + residual. Which tensor the second attention of slot s attends to is decided by s, as diffusers does
(AudioLDM2UNet2DConditionModel's blocks, modeling_audioldm2.py "if cross_attention_dim is not None and idx <= 1"):

    context_dims[s] is None   -> its own normalised input (a second self-attention)      MusicLDM's only slot
    s <= 1 with a width D     -> encoder_hidden_states (AudioLDM 2: the 8 GPT-2 vectors, D = 768, no mask)
    s >= 2 with a width D     -> encoder_hidden_states_1 (AudioLDM 2: Flan-T5 states, D = 1024, with its mask)

A 0/1 mask becomes an additive bias of -10000 on the masked keys, not -inf (diffusers' UNet forward), so a fully
masked row averages all keys as the reference does.

Heads: `num_heads` in every transformer (8 in both checkpoints: diffusers reads `attention_head_dim` as the number
of heads, specs/ldm.md §15.1), so the head size is channels / 8 (32, 48, 80).

CPU routes (fp32 inference; each with its switch and a test against the plain computation): Winograd for the 3x3
ResBlock convs and the x2 upsampling convs (kernels/winograd.py, MUSICLM_CONV3X3), oneDNN matmuls for the
transformers' linears, the GEGLU (GELU fused into the gate's matmul) and the ResBlocks' 1x1 skips (`dense`, `geglu`,
`pointwise_conv`; MUSICLM_UNET_LINEAR=torch turns them off), all of these against weights packed once into
oneDNN's layout (kernels/packed.py: one packed copy of each weight, made on its first call and kept until it
changes), and the rows of a batch as streams, one per share of the threads (kernels/streams.py,
MUSICLM_STREAMS=off). One step at batch 2, latent (2, 8, 256, 16), official
configs, random weights, 2-core AMD EPYC (Zen 4), against diffusers 0.42 in the same run (benchmarks/unet.py):

    1 thread, load 1.2-1.6           MusicLDM                  AudioLDM 2
    before this file's GEGLU/skip    2089 ms (1.28x)           -
    now                              1740-1873 ms (1.33-1.36x) 3545-3646 ms (1.19-1.20x)
    2 threads, load ~1.05, F(2x2) Winograd only: before 1557 ms (1.10x; 1.12x by CPU time), after 1471 ms (1.29x;
                                     1.37x by CPU time)
    2 threads, load 1.3-1.5, now     1592 ms (1.12x; 1.20x by CPU)   2340 ms (1.17x; 1.22x by CPU)
    2 threads, idle, with streams    991-1127 ms (1.20-1.33x)   1816-1986 ms (1.27-1.32x)  (benchmarks/RESULTS.md)
    and packed weights (kernels/     904-1255 ms (1.25-1.51x,    1710-2119 ms (1.30-1.50x,
    packed.py), 9 runs               median 1.45x)               median 1.35x); 1 thread 1.34x / 1.33x

The step is near the machine's fp32 rate in its matmuls (one core ~90-100 GFLOPS in oneDNN); what is left at one
thread is mostly self-attention at 1024 tokens (torch's flash kernel, ~33 ms a call, 20 calls in AudioLDM 2) and
the transformers' matmuls. On 2 threads the wall time moves with the other jobs on the 2 cores (diffusers' own
step took 1.37-1.90 s over this session's runs): with F(4x4) Winograd at 128 channels on two threads the ResBlocks
measured no faster than on one under load ~1.7 (many short passes, each a thread handoff), which is why
kernels/winograd.py now takes it on one thread only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.kernels import attention, packed, streams, winograd
from musiclm_core.kernels.switch import env_route
from musiclm_core.kernels.winograd import WinogradConv2d
from musiclm_core.vae import upsample_conv, upsample_conv_weights

KIND = "unet"  # the model name in a native checkpoint's config.json
MASK_BIAS = -10000.0  # what a masked context token adds to the attention scores (diffusers' UNet forward)
# The oneDNN route of `dense`, `geglu` and `pointwise_conv`: on where torch has oneDNN, unless
# MUSICLM_UNET_LINEAR=torch (measuring, debugging).
ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                 and env_route("MUSICLM_UNET_LINEAR", ("onednn", "torch")) != "torch")


@dataclass
class UNetConfig:
    in_channels: int = 8                              # latent channels in
    out_channels: int = 8                             # predicted noise channels
    channels: tuple[int, ...] = (128, 256, 384, 640)  # per level (diffusers: block_out_channels)
    attention: tuple[bool, ...] = (False, True, True, True)  # whether level i holds transformers (up mirrors down)
    layers_per_level: int = 2                         # ResBlocks per down level; the up levels have one more
    context_dims: tuple[int | None, ...] = (None, 768, 1024)  # one transformer per slot; None: self-attention
    transformer_depth: int = 1                        # attention blocks per transformer (transformer_layers_per_block)
    num_heads: int = 8                                # heads in every attention (diffusers: attention_head_dim)
    class_embed_dim: int | None = None                # MusicLDM: 512, the CLAP vector projected and concatenated
    norm_groups: int = 32                             # GroupNorm groups everywhere
    norm_eps: float = 1e-5                            # ResBlocks' and the output's GroupNorm; transformers use 1e-6
    downsample_padding: int = 1

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention = tuple(bool(a) for a in self.attention)
        self.context_dims = tuple(None if d is None else int(d) for d in self.context_dims)
        if not self.channels or len(self.attention) != len(self.channels):
            raise ValueError(f"attention {self.attention} needs one flag per level of channels {self.channels}")
        if not self.context_dims:
            raise ValueError("context_dims needs at least one slot (None for a self-attention-only transformer)")
        for c in self.channels:
            if c % self.norm_groups or c % self.num_heads:
                raise ValueError(f"channels {c} must be divisible by norm_groups {self.norm_groups} and "
                                 f"num_heads {self.num_heads}")
        for name, slots in (("encoder_hidden_states", self.context_dims[:2]),
                            ("encoder_hidden_states_1", self.context_dims[2:])):
            widths = {d for d in slots if d is not None}
            if len(widths) > 1:
                raise ValueError(f"context_dims {self.context_dims}: the slots that read {name} must share one "
                                 f"width, got {sorted(widths)}")
        if min(self.layers_per_level, self.transformer_depth, self.in_channels, self.out_channels) < 1:
            raise ValueError("layers_per_level, transformer_depth, in_channels and out_channels must be >= 1")

    @property
    def time_dim(self) -> int:
        """Width of the time embedding (diffusers: 4 x the first level's channels)."""
        return 4 * self.channels[0]

    @property
    def emb_dim(self) -> int:
        """Width of what the ResBlocks receive: the time embedding, and the class embedding concatenated after it."""
        return self.time_dim * (2 if self.class_embed_dim else 1)

    @property
    def context_width(self) -> int | None:
        """Width of `encoder_hidden_states` (slots 0 and 1), or None when no slot reads it."""
        return next((d for d in self.context_dims[:2] if d is not None), None)

    @property
    def context_width_1(self) -> int | None:
        """Width of `encoder_hidden_states_1` (slots 2 and up), or None when no slot reads it."""
        return next((d for d in self.context_dims[2:] if d is not None), None)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "UNetConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown UNetConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid UNet config: {err}") from err


PRESETS: dict[str, UNetConfig] = {
    # ucsd-reach/musicldm: no text context; the CLAP vector is a class embedding; attn2 is a self-attention.
    "musicldm": UNetConfig(context_dims=(None,), class_embed_dim=512),
    # cvssp/audioldm2: per layer a self-attention-only transformer, one on GPT-2's 8 vectors, one on Flan-T5.
    "audioldm2": UNetConfig(),
    # cvssp/audioldm2-large: a fourth, self-attention-only transformer per layer, and two blocks in each.
    "audioldm2-large": UNetConfig(context_dims=(None, 768, 1024, None), transformer_depth=2),
    # cvssp/audioldm2-music: the base layout (350 M UNet per diffusers' docs table; specs/ldm.md §11.1 marks the
    # hub config unread). Identical to "audioldm2"; the converter reads each checkpoint's own config.json.
    "audioldm2-music": UNetConfig(),
    "tiny-musicldm": UNetConfig(channels=(16, 32, 48), attention=(False, True, True), layers_per_level=1,
                                context_dims=(None,), num_heads=4, class_embed_dim=24, norm_groups=8),
    "tiny-audioldm2": UNetConfig(channels=(16, 32, 48), attention=(False, True, True), layers_per_level=1,
                                 context_dims=(None, 24, 40), num_heads=4, norm_groups=8),
}


# ---------------------------------------------------------------------------------------------------------------
# Blocks


def timestep_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """(B,) timesteps -> (B, dim) float32 [cos | sin] with frequencies exp(-ln(1e4) k / (dim/2)), k < dim/2.

    diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0 (embeddings.py), always
    in float32 (the caller casts).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResBlock(nn.Module):
    """h = conv1(SiLU(GN(x))) + proj(SiLU(emb)); out = skip(x) + conv2(SiLU(GN(h))) (diffusers' ResnetBlock2D)."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(config.norm_groups, c_in, eps=config.norm_eps)
        # Winograd F(2x2, 3x3) for the eligible calls (256+ channels in and out, CPU fp32 inference; see
        # kernels/winograd.py), nn.Conv2d for the rest.
        self.conv1 = WinogradConv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(config.emb_dim, c_out)
        self.norm2 = nn.GroupNorm(config.norm_groups, c_out, eps=config.norm_eps)
        self.conv2 = WinogradConv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        """x (B, C_in, T, F), emb_act = SiLU(emb) (B, E) -> (B, C_out, T, F)."""
        # SiLU in place on the GroupNorm's fresh output, the embedding added in place to the conv's: one pass
        # and no new (B, C, T, F) buffer each (neither output is saved for a backward pass).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h.add_(self.emb_proj(emb_act)[:, :, None, None])
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.skip is None else pointwise_conv(self.skip, x))


def dense(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for the transformers' linears, through oneDNN's matmul (torch.ops.mkldnn._linear_pointwise, the
    op torch's compiler emits for frozen CPU linears) instead of MKL's when `layer` is a plain nn.Linear and the
    call is a CPU fp32 one without gradients on 16 rows or more; any other layer (a LoRA adapter) or call: layer(x).

    Why: MKL picks its fp32 GEMM kernels by CPU vendor (kernels/linear.py), and on the AMD EPYC measured it ran
    the transformers' matmuls at 64-90 GFLOPS on one core where oneDNN reached 88-101 (1.05-1.45x; the GEGLU's
    (2048, 256) x (256, 2048) and the 640-channel (128, 640) x (640, 5120) gained most). Same weights, the sums in
    another order (~1e-6 relative). The layers stay nn.Linear, so LoRA (train/lora.py) and the key tables see
    the usual modules.
    """
    if _onednn(layer, nn.Linear, x):
        return packed.linear(x, layer.weight, layer.bias)
    return layer(x)


def _onednn(layer: nn.Module, kind: type, x: Tensor) -> bool:
    """Whether a call of `layer` (exactly a `kind`) on x takes the oneDNN route (`dense`'s docstring)."""
    return (ONEDNN_LINEAR and type(layer) is kind and packed.available(x, layer.weight)
            and x.numel() >= 16 * layer.weight.shape[1])


def geglu(layer: nn.Linear, x: Tensor) -> Tensor:
    """value * GELU(gate) with [value | gate] = layer(x) (B, N, 2H) -> (B, N, H): the GEGLU's first half.

    On `dense`'s oneDNN route the two halves are two matmuls on the halves of the weight (row slices, no copy),
    the exact (erf) GELU fused into the gate's as oneDNN's post-op, and the product taken in place in the value's
    output: no (B, N, 2H) output read back strided, no separate GELU pass or product buffer. On the 2-core EPYC
    measured (2 x 1024 tokens, 256 -> 2048 -> 256, the MusicLDM / AudioLDM 2 top level) the feed-forward took
    17-18 ms instead of 19-30 ms on 2 threads, 34-37 instead of 35-50 on 1. Same sums (~2e-6 on outputs ~1).
    """
    if _onednn(layer, nn.Linear, x):
        half = layer.weight.shape[0] // 2
        w, b = layer.weight, layer.bias
        gate = packed.linear(x, w, None if b is None else b[half:], part=(half, 2 * half), post="gelu")
        value = packed.linear(x, w, None if b is None else b[:half], part=(0, half))
        return value.mul_(gate)
    value, gate = layer(x).chunk(2, dim=-1)  # 2 x (B, N, H)
    return value * F.gelu(gate)


def pointwise_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) for a 1x1 convolution (the ResBlocks' skips): on `dense`'s oneDNN route a matmul over the
    channels of the (B, T, F, C) view of a channels-last x (a view, no copy), returned with channels-last strides;
    torch's convolution otherwise. On one EPYC core 0.97-1.28x torch's 1x1 convolution at the UNet's six skip
    shapes (torch took its slow im2col path there; it is oneDNN's too on 2 threads, where the two run level)."""
    if (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and _onednn(conv, nn.Conv2d, x)):
        y = packed.linear(x.permute(0, 2, 3, 1), conv.weight, conv.bias)  # (B, T, F, K); the weight read as (K, C)
        return y.permute(0, 3, 1, 2)  # (B, K, T, F), channels-last strides
    return conv(x)


class Attention(nn.Module):
    """Multi-head attention over SDPA. Self-attention (context_dim None) projects q, k, v in one matmul (`qkv`);
    cross-attention projects q from the tokens and k, v from the context in one matmul (`kv`). No biases on the
    projections, a bias on `out` (diffusers' Attention with bias=False, out_bias=True)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.context_dim = context_dim
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """x (B, N, C); context (B, L, D) for a cross-attention; bias (B, 1, 1, L) additive -> (B, N, C)."""
        B, N, C = x.shape
        H = self.num_heads
        if self.context_dim is None:
            q, k, v = dense(self.qkv, x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        else:
            L = context.shape[1]
            q = dense(self.q, x).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
            k, v = dense(self.kv, context).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, D)
        out = attention(q, k, v, bias=bias)  # (B, H, N, D)
        return dense(self.out, out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class TransformerBlock(nn.Module):
    """x += attn1(LN(x)); x += attn2(LN(x), context); x += W2 (a * GELU(g)) with [a | g] = W1 LN(x).

    diffusers' BasicTransformerBlock (attention.py) with norm_type "layer_norm" (eps 1e-5) and a GEGLU
    feed-forward of 4x width whose first half is the value and second half the gate, exact (erf) GELU.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, num_heads, None)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff_in = nn.Linear(dim, 8 * dim)  # value and gate in one matmul
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, bias)
        return x + dense(self.ff_out, geglu(self.ff_in, self.norm3(x)))  # GEGLU (B, N, 4C) -> (B, N, C)


class Transformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 projection -> tokens -> TransformerBlocks -> 1x1 projection -> + input.

    diffusers' Transformer2DModel with conv projections (use_linear_projection=False); a 1x1 convolution is a
    linear map of each pixel's channels, so ours are nn.Linear on the (B, T*F, C) tokens (the converter squeezes
    the (C, C, 1, 1) weights). Tokens run over time first, then frequency: token n = t * F + f.
    """

    def __init__(self, config: UNetConfig, dim: int, context_dim: int | None):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, config.num_heads, context_dim)
                                    for _ in range(config.transformer_depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None, bias: Tensor | None) -> Tensor:
        B, C, T, Fq = x.shape
        # (B, C, T, F) -> (B, T, F, C) -> (B, N, C): no copy when x is channels-last
        h = dense(self.proj_in, self.norm(x).permute(0, 2, 3, 1).reshape(B, T * Fq, C))
        for block in self.blocks:
            h = block(h, context, bias)
        h = dense(self.proj_out, h).view(B, T, Fq, C).permute(0, 3, 1, 2)  # (B, C, T, F), channels-last strides
        return x + h


class Layer(nn.Module):
    """A ResBlock, then (at a level with attention) one Transformer per context slot, in slot order."""

    def __init__(self, config: UNetConfig, c_in: int, c_out: int, with_attention: bool):
        super().__init__()
        self.res = ResBlock(config, c_in, c_out)
        dims = config.context_dims if with_attention else ()
        self.transformers = nn.ModuleList(Transformer(config, c_out, d) for d in dims)

    def forward(self, x: Tensor, emb_act: Tensor, slots: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
        """slots[s] = (context, bias) for transformer s (see `UNet.route`)."""
        x = self.res(x, emb_act)
        for transformer, (context, bias) in zip(self.transformers, slots):
            x = transformer(x, context, bias)
        return x


class UpsampleConv(WinogradConv2d):
    """Nearest upsampling to a given size, then this 3x3 convolution (diffusers' Upsample2D with use_conv=True).

    When the size is exactly twice the input's (the usual case) on the CPU without gradients, the upsampled image
    is never made:
      * Winograd F(2x2, 3x3) on the upsampled image, built from the input (kernels/winograd.upsample_conv3x3: 9
        products per input pixel and channel pair), for the calls winograd.uses_upsample_winograd takes (CPU fp32,
        256+ channels, MUSICLM_CONV3X3 not "conv"): on one EPYC core, (B, C, H, W) before upsampling, against the
        folded convolution below: (2, 640, 32, 2) 34.4 -> 14.0 ms, (2, 384, 64, 4) 32.6 -> 17.9 ms,
        (2, 256, 128, 8) 49.7 -> 31.5 ms; 2 threads 18.2 -> 10.2, 18.3 -> 12.0, 25.4 -> 20.0 ms wall (load ~1.4);
        ~1e-5 from the unfolded conv at outputs ~3, as the folded one;
      * otherwise one sub-pixel convolution of four 2x2 kernels over the input (vae.upsample_conv: 16 products
        per input pixel and channel pair instead of 36, no 4x larger upsampled copy; measured with the VAE's).
    Both transformed weights are cached until the weight changes (WinogradConv2d's cache; `folded_weight`).
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)
        self._folded: tuple[tuple, Tensor] | None = None

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """x (B, C, H, W) -> (B, C, *size)."""
        H, W = x.shape[-2:]
        if tuple(size) == (2 * H, 2 * W) and x.device.type == "cpu" and not torch.is_grad_enabled():
            if winograd.uses_upsample_winograd(x, self.weight):
                return winograd.upsample_conv3x3(x, self.upsample_weight(), self.bias)
            return upsample_conv(x, self.folded_weight(), self.bias)
        return super().forward(F.interpolate(x, size=size, mode="nearest"))

    def folded_weight(self) -> Tensor:
        """upsample_conv_weights(self.weight) (4 * C, C, 2, 2), cached (key as WinogradConv2d's)."""
        w = self.weight
        key = (w.data_ptr(), -1 if w.is_inference() else w._version, w.dtype, w.device, tuple(w.shape))
        if self._folded is None or self._folded[0] != key:
            # channels-last, as UNet keeps its convolution weights (`UNet.memory_format`)
            self._folded = (key, upsample_conv_weights(w.detach()).contiguous(memory_format=torch.channels_last))
        return self._folded[1]


class Level(nn.Module):
    """The layers of one resolution and the conv that changes it (stride 2 down; after nearest upsampling up)."""

    def __init__(self, layers: list[Layer], resample: nn.Conv2d | UpsampleConv | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.resample = resample


# ---------------------------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """The noise predictor: `forward(sample, timestep, ...)` -> noise of the sample's shape.

    >>> unet = UNet.from_pretrained("cvssp/audioldm2")   # or a pipeline folder, its unet/ folder, a native folder
    >>> eps = unet(latents, t, encoder_hidden_states=gpt2_vectors,
    ...            encoder_hidden_states_1=t5_states, encoder_attention_mask_1=t5_mask)
    >>> eps = musicldm_unet(latents, t, class_embed=clap_text_embeds)
    """

    # The layout forward runs in; from_pretrained puts the convolution weights in it too.
    memory_format = torch.channels_last

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        n = len(ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_in = nn.Linear(ch[0], config.time_dim)
        self.time_out = nn.Linear(config.time_dim, config.time_dim)
        self.class_proj = nn.Linear(config.class_embed_dim, config.time_dim) if config.class_embed_dim else None

        self.down = nn.ModuleList()
        c_prev = ch[0]
        for i, c in enumerate(ch):
            layers = [Layer(config, c_prev if j == 0 else c, c, config.attention[i])
                      for j in range(config.layers_per_level)]
            last = i == n - 1
            self.down.append(Level(layers, None if last else
                                   nn.Conv2d(c, c, 3, stride=2, padding=config.downsample_padding)))
            c_prev = c
        self.mid = Layer(config, ch[-1], ch[-1], True)  # diffusers' mid block always has its transformers
        self.mid_res = ResBlock(config, ch[-1], ch[-1])

        # Skip widths in the order the up path pops them (diffusers' CrossAttnUpBlock2D res_skip_channels).
        skip_widths = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(config.layers_per_level + (i < n - 1))]
        self.up = nn.ModuleList()
        c_prev = ch[-1]
        for i in reversed(range(n)):
            layers = []
            for _ in range(config.layers_per_level + 1):
                layers.append(Layer(config, c_prev + skip_widths.pop(), ch[i], config.attention[i]))
                c_prev = ch[i]
            self.up.append(Level(layers, None if i == 0 else UpsampleConv(ch[i])))

        self.norm_out = nn.GroupNorm(config.norm_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor | float | int, *, class_embed: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                encoder_hidden_states_1: Tensor | None = None,
                encoder_attention_mask_1: Tensor | None = None) -> Tensor:
        """(B, in_channels, T, F) noisy latent at `timestep` -> (B, out_channels, T, F) predicted noise.

        timestep: a number, a 0-dim or (1,) tensor (shared by the batch), or (B,).
        class_embed: (B, class_embed_dim), MusicLDM's CLAP text vector (diffusers: `class_labels`).
        encoder_hidden_states: (B, L, D), read by slots 0 and 1 (AudioLDM 2: the GPT-2 vectors); optional mask
            encoder_attention_mask (B, L), 1 = keep, 0 = masked (the pipeline passes none).
        encoder_hidden_states_1: (B, L1, D1), read by slots 2 and up (AudioLDM 2: Flan-T5 states) with the mask
            encoder_attention_mask_1 (B, L1). Unlike diffusers, a missing one is an error, not a fallback to
            `encoder_hidden_states`.
        T and F need not be multiples of 2**(levels - 1): each upsampling goes to its skip's exact size.
        """
        self._check_sample(sample)
        B = sample.shape[0]
        emb = self.embed(timestep, class_embed, B)  # (B, E)
        slots = self.route(B, encoder_hidden_states, encoder_attention_mask,
                           encoder_hidden_states_1, encoder_attention_mask_1)
        emb_act = F.silu(emb)  # every ResBlock takes SiLU(emb) (ResnetBlock2D applies it each time)
        n = streams.streams(B, sample)
        if n == 1 or self._hooked():
            return self.trunk(sample, emb_act, slots)
        # The rows never meet: on the CPU each group runs in its own thread, on its share of the cores
        # (kernels/streams.py: the two rows of a guided step, one thread each on 2 cores).
        rows = [slice(i * B // n, (i + 1) * B // n) for i in range(n)]  # n groups of consecutive rows (views)
        parts = [(sample[r], emb_act[r], [(None if c is None else c[r], None if b is None else b[r])
                                          for c, b in slots]) for r in rows]
        return torch.cat(streams.split(lambda part: self.trunk(*part), parts))

    def _hooked(self) -> bool:
        """Whether a forward (pre-)hook is registered on a submodule or globally: a researcher's hook that captures
        activations expects the whole batch in one call, so a hooked UNet does not split its rows."""
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def trunk(self, sample: Tensor, emb_act: Tensor,
              slots: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
        """conv_in -> down -> mid -> up -> conv_out on (B, in_channels, T, F) given SiLU(emb) (B, E) and the
        slots' (context, bias) (`route`): every op of the step but the conditioning."""
        weight = self.conv_in.weight
        # Channels-last throughout (`memory_format`): the transformers' (B, C, T, F) -> (B, T*F, C) token views
        # then need no copy, and oneDNN's convolutions take NHWC as it is. In fp32 on the 2-core EPYC measured it
        # ran on par with NCHW (both layouts are bound by the matmuls); set memory_format to compare.
        h = self.conv_in(sample.to(dtype=weight.dtype, memory_format=self.memory_format))  # (B, C0, T, F)
        skips = [h]
        for level in self.down:
            for layer in level.layers:
                h = layer(h, emb_act, slots)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C, ceil(T/2), ceil(F/2))
                skips.append(h)
        h = self.mid_res(self.mid(h, emb_act, slots), emb_act)
        for level in self.up:
            for layer in level.layers:
                h = layer(torch.cat([h, skips.pop()], dim=1), emb_act, slots)
            if level.resample is not None:
                # Nearest upsampling to the next skip's size: x2 when the sizes divide, else diffusers'
                # `upsample_size` (unet_2d_condition.py forward_upsample_size); the two agree when they divide.
                h = level.resample(h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()  # (B, C_out, T, F), row-major again

    # -- conditioning -----------------------------------------------------------------------------------------

    def _check_sample(self, sample: Tensor) -> None:
        cfg = self.config
        if not isinstance(sample, Tensor) or sample.dim() != 4 or not sample.is_floating_point():
            what = f"shape {tuple(sample.shape)}, {sample.dtype}" if isinstance(sample, Tensor) else type(sample)
            raise ValueError(f"sample must be a float tensor (B, {cfg.in_channels}, T, F), got {what}")
        if sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample has {sample.shape[1]} channels, this UNet takes {cfg.in_channels}: expected "
                             f"(B, {cfg.in_channels}, T, F), got {tuple(sample.shape)}")

    def embed(self, timestep: Tensor | float | int, class_embed: Tensor | None, B: int) -> Tensor:
        """(B, emb_dim): the time embedding [+ the class embedding concatenated after it]."""
        cfg = self.config
        dtype, device = self.conv_in.weight.dtype, self.conv_in.weight.device
        t = torch.as_tensor(timestep, device=device)
        if t.dim() > 1 or t.numel() not in (1, B) or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timestep must be a number or a tensor of shape () / (1,) / (B,) = ({B},), "
                             f"got {tuple(t.shape)} {t.dtype}")
        t = t.reshape(-1).expand(B)  # (B,)
        emb = self.time_out(F.silu(self.time_in(timestep_embedding(t, cfg.channels[0]).to(dtype))))  # (B, E)
        if cfg.class_embed_dim is None:
            if class_embed is not None:
                raise ValueError("this UNet has no class embedding (class_embed_dim is None): pass class_embed=None")
            return emb
        if class_embed is None:
            raise ValueError(f"this UNet needs class_embed (B, {cfg.class_embed_dim}) (MusicLDM: the CLAP text "
                             f"embedding; diffusers calls it class_labels)")
        if class_embed.shape != (B, cfg.class_embed_dim):
            raise ValueError(f"class_embed must be (B, {cfg.class_embed_dim}) = ({B}, {cfg.class_embed_dim}), "
                             f"got {tuple(class_embed.shape)}")
        return torch.cat([emb, self.class_proj(class_embed.to(device=device, dtype=dtype))], dim=-1)

    def route(self, B: int, states: Tensor | None, mask: Tensor | None, states_1: Tensor | None,
              mask_1: Tensor | None) -> list[tuple[Tensor | None, Tensor | None]]:
        """(context, additive bias (B, 1, 1, L) or None) for each slot, by slot index (module docstring)."""
        cfg = self.config
        first = self._context("encoder_hidden_states", states, mask, cfg.context_width, B)
        second = self._context("encoder_hidden_states_1", states_1, mask_1, cfg.context_width_1, B)
        return [(None, None) if dim is None else first if s <= 1 else second for s, dim in enumerate(cfg.context_dims)]

    def _context(self, name: str, states: Tensor | None, mask: Tensor | None, width: int | None,
                 B: int) -> tuple[Tensor | None, Tensor | None]:
        weight = self.conv_in.weight
        if width is None:
            if states is not None or mask is not None:
                raise ValueError(f"this UNet has no slot that reads {name} (context_dims "
                                 f"{self.config.context_dims}): pass {name}=None")
            return None, None
        if states is None:
            raise ValueError(f"this UNet needs {name} (B, L, {width}) (context_dims {self.config.context_dims})")
        if states.dim() != 3 or states.shape[0] != B or states.shape[2] != width:
            raise ValueError(f"{name} must be (B, L, {width}) = ({B}, L, {width}), got {tuple(states.shape)}")
        states = states.to(device=weight.device, dtype=weight.dtype)
        if mask is None:
            return states, None
        mask_name = name.replace("hidden_states", "attention_mask")
        if tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"{mask_name} must be (B, L) = {tuple(states.shape[:2])} to match {name}, "
                             f"got {tuple(mask.shape)}")
        bias = (1 - mask.to(device=weight.device, dtype=weight.dtype)) * MASK_BIAS  # (B, L)
        return states, bias[:, None, None, :]  # (B, 1, 1, L): every head and query

    # -- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> "UNet":
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(PRESETS[name])

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "UNet":
        """A native folder, a diffusers `unet/` folder (UNet2DConditionModel or AudioLDM2UNet2DConditionModel),
        or a diffusers pipeline folder (its `unet/` is read); a hub id is downloaded first (the UNet only)."""
        from musiclm_core.convert import keys, unet as convert  # convert/ imports this module: import at call time

        folder = convert.resolve(name_or_path, revision=revision)
        config_file = folder / "config.json"
        if config_file.is_file() and hub.NATIVE_FORMAT in hub.read_json(config_file):
            config, state = hub.load_native(folder, KIND)
            config = UNetConfig.from_dict(config, source=str(config_file))
            model = keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        else:
            model = convert.load_diffusers_folder(folder, dtype=dtype)
        return model.to(memory_format=cls.memory_format)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)
