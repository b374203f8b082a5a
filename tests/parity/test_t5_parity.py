"""T5 tokenizer and encoder against transformers' T5Tokenizer and T5EncoderModel.

Tokenizer: a Unigram sentencepiece model trained here (T5's ids: pad 0, eos 1, unk 2, no bos; default nmt_nfkc
normalisation), read by transformers' `T5Tokenizer.from_pretrained(folder)` (100 <extra_id_N> sentinels) and by
ours. Tolerance: identical input_ids and attention_mask.

Encoder: tiny random models that transformers writes with `save_pretrained` (a relu T5EncoderModel, and a
gated-gelu T5ForConditionalGeneration whose decoder keys the converter must drop), with the tokenizer's
spiece.model beside them. Tolerance: last_hidden_state max abs error <= 1e-4 in fp32, compared at every position
of padded batches, padded positions included (transformers returns values there too). Prompts run up to ~300
tokens so that relative distances reach the log-spaced and the clamped buckets. Full t5-base and flan-t5-large
configs are under `-m slow`.
"""

import random
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from musiclm_core import hub  # noqa: E402
from musiclm_core.convert import t5 as convert  # noqa: E402
from musiclm_core.convert.keys import strip_prefix  # noqa: E402
from musiclm_core.t5 import T5Encoder, T5Tokenizer, relative_position_bucket  # noqa: E402

TOL = 1e-4
MAX_LENGTH = 512

WORDS = ("the a of and with music song track drums bass guitar synth piano violin cello beat tempo loud soft "
         "calm happy sad pop rock jazz hip hop electronic melody harmony rhythm vocals ambient cinematic "
         "orchestral lofi chill upbeat energetic dark bright warm 80s 90s groove funk disco techno house").split()
FOREIGN = ("café naïve résumé über straße façade jalapeño São Paulo Zürich déjà vu crème brûlée Ελληνική μουσική "
           "русская музыка 日本 の 音楽 ピアノ 한국 음악 中文 歌曲").split()
SYLLABLES = "ka lo mi ne ru ta ve zo pri stro gla bel tor man sen".split()


