"""HiFi-GAN V1 generator (Kong et al. 2020), the vocoder of AudioLDM 2 and MusicLDM: log-mel -> 16 kHz waveform.

    mel (B, T, 64) -> conv_pre (64 -> 1024, k 7) -> 5 stages -> leaky ReLU -> conv_post (32 -> 1, k 7) -> tanh
                   -> wav (B, N), N = 160 T + 32 for the official config
    stage i: leaky ReLU -> transposed conv (C -> C / 2, stride u_i, kernel k_i, padding (k_i - u_i) // 2)
             -> multi-receptive-field fusion: the mean of 3 residual blocks (kernels 3, 7, 11) over the same input
    residual block (kernel k, dilations 1, 3, 5): three times x = x + conv_k(lrelu(conv_k,d(lrelu(x))))

The layout and the key names are those of transformers' `SpeechT5HifiGan` (models/speecht5/modeling_speecht5.py,
`HifiGanResidualBlock` L2887, `SpeechT5HifiGan` L2954), which the diffusers pipelines ship in their `vocoder/`
folder; the original generator is `models.py` of jik876/hifi-gan. Weight norm, used in training, is folded into
plain weights when a checkpoint is converted (`convert/hifigan.py`). Every convolution pads with zeros so that a
residual block keeps the length: "same" padding (k - 1) * d / 2, which needs odd kernels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.kernels.conv1d import conv1d

KIND = "hifigan"  # the model name in a native checkpoint's config.json

# The leaky ReLU before conv_post uses torch's default slope 0.01, not the config's 0.1 used everywhere else:
# transformers' SpeechT5HifiGan.forward calls `leaky_relu(hidden_states)` without a slope there (L3058), as does
# the original jik876/hifi-gan (`F.leaky_relu(x)` before conv_post). Kept for parity with the trained weights.
FINAL_SLOPE = 0.01


@dataclass
class HifiGanConfig:
    mel_bins: int = 64                                   # F: input channels (transformers: model_in_dim)
    sample_rate: int = 16_000
    initial_channels: int = 1024                         # width after conv_pre; halves at every stage
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)    # strides of the transposed convs; product = hop
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)  # one residual block per kernel size in every stage
    resblock_dilations: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    normalize_before: bool = False                       # (mel - mean) / scale first, with the stored buffers

    def __post_init__(self):
        self.upsample_rates = tuple(int(r) for r in self.upsample_rates)
        self.upsample_kernel_sizes = tuple(int(k) for k in self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(int(k) for k in self.resblock_kernel_sizes)
        self.resblock_dilations = tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilations)
        if not self.upsample_rates or len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError(f"upsample_rates {self.upsample_rates} and upsample_kernel_sizes "
                             f"{self.upsample_kernel_sizes} must be non-empty and of the same length")
        if any(k < u or u < 1 for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            raise ValueError(f"every transposed conv needs kernel >= stride >= 1, got kernels "
                             f"{self.upsample_kernel_sizes} for strides {self.upsample_rates}")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(self.resblock_dilations):
            raise ValueError(f"resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilations "
                             f"{self.resblock_dilations} must be non-empty and of the same length")
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise ValueError(f"residual blocks need odd kernel sizes to keep the length, got "
                             f"{self.resblock_kernel_sizes}")
        if any(not ds or min(ds) < 1 for ds in self.resblock_dilations):
            raise ValueError(f"resblock_dilations must be non-empty lists of positive integers, got "
                             f"{self.resblock_dilations}")
        if self.initial_channels % 2 ** len(self.upsample_rates):
            raise ValueError(f"initial_channels {self.initial_channels} must be divisible by "
                             f"2 ** {len(self.upsample_rates)} (the width halves at every stage)")

    @property
    def hop_length(self) -> int:
        """Output samples per mel frame (away from the ends)."""
        return math.prod(self.upsample_rates)

    def output_length(self, frames: int) -> int:
        """Samples out for `frames` mel frames: each transposed conv maps L to (L - 1) * u - 2 * pad + k.
        160 * frames + 32 for the official config."""
        n = frames
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            n = (n - 1) * u - 2 * ((k - u) // 2) + k
        return n

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "HifiGanConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown HifiGanConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid HiFi-GAN config: {err}") from err


PRESETS: dict[str, HifiGanConfig] = {
    # The `vocoder/config.json` of ucsd-reach/musicldm and of cvssp/audioldm2 (-large, -music): the same file.
    "musicldm": HifiGanConfig(),
    "audioldm2": HifiGanConfig(),
    "tiny": HifiGanConfig(mel_bins=16, initial_channels=32, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4),
                          resblock_kernel_sizes=(3, 5), resblock_dilations=((1, 3), (1, 2))),
}


# ---------------------------------------------------------------------------------------------------------------
# Layers


# Speed (CPU): ~90 % of the time goes into the residual blocks' convolutions, which torch runs through oneDNN near
# the CPU's fp32 peak. `kernels.conv1d.conv1d` sends those with kernels 7 and 11 at 128 channels and more (the first
# three stages) to an FFT overlap-save route, which does 3-4.5x fewer multiplications; the rest stay with torch.
# Routes tried and dropped (single thread, 2026-12-03, AMD EPYC, a loaded machine): oneDNN convs with the leaky
# ReLU and the residual add fused in (torch.ops.mkldnn._convolution_pointwise) 0.91-1.01x; the transposed convs as
# one matrix product plus an overlap-add 0.72-1.21x; one GEMM per kernel tap, or one im2col GEMM, 0.2-0.7x; 2-D
# channels-last convs 0.85-1.04x; on 2026-12-04 the transposed convs as polyphase convs (0.98-1.4x per layer, ~1 % of
# the vocoder), 1-D Winograd for the kernel-3 convs, and real-arithmetic products for the FFT route (figures in
# kernels/conv1d.py's docstring); the whole vocoder kept time-major (channels-last) from conv_pre to conv_post, its
# convolutions and transposed convolutions on oneDNN's NHWC kernels as (B, C, 1, L) views, with no conversion
# between layers (sixth session): 0.94x on one thread, 1.01x on two, paired; the NHWC convolutions gained where the
# plain ones faulted in fresh reorder buffers and lost at dilations 3 and 5, and the FFT route's copies, transposing
# then, took 3x as long. Each convolution takes its leaky ReLUs and residual add as arguments of
# `conv1d`, which the FFT route folds into the copies it makes anyway (on torch's route: one pass each).


class ResBlock1(nn.Module):
    """HiFi-GAN's ResBlock1: for each dilation d, x = x + conv2(lrelu(conv1_d(lrelu(x)))); length kept."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=(kernel_size - 1) * d // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            h = conv1d(x, conv1.weight, conv1.bias, conv1.dilation[0], slope_in=self.slope, slope_out=self.slope)
            x = conv1d(h, conv2.weight, conv2.bias, residual=x)  # a new tensor: the caller's x is shared
        return x


