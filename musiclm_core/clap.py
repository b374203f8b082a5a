"""CLAP (Wu et al. 2023, "Large-scale Contrastive Language-Audio Pretraining"): a text tower and an audio tower
that map a caption and a clip to unit vectors whose dot product says how well they match.

    texts -> byte-level BPE (RoBERTa's) -> ids (B, L) -> RoBERTa encoder -> tanh(dense(h[:, 0])) -> MLP -> L2 norm
    wav   -> 48 kHz -> crop / repeat-pad to 10 s -> log-mel (B, 1, 1001, 64) -> BatchNorm over the mel bins
          -> bicubic 1001 -> 1024 frames -> fold into a 256 x 256 image -> HTS-AT (Swin) -> mean of the last
          8 x 8 tokens -> MLP -> L2 norm
    score = text_embeds @ audio_embedsᵀ (cosine); logits_per_text = score * exp(logit_scale_text)

This follows transformers' `ClapModel` and `ClapFeatureExtractor` (models/clap/), which is what the MusicLDM and
AudioLDM 2 pipelines call: their `text_encoder` is a ClapModel whose text tower conditions the UNet, and whose
two towers rank the generated waveforms. Checkpoints: laion/clap-htsat-unfused (HTS-AT "tiny": 96 channels,
depths 2-2-6-2) and laion/larger_clap_music (HTS-AT "base": 128 channels, depths 2-2-12-2, the same shape as the
pipelines' text_encoder). Converted from transformers' layout by `convert/clap.py`.

The HTS-AT audio tower is a Swin transformer on the folded spectrogram: patch embedding (4x4 conv), four stages
of window attention (8x8 windows with a learned relative position bias; every second block shifts the windows
by 4 with a mask that keeps the wrapped-around regions apart), patch merging (2x2 -> 1, channels doubled)
between stages. "Feature fusion" (the fused checkpoints' extra local-crop branch) is not implemented: no
official unfused checkpoint uses it, and loading one that does is a clear error.

The tokenizer runs on the `tokenizers` library (a run-time dependency, imported by `CLAPTokenizer`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.audio import _as_float_tensor, _check_sample_rate, load_audio, resample

KIND = "clap"  # the model name in a native checkpoint's config.json
TOKENIZER_FILE = "tokenizer.json"
PADDINGS = ("repeatpad", "repeat", "pad")
ACTIVATIONS = ("relu", "gelu")


@dataclass
class CLAPConfig:
    # Text tower: RoBERTa.
    vocab_size: int = 50265
    text_dim: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn_dim: int = 3072
    max_positions: int = 514                  # position table rows: pad_token_id + 1 + the longest input (512)
    type_vocab_size: int = 1
    pad_token_id: int = 1                     # RoBERTa numbers positions from pad_token_id + 1; pads get it
    text_norm_eps: float = 1e-12              # transformers' default; LAION's original roberta-base used 1e-5
    max_text_length: int = 512                # the tokenizer's model_max_length
    # Audio tower: HTS-AT.
    num_mel_bins: int = 64                    # F
    spec_size: int = 256                      # side of the square image the spectrogram is folded into
    patch_size: int = 4
    patch_stride: int = 4
    patch_dim: int = 96                       # channels of the first stage; doubled by every patch merging
    depths: tuple[int, ...] = (2, 2, 6, 2)    # Swin blocks per stage
    audio_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = True                   # LayerNorm after the patch embedding
    audio_norm_eps: float = 1e-5
    audio_dim: int = 768                      # channels of the last stage = patch_dim * 2 ** (stages - 1)
    # Both towers.
    projection_dim: int = 512
    projection_act: str = "relu"
    logit_scale_init: float = 1 / 0.07        # the initial value of both logit scales (training from scratch)
    # The feature extractor (preprocessor_config.json).
    sample_rate: int = 48_000
    n_fft: int = 1024
    hop_length: int = 480
    f_min: float = 50.0
    f_max: float = 14_000.0
    max_length_s: int = 10
    padding: str = "repeatpad"                # how clips shorter than max_length_s are filled (PADDINGS)

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.audio_heads = tuple(int(h) for h in self.audio_heads)
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} is not divisible by text_heads {self.text_heads}")
        if len(self.depths) != len(self.audio_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and audio_heads {self.audio_heads} need one entry per stage")
        if self.patch_dim * 2 ** (len(self.depths) - 1) != self.audio_dim:
            raise ValueError(f"audio_dim {self.audio_dim} must be patch_dim {self.patch_dim} * 2 ** "
                             f"(stages - 1) = {self.patch_dim * 2 ** (len(self.depths) - 1)}")
        for i, heads in enumerate(self.audio_heads):
            if (self.patch_dim * 2 ** i) % heads:
                raise ValueError(f"stage {i}: {self.patch_dim * 2 ** i} channels are not divisible by {heads} heads")
        if self.spec_size % self.num_mel_bins or self.spec_size < self.num_mel_bins:
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of num_mel_bins {self.num_mel_bins}")
        if self.spec_size % self.patch_stride or self.patch_size < self.patch_stride:
            raise ValueError(f"spec_size {self.spec_size} must be a multiple of patch_stride {self.patch_stride}, "
                             f"and patch_size {self.patch_size} at least patch_stride")
        for i, res in enumerate(self.resolutions):
            # transformers' ClapAudioLayer shrinks the window to a smaller grid, but its relative position
            # table keeps the configured size and the forward then fails; so do we, here, with a clear error.
            if res < self.window_size or res % self.window_size or (i < len(self.depths) - 1 and res % 2):
                raise ValueError(f"stage {i} works on a {res}x{res} grid: it must be a multiple of window_size "
                                 f"{self.window_size} (and even, for the patch merging that follows)")
        if self.projection_act not in ACTIVATIONS:
            raise ValueError(f"projection_act must be one of {ACTIVATIONS}, got {self.projection_act!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.max_positions < self.max_text_length + self.pad_token_id + 1:
            raise ValueError(f"max_positions {self.max_positions} is too small for max_text_length "
                             f"{self.max_text_length} (positions start at pad_token_id + 1)")

    @property
    def resolutions(self) -> list[int]:
        """The side of each stage's token grid (64, 32, 16, 8 for the official models)."""
        grid = self.spec_size // self.patch_stride
        return [grid // 2 ** i for i in range(len(self.depths))]

    @property
    def freq_ratio(self) -> int:
        """How many time chunks the spectrogram is cut into and stacked along frequency (4)."""
        return self.spec_size // self.num_mel_bins

    @property
    def max_samples(self) -> int:
        return self.max_length_s * self.sample_rate

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "CLAPConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown CLAPConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid CLAP config: {err}") from err


