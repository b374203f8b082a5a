"""AudioLDM 2's GPT-2 and projection model against transformers and diffusers, on checkpoints they wrote.

* GPT-2: transformers `GPT2Model` at a tiny config, every parameter moved off its initialisation, written with
  `save_pretrained` (safetensors) and as an old-style `pytorch_model.bin` that also holds the causal-mask buffers
  (`attn.bias`, `attn.masked_bias`), loaded with `GPT2.from_pretrained`.
* The generation of the 8 "language of audio" vectors against two references: diffusers' own
  `AudioLDM2Pipeline.generate_language_model`, and the same loop written here over full GPT2Model forwards (no
  cache, the whole growing sequence each step). The stock pipeline cannot run it with a GPT2Model under
  transformers 5 (it calls generation helpers that only `GenerationMixin` models have, specs/ldm.md §15.20);
  it runs unchanged when its `language_model` is a `GPT2LMHeadModel` whose `transformer` *is* our reference
  GPT2Model (the LM head's logits are computed and ignored; `hidden_states[-1]` is the GPT2Model's last hidden
  state). That runs the pipeline's exact code: its `prepare_inputs_for_generation` (inputs_embeds only, the last
  one once a cache exists, no position ids) and transformers' `_update_model_kwargs_for_generation` (a 1
  appended to the mask each step, the KV cache carried over). Checked once (2026-12-03) in the environment where
  the stock pipeline runs unchanged (transformers 4.51.3, diffusers 0.39.0, specs/NOTES.md): its
  generate_language_model with the GPT2Model itself, max_new_tokens from the config, agrees with
  `GPT2.generate` to 8e-7 at this tiny config, with and without padding (middle and left).
* The projection: diffusers `AudioLDM2ProjectionModel` at tiny dims, saved with `save_pretrained`, loaded with
  `AudioLDM2Projection.from_pretrained`; and both parts loaded from one diffusers-style pipeline folder.

Tolerances (fp32): hidden states, generated vectors and projections max abs error <= 1e-4; masks equal.
The official sizes (GPT-2 124M, the 512/1024 -> 768 projection) run under `-m slow`.
"""

import json
import types

import pytest
import torch

from musiclm_core.gpt2 import GPT2, AudioLDM2Projection

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2ProjectionModel  # noqa: E402
from diffusers.pipelines.audioldm2.pipeline_audioldm2 import AudioLDM2Pipeline  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

ATOL = 1e-4
# max_new_tokens is the custom field AudioLDM 2's language_model config carries (specs/ldm.md §9).
TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=48, vocab_size=100, bos_token_id=0, eos_token_id=0,
            max_new_tokens=8)
OFFICIAL = dict(max_new_tokens=8)  # GPT2Config's defaults are GPT-2 124M: 768 wide, 12 layers, 12 heads, 1024
PROJECTION_TINY = dict(text_encoder_dim=16, text_encoder_1_dim=24, langauge_model_dim=32)
PROJECTION_OFFICIAL = dict(text_encoder_dim=512, text_encoder_1_dim=1024, langauge_model_dim=768)


@torch.no_grad()
def off_init(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every parameter away from its initialisation (LayerNorms at 1/0, biases at 0, SOS/EOS at 1)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def reference_gpt2(config_kwargs: dict, seed: int = 0, scale: float = 0.1) -> GPT2Model:
    torch.manual_seed(seed)
    model = GPT2Model(GPT2Config(**config_kwargs)).eval()
    off_init(model, seed, scale)
    return model


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """(transformers GPT2Model, ours loaded from its save_pretrained folder)."""
    folder = tmp_path_factory.mktemp("gpt2") / "language_model"
    ref = reference_gpt2(TINY)
    ref.save_pretrained(folder)
    return ref, GPT2.from_pretrained(folder)


def inputs(B=2, L=9, D=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, L, D, generator=g)
    # Row 0 padded as the projection pads Flan-T5: zeros inside the sequence, a 1 (the EOS) at the end.
    # Row 1 left-padded: its first two positions have no key to attend to.
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 5:8] = 0
    mask[1, :2] = 0
    return embeds, mask


