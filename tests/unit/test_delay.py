"""The delay pattern: the diagram of delay.py, round trips, stereo pairs, bad input."""

import pytest
import torch

from musiclm_core.delay import apply_delay, num_steps, undo_delay

P = 2048


def test_diagram_example():
    codes = torch.arange(16).view(1, 4, 4)  # row k holds 4k .. 4k+3
    steps = apply_delay(codes, [0, 1, 2, 3], P)
    expected = torch.tensor([
        [P, 0, 1, 2, 3, P, P, P],
        [P, P, 4, 5, 6, 7, P, P],
        [P, P, P, 8, 9, 10, 11, P],
        [P, P, P, P, 12, 13, 14, 15],
    ])
    assert torch.equal(steps[0], expected)


@pytest.mark.parametrize("delays", [[0, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0], [2, 0, 1]])
@pytest.mark.parametrize("T", [0, 1, 5, 37])
def test_round_trip(delays, T):
    codes = torch.randint(0, 2048, (3, len(delays), T))
    steps = apply_delay(codes, delays, P)
    assert steps.shape == (3, len(delays), num_steps(T, delays)) == (3, len(delays), T + max(delays) + 1)
    assert torch.equal(undo_delay(steps, delays), codes)
    # every slot not holding a frame holds the special id
    assert int((steps == P).sum()) == steps.numel() - codes.numel()


def test_stereo_pairs_share_their_delay():
    codes = torch.randint(0, 2048, (1, 8, 6))
    steps = apply_delay(codes, [0, 0, 1, 1, 2, 2, 3, 3], P)
    for pair in range(4):
        left, right = steps[0, 2 * pair], steps[0, 2 * pair + 1]
        assert torch.equal(left == P, right == P)  # same columns carry frames
        assert int(left[1 + pair]) == int(codes[0, 2 * pair, 0])  # frame 0 of pair p at step 1 + p


def test_bad_input():
    with pytest.raises(ValueError, match="4 codebooks but 3 delays"):
        apply_delay(torch.zeros(1, 4, 5, dtype=torch.long), [0, 1, 2], P)
    with pytest.raises(ValueError, match=r"\(B, K, T\)"):
        apply_delay(torch.zeros(4, 5, dtype=torch.long), [0, 1, 2, 3], P)
    with pytest.raises(ValueError, match=">= 0"):
        apply_delay(torch.zeros(1, 2, 5, dtype=torch.long), [0, -1], P)
    with pytest.raises(ValueError, match="cannot hold any frame"):
        undo_delay(torch.zeros(1, 4, 3, dtype=torch.long), [0, 1, 2, 3])
