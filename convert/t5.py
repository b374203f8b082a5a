"""T5 encoder checkpoints in the transformers layout -> `T5Encoder`.

Sources: `t5-base` (T5ForConditionalGeneration), `google/flan-t5-large`, T5EncoderModel folders, and the
`text_encoder.` part of a MusicGen checkpoint (its caller strips the prefix and passes the "text_encoder"
sub-config):

    t5 = load_transformers(config["text_encoder"], strip_prefix(state, "text_encoder."), source=..., dtype=...)
    t5.tokenizer = T5Tokenizer.from_folder(repo_root)        # spiece.model sits at the MusicGen repo root

The decoder stack and the LM head of a T5ForConditionalGeneration file are dropped, by name (DROPPED).
"""

from __future__ import annotations

from typing import Any

import torch

from musiclm_core.convert.keys import build, rename
from musiclm_core.hub import CheckpointError, check_value
from musiclm_core.t5 import FEED_FORWARDS, T5Config, T5Encoder

# transformers' T5Config defaults: a config.json may leave any of these out (t5-base has no
# relative_attention_max_distance nor feed_forward_proj).
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu", "n_positions": 512,
}


def config_from_transformers(hf_config: dict[str, Any], *, source: str = "config.json") -> T5Config:
    """transformers' T5 config.json (or MusicGen's "text_encoder" sub-dict) -> T5Config, field by field.

    Fields that only concern the decoder, generation or training (dropout_rate, num_decoder_layers,
    decoder_start_token_id, tie_word_embeddings, task_specific_params, ...) do not change the encoder and are
    not read. dense_act_fn / is_gated_act are not read either: transformers derives both from
    feed_forward_proj and overwrites what the file says.
    """
    model_type = hf_config.get("model_type", "t5")
    if model_type != "t5":
        raise CheckpointError(f"config model_type is {model_type!r}, expected 't5' (mt5/umt5/longt5 differ)")
    if hf_config.get("is_decoder"):
        raise CheckpointError("config has is_decoder=true: that is a T5 decoder stack, not an encoder")

    def get(name: str) -> Any:  # of the type of transformers' default (an int is a float too)
        default = HF_DEFAULTS[name]
        return check_value(hf_config.get(name, default), type(default), field=name, source=source)

    feed_forward = get("feed_forward_proj")
    if feed_forward not in FEED_FORWARDS:
        raise CheckpointError(f"config feed_forward_proj is {feed_forward!r}; supported: {FEED_FORWARDS}")
    return T5Config(
        vocab_size=get("vocab_size"),
        dim=get("d_model"),
        head_dim=get("d_kv"),
        ffn_dim=get("d_ff"),
        num_layers=get("num_layers"),
        num_heads=get("num_heads"),
        relative_buckets=get("relative_attention_num_buckets"),
        relative_max_distance=get("relative_attention_max_distance"),
        norm_eps=get("layer_norm_epsilon"),
        feed_forward=feed_forward,
        max_length=get("n_positions"),
    )


# (their key, our key). `{i}` is a layer index. "wi" (relu) and "wi_1" (gated) are both the up projection.
TABLE = [
    ("encoder.embed_tokens.weight", "embed.weight"),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "relative_bias.weight"),
    ("encoder.block.{i}.layer.0.layer_norm.weight", "layers.{i}.attn_norm.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.q.weight", "layers.{i}.attn.q.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.k.weight", "layers.{i}.attn.k.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.v.weight", "layers.{i}.attn.v.weight"),
    ("encoder.block.{i}.layer.0.SelfAttention.o.weight", "layers.{i}.attn.o.weight"),
    ("encoder.block.{i}.layer.1.layer_norm.weight", "layers.{i}.ffn_norm.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", "layers.{i}.ffn.up.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", "layers.{i}.ffn.gate.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", "layers.{i}.ffn.up.weight"),
    ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", "layers.{i}.ffn.down.weight"),
    ("encoder.final_layer_norm.weight", "norm.weight"),
]

# The decoder stack and LM head of T5ForConditionalGeneration / T5Model files: not part of the encoder.
# Layer 1 of a decoder block is cross-attention (EncDecAttention), layer 2 its feed-forward.
_DECODER_ATTENTION = [f"decoder.block.{{i}}.layer.{layer}.{name}.{proj}.weight"
                      for layer, name in ((0, "SelfAttention"), (1, "EncDecAttention")) for proj in "qkvo"]
DROPPED = [
    "lm_head.weight",
    "decoder.embed_tokens.weight",
    "decoder.final_layer_norm.weight",
    *_DECODER_ATTENTION,
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    # Old checkpoints carry a cross-attention bias table that transformers never uses (it ignores it on load).
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    "decoder.block.{i}.layer.{j}.layer_norm.weight",
    *[f"decoder.block.{{i}}.layer.2.DenseReluDense.{w}.weight" for w in ("wi", "wi_0", "wi_1", "wo")],
]


def resolve_tied_embedding(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Keep one copy of the token embedding under `encoder.embed_tokens.weight`.

    transformers ties `encoder.embed_tokens` to `shared`; a file may hold either name or both (.bin files
    usually both, safetensors one). When both are there they must be equal.
    """
    out = dict(state)
    shared = out.pop("shared.weight", None)
    if shared is None:
        return out
    embed = out.get("encoder.embed_tokens.weight")
    if embed is None:
        out["encoder.embed_tokens.weight"] = shared
    elif embed.shape != shared.shape or not torch.equal(embed, shared):
        raise CheckpointError(f"{source}: shared.weight {tuple(shared.shape)} and encoder.embed_tokens.weight "
                              f"{tuple(embed.shape)} differ; a T5 encoder ties them, so they must be equal")
    return out


def build_native(config: T5Config, state: dict[str, torch.Tensor], *, source: str,
                 dtype: torch.dtype = torch.float32) -> T5Encoder:
    """A T5Encoder from our own key names (native folders), loaded strictly."""
    return build(lambda: T5Encoder(config), state, source=source, dtype=dtype)


def load_transformers(hf_config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> T5Encoder:
    """A T5Encoder (no tokenizer attached) from transformers' config dict and state dict (T5EncoderModel,
    T5ForConditionalGeneration or T5Model keys, without any outer prefix)."""
    config = config_from_transformers(hf_config, source=f"{source} config.json")
    state = resolve_tied_embedding(state, source=source)
    return build_native(config, rename(state, TABLE, dropped=DROPPED, source=source), source=source, dtype=dtype)
