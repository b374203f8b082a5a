"""MusicGen LM on the tiny preset: shapes, causality, cache == full forward, text masking, checkpoints."""

import pytest
import torch
from torch import nn

from musiclm_core.cache import KVCache
from musiclm_core.convert import musicgen as convert
from musiclm_core.hub import CheckpointError
from musiclm_core.musicgen import PRESETS, MusicGenConfig, MusicGenLM, sinusoids

from fixtures import tiny_musicgen, train_spm

TEXT = PRESETS["tiny"].text_dim


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MusicGenLM(PRESETS["tiny"]).eval()


def _codes(B, T, K=4, card=2048):
    return torch.randint(0, card + 1, (B, K, T))


def _text(B, L=6):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, L // 2:] = 0  # the last prompt is padded
    return torch.randn(B, L, TEXT), mask


def test_presets_and_delays():
    assert PRESETS["small"].delays == (0, 1, 2, 3)
    assert PRESETS["stereo-large"].delays == (0, 0, 1, 1, 2, 2, 3, 3)
    assert PRESETS["medium"].head_dim == 64 and PRESETS["tiny"].special == 2048
    with pytest.raises(ValueError, match="divisible"):
        MusicGenConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="audio_channels"):
        MusicGenConfig(audio_channels=3)
    with pytest.raises(ValueError, match="split over 2 channels"):
        MusicGenConfig(num_codebooks=5, audio_channels=2)


@pytest.mark.parametrize("preset,decoder_params", [
    ("small", 419_584_000), ("medium", 1_837_556_736), ("large", 3_255_382_016), ("stereo-small", 436_365_312)])
def test_official_sizes(preset, decoder_params):
    # Parameter counts of the official decoders (specs/musicgen.md 1.1), counted on the meta device.
    with torch.device("meta"):
        model = MusicGenLM(PRESETS[preset])
    total = sum(p.numel() for p in model.parameters())
    assert total - sum(p.numel() for p in model.text_proj.parameters()) == decoder_params


def test_sinusoids_cos_first():
    table = sinusoids(50, 8)
    p = torch.arange(50).float()
    assert torch.allclose(table[:, 0], torch.cos(p)) and torch.allclose(table[:, 4], torch.sin(p))
    inv = 10000 ** (-1 / 3)  # j = 1 of h = 4: 10000^(-j/(h-1))
    assert torch.allclose(table[:, 1], torch.cos(p * inv), atol=1e-5)


