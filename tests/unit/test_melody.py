"""MusicGen Melody: the prefix-conditioned LM, its generation loop, the pipeline's melody handling, converters."""

import math
import sys
import types

import pytest
import torch

from musiclm_core import generate as G
from musiclm_core.chroma import chroma_features, null_chroma
from musiclm_core.convert import musicgen_melody as convert
from musiclm_core.hub import CheckpointError
from musiclm_core.melody import PRESETS, MusicGenMelody, MusicGenMelodyConfig, MusicGenMelodyLM, generate_codes
from musiclm_core.musicgen import MusicGenConfig

from fixtures import tiny_t5_and_codec, train_spm

SR = 32000


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MusicGenMelodyLM(PRESETS["tiny"]).eval()


def _tone(freq, seconds=0.6, sr=SR):
    t = torch.arange(int(sr * seconds)) / sr
    return 0.5 * torch.sin(2 * math.pi * freq * t)


def _codes(B, T, K=4):
    return torch.randint(0, 2049, (B, K, T))


# --------------------------------------------------------------------------------------------------------------
# Config and LM


def test_presets():
    with torch.device("meta"):
        model = MusicGenMelodyLM(PRESETS["melody"])
    assert not hasattr(model.layers[0], "cross_attn") and model.config.cross_attention is False
    assert model.chroma_proj.weight.shape == (1536, 12) and PRESETS["melody"].chroma_length == 235
    # specs/musicgen.md 1.1: the melody decoder's parameters, without the two projections
    extra = sum(p.numel() for m in (model.text_proj, model.chroma_proj) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) - extra == 1_384_424_448
    assert PRESETS["stereo-melody-large"].lm.delays == (0, 0, 1, 1, 2, 2, 3, 3)
    assert (PRESETS["melody-large"].lm.dim, PRESETS["melody-large"].lm.num_heads) == (2048, 32)


def test_config_errors():
    with pytest.raises(ValueError, match="cross_attention=False"):
        MusicGenMelodyConfig(MusicGenConfig(dim=64, num_heads=4))
    with pytest.raises(ValueError, match="chroma_length"):
        MusicGenMelodyConfig(PRESETS["tiny"].lm, chroma_length=0)
    assert MusicGenMelodyConfig.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


