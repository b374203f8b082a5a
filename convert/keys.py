"""Strict key accounting, shared by every converter.

A converter is three things, in this order:

1. named tensor surgery on the source state dict (`fold_weight_norm`, `split_fused_qkv`, ...), each a plain
   function that says what it does;
2. one declarative table of `(their key, our key)` patterns plus the list of keys dropped on purpose, applied with
   `rename`: every source key must match exactly one row or one dropped pattern, or it is reported;
3. `build`: make the model and load the renamed tensors into it, where every missing, unexpected or mis-shaped
   key is reported at once, by name, in one `CheckpointError`.

Patterns are plain key strings in which `{name}` stands for a run of digits (a layer or codebook index), e.g.
`("encoder.layers.{i}.conv.bias", "encoder.{i}.conv.bias")`. No substring replacement, ever: a rule either
matches a whole key or it does not.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from musiclm_core.hub import CheckpointError

Table = Sequence[tuple[str, str]]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)  # literal, name, literal, name, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex + r"\Z")


def _listing(title: str, keys: Iterable[str], limit: int = 40) -> str:
    keys = list(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n    {shown}{more}"


def rename(state: dict[str, torch.Tensor], table: Table, *, dropped: Sequence[str] = (),
           source: str) -> dict[str, torch.Tensor]:
    """Rename every key of `state` through `table`; keys matching a `dropped` pattern are left out on purpose.

    Raises `CheckpointError` naming every key that matches no row (and no dropped pattern), and every pair of
    source keys that would land on the same key of ours.
    """
    rows = [(_compile(theirs), ours) for theirs, ours in table]
    drops = [_compile(p) for p in dropped]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown, clashes = [], []
    for key, tensor in state.items():
        if any(d.match(key) for d in drops):
            continue
        for regex, ours in rows:
            m = regex.match(key)
            if m:
                new = ours.format(**m.groupdict())
                if new in out:
                    clashes.append(f"{origin[new]} and {key} -> {new}")
                out[new], origin[new] = tensor, key
                break
        else:
            unknown.append(key)
    if unknown or clashes:
        msg = [f"{source}: keys the converter does not know"]
        if unknown:
            msg.append(_listing("unexpected keys", sorted(unknown)))
        if clashes:
            msg.append(_listing("keys that map to the same place", clashes))
        raise CheckpointError("\n".join(msg))
    return out


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Raise one `CheckpointError` listing every missing, unexpected and mis-shaped key of `state` for `model`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
                       for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        msg = [f"{source} does not fit {type(model).__name__}"]
        if missing:
            msg.append(_listing("missing keys", missing))
        if unexpected:
            msg.append(_listing("unexpected keys", unexpected))
        if misshaped:
            msg.append(_listing("mis-shaped keys", misshaped))
        raise CheckpointError("\n".join(msg))


def build(make: Callable[[], nn.Module], state: dict[str, torch.Tensor], *, source: str,
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """Make a model with `make()` and load `state` into it strictly, converting floating tensors to `dtype`.

    The model is made on the meta device (no time spent on random initialisation, no second copy of the
    weights) and the checkpoint tensors are assigned to it. Derived constants that a module keeps in
    non-persistent buffers are then made again by its `reset_buffers()` method.
    """
    with torch.device("meta"):
        model = make()
    check_keys(model, state, source=source)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            reset = getattr(module, "reset_buffers", None)
            if reset is None:
                raise TypeError(f"{type(module).__name__} ({name}) keeps non-persistent buffers but has no "
                                f"reset_buffers() to make them again after loading")
            with torch.device("cpu"):
                reset()
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------------
# Tensor surgery shared by several sources.


def fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each weight-normalised pair by the plain weight `g * v / ||v||`, computed in fp32.

    Accepts both namings: `X.weight_g` / `X.weight_v` (torch.nn.utils.weight_norm, what the hub files hold) and
    `X.parametrizations.weight.original0` / `.original1` (torch.nn.utils.parametrizations.weight_norm, what
    recent transformers models save). The norm runs over every dim but 0, as weight_norm's default `dim=0`:
    per output channel of a Conv1d, per *input* channel of a ConvTranspose1d (whose weight is [C_in, C_out, k]).
    """
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for g_suffix, v_suffix in ((".weight_g", ".weight_v"),
                                   (".parametrizations.weight.original0", ".parametrizations.weight.original1")):
            if key.endswith(g_suffix):
                pairs.setdefault(key[: -len(g_suffix)], {})["g"] = tensor
                break
            if key.endswith(v_suffix):
                pairs.setdefault(key[: -len(v_suffix)], {})["v"] = tensor
                break
        else:
            out[key] = tensor
    for base, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise CheckpointError(f"weight norm of {base} is incomplete: found only {sorted(pair)}")
        g, v = pair["g"].float(), pair["v"].float()
        norm = v.norm(dim=tuple(range(1, v.dim())), keepdim=True)
        out[base + ".weight"] = g * v / norm  # stays fp32: `build` casts to the dtype asked for
    return out


def split_fused_qkv(state: dict[str, torch.Tensor], fused_suffix: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Split every `*{fused_suffix}` tensor into equal row blocks named `*{names[i]}` (e.g. in_proj -> q, k, v)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.endswith(fused_suffix):
            out[key] = tensor
            continue
        base = key[: -len(fused_suffix)]
        if tensor.shape[0] % len(names):
            raise CheckpointError(f"{key} has {tensor.shape[0]} rows, not divisible into {len(names)} parts")
        for name, part in zip(names, tensor.chunk(len(names), dim=0)):
            out[base + name] = part
    return out


def renamed_onto(table: Table, ours: Callable[[str], bool]) -> Callable[[str], bool]:
    """A test for the source keys that `table` renames onto keys of ours accepted by `ours` (e.g. to find, before
    loading, the checkpoint tensors that a surgery step after `rename` will copy)."""
    rows = [_compile(theirs) for theirs, our in table if ours(our)]
    return lambda key: any(row.match(key) for row in rows)


def concat_rows(state: dict[str, torch.Tensor], parts: Sequence[str], fused: str) -> dict[str, torch.Tensor]:
    """Join every group of tensors `*{parts[i]}` row-wise into one `*{fused}` (e.g. q, k, v -> qkv), in the
    order of `parts`. A group with a part missing is reported, by key, in one `CheckpointError`."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        part = next((p for p in parts if key.endswith(p)), None)
        if part is None:
            out[key] = tensor
        else:
            groups.setdefault(key[: -len(part)], {})[part] = tensor
    incomplete = [base + p for base, found in groups.items() for p in parts if p not in found]
    if incomplete:
        raise CheckpointError(f"cannot make the {fused} tensors: missing\n    " + "\n    ".join(incomplete))
    for base, found in groups.items():
        out[base + fused] = torch.cat([found[p] for p in parts], dim=0)
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. "audio_encoder." in a MusicGen checkpoint), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
