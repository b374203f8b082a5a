"""Chroma features against transformers' MusicgenMelodyFeatureExtractor (the reference for MusicGen Melody).

Tolerances: at 32 kHz (no resampling) the one-hot output is identical, and the normalised chroma before the
argmax agrees to max abs error <= 1e-4 (measured 0: same float32 operations in the same order).
Other sample rates: both resample to 32 kHz with the same filter (torchaudio's Hann-windowed sinc, rolloff 0.945,
24 zero crossings; ours is `audio.resample(window="hann")`, computed in float64 then rounded, theirs in float32).
The one-hot output is identical on every frame of every signal, white noise included (a near-tie of all 12 bins:
measured smallest gap between the top two bins 1.8e-5), and the normalised chroma agrees to max abs error
<= 1e-5 (measured <= 4.7e-6 on noise at 22.05 / 44.1 kHz, where torchaudio's float32 kernel is least exact;
<= 4e-7 at 48 kHz). With our default (Kaiser, cutoff 0.90) resampler, noise agreed on only 55-77 % of frames,
which `test_default_resampler_would_not_match` keeps in view.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import torchaudio  # noqa: F401  (the reference feature extractor needs it)
except (ImportError, OSError) as e:  # OSError: torchaudio's compiled libraries do not match our torch
    pytest.skip(
        f"torchaudio cannot be imported ({e}); install the test references with "
        "`bash tests/install_references.sh`",
        allow_module_level=True,
    )

from transformers import MusicgenMelodyFeatureExtractor
from transformers.audio_utils import chroma_filter_bank

from musiclm_core.chroma import chroma_features, chroma_filterbank, normalized_chroma


@pytest.fixture(scope="module")
def fe():
    from transformers.utils import logging

    logging.set_verbosity_error()  # the extractor warns about stereo / 4-D inputs on every call
    return MusicgenMelodyFeatureExtractor()


@contextlib.contextmanager
def _capture_normalize(captured: list):
    """Record what the reference's F.normalize returns: its normalised chroma, which it then overwrites in place
    with the one-hot (so it cannot be read from the output)."""
    original = F.normalize

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        captured.append(out.clone())
        return out

    F.normalize = recording
    try:
        yield
    finally:
        F.normalize = original


def reference(fe, audio, sample_rate):
    """-> (one-hot (B, T, 12), normalised chroma (B, T, 12)) from the reference extractor."""
    captured = []
    with _capture_normalize(captured):
        out = fe(audio, sampling_rate=sample_rate, return_tensors="pt").input_features
    assert len(captured) == 1
    return out, captured[0].transpose(1, 2)


def _midi_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12)


def signal(kind: str, n: int, sample_rate: int = 32000, seed: int = 0) -> torch.Tensor:
    """A float32 (n,) test signal: a chord progression (sums of sines), a log sweep, white noise, chords + noise,
    or silence."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    if kind == "chords":
        # C, Am, F(add C), G7-ish, Dm, E: roots and colours change, so the argmax moves between chords
        progression = [[60, 64, 67], [57, 60, 64], [53, 57, 60, 65], [55, 59, 62, 67], [62, 65, 69], [64, 68, 71]]
        seg = n // len(progression) + 1
        x = torch.zeros(n, dtype=torch.float64)
        for i, chord in enumerate(progression):
            s = slice(i * seg, (i + 1) * seg)
            for amp, m in zip([1.0, 0.8, 0.6, 0.5], chord):
                x[s] += amp * torch.sin(2 * math.pi * _midi_hz(m) * t[s] + seed)
        return (0.2 * x).float()
    if kind == "chirp":  # exponential sweep 100 Hz -> 4 kHz over the clip
        f0, f1 = 100.0, 4000.0
        k = math.log(f1 / f0) / (n / sample_rate)
        return (0.5 * torch.sin(2 * math.pi * f0 * (torch.exp(k * t) - 1) / k)).float()
    if kind == "noise":
        return (0.1 * torch.randn(n, generator=g, dtype=torch.float64)).float()
    if kind == "mix":
        return (signal("chords", n, sample_rate, seed) + 0.05 * torch.randn(n, generator=g)).float()
    if kind == "silence":
        return torch.zeros(n)
    raise ValueError(kind)


def ours(audio, sample_rate):
    if isinstance(audio, torch.Tensor) and audio.dim() == 1 and not audio.any():
        with pytest.warns(UserWarning, match="silent"):
            return chroma_features(audio, sample_rate), normalized_chroma(audio, sample_rate)
    return chroma_features(audio, sample_rate), normalized_chroma(audio, sample_rate)


def test_filterbank_matches_reference(fe):
    # the constant the extractor uses (float64 built, rounded to float32 once)
    assert torch.equal(chroma_filterbank(32000, 16384, 12).float(), fe.chroma_filters)
    for sr, n_fft, n_chroma, tuning in [(22050, 2048, 12, 0.0), (16000, 1024, 24, 0.3), (44100, 4096, 7, -0.2)]:
        theirs = chroma_filter_bank(num_frequency_bins=n_fft, num_chroma=n_chroma, sampling_rate=sr, tuning=tuning)
        mine = chroma_filterbank(sr, n_fft, n_chroma, tuning).numpy()
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= 1e-12


