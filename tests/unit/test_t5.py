"""T5 encoder and tokenizer on tiny configs: buckets, shapes, padding, bad input, loading errors."""

import dataclasses
import warnings

import pytest
import torch

from musiclm_core import hub
from musiclm_core.t5 import PRESETS, T5Config, T5Encoder, T5Tokenizer, relative_position_bucket

spm = pytest.importorskip("sentencepiece")

LINES = [f"{a} {b} track with {c} drums and {d} synth"
         for a in ("calm", "happy", "dark", "80s") for b in ("pop", "rock", "jazz")
         for c in ("loud", "soft", "bassy") for d in ("warm", "bright")]


def _train(folder, **options):
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_prefix=str(folder / "spiece"),
                                   vocab_size=60, hard_vocab_limit=False, minloglevel=2, **options)
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("spm"), model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)


@pytest.fixture(scope="module")
def tokenizer(spm_folder):
    return T5Tokenizer.from_folder(spm_folder)


def _tiny(**changes):
    config = dataclasses.replace(PRESETS["tiny"], **changes)
    torch.manual_seed(0)
    return T5Encoder(config).eval()


# ---------------------------------------------------------------------------------------------------------------
# Encoder


def test_relative_position_buckets_by_hand():
    # 32 buckets, max distance 128: 16 per direction, exact below 8, then 8 + trunc(ln(d/8) / ln(16) * 8).
    rel = torch.tensor([0, -1, 1, -7, 7, -8, 8, -11, 12, -90, 91, 128, -5000, 5000])
    expected = [0, 1, 17, 7, 23, 8, 24, 8, 25, 14, 31, 31, 15, 31]
    assert relative_position_bucket(rel, 32, 128).tolist() == expected


def test_presets_have_the_official_sizes():
    with torch.device("meta"):
        flan = T5Encoder(PRESETS["flan-t5-large"])
        base = T5Encoder(PRESETS["t5-base"])
    # specs/ldm.md §7: 374,130,176 parameters counting the tied embedding twice (shared + embed_tokens).
    assert sum(p.numel() for p in flan.parameters()) == 374_130_176 - 32128 * 1024
    assert sum(p.numel() for p in base.parameters()) == 32128 * 768 + 32 * 12 + 768 + 12 * (
        4 * 768 * 768 + 2 * 768 * 3072 + 2 * 768)
    assert not hasattr(base.layers[0].ffn, "gate") and flan.layers[0].ffn.gate.weight.shape == (2816, 1024)


