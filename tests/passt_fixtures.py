"""PaSST checkpoints and test sounds, offline, for the tests that need a PaSST (unit, parity, the CLI's KL metric).

Importable as `passt_fixtures` (tests/ is on sys.path, as for `fixtures`). `write_passt_checkpoint` writes a
release-style .pt file, a pickled state dict in hear21passt's exact layout (its key names and shapes, the unused
`head_dist` included; tests/parity/test_passt_parity.py checks them against hear21passt's own model), from our
model with random weights moved off their init: every parameter gets noise, the LayerNorms are no longer 1 / 0,
and the head is scaled up so that the label distributions are far from uniform and differ between sounds.
"""

from pathlib import Path

import torch


def random_passt(*, tiny: bool, seed: int = 0, noise: float = 0.05, head_scale: float = 8.0):
    """PaSST(PRESETS["tiny" or "20sec"]) in eval mode with `noise` * N(0, 1) added to every parameter (the
    LayerNorm weights around 1, their biases around 0) and the head's weights multiplied by `head_scale`."""
    from musiclm_core.passt import PRESETS, PaSST

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PaSST(PRESETS["tiny" if tiny else "20sec"]).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape))
            model.head.weight.mul_(head_scale)
    return model


def write_passt_checkpoint(path, *, tiny: bool, seed: int = 0) -> Path:
    """Write `random_passt(tiny=tiny, seed=seed)` as hear21passt's release files hold it (torch.save of a plain
    state dict) and return the file. `path` is a file, or a folder that gets the preset's release file name
    (musiclm_core.passt.CHECKPOINTS: "passt-tiny.pt", or the 20 s model's), so that
    `PaSST.from_pretrained(path, preset="tiny" or "20sec")` finds it either way."""
    from musiclm_core.convert.passt import to_reference
    from musiclm_core.passt import CHECKPOINTS

    model = random_passt(tiny=tiny, seed=seed)
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINTS["tiny" if tiny else "20sec"][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        c = model.config
        head_dist = (0.05 * torch.randn(c.num_labels, c.dim), 0.05 * torch.randn(c.num_labels))
    torch.save(to_reference(model, head_dist=head_dist), path)
    return path


def sounds(seconds: float, sample_rate: int = 32_000, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A few (1, N) test sounds of `seconds`, different enough for a tagger to tell apart: white noise, a
    decaying 440 Hz tone with harmonics, a click train (120 bpm) and a low drone with a slow tremolo."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sample_rate)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    tone = sum(torch.sin(2 * torch.pi * 440 * k * t) / k for k in (1, 2, 3)) * torch.exp(-(t % 0.5) * 6)
    since_click = torch.arange(n) % (sample_rate // 2)  # samples since the last click
    clicks = torch.exp(-since_click.double() / 30) * (since_click < 200)
    drone = torch.sin(2 * torch.pi * 55 * t) * (0.6 + 0.4 * torch.sin(2 * torch.pi * 0.7 * t))
    out = {"noise": 0.3 * torch.randn(n, generator=g, dtype=torch.float64), "tone": 0.3 * tone,
           "clicks": 0.8 * clicks, "drone": 0.5 * drone}
    return {k: v.float()[None] for k, v in out.items()}
