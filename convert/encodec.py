"""EnCodec checkpoints -> `musiclm_core.encodec.EnCodec`, from two sources.

transformers (`facebook/encodec_24khz`, `_32khz`, `_48khz`, and the `audio_encoder.` part of MusicGen checkpoints):
    `config.json` translated field by field (`config_from_transformers`), weight norm folded, keys renamed by
    `transformers_table`, the codebooks' training buffers dropped by name, codebooks stacked.
audiocraft (`compression_state_dict.bin` of the MusicGen repos): a torch-saved dict
    {"best_state": state dict, "xp.cfg": YAML of the training config, "version", "exported"}; the config is read
    from the YAML (`config_from_audiocraft`), keys renamed by `audiocraft_table`. The stereo repos ship a 589-byte
    pointer {"pretrained": "facebook/encodec_32khz", ...} instead, which is followed to that hub repo.

Both sources lay the SEANet out as one flat list of layers, parameter-free ELUs included, so a layer's index
depends on the config; `seanet_layers` walks that list once and both key tables are written from it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import typing
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.convert.keys import build, fold_weight_norm, rename, strip_prefix
from musiclm_core.encodec import EnCodec, EnCodecConfig
from musiclm_core.hub import CheckpointError, check_value

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# transformers config

# Fields every transformers config may carry that say nothing about the maths: bookkeeping, and the generation
# defaults that 4.x configs (e.g. the `audio_encoder` part of a MusicGen config.json) serialised for every model.
HF_GENERIC_CONFIG_FIELDS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "use_cache",
})

# transformers' EncodecConfig defaults (configuration_encodec.py), for fields an older config.json may omit.
HF_DEFAULTS: dict[str, Any] = {
    "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "sampling_rate": 24_000, "audio_channels": 1,
    "normalize": False, "chunk_length_s": None, "overlap": None, "hidden_size": 128, "num_filters": 32,
    "num_residual_layers": 1, "upsampling_ratios": [8, 5, 4, 2], "norm_type": "weight_norm", "kernel_size": 7,
    "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_growth_rate": 2, "use_causal_conv": True,
    "pad_mode": "reflect", "compress": 2, "num_lstm_layers": 2, "trim_right_ratio": 1.0, "codebook_size": 1024,
    "codebook_dim": None, "use_conv_shortcut": True,
}

# their field -> our field, for the fields that carry over unchanged.
HF_FIELDS = {
    "sampling_rate": "sample_rate", "audio_channels": "channels", "num_filters": "num_filters",
    "upsampling_ratios": "ratios", "hidden_size": "dimension", "codebook_size": "codebook_size",
    "target_bandwidths": "target_bandwidths", "num_residual_layers": "num_residual_layers",
    "num_lstm_layers": "lstm_layers", "kernel_size": "kernel_size", "last_kernel_size": "last_kernel_size",
    "residual_kernel_size": "residual_kernel_size", "dilation_growth_rate": "dilation_base", "compress": "compress",
    "use_causal_conv": "causal", "pad_mode": "pad_mode", "trim_right_ratio": "trim_right_ratio",
    "use_conv_shortcut": "conv_shortcut", "normalize": "normalize", "chunk_length_s": "chunk_length_s",
    "overlap": "overlap",
}


def config_from_transformers(hf: dict[str, Any], *, source: str = "transformers config") -> EnCodecConfig:
    """An `EncodecConfig` dict (config.json) -> EnCodecConfig. Unknown fields are an error that names them."""
    if hf.get("model_type", "encodec") != "encodec":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not an EnCodec ('encodec')")
    theirs = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k not in HF_GENERIC_CONFIG_FIELDS}}
    unknown = sorted(set(theirs) - set(HF_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{source}: EnCodec config fields the converter does not know: {unknown}")
    if theirs["norm_type"] not in ("weight_norm", "time_group_norm"):
        raise CheckpointError(f"{source}: norm_type {theirs['norm_type']!r} is not 'weight_norm' or 'time_group_norm'")
    if theirs["codebook_dim"] not in (None, theirs["hidden_size"]):
        # transformers has no projection in or out of the quantiser, so the two must agree.
        raise CheckpointError(f"{source}: codebook_dim {theirs['codebook_dim']} differs from hidden_size "
                              f"{theirs['hidden_size']}")
    types = typing.get_type_hints(EnCodecConfig)
    for their, our in HF_FIELDS.items():  # a value of the wrong type, named as the file names it
        check_value(theirs[their], types[our], field=their, source=source)
    ours = {our: theirs[their] for their, our in HF_FIELDS.items()}
    ours["group_norm"] = theirs["norm_type"] == "time_group_norm"  # weight norm is folded: no trace of it left
    return EnCodecConfig.from_dict(ours, source=source)


# ---------------------------------------------------------------------------------------------------------------
# Key tables


def seanet_layers(config: EnCodecConfig) -> list[tuple[str, int, str, str]]:
    """(side, index in the reference's layer list, our module path, kind) of every layer that has weights.

    kind: "conv", "convtr", "res" (residual block) or "lstm". The indices skipped are the ELUs.
    """
    out = []
    i = 0
    out.append(("encoder", i, "encoder.conv_in", "conv"))
    for s in range(len(config.ratios)):
        for j in range(config.num_residual_layers):
            i += 1
            out.append(("encoder", i, f"encoder.stages.{s}.res.{j}", "res"))
        i += 2  # ELU, then the strided conv
        out.append(("encoder", i, f"encoder.stages.{s}.down", "conv"))
    if config.lstm_layers:
        i += 1
        out.append(("encoder", i, "encoder.lstm", "lstm"))
    i += 2  # ELU, then the last conv
    out.append(("encoder", i, "encoder.conv_out", "conv"))

    i = 0
    out.append(("decoder", i, "decoder.conv_in", "conv"))
    if config.lstm_layers:
        i += 1
        out.append(("decoder", i, "decoder.lstm", "lstm"))
    for s in range(len(config.ratios)):
        i += 2  # ELU, then the transposed conv
        out.append(("decoder", i, f"decoder.stages.{s}.up", "convtr"))
        for j in range(config.num_residual_layers):
            i += 1
            out.append(("decoder", i, f"decoder.stages.{s}.res.{j}", "res"))
    i += 2
    out.append(("decoder", i, "decoder.conv_out", "conv"))
    return out


def _conv_rows(weights: str, norm: str, ours: str, config: EnCodecConfig) -> list[tuple[str, str]]:
    rows = [(f"{weights}.weight", f"{ours}.weight"), (f"{weights}.bias", f"{ours}.bias")]
    if config.group_norm:
        rows += [(f"{norm}.weight", f"{ours}.norm.weight"), (f"{norm}.bias", f"{ours}.norm.bias")]
    return rows


def _lstm_rows(theirs: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{theirs}.{p}_l{{n}}", f"{ours}.{p}_l{{n}}") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def _residual_parts(config: EnCodecConfig) -> list[tuple[str, str]]:
    """(their sub-module, ours) of a residual block: block = [ELU, conv, ELU, conv], then the optional shortcut."""
    return [("block.1", "conv1"), ("block.3", "conv2")] + ([("shortcut", "shortcut")] if config.conv_shortcut else [])


def transformers_table(config: EnCodecConfig) -> list[tuple[str, str]]:
    """transformers keys (after `fold_weight_norm`) -> ours. A conv is `{layer}.conv.*`, its norm `{layer}.norm.*`."""
    rows = []
    for side, i, ours, kind in seanet_layers(config):
        layer = f"{side}.layers.{i}"
        if kind == "lstm":
            rows += _lstm_rows(f"{layer}.lstm", ours)
        elif kind == "res":
            for sub, our_sub in _residual_parts(config):
                rows += _conv_rows(f"{layer}.{sub}.conv", f"{layer}.{sub}.norm", f"{ours}.{our_sub}", config)
        else:
            rows += _conv_rows(f"{layer}.conv", f"{layer}.norm", ours, config)
    rows.append(("quantizer.layers.{q}.codebook.embed", "quantizer.codebooks.{q}"))
    return rows


# The codebooks' k-means / EMA training state: unused at inference. Whole-key patterns, so `embed` never
# catches `embed_avg` (the trap transformers' own converter works around).
TRANSFORMERS_DROPPED = (
    "quantizer.layers.{q}.codebook.embed_avg",
    "quantizer.layers.{q}.codebook.cluster_size",
    "quantizer.layers.{q}.codebook.inited",
)


def audiocraft_table(config: EnCodecConfig) -> list[tuple[str, str]]:
    """audiocraft keys (after `fold_weight_norm`) -> ours. A conv is `{layer}.conv.conv.*` (the streamable conv
    wraps a norm-conv that wraps the conv), its norm `{layer}.conv.norm.*`; transposed: `.convtr.convtr.*`."""
    rows = []
    for side, i, ours, kind in seanet_layers(config):
        layer = f"{side}.model.{i}"
        if kind == "lstm":
            rows += _lstm_rows(f"{layer}.lstm", ours)
        elif kind == "res":
            for sub, our_sub in _residual_parts(config):
                rows += _conv_rows(f"{layer}.{sub}.conv.conv", f"{layer}.{sub}.conv.norm", f"{ours}.{our_sub}", config)
        elif kind == "convtr":
            rows += _conv_rows(f"{layer}.convtr.convtr", f"{layer}.convtr.norm", ours, config)
        else:
            rows += _conv_rows(f"{layer}.conv.conv", f"{layer}.conv.norm", ours, config)
    rows.append(("quantizer.vq.layers.{q}._codebook.embed", "quantizer.codebooks.{q}"))
    return rows


AUDIOCRAFT_DROPPED = (
    "quantizer.vq.layers.{q}._codebook.embed_avg",
    "quantizer.vq.layers.{q}._codebook.cluster_size",
    "quantizer.vq.layers.{q}._codebook.inited",
)


def stack_codebooks(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """`quantizer.codebooks.{q}` (V, D) for q = 0..K-1 -> one `quantizer.codebooks` (K, V, D)."""
    prefix = "quantizer.codebooks."
    books = {int(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if not books:
        return out  # `build` reports the missing codebooks
    missing = sorted(set(range(max(books) + 1)) - set(books))
    if missing:
        raise CheckpointError(f"{source}: codebooks {missing} are missing (found {sorted(books)})")
    shapes = {tuple(v.shape) for v in books.values()}
    if len(shapes) != 1:
        raise CheckpointError(f"{source}: codebooks of different shapes: "
                              f"{ {q: tuple(v.shape) for q, v in sorted(books.items())} }")
    out["quantizer.codebooks"] = torch.stack([books[q] for q in range(len(books))])
    return out


def _load(config: EnCodecConfig, state: dict[str, torch.Tensor], table: list[tuple[str, str]],
          dropped: tuple[str, ...], *, source: str, dtype: torch.dtype) -> EnCodec:
    state = fold_weight_norm(state)
    state = rename(state, table, dropped=dropped, source=source)
    state = stack_codebooks(state, source=source)
    return build(lambda: EnCodec(config), state, source=source, dtype=dtype)


def load_transformers(hf_config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> EnCodec:
    """A transformers `EncodecModel` (config dict + state dict, no prefix) -> EnCodec.

    MusicGen reuses it: `load_transformers(config["audio_encoder"], strip_prefix(state, "audio_encoder."), ...)`.
    """
    config = config_from_transformers(hf_config, source=source)
    return _load(config, state, transformers_table(config), TRANSFORMERS_DROPPED, source=source, dtype=dtype)


def load_transformers_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> EnCodec:
    """A transformers folder: an `encodec` one, or a MusicGen one (its `audio_encoder` part)."""
    folder = Path(folder)
    config = hub.read_json(folder / "config.json")
    state = hub.load_state_dict(folder)
    model_type = config.get("model_type")
    if model_type in ("musicgen", "musicgen_melody"):
        if not isinstance(config.get("audio_encoder"), dict):
            raise CheckpointError(f"{folder / 'config.json'}: a {model_type} config without an 'audio_encoder'")
        return load_transformers(config["audio_encoder"], strip_prefix(state, "audio_encoder."),
                                 source=f"{folder} (audio_encoder)", dtype=dtype)
    return load_transformers(config, state, source=str(folder), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# audiocraft


def parse_xp_config(text: str, *, source: str) -> dict[str, Any]:
    """The YAML of an audiocraft `xp.cfg` -> a dict, with OmegaConf's `${a.b}` references to other keys resolved.

    References that do not name a key of the config (`${oc.env:USER}`, `${dora.dir}`, ...) are left as they are:
    they sit in sections the converter does not read, and reading one is an error (`config_from_audiocraft`).
    PyYAML is a dependency of huggingface_hub, itself a dependency of this package.
    """
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CheckpointError(f"{source}: xp.cfg is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: xp.cfg holds a {type(cfg).__name__}, expected a mapping")
    reference = re.compile(r"\$\{([\w.]+)\}")

    def lookup(match: re.Match, depth: int) -> Any:
        node: Any = cfg
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                return match.group(0)
            node = node[part]
        return resolve(node, depth + 1)

    def resolve(node: Any, depth: int = 0) -> Any:
        if depth > 50:
            raise CheckpointError(f"{source}: xp.cfg references loop")
        if isinstance(node, dict):
            return {k: resolve(v, depth + 1) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, depth + 1) for v in node]
        if isinstance(node, str):
            whole = reference.fullmatch(node)
            if whole:
                return lookup(whole, depth)
            return reference.sub(lambda m: str(lookup(m, depth)), node)
        return node

    return resolve(cfg)


# The SEANet fields of audiocraft's config (config/model/encodec/default.yaml) that the converter knows.
_SEANET_USED = {"dimension", "channels", "causal", "n_filters", "n_residual_layers", "ratios", "activation",
                "activation_params", "norm", "norm_params", "kernel_size", "residual_kernel_size",
                "last_kernel_size", "dilation_base", "pad_mode", "true_skip", "compress", "lstm",
                "disable_norm_outer_blocks", "encoder", "decoder"}
_DECODER_ONLY = {"trim_right_ratio", "final_activation", "final_activation_params"}
# Training-only settings of the residual VQ (k-means init, EMA decay, dead-code expiry, dropout, regularisers).
_RVQ_TRAINING = {"q_dropout", "decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code",
                 "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes"}


def config_from_audiocraft(cfg: dict[str, Any], *, source: str) -> EnCodecConfig:
    """The resolved `xp.cfg` of an audiocraft EnCodec -> EnCodecConfig. Settings we cannot honour are errors."""
    def need(node: dict[str, Any], key: str, where: str) -> Any:
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{source}: xp.cfg has no {where}{key}")
        if isinstance(node[key], str) and "${" in node[key]:
            raise CheckpointError(f"{source}: xp.cfg leaves {where}{key} = {node[key]} unresolved")
        return node[key]

    if cfg.get("compression_model", "encodec") != "encodec":
        raise CheckpointError(f"{source}: compression_model {cfg.get('compression_model')!r} is not 'encodec'")
    encodec = cfg.get("encodec") or {}
    if encodec.get("autoencoder", "seanet") != "seanet" or encodec.get("quantizer", "rvq") != "rvq":
        raise CheckpointError(f"{source}: only the seanet autoencoder with the rvq quantizer is supported, got "
                              f"{encodec.get('autoencoder')!r} / {encodec.get('quantizer')!r}")
    seanet = need(cfg, "seanet", "")
    rvq = need(cfg, "rvq", "")
    unknown = sorted(set(seanet) - _SEANET_USED)
    if unknown:
        raise CheckpointError(f"{source}: seanet settings the converter does not know: {unknown}")
    encoder_over, decoder_over = seanet.get("encoder") or {}, seanet.get("decoder") or {}
    if encoder_over or set(decoder_over) - _DECODER_ONLY:
        # audiocraft lets either side override any seanet setting; the released models override only these.
        raise CheckpointError(f"{source}: per-side seanet overrides are not supported: encoder {encoder_over}, "
                              f"decoder {sorted(set(decoder_over) - _DECODER_ONLY)}")
    if decoder_over.get("final_activation") is not None:
        raise CheckpointError(f"{source}: a final activation ({decoder_over['final_activation']}) is not supported")
    if need(seanet, "activation", "seanet.") != "ELU" or \
            float((seanet.get("activation_params") or {}).get("alpha", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: only ELU(alpha=1) is supported, got {seanet.get('activation')} "
                              f"{seanet.get('activation_params')}")
    norm = need(seanet, "norm", "seanet.")
    if norm not in ("weight_norm", "none", "time_group_norm"):
        raise CheckpointError(f"{source}: seanet.norm {norm!r} is not supported")
    if norm == "time_group_norm" and seanet.get("disable_norm_outer_blocks", 0):
        raise CheckpointError(f"{source}: time_group_norm with disable_norm_outer_blocks is not supported")
    if seanet.get("norm_params"):
        raise CheckpointError(f"{source}: seanet.norm_params {seanet['norm_params']} are not supported")
    unknown = sorted(set(rvq) - _RVQ_TRAINING - {"n_q", "bins", "dimension"})
    if unknown:
        raise CheckpointError(f"{source}: rvq settings the converter does not know: {unknown}")
    dimension = int(need(seanet, "dimension", "seanet."))
    if rvq.get("dimension", dimension) != dimension:
        raise CheckpointError(f"{source}: rvq.dimension {rvq['dimension']} differs from seanet.dimension {dimension}")
    if "causal" in encodec and bool(encodec["causal"]) != bool(seanet.get("causal", False)):
        raise CheckpointError(f"{source}: encodec.causal and seanet.causal disagree")

    pad_mode = need(seanet, "pad_mode", "seanet.")
    (logger.warning if pad_mode != "reflect" else logger.info)(
        "%s: audiocraft SEANet pad_mode is %r (from xp.cfg); transformers' converted configs use 'reflect', so "
        "the first and last frames can differ from a transformers model with the same weights", source, pad_mode)

    ratios = tuple(int(r) for r in need(seanet, "ratios", "seanet."))
    sample_rate = int(need(cfg, "sample_rate", ""))
    hop = math.prod(ratios)
    n_q, bins = int(need(rvq, "n_q", "rvq.")), int(need(rvq, "bins", "rvq."))
    if sample_rate % hop:
        raise CheckpointError(f"{source}: sample_rate {sample_rate} is not a multiple of the hop {hop}")
    # audiocraft sets the codebook count directly; our config derives it from the bandwidth it gives.
    bandwidth = n_q * math.log2(bins) * (sample_rate // hop) / 1000
    config = EnCodecConfig.from_dict(dict(
        sample_rate=sample_rate,
        channels=int(need(cfg, "channels", "")),
        num_filters=int(need(seanet, "n_filters", "seanet.")),
        ratios=ratios,
        dimension=dimension,
        codebook_size=bins,
        target_bandwidths=(bandwidth,),
        num_residual_layers=int(need(seanet, "n_residual_layers", "seanet.")),
        lstm_layers=int(need(seanet, "lstm", "seanet.")),
        kernel_size=int(need(seanet, "kernel_size", "seanet.")),
        last_kernel_size=int(need(seanet, "last_kernel_size", "seanet.")),
        residual_kernel_size=int(need(seanet, "residual_kernel_size", "seanet.")),
        dilation_base=int(need(seanet, "dilation_base", "seanet.")),
        compress=int(need(seanet, "compress", "seanet.")),
        causal=bool(seanet.get("causal", False)),
        pad_mode=pad_mode,
        trim_right_ratio=float(decoder_over.get("trim_right_ratio", 1.0)),
        conv_shortcut=not bool(need(seanet, "true_skip", "seanet.")),
        group_norm=norm == "time_group_norm",
        normalize=bool(encodec.get("renormalize", False)),
    ), source=source)
    if config.num_codebooks != n_q:
        raise CheckpointError(f"{source}: rvq.n_q {n_q} does not come back from bandwidth {bandwidth} kbps "
                              f"({config.num_codebooks} codebooks)")
    return config


def load_audiocraft(package: dict[str, Any], *, source: str, dtype: torch.dtype = torch.float32) -> EnCodec:
    """The dict in an audiocraft `compression_state_dict.bin` -> EnCodec (following a stereo repo's pointer)."""
    if "best_state" not in package and isinstance(package.get("pretrained"), str):
        # The stereo MusicGen repos: audiocraft loads transformers' EncodecModel from this hub id instead.
        name = package["pretrained"]
        logger.info("%s points to %s; loading that instead", source, name)
        try:
            return EnCodec.from_pretrained(name, dtype=dtype)
        except CheckpointError as err:
            raise CheckpointError(f"{source} points to {name!r}, the codec audiocraft loads instead: {err}") from err
    missing = [k for k in ("best_state", "xp.cfg") if k not in package]
    if missing:
        raise CheckpointError(f"{source}: not an audiocraft compression package: no {missing} "
                              f"(found keys {sorted(map(str, package))})")
    state = package["best_state"]
    if isinstance(state, dict) and set(state) == {"model"} and isinstance(state["model"], dict):
        state = state["model"]  # an unexported solver checkpoint nests the weights one level deeper
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: best_state is not a state dict of tensors")
    if not isinstance(package["xp.cfg"], str):
        raise CheckpointError(f"{source}: xp.cfg is a {type(package['xp.cfg']).__name__}, expected YAML text")
    config = config_from_audiocraft(parse_xp_config(package["xp.cfg"], source=source), source=source)
    return _load(config, state, audiocraft_table(config), AUDIOCRAFT_DROPPED, source=source, dtype=dtype)


def load_audiocraft_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> EnCodec:
    path = Path(folder) / "compression_state_dict.bin"
    if not path.is_file():
        present = sorted(p.name for p in Path(folder).iterdir())
        raise CheckpointError(f"{folder} is an audiocraft folder without compression_state_dict.bin "
                              f"(the EnCodec part); found {present}")
    return load_audiocraft(hub.load_tensors(path), source=str(path), dtype=dtype)