def test_forward_shape_and_causality(lm):
    codes = _codes(2, 9)
    text, mask = _text(2)
    memory = lm.cross_memory(text, mask)
    with torch.no_grad():
        logits = lm(codes, memory=memory)
        assert logits.shape == (2, 4, 9, 2048)
        changed = codes.clone()
        changed[:, :, 6:] = (changed[:, :, 6:] + 1) % 2049
        other = lm(changed, memory=memory)
    assert torch.equal(logits[:, :, :6], other[:, :, :6])
    assert (logits[:, :, 6:] - other[:, :, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("chunks", [[1] * 10, [4, 1, 1, 1, 1, 1, 1], [3, 5, 2]])
def test_cache_equals_full_forward(lm, chunks):
    B, T = 4, sum(chunks)
    codes = _codes(B, T)
    text, mask = _text(B)
    mask[2:] = 0  # rows 2, 3: the null condition of CFG
    text[2:] = 0
    memory = lm.cross_memory(text, mask)
    with torch.no_grad():
        full = lm(codes, memory=memory)
        cache = lm.new_cache(B, T + 3)
        parts, t = [], 0
        for n in chunks:
            offset = torch.tensor(t) if n == 1 else t  # decode steps take a tensor position
            parts.append(lm(codes[:, :, t:t + n], memory=memory, cache=cache, offset=offset))
            t += n
    err = (torch.cat(parts, dim=2) - full).abs().max().item()
    assert err <= 1e-5, err


def test_decode_step_is_one_static_graph(lm):
    # The position goes in as a tensor and the cache has a fixed size: one step traces as one graph, without
    # breaks, and later positions reuse it (what CUDA graphs and torch.compile need).
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    text, mask = _text(2)
    codes = _codes(2, 8)
    with torch.no_grad():
        memory = lm.cross_memory(text, mask)
        full = lm(codes, memory=memory)
        cache = lm.new_cache(2, 16)
        lm(codes[:, :, :3], memory=memory, cache=cache, offset=0)
        counter = CompileCounter()
        step = torch.compile(lambda column, offset: lm(column, memory=memory, cache=cache, offset=offset),
                             backend=counter, fullgraph=True, dynamic=False)
        steps = [step(codes[:, :, t:t + 1], torch.tensor(t)) for t in range(3, 8)]
    assert counter.frame_count == 1
    assert (torch.cat(steps, dim=2) - full[:, :, 3:]).abs().max() <= 1e-5


def test_compile_decode_matches_eager():
    # One-column steps through the compiled layer equal the full eager forward (fp32, max abs error <= 1e-5);
    # positions 0 and 1 run eager, and every later step of every layer reuses the one graph compiled first.
    from musiclm_core import generate as G

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    torch.manual_seed(0)
    lm = MusicGenLM(PRESETS["tiny"]).eval()  # its own: compile_decode changes the LM
    text, mask = _text(4)  # 4 rows, as many as the tiny LM's heads
    codes = _codes(4, 12)
    with torch.inference_mode():  # as generate_codes: a grad mode of its own would be a graph of its own
        memory = lm.cross_memory(text, mask)
        full = lm(codes, memory=memory)
        greedy = G.generate_codes(lm, text, mask, max_new_tokens=12, do_sample=False)
        assert lm.compile_decode() is lm
        cache = lm.new_cache(4, 12)
        with torch._dynamo.config.patch(error_on_recompile=True):
            steps = [lm(codes[:, :, t:t + 1], memory=memory, cache=cache, offset=torch.tensor(t)) for t in range(12)]
            compiled = G.generate_codes(lm, text, mask, max_new_tokens=12, do_sample=False)
            # Other sizes take the same graph: 2 rows (one prompt and CFG), a text of 4 tokens instead of 6, a
            # longer cache. (Sizes that were equal when it compiled, the rows and the heads, are not tied.)
            other_text, other_mask = _text(1, L=4)
            G.generate_codes(lm, other_text, other_mask, max_new_tokens=20, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 1  # the compiled layer ran (once compiled, never again)
    assert (torch.cat(steps, dim=2) - full).abs().max() <= 1e-5
    assert torch.equal(compiled, greedy)


def test_compile_decode_is_for_the_cpu():
    with torch.device("meta"):
        lm = MusicGenLM(PRESETS["tiny"])
    with pytest.raises(ValueError, match="compile_decode is for CPU decoding, the LM is on meta"):
        lm.compile_decode()
    lm = MusicGenLM(PRESETS["tiny"]).compile_decode().to("meta")
    with pytest.raises(ValueError, match="compile_decode is for CPU decoding, the input is on meta"):
        lm(_codes(1, 1).to("meta"))


def test_text_mask_and_null_rows(lm):
    B = 2
    codes = _codes(B, 5)
    text, mask = _text(B)
    with torch.no_grad():
        ref = lm(codes, memory=lm.cross_memory(text, mask))
        noisy = text.clone()
        noisy[-1, 3:] = 100 * torch.randn_like(noisy[-1, 3:])  # padded positions of the last prompt
        assert torch.equal(lm(codes, memory=lm.cross_memory(noisy, mask)), ref)
        # an all-masked memory (the null condition) is exactly no cross-attention, and never NaN
        null = lm(codes, memory=lm.cross_memory(torch.randn(B, 4, TEXT), torch.zeros(B, 4, dtype=torch.long)))
        assert torch.isfinite(null).all()
        assert torch.allclose(null, lm(codes, memory=None), atol=1e-6)
        assert (null - ref).abs().max() > 1e-3  # the text does matter


def test_positions_beyond_the_table(lm):
    # The tiny table has 512 rows; a cache positioned further out extends it, as transformers does.
    codes = _codes(1, 3)
    with torch.no_grad():
        cache = lm.new_cache(1, 600)
        lm(codes[:, :, :1], cache=cache, offset=0)
        out = lm(codes[:, :, 1:2], cache=cache, offset=590)
    assert lm.sinusoids.shape[0] >= 591 and torch.isfinite(out).all()
    assert torch.equal(lm.sinusoids[590], sinusoids(591, 64)[590])
    lm.reset_buffers()


def test_bad_input(lm):
    text, mask = _text(2)
    memory = lm.cross_memory(text, mask)
    with pytest.raises(ValueError, match=r"codes must be \(B, K=4, T\)"):
        lm(torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="memory has 2 rows, the input 3"):
        lm(_codes(3, 2), memory=memory)
    with pytest.raises(ValueError, match="do not fit a cache of 4"):
        lm(_codes(2, 5), cache=lm.new_cache(2, 4))
    with pytest.raises(ValueError, match="cache has 2 rows, the input 1"):
        lm(_codes(1, 1), cache=lm.new_cache(2, 4))
    with pytest.raises(ValueError, match=f"text states must be \\(B, Lt, {TEXT}\\)"):
        lm.cross_memory(torch.randn(2, 6, TEXT + 1), mask)
    with pytest.raises(ValueError, match="text mask must be"):
        lm.cross_memory(text, mask[:, :3])
    with pytest.raises(ValueError, match="no cross-attention"):
        MusicGenLM(MusicGenConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64, text_dim=16,
                                  cross_attention=False)).cross_memory(torch.randn(1, 2, 16), torch.ones(1, 2))
    with pytest.raises(ValueError, match="must be positive"):
        KVCache(2, 0, 4, 8, 16)
    with pytest.raises(ValueError, match="the KV cache takes no keys or values that require grad"):
        lm(_codes(2, 3), cache=lm.new_cache(2, 4))  # grad mode, and the LM's parameters require grad
    with torch.no_grad():
        lm(_codes(2, 3), cache=lm.new_cache(2, 4))


def test_cache_to():
    cache = KVCache(2, 1, 2, 4, 8)
    assert cache.max_len == 4 and cache.k.shape[3] == 5  # one spare slot, never written (KVCache docstring)
    assert cache.to(torch.float16).k.dtype == torch.float16 and cache.v.dtype == torch.float16
    # each layer's part follows: views of the new tensors, written through by update
    part = cache.layers[1]
    part.update(torch.tensor([2]), torch.ones(1, 2, 1, 8), torch.full((1, 2, 1, 8), 2.0))
    assert part.k.dtype == torch.float16 and part.k.data_ptr() == cache.k[1].data_ptr()
    assert cache.k[1, :, :, 2].eq(1).all() and cache.v[1, :, :, 2].eq(2).all() and cache.k[0].eq(0).all()


def test_native_round_trip(lm, tmp_path):
    lm.save_pretrained(tmp_path / "lm")
    with pytest.raises(FileExistsError):
        lm.save_pretrained(tmp_path / "lm")
    again = MusicGenLM.from_pretrained(tmp_path / "lm")
    assert again.config == lm.config
    codes = _codes(1, 4)
    with torch.no_grad():
        assert torch.equal(again(codes), lm(codes))
    half = MusicGenLM.from_pretrained(tmp_path / "lm", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.sinusoids.dtype == torch.float16


# --------------------------------------------------------------------------------------------------------------
# Converters: keys and configs (parity against real transformers checkpoints is in tests/parity)


def _hf_config(**decoder):
    dec = dict(model_type="musicgen_decoder", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=256, num_codebooks=4, vocab_size=2048, pad_token_id=2048, bos_token_id=2048,
               max_position_embeddings=512, activation_function="gelu", scale_embedding=False)
    dec.update(decoder)
    return {"model_type": "musicgen", "decoder": dec, "text_encoder": {"model_type": "t5", "d_model": 32}}


def _hf_state(model):
    """Our tiny model's weights under transformers' names (the inverse of the table and of the q/k/v join, for
    key tests)."""
    import re

    from musiclm_core.convert import keys

    parts = [p.removeprefix("self_attn.") for p in convert.SELF_ATTENTION_PARTS]
    state = keys.split_fused_qkv(model.state_dict(), "qkv.weight", parts)
    out = {}
    for theirs, ours in convert.TRANSFORMERS_TABLE:
        regex = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(ours)) + r"\Z")
        for key, value in state.items():
            m = regex.match(key)
            if m:
                out[theirs.format(**m.groupdict())] = value
    return out


def test_transformers_keys(lm):
    state = _hf_state(lm)
    assert len(state) == len(lm.state_dict()) + 2 * lm.config.num_layers  # q, k, v for each qkv
    state["decoder.model.decoder.embed_positions.weights"] = torch.zeros(512, 64)  # legacy key: dropped (G2)
    state["text_encoder.shared.weight"] = torch.zeros(3, 32)  # another part of the composite checkpoint
    loaded = convert.load_transformers(_hf_config(), convert.lm_part(state), source="test")
    codes = _codes(1, 3)
    with torch.no_grad():
        assert torch.equal(loaded(codes), lm(codes))
    bad = convert.lm_part(state)
    bad["decoder.model.decoder.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match="q_proj.bias"):
        convert.load_transformers(_hf_config(), bad, source="test")
    missing = convert.lm_part(state)
    del missing["decoder.lm_heads.3.weight"]
    with pytest.raises(CheckpointError, match="heads.3.weight"):
        convert.load_transformers(_hf_config(), missing, source="test")


def test_transformers_config_errors():
    cfg = convert.config_from_transformers(_hf_config(audio_channels=2, num_codebooks=8))
    assert cfg.delays == (0, 0, 1, 1, 2, 2, 3, 3) and cfg.text_dim == 32
    assert convert.config_from_transformers(_hf_config()).audio_channels == 1  # 4.31 configs: no field
    with pytest.raises(CheckpointError, match="activation_function = 'relu'"):
        convert.config_from_transformers(_hf_config(activation_function="relu"))
    with pytest.raises(CheckpointError, match="scale_embedding"):
        convert.config_from_transformers(_hf_config(scale_embedding=True))
    with pytest.raises(CheckpointError, match="pad_token_id"):
        convert.config_from_transformers(_hf_config(pad_token_id=0))
    with pytest.raises(CheckpointError, match="equals the decoder width"):
        convert.config_from_transformers(_hf_config(hidden_size=32, num_attention_heads=2))
    with pytest.raises(CheckpointError, match="model_type 'musicgen'"):
        convert.config_from_transformers({"model_type": "t5"})


XP_CFG = """
lm_model: transformer_lm
transformer_lm:
  dim: 64
  num_heads: 4
  num_layers: 2
  hidden_scale: 4
  n_q: {n_q}
  card: 2048
  norm: layer_norm
  norm_first: true
  activation: gelu
  positional_embedding: sin
  bias_ff: false
  bias_attn: false
  bias_proj: false
  layer_scale: null
codebooks_pattern:
  modeling: delay
  delay:
    delays: {delays}
    flatten_first: 0
    empty_initial: 0
interleave_stereo_codebooks:
  use: {stereo}
fuser:
  cross: [description]
  prepend: []
conditioners:
  description:
    model: t5
    t5:
      name: t5-base
"""


def _audiocraft_package(model: MusicGenLM, stereo=False):
    """Our model's weights in audiocraft's layout (fused in_proj, fp16), for key tests."""
    sd = model.state_dict()
    best = {}
    for k in range(model.config.num_codebooks):
        best[f"emb.{k}.weight"] = sd[f"embeddings.{k}.weight"]
        best[f"linears.{k}.weight"] = sd[f"heads.{k}.weight"]
    for i in range(model.config.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.layers.{i}."
        best[theirs + "self_attn.in_proj_weight"] = sd[ours + "self_attn.qkv.weight"]
        best[theirs + "cross_attention.in_proj_weight"] = torch.cat([sd[ours + f"cross_attn.{p}.weight"]
                                                                      for p in "qkv"])
        for attn, name in (("self_attn", "self_attn"), ("cross_attn", "cross_attention")):
            best[theirs + name + ".out_proj.weight"] = sd[ours + attn + ".out.weight"]
        for a, b in (("self_norm", "norm1"), ("cross_norm", "norm_cross"), ("ffn_norm", "norm2")):
            best[theirs + b + ".weight"], best[theirs + b + ".bias"] = sd[ours + a + ".weight"], sd[ours + a + ".bias"]
        best[theirs + "linear1.weight"] = sd[ours + "ffn_in.weight"]
        best[theirs + "linear2.weight"] = sd[ours + "ffn_out.weight"]
    best["out_norm.weight"], best["out_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    best["condition_provider.conditioners.description.output_proj.weight"] = sd["text_proj.weight"]
    best["condition_provider.conditioners.description.output_proj.bias"] = sd["text_proj.bias"]
    delays = [0, 0, 1, 1, 2, 2, 3, 3] if stereo else [0, 1, 2, 3]
    cfg = XP_CFG.format(n_q=len(delays), delays=delays, stereo="true" if stereo else "false")
    return {"best_state": {k: v.half() for k, v in best.items()}, "xp.cfg": cfg, "version": "1", "exported": True}


def test_audiocraft_layout(tmp_path):
    torch.manual_seed(1)
    config = MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=768)
    ref = MusicGenLM(config).half().float().eval()  # fp16-representable weights: the file stores fp16
    ref.reset_buffers()  # the sinusoids are derived, not stored: exact again
    folder = tmp_path / "ac"
    folder.mkdir()
    torch.save(_audiocraft_package(ref), folder / "state_dict.bin")
    loaded = MusicGenLM.from_pretrained(folder)
    assert loaded.config == config
    codes = _codes(1, 3)
    with torch.no_grad():
        assert torch.equal(loaded(codes), ref(codes))  # fp16 -> fp32 is exact
    stereo = convert.config_from_audiocraft(_audiocraft_package(ref, stereo=True)["xp.cfg"])
    assert stereo.audio_channels == 2 and stereo.num_codebooks == 8
    # OmegaConf references are followed
    xp = _audiocraft_package(ref)["xp.cfg"].replace("  dim: 64", "  dim: ${model.width}") + "model:\n  width: 64\n"
    assert convert.config_from_audiocraft(xp) == config


def test_audiocraft_errors():
    torch.manual_seed(1)
    ref = MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=768))
    package = _audiocraft_package(ref)
    with pytest.raises(CheckpointError, match="'xp.cfg'"):
        convert.load_audiocraft({"best_state": package["best_state"]}, source="x")
    extra = dict(package, best_state={**package["best_state"],
                                      "transformer.layers.0.layer_scale_1.scale": torch.zeros(64)})
    with pytest.raises(CheckpointError, match="layer_scale_1"):
        convert.load_audiocraft(extra, source="x")
    for old, new, match in [("norm_first: true", "norm_first: false", "norm_first"),
                            ("cross: [description]", "cross: []", "fuser.cross"),
                            ("name: t5-base", "name: t5-tiny", "t5-tiny"),
                            ("delays: [0, 1, 2, 3]", "delays: [0, 2, 4, 6]", "delays")]:
        with pytest.raises(CheckpointError, match=match):
            convert.config_from_audiocraft(package["xp.cfg"].replace(old, new))
    with pytest.raises(CheckpointError, match="not valid YAML"):
        convert.config_from_audiocraft("a: [")


# --------------------------------------------------------------------------------------------------------------
# The pipeline (tiny T5 + tiny MusicGen LM + a tiny EnCodec with 4 codebooks of 2048 at 800 frames/s)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real sentencepiece model, trained in a blink on music words."""
    from musiclm_core.t5 import T5Tokenizer

    return T5Tokenizer.from_folder(train_spm(tmp_path_factory.mktemp("spm"), lines=500, vocab_size=100))


@pytest.fixture(scope="module")
def mg(tokenizer):
    return tiny_musicgen(tokenizer)


@pytest.fixture(scope="module")
def mg_stereo(tokenizer):
    return tiny_musicgen(tokenizer, channels=2)


def test_pipeline_generate(mg):
    assert (mg.sample_rate, mg.frame_rate, mg.channels) == (3200, 800, 1)
    wav = mg.generate(["a calm piano", "loud drums and bass"], duration=0.02, seed=0)
    assert wav.shape == (2, 1, 16 * 4)  # int(0.02 * 800) = 16 frames of 4 samples
    assert torch.equal(wav, mg.generate(["a calm piano", "loud drums and bass"], duration=0.02, seed=0))
    assert not torch.equal(wav, mg.generate(["a calm piano", "loud drums and bass"], duration=0.02, seed=1))
    codes = mg.generate_codes(["a calm piano"], max_new_tokens=10, do_sample=False)
    assert codes.shape == (1, 4, 7)  # transformers' count: 11 steps with BOS -> 7 frames
    assert torch.equal(mg.decode_codes(codes), mg.generate(["a calm piano"], max_new_tokens=10, do_sample=False))
    uncond = mg.generate(None, num_samples=3, duration=0.01, do_sample=False)
    assert uncond.shape == (3, 1, 32)


def test_pipeline_audio_prompt(mg, mg_stereo):
    prompt = 0.3 * torch.randn(2, 1, 40)  # 10 frames
    codes = mg.generate_codes(["a", "b c"], duration=0.03, prompt_audio=prompt, do_sample=False)
    assert codes.shape == (2, 4, 24)
    assert torch.equal(codes[:, :, :10], mg.codec.encode(prompt))
    # at another sample rate the prompt is resampled to the model's
    resampled = mg.generate_codes(["a", "b c"], duration=0.03, prompt_audio=torch.randn(2, 1, 80),
                                  prompt_sample_rate=6400, do_sample=False)
    assert resampled.shape == (2, 4, 24)
    unconditional = mg.generate_codes(None, duration=0.03, prompt_audio=prompt, do_sample=False)
    assert unconditional.shape == (2, 4, 24) and torch.equal(unconditional[:, :, :10], codes[:, :, :10])
    stereo = 0.3 * torch.randn(1, 2, 40)
    codes = mg_stereo.generate_codes(["a"], duration=0.03, prompt_audio=stereo, do_sample=False)
    assert codes.shape == (1, 8, 24)
    assert torch.equal(codes[:, 0::2, :10], mg_stereo.codec.encode(stereo[:, :1]))  # L0 R0 L1 R1 ...
    assert torch.equal(codes[:, 1::2, :10], mg_stereo.codec.encode(stereo[:, 1:]))
    wav = mg_stereo.decode_codes(codes)
    assert wav.shape == (1, 2, 24 * 4)
    assert torch.equal(wav[:, 1:], mg_stereo.codec.decode(codes[:, 1::2]))


def test_pipeline_long_form_windows(mg, tokenizer):
    # audiocraft's scheme: windows of max_duration, each continuing the last (max_duration - extend_stride).
    long = tiny_musicgen(tokenizer, max_duration=0.04)  # windows of 32 frames
    long.lm.load_state_dict(mg.lm.state_dict())
    codes = long.generate_codes(["a calm piano"], duration=0.1, extend_stride=0.02, do_sample=False)
    assert codes.shape == (1, 4, 80)
    first = mg.generate_codes(["a calm piano"], duration=0.04, do_sample=False)
    assert torch.equal(codes[:, :, :32], first)
    from musiclm_core import generate as G

    text, mask = long.text_encoder.encode_text(["a calm piano"])
    second = G.generate_codes(long.lm, text, mask, num_frames=32, prompt_codes=codes[:, :, 16:32], top_k=250,
                              top_p=0.0, do_sample=False)
    assert torch.equal(codes[:, :, 32:48], second[:, :, 16:])
    seen = []
    long.generate_codes(["x"], duration=0.1, extend_stride=0.02, do_sample=False,
                        progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (80, 80) and all(t == 80 for _, t in seen)
    with pytest.raises(ValueError, match="extend_stride"):
        long.generate_codes(["x"], duration=0.1, extend_stride=0.05)
    with pytest.raises(ValueError, match="shorter than one window"):
        long.generate_codes(["x"], duration=0.1, extend_stride=0.02, prompt_audio=torch.randn(1, 1, 4 * 40))


@pytest.mark.parametrize("chunk,context", [(0.005, 1.0), (0.01, 0.005), (1.0, 0.0)])
def test_pipeline_stream(mg, chunk, context):
    kwargs = dict(duration=0.05, do_sample=False, prompt_audio=0.3 * torch.randn(2, 1, 24))
    chunks = list(mg.stream(["a", "b"], chunk_duration=chunk, context_duration=context, **kwargs))
    whole = mg.decode_codes(mg.generate_codes(["a", "b"], **kwargs))
    streamed = torch.cat(chunks, dim=-1)
    assert streamed.shape == whole.shape == (2, 1, 40 * 4)
    if context >= 0.05:  # the context covers everything: the chunks join into the one decode
        assert len(chunks) > 3
        assert (streamed - whole).abs().max() <= 1e-5
    else:  # the first chunk is decoded from the start: exact; later ones have a shorter run-up
        n = chunks[0].shape[-1]
        assert (chunks[0] - whole[..., :n]).abs().max() <= 1e-5


def test_pipeline_native_round_trip(mg, tmp_path):
    from musiclm_core.musicgen import MusicGen

    mg.save_pretrained(tmp_path / "mg")
    with pytest.raises(FileExistsError):
        mg.save_pretrained(tmp_path / "mg")
    again = MusicGen.from_pretrained(tmp_path / "mg")
    kwargs = dict(duration=0.02, seed=4)
    assert torch.equal(again.generate(["soft jazz"], **kwargs), mg.generate(["soft jazz"], **kwargs))
    with pytest.raises(CheckpointError, match="not a 'musicgen' pipeline"):
        MusicGen.from_pretrained(tmp_path / "mg" / "lm")


def test_pipeline_audiocraft_layout(mg, tokenizer, tmp_path):
    # state_dict.bin (the LM) + compression_state_dict.bin; here the latter is the 589-byte kind of the stereo
    # repos, which names where the codec is, and T5 comes from `text_encoder` instead of the hub ("t5-base").
    from musiclm_core.musicgen import MusicGen
    from musiclm_core.t5 import T5Config, T5Encoder

    torch.manual_seed(2)
    t5 = T5Encoder(T5Config(vocab_size=256, dim=768, head_dim=16, ffn_dim=32, num_layers=1, num_heads=2)).eval()
    t5.tokenizer = tokenizer
    t5.save_pretrained(tmp_path / "t5")
    mg.codec.save_pretrained(tmp_path / "codec")
    lm = MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=768)).half().float()
    lm.reset_buffers()
    folder = tmp_path / "ac"
    folder.mkdir()
    package = _audiocraft_package(lm)
    package["xp.cfg"] += "dataset:\n  segment_duration: 0.04\n"
    torch.save(package, folder / "state_dict.bin")
    torch.save({"pretrained": str(tmp_path / "codec"), "exported": True}, folder / "compression_state_dict.bin")
    loaded = MusicGen.from_pretrained(folder, text_encoder=tmp_path / "t5")
    assert loaded.max_duration == 0.04 and loaded.lm.config == lm.config
    direct = MusicGen(lm.eval(), mg.codec, t5, max_duration=0.04)
    kwargs = dict(duration=0.06, extend_stride=0.02, seed=5)  # past max_duration: two windows
    assert torch.equal(loaded.generate(["warm synth"], **kwargs), direct.generate(["warm synth"], **kwargs))
    with pytest.raises(ValueError, match="768-wide text states, the text encoder gives 32"):
        mg.text_encoder.save_pretrained(tmp_path / "t5_tiny")
        MusicGen.from_pretrained(folder, text_encoder=tmp_path / "t5_tiny")