def test_forward_shape_and_padding_invariance():
    model = _tiny()
    ids = torch.randint(3, 1000, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        batch = model(ids, mask)
        assert batch.shape == (3, 9, 32)
        for b, n in enumerate(mask.sum(1).tolist()):
            alone = model(ids[b:b + 1, :n])  # no padding at all
            assert (batch[b, :n] - alone[0]).abs().max() < 1e-5
        assert (model(ids, mask.bool()) - batch).abs().max() == 0  # bool and int masks alike


def test_positions_matter():
    # Without the position bias the encoder would be permutation-equivariant: reversing the tokens would
    # reverse the outputs.
    model = _tiny()
    ids = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        out = model(ids)
        assert (model(ids.flip(1)).flip(1) - out).abs().amax(dim=-1).min() > 1e-3
        model.relative_bias.weight.zero_()
        assert (model(ids.flip(1)).flip(1) - model(ids)).abs().max() < 1e-5


def test_gated_gelu_variant():
    model = _tiny(feed_forward="gated-gelu")
    ffn = model.layers[0].ffn
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        manual = ffn.down(torch.nn.functional.gelu(ffn.gate(x), approximate="tanh") * ffn.up(x))
        assert torch.equal(ffn(x), manual)
        assert model(torch.randint(0, 100, (2, 5))).shape == (2, 5, 32)


def test_fully_masked_row_is_finite():
    model = _tiny()
    with torch.no_grad():
        out = model(torch.randint(0, 100, (2, 4)), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    assert torch.isfinite(out).all()


def test_forward_bad_input():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(B, L\) integer tensor, got \(4,\)"):
        model(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[0, 32128\).*max 32128"):
        model(torch.tensor([[1, 32128]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 5))
    with pytest.raises(ValueError, match="must not be empty"):
        model(torch.zeros(1, 0, dtype=torch.int64))


def test_config_errors():
    with pytest.raises(ValueError, match="feed_forward must be one of"):
        T5Config(feed_forward="swiglu")
    with pytest.raises(ValueError, match="relative_buckets must be even"):
        T5Config(relative_buckets=31)
    with pytest.raises(ValueError, match="relative_max_distance"):
        T5Config(relative_buckets=32, relative_max_distance=8)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        T5Config(num_layers=0)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids(tokenizer):
    n = tokenizer._sp.get_piece_size()
    assert tokenizer.vocab_size == n + 100
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("<extra_id_0>") == [n + 99, 1] and tokenizer.encode("<extra_id_99>") == [n, 1]
    ids = tokenizer.encode("calm pop track")
    assert ids[-1] == 1 and 1 not in ids[:-1] and min(ids[:-1]) > 2
    assert tokenizer.encode("  calm \n\t pop   track  ") == ids  # whitespace runs and ends are dropped


def test_tokenizer_batch_padding(tokenizer):
    ids, mask = tokenizer(["calm pop track with loud drums", "jazz", ""])
    lengths = [len(tokenizer.encode(p)) for p in ["calm pop track with loud drums", "jazz", ""]]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[mask == 0] == 0).all() and ids[2, 0] == 1
    ids, mask = tokenizer(["jazz"], max_length=10, padding="max_length")
    assert ids.shape == (1, 10) and mask.sum() == len(tokenizer.encode("jazz"))


def test_tokenizer_truncation_warns_and_keeps_eos(tokenizer):
    long = "calm pop track " * 50
    with pytest.warns(UserWarning, match=r"prompt 1 is \d+ tokens long, more than max_length=16: truncated"):
        ids, mask = tokenizer(["jazz", long], max_length=16)
    assert ids.shape == (2, 16) and ids[1, -1] == 1 and mask[1].all()
    assert ids[1, :15].tolist() == tokenizer.encode(long)[:15]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a prompt that fits exactly
        tokenizer(["jazz"], max_length=len(tokenizer.encode("jazz")))


def test_tokenizer_bad_input(tokenizer):
    with pytest.raises(ValueError, match="prompts is empty"):
        tokenizer([])
    with pytest.raises(TypeError, match=r"every prompt must be a str; got \(index, type\) \[\(1, 'int'\)\]"):
        tokenizer(["ok", 3])
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        tokenizer("a single string")
    with pytest.raises(TypeError, match="list of strings, got NoneType"):
        tokenizer(None)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tokenizer(["a"], max_length=0)
    with pytest.raises(ValueError, match="padding must be"):
        tokenizer(["a"], padding=True)


def test_tokenizer_file_errors(tmp_path, spm_folder):
    with pytest.raises(hub.CheckpointError, match=f"no spiece.model in {tmp_path}"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(hub.CheckpointError, match="not a readable sentencepiece model"):
        T5Tokenizer.from_folder(tmp_path)
    other_ids = _train(tmp_path / "other_ids", model_type="unigram")  # sentencepiece defaults: unk 0, bos 1, eos 2
    with pytest.raises(hub.CheckpointError, match="pieces 0, 1, 2 = <pad>"):
        T5Tokenizer.from_folder(other_ids)
    bpe = _train(tmp_path / "bpe", model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    with pytest.raises(hub.CheckpointError, match="T5 needs a Unigram model"):
        T5Tokenizer.from_folder(bpe)
    user = _train(tmp_path / "user", model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                  user_defined_symbols=["<sep>"])
    with pytest.raises(hub.CheckpointError, match="'<sep>' has type 4"):
        T5Tokenizer.from_folder(user)


def test_encode_text(tokenizer):
    model = _tiny()
    with pytest.raises(ValueError, match="has no tokenizer"):
        model.encode_text(["jazz"])
    model.tokenizer = tokenizer
    with torch.no_grad():
        hidden, mask = model.encode_text(["calm pop track", "jazz"])
        ids, expected_mask = tokenizer(["calm pop track", "jazz"])
        assert torch.equal(mask, expected_mask) and mask.dtype == torch.int64
        assert torch.equal(hidden, model(ids, expected_mask))
    with pytest.raises(ValueError, match="prompts is empty"):
        model.encode_text([])


def test_native_round_trip(tmp_path, tokenizer):
    model = _tiny(feed_forward="gated-gelu", max_length=64)
    with pytest.raises(ValueError, match="no tokenizer to save"):
        model.save_pretrained(tmp_path / "x")
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "native")
    again = T5Encoder.from_pretrained(tmp_path / "native")
    assert again.config == model.config and again.tokenizer.max_length == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    (tmp_path / "native" / "spiece.model").unlink()
    with pytest.raises(hub.CheckpointError, match="no spiece.model in"):
        T5Encoder.from_pretrained(tmp_path / "native")
