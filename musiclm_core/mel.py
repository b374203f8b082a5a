"""The 16 kHz log-mel front-end of AudioLDM / AudioLDM 2 / MusicLDM: waveform -> the mel the VAE encodes.

    wav (B, N) at 16 kHz -> normalize_wav -> |STFT| (n_fft 1024, Hann 1024, hop 160, centred)
        -> 64 slaney mel bins over 0-8000 Hz -> log(clamp(x, 1e-5)) -> (B, T, 64), T = N // 160 + 1

This is the front-end of the original training and inference code, not of diffusers (whose pipelines only go
from mel to waveform): `TacotronSTFT.mel_spectrogram` in haoheliu/AudioLDM2 `audioldm2/utilities/audio/stft.py`
(a magnitude STFT, i.e. power 1, with the window reflect-padded by n_fft / 2 on each side; librosa's slaney
filterbank; `dynamic_range_compression` = natural log of the magnitude clamped at 1e-5), with the waveform
normalisation and the padding of `audioldm2/utilities/audio/tools.py` (`normalize_wav`, `read_wav_file`,
`_pad_spec`); RetroCirce/MusicLDM uses the same settings (`interface/config_16k_64.json`).

The filterbank is computed here, in float64, as `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)` computes it
(slaney mel scale, slaney area normalisation), so the package does not need librosa; the tests compare the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from musiclm_core.audio import _check_sample_rate


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16_000
    n_fft: int = 1024
    win_length: int = 1024        # periodic Hann window, centred in the n_fft frame when shorter
    hop_length: int = 160         # 10 ms: 100 frames per second
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-5       # log(clamp(x, log_floor)): the mel of silence is log(1e-5) = -11.51

    def __post_init__(self):
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in (0, n_fft={self.n_fft}], got {self.win_length}")
        if self.hop_length <= 0 or self.n_mels <= 0:
            raise ValueError(f"hop_length and n_mels must be positive, got {self.hop_length} and {self.n_mels}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {self.sample_rate / 2}, "
                             f"got f_min {self.f_min}, f_max {self.f_max}")


PRESETS: dict[str, MelConfig] = {
    # AudioLDM, AudioLDM 2 and MusicLDM (get_basic_config()["preprocessing"] of haoheliu/AudioLDM2).
    "16khz": MelConfig(),
    # A small one for tests: 8 kHz, 256-point frames, 16 bins.
    "tiny": MelConfig(sample_rate=8000, n_fft=256, win_length=256, hop_length=40, n_mels=16, f_max=4000.0),
}


# ---------------------------------------------------------------------------------------------------------------
# The slaney mel scale and filterbank (librosa.core.convert.hz_to_mel / mel_to_hz with htk=False, and
# librosa.filters.mel with norm="slaney"): linear below 1 kHz (200/3 Hz per mel), logarithmic above.

_F_SP = 200.0 / 3            # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0         # where the log part starts
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: Tensor) -> Tensor:
    lin = hz / _F_SP
    log = _MIN_LOG_MEL + torch.log(hz.clamp(min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return torch.where(hz >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(mel: Tensor) -> Tensor:
    lin = _F_SP * mel
    log = _MIN_LOG_HZ * torch.exp(_LOGSTEP * (mel.clamp(min=_MIN_LOG_MEL) - _MIN_LOG_MEL))
    return torch.where(mel >= _MIN_LOG_MEL, log, lin)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """(n_mels, n_fft // 2 + 1) float64: triangles on the slaney mel scale, each scaled to unit area per Hz
    (2 / its width in Hz), as `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min,
    fmax=f_max)`. Row m rises from centre m - 1 to centre m and falls to centre m + 1 of n_mels + 2 centres
    equally spaced in mel from f_min to f_max."""
    cpu = dict(dtype=torch.float64, device="cpu")  # a constant: always made on the CPU, then moved
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, **cpu)
    low, high = hz_to_mel(torch.tensor([float(f_min), float(f_max)], **cpu)).tolist()
    mels = torch.linspace(low, high, n_mels + 2, **cpu)
    centres = mel_to_hz(mels)  # (n_mels + 2,) Hz
    widths = centres.diff()  # (n_mels + 1,)
    ramps = centres[:, None] - fft_hz[None, :]  # (n_mels + 2, F)
    rising = -ramps[:-2] / widths[:-1, None]  # (n_mels, F)
    falling = ramps[2:] / widths[1:, None]
    weights = torch.minimum(rising, falling).clamp(min=0)
    return weights * (2.0 / (centres[2:] - centres[:-2]))[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Waveform preparation (haoheliu/AudioLDM2 audioldm2/utilities/audio/tools.py)


def normalize_wav(wav: Tensor) -> Tensor:
    """(..., N) -> (..., N): each row minus its mean, divided by (its peak + 1e-8), times 0.5 (peak 0.5)."""
    wav = wav - wav.mean(dim=-1, keepdim=True)
    return wav / (wav.abs().amax(dim=-1, keepdim=True) + 1e-8) * 0.5


def fit_length(x: Tensor, length: int, dim: int = -1) -> Tensor:
    """Crop `x` to `length` along `dim`, or pad it with zeros at the end (what `pad_wav` and `_pad_spec` do)."""
    n = x.shape[dim]
    if n >= length:
        return x.narrow(dim, 0, length)
    shape = list(x.shape)
    shape[dim] = length - n
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


# ---------------------------------------------------------------------------------------------------------------
# The front-end


class LogMel(nn.Module):
    """(B, N) audio at config.sample_rate -> (B, T, n_mels) natural-log magnitude mel, T = N // hop_length + 1.

    The window and the filterbank are derived constants: non-persistent buffers, made again by
    `reset_buffers()` (e.g. after the module was made on the meta device), moved by `.to()`.
    """

    def __init__(self, config: MelConfig = PRESETS["16khz"]):
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.empty(config.win_length), persistent=False)
        self.register_buffer("filterbank", torch.empty(config.n_mels, config.n_fft // 2 + 1), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        c = self.config
        device = self.window.device
        # periodic=True: scipy.signal.get_window("hann", win_length), what the original STFT uses.
        self.window = torch.hann_window(c.win_length, periodic=True, dtype=torch.float32, device=device)
        fb = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
        self.filterbank = fb.to(device=device, dtype=torch.float32)  # librosa returns float32 too

    def forward(self, wav: Tensor) -> Tensor:
        c = self.config
        wav = check_wav(wav, min_samples=c.n_fft // 2 + 1)
        B, N = wav.shape
        spec = torch.stft(wav, c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                          window=self.window.to(wav.dtype), center=True, pad_mode="reflect",
                          return_complex=True)  # (B, F, T)
        # |STFT| (power 1, not the power spectrum), then the filterbank: (n_mels, F) @ (B, F, T) -> (B, n_mels, T).
        mel = torch.matmul(self.filterbank.to(wav.dtype), spec.abs())
        return torch.log(mel.clamp(min=c.log_floor)).transpose(1, 2)  # (B, T, n_mels)


def check_wav(wav: Tensor, *, min_samples: int = 1, name: str = "wav") -> Tensor:
    """A (B, N) floating-point tensor of finite samples, N >= min_samples, else a ValueError that says why."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(wav)
    if not isinstance(wav, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, N), got {type(wav).__name__}")
    if wav.dim() != 2:
        hint = " (add the batch axis: wav[None])" if wav.dim() == 1 else ""
        raise ValueError(f"{name} must be (B, N) = (batch, samples), got shape {tuple(wav.shape)}{hint}")
    if not wav.is_floating_point():
        raise ValueError(f"{name} must hold floating-point samples, got dtype {wav.dtype}")
    B, N = wav.shape
    if B == 0 or N == 0:
        raise ValueError(f"{name} is empty: shape {tuple(wav.shape)}")
    if N < min_samples:
        raise ValueError(f"{name} has {N} samples; the centred STFT reflects n_fft // 2 = {min_samples - 1} "
                         f"samples at each end, so it needs at least {min_samples}")
    bad = (~torch.isfinite(wav)).sum().item()
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite sample(s)")
    return wav


def _check_rate(sample_rate: int, config: MelConfig) -> None:
    _check_sample_rate(sample_rate)
    if sample_rate != config.sample_rate:
        raise ValueError(f"audio at {sample_rate} Hz: the mel front-end takes {config.sample_rate} Hz audio; resample "
                         f"it first with musiclm_core.audio.resample(wav, {sample_rate}, {config.sample_rate})")


def log_mel(wav: Tensor, config: MelConfig = PRESETS["16khz"]) -> Tensor:
    """(B, N) audio at config.sample_rate (16 kHz) -> (B, T, n_mels) log-mel, as the audio is (no normalisation).

    T = N // hop_length + 1 = N // 160 + 1: frame t is centred on sample t * 160 (the signal is reflected by
    n_fft // 2 = 512 samples at each end), and every sample lies in some frame.
    """
    return LogMel(config).to(device=wav.device if isinstance(wav, Tensor) else None)(wav)


def wav_to_mel(wav: Tensor, sample_rate: int, target_frames: int | None = None,
               config: MelConfig = PRESETS["16khz"]) -> Tensor:
    """Audio -> the mel the VAE encoder takes: (B, N) or (B, 1, N) at 16 kHz -> (B, 1, T, n_mels).

    As the original code prepares a clip (`read_wav_file`, `wav_to_fbank`): `normalize_wav`; with
    `target_frames`, the audio is cut or zero-padded at the end to target_frames * hop_length samples and scaled
    to peak 0.5 again, and the log-mel (T = target_frames + 1 frames) cut to T = target_frames. Without it,
    T = N // hop_length + 1. Audio at another rate is refused: resample it with `musiclm_core.audio.resample`.
    The training clip is 10.24 s: target_frames = 1024.
    """
    _check_rate(sample_rate, config)
    if isinstance(wav, Tensor) and wav.dim() == 3:
        if wav.shape[1] != 1:
            raise ValueError(f"wav (B, C, N) must be mono (C = 1), got shape {tuple(wav.shape)}; mix it down first "
                             f"with musiclm_core.audio.convert_channels(wav, 1)")
        wav = wav[:, 0]  # (B, N)
    if target_frames is not None and (isinstance(target_frames, bool) or not isinstance(target_frames, int)
                                      or target_frames <= 0):
        raise ValueError(f"target_frames must be a positive integer, got {target_frames!r}")
    # With target_frames the audio is padded to length first, so only the STFT itself needs a minimum.
    wav = check_wav(wav, min_samples=1 if target_frames else config.n_fft // 2 + 1)
    wav = normalize_wav(wav)
    if target_frames is not None:
        wav = fit_length(wav, target_frames * config.hop_length)
        # read_wav_file divides by the peak again (without an epsilon: silence would give NaN here; ours gives 0).
        wav = wav / (wav.abs().amax(dim=-1, keepdim=True) + 1e-8) * 0.5
    mel = log_mel(wav, config)  # (B, T, n_mels)
    if target_frames is not None:
        mel = fit_length(mel, target_frames, dim=1)  # _pad_spec pads with zeros, not with log(1e-5)
    return mel[:, None]  # (B, 1, T, n_mels)