PRESETS: dict[str, CLAPConfig] = {
    # laion/clap-htsat-unfused: roberta-base text tower, HTS-AT tiny (96 channels, depths 2-2-6-2).
    "htsat-unfused": CLAPConfig(),
    # laion/larger_clap_music: the same text tower, HTS-AT base (128 channels, depths 2-2-12-2, 1024 at the end),
    # as its model card says; its config.json could not be read here (offline), `from_pretrained` reads it anyway.
    # The text_encoder of ucsd-reach/musicldm and cvssp/audioldm2* has this shape too (specs/ldm.md §6.1).
    "larger-music": CLAPConfig(patch_dim=128, depths=(2, 2, 12, 2), audio_dim=1024),
    # For tests: the official geometry (64 mel bins, 256x256 image, 8x8 windows, four stages) at small widths.
    "tiny": CLAPConfig(vocab_size=300, text_dim=32, text_layers=2, text_heads=4, text_ffn_dim=64,
                       patch_dim=8, depths=(2, 2, 1, 2),
                       audio_heads=(2, 2, 4, 4), audio_dim=64, projection_dim=16),
}


def _activation(name: str):
    return F.relu if name == "relu" else F.gelu


class Projection(nn.Module):
    """Linear -> ReLU -> Linear into the shared embedding space (transformers' ClapProjectionLayer)."""

    def __init__(self, dim: int, projection_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, projection_dim)
        self.fc2 = nn.Linear(projection_dim, projection_dim)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------------
# Text tower: RoBERTa (post-LayerNorm BERT layers)


class TextLayer(nn.Module):
    def __init__(self, config: CLAPConfig):
        super().__init__()
        D = config.text_dim
        self.heads = config.text_heads
        self.qkv = nn.Linear(D, 3 * D)  # query, key and value rows one after the other (convert: concat_rows)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=config.text_norm_eps)
        self.ffn_up = nn.Linear(D, config.text_ffn_dim)
        self.ffn_down = nn.Linear(config.text_ffn_dim, D)
        self.ffn_norm = nn.LayerNorm(D, eps=config.text_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, d)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, L, d)
        a = a.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        x = self.attn_norm(x + self.attn_out(a))  # post-LN: the residual sum is normalised
        return self.ffn_norm(x + self.ffn_down(F.gelu(self.ffn_up(x))))  # exact (erf) GELU


