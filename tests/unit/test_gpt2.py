"""GPT-2 (AudioLDM 2's language model) and the AudioLDM 2 projection at tiny sizes: shapes, causality, cached
decoding against the full forward, generation against a loop of full forwards, the converters' strictness, and
the errors on bad input. Parity with transformers / diffusers is in tests/parity/test_gpt2_parity.py.

Tolerance for different computation paths (cached vs full forward): max abs 1e-5 (fp32).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from musiclm_core.convert import gpt2 as convert
from musiclm_core.convert.keys import rename
from musiclm_core.gpt2 import (PRESETS, PROJECTION_PRESETS, GPT2, AudioLDM2Projection, GPT2Config,
                               ProjectionConfig)
from musiclm_core.hub import CheckpointError

ATOL = 1e-5
D = PRESETS["tiny"].dim


@torch.no_grad()
def tiny_gpt2(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(PRESETS["tiny"]).eval()
    for p in model.parameters():  # off nn.Linear / LayerNorm init, so that attention is far from uniform
        p.add_(0.2 * torch.randn_like(p))
    return model


def padded_inputs(B=2, L=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:8] = 0  # padding inside the sequence, as the projection leaves Flan-T5's
    return embeds, mask


@torch.no_grad()
def test_causal():
    model = tiny_gpt2()
    embeds, _ = padded_inputs()
    out = model(embeds)
    assert out.shape == embeds.shape
    changed = embeds.clone()
    # A random change: a constant added to every channel would be invisible (pre-LN blocks and ln_f remove it).
    changed[:, 6] += torch.randn(2, D)
    diff = (model(changed) - out).abs().amax(dim=(0, 2))  # (S,)
    assert diff[:6].max() == 0  # earlier positions cannot see position 6
    assert diff[6:].min() > 1e-3


@torch.no_grad()
def test_mask_hides_keys_not_positions():
    """Masked positions change nothing elsewhere, whatever they hold; they still occupy a position."""
    model = tiny_gpt2()
    embeds, mask = padded_inputs()
    out = model(embeds, attention_mask=mask)
    changed = embeds.clone()
    changed[1, 4:8] = torch.randn(4, D)
    other = model(changed, attention_mask=mask)
    keep = mask.bool()
    assert (other - out)[keep].abs().max() <= ATOL
    assert (other - out)[~keep].abs().max() > 1e-3
    # The same row without its padding is not the same computation: the positions after it move.
    squeezed = model(torch.cat([embeds[1:, :4], embeds[1:, 8:]], dim=1))
    assert (squeezed[:, 4:] - out[1:, 8:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_cached_chunks_equal_full_forward(masked):
    model = tiny_gpt2()
    embeds, mask = padded_inputs(L=11)
    mask = mask if masked else None
    full = model(embeds, attention_mask=mask)
    cache = model.new_cache(2, 16)
    pieces, start = [], 0
    for size in (5, 1, 3, 1, 1):
        end = start + size
        pieces.append(model(embeds[:, start:end], offset=start, cache=cache,
                            attention_mask=None if mask is None else mask[:, :end]))
        start = end
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= ATOL


@torch.no_grad()
def test_uncached_chunk_at_an_offset():
    """Without a cache a chunk attends only to itself, at its own positions (wpe[offset:])."""
    model = tiny_gpt2()
    embeds, mask = padded_inputs()
    got = model(embeds[:, 3:], offset=3, attention_mask=mask)
    shifted = model(embeds[:, 3:], attention_mask=mask[:, 3:])
    assert got.shape == (2, 7, D)
    assert (got - shifted).abs().max() > 1e-3  # other positions
    # The same chunk through a cache whose positions 0..2 are written but hidden: the same computation.
    cache = model.new_cache(2, 10)
    model(torch.randn(2, 3, D), cache=cache, attention_mask=torch.zeros(2, 3))
    cached = model(embeds[:, 3:], offset=3, cache=cache, attention_mask=torch.cat([torch.zeros(2, 3), mask[:, 3:]], 1))
    assert (got - cached).abs().max() <= ATOL


def reference_loop(model, embeds, mask, n):
    """generate's algorithm as full forwards over the growing sequence (no cache)."""
    for _ in range(n):
        last = model(embeds, attention_mask=mask)[:, -1:]
        embeds = torch.cat([embeds, last], dim=1)
        mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return embeds[:, -n:]


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_generate_equals_full_forward_loop(masked):
    model = tiny_gpt2()
    embeds, mask = padded_inputs()
    mask = mask if masked else None
    got = model.generate(embeds, mask)
    assert got.shape == (2, PRESETS["tiny"].max_new_tokens, D)  # the config's 8 by default
    assert (got - reference_loop(model, embeds, mask, 8)).abs().max() <= ATOL
    assert (model.generate(embeds, mask, max_new_tokens=3) - got[:, :3]).abs().max() <= ATOL
    other = model.generate(embeds.flip(1), mask)
    assert (other - got).abs().amax(dim=-1).min() > 1e-3


