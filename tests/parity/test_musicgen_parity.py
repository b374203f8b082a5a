"""MusicGen LM and generation against transformers' MusicgenForConditionalGeneration.

The reference checkpoints are tiny composite models (T5 + EnCodec + decoder) with random weights that
transformers itself writes with `save_pretrained` (plus a small sentencepiece model as spiece.model). The LM
tests feed our LM the text states of transformers' own text encoder, so that they test the LM alone; the
pipeline tests at the end run our whole `MusicGen` (our tokenizer, T5, LM and EnCodec) from the same folder.

Tolerances: logits max abs error <= 1e-4 (fp32); greedy decoding token-identical.

The fixture is made so that the tests can fail: EnCodec's codebooks are filled with encoder frames (they are
zero buffers at initialisation, which would quantise everything to code 0), and the text projection, the
cross-attention and the self-attention q/k are scaled up so that the random decoder listens to its text and
its past (checked below: different texts give different tokens, and many distinct tokens occur).
"""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from musiclm_core import generate as G  # noqa: E402
from musiclm_core.convert import musicgen as convert  # noqa: E402

from fixtures import (ReferencePair, decoded_codes, padded_prompts, save_reference,  # noqa: E402
                      tiny_reference_config, train_spm)

HOP = 4  # EnCodec hop of the fixture (upsampling ratios [2, 2])
LOGIT_TOL = 1e-4


@torch.no_grad()
def _fill_codebooks(model, seed):
    """Codebook q <- 2048 frames of the residual quantiser q sees (NOTES.md: zeros would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    codec = model.audio_encoder
    latent = codec.encoder(0.3 * torch.randn(4, 1, 2048 * HOP, generator=g))  # (4, D, 2048)
    residual = latent.permute(0, 2, 1).reshape(-1, latent.shape[1])  # (frames, D)
    for layer in codec.quantizer.layers:
        pick = residual[torch.randperm(residual.shape[0], generator=g)[:2048]]
        layer.codebook.embed.copy_(pick)
        layer.codebook.embed_avg.copy_(pick)
        residual = residual - pick[layer.codebook.quantize(residual)]


@torch.no_grad()
def _make_it_listen(model, scale=4.0):
    """A random tiny decoder barely depends on its text; scale the paths that carry it."""
    model.enc_to_dec_proj.weight.mul_(scale)
    for layer in model.decoder.model.decoder.layers:
        for w in (layer.encoder_attn.v_proj, layer.encoder_attn.out_proj, layer.self_attn.q_proj,
                  layer.self_attn.k_proj):
            w.weight.mul_(scale)


def _save_reference(folder, channels, seed, spm_model):
    from transformers import MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    torch.manual_seed(seed)
    model = MusicgenForConditionalGeneration(tiny_reference_config(MusicgenConfig, MusicgenDecoderConfig,
                                                                   channels)).eval()
    _fill_codebooks(model, seed + 1)
    _make_it_listen(model)
    return save_reference(model, folder, spm_model)


class Pair(ReferencePair):
    """transformers' model and ours, read from the same checkpoint folder."""

    def __init__(self, folder):
        super().__init__(folder, transformers.MusicgenForConditionalGeneration, convert)

    @torch.no_grad()
    def prompt_codes(self, wav):
        """transformers' EnCodec codes of a (B, C, N) prompt, stereo channels interleaved as the decoder rows."""
        codes = [self.hf.audio_encoder.encode(wav[:, c: c + 1]).audio_codes[0] for c in range(wav.shape[1])]
        return torch.stack(codes, dim=2).flatten(1, 2)  # (B, K, F): L0 R0 L1 R1 ... for stereo


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("musicgen_spm"), lines=2000, vocab_size=200) / "spiece.model"


@pytest.fixture(scope="session")
def mono(tmp_path_factory, spm_model):
    return Pair(_save_reference(tmp_path_factory.mktemp("musicgen_mono"), 1, 0, spm_model))


@pytest.fixture(scope="session")
def stereo(tmp_path_factory, spm_model):
    return Pair(_save_reference(tmp_path_factory.mktemp("musicgen_stereo"), 2, 10, spm_model))


def _audio(seed, B, C, N):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(B, C, N, generator=g)


# --------------------------------------------------------------------------------------------------------------


def test_fixture_is_not_degenerate(mono):
    codes = mono.prompt_codes(_audio(0, 2, 1, 400))
    assert codes.unique().numel() > 100  # the codec quantises to many codes
    with torch.no_grad():
        a = mono.hf.audio_encoder.decode(codes[None], [None]).audio_values
        b = mono.hf.audio_encoder.decode(codes.roll(1, dims=-1)[None], [None]).audio_values
    assert (a - b).abs().max() > 1e-3  # decoding depends on the codes