class HifiGan(nn.Module):
    """The HiFi-GAN generator: log-mel frames -> waveform.

    >>> vocoder = HifiGan.from_pretrained("ucsd-reach/musicldm")      # picks the pipeline's vocoder/ folder
    >>> wav = vocoder(mel)        # (B, T, 64) -> (B, 160 T + 32); an unbatched (T, 64) mel gives (160 T + 32,)

    The mel is natural-log magnitude on the slaney scale, as `musiclm_core.mel.log_mel` makes it (the diffusers
    pipelines take it from the VAE decoder, whose (B, 1, T, 64) output squeezed to (B, T, 64) is this input).
    """

    def __init__(self, config: HifiGanConfig):
        super().__init__()
        self.config = config
        c = config
        self.conv_pre = nn.Conv1d(c.mel_bins, c.initial_channels, 7, padding=3)
        self.upsampler = nn.ModuleList()
        self.resblocks = nn.ModuleList()  # flat, stage after stage, as in the checkpoint: resblocks[i * R + j]
        width = c.initial_channels
        for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
            self.upsampler.append(nn.ConvTranspose1d(width, width // 2, k, stride=u, padding=(k - u) // 2))
            width //= 2
            for kernel, dilations in zip(c.resblock_kernel_sizes, c.resblock_dilations):
                self.resblocks.append(ResBlock1(width, kernel, dilations, c.leaky_relu_slope))
        self.conv_post = nn.Conv1d(width, 1, 7, padding=3)
        # Input statistics, used only with config.normalize_before (the AudioLDM/MusicLDM vocoders store 0 and 1).
        self.register_buffer("mean", torch.zeros(c.mel_bins))
        self.register_buffer("scale", torch.ones(c.mel_bins))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def forward(self, mel: Tensor) -> Tensor:
        """(B, T, mel_bins) or (T, mel_bins) log-mel -> (B, N) or (N,) waveform in [-1, 1], N = output_length(T)."""
        mel, batched = self._check_mel(mel)
        B, T, F_ = mel.shape
        c = self.config
        if c.normalize_before:
            mel = (mel - self.mean) / self.scale
        x = self.conv_pre(mel.transpose(1, 2))  # (B, C, T)
        R = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, c.leaky_relu_slope))  # (B, C / 2, L')
            # Multi-receptive-field fusion: the mean of the stage's R residual blocks, all fed the same x.
            fused = self.resblocks[i * R](x)
            for j in range(1, R):
                fused += self.resblocks[i * R + j](x)
            x = fused.div_(R)
        x = self.conv_post(F.leaky_relu(x, FINAL_SLOPE))  # (B, 1, N)
        wav = torch.tanh(x)[:, 0]  # (B, N)
        return wav if batched else wav[0]

    def _check_mel(self, mel: Tensor) -> tuple[Tensor, bool]:
        if isinstance(mel, np.ndarray):
            mel = torch.from_numpy(mel)
        if not isinstance(mel, Tensor):
            raise TypeError(f"mel must be a torch.Tensor (B, T, {self.config.mel_bins}), got {type(mel).__name__}")
        if mel.dim() not in (2, 3):
            hint = ""
            if mel.dim() == 4 and mel.shape[1] == 1:
                hint = " (a VAE output (B, 1, T, F): pass mel[:, 0])"
            raise ValueError(f"mel must be (B, T, F) or (T, F) with F = {self.config.mel_bins} mel bins, "
                             f"got shape {tuple(mel.shape)}{hint}")
        if not mel.is_floating_point():
            raise ValueError(f"mel must be a floating-point log-mel, got dtype {mel.dtype}")
        if mel.shape[-1] != self.config.mel_bins:
            raise ValueError(f"mel has {mel.shape[-1]} bins on its last axis; this vocoder takes "
                             f"{self.config.mel_bins} (shape {tuple(mel.shape)}, expected (B, T, "
                             f"{self.config.mel_bins}))")
        if mel.numel() == 0:
            raise ValueError(f"mel is empty: shape {tuple(mel.shape)}")
        bad = (~torch.isfinite(mel)).sum().item()
        if bad:
            raise ValueError(f"mel holds {bad} NaN or infinite value(s)")
        weight = self.conv_pre.weight
        mel = mel.to(device=weight.device, dtype=weight.dtype)
        return (mel, True) if mel.dim() == 3 else (mel[None], False)

    # -- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "HifiGan":
        """A native folder, a transformers `SpeechT5HifiGan` folder, or a diffusers pipeline folder (its
        `vocoder/` part: ucsd-reach/musicldm, cvssp/audioldm2*); a hub id is downloaded first."""
        from musiclm_core.convert import hifigan as convert, keys

        folder = _resolve(name_or_path, revision)
        layout = hub.detect_layout(folder)
        if layout == "diffusers":
            sub = folder / "vocoder"
            if not sub.is_dir():
                raise hub.CheckpointError(f"{folder} is a diffusers pipeline folder without a vocoder/ folder")
            folder, layout = sub, hub.detect_layout(sub)
        if layout == "native":
            config, state = hub.load_native(folder, KIND)
            config = HifiGanConfig.from_dict(config, source=str(folder / "config.json"))
            return keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        if layout == "transformers":
            return convert.load_transformers_folder(folder, dtype=dtype)
        raise hub.CheckpointError(f"{folder} is a {layout} folder, which holds no HiFi-GAN vocoder")

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)


# What a hub download fetches: the vocoder's own files, at the top of a vocoder repo or in the vocoder/ folder of
# a pipeline repo, never the other components. Explicit names: huggingface_hub's patterns are fnmatch patterns,
# in which "*.safetensors" would also match unet/diffusion_pytorch_model.safetensors.
_CONFIGS = ["config.json", "model_index.json", "vocoder/config.json"]
_SAFETENSORS = ["model.safetensors", "vocoder/model.safetensors"]
_PICKLES = ["pytorch_model.bin", "vocoder/pytorch_model.bin"]


def _resolve(name_or_path: str | os.PathLike, revision: str | None):
    """A local folder as it is; a hub id downloaded, safetensors only unless the repo has none (older repos such
    as sanchit-gandhi/musicldm-full ship only pytorch_model.bin)."""
    folder = hub.resolve(name_or_path, revision=revision, allow_patterns=_CONFIGS + _SAFETENSORS)
    if os.path.isdir(name_or_path):
        return folder
    weights = [folder / name for name in _SAFETENSORS + _PICKLES]
    if not any(path.is_file() for path in weights):
        folder = hub.resolve(name_or_path, revision=revision, allow_patterns=_CONFIGS + _PICKLES)
    return folder
