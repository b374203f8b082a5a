"""AudioLDM 2's GPT-2 and projection model -> `musiclm_core.gpt2`.

GPT-2 (a transformers `GPT2Model` folder: the `language_model/` of cvssp/audioldm2*, or any GPT-2 saved bare):
    `config.json` translated field by field (`config_from_transformers`), the four Conv1D weights of each block
    transposed (`transpose_conv1d`), keys renamed by TABLE; the causal-mask buffers of older files dropped by
    name. `c_attn` stays fused as our `qkv`: its columns are already q | k | v, so transposed it is exactly the
    (3D, D) weight of one nn.Linear, and one matmul for q, k and v is what MusicGen's attention does too.
The projection model (a diffusers `AudioLDM2ProjectionModel` folder, `projection_model/`):
    `config.json` translated by `projection_config_from_diffusers`, keys renamed by PROJECTION_TABLE.

Weights may be safetensors or a pickled .bin (read with weights_only=True by `hub.load_state_dict`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.convert.encodec import HF_GENERIC_CONFIG_FIELDS
from musiclm_core.convert.keys import build, rename
from musiclm_core.gpt2 import GPT2, AudioLDM2Projection, GPT2Config, ProjectionConfig
from musiclm_core.hub import CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# GPT-2 config

# transformers' GPT2Config defaults (configuration_gpt2.py), for fields a config.json may leave out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "max_new_tokens": 8,
}

# Fields that change nothing at inference: dropouts, initialisation, the sequence-summary head of
# GPT2DoubleHeadsModel, and `n_ctx` (older configs: the size of the causal-mask buffer, never of the model).
HF_IGNORED = frozenset({
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "initializer_range", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "n_ctx", "gradient_checkpointing",
})

# "gelu_new" and "gelu_pytorch_tanh" are both the tanh approximation of GELU, which is what `Block` computes.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_transformers(hf: dict[str, Any], *, source: str = "transformers config") -> GPT2Config:
    """A `GPT2Config` dict (config.json) -> GPT2Config. Unknown fields, and values of architecture fields that
    `GPT2` does not compute, are errors that name them."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not a GPT-2 ('gpt2')")
    # add_cross_attention is bookkeeping for most models but makes a GPT-2 with cross-attention blocks: read it.
    skipped = (HF_GENERIC_CONFIG_FIELDS - {"add_cross_attention"}) | HF_IGNORED
    theirs = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k not in skipped}}
    unknown = sorted(set(theirs) - set(HF_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{source}: GPT-2 config fields the converter does not know: {unknown}")
    if theirs["activation_function"] not in TANH_GELUS:
        raise CheckpointError(f"{source}: activation_function {theirs['activation_function']!r} is not supported; "
                              f"expected one of {TANH_GELUS} (tanh GELU)")
    # Each of these would change the maths; none of AudioLDM 2's checkpoints sets them.
    required = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    for name, value in required.items():
        if theirs[name] != value:
            raise CheckpointError(f"{source}: {name}={theirs[name]!r} is not supported (expected {value!r})")
    # reorder_and_upcast_attn only changes the order of an fp32 computation inside transformers' eager
    # attention (and nothing at all under SDPA): the same maths, so either value is accepted.
    max_new_tokens = theirs["max_new_tokens"]
    return GPT2Config.from_dict({
        "vocab_size": theirs["vocab_size"],
        "max_positions": theirs["n_positions"],
        "dim": theirs["n_embd"],
        "num_layers": theirs["n_layer"],
        "num_heads": theirs["n_head"],
        "ffn_dim": 4 * theirs["n_embd"] if theirs["n_inner"] is None else theirs["n_inner"],
        "norm_eps": theirs["layer_norm_epsilon"],
        # A plain GPT-2 config has no such field (or null): the pipeline's own default, 8.
        "max_new_tokens": HF_DEFAULTS["max_new_tokens"] if max_new_tokens is None else max_new_tokens,
    }, source=source)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 keys

# (their key, our key). `{i}` is a block index.
TABLE = [
    ("wte.weight", "wte.weight"),
    ("wpe.weight", "wpe.weight"),
    ("h.{i}.ln_1.weight", "layers.{i}.attn_norm.weight"),
    ("h.{i}.ln_1.bias", "layers.{i}.attn_norm.bias"),
    ("h.{i}.attn.c_attn.weight", "layers.{i}.attn.qkv.weight"),
    ("h.{i}.attn.c_attn.bias", "layers.{i}.attn.qkv.bias"),
    ("h.{i}.attn.c_proj.weight", "layers.{i}.attn.out.weight"),
    ("h.{i}.attn.c_proj.bias", "layers.{i}.attn.out.bias"),
    ("h.{i}.ln_2.weight", "layers.{i}.ffn_norm.weight"),
    ("h.{i}.ln_2.bias", "layers.{i}.ffn_norm.bias"),
    ("h.{i}.mlp.c_fc.weight", "layers.{i}.ffn_in.weight"),
    ("h.{i}.mlp.c_fc.bias", "layers.{i}.ffn_in.bias"),
    ("h.{i}.mlp.c_proj.weight", "layers.{i}.ffn_out.weight"),
    ("h.{i}.mlp.c_proj.bias", "layers.{i}.ffn_out.bias"),
    ("ln_f.weight", "norm.weight"),
    ("ln_f.bias", "norm.bias"),
]

# Older GPT-2 files (transformers < 4.2x, the original OpenAI conversion) store the causal mask as a buffer
# (`attn.bias`, a (1, 1, n_ctx, n_ctx) lower triangle) and the masking value (`attn.masked_bias`, -1e4). They
# are not weights: our attention builds its causal mask itself.
DROPPED = ["h.{i}.attn.bias", "h.{i}.attn.masked_bias"]

# transformers' `Conv1D` computes x @ W + b with W stored (in, out): the transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def transpose_conv1d(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every Conv1D weight (c_attn, attn.c_proj, c_fc, mlp.c_proj), (in, out), as an nn.Linear weight (out, in).

    c_attn's (D, 3D) becomes (3D, D) with rows [q; k; v]: transformers splits its output columns in that order
    (GPT2Attention.forward, `self.c_attn(hidden_states).split(self.split_size, dim=2)`)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(CONV1D_WEIGHTS):
            if tensor.dim() != 2:
                raise CheckpointError(f"{key}: a Conv1D weight must be 2-D (in, out), got {tuple(tensor.shape)}")
            tensor = tensor.t().contiguous()
        out[key] = tensor
    return out


def load_transformers(hf_config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> GPT2:
    """GPT2 from a GPT2Model config dict and its state dict (keys `h.0.attn.c_attn.weight`, ...)."""
    config = config_from_transformers(hf_config, source=source)
    ours = rename(transpose_conv1d(state), TABLE, dropped=DROPPED, source=source)
    return build(lambda: GPT2(config), ours, source=source, dtype=dtype)


def load_transformers_folder(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> GPT2:
    """A transformers GPT2Model folder (config.json + model.safetensors or pytorch_model.bin)."""
    folder = Path(folder)
    config = hub.read_json(folder / "config.json")
    if config.get("model_type") != "gpt2":
        raise CheckpointError(f"{folder / 'config.json'}: model_type {config.get('model_type')!r}, expected a "
                              f"transformers GPT-2 ('gpt2')")
    return load_transformers(config, hub.load_state_dict(folder), source=str(folder), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# The projection model (diffusers AudioLDM2ProjectionModel)

# Fields diffusers writes into every config.json: bookkeeping only.
DIFFUSERS_GENERIC_FIELDS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})

# their field -> ours. `langauge_model_dim` is misspelled in diffusers and in the hub files.
PROJECTION_FIELDS = {"text_encoder_dim": "clap_dim", "text_encoder_1_dim": "t5_dim", "langauge_model_dim": "dim"}

# The TTS checkpoints' variant: a learned position embedding on the VITS states. Absent or null otherwise.
PROJECTION_UNSUPPORTED = ("use_learned_position_embedding", "max_seq_length")


def projection_config_from_diffusers(cfg: dict[str, Any], *, source: str = "diffusers config") -> ProjectionConfig:
    """An `AudioLDM2ProjectionModel` config.json -> ProjectionConfig."""
    if cfg.get("_class_name", "AudioLDM2ProjectionModel") != "AudioLDM2ProjectionModel":
        raise CheckpointError(f"{source}: _class_name {cfg.get('_class_name')!r}, expected "
                              f"'AudioLDM2ProjectionModel'")
    theirs = {k: v for k, v in cfg.items() if k not in DIFFUSERS_GENERIC_FIELDS}
    unknown = sorted(set(theirs) - set(PROJECTION_FIELDS) - set(PROJECTION_UNSUPPORTED))
    if unknown:
        raise CheckpointError(f"{source}: AudioLDM2ProjectionModel config fields the converter does not know: "
                              f"{unknown}")
    for name in PROJECTION_UNSUPPORTED:
        if theirs.get(name) is not None:
            raise CheckpointError(f"{source}: {name}={theirs[name]!r}: the TTS variant of the projection (learned "
                                  f"position embedding for VITS states) is not supported")
    missing = sorted(set(PROJECTION_FIELDS) - set(theirs))
    if missing:  # diffusers gives these no default either
        raise CheckpointError(f"{source}: AudioLDM2ProjectionModel config lacks {missing}")
    return ProjectionConfig.from_dict({ours: theirs[name] for name, ours in PROJECTION_FIELDS.items()},
                                      source=source)


PROJECTION_TABLE = [
    ("projection.weight", "clap_proj.weight"),
    ("projection.bias", "clap_proj.bias"),
    ("projection_1.weight", "t5_proj.weight"),
    ("projection_1.bias", "t5_proj.bias"),
    ("sos_embed", "clap_start"),
    ("eos_embed", "clap_end"),
    ("sos_embed_1", "t5_start"),
    ("eos_embed_1", "t5_end"),
]


def load_projection(cfg: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                    dtype: torch.dtype = torch.float32) -> AudioLDM2Projection:
    config = projection_config_from_diffusers(cfg, source=source)
    ours = rename(state, PROJECTION_TABLE, source=source)
    return build(lambda: AudioLDM2Projection(config), ours, source=source, dtype=dtype)


def load_projection_folder(folder: str | os.PathLike, *,
                           dtype: torch.dtype = torch.float32) -> AudioLDM2Projection:
    """A diffusers AudioLDM2ProjectionModel folder (config.json + diffusion_pytorch_model.safetensors / .bin)."""
    folder = Path(folder)
    cfg = hub.read_json(folder / "config.json")
    return load_projection(cfg, hub.load_state_dict(folder), source=str(folder), dtype=dtype)