@pytest.mark.parametrize("channels,prompt_frames,max_new_tokens", [
    (1, 0, 10), (1, 5, 10), (1, 0, 5), (1, 2, 2), (2, 0, 12), (2, 3, 20), (1, 6, 300)])
def test_delay_pattern_matches_transformers(mono, stereo, channels, prompt_frames, max_new_tokens):
    pair = mono if channels == 1 else stereo
    B, K = 2, pair.K
    prompt = torch.randint(0, 2048, (B, K, prompt_frames))
    bos = torch.full((B * K, 1), 2048)
    hf_input = torch.cat([bos, prompt.reshape(B * K, prompt_frames)], dim=1)
    length = 1 + prompt_frames + max_new_tokens
    first, hf_pattern = pair.hf.decoder.build_delay_pattern_mask(hf_input, pad_token_id=2048, max_length=length)
    delays, T = G.plan_frames(pair.lm.config.delays, prompt_frames, max_new_tokens=max_new_tokens)
    ours = G.build_pattern(prompt if prompt_frames else None, B, K, T, delays, 2048)
    if delays == pair.lm.config.delays:
        assert torch.equal(ours.reshape(B * K, -1), hf_pattern)
        assert first.shape[-1] == 1 + prompt_frames  # transformers' first decoder input: BOS and prompt
    else:  # too short for the pattern: transformers forces nothing, we force only BOS and prompt, the same values
        assert bool((hf_pattern == -1).all()) and ours.shape[-1] == length
        assert torch.equal(ours[:, :, : 1 + prompt_frames].reshape(B * K, -1), hf_input)
        assert bool((ours[:, :, 1 + prompt_frames:] == -1).all())


def test_logits_padded_batch(mono):
    ids, mask = padded_prompts(1)
    B, T = ids.shape[0], 9
    codes = torch.randint(0, 2049, (B, mono.K, T))
    with torch.no_grad():
        ref = mono.hf(input_ids=ids, attention_mask=mask, decoder_input_ids=codes.reshape(B * mono.K, T)).logits
        ours = mono.lm(codes, memory=mono.lm.cross_memory(mono.text(ids, mask), mask))
    err = (ours.reshape(B * mono.K, T, -1) - ref).abs().max().item()
    print(f"musicgen logits, padded batch: max abs err {err:.2e}")
    assert err <= LOGIT_TOL


def test_logits_cfg_rows(mono):
    ids, mask = padded_prompts(2)
    B, T = ids.shape[0], 6
    h = mono.text(ids, mask)
    states, masks = torch.cat([h, torch.zeros_like(h)]), torch.cat([mask, torch.zeros_like(mask)])
    codes = torch.randint(0, 2049, (B, mono.K, T)).repeat(2, 1, 1)  # [cond; null] rows see the same codes
    with torch.no_grad():
        ref = mono.hf(encoder_outputs=(states,), attention_mask=masks,
                      decoder_input_ids=codes.reshape(2 * B * mono.K, T)).logits
        ours = mono.lm(codes, memory=mono.lm.cross_memory(states, masks))
    err = (ours.reshape(2 * B * mono.K, T, -1) - ref).abs().max().item()
    print(f"musicgen logits, CFG rows: max abs err {err:.2e}")
    assert err <= LOGIT_TOL
    assert (ours[:B] - ours[B:]).abs().max() > 1e-2  # the null rows differ from the conditional ones


def _check_diverse(codes, min_unique=100):
    for row in codes:
        assert row.unique().numel() >= min_unique, "the fixture generates near-constant tokens"


def test_greedy_text_cfg(mono):
    ids, mask = padded_prompts(3)
    ref = mono.hf_codes(input_ids=ids, attention_mask=mask, do_sample=False, guidance_scale=3.0,
                        max_new_tokens=256)
    ours = G.generate_codes(mono.lm, mono.text(ids, mask), mask, max_new_tokens=256, guidance_scale=3.0,
                            do_sample=False)
    assert ours.shape == ref.shape == (2, 4, 253)
    mismatch = (ours != ref).sum().item()
    print(f"greedy text + CFG, 256 steps: {mismatch} of {ref.numel()} tokens differ")
    assert torch.equal(ours, ref)
    _check_diverse(ours)
    assert (ours[0] != ours[1]).float().mean() > 0.5  # the two texts lead to different music


