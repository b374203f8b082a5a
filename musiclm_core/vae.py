"""The variational autoencoder of MusicLDM and AudioLDM 2 (diffusers' `AutoencoderKL`): log-mel <-> latents.

    mel (B, 1, T, F=64) -> encoder: conv_in, stages of ResBlocks, each stage but the last halving T and F,
                           a mid block (ResBlock, one single-head self-attention over all T*F positions, ResBlock),
                           GroupNorm + SiLU + conv_out -> quant_conv -> moments (B, 2 * 8, T/4, F/4)
                        -> DiagonalGaussian: mean and log-variance (B, 8, T/4, 16)
    z (B, 8, T/4, 16)   -> post_quant_conv -> decoder: conv_in, mid block, stages of ResBlocks, each stage but the
                           last doubling T and F (nearest neighbour + conv) -> GroupNorm + SiLU + conv_out
                        -> mel (B, 1, T, 64)

The mel spectrogram is treated as a one-channel image whose height is time and whose width is the 64 mel bins,
the layout diffusers' pipelines hand to the vocoder after `squeeze(1)`. The pipelines decode `z / scaling_factor`
(`scaling_factor` is learned per checkpoint: 0.411 for AudioLDM 2, 1.075 for MusicLDM; specs/ldm.md §4.1) and
never encode; training encodes and multiplies by it.

Every GroupNorm of this model uses eps 1e-6 (specs/ldm.md §15.5). The encoder's down-sampling pads only on the
right and at the bottom before a stride-2 convolution without padding (§15.7), so T_latent = floor(floor(T/2)/2)
for the official three stages, and the decoder gives 4 * T_latent rows back (T rounded down to a multiple of 4).

On the CPU without gradients two layers take faster routes to the same maths (`Upsample`'s sub-pixel
convolution and the channels-last `Conv2d`); their docstrings say why, and
tests/unit/test_vae.py holds them to the plain ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.kernels import winograd
from musiclm_core.kernels.attention import attention
from musiclm_core.kernels.winograd import WinogradConv2d

KIND = "vae"  # the model name in a native checkpoint's config.json

# GroupNorm eps everywhere in this model (diffusers' vae.py passes resnet_eps=1e-6 to every block). The UNet
# (musiclm_core/unet.py) has the same kind of ResBlock, Downsample and Upsample, with eps 1e-5 in its ResBlocks,
# padding 1 in its Downsample and a time embedding added between the two convs; the blocks are kept apart on
# purpose: each file reads top to bottom, and neither model's quirks leak into the other's.
EPS = 1e-6


@dataclass
class VAEConfig:
    in_channels: int = 1                                 # channels of the mel "image" (1)
    out_channels: int = 1
    block_out_channels: tuple[int, ...] = (128, 256, 512)  # width of each stage; all but the last one resample
    layers_per_block: int = 2                            # ResBlocks per encoder stage (the decoder has one more)
    latent_channels: int = 8
    norm_num_groups: int = 32
    mel_bins: int = 64                                   # F: the frequency axis the model was trained on
    scaling_factor: float = 0.4110932946205139           # latents are multiplied by it for the diffusion model

    def __post_init__(self):
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be positive widths, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1 or self.latent_channels < 1 or self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("layers_per_block, latent_channels, in_channels and out_channels must be >= 1")
        if self.mel_bins % self.downsample_factor:
            raise ValueError(f"mel_bins {self.mel_bins} is not a multiple of the down-sampling factor "
                             f"{self.downsample_factor}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be positive, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """How much the encoder shrinks T and F (4 for the official three stages)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_bins(self) -> int:
        """The latents' frequency axis: mel_bins / downsample_factor (16)."""
        return self.mel_bins // self.downsample_factor

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "VAEConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown VAEConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid VAE config: {err}") from err


PRESETS: dict[str, VAEConfig] = {
    # cvssp/audioldm2 vae/config.json (specs/ldm.md §4.1); -large and -music: read scaling_factor from the file.
    "audioldm2": VAEConfig(scaling_factor=0.4110932946205139),
    # ucsd-reach/musicldm vae/config.json: the same network, only the learned scaling factor differs.
    "musicldm": VAEConfig(scaling_factor=1.075324296951294),
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
                      mel_bins=16, scaling_factor=0.5),
}


