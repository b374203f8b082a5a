"""PaSST release checkpoints (the .pt files hear21passt downloads from kkoutini/PaSST's GitHub releases) -> `PaSST`.

The files hold a pickled state dict of hear21passt's `models/passt.py::PaSST` (timm's ViT names, plus PaSST's
separate frequency / time position tables), which hear21passt loads with `strict=True`; the architecture is not
in the file, so the preset says it (`musiclm_core.passt.PRESETS`), and a file of another shape fails with every
mis-shaped key named (a 10 s model's 99 time positions against the 20 s preset's 200, say).

Surgery, as hear21passt's `checkpoint_filter_fn` does it: a DeiT-style `{"model": state_dict}` wrapper is
unwrapped, and a patch embedding stored as a linear layer (their models from before the conv patchifier) is
reshaped into the conv kernel. ImageNet ViT/DeiT files (one `pos_embed`, which hear21passt would resample into
PaSST's tables to start training) are refused: they are not AudioSet taggers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from musiclm_core import hub
from musiclm_core.convert.keys import build, rename
from musiclm_core.passt import PaSST, PaSSTConfig

_BLOCK = "blocks.{i}."
TABLE = [
    ("patch_embed.proj.weight", "patch_embed.weight"),
    ("patch_embed.proj.bias", "patch_embed.bias"),
    ("freq_new_pos_embed", "freq_pos"),         # (1, D, 12, 1)
    ("time_new_pos_embed", "time_pos"),         # (1, D, 1, 99 / 200 / 300)
    ("new_pos_embed", "token_pos"),             # (1, 2, D): positions of the cls and distillation tokens
    ("cls_token", "cls_token"),
    ("dist_token", "dist_token"),
    *[(_BLOCK + theirs + p, _BLOCK + ours + p)
      for theirs, ours in (("norm1", "norm1"), ("attn.qkv", "qkv"), ("attn.proj", "proj"), ("norm2", "norm2"),
                           ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
      for p in (".weight", ".bias")],
    ("norm.weight", "norm.weight"),
    ("norm.bias", "norm.bias"),
    ("head.0.weight", "head_norm.weight"),      # head = Sequential(LayerNorm, Linear)
    ("head.0.bias", "head_norm.bias"),
    ("head.1.weight", "head.weight"),
    ("head.1.bias", "head.bias"),
]

DROPPED = [
    # The distillation head: hear21passt's PaSST.forward averages the cls and distillation *tokens* and applies
    # `head` to the average; `head_dist` is trained but never called at inference.
    "head_dist.weight",
    "head_dist.bias",
]


def unwrap(obj: object, *, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: the file itself, or its "model" entry (DeiT's wrapper)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise hub.CheckpointError(f"{source}: expected a state dict of tensors (hear21passt's PaSST), got "
                                  f"{type(obj).__name__}")
    if "pos_embed" in obj and "time_new_pos_embed" not in obj:
        raise hub.CheckpointError(f"{source}: an ImageNet ViT/DeiT checkpoint (one 'pos_embed', no PaSST "
                                  f"frequency/time positions), not a PaSST AudioSet tagger")
    return obj


def conv_patch_weight(state: dict[str, torch.Tensor], config: PaSSTConfig) -> dict[str, torch.Tensor]:
    """A patch embedding stored as a linear layer (D, 16 * 16) -> the conv kernel (D, 1, 16, 16)."""
    key = "patch_embed.proj.weight"
    weight = state.get(key)
    if weight is None or weight.dim() == 4:
        return state
    p = config.patch_size
    if weight.numel() != config.dim * p * p:
        raise hub.CheckpointError(f"{key} {tuple(weight.shape)} cannot be a ({config.dim}, 1, {p}, {p}) kernel")
    return {**state, key: weight.reshape(config.dim, 1, p, p)}


def load_state(state: dict[str, torch.Tensor], config: PaSSTConfig, *, source: str,
               dtype: torch.dtype = torch.float32) -> PaSST:
    """A PaSST from a state dict in hear21passt's layout (strict: every key accounted for, by name)."""
    state = conv_patch_weight(unwrap(state, source=source), config)
    return build(lambda: PaSST(config), rename(state, TABLE, dropped=DROPPED, source=source), source=source,
                 dtype=dtype)


def load_file(path: str | os.PathLike, config: PaSSTConfig, *, dtype: torch.dtype = torch.float32) -> PaSST:
    """A release .pt file (torch.load with weights_only=True: tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise hub.CheckpointError(f"missing PaSST checkpoint {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise hub.CheckpointError(f"{path} could not be read as a weights-only torch pickle: {err}") from err
    return load_state(obj, config, source=str(path), dtype=dtype)


def to_reference(model: PaSST, *, head_dist: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Our state dict in hear21passt's layout (the inverse of TABLE), e.g. to write a checkpoint for tests.
    `head_dist` (weight, bias) fills the dropped distillation head; zeros when not given."""
    rows = [(ours, theirs) for theirs, ours in TABLE]
    state = rename({k: v.detach().clone() for k, v in model.state_dict().items()}, rows, source="PaSST")
    if head_dist is None:
        c = model.config
        head_dist = (torch.zeros(c.num_labels, c.dim), torch.zeros(c.num_labels))
    state["head_dist.weight"], state["head_dist.bias"] = head_dist
    return state
