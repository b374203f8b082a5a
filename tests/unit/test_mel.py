"""The mel front-end: shapes and frame counts, normalisation, padding to a target length, buffers, bad input.

The values themselves are checked against librosa and a reference STFT in tests/parity/test_mel_parity.py.
"""

import math

import pytest
import torch

from musiclm_core.mel import PRESETS, LogMel, fit_length, log_mel, mel_filterbank, normalize_wav, wav_to_mel

C = PRESETS["16khz"]


@pytest.mark.parametrize("N", [513, 1000, 1024, 16_000, 16_159, 16_160])
def test_frame_count(N):
    mel = log_mel(torch.randn(2, N) * 0.1)
    assert mel.shape == (2, N // 160 + 1, 64)
    assert mel.dtype == torch.float32


def test_silence_is_the_log_floor():
    mel = log_mel(torch.zeros(1, 4000))
    torch.testing.assert_close(mel, torch.full_like(mel, math.log(1e-5)))


def test_rows_are_independent():
    wav = torch.randn(3, 8000) * 0.2
    torch.testing.assert_close(log_mel(wav)[1], log_mel(wav[1:2])[0], atol=1e-5, rtol=0)


def test_a_tone_lights_its_own_bin():
    t = torch.arange(16_000) / 16_000
    for hz in (300.0, 3000.0):
        mel = log_mel(0.5 * torch.sin(2 * math.pi * hz * t)[None])[0]  # (T, 64)
        fb = mel_filterbank(16_000, 1024, 64, 0.0, 8000.0)
        expected = fb[:, round(hz / 16_000 * 1024)].argmax().item()
        assert abs(mel[50].argmax().item() - expected) <= 1


def test_normalize_wav():
    wav = torch.randn(2, 1000) * torch.tensor([[0.01], [3.0]]) + 0.7
    out = normalize_wav(wav)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.abs().amax(-1), torch.full((2,), 0.5), atol=1e-6, rtol=0)
    assert torch.isfinite(normalize_wav(torch.zeros(1, 100))).all()  # silence stays silence


def test_fit_length():
    x = torch.arange(6.0).view(1, 6)
    assert fit_length(x, 4).tolist() == [[0, 1, 2, 3]]
    assert fit_length(x, 8).tolist() == [[0, 1, 2, 3, 4, 5, 0, 0]]


@pytest.mark.parametrize("N", [16_000, 163_840, 170_000])
def test_wav_to_mel_target_frames(N):
    wav = torch.randn(2, N) * 0.3
    mel = wav_to_mel(wav, 16_000, target_frames=1024)
    assert mel.shape == (2, 1, 1024, 64)
    if N < 163_840:  # the frames past the audio: _pad_spec's zeros after the frames of the zero-padded audio
        assert (mel[:, :, N // 160 + 4:] == math.log(1e-5)).all()


def test_wav_to_mel_layout_and_mono_channel():
    wav = torch.randn(2, 4000)
    mel = wav_to_mel(wav, 16_000)
    assert mel.shape == (2, 1, 4000 // 160 + 1, 64)
    torch.testing.assert_close(wav_to_mel(wav[:, None], 16_000), mel)
    # normalize_wav first: the level of the input does not matter
    torch.testing.assert_close(wav_to_mel(wav * 7.0 + 0.2, 16_000), mel, atol=1e-4, rtol=0)


def test_buffers_are_derived_and_move():
    m = LogMel()
    assert m.state_dict() == {}  # non-persistent: nothing in a checkpoint
    with torch.device("meta"):
        meta = LogMel()
    meta.to_empty(device="cpu").reset_buffers()
    torch.testing.assert_close(meta.filterbank, m.filterbank)
    wav = torch.randn(1, 2000)
    out = LogMel().double()(wav.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), m(wav), atol=1e-4, rtol=0)


def test_other_sample_rate_names_the_resampler():
    with pytest.raises(ValueError, match=r"44100 Hz.*16000 Hz.*musiclm_core\.audio\.resample\(wav, 44100, 16000\)"):
        wav_to_mel(torch.randn(1, 44_100), 44_100)


@pytest.mark.parametrize("wav, match", [
    (torch.randn(16_000), r"\(B, N\).*shape \(16000,\).*wav\[None\]"),
    (torch.randn(1, 2, 3, 100), r"\(B, N\).*shape \(1, 2, 3, 100\)"),
    (torch.randn(1, 0), r"empty"),
    (torch.randn(0, 100), r"empty"),
    (torch.ones(1, 100, dtype=torch.int16), r"floating-point.*int16"),
    (torch.tensor([[0.1] * 600 + [float("nan")]]), r"1 NaN or infinite"),
    (torch.tensor([[0.1] * 600 + [float("inf")] * 2]), r"2 NaN or infinite"),
    (torch.randn(1, 512), r"512 samples.*at least 513"),
])
def test_bad_input(wav, match):
    with pytest.raises(ValueError, match=match):
        log_mel(wav)


def test_bad_input_wav_to_mel():
    with pytest.raises(ValueError, match=r"mono.*\(2, 2, 1000\).*convert_channels"):
        wav_to_mel(torch.randn(2, 2, 1000), 16_000)
    with pytest.raises(ValueError, match=r"target_frames.*positive integer.*0"):
        wav_to_mel(torch.randn(1, 1000), 16_000, target_frames=0)
    with pytest.raises(ValueError, match=r"NaN"):
        wav_to_mel(torch.full((1, 1000), float("nan")), 16_000, target_frames=100)
    with pytest.raises(ValueError, match=r"sample_rate must be a positive integer"):
        wav_to_mel(torch.randn(1, 1000), 16_000.0)
    assert wav_to_mel(torch.randn(1, 100), 16_000, target_frames=10).shape == (1, 1, 10, 64)  # short: padded first