# ---------------------------------------------------------------------------------------------------------------
# Layers


def inference_on_cpu(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


class Conv2d(WinogradConv2d):
    """nn.Conv2d that runs in the channels-last layout (B, H, W, C in memory) on the CPU without gradients, and its
    3x3 convolutions by Winograd's F(4x4, 3x3) or F(2x2, 3x3) there (kernels/winograd.py: F(4x4) from 128
    channels on one thread, from 256 on more; F(2x2) where F(4x4) does not pay).

    Why: torch's CPU convolution (oneDNN) reorders an NCHW input into its own layout and the result back on
    every call; a channels-last input it reads as it is. The whole decoder then stays channels-last (GroupNorm,
    SiLU, the residual adds and the attention's reshapes all read that layout directly). With the sub-pixel
    `Upsample`, a 10.24 s decode ran 1.29-1.36x faster than diffusers' NCHW decoder and 1.10-1.13x faster than
    diffusers moved to channels-last (2-core AMD EPYC, 2 threads, busy machine; benchmarks/ldm_parts.py). Same
    sums, same weights; the layout of the weight itself made no difference (measured). With the Winograd routes on
    as well, 1 thread, CPU time: 1.44-1.51x with F(2x2) for the 512- and 256-channel stages only, 1.87x with F(4x4) (the
    128-channel stage too) and the upsampling by `winograd.upsample_conv3x3` (load 1.1-1.2); 2 threads, wall 1.54x,
    CPU time 1.68x (load 1.6); max abs 3.3-3.8e-5 from diffusers (1.3e-5 with F(2x2) only).
    """

    def forward(self, x: Tensor) -> Tensor:
        if inference_on_cpu(x):
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv 3x3 -> GroupNorm -> SiLU -> conv 3x3, plus the input (through a 1x1 conv when
    the width changes). diffusers' ResnetBlock2D without a time embedding, dropout 0 and output scale 1."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place: the norm's output is ours to overwrite
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class Downsample(nn.Module):
    """Halve T and F: zero pad one row at the bottom and one column on the right, then a 3x3 conv with stride 2
    and no padding (diffusers' Downsample2D with padding=0, downsampling.py; specs/ldm.md §15.7). Odd sizes round
    down: (T, F) -> (T // 2, F // 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom) of the last two axes


def upsample_conv_weights(weight: Tensor) -> Tensor:
    """The 3x3 kernel of a conv that follows a nearest-neighbour x2 upsampling, as four 2x2 kernels that read the
    input before upsampling: (Cout, Cin, 3, 3) -> (4 * Cout, Cin, 2, 2), phase-major (phase = 2 * a + b).

    Output pixel (2i + a, 2j + b) of conv3x3(upsample(x)) reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are
    rows i - 1, i, i of x (a = 0) or i, i, i + 1 (a = 1): the three kernel rows fold onto two input rows, i - 1 + a
    and i + a. The same holds for the columns. FOLD[a, r, k] = 1 where kernel row k lands on input row r.
    """
    Cout, Cin, _, _ = weight.shape
    fold = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=weight.dtype, device=weight.device)
    folded = torch.einsum("ark,oikl,bsl->aboirs", fold, weight, fold)  # (2, 2, Cout, Cin, 2, 2)
    return folded.reshape(4 * Cout, Cin, 2, 2)


class Upsample(nn.Module):
    """Double T and F: nearest-neighbour x2, then a 3x3 conv (diffusers' Upsample2D with use_conv=True).

    On the CPU without gradients the two are one sub-pixel convolution: four 2x2 kernels (`upsample_conv_weights`)
    over the input padded by one, whose outputs interleave into the four phases of the result. Same sums with the
    taps that read the same input pixel added first: 16 products per input pixel and channel pair instead of 36,
    and no 4x larger upsampled copy in memory. Under the Winograd routes (256+ channels) it is F(2x2, 3x3) on the
    upsampled image instead (`winograd.upsample_conv3x3`): 9 products per input pixel and channel pair, 1.5-1.6x
    faster than the folded kernels at the decoder's (1, 512, 256, 16) and (1, 256, 512, 32).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if not inference_on_cpu(x):
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        if winograd.uses_upsample_winograd(x, self.conv.weight):
            # F(2x2, 3x3) on the upsampled image: 9 products per input pixel and channel pair (kernels/winograd.py)
            return winograd.upsample_conv3x3(x, self.conv.upsample_weight(), self.conv.bias)
        # Folded on every call (a few ms at 512 channels) rather than cached: a cache could outlive a new weight.
        return upsample_conv(x, upsample_conv_weights(self.conv.weight), self.conv.bias)


def upsample_conv(x: Tensor, folded: Tensor, bias: Tensor | None) -> Tensor:
    """conv3x3(nearest x2 upsampling of x, padding 1) as one sub-pixel convolution (`Upsample`'s docstring):
    x (B, C, H, W), folded = upsample_conv_weights(weight) (4 * K, C, 2, 2) -> (B, K, 2H, 2W), channels-last in
    memory. The UNet's upsampling convolutions take it too (musiclm_core/unet.py)."""
    B, C, H, W = x.shape  # H: time frames, W: mel bins
    K = folded.shape[0] // 4
    x = F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, folded, None if bias is None else bias.repeat(4))  # (B, 4 * K, H + 1, W + 1), phase-major
    # Output pixel (2i + a, 2j + b), channel k is y[:, (2a + b) * K + k, i + a, j + b]. Moved in rows of K
    # contiguous channels (both y and out are channels-last).
    y = y.permute(0, 2, 3, 1).reshape(B, H + 1, W + 1, 2, 2, K)  # a view of the channels-last y
    out = x.new_empty(B, H, 2, W, 2, K)  # (B, i, a, j, b, K): row 2i + a, column 2j + b
    for a in range(2):
        for b in range(2):
            out[:, :, a, :, b] = y[:, a: a + H, b: b + W, a, b]
    return out.view(B, 2 * H, 2 * W, K).permute(0, 3, 1, 2)  # (B, K, 2H, 2W), channels-last in memory


class AttentionBlock(nn.Module):
    """One-head self-attention over all T * F positions, with a GroupNorm before and the input added after
    (diffusers' Attention in UNetMidBlock2D with attention_head_dim = channels; specs/ldm.md §4.2)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape  # H: time frames, W: mel bins; H * W positions attend to each other
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C); a view when channels-last
        q, k, v = (proj(h)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C): one head
        out = self.to_out(attention(q, k, v)[:, 0])  # (B, H*W, C), scores scaled by C ** -0.5
        return x + out.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups)
        self.attn = AttentionBlock(channels, groups)
        self.res2 = ResBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Stage(nn.Module):
    """ResBlocks at one width, then an optional Downsample (encoder) or Upsample (decoder)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_blocks))
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, T, F) -> (B, 2 * latent_channels, T / factor, F / factor) moments (before quant_conv)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                  "down" if i < len(widths) - 1 else None)
            for i, width in enumerate(widths))
        self.mid = MidBlock(widths[-1], groups)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, C_0, T, F): 2-D convs with time as the height and mel bins as the width
        for stage in self.stages:
            x = stage(x)  # (B, C_i, T / 2^i, F / 2^i) after stage i's down-sampling
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, 2 * latent, t, f): mean and log-variance