@torch.no_grad()
def test_generate_fills_the_position_table():
    model = tiny_gpt2()
    n = 8
    embeds = torch.randn(1, PRESETS["tiny"].max_positions - n + 1, D)  # the last position used is 63
    assert (model.generate(embeds, max_new_tokens=n) - reference_loop(model, embeds, None, n)).abs().max() <= ATOL


def test_bad_inputs():
    model = tiny_gpt2()
    embeds, mask = padded_inputs()
    with pytest.raises(ValueError, match="16 wide, this GPT-2 is 32 wide"):
        model(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="16 wide, this GPT-2 is 32 wide"):
        model.generate(torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"must be a \(B, S, D\) tensor, got \(4, 32\)"):
        model(torch.randn(4, D))
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            model.generate(embeds, max_new_tokens=n)
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, L\) = \(2, 10\)"):
        model.generate(embeds, mask[:, :9])
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, L\) = \(2, 10\)"):
        model.generate(embeds, mask[:1])
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, offset \+ S\) = \(2, 10\)"):
        model(embeds, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="past GPT-2's position table"):
        model(embeds, offset=60)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        model(embeds, offset=-1)
    with pytest.raises(ValueError, match="do not fit a cache of 8"):
        model(embeds, cache=model.new_cache(2, 8))
    with pytest.raises(ValueError, match="cache has 1 rows, the input 2"):
        model(embeds, cache=model.new_cache(1, 16))
    with pytest.raises(ValueError, match="longer than GPT-2's position table"):
        model.new_cache(1, 65)


def test_generate_limit_is_exact():
    """L + max_new_tokens - 1 positions are used: 57 + 8 - 1 = 64 fits the table, 58 + 8 - 1 does not."""
    model = tiny_gpt2()
    assert model.generate(torch.randn(1, 57, D), max_new_tokens=8).shape == (1, 8, D)
    with pytest.raises(ValueError, match=r"need 65 positions, more than GPT-2's position table holds \(64\)"):
        model.generate(torch.randn(1, 58, D), max_new_tokens=8)


def test_config():
    assert PRESETS["audioldm2"].head_dim == 64 and PRESETS["audioldm2"].ffn_dim == 3072
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        GPT2Config(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        GPT2Config(max_new_tokens=0)
    with pytest.raises(CheckpointError, match=r"unknown GPT2Config fields \['n_embd'\]"):
        GPT2Config.from_dict({"n_embd": 32})
    with pytest.raises(CheckpointError, match=r"unknown ProjectionConfig fields \['text_encoder_dim'\]"):
        ProjectionConfig.from_dict({"text_encoder_dim": 512})
    assert GPT2Config.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


# ---------------------------------------------------------------------------------------------------------------
# The projection


@torch.no_grad()
def tiny_projection() -> AudioLDM2Projection:
    torch.manual_seed(0)
    model = AudioLDM2Projection(PROJECTION_PRESETS["tiny"]).eval()
    for p in model.parameters():
        p.add_(0.2 * torch.randn_like(p))
    return model


@torch.no_grad()
def test_projection_layout():
    model = tiny_projection()
    c = PROJECTION_PRESETS["tiny"]
    clap, t5 = torch.randn(2, 1, c.clap_dim), torch.randn(2, 5, c.t5_dim)
    t5_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out, mask = model(clap, t5, torch.ones(2, 1, dtype=torch.long), t5_mask)
    assert out.shape == (2, 1 + 5 + 4, c.dim)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0, 1]]
    for i, vector in ((0, model.clap_start), (2, model.clap_end), (3, model.t5_start), (9, model.t5_end)):
        assert torch.equal(out[:, i], vector.expand(2, -1))
    assert (out[:, 1] - model.clap_proj(clap[:, 0])).abs().max() <= ATOL
    assert (out[:, 4:9] - model.t5_proj(t5)).abs().max() <= ATOL
    assert model(clap, t5)[1] is None
    assert torch.equal(model(clap, t5, None, t5_mask)[1], mask)  # a missing mask counts as ones