def test_prefix_layout(lm):
    B, F = 2, 20
    chroma = chroma_features([_tone(440), _tone(523.25, 1.0)], SR)
    assert chroma.shape == (B, 8, 12)
    text, mask = torch.randn(B, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    chroma = torch.nn.functional.one_hot(torch.randint(0, 12, (B, F)), 12).float()
    with torch.no_grad():
        prefix = lm.prefix(chroma, text, mask)
        projected = lm.chroma_proj(chroma)
        # tiled after the projection to exactly 235 frames: frame i is chroma frame i mod F
        assert prefix.shape == (B, 235 + 5, 64)
        torch.testing.assert_close(prefix[:, :235], projected[:, torch.arange(235) % F], atol=1e-6, rtol=0)
        # text: projected, then masked (the bias does not leak into padding)
        torch.testing.assert_close(prefix[:, 235:], lm.text_proj(text) * mask[..., None], atol=1e-6, rtol=0)
        assert not prefix[1, 237:].any() and prefix[0, 237:].abs().sum() > 0
        long = torch.nn.functional.one_hot(torch.randint(0, 12, (B, 300)), 12).float()
        torch.testing.assert_close(lm.prefix(long)[:, :235], lm.chroma_proj(long)[:, :235], atol=1e-6, rtol=0)  # cut
        assert lm.prefix(null_chroma(B)).shape == (B, 235, 64)  # no text: the chroma alone
    for bad, match in [(torch.zeros(B, 0, 12), "F >= 1"), (torch.zeros(B, 3, 11), "12"), (torch.zeros(3, 12), "B, F")]:
        with pytest.raises(ValueError, match=match):
            lm.prefix(bad)
    with pytest.raises(ValueError, match="text_states must be"):
        lm.prefix(chroma, torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="text_mask must be"):
        lm.prefix(chroma, text, mask[:, :3])
    with pytest.raises(ValueError, match="without text_states"):
        lm.prefix(chroma, None, mask)


def test_prefix_is_part_of_the_sequence(lm):
    B, T = 2, 6
    codes = _codes(B, T)
    prefix = lm.prefix(null_chroma(B, 3), torch.randn(B, 4, 32), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with torch.no_grad():
        ours = lm(codes, prefix=prefix)
        full = lm.forward_embeds(torch.cat([prefix, lm.embed(codes)], dim=1))  # positions from 0 on chroma frame 0
        assert ours.shape == (B, 4, T, 2048) and torch.equal(ours, full[:, :, prefix.shape[1]:])
        # Nothing in the prefix is masked: a zero (padded) text row still takes a position and a softmax share.
        padded = torch.cat([prefix, torch.zeros(B, 1, 64)], dim=1)
        assert (lm(codes, prefix=padded) - ours).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prefix must be"):
        lm(codes, prefix=torch.zeros(B, 3, 32))


@pytest.mark.parametrize("chunks", [(3, 1, 1, 1), (1, 2, 3)])
def test_cached_decoding_equals_full_forward(lm, chunks):
    B, T = 2, sum(chunks)
    codes = _codes(B, T)
    prefix = lm.prefix(chroma_features(_tone(440), SR).expand(B, -1, -1), torch.randn(B, 3, 32))
    P = prefix.shape[1]
    with torch.no_grad():
        full = lm(codes, prefix=prefix)
        cache = lm.new_cache(B, P + T)
        pieces, start = [lm(codes[:, :, : chunks[0]], prefix=prefix, cache=cache)], chunks[0]
        for n in chunks[1:]:
            pieces.append(lm(codes[:, :, start: start + n], cache=cache, offset=torch.tensor(P + start)))
            start += n
    assert (torch.cat(pieces, dim=2) - full).abs().max() < 1e-5


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_generation_equals_uncached_loop(lm, guidance_scale):
    """generate_codes (prefix in the first step, then one cached column at shifted positions) against a naive
    loop that runs the whole [prefix; codes] sequence again at every step."""
    B = 2
    chroma = chroma_features([_tone(440), _tone(330)], SR)
    text, mask = torch.randn(B, 3, 32), torch.tensor([[1, 1, 1], [1, 0, 0]])
    ours = generate_codes(lm, chroma, text, mask, max_new_tokens=8, guidance_scale=guidance_scale,
                          do_sample=False)
    if guidance_scale:
        prefix = lm.prefix(torch.cat([chroma, null_chroma(B, chroma.shape[1])]),
                           torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)]))
    else:
        prefix = lm.prefix(chroma, text, mask)
    fed = []

    def naive(tokens, position):
        fed.append(tokens)
        return lm(torch.cat(fed, dim=-1), prefix=prefix)[:, :, -1]

    delays, T = G.plan_frames(lm.config.delays, 0, max_new_tokens=8)
    pattern = G.build_pattern(None, B, 4, T, delays, 2048)
    ref = torch.cat(list(G.decode_pattern(naive, pattern, delays, guidance_scale=guidance_scale, temperature=1.0,
                                          top_k=0, top_p=1.0, do_sample=False)), dim=-1)
    assert ours.shape == (B, 4, 5) and torch.equal(ours, ref)


def test_compile_decode_gives_the_eager_tokens():
    # The melody LM has no cross-attention (its conditioning is a prefix): the compiled layer without it, fp32.
    torch.manual_seed(0)
    lm = MusicGenMelodyLM(PRESETS["tiny"]).eval()  # its own: compile_decode changes the LM
    chroma = chroma_features([_tone(440), _tone(330)], SR)
    text, mask = torch.randn(2, 3, 32), torch.tensor([[1, 1, 1], [1, 0, 0]])
    eager = generate_codes(lm, chroma, text, mask, max_new_tokens=12, guidance_scale=3.0, do_sample=False)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = generate_codes(lm.compile_decode(), chroma, text, mask, max_new_tokens=12, guidance_scale=3.0,
                              do_sample=False)
    assert counters["stats"]["unique_graphs"] == 1  # the compiled layer ran
    assert torch.equal(compiled, eager)


