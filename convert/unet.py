"""diffusers UNets -> `musiclm_core.unet.UNet`.

Two sources, both a diffusers `unet/` folder (config.json + diffusion_pytorch_model.{safetensors,bin}):

* `UNet2DConditionModel` as MusicLDM uses it (ucsd-reach/musicldm): CLAP vector through a "simple_projection"
  class embedding concatenated after the time embedding, and no text context: cross_attention_dim equals each
  level's channels because the pipeline passes `encoder_hidden_states=None`, so attn2 attends to its own input.
* `AudioLDM2UNet2DConditionModel` (cvssp/audioldm2, -large, -music): `cross_attention_dim` is a list of context
  widths per level, one Transformer2DModel per entry after every resnet, stored flat as `attentions.{layer * S + s}`.

The config is translated field by field (`config_from_diffusers`): every field is either translated, required to
hold the value our code implements (an error naming the field and its value otherwise), or ignored on purpose
(`IGNORED`, each with the reason). The keys go through one table (`diffusers_table`) and two named surgery steps:
`squeeze_projections` (the transformers' 1x1 conv weights -> linear) and `fuse_projections` (to_q, to_k, to_v ->
one qkv for self-attention; to_k, to_v -> one kv for cross-attention).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.convert.keys import build, rename
from musiclm_core.hub import CheckpointError
from musiclm_core.unet import Attention, UNet, UNetConfig

# What `UNet.from_pretrained` downloads for a hub id: a native folder, or a pipeline's model_index.json + unet/
# with safetensors weights (the cvssp repos ship both formats; .bin only when there are no safetensors).
HUB_PATTERNS = ["config.json", "model.safetensors", "model_index.json", "unet/config.json",
                "unet/diffusion_pytorch_model*.safetensors", "unet/*.safetensors.index.json"]
HUB_PATTERNS_BIN = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model*.bin",
                    "unet/*.bin.index.json"]

CLASSES = ("UNet2DConditionModel", "AudioLDM2UNet2DConditionModel")

# Fields read by nothing at inference, each for a stated reason.
IGNORED = {
    "_class_name": "checked separately",
    "_diffusers_version": "bookkeeping",
    "_name_or_path": "bookkeeping",
    "_use_default_values": "bookkeeping (diffusers lists the fields it filled in)",
    "sample_size": "the default latent size for pipelines; the UNet takes any size",
    "dropout": "training only",
    "upcast_attention": "computes the scores in float32 in fp16 models: no effect in fp32, and SDPA accumulates "
                        "bf16 scores in float32 on the CPU",
    "addition_embed_type_num_heads": "read only with addition_embed_type (which must be None)",
}

# Fields whose diffusers default is the only value our code implements (both classes' defaults; a field one
# class lacks reads as its default). ALSO_ACCEPTED: other values that mean the same.
REQUIRED = {
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "use_linear_projection": False,
    "num_class_embeds": None, "center_input_sample": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "addition_embed_type": None,
    "addition_time_embed_dim": None, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "attention_type": "default", "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
ALSO_ACCEPTED = {"mid_block_only_cross_attention": (False,)}  # None means "as only_cross_attention" (False)

# Fields translated in `config_from_diffusers`, with the diffusers defaults for a config.json that omits them.
TRANSLATED = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "num_attention_heads": None, "only_cross_attention": False, "norm_num_groups": 32, "norm_eps": 1e-5,
    "downsample_padding": 1,
    "time_embedding_dim": None, "class_embed_type": None, "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
}

DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _one_value(field: str, value: Any, n: int, source: str) -> Any:
    """A per-level field that may be one value or a list of n: its single value (lists must agree)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or len({repr(v) for v in value}) != 1:
            raise CheckpointError(f"{source}: {field}={value}: only one value shared by all {n} levels is supported")
        return value[0]
    return value


