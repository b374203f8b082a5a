"""MusicGen Melody against transformers' MusicgenMelodyForConditionalGeneration.

The reference checkpoints are tiny composite models (T5 + EnCodec + melody decoder) with random weights that
transformers itself writes with `save_pretrained`, sharded with a small `max_shard_size` so that loading goes
through `model.safetensors.index.json` (as facebook/musicgen-melody does), plus a small sentencepiece model.
The LM tests feed our LM the text states of transformers' own text encoder; the pipeline test at the end runs
our whole `MusicGenMelody` (our tokenizer, T5, chroma, LM) from the same folder. Our chroma comes from
`chroma_features`, transformers' from its `MusicgenMelodyFeatureExtractor` (needs torchaudio); at 32 kHz the
two are equal, which each test that uses them checks.

Tolerances: logits max abs error <= 1e-4 (fp32); greedy (and seeded sampling) decoding token-identical.

The fixture listens (specs/NOTES.md: a random tiny melody model barely does): the chroma and text projections,
the self-attention q/k/out and the code embeddings are scaled up. `test_fixture_listens_to_the_melody` shows
first that the same melody twice gives the same tokens and two melodies different ones, so that the token
parity with melodies tests that the melody arrives.
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
try:
    import torchaudio  # noqa: F401  (transformers' chroma feature extractor needs it)
except (ImportError, OSError) as e:  # OSError: torchaudio's compiled libraries do not match our torch
    pytest.skip(f"torchaudio cannot be imported ({e}); install the test reference with "
                "`bash tests/install_torchaudio_reference.sh`", allow_module_level=True)

from musiclm_core import hub  # noqa: E402
from musiclm_core.chroma import chroma_features, null_chroma  # noqa: E402
from musiclm_core.convert import musicgen_melody as convert  # noqa: E402
from musiclm_core.melody import MusicGenMelody, generate_codes  # noqa: E402

from fixtures import ReferencePair, padded_prompts, save_reference, tiny_reference_config, train_spm  # noqa: E402

LOGIT_TOL = 1e-4
SR = 32000  # the chroma extractor's rate: no resampling on either side


@torch.no_grad()
def _make_it_listen(model):
    """Scale the paths that carry the conditioning and the past (see the module docstring)."""
    model.audio_enc_to_dec_proj.weight.mul_(64.0)
    model.enc_to_dec_proj.weight.mul_(64.0)
    decoder = model.decoder.model.decoder
    for layer in decoder.layers:
        for w in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.out_proj):
            w.weight.mul_(6.0)
    for emb in decoder.embed_tokens:
        emb.weight.mul_(4.0)


def _save_reference(folder, channels, seed, spm_model):
    from transformers import (MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                              MusicgenMelodyForConditionalGeneration)

    torch.manual_seed(seed)
    config = tiny_reference_config(MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, channels)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    _make_it_listen(model)
    # Sharded, with an index (as facebook/musicgen-melody).
    return save_reference(model, folder, spm_model, max_shard_size="300KB")


def _pair(folder):
    """transformers' model and our LM, read from the same checkpoint folder."""
    return ReferencePair(folder, transformers.MusicgenMelodyForConditionalGeneration, convert)


@pytest.fixture(scope="session")
def melody_spm(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("melody_spm"), lines=500, vocab_size=200) / "spiece.model"


@pytest.fixture(scope="session")
def mono(tmp_path_factory, melody_spm):
    return _pair(_save_reference(tmp_path_factory.mktemp("melody_mono"), 1, 0, melody_spm))


@pytest.fixture(scope="session")
def stereo(tmp_path_factory, melody_spm):
    return _pair(_save_reference(tmp_path_factory.mktemp("melody_stereo"), 2, 10, melody_spm))


@pytest.fixture(scope="session")
def feature_extractor():
    from transformers import MusicgenMelodyFeatureExtractor
    from transformers.utils import logging

    logging.set_verbosity_error()
    return MusicgenMelodyFeatureExtractor()


def _tune(notes, seconds_per_note=0.25):
    """A sine melody at 32 kHz, one note (semitones above A440) after the other."""
    t = torch.arange(int(SR * seconds_per_note)) / SR
    return torch.cat([0.5 * torch.sin(2 * math.pi * 440 * 2 ** (n / 12) * t) for n in notes])


