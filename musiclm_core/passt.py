"""PaSST (Koutini et al. 2022, "Efficient Training of Audio Transformers with Patchout") as an AudioSet tagger, and
the KL divergence between its label distributions on generated and reference music (MusicGen's "KLD").

    wav (B, N) at 32 kHz -> pre-emphasis y[n] = x[n+1] - 0.97 x[n]  (N - 1 samples)
        -> |STFT|² (n_fft 1024, symmetric Hann 800, hop 320, centred: T = (N - 1) // 320 + 1 frames)
        -> 128 Kaldi mel bins over 0-15 kHz -> log(x + 1e-5) -> (x + 4.5) / 5       -> mel (B, 128, T)
    mel -> 16x16 patches every 10 bins / frames (conv)                             -> (B, D, 12, T')
        -> + frequency positions (12) + time positions (cut to the T' = (T - 16) // 10 + 1 patches present)
        -> flatten (frequency-major) and prepend cls and distillation tokens     -> (B, 2 + 12 T', D)
        -> ViT blocks (pre-LN) -> LayerNorm -> mean of the two tokens -> LayerNorm -> Linear -> logits (B, 527)

This is the inference path of hear21passt 0.0.26 (kkoutini/passt_hear21: `models/preprocess.py::AugmentMelSTFT`
in eval mode, `models/passt.py::PaSST`), which is what audiocraft's `PasstKLDivergenceMetric` runs: at inference
there is no patchout, no dropout, and no SpecAugment-style masking or random mel range. Three quirks are kept:
the head normalises the *average* of the cls and distillation tokens with its own LayerNorm (eps 1e-5, the
blocks use 1e-6); the checkpoint's `head_dist` layer is never used (DeiT would average two heads instead);
the mel range stops at 15 kHz (hear21passt's fmax = sr / 2 - fmax_aug_range / 2 with its augmentation range
of 2 kHz), not at Nyquist. The Kaldi filterbank (`torchaudio.compliance.kaldi.get_mel_banks`: triangles on the
1127 ln(1 + f / 700) mel scale, no area normalisation) is computed here in float64, so torchaudio is not needed.

Checkpoints: the GitHub release .pt files hear21passt downloads (`CHECKPOINTS`), read by `PaSST.from_pretrained`
through `convert/passt.py`. Presets: "10sec" (hear21passt.base, time positions for 10 s), "20sec"
(hear21passt.base20sec, audiocraft's MusicGen evaluation: `kld.passt.pretrained_length: 20`), "30sec", "tiny".

The metric (audiocraft `metrics/kld.py`, `solvers/musicgen.py::evaluate_audio_generation`):

    clip (C, N) at any rate -> mono, 32 kHz (resampled as julius does it, audiocraft's resampler)
        -> cut into segments of `segment_s` (10/20/30 s), the last one shorter;
    segments of 0.15 s or less are dropped -> softmax(logits) per segment -> p (S, 527)
    for each pair of segments at the same place in a generated clip (q) and its reference (p):
        kld_pq = KL(p || q + eps) = sum_l p_l (log p_l - log(q_l + eps)),  eps = 1e-6   (audiocraft's "kld")
        kld_qp = KL(q || p + eps)
    each is averaged over all segment pairs of all clips; kld_both = kld_pq + kld_qp.

`KLDivergence` documents how clips are paired and cropped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.audio import _as_float_tensor, _check_finite, _check_sample_rate, resample

NUM_LABELS = 527  # AudioSet's ontology


@dataclass(frozen=True)
class PaSSTConfig:
    # The mel front-end (hear21passt's AugmentMelSTFT as base.py / base20sec.py / base30sec.py configure it).
    sample_rate: int = 32_000
    n_fft: int = 1024
    win_length: int = 800                 # symmetric Hann (periodic=False), centred in the 1024-point frame
    hop_length: int = 320                 # 10 ms: 100 frames per second
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float = 15_000.0               # sr / 2 - fmax_aug_range / 2 (2000): the eval-mode upper edge
    preemphasis: float = 0.97
    log_offset: float = 1e-5              # log(mel + 1e-5): silence gives log(1e-5) = -11.5
    # The transformer.
    patch_size: int = 16                  # square patches of 16 mel bins x 16 frames
    patch_stride: int = 10                # overlapping: a new patch every 10 bins / frames
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    time_positions: int = 200             # hear21passt: input_tdim // stride (998, 2000, 3000 frames)
    num_labels: int = NUM_LABELS
    # The metric: audio is cut into segments this long (audiocraft's `pretrained_length`); shorter pieces than
    # `min_segment_s` (or equal) are dropped, as audiocraft does (0.15 s at 32 kHz is one patch of frames).
    segment_s: float = 20.0
    min_segment_s: float = 0.15

    def __post_init__(self):
        if not 0 < self.win_length <= self.n_fft or self.hop_length <= 0:
            raise ValueError(f"need 0 < win_length <= n_fft and hop_length > 0, got win_length {self.win_length}, "
                             f"n_fft {self.n_fft}, hop_length {self.hop_length}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {self.sample_rate / 2}, got f_min "
                             f"{self.f_min}, f_max {self.f_max}")
        if self.n_mels < self.patch_size or not 0 < self.patch_stride <= self.patch_size:
            raise ValueError(f"need n_mels >= patch_size and 0 < patch_stride <= patch_size, got n_mels "
                             f"{self.n_mels}, patch_size {self.patch_size}, patch_stride {self.patch_stride}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.time_positions <= 0 or self.depth <= 0:
            raise ValueError(f"time_positions and depth must be positive, got {self.time_positions}, {self.depth}")
        if self.patches(self.segment_samples) > self.time_positions:
            raise ValueError(f"a {self.segment_s} s segment makes {self.patches(self.segment_samples)} time "
                             f"patches, more than the {self.time_positions} time positions")
        if self.patches(self.min_samples + 1) < 1:
            raise ValueError(f"min_segment_s {self.min_segment_s} is shorter than one patch of "
                             f"{self.patch_size} frames")

    @property
    def freq_patches(self) -> int:
        """Patches along the mel axis (12 for 128 bins)."""
        return (self.n_mels - self.patch_size) // self.patch_stride + 1

    def frames(self, samples: int) -> int:
        """Mel frames of `samples` samples: pre-emphasis drops one, the centred STFT has one per hop + 1."""
        return (samples - 1) // self.hop_length + 1

    def patches(self, samples: int) -> int:
        """Time patches of `samples` samples (0 when there are fewer frames than one patch)."""
        frames = self.frames(samples)
        return 0 if frames < self.patch_size else (frames - self.patch_size) // self.patch_stride + 1

    @property
    def segment_samples(self) -> int:
        return int(self.segment_s * self.sample_rate)

    @property
    def min_samples(self) -> int:
        """Segments must be *longer* than this (audiocraft: `s.size(-1) > min_input_frames`)."""
        return int(self.min_segment_s * self.sample_rate)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, PaSSTConfig] = {
    # hear21passt.base: passt_s_swa_p16_128_ap476, trained on 10 s clips (998 frames -> 99 time positions).
    "10sec": PaSSTConfig(time_positions=99, segment_s=10.0),
    # hear21passt.base20sec: passt-s-f128-20sec-p16-s10-ap474-swa (2000 frames -> 200). audiocraft's default.
    "20sec": PaSSTConfig(time_positions=200, segment_s=20.0),
    # hear21passt.base30sec: passt-s-f128-30sec-p16-s10-ap473-swa (3000 frames -> 300).
    "30sec": PaSSTConfig(time_positions=300, segment_s=30.0),
    # For tests: the official front-end, patches and 527 labels; a narrow, shallow transformer on 2 s segments
    # (200 frames -> 20 positions, as 20 s -> 200).
    "tiny": PaSSTConfig(dim=32, depth=2, heads=4, time_positions=20, segment_s=2.0),
}

_RELEASES = "https://github.com/kkoutini/PaSST/releases/download/"
# The release file of each preset (vit_helpers.default_cfgs in hear21passt): hear21passt downloads it with timm's
# `download_cached_file` to torch.hub.get_dir()/checkpoints/<file name>. "tiny" only exists as a test fixture.
CHECKPOINTS: dict[str, tuple[str, str | None]] = {
    "10sec": ("passt-s-f128-p16-s10-ap.476-swa.pt", _RELEASES + "v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt"),
    "20sec": ("passt-s-f128-20sec-p16-s10-ap.474-swa.pt",
              _RELEASES + "v0.0.5/passt-s-f128-20sec-p16-s10-ap.474-swa.pt"),
    "30sec": ("passt-s-f128-30sec-p16-s10-ap.473-swa.pt",
              _RELEASES + "v0.0.5/passt-s-f128-30sec-p16-s10-ap.473-swa.pt"),
    "tiny": ("passt-tiny.pt", None),
}


# ---------------------------------------------------------------------------------------------------------------
# The mel front-end


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> Tensor:
    """(n_mels, n_fft // 2 + 1) float64 triangular filters on Kaldi's mel scale 1127 ln(1 + f / 700).

    As `torchaudio.compliance.kaldi.get_mel_banks` without VTLN warping: the n_mels + 2 edges are equally spaced
    in mel between f_min and f_max, each triangle peaks at 1 (no area normalisation), the FFT bins are read at
    k * sample_rate / n_fft for k < n_fft / 2, and the Nyquist bin gets a zero weight (hear21passt pads it on).
    """
    def mel(hz):
        return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)

    edges = np.linspace(mel(f_min), mel(f_max), n_mels + 2)  # (n_mels + 2,)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    bins = mel(np.arange(n_fft // 2) * sample_rate / n_fft)[None, :]  # (1, n_fft / 2)
    up = (bins - left) / (center - left)
    down = (right - bins) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))  # (n_mels, n_fft / 2)
    return F.pad(torch.from_numpy(banks), (0, 1))  # (n_mels, n_fft / 2 + 1): zero weight at Nyquist


class MelFrontEnd(nn.Module):
    """(B, N) audio at 32 kHz -> (B, n_mels, T) normalised log-mel, T = (N - 1) // hop + 1."""

    def __init__(self, config: PaSSTConfig):
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.empty(config.win_length), persistent=False)
        self.register_buffer("banks", torch.empty(config.n_mels, config.n_fft // 2 + 1), persistent=False)
        if not self.window.is_meta:  # made on the meta device (loading): `keys.build` calls reset_buffers after
            self.reset_buffers()

    def reset_buffers(self) -> None:
        c = self.config
        device = None if self.window.is_meta else self.window.device
        self.window = torch.hann_window(c.win_length, periodic=False, device=device)
        self.banks = kaldi_mel_banks(c.n_mels, c.n_fft, c.sample_rate, c.f_min, c.f_max).float().to(device)

    def forward(self, wav: Tensor) -> Tensor:
        c = self.config
        B, N = wav.shape
        x = wav[:, 1:] - c.preemphasis * wav[:, :-1]  # (B, N - 1) first-order high-pass
        spec = torch.stft(x, c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                          window=self.window.to(x.dtype), center=True, pad_mode="reflect", normalized=False,
                          return_complex=True)  # (B, n_fft / 2 + 1, T)
        power = torch.view_as_real(spec).pow(2).sum(-1)  # (B, F, T) |X|²
        mel = torch.matmul(self.banks.to(x.dtype), power)  # (n_mels, F) @ (B, F, T) -> (B, n_mels, T)
        # hear21passt's "fast normalization": a fixed affine map of the log-mel, not per-clip statistics.
        return ((mel + c.log_offset).log() + 4.5) / 5.0


# ---------------------------------------------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    """Pre-LN ViT block: x + attn(norm(x)), then x + mlp(norm(x)); exact (erf) GELU."""

    def __init__(self, config: PaSSTConfig):
        super().__init__()
        D = config.dim
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.qkv = nn.Linear(D, 3 * D)  # rows q | k | v, heads contiguous within each (timm's layout)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        hidden = int(D * config.mlp_ratio)
        self.fc1 = nn.Linear(D, hidden)
        self.fc2 = nn.Linear(hidden, D)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d); no mask: every clip in a batch is whole
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PaSST(nn.Module):
    """The mel front-end and the transformer: `logits(wav)` (B, N) at 32 kHz -> (B, 527); `forward(mel)`."""

    def __init__(self, config: PaSSTConfig):
        super().__init__()
        self.config = config
        c = config
        self.mel = MelFrontEnd(c)
        self.patch_embed = nn.Conv2d(1, c.dim, kernel_size=c.patch_size, stride=c.patch_stride)
        self.freq_pos = nn.Parameter(torch.zeros(1, c.dim, c.freq_patches, 1))  # (1, D, F', 1)
        self.time_pos = nn.Parameter(torch.zeros(1, c.dim, 1, c.time_positions))  # (1, D, 1, T'max)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.token_pos = nn.Parameter(torch.zeros(1, 2, c.dim))  # positions of the cls and dist tokens
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head_norm = nn.LayerNorm(c.dim)  # eps 1e-5: hear21passt's head is a plain nn.LayerNorm
        self.head = nn.Linear(c.dim, c.num_labels)
        with torch.no_grad():  # a usable random model (tests); checkpoints overwrite all of it
            for p in (self.freq_pos, self.time_pos, self.cls_token, self.dist_token, self.token_pos):
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, T) or (B, 1, n_mels, T) from `self.mel` -> logits (B, num_labels)."""
        c = self.config
        if mel.dim() == 3:
            mel = mel[:, None]  # (B, 1, F, T)
        if mel.dim() != 4 or mel.shape[1] != 1 or mel.shape[2] != c.n_mels or mel.shape[0] == 0:
            raise ValueError(f"mel must be (B, {c.n_mels}, T) or (B, 1, {c.n_mels}, T), got {tuple(mel.shape)}")
        T = mel.shape[-1]
        patches = 0 if T < c.patch_size else (T - c.patch_size) // c.patch_stride + 1
        if not 1 <= patches <= c.time_positions:
            raise ValueError(f"mel has {T} frames = {patches} time patches; this model takes 1 to "
                             f"{c.time_positions} ({c.patch_size} to "
                             f"{c.patch_size + (c.time_positions - 1) * c.patch_stride} frames)")
        x = self.patch_embed(mel.to(self.patch_embed.weight.dtype))  # (B, D, F', T')
        B, D, Fp, Tp = x.shape
        # Separate frequency and time positions (PaSST §2.1); the time table is cut to the patches present, so
        # a shorter input reads the positions of the start of a training clip.
        x = x + self.freq_pos + self.time_pos[..., :Tp]  # (B, D, F', T')
        x = x.flatten(2).transpose(1, 2)  # (B, F' T', D), frequency-major: patch (f, t) at f * T' + t
        tokens = torch.cat([self.cls_token, self.dist_token], dim=1) + self.token_pos  # (1, 2, D)
        x = torch.cat([tokens.expand(B, -1, -1), x], dim=1)  # (B, 2 + F' T', D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        features = (x[:, 0] + x[:, 1]) / 2  # (B, D): mean of the cls and distillation tokens
        return self.head(self.head_norm(features))  # (B, num_labels)

    @torch.inference_mode()
    def logits(self, wav: Tensor, sample_rate: int | None = None) -> Tensor:
        """wav (B, N) or (N,) mono at 32 kHz -> logits (B, num_labels). One forward for the whole clip: use
        `label_distributions` for clips longer than `config.segment_s` or at another rate."""
        c = self.config
        if sample_rate is not None and _check_sample_rate(sample_rate) != c.sample_rate:
            raise ValueError(f"audio at {sample_rate} Hz: PaSST takes {c.sample_rate} Hz audio; resample it first "
                             f"(musiclm_core.audio.resample), or call label_distributions(model, wav, "
                             f"{sample_rate}), which does")
        wav = _as_float_tensor(wav)
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or 0 in wav.shape:
            raise ValueError(f"wav must be (B, N) mono audio, got shape {tuple(wav.shape)}")
        _check_finite(wav, "wav")
        if c.patches(wav.shape[-1]) < 1:
            least = (c.patch_size - 1) * c.hop_length + 1  # (N - 1) // hop + 1 >= patch_size frames
            raise ValueError(f"wav has {wav.shape[-1]} samples: PaSST needs at least one patch of {c.patch_size} "
                             f"frames, {least} samples ({least / c.sample_rate * 1000:.2f} ms)")
        weight = self.patch_embed.weight
        return self(self.mel(wav.to(device=weight.device, dtype=weight.dtype)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, preset: str = "20sec",
                        dtype: torch.dtype = torch.float32) -> "PaSST":
        """The release checkpoint of `preset` ("10sec", "20sec", "30sec"; "tiny" for test fixtures).

        path: None looks where hear21passt's download puts it, torch.hub.get_dir()/checkpoints/<file>; a folder
        is searched for the preset's file name (`CHECKPOINTS`); a file is read as it is. The file is a pickled
        state dict in hear21passt's layout, read with torch.load(weights_only=True) and converted key by key
        (convert/passt.py). A missing file is an error that names where it looked and the download URL.
        """
        from musiclm_core.convert import passt as convert

        if preset not in PRESETS:
            raise ValueError(f"unknown PaSST preset {preset!r}; choose one of {sorted(PRESETS)}")
        return convert.load_file(checkpoint_path(path, preset), PRESETS[preset], dtype=dtype)


def checkpoint_path(path: str | os.PathLike | None, preset: str) -> Path:
    """Where the checkpoint of `preset` is (see `PaSST.from_pretrained`), or a FileNotFoundError saying where it
    looked and how to get it."""
    name, url = CHECKPOINTS[preset]
    if path is None:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / name
    else:
        candidate = Path(path).expanduser()
        if candidate.is_dir():
            candidate = candidate / name
    if candidate.is_file():
        return candidate
    how = (f"download it from {url}, e.g. python -c \"import torch; torch.hub.download_url_to_file('{url}', "
           f"'{candidate}')\"" if url else "the 'tiny' preset has no release file (tests write one: "
           "tests/passt_fixtures.py)")
    raise FileNotFoundError(f"no PaSST checkpoint for preset {preset!r} at {candidate}; {how}")


# ---------------------------------------------------------------------------------------------------------------
# Label distributions and their KL divergence


def model_input(wav: Tensor | np.ndarray, sample_rate: int, config: PaSSTConfig, *, name: str = "wav") -> Tensor:
    """A clip (C, N) or (N,) at `sample_rate` -> (N',) mono at config.sample_rate (32 kHz), float32.

    Channels are averaged, then the clip is resampled as audiocraft's `convert_audio` does it (`_resample_julius`).
    """
    sample_rate = _check_sample_rate(sample_rate)
    wav = _as_float_tensor(wav, name)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2 or wav.shape[0] == 0:
        raise ValueError(f"{name} must be one clip (C, N) or (N,), got shape {tuple(wav.shape)}")
    _check_finite(wav, name)  # also: empty
    mono = wav.mean(dim=0)  # (N,)
    if sample_rate != config.sample_rate:
        mono = _resample_julius(mono.double(), sample_rate, config.sample_rate)
    return mono.float()


def _resample_julius(wav: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """(N,) -> (N * new_sr // orig_sr,) resampled the way julius.resample_frac does it (audiocraft's resampler).

    The filter: a sinc with a Hann (cos²) taper, 24 zero crossings, cutoff at 0.945 of the lower Nyquist
    frequency (`resample(window="hann")`, torchaudio's design: julius's to ~2e-5). It passes up to ~15.1 kHz and
    the mel bands reach 15 kHz, so our default resampler (Kaiser, cutoff 0.90: 14.4 kHz) would move the top bands
    and the metric with them. The edges: julius repeats the first and last samples beyond the clip, where
    `resample` takes zeros; a step there puts broadband energy into the first or last frames and moves the label
    probabilities of a segment by up to ~4e-3 (measured). So the clip is extended by repeating its end samples,
    by whole periods of the reduced ratio (`orig` input samples give `new` output samples, so the output grid
    does not move), resampled, and the extension cut off again. The length is julius's: rounded down.
    """
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    reach = math.ceil(24 / (0.945 * min(1.0, new / orig))) + 1  # input samples the filter reads on each side
    periods = -(-reach // orig)
    extended = F.pad(wav[None, None], (periods * orig, periods * orig), mode="replicate")[0, 0]
    out = resample(extended, orig_sr, new_sr, window="hann", rolloff=0.945, zeros=24)
    return out[periods * new: periods * new + wav.shape[-1] * new_sr // orig_sr]


def segments(mono: Tensor, config: PaSSTConfig, *, name: str = "wav") -> list[Tensor]:
    """(N,) mono audio at 32 kHz -> the segments the metric scores: consecutive `segment_s` pieces, the last one
    shorter; those of `min_segment_s` or less are dropped (audiocraft: "too small segments that are breaking the
    model inference"), so a 25 s clip gives 2 with the 20 s model and a 20.1 s clip 1. None left is an error."""
    c = config
    pieces = [p for p in torch.split(mono, c.segment_samples) if p.shape[-1] > c.min_samples]
    if not pieces:
        raise ValueError(f"{name} is {mono.shape[-1] / c.sample_rate:.3f} s long at {c.sample_rate} Hz; the KL "
                         f"metric needs more than {c.min_segment_s} s ({c.min_samples} samples), as audiocraft "
                         f"drops shorter segments")
    return pieces


def segment_distributions(model: PaSST, pieces: list[Tensor], *, batch_size: int = 4) -> Tensor:
    """Segments (from `segments`, of any lengths) -> (S, num_labels) softmax probabilities, one row per segment,
    in order. Segments of one length run `batch_size` at a time (audiocraft runs them one by one: the same
    numbers up to float round-off; batches run faster, benchmarks/passt.py)."""
    rows: list[Tensor | None] = [None] * len(pieces)
    with torch.inference_mode():
        for length in sorted({p.shape[-1] for p in pieces}):
            index = [i for i, p in enumerate(pieces) if p.shape[-1] == length]
            for start in range(0, len(index), batch_size):
                batch = index[start:start + batch_size]
                logits = model.logits(torch.stack([pieces[i] for i in batch]))  # (b, L)
                for i, row in zip(batch, logits):
                    rows[i] = row
    return torch.stack(rows).float().softmax(dim=-1)  # (S, L)


def label_distributions(model: PaSST, wav: Tensor | np.ndarray, sample_rate: int) -> Tensor:
    """One clip (C, N) or (N,) at any rate -> (S, num_labels) label probabilities per segment (float32, CPU or the
    model's device), as audiocraft's `PasstKLDivergenceMetric._get_label_distribution` forms them for one clip:
    mono, 32 kHz, `segment_s` segments (the last may be shorter), segments of 0.15 s or less dropped, softmax."""
    return segment_distributions(model, segments(model_input(wav, sample_rate, model.config), model.config))


def kl_divergence(pred_probs: Tensor, target_probs: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., L) probabilities of the generated audio (q) and of the reference (p) -> (...) KL(p || q + eps) =
    sum_l p_l (log p_l - log(q_l + eps)), with 0 log 0 = 0: audiocraft's `kl_divergence` (torch's kl_div with
    log(pred + eps) as input, reduction "none", summed over the labels). The eps makes it slightly negative
    for equal distributions: about -eps times the number of labels with p > 0 (-5e-4 at most)."""
    if pred_probs.shape != target_probs.shape or pred_probs.dim() == 0:
        raise ValueError(f"pred_probs and target_probs must have one shape (..., L), got {tuple(pred_probs.shape)} "
                         f"and {tuple(target_probs.shape)}")
    return F.kl_div((pred_probs + eps).log(), target_probs, reduction="none").sum(-1)


class KLDivergence:
    """Running KL divergence between PaSST's label distributions on generated clips and their references.

        metric = KLDivergence(PaSST.from_pretrained())      # the 20 s model, as MusicGen's evaluation
        for generated, reference in pairs:                 # (C, N) tensors
            metric.add(generated, reference, sample_rate=32000, reference_sample_rate=44100)
        metric.compute()  # {"kld": ..., "kld_pq": ..., "kld_qp": ..., "kld_both": ...}

    The numbers are audiocraft's `PasstKLDivergenceMetric` (with `pretrained_length` = the preset's
    `segment_s`): each clip pair is cut into segments at the same places; every segment pair gives
    kld_pq = KL(p_ref || p_gen + eps) and kld_qp = KL(p_gen || p_ref + eps), and `compute` returns their means
    over *all segment pairs* (not a mean per clip: a 25 s pair counts twice, once for 0-20 s and once for
    20-25 s), "kld" = "kld_pq" (the figure MusicGen reports) and "kld_both" = kld_pq + kld_qp.

    Clips of different lengths: audiocraft asserts that both batches have one shape and crops both to the
    reference's true length (`sizes`; the generation is made as long as the reference and cropped to it). Here
    both clips of a pair are cropped to the shorter one (at 32 kHz, after mixing to mono and resampling), so the
    segments stay paired: the same stretch of time is compared, and a generation longer than its reference (or
    the reverse) is not penalised for the extra part, which has nothing to be compared with. At equal lengths
    nothing is cropped and this is audiocraft's computation. A pair whose shorter clip lasts 0.15 s or less has
    no segment to compare and is an error (audiocraft skips it without a word). `add` returns the per-segment
    pair values.
    `add_probs` takes label probabilities (S, L) directly (e.g. from `label_distributions`).
    """

    def __init__(self, model: PaSST, *, eps: float = 1e-6):
        self.model = model
        self.eps = eps
        self.kld_pq_sum = 0.0
        self.kld_qp_sum = 0.0
        self.count = 0

    def add(self, generated: Tensor | np.ndarray, reference: Tensor | np.ndarray, sample_rate: int,
            reference_sample_rate: int | None = None) -> dict[str, Tensor]:
        """Add one pair of clips, (C, N) or (N,) each; `reference_sample_rate` defaults to `sample_rate`."""
        c = self.model.config
        if reference_sample_rate is None:
            reference_sample_rate = sample_rate
        gen = model_input(generated, sample_rate, c, name="generated")
        ref = model_input(reference, reference_sample_rate, c, name="reference")
        n = min(gen.shape[-1], ref.shape[-1])  # crop both to the shorter clip (see the class docstring)
        gen_pieces, ref_pieces = segments(gen[:n], c, name="generated"), segments(ref[:n], c, name="reference")
        probs = segment_distributions(self.model, gen_pieces + ref_pieces)  # one batch: the same segment lengths
        return self.add_probs(probs[:len(gen_pieces)], probs[len(gen_pieces):])

    def add_probs(self, generated: Tensor, reference: Tensor) -> dict[str, Tensor]:
        """Add paired label probabilities (S, L) of generated and reference segments."""
        if generated.dim() != 2 or generated.shape != reference.shape or generated.shape[0] == 0:
            raise ValueError(f"generated and reference probabilities must be (S, L) of one shape with S > 0, got "
                             f"{tuple(generated.shape)} and {tuple(reference.shape)}")
        pq = kl_divergence(generated, reference, self.eps)  # (S,) KL(ref || gen)
        qp = kl_divergence(reference, generated, self.eps)  # (S,) KL(gen || ref)
        if not (torch.isfinite(pq).all() and torch.isfinite(qp).all()):
            raise ValueError("the KL divergence of these probabilities is not finite (are they probabilities?)")
        self.kld_pq_sum += float(pq.double().sum())
        self.kld_qp_sum += float(qp.double().sum())
        self.count += pq.shape[0]
        return {"kld_pq": pq, "kld_qp": qp}

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no clip pairs added: call add(generated, reference, sample_rate) first")
        pq, qp = self.kld_pq_sum / self.count, self.kld_qp_sum / self.count
        return {"kld": pq, "kld_pq": pq, "kld_qp": qp, "kld_both": pq + qp}

    def reset(self) -> None:
        self.kld_pq_sum, self.kld_qp_sum, self.count = 0.0, 0.0, 0
