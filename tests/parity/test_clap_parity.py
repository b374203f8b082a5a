"""CLAP against transformers' ClapModel, ClapFeatureExtractor and RobertaTokenizerFast, on folders they wrote.

Model: a tiny ClapModel keeping the official structure (64 mel bins folded into a 256x256 image, 4x4 patches,
four Swin stages on 64/32/16/8-token grids with 8x8 windows, shifted blocks, patch merging, the last stage
unshifted because its grid is one window; a 2-layer RoBERTa with the 514-row position table), random weights
pushed off their init (every parameter gets noise; the BatchNorm running statistics are set to log-mel-like
values), written with `save_pretrained` next to a tokenizer and a preprocessor_config.json, loaded by
`CLAP.from_pretrained`. Variants: the weights stored in float64 (as the pipelines' text_encoder files are),
a pytorch_model.bin, a diffusers pipeline folder. The official sizes (htsat-unfused, larger-music) run under
`-m slow`.

Tokenizer: a byte-level BPE trained here on music prompts (the 256 byte symbols plus merges), read by
transformers' RobertaTokenizerFast and by ours from the same folder, through tokenizer.json and through
vocab.json + merges.txt.

Tolerances (fp32): token ids and masks identical; log-mel features max abs <= 1e-4 dB; text and audio embeddings
and both logit matrices max abs <= 1e-4.
"""

import json
import random
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from musiclm_core import hub  # noqa: E402
from musiclm_core.audio import resample  # noqa: E402
from musiclm_core.clap import CLAP, CLAPTokenizer  # noqa: E402

ATOL = 1e-4
SR = 48_000

TINY_TEXT = dict(vocab_size=420, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_AUDIO = dict(patch_embeds_hidden_size=8, depths=[2, 2, 1, 2], num_attention_heads=[2, 2, 4, 4], hidden_size=64)
OFFICIAL = {
    "htsat-unfused": dict(text_config={}, audio_config={}),
    "larger-music": dict(text_config={}, audio_config=dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2],
                                                           hidden_size=1024)),
}
# laion/clap-htsat-unfused's preprocessor_config.json (transformers' own defaults differ: 0 Hz, "fusion").
FEATURES = dict(feature_size=64, sampling_rate=SR, hop_length=480, max_length_s=10, fft_window_size=1024,
                frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="repeatpad")

WORDS = ("the a of and with music song track drums bass guitar synth piano violin beat tempo loud soft calm happy "
         "sad pop rock jazz hip hop electronic melody rhythm vocals ambient cinematic lofi chill 80s 90s").split()
FOREIGN = "café naïve résumé über straße São Zürich Ελληνική русская 日本の音楽 ピアノ 한국 中文 🎵 🥁".split()

# Texts that exercise the pipeline: spaces at the ends, unicode, emoji (multi-byte, ZWJ), literal special
# tokens, the empty string, and a text far beyond 512 tokens.
PROMPTS = [
    "80s pop track with bassy drums and synth",
    "",
    " ",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "café naïve déjà vu crème brûlée, cafe\u0301 decomposed",
    "日本の音楽 ピアノ 한국 음악 中文歌曲 Ελληνική μουσική и русская музыка",
    "emoji 🎵🎶 🥁🎸 👍🏽 👨‍👩‍👧 🏳️‍🌈 ❤️",
    "literal <s> and </s> <pad> <unk> <mask> inside, <mask>x",
    "nbsp\u00a0thin\u2009zero\u200bwidth\ufeffbom \x00\x07",
    "UPPER lower MiXeD 120 bpm 4/4 C# (live) feat. 'n' !?",
    "ambient music drums " * 250,  # ~750 tokens: truncated to 512
]