def config_from_diffusers(d: dict[str, Any], *, source: str = "diffusers config") -> UNetConfig:
    """A diffusers UNet config.json (either class) -> UNetConfig."""
    cls = d.get("_class_name")
    if cls not in CLASSES:
        raise CheckpointError(f"{source}: _class_name {cls!r} is not one of {list(CLASSES)}")
    unknown = sorted(set(d) - set(IGNORED) - set(REQUIRED) - set(TRANSLATED))
    if unknown:
        raise CheckpointError(f"{source}: UNet config fields the converter does not know: {unknown}")
    for field, value in REQUIRED.items():
        if d.get(field, value) != value and d[field] not in ALSO_ACCEPTED.get(field, ()):
            raise CheckpointError(f"{source}: {field}={d[field]!r} is not supported (only {value!r})")
    c = {**TRANSLATED, **{k: v for k, v in d.items() if k in TRANSLATED}}

    channels = list(c["block_out_channels"])
    n = len(channels)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != n or len(up) != n:
        raise CheckpointError(f"{source}: {n} block_out_channels but {len(down)} down_block_types and "
                              f"{len(up)} up_block_types")
    for field, types, table in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
        bad = [t for t in types if t not in table]
        if bad:
            raise CheckpointError(f"{source}: {field} {bad} are not supported (only {sorted(table)})")
    attention = [DOWN_TYPES[t] for t in down]
    if [UP_TYPES[t] for t in reversed(up)] != attention:
        raise CheckpointError(f"{source}: up_block_types {up} do not mirror down_block_types {down}")
    if not any(attention):
        raise CheckpointError(f"{source}: no level has attention (down_block_types {down})")
    if _one_value("only_cross_attention", c["only_cross_attention"], n, source):
        raise CheckpointError(f"{source}: only_cross_attention={c['only_cross_attention']!r} is not supported "
                              f"(only False: attn1 is a self-attention)")
    if c["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise CheckpointError(f"{source}: time_embedding_dim={c['time_embedding_dim']} is not supported (only "
                              f"None or 4 x block_out_channels[0] = {4 * channels[0]})")

    class_embed_dim = None
    if c["class_embed_type"] is not None:
        if c["class_embed_type"] != "simple_projection" or not c["class_embeddings_concat"]:
            raise CheckpointError(f"{source}: class_embed_type={c['class_embed_type']!r} with class_embeddings_concat="
                                  f"{c['class_embeddings_concat']!r} is not supported (only 'simple_projection' "
                                  f"concatenated, MusicLDM's)")
        class_embed_dim = c["projection_class_embeddings_input_dim"]
    elif c["class_embeddings_concat"]:
        raise CheckpointError(f"{source}: class_embeddings_concat=True without a class_embed_type")

    context_dims = _context_dims(cls, c["cross_attention_dim"], channels, attention, class_embed_dim, source)
    return UNetConfig.from_dict(dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"], channels=channels, attention=attention,
        layers_per_level=_one_value("layers_per_block", c["layers_per_block"], n, source),
        context_dims=context_dims,
        transformer_depth=_one_value("transformer_layers_per_block", c["transformer_layers_per_block"], n, source),
        # diffusers builds every block with num_attention_heads or attention_head_dim heads (unet_2d_condition.py
        # "num_attention_heads = num_attention_heads or attention_head_dim"): attention_head_dim counts heads.
        num_heads=(_one_value("num_attention_heads", c["num_attention_heads"], n, source)
                   or _one_value("attention_head_dim", c["attention_head_dim"], n, source)),
        class_embed_dim=class_embed_dim, norm_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
        downsample_padding=c["downsample_padding"]), source=source)


