"""diffusers `AutoencoderKL` checkpoints -> `musiclm_core.vae.AutoencoderKL`.

The `vae/` folder of `cvssp/audioldm2*` and `ucsd-reach/musicldm`: `config.json` translated field by field
(`config_from_diffusers`), `diffusion_pytorch_model.safetensors` (or `.bin`) renamed key by key (`diffusers_table`).
No tensor surgery: the official files hold the mid-block attention as `to_q/to_k/to_v/to_out.0` linears (2-D
weights; diffusers' own converter squeezed the original 1x1 convs, scripts/convert_original_audioldm2_to_diffusers.py
`conv_attn_to_linear`), which is what our `AttentionBlock` holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.convert.keys import build, rename
from musiclm_core.hub import CheckpointError
from musiclm_core.vae import AutoencoderKL, VAEConfig

# The mel front-end of both pipelines has 64 bins (specs/ldm.md §2); diffusers' config does not record it.
MEL_BINS = 64

# diffusers' AutoencoderKL.__init__ defaults (autoencoder_kl.py), for fields a config.json may omit.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

# their field -> our field, for the fields that carry over unchanged.
DIFFUSERS_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block", "latent_channels": "latent_channels",
    "norm_num_groups": "norm_num_groups", "scaling_factor": "scaling_factor",
}

# Fields that must hold the one value our model implements (every official VAE has these).
DIFFUSERS_REQUIRED = {
    "act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

# Fields read and ignored on purpose:
#   _class_name          checked to be "AutoencoderKL" first
#   _diffusers_version   the library that wrote the file
#   _name_or_path        where diffusers loaded it from
#   force_upcast         a pipeline hint to run the VAE in fp32 under fp16; `from_pretrained(dtype=)` decides here
#   sample_size          the tile size of diffusers' tiled decoding, which we do not do
DIFFUSERS_IGNORED = ("_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "sample_size")


def config_from_diffusers(theirs: dict[str, Any], *, mel_bins: int = MEL_BINS,
                          source: str = "diffusers config") -> VAEConfig:
    """An AutoencoderKL config.json dict -> VAEConfig. Unknown fields and values we do not implement are errors."""
    if theirs.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{source}: _class_name {theirs['_class_name']!r} is not an AutoencoderKL")
    theirs = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in theirs.items() if k not in DIFFUSERS_IGNORED}}
    unknown = sorted(set(theirs) - set(DIFFUSERS_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{source}: AutoencoderKL config fields the converter does not know: {unknown}")
    for field, value in DIFFUSERS_REQUIRED.items():
        if theirs[field] != value:
            raise CheckpointError(f"{source}: {field} = {theirs[field]!r} is not supported (expected {value!r})")
    stages = len(theirs["block_out_channels"])
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(theirs[field]) != [block] * stages:
            raise CheckpointError(f"{source}: {field} = {theirs[field]} is not supported (expected {stages} x "
                                  f"{block!r}, one per block_out_channels entry)")
    ours = {our: theirs[field] for field, our in DIFFUSERS_FIELDS.items()}
    return VAEConfig.from_dict(dict(ours, mel_bins=mel_bins), source=source)


def _pair(theirs: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{theirs}.weight", f"{ours}.weight"), (f"{theirs}.bias", f"{ours}.bias")]


def _resblock(theirs: str, ours: str) -> list[tuple[str, str]]:
    rows = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        rows += _pair(f"{theirs}.{name}", f"{ours}.{name}")
    return rows + _pair(f"{theirs}.conv_shortcut", f"{ours}.shortcut")


def _mid_block(theirs: str, ours: str) -> list[tuple[str, str]]:
    rows = _resblock(f"{theirs}.resnets.0", f"{ours}.res1") + _resblock(f"{theirs}.resnets.1", f"{ours}.res2")
    attn = f"{theirs}.attentions.0"
    rows += _pair(f"{attn}.group_norm", f"{ours}.attn.norm")
    for name in ("to_q", "to_k", "to_v"):
        rows += _pair(f"{attn}.{name}", f"{ours}.attn.{name}")
    return rows + _pair(f"{attn}.to_out.0", f"{ours}.attn.to_out")  # to_out.1 is a parameter-free dropout


def diffusers_table() -> list[tuple[str, str]]:
    """diffusers' AutoencoderKL keys -> ours ({i}: stage, {j}: ResBlock within it). Every row covers all
    configs: a ResBlock without a width change simply has no conv_shortcut keys."""
    rows = []
    for side in ("encoder", "decoder"):
        rows += _pair(f"{side}.conv_in", f"{side}.conv_in")
        rows += _mid_block(f"{side}.mid_block", f"{side}.mid")
        rows += _pair(f"{side}.conv_norm_out", f"{side}.norm_out")
        rows += _pair(f"{side}.conv_out", f"{side}.conv_out")
    rows += _resblock("encoder.down_blocks.{i}.resnets.{j}", "encoder.stages.{i}.blocks.{j}")
    rows += _pair("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.stages.{i}.downsample.conv")
    rows += _resblock("decoder.up_blocks.{i}.resnets.{j}", "decoder.stages.{i}.blocks.{j}")
    rows += _pair("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.stages.{i}.upsample.conv")
    rows += _pair("quant_conv", "quant_conv") + _pair("post_quant_conv", "post_quant_conv")
    return rows


# The attention naming of diffusers before 0.14 (its `AttentionBlock`); no official audio VAE file uses it
# (specs/ldm.md §4.3), so it is refused with a pointer rather than renamed.
_LEGACY_ATTENTION = (".attentions.0.query.", ".attentions.0.key.", ".attentions.0.value.", ".attentions.0.proj_attn.")


def load_diffusers(config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                   dtype: torch.dtype = torch.float32, mel_bins: int = MEL_BINS) -> AutoencoderKL:
    """An AutoencoderKL config dict and state dict (diffusers' names) -> our AutoencoderKL."""
    ours = config_from_diffusers(config, mel_bins=mel_bins, source=source)
    legacy = sorted(k for k in state if any(part in k for part in _LEGACY_ATTENTION))
    if legacy:
        raise CheckpointError(f"{source}: the mid-block attention uses diffusers' pre-0.14 names ({legacy[:4]}); "
                              f"load and save it once with a recent diffusers to rename them to "
                              f"to_q/to_k/to_v/to_out.0")
    state = rename(state, diffusers_table(), source=source)
    return build(lambda: AutoencoderKL(ours), state, source=source, dtype=dtype)


def vae_folder(path: str | os.PathLike) -> Path:
    """The folder that holds the VAE: `path` itself, or `path/vae` when `path` is a whole diffusers pipeline."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        if not (path / "vae").is_dir():
            raise CheckpointError(f"{path} is a diffusers pipeline folder without a vae/ folder")
        return path / "vae"
    return path


def load_diffusers_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                          mel_bins: int = MEL_BINS) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors (or .bin)."""
    folder = Path(folder)
    config = hub.read_json(folder / "config.json")
    if "_class_name" not in config:
        raise CheckpointError(f"{folder / 'config.json'} is neither a diffusers AutoencoderKL config (no "
                              f"'_class_name') nor a native one")
    return load_diffusers(config, hub.load_state_dict(folder), source=str(folder), dtype=dtype, mel_bins=mel_bins)