def _corpus(seed=0):
    """Lines of music prompts, accented and non-Latin words, made-up words, digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        words = []
        for _ in range(rng.randint(3, 16)):
            r = rng.random()
            if r < 0.6:
                words.append(rng.choice(WORDS))
            elif r < 0.75:
                words.append(rng.choice(FOREIGN))
            elif r < 0.9:
                words.append("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))))
            else:
                words.append(rng.choice(["120", "bpm", "4/4", "C#", "(live)", "-", "feat.", "'n'", "!", "?", "🎵"]))
        lines.append(" ".join(words))
    return lines


def _train(folder, **options):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=600, hard_vocab_limit=False, character_coverage=0.9995,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, **options)
    (folder / "spiece.vocab").unlink()
    return folder


@pytest.fixture(scope="session")
def spm_folder(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("t5_tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(spm_folder):
    return transformers.T5Tokenizer.from_pretrained(str(spm_folder))


@pytest.fixture(scope="session")
def tokenizer(spm_folder):
    return T5Tokenizer.from_folder(spm_folder)


# Prompts that exercise each step of transformers' pipeline (special-token split, character map, whitespace
# split, "▁" handling, Unigram, unknown fusion, </s>, truncation).
PROMPTS = [
    "80s pop track with bassy drums and synth",
    "",
    " ",
    "   leading and trailing spaces   ",
    "runs   of\t\ttabs\nand\n\nnew lines\r\nand CRLF",
    "café naïve déjà vu crème brûlée",             # precomposed accents
    "cafe\u0301 nai\u0308ve",                      # decomposed accents (the character map composes them)
    "ÇA VA? Straße ÀÉÎÕÜ",
    "日本の音楽 ピアノ 한국 음악 中文歌曲",
    "Ελληνική μουσική и русская музыка",
    "emoji 🎵🎶 🥁🎸 👍🏽 👨‍👩‍👧 🏳️‍🌈 ❤️",
    "ﬁne ligatures ①② ½ ™ ＦＵＬＬＷＩＤＴＨ ｱｲｳ",     # NFKC compatibility characters
    "nbsp\u00a0ideographic\u3000thin\u2009zero\u200bwidth\ufeffbom",
    "controls \x00\x07\x7f\x85 next\u2028line",
    "ﬁ\u0303 \u2009\u0308 ①\u0301",                 # marks on mapped characters: transformers drops them
    "sentinels <extra_id_0> and <extra_id_99><extra_id_10> but not <extra_id_100>",
    "literal </s> <pad> <unk> inside",
    "made by normalisation: ＜/s＞ <extra_id_０> <un\x01k>x",
    "unknown runs ☃☃☃ ⚡⚡ x☃",
    "sp\u2581ace mark ▁▁ ▁",
    "the music " * 300,                             # far longer than 512 tokens
]


def _hf_batch(hf_tokenizer, prompts, max_length=MAX_LENGTH):
    out = hf_tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_tokenizer_fixture_is_not_degenerate(tokenizer, hf_tokenizer):
    # A real vocabulary (multi-character pieces), and the prompts hit unknowns, truncation and normalisation.
    assert tokenizer.vocab_size == len(hf_tokenizer) > 300
    ids = tokenizer.encode("80s pop track with bassy drums and synth")
    assert len(ids) < len("80s pop track with bassy drums and synth") // 2
    assert tokenizer.unk_id in tokenizer.encode("unknown runs ☃☃☃")
    assert len(tokenizer.encode(PROMPTS[-1])) > MAX_LENGTH
    assert tokenizer.encode("ＦＵＬＬ") == tokenizer.encode("FULL")


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_tokenizer_matches_transformers_one_prompt(tokenizer, hf_tokenizer, prompt):
    hf_ids, hf_mask = _hf_batch(hf_tokenizer, [prompt])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt warns; tested in the unit tests
        ids, mask = tokenizer([prompt], max_length=MAX_LENGTH)
    assert ids.tolist() == hf_ids.tolist()
    assert mask.tolist() == hf_mask.tolist()
    assert ids.dtype == hf_ids.dtype == torch.int64 and mask.dtype == hf_mask.dtype


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 9, 1])
def test_tokenizer_matches_transformers_batches(tokenizer, hf_tokenizer, max_length):
    hf_ids, hf_mask = _hf_batch(hf_tokenizer, PROMPTS, max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, mask = tokenizer(PROMPTS, max_length=max_length)
    assert ids.shape[1] == min(max_length, max(map(len, map(tokenizer.encode, PROMPTS))))
    assert ids.tolist() == hf_ids.tolist()
    assert mask.tolist() == hf_mask.tolist()


def test_tokenizer_padding_to_max_length_matches_transformers(tokenizer, hf_tokenizer):
    # AudioLDM 2 pads its negative prompt to the positive prompt's length.
    prompts = ["a", "drums and bass", ""]
    hf = hf_tokenizer(prompts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    ids, mask = tokenizer(prompts, max_length=12, padding="max_length")
    assert ids.tolist() == hf["input_ids"].tolist() and mask.tolist() == hf["attention_mask"].tolist()


def _random_texts(seed, count):
    """Random strings from character pools that stress the character map, whitespace and special tokens."""
    pools = ["abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789",
             " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u200b\ufeff\x1c\x1f",
             "éèêëàâäôöûüçñßøåæœÉÈ", "e\u0301a\u0300o\u0308n\u0303\u0327\u0302",
             "😀🎵🎶🥁🎸👍🏽👨‍👩‍👧\u200d\ufe0f🏳️‍🌈", "日本語の音楽漢字한국어中文", "ﬁﬂ①②Ⅳ㍱ﷺ¨´½™…‥－（）ｱｲｳ",
             "\x00\x01\x02\x07\x7f\x80\x9f", "▁_-.,!?;:'\"()[]{}<>/\\|@#$%^&*+=~`"]
    specials = ["</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_10>", "<extra_id_99>", "<extra_id_100>",
                "<extra_id_", "</s\x07>", "＜/s＞", "<extra_id_０>", "<un\x01k>", " music ", " café ", " drums"]
    rng = random.Random(seed)
    return ["".join(rng.choice(specials) if rng.random() < 0.1 else rng.choice(rng.choice(pools))
                    for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_tokenizer_matches_transformers_on_random_text(tokenizer, hf_tokenizer):
    texts = _random_texts(1, 600)
    mismatches = [t for t in texts if tokenizer.encode(t) != hf_tokenizer(t)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"


@pytest.mark.parametrize("variant", ["identity_normalization", "pieces_across_spaces"])
def test_tokenizer_variants_match_transformers(variant, tmp_path):
    """Models without a character map, and with pieces that hold "▁" inside (so that every "▁"-segment must be
    encoded on its own, as transformers does)."""
    if variant == "identity_normalization":
        folder = _train(tmp_path, normalization_rule_name="identity")
    else:
        folder = _train(tmp_path, split_by_whitespace=False)
    ours = T5Tokenizer.from_folder(folder)
    assert ours._joinable == (variant == "identity_normalization")
    assert (ours._charsmap is None) == (variant == "identity_normalization")
    hf = transformers.T5Tokenizer.from_pretrained(str(folder))
    texts = PROMPTS + _random_texts(2, 200)
    mismatches = [t for t in texts if ours.encode(t) != hf(t)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"


# ---------------------------------------------------------------------------------------------------------------
# Encoder


def _save_reference(folder, spm_folder, *, feed_forward, conditional, seed, **sizes):
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=768, feed_forward_proj=feed_forward, num_decoder_layers=1, **sizes)
    model = (T5ForConditionalGeneration if conditional else T5EncoderModel)(config).eval()
    model.save_pretrained(str(folder))
    shutil.copy(spm_folder / "spiece.model", folder / "spiece.model")
    return folder


@pytest.fixture(scope="session")
def relu_folder(tmp_path_factory, spm_folder):
    return _save_reference(tmp_path_factory.mktemp("t5_relu"), spm_folder, feed_forward="relu", conditional=False,
                           seed=0, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


@pytest.fixture(scope="session")
def gated_folder(tmp_path_factory, spm_folder):
    # Other bucket settings, d_kv * num_heads != d_model, and a full seq2seq file (decoder keys to drop).
    return _save_reference(tmp_path_factory.mktemp("t5_gated"), spm_folder, feed_forward="gated-gelu",
                           conditional=True, seed=1, d_model=24, d_kv=10, d_ff=48, num_layers=3, num_heads=3,
                           relative_attention_num_buckets=16, relative_attention_max_distance=40)


def _hf_encoder(folder, attn_implementation="sdpa"):
    return transformers.T5EncoderModel.from_pretrained(str(folder), attn_implementation=attn_implementation).eval()


ENCODER_PROMPTS = ["80s pop track with bassy drums and synth", "", "café 日本の音楽 🎵 <extra_id_0>",
                   "calm piano " * 40, "orchestral cinematic strings, epic brass, big drums " * 30]


@pytest.mark.parametrize("which", ["relu", "gated"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_encode_text_matches_transformers(which, attn_implementation, relu_folder, gated_folder, hf_tokenizer):
    folder = relu_folder if which == "relu" else gated_folder
    hf_ids, hf_mask = _hf_batch(hf_tokenizer, ENCODER_PROMPTS)
    assert hf_ids.shape[1] > 200 and (hf_mask == 0).any()  # long enough for the far buckets; padded rows
    with torch.no_grad():
        expected = _hf_encoder(folder, attn_implementation)(input_ids=hf_ids, attention_mask=hf_mask).last_hidden_state
        ours = T5Encoder.from_pretrained(folder)
        with pytest.warns(UserWarning, match="prompt 4 is .* truncated"):
            hidden, mask = ours.encode_text(ENCODER_PROMPTS)
    assert mask.dtype == torch.int64 and torch.equal(mask, hf_mask)
    assert hidden.shape == expected.shape
    err = (hidden - expected).abs().max().item()
    assert err <= TOL, f"max abs error {err}"


def test_encoder_fixture_can_fail(relu_folder, hf_tokenizer):
    """The random fixture depends on positions and padding, so a model that gets either wrong fails."""
    hf_ids, hf_mask = _hf_batch(hf_tokenizer, ENCODER_PROMPTS)
    with torch.no_grad():
        expected = _hf_encoder(relu_folder)(input_ids=hf_ids, attention_mask=hf_mask).last_hidden_state
        ours = T5Encoder.from_pretrained(relu_folder)
        assert (ours(hf_ids) - expected).abs().max() > 100 * TOL  # ignoring the padding mask
        ours.relative_bias.weight.zero_()
        assert (ours(hf_ids, hf_mask) - expected).abs().max() > 100 * TOL  # no position bias


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-1000, 1001)
    for buckets, distance in [(32, 128), (16, 40), (8, 20), (64, 256)]:
        expected = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                         max_distance=distance)
        assert torch.equal(relative_position_bucket(rel, buckets, distance), expected), (buckets, distance)


def test_conversion_drops_the_decoder_and_keeps_one_embedding(gated_folder):
    state = hub.load_state_dict(gated_folder)
    assert any(k.startswith("decoder.block.") for k in state) and "shared.weight" in state
    model = convert.load_transformers(hub.read_json(gated_folder / "config.json"), state, source="gated")
    assert torch.equal(model.embed.weight, state["shared.weight"])
    assert model.config.feed_forward == "gated-gelu" and model.config.relative_buckets == 16
    assert model.config.relative_max_distance == 40 and model.config.head_dim == 10


def test_both_embedding_keys(relu_folder):
    """.bin files hold both `shared.weight` and `encoder.embed_tokens.weight`: equal is fine, different is not."""
    config = hub.read_json(relu_folder / "config.json")
    state = hub.load_state_dict(relu_folder)
    both = {**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()}
    model = convert.load_transformers(config, both, source="both")
    assert torch.equal(model.embed.weight, state["shared.weight"])
    only_encoder = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    assert torch.equal(convert.load_transformers(config, only_encoder, source="enc").embed.weight, model.embed.weight)
    both["encoder.embed_tokens.weight"] = both["encoder.embed_tokens.weight"] + 1
    with pytest.raises(hub.CheckpointError, match="shared.weight .* encoder.embed_tokens.weight .* differ"):
        convert.load_transformers(config, both, source="both")


def test_musicgen_style_prefix(relu_folder):
    """The MusicGen loader passes `text_encoder.`-prefixed keys through strip_prefix and the sub-config."""
    config = hub.read_json(relu_folder / "config.json")
    state = {f"text_encoder.{k}": v for k, v in hub.load_state_dict(relu_folder).items()}
    state["decoder.model.decoder.layer_norm.weight"] = torch.ones(3)  # another part of the MusicGen file
    model = convert.load_transformers(config, strip_prefix(state, "text_encoder."), source="musicgen")
    model.tokenizer = T5Tokenizer.from_folder(relu_folder)
    reference = T5Encoder.from_pretrained(relu_folder)
    with torch.no_grad():
        assert torch.equal(model.encode_text(["drums"])[0], reference.encode_text(["drums"])[0])


def test_loader_errors(relu_folder, tmp_path):
    config = hub.read_json(relu_folder / "config.json")
    state = hub.load_state_dict(relu_folder)
    with pytest.raises(hub.CheckpointError, match="(?s)unexpected keys.*encoder.block.0.layer.2.foo.weight"):
        convert.load_transformers(config, {**state, "encoder.block.0.layer.2.foo.weight": torch.ones(1)},
                                  source="extra")
    with pytest.raises(hub.CheckpointError, match="(?s)missing keys.*layers.1.ffn.down.weight"):
        convert.load_transformers(config, {k: v for k, v in state.items()
                                           if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"}, source="m")
    with pytest.raises(hub.CheckpointError, match="feed_forward_proj is 'gated-silu'"):
        convert.load_transformers({**config, "feed_forward_proj": "gated-silu"}, state, source="act")
    with pytest.raises(hub.CheckpointError, match="model_type is 'umt5'"):
        convert.load_transformers({**config, "model_type": "umt5"}, state, source="umt5")
    # A transformers folder without spiece.model.
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(relu_folder, folder)
    (folder / "spiece.model").unlink()
    with pytest.raises(hub.CheckpointError, match=f"no spiece.model in {folder}"):
        T5Encoder.from_pretrained(folder)


def test_native_round_trip(relu_folder, tmp_path):
    model = T5Encoder.from_pretrained(relu_folder)
    model.save_pretrained(tmp_path / "native")
    assert (tmp_path / "native" / "spiece.model").read_bytes() == (relu_folder / "spiece.model").read_bytes()
    assert hub.detect_layout(tmp_path / "native") == "native"
    again = T5Encoder.from_pretrained(tmp_path / "native")
    assert again.config == model.config
    with torch.no_grad():
        a, mask_a = model.encode_text(ENCODER_PROMPTS[:4])
        b, mask_b = again.encode_text(ENCODER_PROMPTS[:4])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "native")


# ---------------------------------------------------------------------------------------------------------------
# Official sizes (random weights): `pytest -m slow tests/parity/test_t5_parity.py`


@pytest.mark.slow
@pytest.mark.parametrize("name,sizes", [
    ("t5-base", dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu")),
    ("flan-t5-large", dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                           feed_forward_proj="gated-gelu")),
])
def test_official_sizes_match_transformers(name, sizes, tmp_path, spm_folder, hf_tokenizer):
    from transformers import T5Config

    from musiclm_core.t5 import PRESETS

    torch.manual_seed(0)
    reference = transformers.T5EncoderModel(T5Config(vocab_size=32128, **sizes)).eval()
    reference.save_pretrained(str(tmp_path))
    shutil.copy(spm_folder / "spiece.model", tmp_path / "spiece.model")
    ours = T5Encoder.from_pretrained(tmp_path)
    assert ours.config == PRESETS[name]
    hf_ids, hf_mask = _hf_batch(hf_tokenizer, ENCODER_PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=hf_ids, attention_mask=hf_mask).last_hidden_state
        with pytest.warns(UserWarning, match="truncated"):
            hidden, mask = ours.encode_text(ENCODER_PROMPTS)
    assert torch.equal(mask, hf_mask)
    err = (hidden - expected).abs().max().item()
    print(f"{name}: max abs error {err:.2e} over {tuple(hidden.shape)}")
    assert err <= TOL, f"{name}: max abs error {err}"
