"""MusicGen LM checkpoints: the transformers composite layout and audiocraft's `state_dict.bin`.

transformers (`MusicgenForConditionalGeneration`): one state dict holding `text_encoder.*` (T5), `audio_encoder.*`
(EnCodec), `decoder.*` (the LM) and `enc_to_dec_proj.*` (text projection). This module takes the last two;
`convert/t5.py` and `convert/encodec.py` take the others.

audiocraft: `state_dict.bin` = {'best_state': LM state dict (fp16), 'xp.cfg': YAML of the training config, ...},
with the attention q/k/v fused into one `in_proj_weight` (specs/musicgen.md section 2.3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from musiclm_core import hub
from musiclm_core.convert import keys
from musiclm_core.hub import CheckpointError
from musiclm_core.musicgen import MusicGenConfig, MusicGenLM

# ---------------------------------------------------------------------------------------------------------------
# transformers

TRANSFORMERS_TABLE = [
    ("decoder.model.decoder.embed_tokens.{k}.weight", "embeddings.{k}.weight"),
    # q/k/v land on parts that fuse_self_attention then joins into our one `qkv` weight
    ("decoder.model.decoder.layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.q.weight"),
    ("decoder.model.decoder.layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.k.weight"),
    ("decoder.model.decoder.layers.{i}.self_attn.v_proj.weight", "layers.{i}.self_attn.v.weight"),
    ("decoder.model.decoder.layers.{i}.self_attn.out_proj.weight", "layers.{i}.self_attn.out.weight"),
    ("decoder.model.decoder.layers.{i}.self_attn_layer_norm.weight", "layers.{i}.self_norm.weight"),
    ("decoder.model.decoder.layers.{i}.self_attn_layer_norm.bias", "layers.{i}.self_norm.bias"),
    ("decoder.model.decoder.layers.{i}.encoder_attn.q_proj.weight", "layers.{i}.cross_attn.q.weight"),
    ("decoder.model.decoder.layers.{i}.encoder_attn.k_proj.weight", "layers.{i}.cross_attn.k.weight"),
    ("decoder.model.decoder.layers.{i}.encoder_attn.v_proj.weight", "layers.{i}.cross_attn.v.weight"),
    ("decoder.model.decoder.layers.{i}.encoder_attn.out_proj.weight", "layers.{i}.cross_attn.out.weight"),
    ("decoder.model.decoder.layers.{i}.encoder_attn_layer_norm.weight", "layers.{i}.cross_norm.weight"),
    ("decoder.model.decoder.layers.{i}.encoder_attn_layer_norm.bias", "layers.{i}.cross_norm.bias"),
    ("decoder.model.decoder.layers.{i}.fc1.weight", "layers.{i}.ffn_in.weight"),
    ("decoder.model.decoder.layers.{i}.fc2.weight", "layers.{i}.ffn_out.weight"),
    ("decoder.model.decoder.layers.{i}.final_layer_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("decoder.model.decoder.layers.{i}.final_layer_norm.bias", "layers.{i}.ffn_norm.bias"),
    ("decoder.model.decoder.layer_norm.weight", "norm.weight"),
    ("decoder.model.decoder.layer_norm.bias", "norm.bias"),
    ("decoder.lm_heads.{k}.weight", "heads.{k}.weight"),
    ("enc_to_dec_proj.weight", "text_proj.weight"),
    ("enc_to_dec_proj.bias", "text_proj.bias"),
]
TRANSFORMERS_DROPPED = [
    # Checkpoints written by transformers 4.31 stored the sinusoid table as a parameter; it is a derived constant
    # (made again by MusicGenLM.reset_buffers), so the stored copy is not used (G2).
    "decoder.model.decoder.embed_positions.weights",
]
# The other parts of the composite checkpoint, loaded by their own converters.
OTHER_PARTS = ("text_encoder.", "audio_encoder.")


SELF_ATTENTION_PARTS = ("self_attn.q.weight", "self_attn.k.weight", "self_attn.v.weight")


def fuse_self_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renamed transformers tensors -> ours: each layer's self-attention q, k, v joined into `self_attn.qkv`."""
    return keys.concat_rows(state, SELF_ATTENTION_PARTS, "self_attn.qkv.weight")


# Whether loading copies this tensor of the checkpoint (the self-attention q/k/v that `fuse_self_attention`
# joins): better read into memory of its own than mapped, whose pages would stay resident next to the copy.
is_copied_key = keys.renamed_onto(TRANSFORMERS_TABLE, lambda ours: ours.endswith(SELF_ATTENTION_PARTS))