def test_projection_bad_inputs():
    model = tiny_projection()
    c = PROJECTION_PRESETS["tiny"]
    clap, t5 = torch.randn(2, 1, c.clap_dim), torch.randn(2, 5, c.t5_dim)
    with pytest.raises(ValueError, match=r"t5 states must be \(B, L, 24\), got \(2, 5, 16\)"):
        model(clap, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"clap states must be \(B, L, 16\), got \(2, 16\)"):
        model(clap[:, 0], t5)
    with pytest.raises(ValueError, match="clap states have 1 rows, t5 states 2"):
        model(clap[:1], t5)
    with pytest.raises(ValueError, match=r"t5_mask must be \(B, L\) = \(2, 5\), got \(2, 4\)"):
        model(clap, t5, torch.ones(2, 1), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"clap_mask must be \(B, L\) = \(2, 1\), got \(2,\)"):
        model(clap, t5, torch.ones(2), torch.ones(2, 5))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and converters


def hf_layout(model: GPT2) -> dict[str, torch.Tensor]:
    """Our tiny model's weights under transformers' GPT2Model names (the key table read backwards), Conv1D
    weights (in, out)."""
    backwards = [(ours, theirs) for theirs, ours in convert.TABLE]
    state = rename({k: v.clone() for k, v in model.state_dict().items()}, backwards, source="ours")
    return convert.transpose_conv1d(state)  # a transpose is its own inverse


def hf_config(config: GPT2Config, **extra) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2Model"], "vocab_size": config.vocab_size,
            "n_positions": config.max_positions, "n_embd": config.dim, "n_layer": config.num_layers,
            "n_head": config.num_heads, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps, "attn_pdrop": 0.1, "summary_type": "cls_index",
            "n_ctx": config.max_positions, "max_new_tokens": 8, **extra}


def write_hf(folder, state, config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))


@torch.no_grad()
def test_transformers_layout_loads_with_transposed_conv1d(tmp_path):
    model = tiny_gpt2()
    state = hf_layout(model)
    assert state["h.0.attn.c_attn.weight"].shape == (D, 3 * D)  # Conv1D: (in, out)
    write_hf(tmp_path / "gpt2", state, hf_config(model.config))
    loaded = GPT2.from_pretrained(tmp_path / "gpt2")
    assert loaded.config == model.config
    embeds, mask = padded_inputs()
    assert (loaded.generate(embeds, mask) - model.generate(embeds, mask)).abs().max() <= ATOL


def test_transformers_layout_strict(tmp_path):
    model = tiny_gpt2()
    state = hf_layout(model)
    write_hf(tmp_path / "extra", {**state, "h.0.attn.q_attn.weight": torch.zeros(D, D)}, hf_config(model.config))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    h\.0\.attn\.q_attn\.weight"):
        GPT2.from_pretrained(tmp_path / "extra")
    write_hf(tmp_path / "missing", {k: v for k, v in state.items() if k != "h.1.ln_2.bias"},
             hf_config(model.config))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    layers\.1\.ffn_norm\.bias"):
        GPT2.from_pretrained(tmp_path / "missing")
    # The causal-mask buffers of older files are dropped by name.
    write_hf(tmp_path / "old", {**state, "h.0.attn.bias": torch.ones(1, 1, 64, 64),
                                "h.0.attn.masked_bias": torch.tensor(-1e4)}, hf_config(model.config))
    GPT2.from_pretrained(tmp_path / "old")