def pipeline_generate(ref: GPT2Model, embeds, mask, max_new_tokens):
    """diffusers' own generate_language_model, on a GPT2LMHeadModel whose transformer is `ref` (module doc)."""
    lm = GPT2LMHeadModel(ref.config).eval()
    lm.transformer = ref
    pipe = types.SimpleNamespace(language_model=lm)  # the method reads nothing else of the pipeline
    kwargs = {} if mask is None else {"attention_mask": mask}
    return AudioLDM2Pipeline.generate_language_model(pipe, embeds, max_new_tokens=max_new_tokens, **kwargs)


def loop_generate(ref: GPT2Model, embeds, mask, max_new_tokens):
    """The same algorithm as full forwards over the growing sequence: no cache, positions 0.. each time."""
    for _ in range(max_new_tokens):
        out = ref(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # both after ln_f (specs/ldm.md §9)
        embeds = torch.cat([embeds, out.last_hidden_state[:, -1:]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return embeds[:, -max_new_tokens:]


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_transformers(gpt2_pair, padded):
    ref, ours = gpt2_pair
    embeds, mask = inputs()
    mask = mask if padded else None
    expected = ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    got = ours(embeds, attention_mask=mask)
    # Every position, padded ones included, except the rows with no key at all (row 1's first two): ours gives
    # them a zero attention output, as transformers' SDPA path does; its eager path averages all keys there.
    # Either way they reach no other position: they are masked keys for every later one.
    attended = torch.ones_like(got[..., 0], dtype=torch.bool) if mask is None else mask.cumsum(1) > 0
    assert (got - expected)[attended].abs().max() <= ATOL
    other = ours(embeds + torch.randn_like(embeds), attention_mask=mask)
    assert (other - got).abs().max() > 100 * ATOL  # the fixture listens to its input


@torch.no_grad()
def test_cached_chunks_match_transformers(gpt2_pair):
    """Prefill 4, then chunks of 3, 1, 1: the same states as transformers' one full forward."""
    ref, ours = gpt2_pair
    embeds, mask = inputs()
    expected = ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    cache = ours.new_cache(2, 12)
    pieces, start = [], 0
    for size in (4, 3, 1, 1):
        end = start + size
        pieces.append(ours(embeds[:, start:end], offset=start, cache=cache, attention_mask=mask[:, :end]))
        start = end
    assert (torch.cat(pieces, dim=1) - expected).abs().max() <= ATOL


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_generate_matches_pipeline(gpt2_pair, padded):
    ref, ours = gpt2_pair
    embeds, mask = inputs()
    mask = mask if padded else None
    got = ours.generate(embeds, mask)  # max_new_tokens from the config: 8, as the pipeline reads it
    assert got.shape == (2, 8, 32)
    for reference in (pipeline_generate, loop_generate):
        expected = reference(ref, embeds, mask, 8)
        assert expected.shape == got.shape
        assert (got - expected).abs().max() <= ATOL, reference.__name__
    # A different prompt gives different vectors, in every row and every step.
    other = ours.generate(embeds + torch.randn_like(embeds), mask)
    assert (other - got).abs().amax(dim=-1).min() > 100 * ATOL


@torch.no_grad()
def test_generate_padding_is_hidden_and_counted(gpt2_pair):
    """What the padded embeddings hold does not matter, but their positions count: dropping them changes the
    vectors (the pipeline does not re-number positions around padding)."""
    ref, ours = gpt2_pair
    embeds, mask = inputs()
    changed = embeds.clone()
    changed[0, 5:8] = torch.randn(3, 32)
    got = ours.generate(embeds, mask, max_new_tokens=3)
    assert (ours.generate(changed, mask, max_new_tokens=3) - got).abs().max() <= ATOL
    kept = torch.cat([embeds[:1, :5], embeds[:1, 8:]], dim=1)  # the same prompt without its padding
    squeezed = ours.generate(kept, None, max_new_tokens=3)
    assert (squeezed - got[:1]).abs().max() > 100 * ATOL
    assert (squeezed - pipeline_generate(ref, kept, None, 3)).abs().max() <= ATOL


@torch.no_grad()
def test_generate_other_lengths(gpt2_pair):
    """max_new_tokens other than 8, and the longest prompt the position table allows."""
    ref, ours = gpt2_pair
    embeds, mask = inputs()
    for n in (1, 3):
        assert (ours.generate(embeds, mask, max_new_tokens=n) - pipeline_generate(ref, embeds, mask, n)).abs().max() <= ATOL
    longest = torch.randn(1, 48 - 7, 32)  # positions 0 .. 47 are used
    assert (ours.generate(longest, max_new_tokens=8) - loop_generate(ref, longest, None, 8)).abs().max() <= ATOL


@torch.no_grad()
def test_old_bin_checkpoint_with_mask_buffers(tmp_path):
    """A pytorch_model.bin as older transformers wrote it: Conv1D weights and the causal-mask buffers."""
    ref = reference_gpt2(TINY, seed=3)
    ref.config.save_pretrained(tmp_path)
    state = dict(ref.state_dict())
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPT2.from_pretrained(tmp_path)
    embeds, mask = inputs()
    assert (ours(embeds, attention_mask=mask) - ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            ).abs().max() <= ATOL


@pytest.fixture(scope="module")
def projection_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("projection") / "projection_model"
    torch.manual_seed(0)
    ref = AudioLDM2ProjectionModel(**PROJECTION_TINY).eval()
    off_init(ref, seed=4)
    ref.save_pretrained(folder)
    return ref, AudioLDM2Projection.from_pretrained(folder)


def projection_inputs(B=2, Lt=6, seed=5):
    g = torch.Generator().manual_seed(seed)
    clap = torch.randn(B, 1, 16, generator=g)   # the pipeline's CLAP text embedding, unsqueezed
    t5 = torch.randn(B, Lt, 24, generator=g)
    clap_mask = torch.ones(B, 1, dtype=torch.long)  # the pipeline replaces CLAP's mask by ones
    t5_mask = torch.ones(B, Lt, dtype=torch.long)
    t5_mask[1, 3:] = 0
    return clap, t5, clap_mask, t5_mask


@torch.no_grad()
def test_projection_matches_diffusers(projection_pair):
    ref, ours = projection_pair
    clap, t5, clap_mask, t5_mask = projection_inputs()
    expected = ref(hidden_states=clap, hidden_states_1=t5, attention_mask=clap_mask, attention_mask_1=t5_mask)
    got, mask = ours(clap, t5, clap_mask, t5_mask)
    assert got.shape == expected.hidden_states.shape == (2, 1 + 6 + 4, 32)
    assert (got - expected.hidden_states).abs().max() <= ATOL
    assert mask.dtype == expected.attention_mask.dtype and torch.equal(mask, expected.attention_mask)
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1]  # the T5 EOS after the padding
    # Without masks: no mask, as diffusers.
    expected = ref(hidden_states=clap, hidden_states_1=t5)
    got, mask = ours(clap, t5)
    assert expected.attention_mask is None and mask is None
    assert (got - expected.hidden_states).abs().max() <= ATOL
    assert (ours(clap, t5 + 1.0)[0] - got)[:, 4:10].abs().amax(dim=-1).min() > 100 * ATOL  # listens to T5
    assert (ours(clap + 1.0, t5)[0] - got)[:, 1].abs().max() > 100 * ATOL  # and to CLAP


@torch.no_grad()
def test_projection_one_mask_missing(projection_pair):
    """diffusers fails when only one mask is given (`new_ones` of a tensor); ours takes the missing one as ones."""
    ref, ours = projection_pair
    clap, t5, clap_mask, t5_mask = projection_inputs()
    with pytest.raises(TypeError):
        ref(hidden_states=clap, hidden_states_1=t5, attention_mask=None, attention_mask_1=t5_mask)
    _, mask = ours(clap, t5, None, t5_mask)
    _, full = ours(clap, t5, clap_mask, t5_mask)
    assert torch.equal(mask, full)


@torch.no_grad()
def test_pipeline_folder_end_to_end(tmp_path, gpt2_pair, projection_pair):
    """A diffusers-style pipeline folder: both parts found by from_pretrained, and projection -> generation as
    the pipeline's encode_prompt chains them (specs/ldm.md §13 steps 2-3)."""
    ref_gpt2, _ = gpt2_pair
    ref_proj, _ = projection_pair
    ref_gpt2.save_pretrained(tmp_path / "language_model")
    ref_proj.save_pretrained(tmp_path / "projection_model")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "AudioLDM2Pipeline", "language_model": ["transformers", "GPT2Model"],
        "projection_model": ["audioldm2", "AudioLDM2ProjectionModel"]}))
    gpt2, proj = GPT2.from_pretrained(tmp_path), AudioLDM2Projection.from_pretrained(tmp_path)
    clap, t5, clap_mask, t5_mask = projection_inputs()
    out = ref_proj(hidden_states=clap, hidden_states_1=t5, attention_mask=clap_mask, attention_mask_1=t5_mask)
    expected = pipeline_generate(ref_gpt2, out.hidden_states, out.attention_mask, 8)
    embeds, mask = proj(clap, t5, clap_mask, t5_mask)
    assert (gpt2.generate(embeds, mask) - expected).abs().max() <= ATOL