def is_lm_key(key: str) -> bool:
    """Whether a key of a composite transformers state dict is the LM's: everything but the two encoders'."""
    return not key.startswith(OTHER_PARTS)


def read_state(folder: str | os.PathLike, *, variant: str | None, lm_in_memory: bool = False
               ) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers MusicGen folder, mapped, but for those that loading copies (`is_copied_key`):
    these are read into memory of their own, so that their mapped pages are never touched (they would stay
    resident next to the copy). With `lm_in_memory`, all of the LM's tensors are read: a quantised load then frees
    each fp32 weight as soon as its quantised copy replaces it, while T5 and EnCodec stay mapped."""
    read = is_lm_key if lm_in_memory else is_copied_key
    return hub.load_state_dict(folder, variant=variant, mmap=lambda key: not read(key))


def lm_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LM's share of a composite transformers state dict."""
    return {k: v for k, v in state.items() if is_lm_key(k)}


def config_from_transformers(config: dict[str, Any], *, model_type: str = "musicgen",
                             cross_attention: bool = True, source: str = "config.json") -> MusicGenConfig:
    """MusicGenConfig from a transformers `MusicgenConfig` dict, field by field.

    model_type="musicgen_melody", cross_attention=False reads a MusicGen Melody config, whose decoder and text
    sub-configs are MusicGen's (convert/musicgen_melody.py reads its chroma fields). `source` names the file in
    errors (a value of the wrong type names the file, the field, the value and the type expected).
    """
    if config.get("model_type") != model_type:
        raise CheckpointError(f"expected a transformers config of model_type {model_type!r}, got "
                              f"model_type {config.get('model_type')!r}")
    for part in ("decoder", "text_encoder"):
        if not isinstance(config.get(part), dict):
            raise CheckpointError(f"the MusicGen config has no '{part}' sub-config")
    dec, text = config["decoder"], config["text_encoder"]

    def get(part: str, name: str, kind: Any, default: Any) -> Any:
        sub = dec if part == "decoder" else text
        return hub.check_value(sub.get(name, default), kind, field=f"{part}.{name}", source=source)

    def need(name: str, expected: Any, default: Any = None) -> None:
        value = dec.get(name, default)
        if value != expected:
            raise CheckpointError(f"decoder config field {name} = {value!r} is not supported (expected "
                                  f"{expected!r})")

    # Fields whose other values would change the maths: only the values the official checkpoints use.
    need("activation_function", "gelu", "gelu")
    need("scale_embedding", False, False)
    need("tie_word_embeddings", False, False)
    need("cross_attention_hidden_size", None)
    card = get("decoder", "vocab_size", int, 2048)
    # The special (BOS / pad) id is the extra embedding row; generation relies on it being `vocab_size`.
    need("pad_token_id", card, 2048)
    need("bos_token_id", card, 2048)
    text_dim = get("text_encoder", "d_model", int | None, text.get("hidden_size"))
    dim = get("decoder", "hidden_size", int, 1024)
    if text_dim is None:
        raise CheckpointError("the text_encoder sub-config has no d_model / hidden_size")
    if text_dim == dim:
        # transformers then builds no enc_to_dec_proj and feeds the text states as they are; no official
        # checkpoint does this.
        raise CheckpointError(f"text encoder width {text_dim} equals the decoder width: a MusicGen without "
                              f"enc_to_dec_proj is not supported")
    return MusicGenConfig(
        dim=dim,
        num_layers=get("decoder", "num_hidden_layers", int, 24),
        num_heads=get("decoder", "num_attention_heads", int, 16),
        ffn_dim=get("decoder", "ffn_dim", int, 4096),
        num_codebooks=get("decoder", "num_codebooks", int, 4),
        card=card,
        audio_channels=get("decoder", "audio_channels", int, 1),  # absent from the 4.31-era mono configs: 1
        text_dim=text_dim,
        cross_attention=cross_attention,
        max_positions=get("decoder", "max_position_embeddings", int, 2048),
    )


