"""The beat tracker (train/beats.py) and MusicLDM's beat-synchronous mixup (train/mixup.py), on synthetic click
tracks at known tempi: tempo within 1 BPM, beats within one hop (10 ms), mixed beats aligned within one hop."""

import math

import numpy as np
import pytest
import torch

from musiclm_core.train import beats, mixup

SR = 16000  # MusicLDM's audio rate
HOP = beats.HOP_SECONDS


def click_track(bpm, first, seconds=8.0, freq=1000.0, noise=0.01, seed=0):
    """(N,) decaying 1 kHz clicks every 60 / bpm s from `first` s on, with a little noise; and the click times."""
    n = int(seconds * SR)
    wav = torch.zeros(n)
    t = torch.arange(int(0.02 * SR)) / SR
    click = torch.sin(2 * math.pi * freq * t) * torch.exp(-t / 0.004)
    times = []
    s = first
    while s * SR + len(click) < n:
        i = round(s * SR)
        wav[i: i + len(click)] += click
        times.append(s)
        s += 60 / bpm
    g = torch.Generator().manual_seed(seed)
    return wav + noise * torch.randn(n, generator=g), torch.tensor(times, dtype=torch.float64)


def nearest(times, reference):
    return (times[:, None] - reference[None]).abs().min(dim=1).values  # (N,)


@pytest.mark.parametrize("bpm, first", [(90, 0.37), (120, 0.05), (150, 0.61), (75, 0.2)])
def test_tracker_finds_tempo_and_beats(bpm, first):
    wav, truth = click_track(bpm, first)
    found = beats.beat_track(wav, SR)
    assert abs(found.bpm - bpm) < 1.0
    assert len(found.times) == len(truth)
    assert nearest(found.times, truth).max() <= HOP


def test_tracker_errors():
    with pytest.raises(ValueError, match=r"audio must be \(N,\) or \(C, N\) with N >= 256"):
        beats.onset_envelope(torch.zeros(100), SR)
    with pytest.raises(ValueError, match="too few to estimate a tempo"):
        beats.estimate_tempo(torch.rand(20), 100.0)


def test_tempo_groups_are_three_bpm_wide():
    assert mixup.tempo_group(120.0) == mixup.tempo_group(122.9) == 40
    assert mixup.tempo_group(123.0) == 41


def test_beat_synchronous_mixup_aligns_the_beats():
    anchor, anchor_times = click_track(120, 0.30, freq=1000.0, seed=1)
    partner, partner_times = click_track(120, 0.55, freq=3000.0, seed=2)  # same tempo bin, off by 0.25 s
    mixed = mixup.beat_synchronous_mixup(anchor, partner, SR, 0.5)
    found = beats.beat_track(mixed, SR)
    assert abs(found.bpm - 120) < 1.0
    assert nearest(found.times, anchor_times).max() <= HOP  # the mixture's beats are the anchor's
    # and every onset of the mixture sits on an anchor beat: the partner's clicks moved onto them
    env = beats.onset_envelope(mixed, SR)
    peaks = ((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] > 0.3)).nonzero().flatten() + 1
    assert nearest(peaks.double() * HOP, anchor_times).max() <= HOP
    # a plain mix (no alignment) has onsets a quarter of a beat away from the anchor's: the check listens
    naive = 0.5 * anchor + 0.5 * partner
    env = beats.onset_envelope(naive, SR)
    peaks = ((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] > 0.3)).nonzero().flatten() + 1
    assert nearest(peaks.double() * HOP, anchor_times).max() > 0.2


def test_mixup_transform_pairs_within_a_tempo_group():
    wavs = [click_track(bpm, first, seconds=6.0, seed=i)[0] for i, (bpm, first) in
            enumerate([(121, 0.1), (122, 0.4), (90, 0.2), (150, 0.3)])]
    transform = mixup.BeatMixup(wavs, SR, p=1.0)
    assert transform.partners(0) == [1] and transform.partners(2) == []
    out, partner, lam = transform(0, np.random.default_rng(0))
    assert partner == 1 and 0 < lam < 1 and out.shape == wavs[0].shape
    again = transform(0, np.random.default_rng(0))
    assert torch.equal(again[0], out) and again[2] == lam  # reproducible from the generator
    assert transform(2, np.random.default_rng(0))[1] is None  # no partner at 90 BPM: the clip itself
    lams = mixup.sample_lambda(np.random.default_rng(0), 20000)
    assert abs(lams.mean() - 0.5) < 0.01 and abs(lams.var() - 1 / 44) < 0.002  # Beta(5, 5): var = 1/44


def test_latent_mixup_mixes_only_the_selected_items():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 8, 4, 5, generator=g), torch.randn(3, 8, 4, 5, generator=g)
    lam = torch.tensor([0.3, 0.6, 0.9])
    selected = torch.tensor([True, False, True])
    z = mixup.latent_mixup(z1, z2, lam, selected)
    assert torch.allclose(z[0], 0.3 * z1[0] + 0.7 * z2[0], atol=1e-6)
    assert torch.equal(z[1], z1[1])
    assert torch.allclose(z[2], 0.9 * z1[2] + 0.1 * z2[2], atol=1e-6)
    with pytest.raises(ValueError, match="latents to mix must have one shape"):
        mixup.latent_mixup(z1, z2[:, :4], lam, selected)


def test_align_shifts_and_pads():
    wav = torch.arange(10.0)
    assert torch.equal(mixup.align(0.3, wav, 0.1, 10, 12), torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.0]))
    assert torch.equal(mixup.align(0.0, wav, 0.2, 10, 5), torch.tensor([2, 3, 4, 5, 6.0]))