def _corpus(seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS if rng.random() < 0.8 else FOREIGN) for _ in range(rng.randint(3, 14)))
            for _ in range(3000)]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """vocab.json + merges.txt of a byte-level BPE trained on music prompts (RoBERTa's special tokens first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_TEXT["vocab_size"], show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.model.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(bpe_folder):
    return transformers.RobertaTokenizerFast.from_pretrained(str(bpe_folder), model_max_length=512)


def _perturb(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Move every weight off its init, and give the mel BatchNorm statistics of log-mel features (dB)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.copy_(-40 + 5 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(50 + 100 * torch.rand(bn.running_var.shape, generator=g))


def write_reference(folder, hf_tokenizer, text_config: dict, audio_config: dict, *, projection_dim=16,
                    dtype=torch.float32, noise=0.2):
    torch.manual_seed(0)
    config = transformers.ClapConfig(text_config=text_config, audio_config=audio_config,
                                     projection_dim=projection_dim)
    model = transformers.ClapModel(config).eval()
    _perturb(model, noise)
    model.to(dtype).save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    transformers.ClapFeatureExtractor(**FEATURES).save_pretrained(folder)
    return model.float()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_tokenizer):
    folder = tmp_path_factory.mktemp("clap_hf")
    model = write_reference(folder, hf_tokenizer, TINY_TEXT, TINY_AUDIO)
    return folder, model


@pytest.fixture(scope="module")
def ours(reference):
    return CLAP.from_pretrained(reference[0])


@pytest.fixture(scope="module")
def extractor():
    return transformers.ClapFeatureExtractor(**FEATURES)


def _clips():
    """Float32 48 kHz clips: 3 s (repeat-padded), exactly 10 s, 12.5 s and 11 s (cropped), coloured noise."""
    clips = []
    for i, seconds in enumerate((3.0, 10.0, 12.5, 11.0)):
        rng = np.random.RandomState(i)
        n = int(seconds * SR)
        t = np.arange(n) / SR
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
        clips.append((tone + 0.05 * np.cumsum(rng.randn(n)) / np.sqrt(n / 100)).astype(np.float32))
    return clips


def _reference_features(extractor, clips, seed):
    np.random.seed(seed)  # the reference crops with the global numpy RNG
    return extractor(clips, sampling_rate=SR, return_tensors="pt")["input_features"]


_CACHE: dict = {}


def _clip_features(extractor, seed, count=4):
    """The reference's features of the first `count` of `_clips()`, computed once per (seed, count): its STFT
    is a Python loop over frames, the slowest part of these tests."""
    if (seed, count) not in _CACHE:
        _CACHE[seed, count] = _reference_features(extractor, _clips()[:count], seed)
    return _CACHE[seed, count]


# ----- tokenizer


@pytest.mark.parametrize("route", ["tokenizer.json", "vocab.json+merges.txt"])
def test_tokenizer_matches_transformers(route, bpe_folder, hf_tokenizer, tmp_path):
    folder = tmp_path / "tok"
    if route == "tokenizer.json":
        hf_tokenizer.save_pretrained(folder)
        assert not (folder / "vocab.json").exists()
    else:
        shutil.copytree(bpe_folder, folder)
    theirs = transformers.RobertaTokenizerFast.from_pretrained(str(folder), model_max_length=512)
    ours = CLAPTokenizer.from_folder(folder)
    for padding, hf_padding in (("longest", True), ("max_length", "max_length")):
        ref = theirs(PROMPTS, padding=hf_padding, truncation=True, max_length=512, return_tensors="pt")
        ids, mask = ours(PROMPTS, padding=padding, max_length=512)
        assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
        assert ids.shape == (len(PROMPTS), 512)  # the long prompt sets the length in both modes
    # The fixture is not degenerate: merges are used, the long prompt is truncated to <s> ... </s>.
    ids, mask = ours(PROMPTS[:1], max_length=512)
    assert ids.shape[1] < len(PROMPTS[0].encode()) and int(ids.max()) > 260
    long_ids, _ = ours(PROMPTS[-1:], max_length=512)
    assert long_ids.shape == (1, 512) and long_ids[0, 0] == 0 and long_ids[0, -1] == 2
    empty, _ = ours([""], max_length=512)
    assert empty.tolist() == [[0, 2]]


# ----- text tower


@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_text_embeds_parity(padding, reference, ours, hf_tokenizer):
    _, model = reference
    ref_in = hf_tokenizer(PROMPTS, padding=True if padding == "longest" else "max_length", truncation=True,
                          max_length=512, return_tensors="pt")
    ids, mask = ours.tokenize(PROMPTS, padding=padding)
    assert torch.equal(ids, ref_in["input_ids"]) and torch.equal(mask, ref_in["attention_mask"])
    with torch.no_grad():
        ref = model.get_text_features(**ref_in).pooler_output
    got = ours.encode_text(ids, mask)
    assert (got - ref).abs().max() <= ATOL
    # It listens: different prompts give clearly different unit vectors.
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 100 * ATOL and (got[0] - got[5]).abs().max() > 100 * ATOL
    assert (ours.text_embeds(PROMPTS) - ref).abs().max() <= ATOL


# ----- features and audio tower


def test_features_parity(ours, extractor):
    clips = _clips()
    for seed in (0, 7):
        ref = _clip_features(extractor, seed)
        got = ours.features(clips, SR, seed=seed)
        assert got.shape == ref.shape == (4, 1, 1001, 64) and got.dtype == torch.float32
        assert (got - ref).abs().max() <= ATOL
    # The crop listens to the seed (clips 2 and 3 are longer than 10 s; clips 0 and 1 are not cropped).
    a, b = ours.features(clips, SR, seed=0), ours.features(clips, SR, seed=7)
    assert (a[2] - b[2]).abs().max() > 1.0 and (a[:2] - b[:2]).abs().max() == 0
    # A numpy RandomState seeded alike draws the same crops; a Generator is accepted too.
    assert torch.equal(ours.features(clips, SR, seed=np.random.RandomState(7)), b)
    assert ours.features(clips, SR, seed=np.random.default_rng(0)).shape == b.shape


def test_audio_embeds_parity(reference, ours, extractor):
    _, model = reference
    clips = _clips()
    ref_features = _clip_features(extractor, 0)
    with torch.no_grad():
        ref = model.get_audio_features(input_features=ref_features).pooler_output
    assert (ours.encode_audio(ref_features) - ref).abs().max() <= ATOL  # same features in
    assert (ours.audio_embeds(clips, SR, seed=0) - ref).abs().max() <= ATOL  # raw audio, each its own extractor
    # It listens: the clips (and a clip's crops) give clearly different embeddings.
    assert (ref[0] - ref[1]).abs().max() > 100 * ATOL
    assert (ours.audio_embeds(clips[2:3], SR, seed=0) - ours.audio_embeds(clips[2:3], SR, seed=11)).abs().max() \
        > 10 * ATOL


def test_resampled_audio_matches_reference_on_our_resampling(ours, reference, extractor):
    """audio_embeds at 16 kHz = the reference fed our 48 kHz resampling (the pipelines use soxr_hq instead)."""
    _, model = reference
    wav16 = torch.from_numpy(_clips()[0][::3].copy())  # 3 s at 16 kHz
    up = resample(wav16.double(), 16_000, SR).numpy()
    with torch.no_grad():
        ref = model.get_audio_features(input_features=_reference_features(extractor, [up], 0)).pooler_output
    assert (ours.audio_embeds(wav16, 16_000) - ref).abs().max() <= ATOL


def test_logits_parity(reference, ours, hf_tokenizer, extractor):
    _, model = reference
    texts = PROMPTS[:5]
    ref_in = hf_tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
    features = _clip_features(extractor, 0)
    with torch.no_grad():
        ref = model(input_ids=ref_in["input_ids"], attention_mask=ref_in["attention_mask"], input_features=features)
    got = ours(*ours.tokenize(texts), features)
    assert (got["logits_per_text"] - ref.logits_per_text).abs().max() <= ATOL
    assert (got["logits_per_audio"] - ref.logits_per_audio).abs().max() <= ATOL
    logits = ours.logits_per_text(texts, _clips(), SR, seed=0)
    assert (logits - ref.logits_per_text).abs().max() <= ATOL
    scale = float(model.logit_scale_t.detach().exp())
    assert (ours.score(texts, _clips(), SR, seed=0) * scale - ref.logits_per_text).abs().max() <= ATOL
    assert ref.logits_per_text.std() > 100 * ATOL  # the matrix is not constant


# ----- checkpoint variants


def _check_same(model, reference_model, hf_tokenizer, extractor):
    ref_in = hf_tokenizer(PROMPTS[:4], padding=True, return_tensors="pt")
    features = _clip_features(extractor, 0, count=2)
    with torch.no_grad():
        ref_t = reference_model.get_text_features(**ref_in).pooler_output
        ref_a = reference_model.get_audio_features(input_features=features).pooler_output
    assert (model.text_embeds(PROMPTS[:4]) - ref_t).abs().max() <= ATOL
    assert (model.encode_audio(features) - ref_a).abs().max() <= ATOL


def test_float64_file(tmp_path, hf_tokenizer, extractor):
    model = write_reference(tmp_path, hf_tokenizer, TINY_TEXT, TINY_AUDIO, dtype=torch.float64)
    stored = hub.load_state_dict(tmp_path)
    assert stored["logit_scale_a"].dtype == torch.float64 and stored["text_projection.linear1.weight"].dtype \
        == torch.float64
    ours = CLAP.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    _check_same(ours, model, hf_tokenizer, extractor)


def test_pytorch_model_bin(tmp_path, reference, hf_tokenizer, extractor):
    folder, model = reference
    shutil.copytree(folder, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _check_same(CLAP.from_pretrained(tmp_path / "bin"), model, hf_tokenizer, extractor)


def test_diffusers_pipeline_folder(tmp_path, reference, hf_tokenizer, extractor, monkeypatch):
    """text_encoder/ (ClapModel), tokenizer/, feature_extractor/ beside model_index.json, as MusicLDM's; also
    as a hub id, which fetches the small files first and then only the text encoder's weights."""
    folder, model = reference
    pipe = tmp_path / "pipe"
    (pipe / "text_encoder").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, pipe / "text_encoder" / name)
    hf_tokenizer.save_pretrained(pipe / "tokenizer")
    transformers.ClapFeatureExtractor(**FEATURES).save_pretrained(pipe / "feature_extractor")
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "MusicLDMPipeline", "text_encoder": ["transformers", "ClapModel"],
        "tokenizer": ["transformers", "RobertaTokenizerFast"],
        "feature_extractor": ["transformers", "ClapFeatureExtractor"]}))
    _check_same(CLAP.from_pretrained(pipe), model, hf_tokenizer, extractor)
    asked = []

    def resolve(name, *, revision=None, allow_patterns=None):  # stands in for the download
        asked.append(allow_patterns)
        return pipe

    monkeypatch.setattr(hub, "resolve", resolve)
    _check_same(CLAP.from_pretrained("ucsd-reach/musicldm"), model, hf_tokenizer, extractor)
    assert asked == [["*.json", "*.txt"], ["*.json", "*.txt", "text_encoder/*.safetensors"]]


def test_native_round_trip(tmp_path, ours, reference, hf_tokenizer, extractor):
    ours.save_pretrained(tmp_path / "native")
    again = CLAP.from_pretrained(tmp_path / "native")
    assert again.config == ours.config
    _check_same(again, reference[1], hf_tokenizer, extractor)
    ids, mask = again.tokenize(PROMPTS, padding="max_length")
    assert torch.equal(ids, ours.tokenize(PROMPTS, padding="max_length")[0])


# ----- official sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_parity(name, tmp_path, hf_tokenizer, extractor):
    """Random weights at the official sizes (the text tower's vocabulary cut to the test tokenizer's)."""
    sizes = OFFICIAL[name]
    model = write_reference(tmp_path, hf_tokenizer, dict(sizes["text_config"], vocab_size=TINY_TEXT["vocab_size"]),
                            sizes["audio_config"], projection_dim=512, noise=0.02)
    ours = CLAP.from_pretrained(tmp_path)
    assert ours.config.patch_dim == (sizes["audio_config"].get("patch_embeds_hidden_size", 96))
    _check_same(ours, model, hf_tokenizer, extractor)
