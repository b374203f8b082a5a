"""Find checkpoint files and read their tensors, safely.

Three things live here and nothing else:

* `resolve`: a hub id or a local folder -> a local folder (huggingface_hub does the download and the cache).
* `load_state_dict` / `load_tensors`: read every tensor of a checkpoint folder or file, whatever the format
  (safetensors, sharded safetensors, .bin, sharded .bin, fp16 files, `variant="fp32"` files). Pickles are only
  ever read with `torch.load(weights_only=True)`.
* The native format: `save_native` / `load_native` (config.json + model.safetensors, written atomically).

Key names are never touched here: that is the converters' job (`musiclm_core.convert`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

NATIVE_FORMAT = "musiclm_core"  # the marker key in a native config.json

# Weight files in the order we prefer them: safetensors before pickles, single files before indexes.
# transformers names them model.* / pytorch_model.*; diffusers component folders (unet/, vae/) use
# diffusion_pytorch_model.*.
_WEIGHT_FILES = (
    "model{v}.safetensors",
    "model.safetensors.index{v}.json",
    "diffusion_pytorch_model{v}.safetensors",
    "diffusion_pytorch_model.safetensors.index{v}.json",
    "pytorch_model{v}.bin",
    "pytorch_model.bin.index{v}.json",
    "diffusion_pytorch_model{v}.bin",
    "diffusion_pytorch_model.bin.index{v}.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: missing files, unknown layout, bad or missing keys."""


def resolve(name_or_path: str | os.PathLike, *, allow_patterns: Iterable[str] | None = None,
            revision: str | None = None) -> Path:
    """Return a local folder for a hub id ("facebook/encodec_32khz") or a local folder path.

    A local path is used as it is. A path-like name (starting with ".", "/" or "~", or with more than one "/")
    that is not a folder is "no such folder". Anything else is looked up with huggingface_hub, which reuses its
    cache; when that fails (no network, no cached copy, unknown repo) the error says how to pass a local folder
    instead. A name without "/" ("t5-base" is a hub id, "my_model" is more likely a mistyped folder) gets both
    readings in its error.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds it (with its config.json)")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip() or name.endswith("/") \
            or (os.sep != "/" and os.sep in name):
        raise CheckpointError(f"no such folder: {path}")
    from huggingface_hub import snapshot_download  # imported here: only hub ids need it

    try:
        folder = snapshot_download(name, revision=revision,
                                   allow_patterns=list(allow_patterns) if allow_patterns else None)
    except Exception as err:  # huggingface_hub raises many types (offline, 404, gated, ...); all end the same way
        raise CheckpointError(hub_error(name, err)) from err
    return Path(folder)


def hub_offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE, read when it is imported, or set since)."""
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_error(name: str, err: Exception) -> str:
    """One line: why `name` could not be fetched, and how to pass a folder instead (`hf download` elsewhere)."""
    reason = " ".join(f"{type(err).__name__}: {err}".split())  # huggingface_hub's messages span several lines
    if len(reason) > 300:
        reason = reason[:297] + "..."
    fetch = (f"download it where the hub is reachable (`hf download {name} --local-dir DIR`), copy DIR here and "
             f"pass the folder DIR instead of the hub id")
    if hub_offline():
        problem = (f"could not get {name!r}: HF_HUB_OFFLINE is set and the huggingface_hub cache holds no copy of "
                   f"it ({reason})")
        advice = f"To use it, {fetch}."
    else:
        problem = f"could not get {name!r} from the Hugging Face hub ({reason})"
        advice = (f"Without network access, {fetch}; or set HF_HUB_OFFLINE=1 to use a copy already in the "
                  f"huggingface_hub cache.")
    if "/" not in name:  # "t5-base" is a hub id; "tiny_model" is more likely a folder that is not there
        return f"no such folder: {name} (and not a hub id: {problem}). Check the folder's name; for a hub repo, " \
               f"{fetch}."
    return f"{problem}. {advice}"


# ---------------------------------------------------------------------------------------------------------------
# Config values: a config.json written by hand or by another tool may hold a value of the wrong type
# ("num_hidden_layers": "two"); it is refused where it is read, naming the file, the field, the value and the type.


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if origin in (tuple, list):  # tuple[int, ...]: a JSON list of them
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(kind)[0]) for v in value)
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # JSON writes 1.0 as 1 at times
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(kind)[0]).split(' ', 1)[-1]}s"
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_value(value: Any, kind: Any, *, field: str, source: str) -> Any:
    """`value` if it is of `kind` (int, float, bool, str, `X | None`, `tuple[X, ...]` for a JSON list; an int is
    a float, a bool is not an int), else a one-line CheckpointError naming source, field, value and kind."""
    if not _matches(value, kind):
        raise CheckpointError(f"{source}: field {field} = {value!r} is not {_describe(kind)}")
    return value