def test_greedy_unconditional(mono):
    null = mono.hf.get_unconditional_inputs(num_samples=2)
    ref = mono.hf_codes(**null, do_sample=False, max_new_tokens=100)
    ours = G.generate_codes(mono.lm, batch_size=2, max_new_tokens=100, do_sample=False)
    assert torch.equal(ours, ref)
    _check_diverse(ours, min_unique=40)


def test_greedy_audio_prompt(mono):
    # 60 steps here; test_pipeline_audio_prompt runs 250 through the whole pipeline.
    ids, mask = padded_prompts(4)
    wav = _audio(5, 2, 1, 30 * HOP)
    prompt = mono.prompt_codes(wav)
    assert prompt.shape == (2, 4, 30)
    ref = mono.hf_codes(input_ids=ids, attention_mask=mask, input_values=wav, do_sample=False,
                        guidance_scale=3.0, max_new_tokens=60)
    ours = G.generate_codes(mono.lm, mono.text(ids, mask), mask, prompt_codes=prompt, max_new_tokens=60,
                            guidance_scale=3.0, do_sample=False)
    assert ours.shape == ref.shape == (2, 4, 30 + 60 + 1 - 4)
    assert torch.equal(ours[:, :, :30], prompt)
    assert torch.equal(ours, ref)
    _check_diverse(ours[:, :, 30:], min_unique=30)
    free = G.generate_codes(mono.lm, mono.text(ids, mask), mask, num_frames=40, do_sample=False)
    assert (free[:, :, :40] != ours[:, :, 30:70]).float().mean() > 0.5  # the prompt changes the continuation


def test_greedy_stereo_audio_prompt(stereo):
    ids, mask = padded_prompts(6)
    wav = _audio(7, 2, 2, 20 * HOP)
    prompt = stereo.prompt_codes(wav)
    assert prompt.shape == (2, 8, 20) and not torch.equal(prompt[:, ::2], prompt[:, 1::2])
    ref = stereo.hf_codes(input_ids=ids, attention_mask=mask, input_values=wav, do_sample=False,
                          guidance_scale=3.0, max_new_tokens=256)
    ours = G.generate_codes(stereo.lm, stereo.text(ids, mask), mask, prompt_codes=prompt, max_new_tokens=256,
                            guidance_scale=3.0, do_sample=False)
    assert ours.shape == ref.shape == (2, 8, 20 + 256 + 1 - 4)
    assert torch.equal(ours, ref)
    _check_diverse(ours[:, :, 20:])


def test_sampling_same_draws(mono):
    # Same RNG calls in the same order: seeded sampling gives transformers' tokens.
    ids, mask = padded_prompts(8)
    torch.manual_seed(123)
    ref = mono.hf_codes(input_ids=ids, attention_mask=mask, do_sample=True, guidance_scale=3.0, top_k=50,
                        temperature=0.9, max_new_tokens=64)
    h = mono.text(ids, mask)
    torch.manual_seed(123)
    ours = G.generate_codes(mono.lm, h, mask, max_new_tokens=64, guidance_scale=3.0, top_k=50, top_p=1.0,
                            temperature=0.9, do_sample=True)
    assert torch.equal(ours, ref)


def test_logits_processors_match_transformers():
    from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(4, 4, 300)  # (2B, K, V): [cond; null]
    logits[..., 7] = logits[..., 8]  # a tie
    flat = logits.reshape(16, 300)
    cfg = ClassifierFreeGuidanceLogitsProcessor(3.0)(flat[:8].argmax(-1, keepdim=True), flat)
    assert torch.equal(G.cfg_combine(logits, 3.0).reshape(8, 300), cfg)
    scores = TemperatureLogitsWarper(0.7)(None, cfg)
    assert torch.equal(scores, cfg / 0.7)
    for k in (1, 5, 50, 400):
        assert torch.equal(G.top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores))
    for p in (0.1, 0.5, 0.95):
        assert torch.equal(G.top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores))


# --------------------------------------------------------------------------------------------------------------
# The whole pipeline: our T5 (and its tokenizer), LM and EnCodec, read from the transformers folder.

TEXTS = ["80s pop track with bassy drums and synth", "calm piano"]


@pytest.fixture(scope="session")
def tokenizer(mono):
    return transformers.T5Tokenizer.from_pretrained(str(mono.folder))


def _hf_generate(pair, tokenizer, **kwargs):
    """transformers' audio and the codes it decoded, for TEXTS tokenized as its processor does."""
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with decoded_codes(pair.hf) as captured, torch.no_grad():
        audio = pair.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    codes = torch.cat([c[0] for c in captured], dim=1)  # stereo: left rows then right rows
    if len(captured) == 2:
        codes = torch.stack(codes.chunk(2, dim=1), dim=2).flatten(1, 2)  # back to L0 R0 L1 R1 ...
    return audio, codes