TUNE_A = _tune([0, 2, 4, 5, 7, 9, 11, 12])  # 2 s: 16 chroma frames
TUNE_B = _tune([3, 10, 6, 1, 8, 3, 10, 6])
TUNE_C = _tune([5, 0, 5, 0, 7])  # shorter: right-padded in a batch with A


def _chroma(fe, tunes):
    """Our chroma and transformers', checked equal (the parity tests below then hold for both)."""
    theirs = fe([t.numpy() for t in tunes], sampling_rate=SR, return_tensors="pt", padding=True).input_features
    ours = chroma_features(list(tunes), SR)
    assert torch.equal(ours, theirs)
    return ours


def _diverse(codes, min_unique=30):
    for row in codes:
        assert row.unique().numel() >= min_unique, "the fixture generates near-constant tokens"


# --------------------------------------------------------------------------------------------------------------


def test_checkpoint_is_sharded(mono):
    index = hub.read_json(mono.folder / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 2
    assert "audio_enc_to_dec_proj.weight" in index["weight_map"]
    assert torch.equal(mono.lm.chroma_proj.weight, mono.hf.audio_enc_to_dec_proj.weight)


@pytest.mark.parametrize("with_melody", [True, False])
def test_logits_padded_batch(mono, feature_extractor, with_melody):
    ids, mask = padded_prompts(1)
    B, T = ids.shape[0], 9
    codes = torch.randint(0, 2049, (B, mono.K, T))
    chroma = _chroma(feature_extractor, [TUNE_A, TUNE_C]) if with_melody else None
    with torch.no_grad():
        ref = mono.hf(input_ids=ids, attention_mask=mask, input_features=chroma,
                      decoder_input_ids=codes.reshape(B * mono.K, T)).logits  # (B*K, 235 + L + T, V)
        prefix = mono.lm.prefix(null_chroma(B) if chroma is None else chroma, mono.text(ids, mask), mask)
        ours = mono.lm(codes, prefix=prefix)
    assert ref.shape[1] == 235 + ids.shape[1] + T and prefix.shape[1] == 235 + ids.shape[1]
    err = (ours.reshape(B * mono.K, T, -1) - ref[:, -T:]).abs().max().item()
    print(f"melody logits, padded batch, melody={with_melody}: max abs err {err:.2e}")
    assert err <= LOGIT_TOL


def test_logits_cfg_null_rows(mono, feature_extractor):
    # The CFG null row: zero text states after the projection and the one-hot bin-0 chroma. In transformers'
    # forward that is an all-zero text mask with the null chroma.
    ids, mask = padded_prompts(2)
    B, T = ids.shape[0], 6
    chroma = _chroma(feature_extractor, [TUNE_A, TUNE_B])
    codes = torch.randint(0, 2049, (B, mono.K, T))
    h = mono.text(ids, mask)
    with torch.no_grad():
        ref = mono.hf(input_ids=ids, attention_mask=torch.zeros_like(mask), input_features=null_chroma(B, 16),
                      decoder_input_ids=codes.reshape(B * mono.K, T)).logits[:, -T:]
        null = mono.lm(codes, prefix=mono.lm.prefix(null_chroma(B, 16), torch.zeros_like(h), torch.zeros_like(mask)))
        cond = mono.lm(codes, prefix=mono.lm.prefix(chroma, h, mask))
    err = (null.reshape(B * mono.K, T, -1) - ref).abs().max().item()
    print(f"melody logits, CFG null rows: max abs err {err:.2e}")
    assert err <= LOGIT_TOL
    assert (cond - null).abs().max() > 1e-2


def test_fixture_listens_to_the_melody(mono, feature_extractor):
    ids, mask = padded_prompts(3)
    h = mono.text(ids, mask)
    runs = {}
    for name, tunes in (("A", [TUNE_A, TUNE_A]), ("A again", [TUNE_A, TUNE_A]), ("B", [TUNE_B, TUNE_B])):
        chroma = _chroma(feature_extractor, tunes)
        runs[name] = generate_codes(mono.lm, chroma, h, mask, max_new_tokens=40, guidance_scale=3.0,
                                    do_sample=False)
    assert torch.equal(runs["A"], runs["A again"])  # the same melody twice: the same tokens
    differ = (runs["A"] != runs["B"]).float().mean().item()
    print(f"two melodies: {differ:.0%} of the tokens differ")
    assert differ > 0.3  # different melodies: different music
    _diverse(runs["A"])


@pytest.mark.parametrize("tunes,steps", [((TUNE_A, TUNE_B), 64), (None, 32)])
def test_greedy_text_cfg(mono, feature_extractor, tunes, steps):
    ids, mask = padded_prompts(4)
    chroma = None if tunes is None else _chroma(feature_extractor, tunes)
    ref = mono.hf_codes(input_ids=ids, attention_mask=mask, input_features=chroma, do_sample=False,
                        guidance_scale=3.0, max_new_tokens=steps)
    ours = generate_codes(mono.lm, null_chroma(2) if chroma is None else chroma, mono.text(ids, mask), mask,
                          max_new_tokens=steps, guidance_scale=3.0, do_sample=False)
    assert ours.shape == ref.shape == (2, 4, steps - 3)
    mismatch = (ours != ref).sum().item()
    print(f"greedy, melody={tunes is not None}, {steps} steps: {mismatch} of {ref.numel()} tokens differ")
    assert torch.equal(ours, ref)
    _diverse(ours)


def test_greedy_melody_without_text(mono, feature_extractor):
    # transformers' way to give no text: the processor's unconditional inputs (the empty prompt, masked out).
    from transformers import T5Tokenizer

    null = T5Tokenizer.from_pretrained(str(mono.folder))([""] * 2, return_tensors="pt")
    null["attention_mask"][:] = 0
    chroma = _chroma(feature_extractor, [TUNE_B, TUNE_A])
    ref = mono.hf_codes(**null, input_features=chroma, do_sample=False, guidance_scale=3.0, max_new_tokens=32)
    ours = generate_codes(mono.lm, chroma, torch.zeros(2, 1, 32), torch.zeros(2, 1, dtype=torch.long),
                          max_new_tokens=32, guidance_scale=3.0, do_sample=False)
    assert null["input_ids"].shape == (2, 1) and torch.equal(ours, ref)
    assert (ours[0] != ours[1]).float().mean() > 0.3


def test_sampling_same_draws(mono, feature_extractor):
    ids, mask = padded_prompts(5)
    chroma = _chroma(feature_extractor, [TUNE_A, TUNE_B])
    torch.manual_seed(123)
    ref = mono.hf_codes(input_ids=ids, attention_mask=mask, input_features=chroma, do_sample=True,
                        guidance_scale=3.0, top_k=50, temperature=0.9, max_new_tokens=32)
    h = mono.text(ids, mask)
    torch.manual_seed(123)
    ours = generate_codes(mono.lm, chroma, h, mask, max_new_tokens=32, guidance_scale=3.0, top_k=50, top_p=1.0,
                          temperature=0.9, do_sample=True)
    assert torch.equal(ours, ref)


def test_greedy_stereo(stereo, feature_extractor):
    ids, mask = padded_prompts(6)
    chroma = _chroma(feature_extractor, [TUNE_A, TUNE_B])
    ref = stereo.hf_codes(input_ids=ids, attention_mask=mask, input_features=chroma, do_sample=False,
                          guidance_scale=3.0, max_new_tokens=32)
    ours = generate_codes(stereo.lm, chroma, stereo.text(ids, mask), mask, max_new_tokens=32, guidance_scale=3.0,
                          do_sample=False)
    assert ours.shape == ref.shape == (2, 8, 32 - 3)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours[:, ::2], ours[:, 1::2])