def load_transformers(config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> MusicGenLM:
    """MusicGenLM from a transformers MusicGen config dict and the LM part of its state dict (`lm_part`)."""
    ours = config_from_transformers(config, source=f"{source} config.json")
    renamed = keys.rename(state, TRANSFORMERS_TABLE, dropped=TRANSFORMERS_DROPPED, source=source)
    return keys.build(lambda: MusicGenLM(ours), fuse_self_attention(renamed), source=source, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# audiocraft

AUDIOCRAFT_TABLE = [
    ("emb.{k}.weight", "embeddings.{k}.weight"),
    ("transformer.layers.{i}.self_attn.in_proj_weight", "layers.{i}.self_attn.qkv.weight"),  # rows [q; k; v]
    ("transformer.layers.{i}.self_attn.out_proj.weight", "layers.{i}.self_attn.out.weight"),
    ("transformer.layers.{i}.norm1.weight", "layers.{i}.self_norm.weight"),
    ("transformer.layers.{i}.norm1.bias", "layers.{i}.self_norm.bias"),
    # the cross-attention's q/k/v come from splitting its `in_proj_weight` (load_audiocraft)
    ("transformer.layers.{i}.cross_attention.q.weight", "layers.{i}.cross_attn.q.weight"),
    ("transformer.layers.{i}.cross_attention.k.weight", "layers.{i}.cross_attn.k.weight"),
    ("transformer.layers.{i}.cross_attention.v.weight", "layers.{i}.cross_attn.v.weight"),
    ("transformer.layers.{i}.cross_attention.out_proj.weight", "layers.{i}.cross_attn.out.weight"),
    ("transformer.layers.{i}.norm_cross.weight", "layers.{i}.cross_norm.weight"),
    ("transformer.layers.{i}.norm_cross.bias", "layers.{i}.cross_norm.bias"),
    ("transformer.layers.{i}.linear1.weight", "layers.{i}.ffn_in.weight"),
    ("transformer.layers.{i}.linear2.weight", "layers.{i}.ffn_out.weight"),
    ("transformer.layers.{i}.norm2.weight", "layers.{i}.ffn_norm.weight"),
    ("transformer.layers.{i}.norm2.bias", "layers.{i}.ffn_norm.bias"),
    ("out_norm.weight", "norm.weight"),
    ("out_norm.bias", "norm.bias"),
    ("linears.{k}.weight", "heads.{k}.weight"),
    ("condition_provider.conditioners.description.output_proj.weight", "text_proj.weight"),
    ("condition_provider.conditioners.description.output_proj.bias", "text_proj.bias"),
]
AUDIOCRAFT_DROPPED: list[str] = []

# Width of the hidden states of the T5 encoders audiocraft's T5Conditioner accepts.
T5_WIDTHS = {"t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
             "google/flan-t5-small": 512, "google/flan-t5-base": 768, "google/flan-t5-large": 1024,
             "google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096}


def get_field(cfg: dict[str, Any], path: str, default: Any = KeyError, _depth: int = 0) -> Any:
    """cfg["a"]["b"] for path "a.b"; follows an OmegaConf reference "${x.y}" that the value may be."""
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is KeyError:
                raise CheckpointError(f"audiocraft config has no field {path}")
            return default
        node = node[part]
    reference = re.fullmatch(r"\$\{([\w.]+)\}", node) if isinstance(node, str) else None
    if reference and _depth < 20:
        return get_field(cfg, reference.group(1), default, _depth + 1)
    return node


def parse_xp_cfg(xp_cfg: str | dict[str, Any]) -> dict[str, Any]:
    """The `xp.cfg` entry of an audiocraft checkpoint (a YAML string written by OmegaConf) as a dict."""
    if isinstance(xp_cfg, dict):
        return xp_cfg
    import yaml  # only the audiocraft layout needs it

    try:
        cfg = yaml.safe_load(xp_cfg)
    except yaml.YAMLError as err:
        raise CheckpointError(f"the audiocraft 'xp.cfg' is not valid YAML: {err}") from err
    if not isinstance(cfg, dict):
        raise CheckpointError(f"the audiocraft 'xp.cfg' holds a {type(cfg).__name__}, expected a mapping")
    return cfg


def config_from_audiocraft(xp_cfg: str | dict[str, Any], *, cross_attention: bool = True) -> MusicGenConfig:
    """MusicGenConfig from an audiocraft training config (`xp.cfg`), field by field.

    cross_attention=False reads the decoder of a melody LM, whose fuser (prepend, no cross) is checked by
    convert/musicgen_melody.py.
    """
    cfg = parse_xp_cfg(xp_cfg)

    def need(path: str, expected: Any, default: Any = KeyError) -> None:
        value = get_field(cfg, path, default)
        if value != expected:
            raise CheckpointError(f"audiocraft config field {path} = {value!r} is not supported (expected "
                                  f"{expected!r})")

    need("lm_model", "transformer_lm")
    need("transformer_lm.norm", "layer_norm", "layer_norm")
    need("transformer_lm.norm_first", True)
    need("transformer_lm.activation", "gelu", "gelu")
    need("transformer_lm.positional_embedding", "sin", "sin")
    need("transformer_lm.max_period", 10000, 10000)
    need("transformer_lm.positional_scale", 1.0, 1.0)
    for flag in ("bias_ff", "bias_attn", "bias_proj", "qk_layer_norm", "qk_layer_norm_cross"):
        need(f"transformer_lm.{flag}", False, False)
    need("transformer_lm.layer_scale", None, None)
    need("transformer_lm.kv_repeat", 1, 1)
    need("transformer_lm.past_context", None, None)
    need("codebooks_pattern.modeling", "delay")
    # audiocraft's StreamingTransformer is causal only when asked; every released config says so (a config
    # without the field is taken as causal).
    need("transformer_lm.causal", True, True)
    # Sinusoids added to the text states before cross-attention, and conditions added to the code embeddings.
    # (fuser.prepend is not checked here: convert/musicgen_melody.py reads its decoder with this function.)
    need("fuser.cross_attention_pos_emb", False, False)
    for method in ("sum", "input_interpolate"):
        need(f"fuser.{method}", [], [])
    # Lemmatising and stop-word removal (spacy) of the text before T5: we feed the text as it is.
    need("conditioners.description.t5.normalize_text", False, False)
    cross = get_field(cfg, "fuser.cross", [])
    if cross_attention and "description" not in (cross or []):
        raise CheckpointError(f"audiocraft fuser.cross = {cross!r}: this LM does not cross-attend to the text "
                              f"description (a melody checkpoint takes its conditioning as a prefix)")
    t5_name = get_field(cfg, "conditioners.description.t5.name")
    if t5_name not in T5_WIDTHS:
        raise CheckpointError(f"audiocraft text conditioner {t5_name!r} is not one of {sorted(T5_WIDTHS)}")
    stereo = bool(get_field(cfg, "interleave_stereo_codebooks.use", False))

    def typed(path: str, kind: Any, default: Any = KeyError) -> Any:
        return hub.check_value(get_field(cfg, path, default), kind, field=path, source="audiocraft xp.cfg")

    dim = typed("transformer_lm.dim", int)
    config = MusicGenConfig(
        dim=dim,
        num_layers=typed("transformer_lm.num_layers", int),
        num_heads=typed("transformer_lm.num_heads", int),
        ffn_dim=int(typed("transformer_lm.hidden_scale", float, 4) * dim),
        num_codebooks=typed("transformer_lm.n_q", int),
        card=typed("transformer_lm.card", int),
        audio_channels=2 if stereo else 1,
        text_dim=T5_WIDTHS[t5_name],
        cross_attention=cross_attention,
    )
    delays = list(get_field(cfg, "codebooks_pattern.delay.delays"))
    if delays != list(config.delays):
        raise CheckpointError(f"audiocraft codebooks_pattern.delay.delays = {delays} is not supported (expected "
                              f"{list(config.delays)} for {config.num_codebooks} codebooks, "
                              f"{config.audio_channels} channel(s))")
    for path in ("codebooks_pattern.delay.flatten_first", "codebooks_pattern.delay.empty_initial"):
        need(path, 0, 0)
    return config


def load_audiocraft(package: dict[str, Any], *, source: str, dtype: torch.dtype = torch.float32,
                    read_config: Callable[[str | dict[str, Any]], Any] = config_from_audiocraft,
                    lm_class: Callable[[Any], MusicGenLM] = MusicGenLM,
                    table: Sequence[tuple[str, str]] = AUDIOCRAFT_TABLE,
                    dropped: Sequence[str] = AUDIOCRAFT_DROPPED) -> MusicGenLM:
    """MusicGenLM from the loaded content of an audiocraft `state_dict.bin` ({'best_state', 'xp.cfg', ...}).

    read_config, lm_class, table, dropped: the config reader, the LM class it goes with and the key table and
    dropped keys; convert/musicgen_melody.py passes its own to read a melody LM.
    """
    for entry in ("best_state", "xp.cfg"):
        if entry not in package:
            raise CheckpointError(f"{source} has no '{entry}' entry (found {sorted(package)}): not an audiocraft "
                                  f"LM checkpoint")
    config = read_config(package["xp.cfg"])
    # Our cross-attention keeps q apart from k and v (those run once, on the text); the self-attention is fused.
    state = keys.split_fused_qkv(dict(package["best_state"]), "cross_attention.in_proj_weight",
                                 ("cross_attention.q.weight", "cross_attention.k.weight", "cross_attention.v.weight"))
    renamed = keys.rename(state, table, dropped=dropped, source=source)
    # The stored tensors are fp16; transformers' fp32 weights are these values upcast (exact).
    return keys.build(lambda: lm_class(config), renamed, source=source, dtype=dtype)


def load_audiocraft_file(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> MusicGenLM:
    path = Path(path)
    return load_audiocraft(hub.load_tensors(path), source=str(path), dtype=dtype)
