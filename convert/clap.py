"""CLAP checkpoints in transformers' layout (`ClapModel`) -> `CLAP`.

Sources: laion/clap-htsat-unfused and laion/larger_clap_music (config.json, model.safetensors or
pytorch_model.bin, the tokenizer files and preprocessor_config.json in one folder), and the `text_encoder/`
(+ `tokenizer/`, `feature_extractor/`) of the MusicLDM / AudioLDM 2 pipelines, whose weights are stored in
float64 (their config says `torch_dtype: float64`): `keys.build` casts every floating tensor to the working
dtype.

The model's settings come from three files, read field by field: config.json (both towers, the projection),
tokenizer_config.json (the longest input), preprocessor_config.json (the log-mel front end). Fields that only
concern training (dropout rates, initialiser factors, drop path, num_classes) or that transformers derives
(the top-level hidden_size / num_hidden_layers) are not read. Settings we do not implement are errors: feature
fusion (`enable_fusion`, truncation "fusion"), activations other than erf GELU in the towers, multi-channel
patch input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.clap import ACTIVATIONS, CLAP, PADDINGS, CLAPConfig, CLAPTokenizer, relative_position_index
from musiclm_core.convert.keys import build, concat_rows, rename

# transformers' defaults (models/clap/configuration_clap.py): a config.json may leave any of these out.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1,
    "layer_norm_eps": 1e-12, "pad_token_id": 1,
}
AUDIO_DEFAULTS: dict[str, Any] = {
    "window_size": 8, "num_mel_bins": 64, "spec_size": 256, "hidden_act": "gelu", "patch_size": 4,
    "patch_stride": [4, 4], "hidden_size": 768, "depths": [2, 2, 6, 2], "num_attention_heads": [4, 8, 16, 32],
    "enable_fusion": False, "patch_embed_input_channels": 1, "flatten_patch_embeds": True,
    "patch_embeds_hidden_size": 96, "enable_patch_layer_norm": True, "qkv_bias": True, "mlp_ratio": 4.0,
    "layer_norm_eps": 1e-5,
}
TOP_DEFAULTS: dict[str, Any] = {"projection_dim": 512, "projection_hidden_act": "relu",
                                "logit_scale_init_value": 1 / 0.07}
# ClapFeatureExtractor's own defaults differ from the checkpoints' (frequency_min 0, truncation "fusion"), so a
# checkpoint without preprocessor_config.json is an error rather than a guess.
FEATURE_DEFAULTS: dict[str, Any] = {
    "sampling_rate": 48_000, "feature_size": 64, "fft_window_size": 1024, "hop_length": 480,
    "frequency_min": 0.0, "frequency_max": 14_000.0, "max_length_s": 10, "padding": "repeatpad",
    "truncation": "fusion",
}


def _pair(value: Any, name: str, source: str) -> int:
    """4 or [4, 4] -> 4; transformers allows rectangles, which the checkpoints never use and we do not."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise hub.CheckpointError(f"{source}: {name} {value} is not square; only square patches are supported")
        value = value[0]
    return int(value)


