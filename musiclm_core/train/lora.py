"""LoRA adapters (Hu et al. 2021) on the attention projections of the MusicGen LM and the diffusion UNet.

    y = x W^T + b + (alpha / r) * (x A^T) B^T        A (r, in): small random, B (out, r): zeros, W and b frozen

`add_lora` swaps each attention projection (`nn.Linear`) for a `LoRALinear` that keeps the same `weight` and
`bias` (so the model's own keys are unchanged) and adds `lora_a`, `lora_b`. `merge` folds the update into W for
inference at the base model's speed and `unmerge` takes it out again; `merged_state_dict` gives the merged weights
without touching the model (what a run folder saves, so that it loads with the model's `from_pretrained`).
`save_adapter` writes only the adapter (a few MB), `load_adapter` puts one onto a freshly loaded pretrained model.

The targets are the linear layers of the attention modules: MusicGen's fused `qkv` and `out` of the
self-attention and `q`, `k`, `v`, `out` of the cross-attention; the UNet's `qkv` / `q`, `kv` and `out`. A fused
projection gets one adapter for its q, k and v rows together.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "musiclm_core.lora"


class LoRALinear(nn.Linear):
    """`nn.Linear` (same `weight`, `bias`) plus a rank-r update; `merged` says whether W already holds it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: nothing is copied
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's weights; B = 0: starts as W
        self.merged = False

    def delta(self) -> Tensor:
        """(out, in) update scale * B A."""
        return (self.lora_b @ self.lora_a) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` layers that belong to an attention module of the MusicGen LM or the UNet."""
    from musiclm_core import musicgen, unet

    kinds = (musicgen.Attention, unet.Attention)
    names = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, kinds):
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: list[str] | None = None) -> list[str]:
    """Put LoRA adapters of rank `rank` on `targets` (default: `attention_projections`), freeze every other
    parameter of `model`; returns the names adapted. alpha defaults to rank (scale 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    targets = attention_projections(model) if targets is None else list(targets)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no attention projection to put LoRA adapters on")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, LoRA adapts nn.Linear layers (swap blocked "
                             f"layers back first: train.musicgen.plain_linears)")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, LoRALinear(module, rank, alpha))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merged_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's state dict (or `state`, one of its state dicts, e.g. gathered from FSDP shards) with every
    unmerged adapter folded into its weight and the adapter keys left out: the keys and shapes of the model
    without adapters. The model is not changed."""
    layers = lora_layers(model)
    state = model.state_dict() if state is None else state
    merged = {}
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in ("lora_a", "lora_b"):
            continue
        if owner in layers and leaf == "weight" and not layers[owner].merged:
            delta = (state[f"{owner}.lora_b"] @ state[f"{owner}.lora_a"]) * layers[owner].scale  # LoRALinear.delta
            value = value + delta.detach().to(value.dtype)
        merged[key] = value
    return merged


def adapter_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapters' tensors, from the model or from `state` (one of its state dicts)."""
    state = model.state_dict() if state is None else state
    return {f"{name}.{leaf}": state[f"{name}.{leaf}"].detach() for name in lora_layers(model)
            for leaf in ("lora_a", "lora_b")}


def save_adapter(model: nn.Module, folder: str | os.PathLike, state: dict[str, Tensor] | None = None) -> Path:
    """Write the adapters alone: folder/adapter.safetensors (lora_a, lora_b of each layer, rank and alpha in the
    metadata), from the model or from `state`. Written to a temporary file and renamed."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter to save")
    first = next(iter(layers.values()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": ADAPTER_FORMAT, "rank": str(first.rank), "alpha": str(first.alpha),
            "targets": json.dumps(sorted(layers))}
    tmp = folder / (ADAPTER_FILE + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in adapter_state_dict(model, state).items()}, str(tmp), metadata=meta)
    os.replace(tmp, folder / ADAPTER_FILE)
    return folder / ADAPTER_FILE


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Add the adapters saved by `save_adapter` (a folder or the file) to `model` and load them; strict: a
    target the model lacks or a tensor of another shape is a ValueError naming it. Returns `model`."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not a musiclm_core LoRA adapter (metadata format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    targets = json.loads(meta["targets"])
    missing = [t for t in targets if not _has(model, t)]
    if missing:
        raise ValueError(f"{path}: the model has no layer {missing[0]} to put this adapter on "
                         f"({len(missing)} of {len(targets)} targets missing)")
    if not lora_layers(model):
        add_lora(model, int(meta["rank"]), float(meta["alpha"]), targets)
    layers = lora_layers(model)
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        if name not in layers:
            raise ValueError(f"{path}: tensor {key} has no LoRA layer {name} in the model")
        param = getattr(layers[name], leaf)
        if param.shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
    return model


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
