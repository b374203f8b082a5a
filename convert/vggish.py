"""torchvggish's two files -> `VGGish`.

Source: harritaylor/torchvggish release v0.1, what `torchvggish.vggish()` (PyPI 0.2, and the torch hub entry
point `harritaylor/torchvggish` that fadtk and frechet-audio-distance load) downloads into
`torch.hub.get_dir()/checkpoints`:

* vggish-10086976.pth: the state dict of its `VGG` module, a port of Google's TF checkpoint: `features` is an
  nn.Sequential of Conv2d / ReLU / MaxPool2d (the convs at indices 0, 3, 6, 8, 11, 13), `embeddings` one of
  Linear / ReLU (the Linears at 0, 2, 4).
* vggish_pca_params-970ea276.pth: {"pca_eigen_vectors": (128, 128), "pca_means": (128,)} (Google's
  vggish_pca_params.npz; torchvggish reads the values with `torch.as_tensor`, so they may be numpy arrays, and
  reshapes the means to a column, so (128, 1) is accepted too).

The widths are read from the tensors' shapes (the "tiny" test checkpoints use the same layout); the block
structure is VGGish's (`CONVS_PER_BLOCK`), and anything else is a key error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from musiclm_core.hub import CheckpointError
from musiclm_core.convert.keys import build, rename
from musiclm_core.vggish import VGGish, VGGishConfig, default_folder

WEIGHTS_FILE = "vggish-10086976.pth"
PCA_FILE = "vggish_pca_params-970ea276.pth"
RELEASE = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
WEIGHTS_URL = RELEASE + WEIGHTS_FILE
PCA_URL = RELEASE + PCA_FILE

# (their key, our key). `features.{index}`: the position of each Conv2d in their nn.Sequential, which interleaves
# ReLU (no weights) and MaxPool2d (none) modules: conv 0, relu 1, pool 2 | conv 3, relu 4, pool 5 | conv 6,
# relu 7, conv 8, relu 9, pool 10 | conv 11, relu 12, conv 13, relu 14, pool 15.
_CONVS = {0: "blocks.0.0", 3: "blocks.1.0", 6: "blocks.2.0", 8: "blocks.2.1", 11: "blocks.3.0", 13: "blocks.3.1"}
_LINEARS = {0: "fc1", 2: "fc2", 4: "embedding"}  # embeddings: Linear 0, ReLU 1, Linear 2, ReLU 3, Linear 4, ReLU 5
TABLE = [
    *[(f"features.{i}.{p}", f"{ours}.{p}") for i, ours in _CONVS.items() for p in ("weight", "bias")],
    *[(f"embeddings.{i}.{p}", f"{ours}.{p}") for i, ours in _LINEARS.items() for p in ("weight", "bias")],
]
PCA_TABLE = [
    ("pca_eigen_vectors", "pca_matrix"),
    ("pca_means", "pca_means"),
]


def checkpoint_files(path: str | os.PathLike | None = None,
                     pca: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(weights file, PCA file): `path` None -> torch hub's checkpoints folder; a folder -> the two files in it;
    a file -> that file, and `pca` (default: torchvggish's PCA file next to it). A missing file is an error
    naming every path looked at and the release URLs."""
    if path is None:
        folder = default_folder()
        weights = folder / WEIGHTS_FILE
    else:
        given = Path(path).expanduser()
        folder = given.parent if given.is_file() else given  # a path that does not exist is taken as a folder
        weights = given if given.is_file() else given / WEIGHTS_FILE
    pca_path = Path(pca).expanduser() if pca is not None else folder / PCA_FILE
    missing = [p for p in (weights, pca_path) if not p.is_file()]
    if missing:
        where = ("torch hub's checkpoints folder (torch.hub.get_dir()/checkpoints)" if path is None
                 else str(path) if Path(path).expanduser().exists() else f"{path} (no such file or folder)")
        lines = [f"VGGish checkpoint not found in {where}: missing " + ", ".join(str(p) for p in missing),
                 "These are the files torchvggish downloads (release v0.1 of harritaylor/torchvggish). Fetch them "
                 "where the network is reachable:"]
        lines += [f"    curl -L -o {folder / name} {url}" for name, url in ((WEIGHTS_FILE, WEIGHTS_URL),
                                                                             (PCA_FILE, PCA_URL))]
        lines.append(f"and pass that folder (or leave them in {default_folder()}, where torchvggish puts them).")
        raise CheckpointError("\n".join(lines))
    return weights, pca_path


def _numpy_globals() -> list:
    """What unpickling numpy arrays needs: their reconstructor (under numpy 2's and numpy 1's module names), the
    array type and dtype. Data constructors only; nothing that runs code."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    dtype_classes = [type(np.dtype(t)) for t in ("float16", "float32", "float64")]  # numpy >= 1.25 pickles these
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtype_classes]


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A .pth dict of tensors or numpy arrays, read with weights_only=True -> {key: tensor}; anything else is an
    error naming the file and the key."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip / torch file), OSError
        raise CheckpointError(f"{path} is not a torchvggish checkpoint that loads with weights_only=True "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict")
    out = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{path}: {key} is {what}, not a floating-point tensor")
        out[key] = value
    return out


def column_means(pca: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pca_means (D, 1), the column torchvggish makes of it, -> (D,); (D,) stays."""
    means = pca.get("pca_means")
    if means is not None and means.dim() == 2 and means.shape[1] == 1:
        pca = {**pca, "pca_means": means[:, 0]}
    return pca


def config_from_state(state: dict[str, torch.Tensor], *, source: str) -> VGGishConfig:
    """The widths of the blocks and fc layers, from the shapes of our renamed tensors."""
    needed = [f"{ours}.weight" for ours in (*_CONVS.values(), *_LINEARS.values())]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing keys (after renaming): {', '.join(missing)}")
    first = [_CONVS[i] for i in (0, 3, 6, 11)]  # the first conv of each block sets its width
    try:
        return VGGishConfig(channels=tuple(state[f"{k}.weight"].shape[0] for k in first),
                            fc_dims=(state["fc1.weight"].shape[0], state["fc2.weight"].shape[0]),
                            embedding_dim=state["embedding.weight"].shape[0])
    except ValueError as err:
        raise CheckpointError(f"{source}: unsupported VGGish shapes: {err}") from err


def load_torchvggish(weights: dict[str, torch.Tensor], pca: dict[str, torch.Tensor], *, source: str,
                     pca_source: str, dtype: torch.dtype = torch.float32) -> VGGish:
    """A VGGish from torchvggish's two state dicts (tensors)."""
    state = rename(weights, TABLE, source=source)
    state.update(rename(column_means(pca), PCA_TABLE, source=pca_source))
    config = config_from_state(state, source=source)
    return build(lambda: VGGish(config), state, source=f"{source} + {pca_source}", dtype=dtype)


def load_torchvggish_files(weights_file: Path, pca_file: Path, *, dtype: torch.dtype = torch.float32) -> VGGish:
    return load_torchvggish(read_pth(weights_file), read_pth(pca_file), source=str(weights_file),
                            pca_source=str(pca_file), dtype=dtype)


def torchvggish_state(model: VGGish) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our model in torchvggish's layout: (the VGG state dict, the PCA dict), the inverse of `load_torchvggish`
    (the PCA as tensors, pca_means (D,))."""
    ours = model.state_dict()
    weights = {theirs: ours[our].detach().clone() for theirs, our in TABLE}
    pca = {theirs: ours[our].detach().clone() for theirs, our in PCA_TABLE}
    return weights, pca