def config_from_transformers(hf_config: dict[str, Any], *, tokenizer_options: dict[str, Any],
                             features: dict[str, Any], source: str) -> CLAPConfig:
    """ClapModel's config.json + tokenizer_config.json + preprocessor_config.json -> CLAPConfig."""
    if hf_config.get("model_type", "clap") != "clap":
        raise hub.CheckpointError(f"{source}: model_type is {hf_config.get('model_type')!r}, expected 'clap' "
                                  f"(a ClapModel; ClapTextModelWithProjection folders are not supported)")
    text_cfg, audio_cfg = hf_config.get("text_config") or {}, hf_config.get("audio_config") or {}

    def text(name):
        return text_cfg.get(name, TEXT_DEFAULTS[name])

    def audio(name):
        return audio_cfg.get(name, AUDIO_DEFAULTS[name])

    def top(name):
        return hf_config.get(name, TOP_DEFAULTS[name])

    def feature(name):
        return features.get(name, FEATURE_DEFAULTS[name])

    if audio("enable_fusion"):
        raise hub.CheckpointError(f"{source}: audio_config.enable_fusion is true (a fused CLAP such as "
                                  f"laion/clap-htsat-fused); only unfused checkpoints are supported")
    for name, value, expected in (("text_config.hidden_act", text("hidden_act"), "gelu"),
                                  ("audio_config.hidden_act", audio("hidden_act"), "gelu"),
                                  ("audio_config.patch_embed_input_channels", audio("patch_embed_input_channels"), 1),
                                  ("audio_config.flatten_patch_embeds", audio("flatten_patch_embeds"), True)):
        if value != expected:
            raise hub.CheckpointError(f"{source}: {name} is {value!r}; only {expected!r} is supported")
    if top("projection_hidden_act") not in ACTIVATIONS:
        raise hub.CheckpointError(f"{source}: projection_hidden_act {top('projection_hidden_act')!r} is not one of "
                                  f"{ACTIVATIONS}")
    if feature("truncation") != "rand_trunc":
        raise hub.CheckpointError(f"{source}: preprocessor truncation is {feature('truncation')!r}; only "
                                  f"'rand_trunc' is supported ('fusion' feeds the fused audio tower)")
    if feature("padding") not in PADDINGS:
        raise hub.CheckpointError(f"{source}: preprocessor padding {feature('padding')!r} is not one of {PADDINGS}")
    if feature("feature_size") != audio("num_mel_bins"):
        raise hub.CheckpointError(f"{source}: the feature extractor makes {feature('feature_size')} mel bins, the "
                                  f"audio tower expects num_mel_bins {audio('num_mel_bins')}")

    pad, positions = text("pad_token_id"), text("max_position_embeddings")
    longest = positions - pad - 1  # what the position table holds
    max_length = tokenizer_options.get("model_max_length")
    max_length = longest if not isinstance(max_length, int) else min(max_length, longest)
    try:
        return CLAPConfig(
            vocab_size=text("vocab_size"),
            text_dim=text("hidden_size"),
            text_layers=text("num_hidden_layers"),
            text_heads=text("num_attention_heads"),
            text_ffn_dim=text("intermediate_size"),
            max_positions=positions,
            type_vocab_size=text("type_vocab_size"),
            pad_token_id=pad,
            text_norm_eps=text("layer_norm_eps"),
            max_text_length=max_length,
            num_mel_bins=audio("num_mel_bins"),
            spec_size=audio("spec_size"),
            patch_size=_pair(audio("patch_size"), "patch_size", source),
            patch_stride=_pair(audio("patch_stride"), "patch_stride", source),
            patch_dim=audio("patch_embeds_hidden_size"),
            depths=tuple(audio("depths")),
            audio_heads=tuple(audio("num_attention_heads")),
            window_size=audio("window_size"),
            mlp_ratio=audio("mlp_ratio"),
            qkv_bias=audio("qkv_bias"),
            patch_norm=audio("enable_patch_layer_norm"),
            audio_norm_eps=audio("layer_norm_eps"),
            audio_dim=audio("hidden_size"),
            projection_dim=top("projection_dim"),
            projection_act=top("projection_hidden_act"),
            logit_scale_init=top("logit_scale_init_value"),
            sample_rate=feature("sampling_rate"),
            n_fft=feature("fft_window_size"),
            hop_length=feature("hop_length"),
            f_min=float(feature("frequency_min")),
            f_max=float(feature("frequency_max")),
            max_length_s=feature("max_length_s"),
            padding=feature("padding"),
        )
    except (TypeError, ValueError) as err:
        raise hub.CheckpointError(f"{source}: unsupported CLAP config: {err}") from err


# (their key, our key) after `fuse_qkv`. {i}: text layer; {s}: audio stage; {b}: block within the stage.
_TEXT_LAYER = "text_model.encoder.layer.{i}."
_BLOCK = "audio_model.audio_encoder.layers.{s}.blocks.{b}."
TABLE = [
    ("logit_scale_t", "logit_scale_text"),
    ("logit_scale_a", "logit_scale_audio"),
    ("text_model.embeddings.word_embeddings.weight", "text.tok_embed.weight"),
    ("text_model.embeddings.position_embeddings.weight", "text.pos_embed.weight"),
    ("text_model.embeddings.token_type_embeddings.weight", "text.type_embed.weight"),
    ("text_model.embeddings.LayerNorm.weight", "text.embed_norm.weight"),
    ("text_model.embeddings.LayerNorm.bias", "text.embed_norm.bias"),
    *[(_TEXT_LAYER + theirs + p, "text.layers.{i}." + ours + p)
      for theirs, ours in (("attention.self.qkv", "qkv"), ("attention.output.dense", "attn_out"),
                           ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "ffn_up"),
                           ("output.dense", "ffn_down"), ("output.LayerNorm", "ffn_norm"))
      for p in (".weight", ".bias")],
    ("text_model.pooler.dense.weight", "text.pooler.weight"),
    ("text_model.pooler.dense.bias", "text.pooler.bias"),
    *[(f"{tower}_projection.linear{n}.{p}", f"{tower}_proj.fc{n}.{p}")
      for tower in ("text", "audio") for n in (1, 2) for p in ("weight", "bias")],
    *[(f"audio_model.audio_encoder.batch_norm.{p}", f"audio.mel_norm.{p}")
      for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")],
    *[(f"audio_model.audio_encoder.patch_embed.{theirs}.{p}", f"audio.{ours}.{p}")
      for theirs, ours in (("proj", "patch_embed"), ("norm", "patch_norm")) for p in ("weight", "bias")],
    (_BLOCK + "attention.self.relative_position_bias_table", "audio.stages.{s}.{b}.rel_bias"),
    *[(_BLOCK + theirs + p, "audio.stages.{s}.{b}." + ours + p)
      for theirs, ours in (("layernorm_before", "attn_norm"), ("attention.self.qkv", "qkv"),
                           ("attention.output.dense", "attn_out"), ("layernorm_after", "mlp_norm"),
                           ("intermediate.dense", "mlp_up"), ("output.dense", "mlp_down"))
      for p in (".weight", ".bias")],
    ("audio_model.audio_encoder.layers.{s}.downsample.reduction.weight", "audio.merges.{s}.reduction.weight"),
    ("audio_model.audio_encoder.layers.{s}.downsample.norm.weight", "audio.merges.{s}.norm.weight"),
    ("audio_model.audio_encoder.layers.{s}.downsample.norm.bias", "audio.merges.{s}.norm.bias"),
    ("audio_model.audio_encoder.norm.weight", "audio.norm.weight"),
    ("audio_model.audio_encoder.norm.bias", "audio.norm.bias"),
]