def test_generate_codes_errors(lm):
    with pytest.raises(ValueError, match="chroma must be"):
        generate_codes(lm, torch.zeros(2, 12), max_new_tokens=5)
    with pytest.raises(ValueError, match="top_k"):
        generate_codes(lm, null_chroma(1), max_new_tokens=5, top_k=-1)
    with pytest.raises(ValueError, match="give exactly one"):
        generate_codes(lm, null_chroma(1))


def test_native_lm_round_trip(lm, tmp_path):
    lm.save_pretrained(tmp_path / "lm")
    again = MusicGenMelodyLM.from_pretrained(tmp_path / "lm")
    assert again.melody_config == lm.melody_config
    codes, prefix = _codes(1, 3), lm.prefix(null_chroma(1), torch.randn(1, 2, 32))
    with torch.no_grad():
        assert torch.equal(again(codes, prefix=prefix), lm(codes, prefix=prefix))


# --------------------------------------------------------------------------------------------------------------
# transformers layout (parity against transformers itself: tests/parity/test_melody_parity.py)


def _hf_config(**top):
    decoder = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, num_codebooks=4,
                   vocab_size=2048, max_position_embeddings=512, pad_token_id=2048, bos_token_id=2048,
                   model_type="musicgen_melody_decoder")
    return {"model_type": "musicgen_melody", "num_chroma": 12, "chroma_length": 235, "decoder": decoder,
            "text_encoder": {"model_type": "t5", "d_model": 32}, "audio_encoder": {"model_type": "encodec"}, **top}


def _hf_state(model: MusicGenMelodyLM):
    """Our weights under transformers' names: the converter's table read backwards (our qkv split first)."""
    import re

    from musiclm_core.convert import keys

    rows = []
    for theirs, ours in convert.TRANSFORMERS_TABLE:
        regex = re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{k\}", r"(?P<k>\d+)")
        rows.append((re.compile(regex + r"\Z"), theirs))
    out = {}
    parts = [p.removeprefix("self_attn.") for p in convert.musicgen.SELF_ATTENTION_PARTS]
    for key, value in keys.split_fused_qkv(model.state_dict(), "qkv.weight", parts).items():
        theirs = next(t.format(**m.groupdict()) for r, t in rows if (m := r.match(key)))
        out[theirs] = value
    return out


def test_transformers_keys(lm):
    state = _hf_state(lm)
    assert "audio_enc_to_dec_proj.weight" in state and "decoder.model.decoder.layers.1.fc1.weight" in state
    state["decoder.model.decoder.embed_positions.weights"] = torch.zeros(512, 64)  # legacy, dropped
    loaded = convert.load_transformers(_hf_config(), state, source="hf")
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(CheckpointError, match="missing keys.*\n.*chroma_proj.bias"):
        convert.load_transformers(_hf_config(), {k: v for k, v in state.items()
                                                 if k != "audio_enc_to_dec_proj.bias"}, source="hf")
    with pytest.raises(CheckpointError, match="unexpected keys.*\n.*audio_enc_to_dec_proj.extra"):
        convert.load_transformers(_hf_config(), {**state, "audio_enc_to_dec_proj.extra": torch.zeros(1)},
                                  source="hf")


def test_transformers_config_errors():
    with pytest.raises(CheckpointError, match="model_type 'musicgen'"):
        convert.config_from_transformers(_hf_config(model_type="musicgen"))
    with pytest.raises(CheckpointError, match="num_chroma = 13"):
        convert.config_from_transformers(_hf_config(num_chroma=13))
    bad = _hf_config()
    bad["decoder"]["activation_function"] = "relu"
    with pytest.raises(CheckpointError, match="activation_function"):
        convert.config_from_transformers(bad)
    config = convert.config_from_transformers(_hf_config(chroma_length=100))
    assert config.chroma_length == 100 and config.lm.cross_attention is False and config.lm.dim == 64


