"""A VGGish checkpoint in torchvggish's layout, offline, for tests that need one (the CLI's `--embedding vggish`).

Importable as `vggish_fixtures` (tests/ is on sys.path, as for `fixtures`). The weights are random but not at
PyTorch's default init, under which the activations shrink layer by layer and every clip gets nearly the same
embedding: He-normal weights (std sqrt(2 / fan_in), which keeps the scale through the ReLUs) and N(0, 0.1)
biases. The PCA is fitted loosely to those weights (means and scale from the embeddings of a few noise clips,
a random rotation) so that the postprocessed values spread over 0..255 instead of sitting on the clip rails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


def he_init_(module: nn.Module, *, seed: int = 0) -> None:
    """Every Conv2d / Linear of `module`: weights N(0, 2 / fan_in), biases N(0, 0.1^2), drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))


def calibration_clips(seconds: float = 2.0, rate: int = 16_000) -> list[torch.Tensor]:
    """A few different (N,) clips: white noise at two levels, a chirp, a chord (seeded)."""
    g = torch.Generator().manual_seed(1)
    t = torch.arange(int(seconds * rate)) / rate
    return [0.3 * torch.randn(t.shape, generator=g), 0.01 * torch.randn(t.shape, generator=g),
            0.5 * torch.sin(2 * torch.pi * (200 + 1500 * t) * t),
            sum(0.2 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 277.2, 329.6))]


def fit_pca(embeddings: torch.Tensor, *, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvggish's PCA dict for (n, D) embeddings: pca_means their mean (D,), pca_eigen_vectors a random
    rotation divided by their overall standard deviation (D, D), float64 numpy arrays as in Google's .npz."""
    D = embeddings.shape[1]
    e = embeddings.double()
    rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed),
                                              dtype=torch.float64))
    scale = (e - e.mean(0)).std().clamp(min=1e-6)
    return {"pca_eigen_vectors": (rotation / scale).numpy(), "pca_means": e.mean(0).numpy()}


def write_vggish_checkpoint(folder: str | Path, *, tiny: bool, seed: int = 0) -> Path:
    """Write torchvggish's two files, vggish-10086976.pth (the VGG state dict: `features.{0,3,6,8,11,13}`,
    `embeddings.{0,2,4}`, torch tensors) and vggish_pca_params-970ea276.pth (`pca_eigen_vectors` (128, 128),
    `pca_means` (128,), numpy float64), for the "tiny" or "official" preset, into `folder`; returns `folder`.
    `VGGish.from_pretrained(folder)` loads them."""
    from musiclm_core.convert import vggish as convert
    from musiclm_core.vggish import PRESETS, VGGish

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = VGGish(PRESETS["tiny" if tiny else "official"]).eval()
    he_init_(model, seed=seed)
    with torch.inference_mode():
        embeddings = torch.cat([model.embed(clip, 16_000, convention="fadtk") for clip in calibration_clips()])
    weights, _ = convert.torchvggish_state(model)
    torch.save(weights, folder / convert.WEIGHTS_FILE)
    torch.save(fit_pca(embeddings, seed=seed), folder / convert.PCA_FILE)
    return folder