def test_pipeline_quantize(mg, tmp_path):
    from musiclm_core.kernels.quant import LAYERS, BF16Linear, Int4Linear, Int8Linear
    from musiclm_core.musicgen import MusicGen

    mg.save_pretrained(tmp_path / "mg")
    bad = r"quantize must be None or one of \('bf16', 'int8', 'int4'\), got 'int2'"
    with pytest.raises(ValueError, match=bad):
        MusicGen.from_pretrained(tmp_path / "mg", quantize="int2")
    kwargs = dict(duration=0.1, seed=4, do_sample=False)
    reference = mg.generate_codes(["soft jazz"], **kwargs)
    states, mask = mg.text_encoder.encode_text(["soft jazz"])
    with torch.no_grad():
        ref_logits = mg.lm(reference, memory=mg.lm.cross_memory(states, mask))
    # bounds on the teacher-forced logits, relative to the largest: those of tests/unit/test_quant.py
    for mode, kind, bound in (("int8", Int8Linear, 0.02), ("bf16", BF16Linear, 0.01), ("int4", Int4Linear, 0.1)):
        quantized = MusicGen.from_pretrained(tmp_path / "mg", quantize=mode)
        linears = [m for m in quantized.lm.modules() if isinstance(m, (nn.Linear, kind))]
        assert linears and all(isinstance(m, kind) for m in linears), mode  # every LM linear, none left in fp32
        assert not any(isinstance(m, LAYERS) for m in quantized.text_encoder.modules())
        with pytest.raises(ValueError, match="cannot save an LM with quantised layers"):
            quantized.save_pretrained(tmp_path / f"saved_{mode}")
        assert not (tmp_path / f"saved_{mode}").exists() and len(list(tmp_path.iterdir())) == 1  # nothing left
        codes = quantized.generate_codes(["soft jazz"], **kwargs)
        assert codes.shape == reference.shape, mode
        # A random tiny LM has near-flat logits, so greedy tokens drift apart within a few frames (RESULTS.md):
        # the logits on the same codes are what must stay close (a wrong scale or a transposed weight would not).
        with torch.no_grad():
            logits = quantized.lm(reference, memory=quantized.lm.cross_memory(states, mask))
        error = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        assert 0 < error <= bound, (mode, error)