def _context_dims(cls: str, dims: Any, channels: list[int], attention: list[bool], class_embed_dim: int | None,
                  source: str) -> list[int | None]:
    """cross_attention_dim -> our context slots (one list shared by every level with attention)."""
    n = len(channels)
    if cls == "UNet2DConditionModel":
        # MusicLDM: attn2 gets no context, so its to_k/to_v read the C-wide tokens: cross_attention_dim must be
        # each level's channels; that is a self-attention slot. A real text context is not what this class serves.
        per_level = list(dims) if isinstance(dims, (list, tuple)) else [dims] * n
        if class_embed_dim is None or len(per_level) != n or per_level[-1] != channels[-1] or any(
                a and d != c for a, d, c in zip(attention, per_level, channels)):  # [-1]: the mid block's
            raise CheckpointError(f"{source}: UNet2DConditionModel with cross_attention_dim={dims!r} is not supported "
                                  f"(only MusicLDM's: a class embedding and cross_attention_dim = block_out_channels "
                                  f"{channels}, i.e. no text context)")
        return [None]
    # AudioLDM2UNet2DConditionModel: an int is one slot everywhere; a list has one entry (int or list) per level.
    if isinstance(dims, int):
        per_level = [[dims]] * n
    elif isinstance(dims, (list, tuple)) and len(dims) == n:
        per_level = [list(d) if isinstance(d, (list, tuple)) else [d] for d in dims]
    else:
        raise CheckpointError(f"{source}: cross_attention_dim={dims!r}: expected an int or one entry per level ({n})")
    used = {repr(d) for d, a in zip(per_level, attention) if a} | {repr(per_level[-1])}  # the mid block: the last
    if len(used) != 1:
        raise CheckpointError(f"{source}: cross_attention_dim={dims!r}: only one list shared by every level with "
                              f"attention is supported")
    slots = per_level[-1]
    if not 1 <= len(slots) <= 4:  # diffusers' blocks refuse more than 4 too
        raise CheckpointError(f"{source}: cross_attention_dim={dims!r}: 1 to 4 slots per level")
    return slots


# ---------------------------------------------------------------------------------------------------------------
# Keys


def _resnet_rows(theirs: str, ours: str) -> list[tuple[str, str]]:
    parts = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2", "conv2": "conv2",
             "conv_shortcut": "skip"}
    return [(f"{theirs}.{t}.{p}", f"{ours}.{o}.{p}") for t, o in parts.items() for p in ("weight", "bias")]


def _transformer_rows(theirs: str, ours: str) -> list[tuple[str, str]]:
    rows = [(f"{theirs}.{t}.{p}", f"{ours}.{t}.{p}") for t in ("norm", "proj_in", "proj_out")
            for p in ("weight", "bias")]
    block, our_block = f"{theirs}.transformer_blocks.{{k}}", f"{ours}.blocks.{{k}}"
    for t, o in (("norm1", "norm1"), ("norm2", "norm2"), ("norm3", "norm3"), ("ff.net.0.proj", "ff_in"),
                 ("ff.net.2", "ff_out"), ("attn1.to_out.0", "attn1.out"), ("attn2.to_out.0", "attn2.out")):
        rows += [(f"{block}.{t}.weight", f"{our_block}.{o}.weight"), (f"{block}.{t}.bias", f"{our_block}.{o}.bias")]
    for attn in ("attn1", "attn2"):
        # renamed one by one here; `fuse_projections` joins them into qkv / kv
        rows += [(f"{block}.{attn}.to_{x}.weight", f"{our_block}.{attn}.{x}.weight") for x in "qkv"]
    return rows


