"""MusicLDM's beat-synchronous mixup (Chen et al. 2023, arXiv 2308.01546; specs/ldm.md §16) as dataset transforms.

    tempo grouping   partners come from the same 3-BPM bin: group = int(bpm // 3) (MusicLDM's
                     `process_mixup_dict`)
    alignment        the partner is shifted so that its first downbeat (here: its first beat, or a downbeat the
                     caller gives) falls on the anchor's, then cropped / zero-padded to the anchor's length
    audio mixup      x = lam * x1 + (1 - lam) * x2 on the aligned waveforms, lam ~ Beta(5, 5) (BAM)
    latent mixup     z = lam * z1 + (1 - lam) * z2 on the VAE latents of the two aligned clips, for items picked
                     with probability p (BLM, MusicLDM's `get_input` with `latent_mixup`)

The beats come from `beats.beat_track` (an onset-based tracker of our own) unless given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from musiclm_core.train.beats import Beats, beat_track

BETA = 5.0  # lam ~ Beta(5, 5): MusicLDM's latent mixup, and the paper's audio mixup


def tempo_group(bpm: float) -> int:
    """MusicLDM's tempo bin: tracks whose BPM // 3 agree are mixup partners."""
    return int(bpm // 3)


def sample_lambda(rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
    return rng.beta(BETA, BETA, size=size)


def shift(wav: Tensor, samples: int) -> Tensor:
    """(..., N) audio delayed by `samples` (advanced when negative), zero-filled, same length."""
    N = wav.shape[-1]
    out = torch.zeros_like(wav)
    if abs(samples) >= N:
        return out
    if samples >= 0:
        out[..., samples:] = wav[..., : N - samples]
    else:
        out[..., : N + samples] = wav[..., -samples:]
    return out


def align(anchor_first: float, partner: Tensor, partner_first: float, sample_rate: int, length: int) -> Tensor:
    """The partner (..., M) shifted so that its first (down)beat at `partner_first` s lands at `anchor_first` s,
    cut or zero-padded to `length` samples."""
    M = partner.shape[-1]
    if M < length:
        partner = torch.cat([partner, partner.new_zeros(*partner.shape[:-1], length - M)], dim=-1)
    return shift(partner, round((anchor_first - partner_first) * sample_rate))[..., :length]


def beat_synchronous_mixup(anchor: Tensor, partner: Tensor, sample_rate: int, lam: float, *,
                           anchor_beats: Beats | None = None, partner_beats: Beats | None = None,
                           anchor_downbeat: float | None = None, partner_downbeat: float | None = None) -> Tensor:
    """lam * anchor + (1 - lam) * aligned partner, (..., N) like the anchor. The first downbeats (default: the
    first tracked beats) are aligned."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if anchor_downbeat is None:
        anchor_beats = anchor_beats or beat_track(anchor, sample_rate)
        anchor_downbeat = float(anchor_beats.times[0])
    if partner_downbeat is None:
        partner_beats = partner_beats or beat_track(partner, sample_rate)
        partner_downbeat = float(partner_beats.times[0])
    aligned = align(anchor_downbeat, partner, partner_downbeat, sample_rate, anchor.shape[-1])
    return lam * anchor + (1 - lam) * aligned


def latent_mixup(z1: Tensor, z2: Tensor, lam: Tensor, selected: Tensor) -> Tensor:
    """(B, ...) latents of aligned pairs -> lam * z1 + (1 - lam) * z2 for the selected items, z1 elsewhere.
    lam, selected: (B,)."""
    if z1.shape != z2.shape:
        raise ValueError(f"latents to mix must have one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    shape = (-1,) + (1,) * (z1.dim() - 1)
    lam = lam.to(z1.dtype).view(shape)
    mixed = lam * z1 + (1 - lam) * z2
    return torch.where(selected.view(shape), mixed, z1)


class BeatMixup:
    """A dataset transform: item i's waveform, mixed with probability `p` with a partner of the same tempo bin.

    wavs: the clips (C, N) at `sample_rate`; their beats are tracked once here. `__call__(i, rng)` returns
    (waveform, partner index or None, lam); with a numpy Generator seeded per step, draws are reproducible.
    """

    def __init__(self, wavs: Sequence[Tensor], sample_rate: int, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"mixup probability must be in [0, 1], got {p}")
        self.wavs, self.sample_rate, self.p = list(wavs), sample_rate, p
        self.beats = [beat_track(w, sample_rate) for w in self.wavs]
        self.groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.beats):
            self.groups.setdefault(tempo_group(b.bpm), []).append(i)

    def partners(self, i: int) -> list[int]:
        return [j for j in self.groups[tempo_group(self.beats[i].bpm)] if j != i]

    def __call__(self, i: int, rng: np.random.Generator) -> tuple[Tensor, int | None, float]:
        candidates = self.partners(i)
        if not candidates or rng.random() >= self.p:
            return self.wavs[i], None, 1.0
        j = candidates[int(rng.integers(len(candidates)))]
        lam = float(sample_lambda(rng))
        mixed = beat_synchronous_mixup(self.wavs[i], self.wavs[j], self.sample_rate, lam,
                                       anchor_beats=self.beats[i], partner_beats=self.beats[j])
        return mixed, j, lam