def test_pipeline_parts_must_fit(mg):
    from musiclm_core.musicgen import MusicGen

    def lm(**kwargs):
        base = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64, text_dim=32)
        return MusicGenLM(MusicGenConfig(**{**base, **kwargs}))

    with pytest.raises(ValueError, match="8 codebooks for 1 channel"):
        MusicGen(lm(num_codebooks=8), mg.codec, mg.text_encoder)
    with pytest.raises(ValueError, match="1024 entries, the codec's 2048"):
        MusicGen(lm(card=1024), mg.codec, mg.text_encoder)
    with pytest.raises(ValueError, match="48-wide text states"):
        MusicGen(lm(text_dim=48), mg.codec, mg.text_encoder)


@pytest.mark.parametrize("kwargs,match", [
    (dict(duration=0.0), "duration must be"), (dict(duration=-1.0), "duration must be"),
    (dict(duration=float("nan")), "duration must be"), (dict(duration=float("inf")), "duration must be"),
    (dict(duration=0.0001), "shorter than one frame"), (dict(), "give duration"),
    (dict(duration=1.0, max_new_tokens=5), "not both"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(duration=0.01, top_k=-1), "top_k"), (dict(duration=0.01, top_p=1.5), "top_p"),
    (dict(duration=0.01, temperature=0.0), "temperature"), (dict(duration=0.01, temperature=-2.0), "temperature"),
    (dict(duration=0.01, prompt_audio=torch.randn(1, 1, 80)), "not shorter than the duration"),
    (dict(duration=0.01, prompt_audio=torch.randn(1, 2, 8)), "mono MusicGen"),
    (dict(duration=0.01, prompt_audio=torch.randn(2, 1, 8)), "2 prompt audio"),
    (dict(duration=0.01, prompt_audio=torch.randn(1, 8)), r"\(B, C, N\)"),
    (dict(duration=0.01, num_samples=2), "num_samples 2")])