def test_signals_are_not_degenerate(fe):
    """The parity cases below must be able to fail: the reference output moves across many bins."""
    n = 6 * 32000
    for kind, min_distinct in [("chords", 5), ("chirp", 12), ("noise", 6), ("mix", 5)]:
        out, _ = reference(fe, signal(kind, n).numpy(), 32000)
        assert len(out.argmax(-1).unique()) >= min_distinct, kind


# short (< one window, zero-padded to it), around one window, not multiples of the hop, and over 30 s (truncated;
# only for two kinds, to keep the suite fast)
CASES_32K = [
    (kind, n)
    for kind in ["chords", "chirp", "noise", "mix", "silence"]
    for n in [1000, 16383, 16385, 37 * 4096 + 1234, 5 * 32000 + 77]
] + [("chords", 960000 + 5000), ("silence", 960000 + 1)]


@pytest.mark.parametrize("kind,n", CASES_32K)
def test_matches_reference_at_32k(fe, kind, n):
    x = signal(kind, n)
    ref, ref_norm = reference(fe, x.numpy(), 32000)
    got, got_norm = ours(x, 32000)
    assert got.shape == ref.shape == (1, 1 + max(min(n, 960000), 16384) // 4096, 12)
    assert torch.equal(got, ref)
    assert (got_norm - ref_norm).abs().max().item() <= 1e-4


def test_batch_of_different_lengths(fe):
    lengths, kinds = [20000, 70001, 41000, 9000], ["chords", "chirp", "noise", "mix"]
    items = [signal(k, n, seed=i) for i, (k, n) in enumerate(zip(kinds, lengths))]
    ref, ref_norm = reference(fe, [x.numpy() for x in items], 32000)
    got, got_norm = ours(items, 32000)
    assert got.shape == ref.shape == (4, 1 + 70001 // 4096, 12)
    assert torch.equal(got, ref)
    assert (got_norm - ref_norm).abs().max().item() <= 1e-4
    # a (B, 1, N) tensor batch of equal lengths gives the same as the (B, N) the reference takes
    batch = torch.stack([signal(k, 50000, seed=i) for i, k in enumerate(kinds)])  # (4, N)
    ref, _ = reference(fe, batch, 32000)
    assert torch.equal(chroma_features(batch[:, None], 32000), ref)


def test_stereo_is_averaged(fe):
    n = 3 * 32000 + 11
    left, right = signal("chords", n, seed=1), signal("chirp", n)
    other = torch.stack([signal("mix", n, seed=2), signal("noise", n, seed=3)])
    wav = torch.stack([torch.stack([left, right]), other])  # (2, 2, N)
    # the reference takes a batch of stereo melodies as a list of (C, N) arrays
    ref, ref_norm = reference(fe, [w.numpy() for w in wav], 32000)
    got, got_norm = ours(wav, 32000)
    assert torch.equal(got, ref)
    assert (got_norm - ref_norm).abs().max().item() <= 1e-4


RESAMPLED_CASES = [(sr, kind) for sr in (44100, 48000) for kind in ("chords", "chirp", "mix", "noise")] + [
    (sr, kind) for sr in (22050, 16000, 96000) for kind in ("mix", "noise")]


@pytest.mark.parametrize("sample_rate,kind", RESAMPLED_CASES)
def test_matches_reference_resampled(fe, sample_rate, kind):
    """Same resampling filter as the reference: identical one-hot on every frame, noise included."""
    n = int(4.3 * sample_rate) + 123  # not a multiple of either rate's resampling step
    x = signal(kind, n, sample_rate)[None]  # (1, N)
    ref, ref_norm = reference(fe, x, sample_rate)
    got, got_norm = ours(x, sample_rate)
    assert got.shape == ref.shape == (1, 1 + math.ceil(n * 32000 / sample_rate) // 4096, 12)
    assert torch.equal(got, ref), (got.argmax(-1) != ref.argmax(-1)).sum().item()
    assert (got_norm - ref_norm).abs().max().item() <= 1e-5


def test_stereo_batch_resampled(fe):
    # a (B, C, N) batch of stereo melodies at 44.1 kHz: the reference resamples, then averages the channels;
    # we average, then resample (linear both, so only float round-off differs)
    n = 3 * 44100 + 11
    wav = torch.stack([torch.stack([signal("noise", n, 44100, seed=1), signal("chords", n, 44100)]),
                       torch.stack([signal("mix", n, 44100, seed=2), signal("noise", n, 44100, seed=3)])])  # (2, 2, N)
    ref, ref_norm = reference(fe, wav, 44100)
    got, got_norm = ours(wav, 44100)
    assert got.shape == ref.shape == (2, 1 + math.ceil(n * 32000 / 44100) // 4096, 12)
    assert torch.equal(got, ref)
    assert (got_norm - ref_norm).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sample_rate", [44100, 48000])
def test_default_resampler_would_not_match(fe, sample_rate):
    """The noise cases above can fail: resampled with our default (Kaiser, cutoff 0.90) filter instead, noise
    agrees with the reference on far fewer frames (measured 55-77 %), the reason chroma asks for torchaudio's."""
    from musiclm_core.audio import resample

    n = int(4.3 * sample_rate) + 123
    x = signal("noise", n, sample_rate)
    ref, _ = reference(fe, x[None], sample_rate)
    got = chroma_features(resample(x, sample_rate, 32000), 32000)
    assert got.shape == ref.shape
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() < 0.9
