"""An onset-based beat tracker for MusicLDM's beat-synchronous mixup (specs/ldm.md §16).

MusicLDM ran Beat Transformer (a trained network) over its training set; what the mixup needs from it is the
tempo (to group tracks in 3-BPM bins) and the beat times (to align two tracks before mixing). This is the classic
signal-processing pipeline of Ellis (2007), "Beat Tracking by Dynamic Programming", written small:

    wav --STFT (n_fft 256, hop 10 ms)--> log magnitude --spectral flux--> onset strength envelope
        --autocorrelation x log-normal tempo prior (around 120 BPM)--> tempo
        --dynamic programming: onset strength + penalty for beat gaps off the period--> beat frames

It knows nothing about downbeats (bar starts): alignment uses the first beat, or downbeats a caller supplies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

N_FFT = 256
HOP_SECONDS = 0.01


@dataclass
class Beats:
    bpm: float
    times: Tensor        # (N,) beat times in seconds
    hop_seconds: float   # the tracker's resolution


def onset_envelope(wav: Tensor, sample_rate: int, *, hop_seconds: float = HOP_SECONDS) -> Tensor:
    """(N,) or (C, N) audio -> (T,) onset strength per hop: the positive spectral flux of the log magnitude,
    its local mean removed, scaled to a maximum of 1 (all zeros for silence).

    Frame t is reported at time t * hop: the STFT is centred, and the frame is shifted back by the quarter window
    (a Hann window's energy rises fastest there) so that a click at time s peaks at the frame nearest s.
    """
    if wav.dim() == 2:
        wav = wav.mean(0)
    if wav.dim() != 1 or wav.numel() < N_FFT:
        raise ValueError(f"audio must be (N,) or (C, N) with N >= {N_FFT}, got {tuple(wav.shape)}")
    hop = max(1, round(hop_seconds * sample_rate))
    window = torch.hann_window(N_FFT, dtype=torch.float32)
    spec = torch.stft(wav.float(), N_FFT, hop, window=window, center=True, return_complex=True).abs()  # (F, T)
    log_mag = torch.log1p(100.0 * spec)
    flux = F.relu(log_mag[:, 1:] - log_mag[:, :-1]).sum(0)  # (T-1,): frame t vs t-1
    flux = torch.cat([flux.new_zeros(1), flux])  # (T,)
    lag = round(N_FFT / 4 / hop)
    if lag:
        flux = torch.cat([flux[lag:], flux.new_zeros(lag)])
    local = F.avg_pool1d(flux[None, None], 31, stride=1, padding=15, count_include_pad=False)[0, 0]
    env = F.relu(flux - local)
    peak = env.max()
    return env / peak if peak > 0 else env


def estimate_tempo(envelope: Tensor, frame_rate: float, *, min_bpm: float = 40.0, max_bpm: float = 240.0,
                   prior_bpm: float = 120.0, prior_octaves: float = 1.0) -> float:
    """Tempo in BPM: the autocorrelation lag of the envelope with the most weight under a log-normal prior
    (centre prior_bpm, width prior_octaves), refined by a parabola through its neighbours."""
    T = envelope.numel()
    env = envelope.double() - envelope.double().mean()
    spectrum = torch.fft.rfft(env, n=2 * T)
    acf = torch.fft.irfft(spectrum.abs() ** 2, n=2 * T)[:T]  # (T,) lags 0 .. T-1
    lo, hi = max(1, int(60 * frame_rate / max_bpm)), min(T - 2, int(math.ceil(60 * frame_rate / min_bpm)))
    if hi <= lo:
        raise ValueError(f"{T} onset frames are too few to estimate a tempo between {min_bpm} and {max_bpm} BPM")
    lags = torch.arange(lo, hi + 1, dtype=torch.float64)
    bpm = 60 * frame_rate / lags
    prior = torch.exp(-0.5 * (torch.log2(bpm / prior_bpm) / prior_octaves) ** 2)
    score = acf[lo: hi + 1] * prior
    i = int(score.argmax())
    lag = float(lags[i])
    if 0 < i < len(lags) - 1:  # parabolic interpolation of the ACF peak
        a, b, c = (float(acf[lo + i + d]) for d in (-1, 0, 1))
        denominator = a - 2 * b + c
        if denominator < 0:
            lag += 0.5 * (a - c) / denominator
    return 60 * frame_rate / lag


def track_beats(envelope: Tensor, frame_rate: float, bpm: float, *, tightness: float = 100.0) -> Tensor:
    """Beat frames (N,) int64: the sequence that maximises the onset strength at the beats minus
    tightness * log(gap / period)^2 for each gap (Ellis 2007), by dynamic programming over the frames."""
    period = 60 * frame_rate / bpm
    T = envelope.numel()
    env = envelope.double()
    score = env.clone()
    back = torch.full((T,), -1, dtype=torch.int64)
    lo, hi = max(1, int(round(period / 2))), int(round(2 * period))
    gaps = torch.arange(lo, hi + 1, dtype=torch.float64)
    penalty = -tightness * torch.log(gaps / period) ** 2  # (G,)
    for t in range(lo, T):
        prev = t - gaps.long()  # (G,)
        ok = prev >= 0
        candidates = torch.where(ok, score[prev.clamp(min=0)] + penalty, torch.tensor(-math.inf, dtype=torch.float64))
        j = int(candidates.argmax())
        if candidates[j] > 0:
            score[t] = env[t] + candidates[j]
            back[t] = prev[j]
    # end on the best-scoring frame within the last period that is itself an onset
    tail = max(0, T - int(math.ceil(period)))
    last = tail + int((score[tail:] * (env[tail:] > 0.1 * env.max())).argmax())
    beats = [last]
    while back[beats[-1]] >= 0:
        beats.append(int(back[beats[-1]]))
    beats = torch.tensor(beats[::-1], dtype=torch.int64)
    # The chain may run on into the weak frames before the music starts or after it stops: trim leading and
    # trailing beats weaker than half the RMS strength of the beats (as librosa's beat tracker trims).
    strength = env[beats]
    strong = (strength >= 0.5 * strength.pow(2).mean().sqrt()).nonzero().flatten()
    return beats[int(strong[0]): int(strong[-1]) + 1]


def beat_track(wav: Tensor, sample_rate: int, *, hop_seconds: float = HOP_SECONDS) -> Beats:
    """Tempo and beat times of (N,) or (C, N) audio."""
    env = onset_envelope(wav, sample_rate, hop_seconds=hop_seconds)
    hop = max(1, round(hop_seconds * sample_rate)) / sample_rate
    bpm = estimate_tempo(env, 1 / hop)
    frames = track_beats(env, 1 / hop, bpm)
    return Beats(bpm=bpm, times=frames.double() * hop, hop_seconds=hop)