@torch.no_grad()
def test_native_round_trip(tmp_path, gpt2_pair, projection_pair):
    _, gpt2 = gpt2_pair
    _, proj = projection_pair
    gpt2.save_pretrained(tmp_path / "gpt2")
    proj.save_pretrained(tmp_path / "proj")
    embeds, mask = inputs()
    assert (GPT2.from_pretrained(tmp_path / "gpt2").generate(embeds, mask) - gpt2.generate(embeds, mask)
            ).abs().max() <= ATOL
    clap, t5, clap_mask, t5_mask = projection_inputs()
    assert (AudioLDM2Projection.from_pretrained(tmp_path / "proj")(clap, t5)[0] - proj(clap, t5)[0]).abs().max() <= ATOL


@pytest.mark.slow
@torch.no_grad()
def test_official_sizes(tmp_path):
    """GPT-2 124M (AudioLDM 2's language_model config) and the 512/1024 -> 768 projection, chained on a
    Flan-T5-long prompt with padding, against diffusers' generation loop."""
    # Noise of GPT-2's init scale (0.02): at 0.1, 768 wide and 12 layers deep, the network is chaotic, and a 1e-6
    # change of the input moves the fed-back vectors by up to 0.2 (measured: transformers' cached and uncached
    # loops then disagree with each other by as much).
    ref = reference_gpt2(OFFICIAL, seed=6, scale=0.02)
    ref.save_pretrained(tmp_path / "language_model")
    gpt2 = GPT2.from_pretrained(tmp_path / "language_model")
    assert gpt2.config.dim == 768 and gpt2.config.num_layers == 12 and gpt2.config.max_positions == 1024
    torch.manual_seed(0)
    proj_ref = AudioLDM2ProjectionModel(**PROJECTION_OFFICIAL).eval()
    off_init(proj_ref, seed=7)
    proj_ref.save_pretrained(tmp_path / "projection_model")
    proj = AudioLDM2Projection.from_pretrained(tmp_path / "projection_model")
    g = torch.Generator().manual_seed(8)
    clap = torch.nn.functional.normalize(torch.randn(2, 1, 512, generator=g), dim=-1)
    t5 = torch.randn(2, 20, 1024, generator=g)
    clap_mask, t5_mask = torch.ones(2, 1, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)
    t5_mask[1, 12:] = 0
    out = proj_ref(hidden_states=clap, hidden_states_1=t5, attention_mask=clap_mask, attention_mask_1=t5_mask)
    embeds, mask = proj(clap, t5, clap_mask, t5_mask)
    assert (embeds - out.hidden_states).abs().max() <= ATOL and torch.equal(mask, out.attention_mask)
    assert (gpt2(embeds, attention_mask=mask) - ref(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            ).abs().max() <= ATOL
    got = gpt2.generate(embeds, mask)
    for reference in (pipeline_generate, loop_generate):
        expected = reference(ref, out.hidden_states, out.attention_mask, 8)
        assert (got - expected).abs().max() <= ATOL, reference.__name__
    other = gpt2.generate(proj(clap, t5.flip(1), clap_mask, t5_mask)[0], mask)
    assert (other - got).abs().amax(dim=-1).min() > 100 * ATOL