# --------------------------------------------------------------------------------------------------------------
# The whole pipeline: our tokenizer, T5, chroma and LM, read from the sharded transformers folder.

TEXTS = ["80s pop track with bassy drums and synth", "calm piano"]


def test_pipeline_greedy(mono, feature_extractor):
    from transformers import T5Tokenizer

    mel = MusicGenMelody.from_pretrained(mono.folder)
    batch = T5Tokenizer.from_pretrained(str(mono.folder))(TEXTS, padding=True, return_tensors="pt")
    chroma = _chroma(feature_extractor, [TUNE_C, TUNE_B])
    ref = mono.hf_codes(input_ids=batch.input_ids, attention_mask=batch.attention_mask, input_features=chroma,
                        do_sample=False, guidance_scale=3.0, max_new_tokens=40)
    ours = mel.generate_codes(TEXTS, melody=[TUNE_C, TUNE_B], melody_sample_rate=SR, max_new_tokens=40,
                              guidance_scale=3.0, do_sample=False)
    assert torch.equal(ours, ref)
    # A (B, C, N) batch of stereo melodies is mixed down to mono first.
    stereo_tunes = torch.stack([TUNE_A, TUNE_B]).expand(2, 2, -1)  # each: left A, right B
    mixed = (TUNE_A + TUNE_B) / 2
    ref = mono.hf_codes(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        input_features=_chroma(feature_extractor, [mixed, mixed]), do_sample=False,
                        guidance_scale=3.0, max_new_tokens=16)
    ours = mel.generate_codes(TEXTS, melody=stereo_tunes, melody_sample_rate=SR, max_new_tokens=16,
                              guidance_scale=3.0, do_sample=False)
    assert torch.equal(ours, ref)


