"""The codebook delay pattern of MusicGen (Copet et al. 2023, section 2.2): two pure functions.

MusicGen predicts the K codebooks of one EnCodec frame in one step, but codebook k is shifted right by a delay
d_k, so that when the model emits codebook k of frame t it has already seen codebooks < k of that frame. The
sequence starts with one all-special column (the BOS step), and every slot not covered by a frame holds the
special id `pad` (2048 for the official checkpoints):

    frames (K=4, T=4)        steps (S = T + max(d) + 1 = 8), delays [0, 1, 2, 3]

    row 0: a0 a1 a2 a3       row 0 (d=0): P  a0 a1 a2 a3 P  P  P
    row 1: b0 b1 b2 b3       row 1 (d=1): P  P  b0 b1 b2 b3 P  P
    row 2: c0 c1 c2 c3  -->  row 2 (d=2): P  P  P  c0 c1 c2 c3 P
    row 3: e0 e1 e2 e3       row 3 (d=3): P  P  P  P  e0 e1 e2 e3

Frame t of row k sits at step 1 + t + d_k. Stereo checkpoints interleave the channels' codebooks as rows
[L0, R0, L1, R1, ...] and give both rows of a pair the same delay: [0, 0, 1, 1, 2, 2, 3, 3].

This is the layout transformers builds with `build_delay_pattern_mask` (its `max_length` is our S, counting the
BOS column) and audiocraft's `DelayedPatternProvider` (one special step first, length T + max delay + 1).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _check(x: Tensor, delays: Sequence[int], what: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{what} must be (B, K, T), got shape {tuple(x.shape)}")
    if len(delays) != x.shape[1]:
        raise ValueError(f"{what} has {x.shape[1]} codebooks but {len(delays)} delays were given: {list(delays)}")
    if any(d < 0 for d in delays):
        raise ValueError(f"delays must be >= 0, got {list(delays)}")


def num_steps(num_frames: int, delays: Sequence[int]) -> int:
    """S, the number of steps that hold `num_frames` frames: one BOS step, the frames and the largest delay."""
    return num_frames + max(delays) + 1


def apply_delay(codes: Tensor, delays: Sequence[int], pad: int) -> Tensor:
    """(B, K, T) frames -> (B, K, S) steps with S = T + max(delays) + 1; uncovered slots hold `pad` (diagram above)."""
    _check(codes, delays, "codes")
    B, K, T = codes.shape
    steps = codes.new_full((B, K, num_steps(T, delays)), pad)
    for k, d in enumerate(delays):
        steps[:, k, 1 + d: 1 + d + T] = codes[:, k]
    return steps


def undo_delay(steps: Tensor, delays: Sequence[int]) -> Tensor:
    """(B, K, S) steps -> (B, K, T) frames with T = S - max(delays) - 1: the inverse of `apply_delay`."""
    _check(steps, delays, "steps")
    B, K, S = steps.shape
    T = S - max(delays) - 1
    if T < 0:
        raise ValueError(f"{S} steps cannot hold any frame with delays {list(delays)} (need at least "
                         f"{max(delays) + 1})")
    return torch.stack([steps[:, k, 1 + d: 1 + d + T] for k, d in enumerate(delays)], dim=1)  # (B, K, T)