def test_resolve_refuses_other_models(tmp_path):
    import json

    from musiclm_core.melody import resolve_checkpoint
    from musiclm_core.musicgen import resolve_checkpoint as resolve_musicgen

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    with pytest.raises(CheckpointError, match="is not a MusicGen Melody.*use MusicGen"):
        resolve_checkpoint(plain)
    melody = tmp_path / "melody"
    melody.mkdir()
    (melody / "config.json").write_text(json.dumps({"model_type": "musicgen_melody"}))
    assert resolve_checkpoint(melody) == (melody, "transformers")
    with pytest.raises(CheckpointError, match="use MusicGenMelody"):
        resolve_musicgen(melody)
    with pytest.raises(CheckpointError, match="holds no MusicGen checkpoint"):
        resolve_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# audiocraft layout

XP_CFG = """
lm_model: transformer_lm
sample_rate: 32000
transformer_lm:
  dim: 64
  num_heads: 4
  num_layers: 2
  hidden_scale: 4
  n_q: 4
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
    delays: [0, 1, 2, 3]
    flatten_first: 0
    empty_initial: 0
interleave_stereo_codebooks:
  use: false
fuser:
  cross_attention_pos_emb: false
  sum: []
  prepend: [self_wav, description]
  cross: []
conditioners:
  self_wav:
    model: chroma_stem
    chroma_stem:
      sample_rate: ${sample_rate}
      n_chroma: 12
      radix2_exp: 14
      argmax: true
      match_len_on_eval: false
  description:
    model: t5
    t5:
      name: t5-base
dataset:
  segment_duration: 30
"""