class Decoder(nn.Module):
    """(B, latent_channels, t, f) -> (B, out_channels, t * factor, f * factor)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # widest first
        self.conv_in = Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid = MidBlock(widths[0], groups)
        # One more ResBlock per stage than the encoder (diffusers' Decoder: num_layers=layers_per_block + 1).
        self.stages = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                  "up" if i < len(widths) - 1 else None)
            for i, width in enumerate(widths))
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_out = Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))  # (B, C_widest, t, f)
        for stage in self.stages:
            x = stage(x)  # each stage but the last doubles t and f
        return self.conv_out(F.silu(self.norm_out(x))).contiguous()  # NCHW whatever the routes inside chose


# ---------------------------------------------------------------------------------------------------------------
# The posterior


class DiagonalGaussian:
    """The encoder's posterior q(z | mel): independent Gaussians with `mean` and `logvar`, (B, latent, t, f).

    The log-variance is clamped to [-30, 20] as in diffusers (vae.py DiagonalGaussianDistribution), so std stays
    in [exp(-15), exp(10)].
    """

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, latent, t, f) each
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise. `noise`: a standard normal tensor of the mean's shape; without it one is drawn with
        `generator` (on the generator's device, as diffusers' randn_tensor, so a seeded CPU generator gives
        diffusers' sample)."""
        if noise is None:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        elif generator is not None:
            raise ValueError("pass either noise or a generator to sample(), not both")
        elif tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise must have the posterior's shape {tuple(self.mean.shape)}, "
                             f"got {tuple(noise.shape)}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean


