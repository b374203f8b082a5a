"""Chroma melody features of MusicGen Melody.

The melody conditioning of MusicGen Melody is a sequence of one-hot pitch classes: for each STFT frame of the
melody, the chroma bin (C, C#, ..., B) that holds the most energy. This module computes it the way transformers'
`MusicgenMelodyFeatureExtractor` does (and audiocraft's `ChromaExtractor` with `argmax=True`, `norm=inf`):

    wav (any rate, any channels) -> mono, 32 kHz (torchaudio's resampling filter), at most 30 s
    -> right-pad the batch with zeros
    -> power spectrogram (n_fft 16384, hop 4096, periodic Hann, centred with reflect padding, |X|^2 / sum(w^2))
    -> chroma filterbank (= librosa.filters.chroma(sr=32000, n_fft=16384, tuning=0), 12 x 8193, C first)
    -> divide each frame by its largest bin -> one-hot of the argmax (a silent frame gives bin 0)

A melody of N samples at 32 kHz gives 1 + N // 4096 frames (235 for 30 s, the prefix length of the model);
a melody shorter than one window (16384 samples, 0.512 s) is first zero-padded on both sides to 16384 samples
and gives 5 frames. The model tiles or cuts whatever it gets to 235 frames (specs/musicgen.md §4.2).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from musiclm_core.audio import resample

SAMPLE_RATE = 32000  # the rate of the official melody checkpoint's chroma extractor
N_FFT = 16384  # window and FFT size: 2**14 (audiocraft radix2_exp=14)
HOP_LENGTH = 4096  # n_fft / 4
N_CHROMA = 12
MAX_SAMPLES = 30 * SAMPLE_RATE  # 960000: longer melodies are truncated (chunk_length 30 s)
MAX_FRAMES = 1 + MAX_SAMPLES // HOP_LENGTH  # 235, MusicgenMelodyConfig.chroma_length


def chroma_filterbank(sample_rate: int, n_fft: int, n_chroma: int = 12, tuning: float = 0.0) -> torch.Tensor:
    """Chroma filterbank, float64 (n_chroma, n_fft // 2 + 1), equal to `librosa.filters.chroma` with its defaults
    (ctroct 5, octwidth 2, L2 column norm, base_c True).

    Each FFT bin k > 0 sits at a fractional pitch p = n_chroma * log2(f_k / (A440 / 16)); its weight for pitch class c
    is a Gaussian bump in the circular distance between p and c (width: the bin's own spacing in pitch, at least one
    class), columns L2-normalised, then scaled by a Gaussian over octaves centred on octave 5 (~880 Hz) with a
    half-width of 2 octaves, so very low and very high bins count less.
    """
    bins = torch.arange(n_fft, dtype=torch.float64)
    freqs = bins[1:] * (sample_rate / n_fft)  # Hz, all n_fft bins (cut to one side at the end), DC skipped
    a440 = 440.0 * 2.0 ** (tuning / n_chroma)
    pitch = n_chroma * torch.log2(freqs / (a440 / 16))  # in chroma bins above A0 (27.5 Hz)
    # DC has no pitch: librosa places it 1.5 octaves below bin 1, which spreads it broadly over all classes.
    pitch = torch.cat([pitch[:1] - 1.5 * n_chroma, pitch])  # (n_fft,)
    width = torch.cat([torch.diff(pitch).clamp_min(1.0), pitch.new_ones(1)])  # (n_fft,)

    distance = pitch[None, :] - torch.arange(n_chroma, dtype=torch.float64)[:, None]  # (n_chroma, n_fft)
    half = round(n_chroma / 2)
    # wrap into [-half, half); the 10 * n_chroma offset keeps the operand positive, as librosa does
    distance = torch.remainder(distance + half + 10 * n_chroma, n_chroma) - half
    weights = torch.exp(-0.5 * (2 * distance / width) ** 2)  # bumps of half the bin width
    weights = weights / weights.pow(2).sum(dim=0, keepdim=True).sqrt()
    weights = weights * torch.exp(-0.5 * ((pitch / n_chroma - 5.0) / 2.0) ** 2)  # octave weighting
    # the classes above start at A; roll so that row 0 is C (A is then row 9)
    weights = torch.roll(weights, -3 * (n_chroma // 12), dims=0)
    return weights[:, : n_fft // 2 + 1].contiguous()


@functools.lru_cache(maxsize=8)
def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hann window and the filterbank in float32 on `device`, built once per device (derived constants).

    The filterbank is built in float64 and rounded once, as transformers does (numpy float64 -> .float()).
    """
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)
    filterbank = chroma_filterbank(SAMPLE_RATE, N_FFT, N_CHROMA).to(device=device, dtype=torch.float32)
    return window, filterbank


