"""Chroma melody features: pitch classes of known tones, shapes, padding, null chroma and bad input."""

import math

import pytest
import torch

from musiclm_core.audio import resample
from musiclm_core.chroma import (
    MAX_FRAMES,
    N_FFT,
    chroma_features,
    chroma_filterbank,
    normalized_chroma,
    null_chroma,
)

SR = 32000


def tone(freq: float, seconds: float = 1.5, sample_rate: int = SR) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    return (0.5 * torch.sin(2 * math.pi * freq * t)).float()  # (N,)


def midi_hz(m: int) -> float:
    return 440.0 * 2.0 ** ((m - 69) / 12)


def test_a440_is_bin_9():
    out = chroma_features(tone(440.0), SR)
    assert out.shape == (1, 1 + len(tone(440.0)) // 4096, 12)
    assert (out.argmax(-1) == 9).all()  # C-first ordering: C=0 ... A=9 ... B=11


@pytest.mark.parametrize("midi", [36, 48, 55, 61, 64, 70, 74, 83, 95])
def test_each_note_lands_on_its_pitch_class(midi):
    out = chroma_features(tone(midi_hz(midi)), SR)
    assert (out.argmax(-1) == midi % 12).all()


def test_filterbank_shape_and_peaks():
    fb = chroma_filterbank(SR, N_FFT, 12)
    assert fb.shape == (12, N_FFT // 2 + 1) and fb.dtype == torch.float64
    assert (fb >= 0).all()
    for m in range(40, 90):
        k = round(midi_hz(m) * N_FFT / SR)  # the FFT bin nearest to the note
        assert fb[:, k].argmax().item() == m % 12


def test_output_is_one_hot_and_matches_normalized_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 50000, generator=g)
    out = chroma_features(x, SR)
    norm = normalized_chroma(x, SR)
    assert out.dtype == torch.float32 and norm.shape == out.shape
    assert torch.equal(out.sum(-1), torch.ones(3, out.shape[1]))
    assert torch.equal(out.argmax(-1), norm.argmax(-1))
    assert torch.allclose(norm.amax(-1), torch.ones(())) and (norm >= 0).all()


@pytest.mark.parametrize(
    "n,frames",
    [(1, 5), (1000, 5), (N_FFT - 1, 5), (N_FFT, 5), (N_FFT + 4095, 5), (N_FFT + 4096, 6), (100000, 25),
     (960000, 235), (960001, 235), (1_500_000, 235)],
)
def test_frame_count(n, frames):
    x = torch.full((n,), 0.1)
    x[::7] = -0.1
    assert chroma_features(x, SR).shape == (1, frames, 12)
    assert frames == 1 + max(min(n, 960000), N_FFT) // 4096
    assert MAX_FRAMES == 235


def test_input_layouts():
    x = tone(261.63, 1.0)
    mono = chroma_features(x, SR)  # (N,)
    assert torch.equal(chroma_features(x[None], SR), mono)  # (1, N): one mono channel
    assert torch.equal(chroma_features(x[None, None], SR), mono)  # (1, 1, N)
    # (C, N) is one melody with C channels, averaged
    stereo = torch.stack([x, tone(440.0, 1.0)])
    expected = normalized_chroma((stereo[0] + stereo[1]) / 2, SR)
    assert torch.allclose(normalized_chroma(stereo, SR), expected, atol=1e-6)
    assert chroma_features(stereo, SR).shape[0] == 1
    assert chroma_features(torch.stack([stereo, stereo.flip(0), stereo * 0.5]), SR).shape[0] == 3


def test_scale_and_dtype_invariance():
    x = tone(329.63) + 0.3 * tone(392.0)
    ref = chroma_features(x, SR)
    assert torch.equal(chroma_features(0.25 * x, SR), ref)
    assert torch.equal(chroma_features(x.double(), SR), ref)  # computed in float32 either way


def test_list_batch_is_right_padded():
    a, b = tone(440.0, 2.0), tone(293.66, 0.9)  # A4, D4
    out = chroma_features([a, b], SR)  # lengths 64000 and 28800
    assert out.shape == (2, 1 + 64000 // 4096, 12)
    torch.testing.assert_close(out[0], chroma_features(a, SR)[0], atol=1e-6, rtol=0)  # batched vs alone
    # frames whose window lies inside b agree with b alone; frames past its end see only padding -> bin 0
    alone = chroma_features(b, SR)[0]
    inside = (28800 - N_FFT // 2) // 4096 + 1
    torch.testing.assert_close(out[1, :inside], alone[:inside], atol=1e-6, rtol=0)
    assert (alone[:inside].argmax(-1) == 2).all()
    past = 28800 // 4096 + 3  # centre at least n_fft/2 beyond the last sample
    assert (out[1, past:].argmax(-1) == 0).all()
    assert torch.equal(chroma_features([a, b[None]], SR), out)  # items may be (C, N) too


def test_silence_is_bin_zero_and_warns():
    with pytest.warns(UserWarning, match="silent"):
        out = chroma_features(torch.zeros(2, 1, 40000), SR)
    assert torch.equal(out, null_chroma(2, out.shape[1]))


def test_resampled_input():
    for sr in (16000, 22050, 44100, 48000):
        out = chroma_features(tone(440.0, 1.5, sr), sr)
        assert out.shape == (1, 1 + math.ceil(int(1.5 * sr) * SR / sr) // 4096, 12)
        assert (out.argmax(-1) == 9).all(), sr
    assert torch.equal(chroma_features(tone(440.0), 32000.0), chroma_features(tone(440.0), SR))


def test_resampling_uses_the_reference_filter():
    # Other rates go through torchaudio's filter (Hann, rolloff 0.945, 24 zeros; tests/parity checks it against
    # torchaudio), not audio.resample's default: white noise tells the two apart.
    noise = 0.1 * torch.randn(3 * 44100 + 7, generator=torch.Generator().manual_seed(0))
    got = normalized_chroma(noise, 44100)
    at_32k = resample(noise, 44100, SR, window="hann", rolloff=0.945, zeros=24)
    assert torch.equal(got, normalized_chroma(at_32k, SR))
    assert (got - normalized_chroma(resample(noise, 44100, SR), SR)).abs().max().item() > 1e-2


def test_null_chroma():
    out = null_chroma(3)
    assert out.shape == (3, 1, 12) and out.dtype == torch.float32
    assert torch.equal(out[..., 0], torch.ones(3, 1)) and out[..., 1:].abs().sum() == 0
    assert null_chroma(2, frames=235, dtype=torch.float64).shape == (2, 235, 12)
    with pytest.raises(ValueError, match="batch >= 1"):
        null_chroma(0)
    with pytest.raises(ValueError, match="frames >= 1"):
        null_chroma(1, frames=0)


@pytest.mark.parametrize(
    "wav,sample_rate,match",
    [
        (torch.zeros(0), SR, "empty"),
        (torch.zeros(1, 2, 0), SR, "empty"),
        ([torch.ones(100), torch.zeros(0)], SR, "melody 1 of the batch is empty"),
        (torch.tensor([0.1, float("nan"), 0.2] * 100), SR, "NaN or infinite"),
        (torch.tensor([0.1, float("inf")] * 100), SR, "NaN or infinite"),
        (torch.ones(100, dtype=torch.int16), SR, "float waveform"),
        (torch.ones(1, 1, 1, 100), SR, r"\(B, C, N\), \(C, N\) or \(N,\)"),
        (torch.tensor(0.5), SR, r"\(B, C, N\), \(C, N\) or \(N,\)"),
        ([], SR, "empty sequence"),
        ([torch.ones(10), "x"], SR, "melody 1 of the batch must be"),
        ([torch.ones(1, 1, 10)], SR, r"melody 0 of the batch must be a \(C, N\)"),
        ("wav.wav", SR, "torch.Tensor or a sequence"),
        (torch.ones(100), 0, "positive integer"),
        (torch.ones(100), -44100, "positive integer"),
        (torch.ones(100), 44100.5, "positive integer"),
        (torch.ones(100), "32000", "positive integer"),
    ],
)
def test_bad_input(wav, sample_rate, match):
    with pytest.raises(ValueError, match=match):
        chroma_features(wav, sample_rate)