class TextEncoder(nn.Module):
    def __init__(self, config: CLAPConfig):
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.tok_embed = nn.Embedding(config.vocab_size, config.text_dim)
        self.pos_embed = nn.Embedding(config.max_positions, config.text_dim)
        self.type_embed = nn.Embedding(config.type_vocab_size, config.text_dim)
        self.embed_norm = nn.LayerNorm(config.text_dim, eps=config.text_norm_eps)
        self.layers = nn.ModuleList(TextLayer(config) for _ in range(config.text_layers))
        self.pooler = nn.Linear(config.text_dim, config.text_dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids (B, L), mask (B, L) -> pooled (B, D): tanh(dense(h[:, 0])), the <s> token's state."""
        # fairseq's numbering, kept by transformers (ClapTextEmbeddings.create_position_ids_from_input_ids):
        # counted over the tokens that are not <pad>, from pad_token_id + 1; every <pad> gets pad_token_id.
        # It looks at the ids, not at the attention mask.
        not_pad = input_ids.ne(self.pad_token_id).long()  # (B, L)
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id  # (B, L)
        # Token types: transformers gathers them from an all-zero buffer, so every token gets row 0.
        x = self.tok_embed(input_ids) + self.type_embed.weight[0] + self.pos_embed(positions)  # (B, L, D)
        x = self.embed_norm(x)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): True = attend
        for layer in self.layers:
            x = layer(x, key_mask)
        return torch.tanh(self.pooler(x[:, 0]))


# ---------------------------------------------------------------------------------------------------------------
# Audio tower: HTS-AT