def test_cli_convert(mono, tmp_path, capsys):
    # `musiclm convert` of the sharded transformers folder writes a native one that generates the same codes.
    from musiclm_core.cli import main

    assert main(["convert", str(mono.folder), str(tmp_path / "native")]) == 0
    native = MusicGenMelody.from_pretrained(tmp_path / "native")
    kwargs = dict(melody=[TUNE_A, TUNE_B], melody_sample_rate=SR, max_new_tokens=12, do_sample=False)
    assert torch.equal(native.generate_codes(TEXTS, **kwargs),
                       MusicGenMelody.from_pretrained(mono.folder).generate_codes(TEXTS, **kwargs))


# --------------------------------------------------------------------------------------------------------------
# The official weights (downloads about 6 GB): transformers' own integration-test values
# (tests/models/musicgen_melody/test_modeling_musicgen_melody.py, specs/musicgen.md §7), tolerance 1e-4.

OFFICIAL = "ylacombe/musicgen-melody"  # the repo those values were computed with


def _bip_bip(duration, bip_duration=0.125, sample_rate=SR):
    t = torch.arange(int(duration * sample_rate), dtype=torch.float64) / sample_rate
    gate = (t % (2 * bip_duration)) / (2 * bip_duration) >= 0.5
    return (torch.cos(2 * math.pi * 440 * t) * gate).float()


@pytest.fixture(scope="module")
def official():
    return MusicGenMelody.from_pretrained(OFFICIAL)


@pytest.mark.slow
@pytest.mark.network
def test_official_logits(official):
    lm = official.lm
    texts = ["80s music", "Club techno"]
    states, mask = official.text_encoder.encode_text(texts)
    bos = torch.full((2, 4, 1), 2048)
    with torch.no_grad():
        logits = lm(bos, prefix=lm.prefix(null_chroma(2), states, mask))  # text only: the no-melody chroma
    assert mask.shape[1] + 1 + 235 == 240
    expected = torch.tensor([1.1100, -2.1065, -3.7699, -0.7102, 1.3707, -1.7028, -2.6802, -6.0367,
                             1.0504, -2.5358, -4.3497, 0.7338, 0.4823, -2.5260, 1.2717, 1.5427])
    torch.testing.assert_close(logits[0, 0, -1, :16], expected, rtol=1e-4, atol=1e-4)
    chroma = official.melody_chroma([_bip_bip(0.5), _bip_bip(1.0)], SR, 2)
    with torch.no_grad():
        logits = lm(bos, prefix=lm.prefix(chroma, states, mask))
    expected = torch.tensor([[0.7479, 0.3742, 0.6253, -7.9405, 0.7105, -6.9995, 0.7792, -3.0482],
                             [-2.7905, 0.7492, -0.2556, -8.1586, -1.6740, 0.5771, -8.3650, -0.0908]])
    torch.testing.assert_close(logits[0, 1:3, -1, 32:40], expected, rtol=1e-4, atol=1e-4)  # their rows 1:3


@pytest.mark.slow
@pytest.mark.network
def test_official_greedy_text(official):
    audio = official.generate(["80s music", "Club techno"], max_new_tokens=10, guidance_scale=1.0, do_sample=False)
    expected = torch.tensor([1.2741e-04, -8.0474e-05, 5.5789e-04, 1.0402e-03, 2.6547e-04, 1.5597e-05, -1.4210e-04,
                             -9.7309e-05, 6.4504e-04, 5.0903e-04])
    assert audio.shape == (2, 1, 4480)
    torch.testing.assert_close(audio[0, 0, :10], expected, rtol=1e-4, atol=1e-4)