# int64 buffers of the checkpoint that we compute instead; `check_buffers` makes sure they hold what we compute.
DROPPED = [
    "text_model.embeddings.position_ids",          # 0..513; positions come from the ids (RoBERTa numbering)
    "text_model.embeddings.token_type_ids",        # all zeros: every token uses token type 0
    _BLOCK + "attention.self.relative_position_index",  # Swin's index, made by `relative_position_index`
]


def fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """query, key and value of every attention (both towers) -> one `attention.self.qkv` tensor, rows q|k|v."""
    for p in ("weight", "bias"):
        state = concat_rows(state, [f".attention.self.{n}.{p}" for n in ("query", "key", "value")],
                            f".attention.self.qkv.{p}")
    return state


def check_buffers(state: dict[str, torch.Tensor], config: CLAPConfig, *, source: str) -> None:
    """The dropped buffers must hold what our model assumes, or the checkpoint would mean something else."""
    types = state.get("text_model.embeddings.token_type_ids")
    if types is not None and bool(types.any()):
        raise hub.CheckpointError(f"{source}: text_model.embeddings.token_type_ids is not all zeros")
    expected = relative_position_index(config.window_size)
    for key, value in state.items():
        if key.endswith("relative_position_index") and not torch.equal(value.long(), expected):
            raise hub.CheckpointError(f"{source}: {key} {tuple(value.shape)} is not Swin's relative position index "
                                      f"for {config.window_size}x{config.window_size} windows")


def build_native(config: CLAPConfig, state: dict[str, torch.Tensor], *, source: str,
                 dtype: torch.dtype = torch.float32) -> CLAP:
    return build(lambda: CLAP(config), state, source=source, dtype=dtype)


def load_transformers(config: CLAPConfig, state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> CLAP:
    """A CLAP (no tokenizer) from a ClapModel state dict, float64 tensors included (cast to `dtype`)."""
    check_buffers(state, config, source=source)
    return build_native(config, rename(fuse_qkv(state), TABLE, dropped=DROPPED, source=source), source=source,
                        dtype=dtype)


def load_transformers_folder(folder: Path, *, tokenizer_folder: Path, features_folder: Path,
                             dtype: torch.dtype = torch.float32) -> CLAP:
    """ClapModel weights and config.json from `folder`, the tokenizer files from `tokenizer_folder` and
    preprocessor_config.json from `features_folder` (the same folder for a transformers repo; text_encoder/,
    tokenizer/ and feature_extractor/ of a diffusers pipeline)."""
    folder, tokenizer_folder, features_folder = Path(folder), Path(tokenizer_folder), Path(features_folder)
    options_file = tokenizer_folder / "tokenizer_config.json"
    config = config_from_transformers(
        hub.read_json(folder / "config.json"),
        tokenizer_options=hub.read_json(options_file) if options_file.is_file() else {},
        features=hub.read_json(features_folder / "preprocessor_config.json"),
        source=str(folder))
    model = load_transformers(config, hub.load_state_dict(folder), source=str(folder), dtype=dtype)
    model.tokenizer = CLAPTokenizer.from_folder(tokenizer_folder)
    if model.tokenizer.vocab_size > config.vocab_size:
        raise hub.CheckpointError(f"{tokenizer_folder}: the tokenizer knows {model.tokenizer.vocab_size} tokens, "
                                  f"the text tower's embedding has {config.vocab_size} rows")
    return model
