"""EnCodec (Défossez et al. 2022, "High Fidelity Neural Audio Compression"): the audio codec MusicGen decodes with.

    wav (B, C, N) -> SEANet encoder (convs, down-sampling by prod(ratios) = hop) -> latents (B, D, T = ceil(N / hop))
                  -> residual vector quantiser: K codebooks, each codes what the previous ones left -> codes (B, K, T)
    codes         -> sum of the K codebook rows (B, D, T) -> SEANet decoder (mirror image) -> wav (B, C, T * hop)

Every convolution pads its input so that it keeps the time axis aligned ("same" padding, split left/right, or all
on the left when causal) and the last window is whole, which is what makes T = ceil(N / hop) exactly. The
reference models train with weight norm; it is folded into plain weights when a checkpoint is converted
(`convert/encodec.py`), so at inference a convolution is a plain `conv1d`. The 48 kHz model instead puts a
GroupNorm(1, C) after every convolution (`group_norm`).

Two extras of the 48 kHz model (`normalize`, `chunk_length_s`): the audio is cut into chunks of
`chunk_length_s` seconds placed `chunk_stride` samples apart (so consecutive chunks overlap by `overlap`), and each
chunk is divided by its RMS loudness before encoding; the RMS, one `scale` per chunk and batch row, is needed again
to decode. The chunk codes are concatenated along time: every chunk but the last gives `frames_per_chunk` frames,
so `decode` can cut them apart again, decode each chunk, multiply it by its scale, and cross-fade the chunks with
triangular weights (`overlap_add`). This follows transformers' `EncodecModel` and the original `encodec` package.
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

KIND = "encodec"  # the model name in a native checkpoint's config.json


@dataclass
class EnCodecConfig:
    sample_rate: int = 32_000
    channels: int = 1                         # audio channels C
    num_filters: int = 64                     # width of the first conv; doubles at each down-sampling stage
    ratios: tuple[int, ...] = (8, 5, 4, 4)    # decoder's up-sampling order; the encoder uses them reversed
    dimension: int = 128                      # D: latent and codebook vector size
    codebook_size: int = 2048                 # entries per codebook (a power of two)
    target_bandwidths: tuple[float, ...] = (2.2,)  # kbps; the largest one sets how many codebooks exist
    num_residual_layers: int = 1              # residual blocks per stage (dilations 1, base, base^2, ...)
    lstm_layers: int = 2                      # LSTM with a skip connection after the encoder / before the decoder
    kernel_size: int = 7                      # first conv
    last_kernel_size: int = 7                 # last conv
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2                         # residual blocks work at width / compress
    causal: bool = False                      # all padding on the left; transposed convs trim on the right
    pad_mode: str = "reflect"                 # "reflect" or "constant" (zeros)
    trim_right_ratio: float = 1.0             # causal only: share of a transposed conv's trim taken on the right
    conv_shortcut: bool = False               # residual skip through a 1x1 conv instead of the identity
    group_norm: bool = False                  # GroupNorm(1, C) after every conv (the 48 kHz model)
    normalize: bool = False                   # divide each chunk by its RMS before encoding (the 48 kHz model)
    chunk_length_s: float | None = None       # encode in chunks of this many seconds (None: the whole input)
    overlap: float | None = None              # share of a chunk that overlaps the next one

    def __post_init__(self):
        self.ratios = tuple(int(r) for r in self.ratios)
        self.target_bandwidths = tuple(float(b) for b in self.target_bandwidths)
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty list of positive integers, got {self.ratios}")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of two, got {self.codebook_size}")
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        if not self.causal and self.trim_right_ratio != 1.0:
            raise ValueError("trim_right_ratio != 1.0 only makes sense for a causal model")
        if self.causal and self.group_norm:
            raise ValueError("group_norm normalises over the whole time axis, which a causal model cannot do")
        if not self.target_bandwidths or min(self.target_bandwidths) <= 0:
            raise ValueError(f"target_bandwidths must be positive kbps values, got {self.target_bandwidths}")
        if self.num_codebooks < 1:
            raise ValueError(f"target_bandwidths {self.target_bandwidths} leave no codebook: one codebook needs "
                             f"{self.bandwidth_per_codebook} kbps at {self.frame_rate} frames/s")
        if self.chunk_length_s is not None:
            if self.overlap is None or not 0.0 <= self.overlap < 1.0:
                raise ValueError(f"chunk_length_s needs an overlap in [0, 1), got {self.overlap}")
            if self.chunk_length < 1:
                raise ValueError(f"chunk_length_s {self.chunk_length_s} is shorter than one sample")

    # Derived values are properties: the native config.json holds only the fields above.
    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        # transformers rounds up (audiocraft rounds down); the official rates are whole numbers either way.
        return math.ceil(self.sample_rate / self.hop_length)

    @property
    def bits_per_codebook(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bandwidth_per_codebook(self) -> float:
        return self.bits_per_codebook * self.frame_rate / 1000  # kbps

    @property
    def num_codebooks(self) -> int:
        """Codebooks the model holds: as many as the last (largest) target bandwidth uses."""
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.bits_per_codebook))

    @property
    def chunk_length(self) -> int | None:
        return None if self.chunk_length_s is None else int(self.chunk_length_s * self.sample_rate)

    @property
    def chunk_stride(self) -> int | None:
        if self.chunk_length_s is None:
            return None
        return max(1, int((1.0 - self.overlap) * self.chunk_length))

    @property
    def frames_per_chunk(self) -> int | None:
        return None if self.chunk_length is None else math.ceil(self.chunk_length / self.hop_length)

    def codebooks_for_bandwidth(self, bandwidth: float | None) -> int:
        """How many codebooks `bandwidth` kbps uses; None means the first target bandwidth (as in transformers)."""
        if bandwidth is None:
            bandwidth = self.target_bandwidths[0]
        if bandwidth not in self.target_bandwidths:
            raise ValueError(f"bandwidth {bandwidth} kbps is not one this model was trained for: "
                             f"choose one of {list(self.target_bandwidths)}")
        return max(1, math.floor(bandwidth * 1000 / (self.bits_per_codebook * self.frame_rate)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "EnCodecConfig":
        hub.check_config(cls, data, source=source)  # unknown fields and values of the wrong type, named
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid EnCodec config: {err}") from err


PRESETS: dict[str, EnCodecConfig] = {
    # facebook/encodec_24khz: causal, conv shortcuts, 32 codebooks of 1024 at 75 frames/s.
    "24khz": EnCodecConfig(sample_rate=24_000, num_filters=32, ratios=(8, 5, 4, 2), codebook_size=1024,
                           target_bandwidths=(1.5, 3.0, 6.0, 12.0, 24.0), causal=True, conv_shortcut=True),
    # facebook/encodec_32khz, the codec of every MusicGen: 4 codebooks of 2048 at 50 frames/s.
    "32khz": EnCodecConfig(),
    # facebook/encodec_48khz: stereo, GroupNorm, 1 s chunks overlapping by 1 %, each RMS-normalised.
    "48khz": EnCodecConfig(sample_rate=48_000, channels=2, num_filters=32, ratios=(8, 5, 4, 2), codebook_size=1024,
                           target_bandwidths=(3.0, 6.0, 12.0, 24.0), conv_shortcut=True, group_norm=True,
                           normalize=True, chunk_length_s=1.0, overlap=0.01),
    "tiny": EnCodecConfig(sample_rate=16_000, num_filters=8, ratios=(4, 2), dimension=16, codebook_size=256,
                          target_bandwidths=(16.0, 32.0), lstm_layers=1),
}


# ---------------------------------------------------------------------------------------------------------------
# Layers


def pad1d(x: Tensor, left: int, right: int, mode: str) -> Tensor:
    """F.pad on the time axis, also for reflect padding wider than the signal (G5).

    Reflection needs more samples than the pad: a signal no longer than the pad is first extended with zeros on
    the right, reflected, and the extension is cut off again (as the reference implementations do).
    """
    if mode == "constant":
        return F.pad(x, (left, right))
    N = x.shape[-1]
    extra = max(left, right) - N + 1 if N <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode="reflect")
    return x[..., : x.shape[-1] - extra] if extra else x


# CPU inference takes two faster routes to the same maths: `conv1d_by_taps` and `conv_transpose1d_by_matmul`
# (their docstrings say why; tests/unit/test_encodec.py checks them against torch's ops). With gradients on, or
# on a GPU, the layers call torch's own ops.
def inference_on_cpu(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def conv1d_by_taps(x: Tensor, weight: Tensor, bias: Tensor, dilation: int, left: int, right: int,
                   mode: str) -> Tensor:
    """F.conv1d(pad1d(x, left, right, mode), weight, bias, dilation=dilation) with stride 1, without padding x.

    The outputs whose window lies inside x (all but `left` at the start and `right` at the end) are one matrix
    product per kernel tap j over a view of x: out[:, n] += weight[:, :, j] @ x[:, n - left + j * dilation].
    The few at the ends come from a conv over a padded copy of just the end of x.
    Why: on CPU, for the SEANet's long and narrow signals (e.g. 64 channels x 320k samples), this ran 1.3-2x
    faster than torch's conv1d (oneDNN), and skips the padded copy of x (benchmarks/RESULTS.md).
    """
    B, _, N_in = x.shape
    Cout, _, K = weight.shape
    span = (K - 1) * dilation
    if N_in <= span + max(left, right):  # no interior to speak of (and the short-signal reflection, G5)
        return F.conv1d(pad1d(x, left, right, mode), weight, bias, dilation=dilation)
    M = N_in - span  # outputs left .. left + M - 1 read only samples of x
    out = bias.view(1, Cout, 1).expand(B, Cout, left + M + right).contiguous()
    for b in range(B):
        for j in range(K):
            out[b, :, left: left + M].addmm_(weight[:, :, j], x[b, :, j * dilation: j * dilation + M])
    # The ends: a padded copy of a few samples at each end is enough; one more than the window and the pad, so
    # that reflection reads the same samples as it would on the whole of x.
    if left:
        end = pad1d(x[..., : max(span, left) + 1], left, 0, mode)
        out[..., :left] = F.conv1d(end, weight, bias, dilation=dilation)[..., :left]
    if right:
        end = pad1d(x[..., N_in - max(span, right) - 1:], 0, right, mode)
        out[..., left + M:] = F.conv1d(end, weight, bias, dilation=dilation)[..., -right:]
    return out


class PaddedConv1d(nn.Conv1d):
    """Conv1d that pads its input itself so that T_out = ceil(T_in / stride), aligned with the input.

    The receptive field minus the stride is padded around the input (split with the extra sample on the left, or
    all on the left when causal), and the right end is padded up to a whole number of strides so the last input
    samples reach an output frame.
    """

    def __init__(self, config: EnCodecConfig, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        padding = (kernel_size - 1) * dilation + 1 - stride
        self.pad_right = 0 if config.causal else padding // 2
        self.pad_left = padding - self.pad_right
        self.pad_mode = config.pad_mode
        self.norm = nn.GroupNorm(1, out_channels) if config.group_norm else None

    def forward(self, x: Tensor) -> Tensor:
        stride = self.stride[0]
        left, right = self.pad_left, self.pad_right + (-x.shape[-1]) % stride
        if stride == 1 and inference_on_cpu(x):
            x = conv1d_by_taps(x, self.weight, self.bias, self.dilation[0], left, right, self.pad_mode)
        else:
            if left or right:
                x = pad1d(x, left, right, self.pad_mode)
            x = F.conv1d(x, self.weight, self.bias, stride, 0, self.dilation)
        return x if self.norm is None else self.norm(x)


def conv_transpose1d_by_matmul(x: Tensor, weight: Tensor, bias: Tensor, stride: int) -> Tensor:
    """F.conv_transpose1d(x, weight, bias, stride) for kernel_size = 2 * stride (every SEANet up-sampling layer)
    as one matrix product: (B, Cin, T) -> (B, Cout, (T + 1) * stride).

    Input frame t spreads its 2s kernel taps over output samples [t*s, t*s + 2s): the first s land in output
    block t, the last s in block t + 1. So block t = first-half taps of frame t + second-half taps of frame t - 1,
    and every tap of every frame is one product of weight, viewed as (Cin, Cout * 2s), with x.
    Why: on CPU this ran 1.5-1.8x faster than torch's conv_transpose1d, with no copy of the weight.
    """
    B, Cin, T = x.shape
    _, Cout, K = weight.shape
    s = stride
    taps = x.new_empty(B, Cout * K, T)
    for b in range(B):
        torch.mm(weight.view(Cin, Cout * K).t(), x[b], out=taps[b])
    taps = taps.view(B, Cout, 2, s, T)  # tap k of frame t at [:, :, k // s, k % s, t]
    first, second = taps[:, :, 0].transpose(2, 3), taps[:, :, 1].transpose(2, 3)  # (B, Cout, T, s)
    out = x.new_empty(B, Cout, T + 1, s)  # (block, phase): sample block * s + phase
    torch.add(first[:, :, 1:], second[:, :, :-1], out=out[:, :, 1:T])
    out[:, :, 0] = first[:, :, 0]
    out[:, :, T] = second[:, :, -1]
    out += bias[:, None, None]
    return out.view(B, Cout, (T + 1) * s)


class TrimmedConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d (kernel_size = 2 * stride) that trims kernel_size - stride samples: T_out = T_in * stride."""

    def __init__(self, config: EnCodecConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        if kernel_size != 2 * stride:
            raise ValueError(f"SEANet up-sampling uses kernel_size = 2 * stride, got {kernel_size} and {stride}")
        super().__init__(in_channels, out_channels, kernel_size, stride)
        trim = kernel_size - stride
        self.trim_right = math.ceil(trim * config.trim_right_ratio) if config.causal else trim // 2
        self.trim_left = trim - self.trim_right
        self.norm = nn.GroupNorm(1, out_channels) if config.group_norm else None

    def forward(self, x: Tensor) -> Tensor:
        if inference_on_cpu(x):
            x = conv_transpose1d_by_matmul(x, self.weight, self.bias, self.stride[0])
        else:
            x = F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        if self.norm is not None:
            x = self.norm(x)  # before the trim, as in the reference: the statistics include the trimmed samples
        return x[..., self.trim_left: x.shape[-1] - self.trim_right]


class ResidualBlock(nn.Module):
    """x + conv_1x1(ELU(conv_k(ELU(x)))), the convs at width / compress; the skip is a 1x1 conv if configured."""

    def __init__(self, config: EnCodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // config.compress
        self.conv1 = PaddedConv1d(config, dim, hidden, config.residual_kernel_size, dilation=dilation)
        self.conv2 = PaddedConv1d(config, hidden, dim, 1)
        self.shortcut = PaddedConv1d(config, dim, dim, 1) if config.conv_shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        # In place where the input is a fresh intermediate: at 64 x 320k samples every copy is 80 MB.
        y = self.conv2(F.elu(self.conv1(F.elu(x)), inplace=True))
        return y.add_(x if self.shortcut is None else self.shortcut(x))


def lstm_with_skip(lstm: nn.LSTM, x: Tensor) -> Tensor:
    """(B, C, T) -> (B, C, T): an LSTM over time plus its input (the skip is part of the model, G14)."""
    seq = x.permute(2, 0, 1)  # (T, B, C)
    return (lstm(seq)[0] + seq).permute(1, 2, 0)  # (B, C, T)


class EncoderStage(nn.Module):
    """Residual blocks at `width`, then ELU and a strided conv to 2 * width (down-sampling by `ratio`)."""

    def __init__(self, config: EnCodecConfig, width: int, ratio: int):
        super().__init__()
        self.res = nn.ModuleList(ResidualBlock(config, width, config.dilation_base ** j)
                                 for j in range(config.num_residual_layers))
        self.down = PaddedConv1d(config, width, 2 * width, 2 * ratio, stride=ratio)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.res:
            x = block(x)
        return self.down(F.elu(x, inplace=len(self.res) > 0))  # in place only on our own intermediate


class DecoderStage(nn.Module):
    """ELU, a transposed conv from `width` to width / 2 (up-sampling by `ratio`), then residual blocks."""

    def __init__(self, config: EnCodecConfig, width: int, ratio: int):
        super().__init__()
        self.up = TrimmedConvTranspose1d(config, width, width // 2, 2 * ratio, ratio)
        self.res = nn.ModuleList(ResidualBlock(config, width // 2, config.dilation_base ** j)
                                 for j in range(config.num_residual_layers))

    def forward(self, x: Tensor) -> Tensor:
        x = self.up(F.elu(x))
        for block in self.res:
            x = block(x)
        return x


class SEANetEncoder(nn.Module):
    """(B, C, N) audio -> (B, D, ceil(N / hop)) latents."""

    def __init__(self, config: EnCodecConfig):
        super().__init__()
        width = config.num_filters
        self.conv_in = PaddedConv1d(config, config.channels, width, config.kernel_size)
        self.stages = nn.ModuleList()
        for ratio in reversed(config.ratios):
            self.stages.append(EncoderStage(config, width, ratio))
            width *= 2
        self.lstm = nn.LSTM(width, width, config.lstm_layers) if config.lstm_layers else None
        self.conv_out = PaddedConv1d(config, width, config.dimension, config.last_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        if self.lstm is not None:
            x = lstm_with_skip(self.lstm, x)
        return self.conv_out(F.elu(x, inplace=True))  # x is an intermediate of this forward


class SEANetDecoder(nn.Module):
    """(B, D, T) latents -> (B, C, T * hop) audio. No activation at the end."""

    def __init__(self, config: EnCodecConfig):
        super().__init__()
        width = config.num_filters * 2 ** len(config.ratios)
        self.conv_in = PaddedConv1d(config, config.dimension, width, config.kernel_size)
        self.lstm = nn.LSTM(width, width, config.lstm_layers) if config.lstm_layers else None
        self.stages = nn.ModuleList()
        for ratio in config.ratios:
            self.stages.append(DecoderStage(config, width, ratio))
            width //= 2
        self.conv_out = PaddedConv1d(config, width, config.channels, config.last_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        if self.lstm is not None:
            x = lstm_with_skip(self.lstm, x)
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(F.elu(x, inplace=True))  # x is an intermediate of this forward


class ResidualVQ(nn.Module):
    """K codebooks; codebook k codes what codebooks 0..k-1 left of the latent (nearest entry, squared L2)."""

    def __init__(self, config: EnCodecConfig):
        super().__init__()
        self.codebooks = nn.Parameter(torch.randn(config.num_codebooks, config.codebook_size, config.dimension))

    def encode(self, latents: Tensor, num_codebooks: int) -> Tensor:
        """(B, D, T) latents -> (B, K, T) int64 codes."""
        B, D, T = latents.shape
        residual = latents.transpose(1, 2).reshape(B * T, D)  # (B*T, D)
        codes = []
        for embed in self.codebooks[:num_codebooks]:
            e = embed.t()  # (D, V)
            # The exact algebraic form and op order of the reference (G15): argmax ties and rounding then agree.
            dist = -(residual.pow(2).sum(1, keepdim=True) - 2 * residual @ e + e.pow(2).sum(0, keepdim=True))
            index = dist.max(dim=-1).indices  # (B*T,)
            residual = residual - F.embedding(index, embed)
            codes.append(index)
        return torch.stack(codes).view(num_codebooks, B, T).transpose(0, 1).contiguous()  # (B, K, T)

    def decode(self, codes: Tensor) -> Tensor:
        """(B, K, T) codes -> (B, D, T): the sum of the chosen rows, codebook 0 first."""
        out = F.embedding(codes[:, 0], self.codebooks[0])  # (B, T, D)
        for k in range(1, codes.shape[1]):
            out = out + F.embedding(codes[:, k], self.codebooks[k])
        return out.transpose(1, 2)  # (B, D, T)


def overlap_add(frames: list[Tensor], stride: int) -> Tensor:
    """Place (..., L_i) frames `stride` samples apart and cross-fade them with triangular weights.

    Each frame is weighted by a triangle peaking at its middle (the weights of the first frame's length; a
    shorter last frame uses their beginning) and the sum is divided by the summed weights, so a sample covered by
    one frame is that frame's sample and an overlap fades linearly from one frame to the next.
    """
    L = frames[0].shape[-1]
    t = torch.linspace(0, 1, L + 2, device=frames[0].device, dtype=frames[0].dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()  # (L,), > 0 everywhere
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    out = frames[0].new_zeros(*frames[0].shape[:-1], total)
    weight_sum = frames[0].new_zeros(total)
    for i, frame in enumerate(frames):
        n = frame.shape[-1]
        out[..., i * stride: i * stride + n] += weight[:n] * frame
        weight_sum[i * stride: i * stride + n] += weight[:n]
    return out / weight_sum


# ---------------------------------------------------------------------------------------------------------------
# The codec


class EnCodec(nn.Module):
    """The EnCodec codec: `encode` audio to codes, `decode` codes to audio.

    >>> codec = EnCodec.from_pretrained("facebook/encodec_32khz")
    >>> codes = codec.encode(wav)     # (B, C, N) float at codec.sample_rate -> (B, K, T) int64, T = ceil(N / hop)
    >>> audio = codec.decode(codes)   # (B, K, T) -> (B, C, T * hop)

    Models with `config.normalize` (the 48 kHz one) also need each chunk's loudness to decode:
    `codes, scales = codec.encode(wav, return_scales=True)` and `codec.decode(codes, scales)`.
    """

    def __init__(self, config: EnCodecConfig):
        super().__init__()
        self.config = config
        self.encoder = SEANetEncoder(config)
        self.quantizer = ResidualVQ(config)
        self.decoder = SEANetDecoder(config)

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> int:
        return self.config.frame_rate

    @property
    def num_codebooks(self) -> int:
        """Codebooks the model holds (`encode` uses fewer at a lower bandwidth)."""
        return self.config.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # -- encode / decode --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, wav: Tensor, bandwidth: float | None = None, *, sample_rate: int | None = None,
               strict: bool = False, return_scales: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """(B, C, N) float audio -> (B, K, T) int64 codes.

        bandwidth: one of `config.target_bandwidths` (kbps); it sets K. None: the first one, as transformers does.
        sample_rate: the rate of `wav`. If it differs from the model's, `wav` is resampled (`audio.resample`),
            or, with `strict=True`, refused.
        return_scales: also return the per-chunk RMS scales, (B, num_chunks) float, that `decode` needs for a
            model with `config.normalize` (None for the others).

        T = ceil(N / hop). A chunked model (`config.chunk_length_s`) returns its chunks' codes one after the other
        on the time axis: T = sum over the chunks of ceil(chunk samples / hop).
        """
        wav = self._check_audio(wav, sample_rate, strict)
        num_codebooks = self.config.codebooks_for_bandwidth(bandwidth)
        B, C, N = wav.shape
        length, stride = self.config.chunk_length, self.config.chunk_stride
        chunks = [wav] if length is None else [wav[..., i: i + length] for i in range(0, N, stride)]
        codes, scales = [], []
        for chunk in chunks:
            if self.config.normalize:
                mono = chunk.sum(1, keepdim=True) / C  # (B, 1, n)
                scale = mono.pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8  # (B, 1, 1)
                chunk = chunk / scale
                scales.append(scale.view(B, 1))
            codes.append(self.quantizer.encode(self.encoder(chunk), num_codebooks))
        codes = torch.cat(codes, dim=-1)  # (B, K, T)
        if not return_scales:
            return codes
        return codes, (torch.cat(scales, dim=1) if scales else None)

    @torch.no_grad()
    def decode(self, codes: Tensor, scales: Tensor | None = None) -> Tensor:
        """(B, K, T) int64 codes, K <= num_codebooks -> (B, C, N) audio.

        N = T * hop, or for a chunked model the chunks cross-faded `chunk_stride` apart. `scales` ((B, num_chunks)
        from `encode(..., return_scales=True)`) is required by a model with `config.normalize` and refused by the
        others; for codes that never had scales (e.g. generated ones) pass `torch.ones(B, num_chunks)`.
        """
        codes = self._check_codes(codes)
        B, K, T = codes.shape
        pieces = [codes] if self.config.chunk_length is None else list(codes.split(self.config.frames_per_chunk, -1))
        scales = self._check_scales(scales, B, len(pieces))
        frames = []
        for i, piece in enumerate(pieces):
            wav = self.decoder(self.quantizer.decode(piece))  # (B, C, t * hop)
            frames.append(wav if scales is None else wav * scales[:, i].view(B, 1, 1))
        if self.config.chunk_length is None:
            return frames[0]
        return overlap_add(frames, self.config.chunk_stride)

    # -- input checks -----------------------------------------------------------------------------------------

    def _check_audio(self, wav: Tensor, sample_rate: int | None, strict: bool) -> Tensor:
        if isinstance(wav, np.ndarray):
            wav = torch.from_numpy(wav)
        if not isinstance(wav, Tensor):
            raise TypeError(f"wav must be a torch.Tensor (B, C, N), got {type(wav).__name__}")
        if wav.dim() != 3:
            hint = " (add the batch axis: wav[None])" if wav.dim() == 2 else ""
            raise ValueError(f"wav must be (B, C, N) = (batch, channels, samples), got shape {tuple(wav.shape)}{hint}")
        if not wav.is_floating_point():
            raise ValueError(f"wav must be floating point audio in [-1, 1], got dtype {wav.dtype}")
        B, C, N = wav.shape
        if C != self.config.channels:
            raise ValueError(f"this EnCodec takes {self.config.channels}-channel audio, got {C} channels "
                             f"(wav shape {tuple(wav.shape)})")
        if B == 0 or N == 0:
            raise ValueError(f"wav is empty: shape {tuple(wav.shape)}")
        bad = (~torch.isfinite(wav)).sum().item()
        if bad:
            raise ValueError(f"wav holds {bad} NaN or infinite sample(s)")
        if sample_rate is not None and sample_rate != self.config.sample_rate:
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
                raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
            if strict:
                raise ValueError(f"wav is at {sample_rate} Hz but this EnCodec runs at {self.config.sample_rate} Hz "
                                 f"(strict=True: resample it first, or pass strict=False to resample here)")
            from musiclm_core.audio import resample

            wav = resample(wav, sample_rate, self.config.sample_rate)
        weight = self.encoder.conv_in.weight
        return wav.to(device=weight.device, dtype=weight.dtype)

    def _check_codes(self, codes: Tensor) -> Tensor:
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, Tensor):
            raise TypeError(f"codes must be a torch.Tensor (B, K, T), got {type(codes).__name__}")
        if codes.dim() != 3:
            raise ValueError(f"codes must be (B, K, T) = (batch, codebooks, frames), got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        B, K, T = codes.shape
        if B == 0 or T == 0:
            raise ValueError(f"codes are empty: shape {tuple(codes.shape)}")
        if not 1 <= K <= self.num_codebooks:
            raise ValueError(f"codes have {K} codebooks; this EnCodec has {self.num_codebooks} "
                             f"(shape {tuple(codes.shape)}, expected (B, K<={self.num_codebooks}, T))")
        low, high = codes.min().item(), codes.max().item()
        if low < 0 or high >= self.codebook_size:
            value = low if low < 0 else high
            where = tuple((codes == value).nonzero()[0].tolist())
            raise ValueError(f"code {value} at (b, k, t) = {where} is out of range [0, {self.codebook_size})")
        return codes.to(device=self.quantizer.codebooks.device, dtype=torch.long)

    def _check_scales(self, scales: Tensor | None, B: int, num_chunks: int) -> Tensor | None:
        if not self.config.normalize:
            if scales is not None:
                raise ValueError("this EnCodec does not normalise its input: decode takes no scales")
            return None
        if scales is None:
            raise ValueError(f"this EnCodec normalises each chunk's loudness: decode needs the scales, shape "
                             f"(B, chunks) = ({B}, {num_chunks}), that encode(..., return_scales=True) returns "
                             f"(for generated codes, torch.ones({B}, {num_chunks}))")
        scales = torch.as_tensor(scales)
        if tuple(scales.shape) != (B, num_chunks):
            raise ValueError(f"scales must be (B, chunks) = ({B}, {num_chunks}) for these codes, "
                             f"got shape {tuple(scales.shape)}")
        weight = self.decoder.conv_in.weight
        return scales.to(device=weight.device, dtype=weight.dtype)

    # -- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "EnCodec":
        """A native folder, a transformers folder (`facebook/encodec_*`, or the `audio_encoder` of a MusicGen
        folder) or an audiocraft folder (`compression_state_dict.bin`); a hub id is downloaded first."""
        from musiclm_core.convert import encodec as convert, keys

        # Only what some layout needs: weights in safetensors, or audiocraft's codec package.
        folder = hub.resolve(name_or_path, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", "compression_state_dict.bin"])
        layout = hub.detect_layout(folder)
        if layout == "native":
            config, state = hub.load_native(folder, KIND)
            config = EnCodecConfig.from_dict(config, source=str(folder / "config.json"))
            return keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        if layout == "transformers":
            return convert.load_transformers_folder(folder, dtype=dtype)
        if layout == "audiocraft":
            return convert.load_audiocraft_folder(folder, dtype=dtype)
        raise hub.CheckpointError(f"{folder} is a {layout} folder, which holds no EnCodec")

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)
