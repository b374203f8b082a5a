"""The mel front-end against a reference written here from its definition, with librosa's slaney filterbank.

Reference: the original AudioLDM 2 code path (haoheliu/AudioLDM2 `audioldm2/utilities/audio/tools.py`
`normalize_wav`, `pad_wav`, `read_wav_file`, `_pad_spec`, and `stft.py` `TacotronSTFT.mel_spectrogram`) written
in numpy, float64: reflect padding by n_fft / 2, frames every 160 samples times a periodic Hann window, |rfft|,
`librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)`, natural log of clamp(x, 1e-5).

Tolerance: max abs <= 1e-4 on the log-mel (ours runs in float32); the filterbank itself to 1e-6 relative.
"""

import numpy as np
import pytest
import torch

from musiclm_core.mel import PRESETS, log_mel, mel_filterbank, wav_to_mel

librosa = pytest.importorskip("librosa")

ATOL = 1e-4


def reference_log_mel(wav: np.ndarray, config) -> np.ndarray:
    """(N,) float64 -> (T, n_mels), from the definition."""
    pad = config.n_fft // 2
    x = np.pad(wav, (pad, pad), mode="reflect")
    T = 1 + (len(x) - config.n_fft) // config.hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(config.win_length) / config.win_length)  # periodic Hann
    left = (config.n_fft - config.win_length) // 2
    frames = np.stack([x[t * config.hop_length: t * config.hop_length + config.n_fft] for t in range(T)])
    frames[:, left: left + config.win_length] *= window
    frames[:, :left] = 0
    frames[:, left + config.win_length:] = 0
    magnitude = np.abs(np.fft.rfft(frames, axis=-1))  # (T, F)
    basis = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels,
                                fmin=config.f_min, fmax=config.f_max)
    return np.log(np.maximum(magnitude @ basis.T.astype(np.float64), config.log_floor))


def reference_wav_to_mel(wav: np.ndarray, target_frames: int, config) -> np.ndarray:
    """read_wav_file + wav_to_fbank of the original code, for one (N,) clip already at 16 kHz."""
    wav = wav - wav.mean()
    wav = wav / (np.abs(wav).max() + 1e-8) * 0.5
    segment = target_frames * config.hop_length
    wav = wav[:segment] if len(wav) >= segment else np.concatenate([wav, np.zeros(segment - len(wav))])
    wav = wav / np.abs(wav).max() * 0.5
    mel = reference_log_mel(np.clip(wav, -1, 1), config)
    if len(mel) < target_frames:
        mel = np.concatenate([mel, np.zeros((target_frames - len(mel), mel.shape[1]))])
    return mel[:target_frames]


def music_like(N: int, seed: int, sample_rate: int = 16_000) -> np.ndarray:
    """Harmonic tones, a decaying envelope, and a little noise: energy in most mel bins, well above the floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(N) / sample_rate
    wav = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
              for f in rng.uniform(60, 7000, size=12))
    wav = wav * (0.6 + 0.4 * np.cos(2 * np.pi * 1.7 * t)) + 0.02 * rng.standard_normal(N)
    return wav


@pytest.mark.parametrize("name", ["16khz", "tiny"])
def test_filterbank_matches_librosa(name):
    c = PRESETS[name]
    ours = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max).numpy()
    theirs = librosa.filters.mel(sr=c.sample_rate, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.f_min, fmax=c.f_max,
                                 dtype=np.float64)
    assert ours.shape == theirs.shape == (c.n_mels, c.n_fft // 2 + 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-12)
    assert (theirs > 0).any(axis=1).all()  # every bin has weight: the comparison covers them all


@pytest.mark.parametrize("N", [16_000, 16_000 + 77])
def test_log_mel_matches_reference(N):
    c = PRESETS["16khz"]
    wavs = np.stack([music_like(N, seed) for seed in (0, 1)])
    ours = log_mel(torch.from_numpy(wavs).float(), c).double().numpy()
    assert ours.shape == (2, N // 160 + 1, 64)
    for b in range(2):
        theirs = reference_log_mel(wavs[b].astype(np.float32).astype(np.float64), c)
        assert theirs.shape == ours[b].shape
        assert np.abs(ours[b] - theirs).max() <= ATOL
        assert theirs.min() > np.log(c.log_floor) + 1  # the test signal stays above the floor
    # The fixture listens: the two clips give clearly different mels.
    assert np.abs(ours[0] - ours[1]).max() > 1.0


@pytest.mark.parametrize("N", [16_000 * 3, 163_840 + 999])  # shorter than 10.24 s (padded) and longer (cut)
def test_wav_to_mel_matches_original_pipeline(N):
    c = PRESETS["16khz"]
    wav = music_like(N, seed=3) + 0.1  # a DC offset, which normalize_wav removes
    ours = wav_to_mel(torch.from_numpy(wav[None]).float(), 16_000, target_frames=1024)
    assert ours.shape == (1, 1, 1024, 64)
    theirs = reference_wav_to_mel(wav.astype(np.float32).astype(np.float64), 1024, c)
    assert np.abs(ours[0, 0].double().numpy() - theirs).max() <= ATOL