def relative_position_index(window: int) -> Tensor:
    """(N, N) int64, N = window²: the row of the (2w-1)² bias table for each (query, key) pair of a window.

    Row (dy + w - 1) * (2w - 1) + (dx + w - 1) for the offset (dy, dx) = query - key, positions in row-major
    order within the window (Swin's index, the `relative_position_index` buffer of the checkpoints).
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N): offsets made non-negative
    return delta[0] * (2 * window - 1) + delta[1]


def shifted_window_mask(size: int, window: int, shift: int) -> Tensor:
    """(nW, N, N) float: 0 between tokens of the same region of the rolled grid, -100 between regions.

    Rolling the grid by -shift brings tokens from the far edge next to the near one; in each axis the rolled
    grid has three regions, [0, size - window), [size - window, size - shift), [size - shift, size), and a
    window may only attend within the region (of the 3 x 3) its query lies in. -100 rather than -inf, as Swin.
    """
    idx = torch.arange(size)
    region = (idx >= size - window).long() + (idx >= size - shift).long()  # (size,) in {0, 1, 2}
    grid = region[:, None] * 3 + region[None, :]  # (size, size)
    n = size // window
    windows = grid.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, window * window)  # (nW, N)
    same = windows[:, :, None] == windows[:, None, :]  # (nW, N, N)
    return torch.zeros(same.shape).masked_fill(~same, -100.0)


def window_order(size: int, window: int, shift: int) -> Tensor:
    """(size²,) int64: the row-major token index that lands at each place of the windowed sequence.

    The windowed sequence lists the grid rolled by -shift in both axes (rolled[i, j] = grid[(i + shift) % size,
    (j + shift) % size]) window by window (row-major), each window's tokens row-major: one `index_select`
    does Swin's roll and window partition at once, and the inverse permutation undoes both.
    """
    idx = torch.roll(torch.arange(size * size).view(size, size), shifts=(-shift, -shift), dims=(0, 1))
    n = size // window
    return idx.view(n, window, n, window).permute(0, 2, 1, 3).reshape(-1)  # (window row, window col, y, x)


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention with relative position bias -> residual; LayerNorm -> MLP ->
    residual. transformers' ClapAudioLayer."""

    def __init__(self, config: CLAPConfig, dim: int, heads: int, resolution: int, shift: int):
        super().__init__()
        self.heads, self.resolution, self.window = heads, resolution, config.window_size
        # A grid no larger than one window is not shifted (ClapAudioLayer.set_shift_and_window_size).
        self.shift = 0 if resolution <= self.window else shift
        self.attn_norm = nn.LayerNorm(dim, eps=config.audio_norm_eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.rel_bias = nn.Parameter(torch.zeros((2 * self.window - 1) ** 2, heads))  # (table rows, H)
        self.attn_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim, eps=config.audio_norm_eps)
        self.mlp_up = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.mlp_down = nn.Linear(int(config.mlp_ratio * dim), dim)
        self.register_buffer("rel_index", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("shift_mask", torch.empty(0), persistent=False)
        self.register_buffer("order", torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("inverse", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.rel_index = relative_position_index(self.window)
        self.shift_mask = (shifted_window_mask(self.resolution, self.window, self.shift) if self.shift
                           else torch.zeros(0))
        self.order = window_order(self.resolution, self.window, self.shift)
        self.inverse = torch.argsort(self.order)

    def attention_bias(self, dtype: torch.dtype) -> Tensor:
        """(nW * H, N, N) when shifted: the relative position bias of each head plus the shift mask of each
        window; (H, N, N) when not, the same for every window."""
        N = self.window ** 2
        bias = self.rel_bias[self.rel_index.view(-1)].view(N, N, self.heads).permute(2, 0, 1)  # (H, N, N)
        if self.shift:
            bias = (bias[None] + self.shift_mask[:, None].to(bias.dtype)).reshape(-1, N, N)  # (nW * H, N, N)
        return bias.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape  # T = resolution² tokens, row-major
        H, N = self.heads, self.window ** 2
        nW, d = T // N, C // H
        h = self.attn_norm(x).index_select(1, self.order)  # (B, nW * N, C): rolled, window by window
        qkv = self.qkv(h).view(B, nW, N, 3, H, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, H, N, d)
        bias = self.attention_bias(x.dtype)  # (nW * H or H, N, N)
        # (B, nW * H, N, d) when shifted (a bias per window and head), (B * nW, H, N, d) when not.
        q, k, v = qkv.reshape(3, -1, bias.shape[0], N, d)
        # Written out rather than SDPA: with a float mask SDPA's CPU path spends ~8 % of the tower checking
        # for fully masked rows, which a -100 mask never makes. Scores in the order of ClapAudioSelfAttention.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias  # (.., N, N)
        a = torch.matmul(scores.softmax(dim=-1), v)  # (.., N, d)
        a = a.reshape(B, nW, H, N, d).transpose(2, 3).reshape(B, T, C)  # (B, nW * N, C)
        x = x + self.attn_out(a).index_select(1, self.inverse)  # back to row-major, roll undone
        return x + self.mlp_down(F.gelu(self.mlp_up(self.mlp_norm(x))))


class PatchMerging(nn.Module):
    """Each 2x2 group of tokens -> one token: concatenate (4C), LayerNorm, Linear to 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, resolution: int) -> Tensor:
        B, T, C = x.shape
        x = x.view(B, resolution // 2, 2, resolution // 2, 2, C)  # (B, Y, dy, X, dx, C)
        # transformers concatenates [(dy, dx)] = [(0, 0), (1, 0), (0, 1), (1, 1)]: dx is the slower index.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, T // 4, 4 * C)  # (B, T / 4, 4C)
        return self.reduction(self.norm(x))


class AudioEncoder(nn.Module):
    def __init__(self, config: CLAPConfig):
        super().__init__()
        self.config = config
        self.mel_norm = nn.BatchNorm1d(config.num_mel_bins)  # over the mel bins, running statistics at eval
        pad = (config.patch_size - config.patch_stride) // 2
        self.patch_embed = nn.Conv2d(1, config.patch_dim, config.patch_size, config.patch_stride, pad)
        self.patch_norm = nn.LayerNorm(config.patch_dim) if config.patch_norm else nn.Identity()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i, (depth, heads, res) in enumerate(zip(config.depths, config.audio_heads, config.resolutions)):
            dim = config.patch_dim * 2 ** i
            self.stages.append(nn.ModuleList(
                SwinBlock(config, dim, heads, res, shift=0 if b % 2 == 0 else config.window_size // 2)
                for b in range(depth)))
            if i < len(config.depths) - 1:
                self.merges.append(PatchMerging(dim))
        self.norm = nn.LayerNorm(config.audio_dim)

    def to_image(self, mel: Tensor) -> Tensor:
        """(B, T, F) normalised log-mel -> (B, 1, S, S) with S = spec_size (ClapAudioEncoder.reshape_mel2img).

        The time axis is stretched to S * r frames (r = freq_ratio = S / F; 1001 -> 1024) by bicubic
        interpolation with align_corners=True, cut into r chunks of S frames, and the chunks are stacked along
        frequency: image row j * F + f, column t is mel bin f at frame j * S + t.
        """
        B, T, Fq = mel.shape
        S, r = self.config.spec_size, self.config.freq_ratio
        if T < S * r:
            mel = F.interpolate(mel[:, None], size=(S * r, Fq), mode="bicubic", align_corners=True)[:, 0]
        x = mel.reshape(B, r, S, Fq).transpose(2, 3)  # (B, r, F, S): chunk j, bin f, frame t
        return x.reshape(B, 1, r * Fq, S)  # (B, 1, S, S)

    def forward(self, features: Tensor) -> Tensor:
        """features (B, T, F) log-mel dB -> pooled (B, audio_dim)."""
        x = self.mel_norm(features.transpose(1, 2)).transpose(1, 2)  # (B, T, F)
        x = self.patch_embed(self.to_image(x))  # (B, C, R, R)
        x = self.patch_norm(x.flatten(2).transpose(1, 2))  # (B, R * R, C), row-major
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x)
            if i < len(self.merges):
                x = self.merges[i](x, self.config.resolutions[i])
        # transformers regroups the last grid into (frequency bin, time) groups before its average pool; a mean
        # over every token is the same number.
        return self.norm(x).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Feature extractor


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-30) / 1000.0) * (27.0 / np.log(6.4)),
                    3.0 * hz / 200.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sample_rate: int) -> Tensor:
    """(n_freqs, n_mels) float64 triangular filters, Slaney scale and Slaney area normalisation: librosa's
    `filters.mel` defaults, and transformers' `mel_filter_bank(norm="slaney", mel_scale="slaney")`."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,) Hz
    freqs = np.linspace(0, sample_rate // 2, n_freqs)  # (n_freqs,) the FFT bins
    rise = (freqs[:, None] - edges[None, :-2]) / np.diff(edges)[:-1]  # (n_freqs, n_mels)
    fall = (edges[None, 2:] - freqs[:, None]) / np.diff(edges)[1:]
    weights = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (edges[2:] - edges[:-2]))
    return torch.from_numpy(weights)


Seed = int | np.random.Generator | np.random.RandomState | None


def _crop_start(rng: np.random.Generator | np.random.RandomState, overflow: int) -> int:
    # RandomState.randint draws what transformers' np.random.randint draws after np.random.seed(seed).
    if isinstance(rng, np.random.RandomState):
        return int(rng.randint(0, overflow + 1))
    return int(rng.integers(0, overflow + 1))


def log_mel(clips: Tensor, config: CLAPConfig) -> Tensor:
    """(B, N) float64 clips at config.sample_rate -> (B, T, F) float64 10·log10(mel power), floored at -100 dB.

    transformers' `spectrogram(power=2.0, log_mel="dB")`: periodic Hann window, frames centred (reflect
    padding), power spectrum, mel projection floored at 1e-10, then dB with reference 1. The reference rounds
    the FFT to complex64 on the way; this stays in float64 (differences of ~1e-6 dB). `top_db` of the
    preprocessor config is never applied by the reference, nor here.
    """
    window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float64, device=clips.device)
    spec = torch.stft(clips, config.n_fft, config.hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (B, n_fft / 2 + 1, T)
    power = spec.real.square() + spec.imag.square()  # (B, n_freqs, T)
    filters = mel_filters(config.n_fft // 2 + 1, config.num_mel_bins, float(config.f_min), float(config.f_max),
                          config.sample_rate).to(clips.device)
    mel = torch.clamp(filters.T @ power, min=1e-10)  # (B, F, T)
    return (10.0 * torch.log10(mel)).transpose(1, 2)  # (B, T, F)


def _clips(wav: Tensor | np.ndarray | Sequence[Tensor | np.ndarray]) -> list[Tensor]:
    """Mono clips from (N,), (B, N), (B, 1, N) or a list of (N,) / (1, N) arrays of any lengths."""
    if isinstance(wav, (list, tuple)):
        if not wav:
            raise ValueError("wav is an empty list: pass at least one clip")
        clips = [_as_float_tensor(c, f"wav[{i}]") for i, c in enumerate(wav)]
        for i, c in enumerate(clips):
            if c.dim() == 2 and c.shape[0] == 1:
                clips[i] = c[0]
            elif c.dim() != 1:
                raise ValueError(f"wav[{i}] must be mono, (N,) or (1, N), got shape {tuple(c.shape)}")
        return clips
    wav = _as_float_tensor(wav)
    if wav.dim() == 3 and wav.shape[1] == 1:
        wav = wav[:, 0]
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(f"wav must be mono audio shaped (N,), (B, N) or (B, 1, N), got {tuple(wav.shape)} "
                         f"(mix stereo down first, e.g. musiclm_core.audio.convert_channels(wav, 1))")
    if wav.shape[0] == 0:
        raise ValueError("wav holds no clip (batch size 0)")
    return list(wav)


def format_scores(scores: Tensor, texts: Sequence[str], names: Sequence[str]) -> str:
    """A (len(texts), len(names)) score matrix as a plain-text table: one row per text, one column per audio
    file, 4 decimals (what `musiclm clap` prints)."""
    if tuple(scores.shape) != (len(texts), len(names)):
        raise ValueError(f"scores {tuple(scores.shape)} do not match {len(texts)} texts x {len(names)} files")
    width = max(len(t) for t in texts)
    columns = [max(len(str(n)), 7) for n in names]
    lines = [" " * width + "  " + "  ".join(str(n).rjust(c) for n, c in zip(names, columns))]
    for text, row in zip(texts, scores.tolist()):
        lines.append(text.ljust(width) + "  " + "  ".join(f"{v:.4f}".rjust(c) for v, c in zip(row, columns)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


class CLAPTokenizer:
    """RoBERTa's byte-level BPE, run by the `tokenizers` library, built as transformers 5's RobertaTokenizer
    builds it: BPE over the checkpoint's vocab and merges (the "model" of tokenizer.json, else vocab.json +
    merges.txt), byte-level pre-tokenizer (no prefix space unless tokenizer_config.json says so), <s> ... </s>
    around each text, and the added tokens (tokenizer.json's "added_tokens", else tokenizer_config.json's
    "added_tokens_decoder", else the five special tokens) matched in the raw text with their lstrip / rstrip
    flags. Truncation keeps <s> and </s>; padding is <pad> on the right, mask 0 there.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, added_tokens: list[dict],
                 add_prefix_space: bool = False, trim_offsets: bool = True):
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        for token in ("<s>", "</s>", "<pad>"):
            if token not in vocab:
                raise hub.CheckpointError(f"the tokenizer vocabulary has no {token!r} token")
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]),
                                                          trim_offsets=trim_offsets,
                                                          add_prefix_space=add_prefix_space)

        def added(t: dict, special: bool) -> AddedToken:
            return AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                              rstrip=t.get("rstrip", False), normalized=t.get("normalized", not special),
                              special=special)

        tok.add_special_tokens([added(t, True) for t in added_tokens if t.get("special", True)])
        tok.add_tokens([added(t, False) for t in added_tokens if not t.get("special", True)])
        self._tok = tok
        self.add_prefix_space, self.trim_offsets = add_prefix_space, trim_offsets
        self.pad_id = vocab["<pad>"]
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "CLAPTokenizer":
        """A folder with tokenizer.json, or vocab.json + merges.txt (and optionally tokenizer_config.json)."""
        folder = Path(folder)
        options = hub.read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() \
            else {}
        if (folder / TOKENIZER_FILE).is_file():
            data = hub.read_json(folder / TOKENIZER_FILE)
            model = data.get("model") or {}
            if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
                raise hub.CheckpointError(f"{folder / TOKENIZER_FILE} does not hold a BPE model")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = data.get("added_tokens") or []
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = hub.read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            added = [{"id": int(i), **t} for i, t in (options.get("added_tokens_decoder") or {}).items()]
        else:
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise hub.CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json and "
                                      f"merges.txt; found {present}")
        if not added:  # what transformers 5's RobertaTokenizer adds then: plain special tokens (no lstrip)
            added = [{"content": t} for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise hub.CheckpointError(f"{folder}: merges must be pairs of tokens, got {bad[:3]}")
        return cls(vocab, merges, added_tokens=added, add_prefix_space=bool(options.get("add_prefix_space", False)),
                   trim_offsets=bool(options.get("trim_offsets", True)))

    def files(self) -> dict[str, bytes]:
        """tokenizer.json (the whole pipeline) and tokenizer_config.json (its two options): what `from_folder`
        reads back."""
        options = {"add_prefix_space": self.add_prefix_space, "trim_offsets": self.trim_offsets}
        return {TOKENIZER_FILE: self._tok.to_str().encode("utf-8"),
                "tokenizer_config.json": (json.dumps(options) + "\n").encode("utf-8")}

    def __call__(self, texts: Sequence[str], *, max_length: int, padding: str = "longest") -> tuple[Tensor, Tensor]:
        """texts -> input_ids (B, L) int64, attention_mask (B, L) int64 (1 = token, 0 = padding).

        Each text is truncated to `max_length` tokens, <s> and </s> included. padding="longest": L is the
        longest text (transformers' padding=True); "max_length": L = max_length (what the diffusion
        pipelines use for conditioning).
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty: pass at least one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must hold strings; item(s) {bad[:5]} are not")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self._tok.enable_truncation(max_length=max_length)
        encodings = self._tok.encode_batch(list(texts))
        L = max_length if padding == "max_length" else max(len(e.ids) for e in encodings)
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        for row, e in enumerate(encodings):
            ids[row, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[row, :len(e.ids)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# The model


class CLAP(nn.Module):
    """Both towers, their projections and logit scales; `tokenizer` is attached by `from_pretrained`."""

    def __init__(self, config: CLAPConfig):
        super().__init__()
        self.config = config
        self.text = TextEncoder(config)
        self.text_proj = Projection(config.text_dim, config.projection_dim, config.projection_act)
        self.audio = AudioEncoder(config)
        self.audio_proj = Projection(config.audio_dim, config.projection_dim, config.projection_act)
        self.logit_scale_text = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.logit_scale_audio = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.tokenizer: CLAPTokenizer | None = None

    # ----- lower level: ids and features in, unit vectors out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) int, attention_mask (B, L) (1 = token) -> (B, projection_dim), L2-normalised.

        transformers' `ClapModel.get_text_features(...).pooler_output`. Positions come from the ids (pads are
        the <pad> id), attention from the mask; without a mask every token is attended to.
        """
        if input_ids.dim() != 2 or input_ids.is_floating_point() or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be a non-empty (B, L) integer tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        B, L = input_ids.shape
        if L > self.config.max_positions - self.config.pad_token_id - 1:
            raise ValueError(f"input_ids has {L} tokens; this model takes at most "
                             f"{self.config.max_positions - self.config.pad_token_id - 1}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got min "
                             f"{int(input_ids.min())}, max {int(input_ids.max())}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, "
                             f"got {tuple(attention_mask.shape)}")
        device = self.text.tok_embed.weight.device
        pooled = self.text(input_ids.to(device), attention_mask.to(device))
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_audio(self, features: Tensor) -> Tensor:
        """features (B, 1, T, F) or (B, T, F) log-mel dB (from `features`, or transformers' ClapFeatureExtractor)
        -> (B, projection_dim), L2-normalised. transformers' `get_audio_features(...).pooler_output`."""
        if features.dim() == 4 and features.shape[1] == 1:
            features = features[:, 0]
        S, r, n_mels = self.config.spec_size, self.config.freq_ratio, self.config.num_mel_bins
        if features.dim() != 3 or features.shape[0] == 0 or features.shape[2] != n_mels \
                or not 1 <= features.shape[1] <= S * r:
            raise ValueError(f"features must be (B, 1, T, {n_mels}) or (B, T, {n_mels}) with 1 <= T <= {S * r}, "
                             f"got {tuple(features.shape)}")
        weight = self.audio.patch_embed.weight
        pooled = self.audio(features.to(device=weight.device, dtype=weight.dtype))
        return F.normalize(self.audio_proj(pooled), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, features: Tensor) -> dict[str, Tensor]:
        """Both towers at once: text_embeds (B_t, D), audio_embeds (B_a, D), logits_per_text (B_t, B_a) =
        cosine * exp(logit_scale_text), logits_per_audio (B_a, B_t) = cosineᵀ * exp(logit_scale_audio)."""
        text, audio = self.encode_text(input_ids, attention_mask), self.encode_audio(features)
        cos = text @ audio.T
        return {"text_embeds": text, "audio_embeds": audio, "logits_per_text": cos * self.logit_scale_text.exp(),
                "logits_per_audio": cos.T * self.logit_scale_audio.exp()}

    def tokenize(self, texts: Sequence[str], *, padding: str = "longest",
                 max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (B, L) int64. The diffusion pipelines condition on
        padding="max_length" (512 tokens) and rank with padding="longest"; the embeddings agree either way up
        to float round-off, since padding is masked."""
        if self.tokenizer is None:
            raise ValueError("this CLAP has no tokenizer: load it with CLAP.from_pretrained, or set "
                             "`clap.tokenizer = CLAPTokenizer.from_folder(folder)`")
        return self.tokenizer(texts, max_length=max_length or self.config.max_text_length, padding=padding)

    def features(self, wav: Tensor | np.ndarray | Sequence[Tensor | np.ndarray], sample_rate: int, *,
                 seed: Seed = 0) -> Tensor:
        """Mono audio at `sample_rate` -> (B, 1, T, F) float32 log-mel features (T = 1001 for 10 s), as
        transformers' ClapFeatureExtractor with truncation="rand_trunc" computes them at 48 kHz.

        wav: (N,), (B, N), (B, 1, N), or a list of clips of different lengths. Each clip is resampled to 48 kHz
        with `musiclm_core.audio.resample` (Kaiser-windowed sinc; the pipelines' ranking uses librosa's soxr_hq
        instead, so features of resampled audio differ slightly from theirs), then made `max_length_s` long:
        a longer clip is cropped at a random start, drawn from `seed`: an int seeds a fresh
        `np.random.RandomState`, which draws what the reference draws after `np.random.seed(seed)` (one draw per
        long clip, in order); a `np.random.Generator` or `RandomState` is used as it is; None uses fresh OS
        entropy (the reference's unseeded behaviour). A shorter clip is repeated and zero-padded (`padding`).
        """
        sample_rate = _check_sample_rate(sample_rate)
        clips = _clips(wav)
        cfg = self.config
        if seed is None:
            rng: np.random.Generator | np.random.RandomState = np.random.default_rng()
        elif isinstance(seed, (np.random.Generator, np.random.RandomState)):
            rng = seed
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            rng = np.random.RandomState(int(seed))
        else:
            raise TypeError(f"seed must be an int, a numpy Generator or RandomState, or None; got {seed!r}")
        out = []
        for i, clip in enumerate(clips):
            if not torch.isfinite(clip).all():
                raise ValueError(f"clip {i} holds {int((~torch.isfinite(clip)).sum())} NaN or infinite sample(s)")
            clip = resample(clip.double().cpu(), sample_rate, cfg.sample_rate)
            if clip.shape[-1] < cfg.hop_length:
                raise ValueError(f"clip {i} is shorter than one frame: {clip.shape[-1]} samples at "
                                 f"{cfg.sample_rate} Hz, at least {cfg.hop_length} needed "
                                 f"({1000 * cfg.hop_length / cfg.sample_rate:g} ms)")
            out.append(self._fit_length(clip, rng))
        mel = log_mel(torch.stack(out), cfg)  # (B, T, F)
        return mel[:, None].float()  # (B, 1, T, F)

    def _fit_length(self, clip: Tensor, rng) -> Tensor:
        """Crop or fill one clip to max_samples (ClapFeatureExtractor._get_input_mel, "rand_trunc")."""
        n, N = clip.shape[-1], self.config.max_samples
        if n > N:
            start = _crop_start(rng, n - N)
            return clip[start:start + N]
        if n < N and self.config.padding == "repeatpad":
            clip = clip.repeat(N // n)  # whole copies only, then silence
        elif n < N and self.config.padding == "repeat":
            clip = clip.repeat(N // n + 1)[:N]
        return F.pad(clip, (0, N - clip.shape[-1]))

    # ----- higher level: strings and waveforms in

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> Tensor:
        """texts -> (B, projection_dim) L2-normalised text embeddings (tokenised with padding="longest")."""
        return self.encode_text(*self.tokenize(texts))

    @torch.inference_mode()
    def audio_embeds(self, wav: Tensor | np.ndarray | Sequence[Tensor | np.ndarray], sample_rate: int, *,
                     seed: Seed = 0) -> Tensor:
        """Mono audio at any sample rate (see `features`) -> (B, projection_dim) L2-normalised embeddings."""
        return self.encode_audio(self.features(wav, sample_rate, seed=seed))

    @torch.inference_mode()
    def score(self, texts: Sequence[str], wav: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
              sample_rate: int, *, seed: Seed = 0, scaled: bool = False) -> Tensor:
        """(len(texts), B_audio) cosine similarities in [-1, 1]; scaled=True multiplies them by
        exp(logit_scale_text): transformers' `logits_per_text`, which the pipelines rank with (same order)."""
        cos = self.text_embeds(texts) @ self.audio_embeds(wav, sample_rate, seed=seed).T
        return cos * self.logit_scale_text.exp() if scaled else cos

    def logits_per_text(self, texts: Sequence[str], wav: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
                        sample_rate: int, *, seed: Seed = 0) -> Tensor:
        """`score(..., scaled=True)`: cosine * exp(logit_scale_text), transformers' `logits_per_text`."""
        return self.score(texts, wav, sample_rate, seed=seed, scaled=True)

    def score_files(self, texts: Sequence[str], paths: Sequence[str | os.PathLike], *, seed: Seed = 0,
                    scaled: bool = False) -> Tensor:
        """(len(texts), len(paths)) `score` of each text against each audio file (any rate; channels are
        averaged to mono). What `musiclm clap "text" a.wav b.wav` prints."""
        if not paths:
            raise ValueError("paths is empty: pass at least one audio file")
        clips = []
        for path in paths:
            wav, sr = load_audio(path, channels=1)  # (1, N)
            clips.append(resample(wav[0].double(), sr, self.config.sample_rate))
        return self.score(texts, clips, self.config.sample_rate, seed=seed, scaled=scaled)

    # ----- checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "CLAP":
        """A hub id (laion/clap-htsat-unfused, laion/larger_clap_music, or a diffusion pipeline such as
        ucsd-reach/musicldm), a transformers ClapModel folder (config.json, weights, tokenizer files,
        preprocessor_config.json), a diffusers pipeline folder (text_encoder/, tokenizer/,
        feature_extractor/), or a native folder."""
        from musiclm_core.convert import clap as convert, keys

        name = str(name_or_path)
        if Path(name).expanduser().is_dir():
            folder = Path(name).expanduser()
        else:  # a hub id: the small files first, to see the layout, then the weights of the model part only
            folder = hub.resolve(name, revision=revision, allow_patterns=["*.json", "*.txt"])
            sub = "text_encoder/" if hub.detect_layout(folder) == "diffusers" else ""
            folder = hub.resolve(name, revision=revision, allow_patterns=["*.json", "*.txt", f"{sub}*.safetensors"])
            if not any((folder / sub).glob("*.safetensors")):
                folder = hub.resolve(name, revision=revision, allow_patterns=["*.json", "*.txt", f"{sub}*.bin"])
        layout = hub.detect_layout(folder)
        if layout == "native":
            fields_, state = hub.load_native(folder, KIND)
            config = CLAPConfig.from_dict(fields_, source=str(folder / "config.json"))
            model = keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
            model.tokenizer = CLAPTokenizer.from_folder(folder)
            return model
        if layout == "transformers":
            return convert.load_transformers_folder(folder, tokenizer_folder=folder, features_folder=folder,
                                                    dtype=dtype)
        if layout == "diffusers":
            return convert.load_transformers_folder(folder / "text_encoder", tokenizer_folder=folder / "tokenizer",
                                                    features_folder=folder / "feature_extractor", dtype=dtype)
        raise hub.CheckpointError(f"{folder} is a {layout} folder, which holds no CLAP")

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Native folder: config.json + model.safetensors + tokenizer.json, written atomically."""
        if self.tokenizer is None:
            raise ValueError("this CLAP has no tokenizer to save with it (set `clap.tokenizer` first)")
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite,
                        extra_files=self.tokenizer.files())