def test_pipeline_errors(mg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mg.generate(["a prompt"], **kwargs)


def test_pipeline_prompt_errors(mg, mg_stereo):
    with pytest.raises(ValueError, match="prompts is empty"):
        mg.generate([], duration=0.01)
    with pytest.raises(TypeError, match="list of strings"):
        mg.generate("a prompt", duration=0.01)
    with pytest.raises(ValueError, match="num_samples > 0"):
        mg.generate(None, duration=0.01)
    with pytest.raises(ValueError, match="stereo MusicGen: prompt audio must have 2"):
        mg_stereo.generate(["a"], duration=0.01, prompt_audio=torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="duration must be <="):
        next(mg.stream(["a"], duration=31.0))
    with pytest.raises(ValueError, match="chunk_duration"):
        next(mg.stream(["a"], duration=0.01, chunk_duration=0.0))


def test_resolve_checkpoint_downloads_one_variant(tmp_path, monkeypatch):
    """For a hub id only the files of the layout and variant asked for are fetched (a stand-in hub here)."""
    import fnmatch
    import json
    import shutil

    from musiclm_core import hub
    from musiclm_core.musicgen import resolve_checkpoint

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    for name in ("spiece.model", "model.safetensors", "model.fp32.safetensors", "pytorch_model.bin",
                 "pytorch_model.fp32.bin", "state_dict.bin", "compression_state_dict.bin"):
        (remote / name).write_bytes(b"x")
    fetched = []

    def fake_resolve(name_or_path, *, allow_patterns=None, revision=None):
        local = tmp_path / "cache"
        local.mkdir(exist_ok=True)
        for f in remote.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                if not (local / f.name).exists():
                    shutil.copy(f, local / f.name)
                    fetched.append(f.name)
        return local

    monkeypatch.setattr(hub, "resolve", fake_resolve)
    folder, layout = resolve_checkpoint("facebook/musicgen-stereo-small", variant="fp32")
    assert layout == "transformers"
    assert sorted(fetched) == ["config.json", "model.fp32.safetensors", "spiece.model"]
    folder, layout = resolve_checkpoint("facebook/musicgen-stereo-small", layout="audiocraft")
    assert layout == "audiocraft"
    assert sorted(fetched)[:2] == ["compression_state_dict.bin", "config.json"] and "state_dict.bin" in fetched
    assert "model.safetensors" not in fetched and "pytorch_model.bin" not in fetched


def test_resolve_checkpoint_errors(tmp_path):
    import json

    from musiclm_core.musicgen import resolve_checkpoint

    with pytest.raises(ValueError, match="layout must be"):
        resolve_checkpoint(tmp_path, layout="diffusers")
    with pytest.raises(CheckpointError, match="holds no MusicGen checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "musicgen_melody"}))
    with pytest.raises(CheckpointError, match="MusicGenMelody"):
        resolve_checkpoint(tmp_path)