@pytest.fixture(scope="session")
def pipeline(mono):
    from musiclm_core.musicgen import MusicGen

    return MusicGen.from_pretrained(mono.folder)


def test_pipeline_text_cfg(pipeline, mono, tokenizer):
    # 64 steps here; test_greedy_text_cfg runs 256 on the LM with transformers' text states.
    ref_audio, ref_codes = _hf_generate(mono, tokenizer, do_sample=False, guidance_scale=3.0, max_new_tokens=64)
    codes = pipeline.generate_codes(TEXTS, max_new_tokens=64, guidance_scale=3.0, do_sample=False)
    assert torch.equal(codes, ref_codes)
    audio = pipeline.decode_codes(codes)
    err = (audio - ref_audio).abs().max().item()
    print(f"pipeline audio, text + CFG, 64 steps: max abs err {err:.2e}")
    assert audio.shape == ref_audio.shape and err <= LOGIT_TOL
    assert (codes[0] != codes[1]).float().mean() > 0.5


def test_pipeline_audio_prompt(pipeline, mono, tokenizer):
    wav = _audio(11, 2, 1, 25 * HOP)
    ref_audio, ref_codes = _hf_generate(mono, tokenizer, input_values=wav, do_sample=False, guidance_scale=3.0,
                                        max_new_tokens=250)
    codes = pipeline.generate_codes(TEXTS, max_new_tokens=250, guidance_scale=3.0, do_sample=False,
                                    prompt_audio=wav, prompt_sample_rate=3200)
    assert torch.equal(codes, ref_codes)
    audio = pipeline.decode_codes(codes)
    err = (audio - ref_audio).abs().max().item()
    print(f"pipeline audio, audio prompt, 250 steps: max abs err {err:.2e}")
    assert audio.shape == ref_audio.shape == (2, 1, (25 + 250 + 1 - 4) * HOP) and err <= LOGIT_TOL


def test_pipeline_stereo(stereo, tokenizer):
    from musiclm_core.musicgen import MusicGen

    mg = MusicGen.from_pretrained(stereo.folder)
    wav = _audio(12, 2, 2, 16 * HOP)
    ref_audio, ref_codes = _hf_generate(stereo, tokenizer, input_values=wav, do_sample=False, guidance_scale=3.0,
                                        max_new_tokens=64)
    codes = mg.generate_codes(TEXTS, max_new_tokens=64, guidance_scale=3.0, do_sample=False, prompt_audio=wav)
    assert torch.equal(codes, ref_codes)
    err = (mg.decode_codes(codes) - ref_audio).abs().max().item()
    assert ref_audio.shape[1] == 2 and err <= LOGIT_TOL


def test_pipeline_native_round_trip(pipeline, tmp_path):
    from musiclm_core.musicgen import MusicGen

    pipeline.save_pretrained(tmp_path / "native")
    again = MusicGen.from_pretrained(tmp_path / "native")
    kwargs = dict(duration=0.02, guidance_scale=3.0, do_sample=True, seed=3)
    assert torch.equal(again.generate(TEXTS, **kwargs), pipeline.generate(TEXTS, **kwargs))


def test_pipeline_sharded_fp16_and_fp32_variant(mono, tmp_path):
    # The stereo repos' arrangement: fp16 default files, sharded, plus an fp32 copy under variant="fp32".
    import copy

    from musiclm_core.musicgen import MusicGen

    folder = tmp_path / "variants"
    copy.deepcopy(mono.hf).half().save_pretrained(folder, max_shard_size="300KB")
    mono.hf.save_pretrained(folder, variant="fp32", max_shard_size="300KB")
    shutil.copy(mono.folder / "spiece.model", folder / "spiece.model")
    assert (folder / "model.safetensors.index.json").is_file()
    assert (folder / "model.safetensors.index.fp32.json").is_file()
    exact = MusicGen.from_pretrained(folder, variant="fp32")
    rounded = MusicGen.from_pretrained(folder)
    ref = mono.lm.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in exact.lm.state_dict().items())
    assert all(torch.equal(v, ref[k].half().float()) for k, v in rounded.lm.state_dict().items())
    assert any(not torch.equal(v, ref[k]) for k, v in rounded.lm.state_dict().items())
    half = MusicGen.from_pretrained(folder, dtype=torch.float16)
    assert half.lm.dtype == torch.float16 and half.codec.decoder.conv_in.weight.dtype == torch.float16