def test_config_translation():
    base = hf_config(PRESETS["tiny"])
    config = convert.config_from_transformers(base)
    assert config == PRESETS["tiny"]
    assert convert.config_from_transformers({**base, "n_inner": 96}).ffn_dim == 96
    no_field = {k: v for k, v in base.items() if k != "max_new_tokens"}
    assert convert.config_from_transformers(no_field).max_new_tokens == 8
    with pytest.raises(CheckpointError, match=r"does not know: \['rotary_dim'\]"):
        convert.config_from_transformers({**base, "rotary_dim": 16})
    with pytest.raises(CheckpointError, match="activation_function 'relu' is not supported"):
        convert.config_from_transformers({**base, "activation_function": "relu"})
    with pytest.raises(CheckpointError, match="add_cross_attention=True is not supported"):
        convert.config_from_transformers({**base, "add_cross_attention": True})
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        convert.config_from_transformers({**base, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(CheckpointError, match="model_type 'gpt_neo' is not a GPT-2"):
        convert.config_from_transformers({**base, "model_type": "gpt_neo"})


def test_projection_config_translation():
    cfg = {"_class_name": "AudioLDM2ProjectionModel", "_diffusers_version": "0.42.1", "text_encoder_dim": 512,
           "text_encoder_1_dim": 1024, "langauge_model_dim": 768, "use_learned_position_embedding": None,
           "max_seq_length": None}
    assert convert.projection_config_from_diffusers(cfg) == PROJECTION_PRESETS["audioldm2"]
    with pytest.raises(CheckpointError, match="TTS variant"):
        convert.projection_config_from_diffusers({**cfg, "use_learned_position_embedding": True,
                                                  "max_seq_length": 512})
    with pytest.raises(CheckpointError, match=r"does not know: \['language_model_dim'\]"):
        convert.projection_config_from_diffusers({**cfg, "language_model_dim": 768})
    with pytest.raises(CheckpointError, match=r"lacks \['text_encoder_1_dim'\]"):
        convert.projection_config_from_diffusers({k: v for k, v in cfg.items() if k != "text_encoder_1_dim"})
    with pytest.raises(CheckpointError, match="expected 'AudioLDM2ProjectionModel'"):
        convert.projection_config_from_diffusers({**cfg, "_class_name": "UNet2DConditionModel"})


@torch.no_grad()
def test_native_round_trips(tmp_path):
    gpt2, proj = tiny_gpt2(), tiny_projection()
    gpt2.save_pretrained(tmp_path / "gpt2")
    proj.save_pretrained(tmp_path / "proj")
    with pytest.raises(FileExistsError):
        gpt2.save_pretrained(tmp_path / "gpt2")
    embeds, mask = padded_inputs()
    assert (GPT2.from_pretrained(tmp_path / "gpt2")(embeds, attention_mask=mask)
            - gpt2(embeds, attention_mask=mask)).abs().max() <= ATOL
    c = PROJECTION_PRESETS["tiny"]
    clap, t5 = torch.randn(2, 1, c.clap_dim), torch.randn(2, 3, c.t5_dim)
    assert (AudioLDM2Projection.from_pretrained(tmp_path / "proj")(clap, t5)[0] - proj(clap, t5)[0]).abs().max() <= ATOL
    with pytest.raises(CheckpointError, match="holds a 'gpt2' model, expected 'audioldm2_projection'"):
        AudioLDM2Projection.from_pretrained(tmp_path / "gpt2")


def test_pipeline_folder_without_the_part(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without a language_model/ folder"):
        GPT2.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="without a projection_model/ folder"):
        AudioLDM2Projection.from_pretrained(tmp_path)