def check_config(cls: type, values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """`values` if they are fields of the dataclass `cls` with values of their annotated types (check_value);
    unknown fields are an error too. For configs stored with our own field names (native folders)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown {cls.__name__} fields {unknown}")
    for name, value in values.items():
        check_value(value, hints[name], field=name, source=source)
    return values


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def load_tensors(path: str | os.PathLike, *, mmap: bool | Callable[[str], bool] = True,
                 select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one weight file (.safetensors or a pickled .bin/.pt/.pth), on the CPU, in its stored dtype.

    mmap (safetensors): True maps the file: nothing is read until used, and the pages are the kernel's page cache
    (reclaimable, e.g. while an fp16 file is cast to fp32). But one mapping backs every tensor of the file, so
    its touched pages stay resident while any of them lives. False reads each tensor into memory of its own
    (`pread`), so that one dropped after loading goes back to the system: what a quantised load needs for the
    LM's fp32 weights, dropped one by one while T5's and EnCodec's, from the same file, live on. A predicate maps
    the keys it accepts and reads the others, in one pass. A pickle is always read.
    select: only the keys it accepts (a safetensors file reads nothing else; a pickle is read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        mapped = mmap if callable(mmap) else (lambda key: mmap)
        try:
            with safe_open(str(path), framework="pt", backend="mmap") as by_map, \
                    safe_open(str(path), framework="pt", backend="pread") as by_read:
                return {key: (by_map if mapped(key) else by_read).get_tensor(key) for key in by_map.keys()
                        if select is None or select(key)}
        except Exception as err:  # safetensors raises SafetensorError / OSError on truncated files
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        # weights_only=True: a pickle can run arbitrary code; this refuses anything but tensors and containers.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} could not be read as a weights-only torch pickle: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj if select is None else {key: value for key, value in obj.items() if select(key)}


def weight_files(folder: str | os.PathLike, *, variant: str | None = None) -> list[Path]:
    """The weight files of a transformers/diffusers-style folder: one file, or the shards its index names.

    `variant="fp32"` picks `model.fp32.safetensors` / `model.safetensors.index.fp32.json` and the like (the
    stereo MusicGen repos store fp16 by default and fp32 under this variant).
    """
    folder = Path(folder)
    v = f".{variant}" if variant else ""
    for pattern in _WEIGHT_FILES:
        path = folder / pattern.format(v=v)
        if not path.is_file():
            continue
        if not path.name.endswith(".json"):
            return [path]
        index = read_json(path)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path} has no 'weight_map' object")
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{path} names shard files that are not in {folder}: {missing}")
        return [folder / s for s in shards]
    expected = ", ".join(p.format(v=v) for p in _WEIGHT_FILES)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"no weight file in {folder}: expected one of {expected}; found {present}")


def load_state_dict(folder: str | os.PathLike, *, variant: str | None = None,
                    mmap: bool | Callable[[str], bool] = True,
                    select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, merged across shards (`mmap` and `select` as `load_tensors`). A key
    found in two shards is an error."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, variant=variant):
        tensors = load_tensors(path, mmap=mmap, select=select)
        clash = state.keys() & tensors.keys()
        if clash:
            raise CheckpointError(f"keys present in more than one shard ({path.name}): {sorted(clash)[:10]}")
        state.update(tensors)
    return state


def detect_layout(folder: str | os.PathLike) -> str:
    """Which kind of checkpoint a folder holds: "native", "transformers", "diffusers" or "audiocraft"."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        data = read_json(config)
        if NATIVE_FORMAT in data:
            return "native"
        if "model_type" in data:
            return "transformers"
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if (folder / "state_dict.bin").is_file() or (folder / "compression_state_dict.bin").is_file():
        return "audiocraft"
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"unknown checkpoint layout in {folder}: expected a native folder (config.json with a "
        f"'{NATIVE_FORMAT}' entry + model.safetensors), a transformers folder (config.json with 'model_type'), "
        f"a diffusers folder (model_index.json) or an audiocraft folder (state_dict.bin / "
        f"compression_state_dict.bin); found {present}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Native format: config.json = {"musiclm_core": {"model": <kind>, "version": 1}, "config": <dataclass fields>}
# plus model.safetensors with our own key names.


def save_native(folder: str | os.PathLike, kind: str, config: dict[str, Any],
                state_dict: dict[str, torch.Tensor], *, overwrite: bool = False,
                extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a native checkpoint folder atomically: it appears whole or not at all.

    `extra_files` maps file names to contents written alongside (e.g. a tokenizer's `spiece.model`).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise TypeError(f"state_dict values must be tensors; these are not: {not_tensors[:10]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        meta = {NATIVE_FORMAT: {"model": kind, "version": 1}, "config": config}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        # safetensors refuses tensors that share memory (tied weights) or are not contiguous: store plain copies.
        tensors, storages = {}, set()
        for k, v in state_dict.items():
            v = v.detach().contiguous().cpu()
            if v.untyped_storage().data_ptr() in storages:
                v = v.clone()
            storages.add(v.untyped_storage().data_ptr())
            tensors[k] = v
        save_file(tensors, str(tmp / "model.safetensors"))
        for name, content in (extra_files or {}).items():
            if Path(name).name != name or name in ("config.json", "model.safetensors"):
                raise ValueError(f"extra file name {name!r} must be a plain file name other than ours")
            (tmp / name).write_bytes(content)
        old = None
        if folder.exists():
            # Move the old folder aside rather than deleting it first: a crash in between leaves one of the two.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_native(folder: str | os.PathLike, kind: str, *,
                mmap: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config fields, state dict) of a native folder; an error if it holds another kind of model. `mmap` as
    `load_tensors` (False where the loader replaces the weights, so that the file's pages do not stay resident)."""
    folder = Path(folder)
    meta = read_json(folder / "config.json")
    info = meta.get(NATIVE_FORMAT)
    if not isinstance(info, dict) or "config" not in meta:
        raise CheckpointError(f"{folder / 'config.json'} is not a musiclm_core native config")
    if info.get("model") != kind:
        raise CheckpointError(f"{folder} holds a {info.get('model')!r} model, expected {kind!r}")
    return meta["config"], load_tensors(folder / "model.safetensors", mmap=mmap)
