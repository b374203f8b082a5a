"""Training objectives: MusicGen's teacher-forced cross-entropy over delayed codes, and the diffusion losses.

MusicGen (Copet et al. 2023, section 2.2; audiocraft `MusicGenSolver._compute_cross_entropy`): the frames are laid
out with the delay pattern (`delay.apply_delay`), the model reads steps 0 .. S-2 and predicts steps 1 .. S-1 of
every codebook row, and the loss is the cross-entropy of each codebook over the slots that hold a real frame,
averaged over the codebooks. Slots holding the special id (the BOS column, the delay padding, frames past the end
of a shorter clip) are never targets: the heads have `card` outputs and the special id is not one of them.

    steps   row 0:  P  a0 a1 a2 P  P         inputs  = steps[:, :, :-1]
            row 1:  P  P  b0 b1 b2 P         targets = steps[:, :, 1:]
            row 2:  P  P  P  c0 c1 c2        mask    = targets != P
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

from musiclm_core.delay import apply_delay


def delayed_inputs(codes: Tensor, delays: Sequence[int], special: int) -> tuple[Tensor, Tensor]:
    """(inputs, targets), both (B, K, S - 1) with S = T + max(delays) + 1, for frames (B, K, T).

    Frames may hold `special` past the end of a clip shorter than the batch's T: those slots are not targets.
    """
    steps = apply_delay(codes, delays, special)  # (B, K, S)
    return steps[:, :, :-1], steps[:, :, 1:]


def codebook_cross_entropy(logits: Tensor, targets: Tensor, special: int) -> tuple[Tensor, Tensor]:
    """(loss, per-codebook losses (K,)) of logits (B, K, S, card) for targets (B, K, S); slots holding `special`
    are masked. Each codebook's loss is the mean over its real targets (fp32); the loss is their mean."""
    B, K, S, V = logits.shape
    if tuple(targets.shape) != (B, K, S):
        raise ValueError(f"targets must be (B, K, S) = {(B, K, S)} to go with logits {tuple(logits.shape)}, got "
                         f"{tuple(targets.shape)}")
    mask = targets != special  # (B, K, S)
    count = mask.sum(dim=(0, 2))  # (K,)
    if bool((count == 0).any()):
        raise ValueError(f"codebook(s) {(count == 0).nonzero().flatten().tolist()} have no target in this batch "
                         f"(every slot is the special id {special})")
    safe = targets.masked_fill(~mask, 0)  # any class: those slots are weighted 0
    nll = F.cross_entropy(logits.float().reshape(-1, V), safe.reshape(-1), reduction="none").view(B, K, S)
    per_codebook = (nll * mask).sum(dim=(0, 2)) / count  # (K,)
    return per_codebook.mean(), per_codebook


def diffusion_target(x0: Tensor, noise: Tensor, timesteps: Tensor, schedule, prediction_type: str) -> Tensor:
    """What the UNet learns to output: the noise ("epsilon") or the velocity ("v_prediction",
    alpha_t * noise - sigma_t * x0, Salimans & Ho 2022) of the checkpoint's schedule."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedule.get_velocity(x0, noise, timesteps)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def diffusion_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error in fp32 (the simple loss of Ho et al. 2020, as diffusers' training examples)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(prediction.float(), target.float())