def _as_mono_batch(wav: torch.Tensor | Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
    """Validate, downmix, resample, truncate and right-pad: float32 (B, N) at 32 kHz."""
    if isinstance(sample_rate, float) and sample_rate.is_integer():
        sample_rate = int(sample_rate)
    if not isinstance(sample_rate, numbers.Integral) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    sample_rate = int(sample_rate)  # numpy integers too

    if isinstance(wav, torch.Tensor):
        if wav.dim() not in (1, 2, 3):
            raise ValueError(
                f"melody must have shape (B, C, N), (C, N) or (N,), got {tuple(wav.shape)}; "
                "for a batch of mono melodies use (B, 1, N)"
            )
        items = list(wav) if wav.dim() == 3 else [wav]  # each (C, N) or (N,)
    elif isinstance(wav, Sequence) and not isinstance(wav, (str, bytes)):
        items = list(wav)
        if not items:
            raise ValueError("melody batch is an empty sequence")
        for i, item in enumerate(items):
            if not isinstance(item, torch.Tensor) or item.dim() not in (1, 2):
                what = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
                raise ValueError(f"melody {i} of the batch must be a (C, N) or (N,) tensor, got {what}")
    else:
        raise ValueError(f"melody must be a torch.Tensor or a sequence of tensors, got {type(wav).__name__}")

    mono = []
    for i, item in enumerate(items):
        where = f"melody {i} of the batch" if len(items) > 1 else "melody"
        if not item.is_floating_point():
            raise ValueError(f"{where} must be a float waveform in [-1, 1], got dtype {item.dtype}")
        if item.shape[-1] == 0:
            raise ValueError(f"{where} is empty (0 samples); for no melody use null_chroma()")
        if not torch.isfinite(item).all():
            raise ValueError(f"{where} contains NaN or infinite samples")
        if not item.any():
            # Silence is not an error: it gives bin 0 everywhere, i.e. exactly the "no melody" condition.
            warnings.warn(f"{where} is silent (all zeros): its chroma is bin 0 in every frame, the same as no melody")
        item = item.float()
        if item.dim() == 2:
            item = item.mean(dim=0)  # (N,) downmix to mono
        if sample_rate != SAMPLE_RATE:
            # The reference's filter, not our default Kaiser one: transformers calls torchaudio.functional.resample
            # with rolloff=0.945, lowpass_filter_width=24 and its default Hann window. It matters for noisy
            # melodies: white noise is a near-tie of all 12 chroma bins, and our default filter, which keeps
            # 14.4 kHz of the 16 kHz band where this one keeps 15.1 kHz, changed the argmax in up to 45 % of
            # its frames. With this filter every frame agrees (tests/parity/test_chroma_parity.py). The reference
            # resamples before the downmix; both are linear, so the order only changes float round-off.
            item = resample(item, sample_rate, SAMPLE_RATE, window="hann", rolloff=0.945, zeros=24)
        mono.append(item[:MAX_SAMPLES])

    # Right-pad with zeros to the longest item (padding_side "right"); the padded tail gives silent (bin 0) frames.
    length = max(x.shape[0] for x in mono)
    return torch.stack([F.pad(x, (0, length - x.shape[0])) for x in mono])  # (B, N)


def normalized_chroma(wav: torch.Tensor | Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
    """Chroma energies divided by each frame's maximum: float32 (B, frames, 12), values in [0, 1], C first.

    Same inputs as `chroma_features`; this is the step before its argmax (useful for inspection and parity tests).
    """
    x = _as_mono_batch(wav, sample_rate)  # (B, N)
    B, N = x.shape
    if N < N_FFT:
        # transformers pads short melodies symmetrically to one window (the odd sample goes to the right);
        # this also keeps reflect padding (which needs N > n_fft / 2) valid.
        pad = N_FFT - N
        x = F.pad(x, (pad // 2, pad - pad // 2))  # (B, N_FFT)

    window, filterbank = _constants(x.device)
    spec = torch.stft(
        x,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=N_FFT,
        window=window,
        center=True,
        pad_mode="reflect",
        onesided=True,
        return_complex=True,
    )  # (B, F, T) complex, F = 8193, T = 1 + N // HOP_LENGTH
    # torchaudio's normalized=True ("window"): divide the complex STFT by the window's L2 norm, then |.|^2.
    # Same operations in the same order as the reference, so that 32 kHz input matches it exactly.
    spec = spec / window.pow(2.0).sum().sqrt()
    power = spec.abs().pow(2.0)  # (B, F, T)
    raw = torch.einsum("cf,bft->bct", filterbank, power)  # (B, 12, T)
    # p=inf normalisation: divide by the frame's largest bin, floored at 1e-6 so silence stays 0 (not NaN).
    norm = F.normalize(raw, p=math.inf, dim=1, eps=1e-6)  # (B, 12, T)
    return norm.transpose(1, 2)  # (B, T, 12)


def chroma_features(wav: torch.Tensor | Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
    """One-hot chroma of a melody, as MusicGen Melody consumes it: float32 (B, frames, 12), C-first pitch classes.

    wav: a float waveform in [-1, 1], either a tensor (B, C, N), (C, N) or (N,) -- a 2-D tensor is ONE melody with
        C channels, not a batch -- or a sequence of (C, N) / (N,) tensors of different lengths (a batch; shorter
        items are right-padded with zeros, whose frames come out as bin 0). Channels are averaged to mono.
    sample_rate: the rate of `wav` in Hz; other rates than 32000 are resampled to 32 kHz with `audio.resample`
        using the reference's filter (torchaudio's Hann-windowed sinc, rolloff 0.945, 24 zero crossings).

    Melodies longer than 30 s are truncated to 30 s. frames = 1 + N // 4096 for N samples at 32 kHz (235 for 30 s);
    a melody shorter than 16384 samples is zero-padded on both sides to 16384 and gives 5 frames.
    A frame without energy (silence, padding) gives bin 0, like `null_chroma`; an all-silent melody warns.
    Raises ValueError on an empty melody, NaN/inf samples, a non-float dtype or a bad shape or sample rate.
    Output is on the device of `wav`.
    """
    norm = normalized_chroma(wav, sample_rate)  # (B, T, 12)
    # argmax returns the first maximal index, so all-zero frames pick bin 0 (as the reference does)
    return F.one_hot(norm.argmax(dim=-1), N_CHROMA).to(torch.float32)  # (B, T, 12)


def null_chroma(
    batch: int, frames: int = 1, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The "no melody" chroma: one-hot on bin 0 in every frame, (batch, frames, 12).

    This is what the model is fed when a prompt has no melody, and the classifier-free-guidance null condition
    (with as many frames as the real chroma). It is not a zero vector: it equals the chroma of silence, which is
    what audiocraft computes for its null wav (specs/musicgen.md §4.2, G17).
    """
    if batch < 1 or frames < 1:
        raise ValueError(f"null_chroma needs batch >= 1 and frames >= 1, got batch={batch}, frames={frames}")
    out = torch.zeros(batch, frames, N_CHROMA, device=device, dtype=dtype)
    out[..., 0] = 1
    return out