# ---------------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Module):
    """The mel VAE: `encode` a log-mel to its posterior, `decode` latents back to a log-mel.

    >>> vae = AutoencoderKL.from_pretrained("cvssp/audioldm2")       # a pipeline folder, its vae/, or native
    >>> posterior = vae.encode(mel)        # (B, 1, T, 64) -> DiagonalGaussian over (B, 8, T // 4, 16)
    >>> z = vae.scaling_factor * posterior.sample(generator=g)       # what a diffusion model is trained on
    >>> mel = vae.decode(z / vae.scaling_factor)                     # (B, 8, t, 16) -> (B, 1, 4 * t, 64)

    `encode` and `decode` keep autograd's graph when gradients are on (training); for inference call them under
    `torch.no_grad()` or `torch.inference_mode()`, which is also when the CPU takes its faster routes.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, mel: Tensor) -> DiagonalGaussian:
        """(B, in_channels, T, mel_bins) log-mel -> the posterior over (B, latent_channels, T', latent_bins).

        T' is T halved, rounding down, at each down-sampling: floor(floor(T / 2) / 2) for the official models, so
        a T that is not a multiple of 4 loses its last frames (as in diffusers). T needs at least
        `downsample_factor` frames."""
        mel = self._check(mel, "mel", self.config.in_channels, self.config.mel_bins, self.downsample_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(mel)))

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, t, latent_bins) latents (already divided by `scaling_factor`) ->
        (B, out_channels, t * factor, mel_bins) log-mel."""
        z = self._check(z, "latents", self.config.latent_channels, self.config.latent_bins, 1)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, mel: Tensor, noise: Tensor | None = None) -> Tensor:
        """Reconstruct: decode a sample of the posterior (its mean when `noise` is None)."""
        posterior = self.encode(mel)
        return self.decode(posterior.mode() if noise is None else posterior.sample(noise))

    def _check(self, x: Tensor, name: str, channels: int, bins: int, min_rows: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, C, T, F), got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (add the channel axis: x[:, None])" if x.dim() == 3 else ""
            raise ValueError(f"{name} must be (B, C, T, F) = (batch, {channels}, frames, {bins}), "
                             f"got shape {tuple(x.shape)}{hint}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
        B, C, T, Fb = x.shape
        if C != channels or Fb != bins:
            raise ValueError(f"{name} must be (B, {channels}, T, {bins}) for this VAE, got shape {tuple(x.shape)}")
        if B == 0:
            raise ValueError(f"{name} is an empty batch: shape {tuple(x.shape)}")
        if T < min_rows:
            raise ValueError(f"{name} has {T} frames; this VAE needs at least {max(min_rows, 1)} "
                             f"(shape {tuple(x.shape)})")
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(f"{name} holds {bad} NaN or infinite value(s)")
        weight = self.quant_conv.weight
        return x.to(device=weight.device, dtype=weight.dtype)

    # -- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "AutoencoderKL":
        """A native folder, a diffusers AutoencoderKL folder, or a diffusers pipeline folder (its `vae/`); a hub
        id is downloaded first (only the vae/ files of a pipeline repo)."""
        from musiclm_core.convert import vae as convert, keys

        # Only the VAE's files: at the top of a VAE repo (or a native one), or in a pipeline repo's vae/ folder.
        path = hub.resolve(name_or_path, revision=revision,
                           allow_patterns=["model_index.json", "config.json", "vae/config.json", "model.safetensors",
                                           "diffusion_pytorch_model*.safetensors*",
                                           "vae/diffusion_pytorch_model*.safetensors*"])
        folder = convert.vae_folder(path)
        if hub.NATIVE_FORMAT in hub.read_json(folder / "config.json"):
            config, state = hub.load_native(folder, KIND)
            config = VAEConfig.from_dict(config, source=str(folder / "config.json"))
            return keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        return convert.load_diffusers_folder(folder, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)