def _audiocraft_package(model: MusicGenMelodyLM):
    """Our weights in audiocraft's layout (fused in_proj, fp16), with the chroma window it also stores."""
    sd = model.state_dict()
    best = {}
    for k in range(model.config.num_codebooks):
        best[f"emb.{k}.weight"] = sd[f"embeddings.{k}.weight"]
        best[f"linears.{k}.weight"] = sd[f"heads.{k}.weight"]
    for i in range(model.config.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.layers.{i}."
        best[theirs + "self_attn.in_proj_weight"] = sd[ours + "self_attn.qkv.weight"]
        best[theirs + "self_attn.out_proj.weight"] = sd[ours + "self_attn.out.weight"]
        for a, b in (("self_norm", "norm1"), ("ffn_norm", "norm2")):
            best[theirs + b + ".weight"], best[theirs + b + ".bias"] = sd[ours + a + ".weight"], sd[ours + a + ".bias"]
        best[theirs + "linear1.weight"] = sd[ours + "ffn_in.weight"]
        best[theirs + "linear2.weight"] = sd[ours + "ffn_out.weight"]
    best["out_norm.weight"], best["out_norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    prefix = "condition_provider.conditioners."
    best[prefix + "description.output_proj.weight"] = sd["text_proj.weight"]
    best[prefix + "description.output_proj.bias"] = sd["text_proj.bias"]
    best[prefix + "self_wav.output_proj.weight"] = sd["chroma_proj.weight"]
    best[prefix + "self_wav.output_proj.bias"] = sd["chroma_proj.bias"]
    best[prefix + "self_wav.chroma.spec.window"] = torch.hann_window(16384)
    return {"best_state": {k: v.half() for k, v in best.items()}, "xp.cfg": XP_CFG, "version": "1",
            "exported": True}


@pytest.fixture(scope="module")
def lm768():
    torch.manual_seed(1)
    config = MusicGenMelodyConfig(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=768,
                                                 cross_attention=False))
    model = MusicGenMelodyLM(config).half().float().eval()  # fp16-representable: the file stores fp16
    model.reset_buffers()
    return model


def test_audiocraft_layout(lm768, tmp_path):
    folder = tmp_path / "ac"
    folder.mkdir()
    torch.save(_audiocraft_package(lm768), folder / "state_dict.bin")
    loaded = MusicGenMelodyLM.from_pretrained(folder)
    assert loaded.melody_config == lm768.melody_config
    codes, prefix = _codes(1, 3), lm768.prefix(null_chroma(1), torch.randn(1, 2, 768))
    with torch.no_grad():
        assert torch.equal(loaded(codes, prefix=prefix), lm768(codes, prefix=prefix))  # fp16 -> fp32: exact
    # the plain MusicGen loader refuses it, saying why
    from musiclm_core.convert import musicgen as convert_musicgen

    with pytest.raises(CheckpointError, match="melody checkpoint takes its conditioning as a prefix"):
        convert_musicgen.config_from_audiocraft(XP_CFG)


def test_audiocraft_errors(lm768):
    package = _audiocraft_package(lm768)
    extra = dict(package, best_state={**package["best_state"], "condition_provider.conditioners.self_wav.x": 0})
    with pytest.raises(CheckpointError, match="self_wav.x"):
        convert.load_audiocraft(extra, source="x")
    with pytest.raises(CheckpointError, match="'best_state'"):
        convert.load_audiocraft({"xp.cfg": XP_CFG}, source="x")
    for old, new, match in [("cross: []", "cross: [description]", "fuser"),
                            ("prepend: [self_wav, description]", "prepend: [description]", "fuser"),
                            ("model: chroma_stem", "model: chroma", "chroma_stem"),
                            ("n_chroma: 12", "n_chroma: 24", "n_chroma"),
                            ("radix2_exp: 14", "radix2_exp: 12", "radix2_exp"),
                            ("argmax: true", "argmax: false", "argmax"),
                            ("norm_first: true", "norm_first: false", "norm_first")]:
        with pytest.raises(CheckpointError, match=match):
            convert.config_from_audiocraft(XP_CFG.replace(old, new))
    assert convert.config_from_audiocraft(XP_CFG.replace("segment_duration: 30", "segment_duration: 10")) \
        .chroma_length == 1 + 320000 // 4096


# --------------------------------------------------------------------------------------------------------------
# The pipeline (tiny T5 + tiny melody LM + a tiny EnCodec with 4 codebooks of 2048 at 800 frames/s)

WORDS = "the a of and with music song drums bass guitar synth piano calm loud pop rock jazz warm dark".split()


@pytest.fixture(scope="module")
def mel(tmp_path_factory):
    from musiclm_core.t5 import T5Tokenizer

    folder = train_spm(tmp_path_factory.mktemp("melody_spm"), lines=300, vocab_size=80, words=WORDS, max_words=8)
    t5, codec = tiny_t5_and_codec(T5Tokenizer.from_folder(folder))
    return MusicGenMelody(MusicGenMelodyLM(PRESETS["tiny"]), codec, t5)


def test_pipeline_generate(mel):
    wav = mel.generate(["calm piano", "loud drums"], melody=[_tone(440), _tone(330, 1.2)], melody_sample_rate=SR,
                       duration=0.01, seed=0)
    assert wav.shape == (2, 1, 8 * 4)  # int(0.01 * 800) = 8 frames of 4 samples
    codes = mel.generate_codes(None, melody=torch.stack([_tone(440), _tone(330)])[:, None], melody_sample_rate=SR,
                               max_new_tokens=8, do_sample=False)  # no text: one piece per melody
    assert codes.shape == (2, 4, 5)
    assert mel.generate_codes(None, num_samples=3, max_new_tokens=6, do_sample=False).shape == (3, 4, 3)


def test_melody_forms(mel):
    a, b = _tone(440), _tone(330, 1.0)
    batch = mel.melody_chroma([a, None, b], SR, 3)  # None: no melody for that prompt
    assert torch.equal(batch, torch.stack([*chroma_features([a, b], SR)]).index_select(0, torch.tensor([0, 0, 1]))
                       .index_copy(0, torch.tensor([1]), null_chroma(1, batch.shape[1])))
    assert torch.equal(mel.melody_chroma(None, None, 2), null_chroma(2, 1))
    assert torch.equal(mel.melody_chroma([None, None], SR, 2), null_chroma(2, 1))
    assert torch.equal(mel.melody_chroma(a[None], SR, 1), chroma_features(a, SR))  # one (C, N) melody
    # multichannel: averaged to mono
    stereo = torch.stack([a, b[: a.shape[0]]])[None]  # (1, 2, N)
    assert torch.equal(mel.melody_chroma(stereo, SR, 1), chroma_features(stereo.mean(dim=1), SR))


def test_melody_sample_rate_is_passed_through(mel):
    wav = _tone(440, 1.0, sr=16000)
    at_16k = mel.melody_chroma(wav, 16000, 1)
    assert torch.equal(at_16k, chroma_features(wav, 16000)) and at_16k[0, 1:-1, 9].all()  # A
    # read as 24 kHz the same samples are a fifth higher (E): the rate must reach the chroma
    assert mel.melody_chroma(wav, 24000, 1)[0, 1:-1, 4].all()
    assert torch.equal(mel.melody_chroma(wav, None, 1), chroma_features(wav, mel.sample_rate))  # default: model's


def test_short_and_silent_melodies(mel):
    short = _tone(440, 0.1)  # 3200 samples: less than one STFT window (16384)
    chroma = mel.melody_chroma(short, SR, 1)
    assert chroma.shape == (1, 5, 12) and chroma[0, :, 9].any()
    with pytest.warns(UserWarning, match="silent"):
        silent = mel.generate_codes(["warm synth"], melody=torch.zeros(SR), melody_sample_rate=SR,
                                    max_new_tokens=8, do_sample=False)
    # silence gives bin 0 everywhere, which is exactly the no-melody condition
    assert torch.equal(silent, mel.generate_codes(["warm synth"], max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("kwargs,match", [
    (dict(melody=[_tone(440)] * 2), "2 melodies for 1 prompt"),
    (dict(melody=torch.zeros(2, 1, 4000)), "2 melodies for 1 prompt"),
    (dict(melody=torch.zeros(1, 1, 1, 4000)), r"\(B, C, N\)"),
    (dict(melody="tune.wav"), "tensor or a list"),
    (dict(melody=torch.zeros(0)), "empty"),
    (dict(melody=torch.full((4000,), float("nan"))), "NaN"),
    (dict(melody=_tone(440), melody_sample_rate=0), "sample_rate"),
    (dict(melody=_tone(440), separate_stems="yes"), "separate_stems"),
    (dict(duration=31.0), "one window"),
    (dict(duration=0.01, top_k=-1), "top_k")])
def test_pipeline_errors(mel, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs} if "duration" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        mel.generate(["a prompt"], **kwargs)


def test_pipeline_stream(mel):
    kwargs = dict(melody=[_tone(440), _tone(330, 1.2)], melody_sample_rate=SR, duration=0.04, do_sample=False)
    chunks = list(mel.stream(["calm piano", "loud drums"], chunk_duration=0.005, context_duration=1.0, **kwargs))
    whole = mel.decode_codes(mel.generate_codes(["calm piano", "loud drums"], **kwargs))
    streamed = torch.cat(chunks, dim=-1)
    assert streamed.shape == whole.shape == (2, 1, 32 * 4)  # int(0.04 * 800) = 32 frames
    assert len(chunks) > 3
    assert (streamed - whole).abs().max() <= 1e-5  # the context covers everything: one decode, in pieces
    with pytest.raises(ValueError, match="chunk_duration must be a finite number of seconds > 0, got 0"):
        next(mel.stream(["a"], duration=0.01, chunk_duration=0))
    with pytest.raises(ValueError, match="duration must be <= 30.0 s"):
        next(mel.stream(["a"], duration=31.0))


def test_quantized_lm_is_not_saved(mel, tmp_path):
    import copy

    from musiclm_core.kernels.quant import quantize_weights

    lm = quantize_weights(copy.deepcopy(mel.lm), "int8")
    with pytest.raises(ValueError, match=r"cannot save an LM with quantised layers \(\d+, e.g. "):
        lm.save_pretrained(tmp_path / "lm")
    assert not (tmp_path / "lm").exists()


def test_int4_keeps_the_chroma_projection(mel):
    import copy

    from torch import nn

    from musiclm_core.kernels.quant import Int4Linear, quantize_weights

    # The 12-bin chroma projection is no shape for the int4 kernel (in_features 12): it keeps its fp32 weights,
    # every other linear of the LM is quantised, and the LM still generates.
    lm = quantize_weights(copy.deepcopy(mel.lm), "int4")
    assert isinstance(lm.chroma_proj, nn.Linear)
    others = [m for name, m in lm.named_modules()
              if isinstance(m, (nn.Linear, Int4Linear)) and name != "chroma_proj"]
    assert others and all(isinstance(m, Int4Linear) for m in others)
    quantized = MusicGenMelody(lm, mel.codec, mel.text_encoder)
    codes = quantized.generate_codes(["calm piano"], melody=[_tone(440)], melody_sample_rate=SR, duration=0.02,
                                     do_sample=False)
    assert codes.shape[:2] == (1, mel.lm.config.num_codebooks)


def test_pipeline_refuses_what_it_does_not_do(mel):
    with pytest.raises(ValueError, match="needs a MusicGenMelodyLM"):
        from musiclm_core.musicgen import MusicGenLM

        MusicGenMelody(MusicGenLM(MusicGenConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=64, text_dim=32)),
                       mel.codec, mel.text_encoder)


def test_stem_separation_needs_demucs(mel, monkeypatch):
    monkeypatch.setitem(sys.modules, "demucs", None)  # as if not installed
    monkeypatch.setattr(mel, "_separator", None)
    with pytest.raises(ImportError, match=r"needs Demucs.*pip install demucs"):
        mel.melody_chroma(_tone(440), SR, 1, separate_stems=True)


def test_stem_separation_drops_drums_and_bass(mel, monkeypatch):
    # A stand-in Demucs: its "stems" are fixed tones, so the chroma says which stems were kept.
    tones = {"drums": 261.63, "bass": 293.66, "other": 440.0, "vocals": 440.0}  # C, D, A, A

    class FakeDemucs(torch.nn.Module):
        samplerate, audio_channels, sources = 44100, 2, list(tones)

    def apply_model(model, mix, device=None):
        B, C, N = mix.shape
        assert C == 2 and device == mix.device
        t = torch.arange(N) / model.samplerate
        stems = torch.stack([torch.sin(2 * math.pi * f * t) for f in tones.values()])  # (S, N)
        return stems[None, :, None].expand(B, -1, C, -1)  # (B, S, C, N)

    pretrained = types.SimpleNamespace(get_model=lambda name: FakeDemucs())
    apply = types.SimpleNamespace(apply_model=apply_model)
    monkeypatch.setitem(sys.modules, "demucs", types.SimpleNamespace(pretrained=pretrained, apply=apply))
    monkeypatch.setitem(sys.modules, "demucs.pretrained", pretrained)
    monkeypatch.setitem(sys.modules, "demucs.apply", apply)
    monkeypatch.setattr(mel, "_separator", None)
    mix = _tone(261.63, 1.0)  # a C: what the mixture holds does not matter to the stand-in
    assert mel.melody_chroma(mix, SR, 1)[0, 1:-1, 0].all()  # without separation: C
    separated = mel.melody_chroma(mix, SR, 1, separate_stems=True)
    assert separated[0, 1:-1, 9].all()  # vocals + other: A; drums (C) and bass (D) are gone


def test_pipeline_native_round_trip(mel, tmp_path):
    from musiclm_core import hub
    from musiclm_core.musicgen import MusicGen

    mel.save_pretrained(tmp_path / "native")
    assert hub.read_json(tmp_path / "native" / "config.json")[hub.NATIVE_FORMAT]["model"] == "musicgen_melody"
    again = MusicGenMelody.from_pretrained(tmp_path / "native")
    kwargs = dict(melody=_tone(440), melody_sample_rate=SR, duration=0.01, seed=3)
    assert torch.equal(again.generate(["soft synth"], **kwargs), mel.generate(["soft synth"], **kwargs))
    with pytest.raises(CheckpointError, match="'musicgen_melody', not a 'musicgen'"):
        MusicGen.from_pretrained(tmp_path / "native")
    with pytest.raises(FileExistsError):
        mel.save_pretrained(tmp_path / "native")


def test_pipeline_audiocraft_layout(mel, lm768, tmp_path):
    from musiclm_core.t5 import T5Config, T5Encoder

    torch.manual_seed(2)
    t5 = T5Encoder(T5Config(vocab_size=256, dim=768, head_dim=16, ffn_dim=32, num_layers=1, num_heads=2)).eval()
    t5.tokenizer = mel.text_encoder.tokenizer
    t5.save_pretrained(tmp_path / "t5")
    mel.codec.save_pretrained(tmp_path / "codec")
    folder = tmp_path / "ac"
    folder.mkdir()
    torch.save(_audiocraft_package(lm768), folder / "state_dict.bin")
    torch.save({"pretrained": str(tmp_path / "codec"), "exported": True}, folder / "compression_state_dict.bin")
    loaded = MusicGenMelody.from_pretrained(folder, text_encoder=tmp_path / "t5")
    assert loaded.max_duration == 30.0 and loaded.lm.melody_config == lm768.melody_config
    direct = MusicGenMelody(lm768, mel.codec, t5)
    kwargs = dict(melody=_tone(440), melody_sample_rate=SR, max_new_tokens=6, seed=5)
    assert torch.equal(loaded.generate_codes(["warm"], **kwargs), direct.generate_codes(["warm"], **kwargs))


# --------------------------------------------------------------------------------------------------------------
# CLI: `musiclm generate --melody`


def test_cli_generate_with_melody(mel, tmp_path):
    from musiclm_core.audio import load_audio, save_audio
    from musiclm_core.cli import main

    mel.save_pretrained(tmp_path / "model")
    tune = torch.stack([_tone(440, 1.0, sr=16000), _tone(330, 1.0, sr=16000)])  # stereo, at its own rate
    save_audio(tmp_path / "tune.wav", tune, 16000)
    out = tmp_path / "out.wav"
    args = ["generate", "calm piano", "--model", str(tmp_path / "model"), "--melody", str(tmp_path / "tune.wav"),
            "--duration", "0.01", "--seed", "4", "--normalize", "none", "-o", str(out)]
    assert main(args) == 0
    melody, rate = load_audio(tmp_path / "tune.wav")
    expected = mel.generate(["calm piano"], melody=melody, melody_sample_rate=16000, duration=0.01, seed=4)
    wav, sr = load_audio(out)
    assert sr == mel.sample_rate and (wav - expected[0].clamp(-1, 1)).abs().max() <= 1 / 32768 + 1e-6
    without = mel.generate(["calm piano"], duration=0.01, seed=4)
    assert not torch.equal(expected, without)  # the melody reached the model (not the no-melody condition)


def test_cli_melody_errors(mel, tmp_path, capsys):
    from musiclm_core.audio import save_audio
    from musiclm_core.cli import main
    from musiclm_core.musicgen import MusicGen, MusicGenLM

    tune = tmp_path / "tune.wav"
    save_audio(tune, _tone(440, 0.5)[None], SR)
    plain = MusicGen(MusicGenLM(MusicGenConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=64, text_dim=32)),
                     mel.codec, mel.text_encoder)
    plain.save_pretrained(tmp_path / "plain")
    mel.save_pretrained(tmp_path / "melody")
    out = str(tmp_path / "out.wav")
    assert main(["generate", "a", "--model", str(tmp_path / "plain"), "--melody", str(tune), "-o", out]) == 1
    assert "--melody needs a MusicGen Melody checkpoint" in capsys.readouterr().err
    assert main(["generate", "a", "--model", str(tmp_path / "melody"), "--melody", str(tmp_path / "no.wav"),
                 "-o", out]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["generate", "a", "--model", str(tmp_path / "melody"), "--continue", str(tune), "-o", out]) == 1
    assert "--continue is not supported" in capsys.readouterr().err
