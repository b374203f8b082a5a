"""transformers `SpeechT5HifiGan` checkpoints -> `musiclm_core.hifigan.HifiGan`.

The source: the `vocoder/` folder of the diffusers pipelines (ucsd-reach/musicldm, cvssp/audioldm2*), or any
`speecht5_hifigan` folder (microsoft/speecht5_hifigan). `config.json` is translated field by field
(`config_from_transformers`); weight norm, if the file holds it (a model saved after `apply_weight_norm()`:
`*.parametrizations.weight.original0/1`; the older `*.weight_g/_v`), is folded into plain weights; the keys are
renamed by `TRANSFORMERS_TABLE` (the same names as ours: the table is there so that every key is accounted for);
the `mean` / `scale` buffers, which some converted files may lack, are made by `default_statistics` when the model
does not use them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.convert.encodec import HF_GENERIC_CONFIG_FIELDS
from musiclm_core.convert.keys import build, fold_weight_norm, rename
from musiclm_core.hifigan import HifiGan, HifiGanConfig
from musiclm_core.hub import CheckpointError

# transformers' SpeechT5HifiGanConfig defaults (configuration_speecht5.py), for fields a config.json may omit.
HF_DEFAULTS: dict[str, Any] = {
    "model_in_dim": 80, "sampling_rate": 16_000, "upsample_initial_channel": 512, "upsample_rates": [4, 4, 4, 4],
    "upsample_kernel_sizes": [8, 8, 8, 8], "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "initializer_range": 0.01,
    "leaky_relu_slope": 0.1, "normalize_before": True,
}

# their field -> our field.
HF_FIELDS = {
    "model_in_dim": "mel_bins", "sampling_rate": "sample_rate", "upsample_initial_channel": "initial_channels",
    "upsample_rates": "upsample_rates", "upsample_kernel_sizes": "upsample_kernel_sizes",
    "resblock_kernel_sizes": "resblock_kernel_sizes", "resblock_dilation_sizes": "resblock_dilations",
    "leaky_relu_slope": "leaky_relu_slope", "normalize_before": "normalize_before",
}

# Fields read and ignored on purpose: the spread of the random initialisation, which a trained model has no use
# for. (HF_GENERIC_CONFIG_FIELDS, ignored too, are transformers' bookkeeping and generation defaults.)
HF_IGNORED = frozenset({"initializer_range"})


def config_from_transformers(hf: dict[str, Any], *, source: str = "transformers config") -> HifiGanConfig:
    """A `SpeechT5HifiGanConfig` dict (config.json) -> HifiGanConfig. Unknown fields are an error that names them."""
    if hf.get("model_type", "speecht5_hifigan") != "speecht5_hifigan":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not a SpeechT5HifiGan "
                              f"('speecht5_hifigan')")
    theirs = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k not in HF_GENERIC_CONFIG_FIELDS}}
    unknown = sorted(set(theirs) - set(HF_FIELDS) - HF_IGNORED)
    if unknown:
        raise CheckpointError(f"{source}: SpeechT5HifiGan config fields the converter does not know: {unknown}")
    return HifiGanConfig.from_dict({ours: theirs[their] for their, ours in HF_FIELDS.items()}, source=source)


# Their keys (after fold_weight_norm) -> ours. The layouts agree; every row still has to match for a key to load.
TRANSFORMERS_TABLE = [
    ("conv_pre.weight", "conv_pre.weight"),
    ("conv_pre.bias", "conv_pre.bias"),
    ("upsampler.{i}.weight", "upsampler.{i}.weight"),
    ("upsampler.{i}.bias", "upsampler.{i}.bias"),
    ("resblocks.{i}.convs1.{j}.weight", "resblocks.{i}.convs1.{j}.weight"),
    ("resblocks.{i}.convs1.{j}.bias", "resblocks.{i}.convs1.{j}.bias"),
    ("resblocks.{i}.convs2.{j}.weight", "resblocks.{i}.convs2.{j}.weight"),
    ("resblocks.{i}.convs2.{j}.bias", "resblocks.{i}.convs2.{j}.bias"),
    ("conv_post.weight", "conv_post.weight"),
    ("conv_post.bias", "conv_post.bias"),
    ("mean", "mean"),
    ("scale", "scale"),
]


def default_statistics(state: dict[str, torch.Tensor], config: HifiGanConfig, *,
                       source: str) -> dict[str, torch.Tensor]:
    """Add `mean` = 0 and `scale` = 1 when the file has neither and the model does not normalise its input
    (they are then unused); a model with `normalize_before` needs the stored ones."""
    present = {"mean", "scale"} & state.keys()
    if present == {"mean", "scale"}:
        return state
    if config.normalize_before or present:
        raise CheckpointError(f"{source}: the input statistics are incomplete: found {sorted(present)} of "
                              f"['mean', 'scale'] (normalize_before={config.normalize_before})")
    return {**state, "mean": torch.zeros(config.mel_bins), "scale": torch.ones(config.mel_bins)}


def load_transformers(hf_config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> HifiGan:
    """A transformers `SpeechT5HifiGan` (config dict + state dict) -> HifiGan."""
    config = config_from_transformers(hf_config, source=source)
    state = fold_weight_norm(state)
    state = rename(state, TRANSFORMERS_TABLE, source=source)
    state = default_statistics(state, config, source=source)
    return build(lambda: HifiGan(config), state, source=source, dtype=dtype)


def load_transformers_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> HifiGan:
    """A `speecht5_hifigan` folder: config.json + model.safetensors or pytorch_model.bin (read weights-only)."""
    folder = Path(folder)
    config = hub.read_json(folder / "config.json")
    return load_transformers(config, hub.load_state_dict(folder), source=str(folder), dtype=dtype)