def diffusers_table(config: UNetConfig) -> list[tuple[str, str]]:
    """diffusers keys -> ours (before `squeeze_projections` / `fuse_projections`). A level's flat
    `attentions.{n}` is our `layers.{n // S}.transformers.{n % S}` for S context slots."""
    S = len(config.context_dims)
    rows = [(f"conv_in.{p}", f"conv_in.{p}") for p in ("weight", "bias")]
    rows += [(f"time_embedding.linear_1.{p}", f"time_in.{p}") for p in ("weight", "bias")]
    rows += [(f"time_embedding.linear_2.{p}", f"time_out.{p}") for p in ("weight", "bias")]
    rows += [(f"class_embedding.{p}", f"class_proj.{p}") for p in ("weight", "bias")]
    for side, ours, layers in (("down_blocks", "down", config.layers_per_level),
                               ("up_blocks", "up", config.layers_per_level + 1)):
        rows += _resnet_rows(f"{side}.{{i}}.resnets.{{j}}", f"{ours}.{{i}}.layers.{{j}}.res")
        for n in range(layers * S):
            rows += _transformer_rows(f"{side}.{{i}}.attentions.{n}",
                                      f"{ours}.{{i}}.layers.{n // S}.transformers.{n % S}")
    rows += [(f"down_blocks.{{i}}.downsamplers.0.conv.{p}", f"down.{{i}}.resample.{p}") for p in ("weight", "bias")]
    rows += [(f"up_blocks.{{i}}.upsamplers.0.conv.{p}", f"up.{{i}}.resample.{p}") for p in ("weight", "bias")]
    rows += _resnet_rows("mid_block.resnets.0", "mid.res") + _resnet_rows("mid_block.resnets.1", "mid_res")
    for s in range(S):
        rows += _transformer_rows(f"mid_block.attentions.{s}", f"mid.transformers.{s}")
    rows += [(f"conv_norm_out.{p}", f"norm_out.{p}") for p in ("weight", "bias")]
    rows += [(f"conv_out.{p}", f"conv_out.{p}") for p in ("weight", "bias")]
    return rows


def squeeze_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers' proj_in / proj_out: 1x1 conv weights (C, C, 1, 1) -> linear weights (C, C)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith((".proj_in.weight", ".proj_out.weight")) and tensor.dim() == 4:
            if tensor.shape[2:] != (1, 1):
                raise CheckpointError(f"{key}: expected a 1x1 convolution weight, got shape {tuple(tensor.shape)}")
            tensor = tensor[:, :, 0, 0]
        out[key] = tensor
    return out


def fuse_projections(state: dict[str, torch.Tensor], model: UNet) -> dict[str, torch.Tensor]:
    """Join each attention's q, k, v weights into the one matmul the model runs: qkv (self-attention, rows in that
    order) or kv (cross-attention, q kept). Which attention is which comes from `model` (built on meta)."""
    out = dict(state)
    missing = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        parts = ("q", "k", "v") if module.context_dim is None else ("k", "v")
        keys = [f"{name}.{x}.weight" for x in parts]
        absent = [k for k in keys if k not in out]
        if absent:
            missing += absent
            continue
        out[f"{name}.{''.join(parts)}.weight"] = torch.cat([out.pop(k) for k in keys], dim=0)
    if missing:
        raise CheckpointError("attention projections missing from the checkpoint:\n    " + "\n    ".join(missing))
    return out


def load_diffusers(d: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                   dtype: torch.dtype = torch.float32) -> UNet:
    """A diffusers UNet (config dict + state dict) -> UNet."""
    config = config_from_diffusers(d, source=source)
    state = rename(state, diffusers_table(config), source=source)
    state = squeeze_projections(state)
    with torch.device("meta"):
        layout = UNet(config)
    state = fuse_projections(state, layout)
    return build(lambda: UNet(config), state, source=source, dtype=dtype)


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder for `name_or_path`; for a hub id only the UNet's files, in safetensors where the repo has
    them (ucsd-reach/musicldm's older copies ship .bin only)."""
    folder = hub.resolve(name_or_path, revision=revision, allow_patterns=HUB_PATTERNS)
    if (folder / "model_index.json").is_file() and not any((folder / "unet").glob("diffusion_pytorch_model*")):
        folder = hub.resolve(name_or_path, revision=revision, allow_patterns=HUB_PATTERNS_BIN)
    return folder


def load_diffusers_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> UNet:
    """A diffusers `unet/` folder, or a pipeline folder (model_index.json) whose `unet/` is read."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        folder = folder / "unet"
    config_file = folder / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise CheckpointError(f"{folder} holds no UNet: expected a diffusers unet/ folder (config.json + "
                              f"diffusion_pytorch_model.*), a pipeline folder with unet/, or a native folder; "
                              f"found {present}")
    return load_diffusers(hub.read_json(config_file), hub.load_state_dict(folder), source=str(folder), dtype=dtype)
