"""CLAP at the tiny preset: the Swin pieces against their definitions, invariances of the towers, bad input,
the native round trip, the converter's refusals. Parity with transformers is in tests/parity/test_clap_parity.py.
"""

import json

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from musiclm_core import hub  # noqa: E402
from musiclm_core.clap import (PRESETS, CLAP, CLAPConfig, CLAPTokenizer, format_scores,  # noqa: E402
                               mel_filters, relative_position_index, shifted_window_mask, window_order)
from musiclm_core.convert import clap as convert  # noqa: E402

SR = 48_000
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny preset with random weights and a small byte-level BPE tokenizer (written as vocab + merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    clap = CLAP(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in clap.parameters():
            p.add_(0.2 * torch.randn(p.shape))
    folder = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["soft piano and loud drums", "a calm synth pad with bass"] * 50, trainers.BpeTrainer(
        vocab_size=290, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(folder))
    clap.tokenizer = CLAPTokenizer.from_folder(folder)
    return clap


def _noise(seconds: float, seed: int = 0, rate: int = SR) -> torch.Tensor:
    return 0.1 * torch.randn(int(seconds * rate), generator=torch.Generator().manual_seed(seed))


# ----- the Swin pieces


def test_relative_position_index_is_swins():
    w = 3
    index = relative_position_index(w)
    for q in range(w * w):
        for k in range(w * w):
            dy, dx = q // w - k // w, q % w - k % w
            assert index[q, k] == (dy + w - 1) * (2 * w - 1) + (dx + w - 1)
    assert index.max() == (2 * w - 1) ** 2 - 1


def test_shifted_window_mask_keeps_wrapped_regions_apart():
    size, w, s = 8, 4, 2
    mask = shifted_window_mask(size, w, s)  # (4 windows, 16, 16)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    # The last window covers rows and columns [4, 8) of the rolled grid: regions 1 and 2 along each axis
    # ([4, 6) and [6, 8)), so token (0, 0) of it only sees the 2x2 block it is in.
    sees = (mask[3, 0] == 0).view(w, w)
    assert sees[:2, :2].all() and sees.sum() == 4
    assert set(mask.unique().tolist()) == {0.0, -100.0}


@pytest.mark.parametrize("shift", [0, 2])
def test_window_order_is_roll_then_partition(shift):
    size, w = 8, 4
    grid = torch.randn(size, size, 3)
    rolled = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    windows = rolled.view(2, w, 2, w, 3).permute(0, 2, 1, 3, 4).reshape(-1, 3)  # (nW * N, 3)
    order = window_order(size, w, shift)
    assert torch.equal(grid.view(-1, 3)[order], windows)
    assert torch.equal(windows[torch.argsort(order)], grid.view(-1, 3))


def test_mel_filters_are_slaney_triangles():
    filters = mel_filters(513, 64, 50.0, 14_000.0, SR)  # (513, 64)
    assert filters.shape == (513, 64) and (filters >= 0).all()
    peaks = filters.argmax(0)
    assert (peaks[1:] >= peaks[:-1]).all()  # centres rise
    freqs = torch.linspace(0, SR // 2, 513, dtype=torch.float64)
    assert filters[freqs < 50].abs().max() == 0 and filters[freqs > 14_000].abs().max() == 0
    # Slaney normalisation: each triangle has area ~1 in Hz (2 / width * width / 2), up to the bin sampling.
    area = (filters * (SR / 2 / 512)).sum(0)
    assert ((area[24:] - 1).abs() < 0.05).all()  # the lowest triangles span only a few bins


# ----- invariances


def test_padding_does_not_change_text_embeds(model):
    texts = ["soft piano", "a calm synth pad with bass and loud drums", ""]
    longest = model.encode_text(*model.tokenize(texts, padding="longest"))
    full = model.encode_text(*model.tokenize(texts, padding="max_length"))
    assert model.tokenize(texts, padding="max_length")[0].shape == (3, 512)
    assert (longest - full).abs().max() <= TOL
    alone = torch.cat([model.text_embeds([t]) for t in texts])
    assert (alone - longest).abs().max() <= TOL
    assert (longest[0] - longest[1]).abs().max() > 1e-2  # different texts, different embeddings


def test_audio_batch_rows_are_independent(model):
    clips = [_noise(2.0, 1), _noise(4.0, 2)]
    both = model.audio_embeds(clips, SR)
    alone = torch.cat([model.audio_embeds([c], SR) for c in clips])
    assert both.shape == (2, 16) and (both - alone).abs().max() <= TOL
    assert torch.allclose(both.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-2


def test_audio_shapes_and_rates(model):
    wav = _noise(2.0, 3, rate=16_000)
    a = model.audio_embeds(wav, 16_000)  # (N,)
    b = model.audio_embeds(wav[None], 16_000)  # (B, N)
    c = model.audio_embeds(wav[None, None].numpy(), 16_000)  # (B, 1, N) numpy
    assert (a - b).abs().max() == 0 and (a - c).abs().max() <= TOL
    assert model.features(wav, 16_000).shape == (1, 1, 1001, 64)


def test_score_and_logits(model, tmp_path):
    import soundfile as sf

    texts = ["soft piano", "loud drums"]
    clips = [_noise(1.0, 4), _noise(1.5, 5)]
    cos = model.score(texts, clips, SR)
    assert cos.shape == (2, 2) and cos.abs().max() <= 1 + 1e-6
    expected = model.text_embeds(texts) @ model.audio_embeds(clips, SR).T
    assert (cos - expected).abs().max() <= TOL
    logits = model.logits_per_text(texts, clips, SR)
    assert (logits - cos * model.logit_scale_text.detach().exp()).abs().max() <= 1e-4
    paths = []
    for i, clip in enumerate(clips):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], clip.numpy(), SR, subtype="FLOAT")
    assert (model.score_files(texts, paths) - cos).abs().max() <= TOL
    table = format_scores(cos, texts, [p.name for p in paths]).splitlines()
    assert len(table) == 3 and "clip1.wav" in table[0] and table[2].startswith("loud drums")
    assert f"{cos[1, 1].item():.4f}" in table[2]
    with pytest.raises(ValueError, match="do not match"):
        format_scores(cos, texts, ["one file"])


# ----- bad input


def test_bad_text_input(model):
    with pytest.raises(ValueError, match="texts is empty"):
        model.text_embeds([])
    with pytest.raises(TypeError, match="list of strings"):
        model.text_embeds("a string, not a list")
    with pytest.raises(TypeError, match="item"):
        model.text_embeds(["ok", 3])
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model.encode_text(torch.tensor([[0, 10_000, 2]]))
    with pytest.raises(ValueError, match="at most 512"):
        model.encode_text(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model.encode_text(torch.tensor([[0, 5, 2]]), torch.ones(1, 4))


@pytest.mark.parametrize("rate", [0, -16_000, 44_100.0, True, "48000"])
def test_bad_sample_rate(model, rate):
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        model.audio_embeds(_noise(1.0), rate)


def test_bad_audio(model):
    with pytest.raises(ValueError, match="shorter than one frame"):
        model.audio_embeds(torch.zeros(100), SR)  # 100 samples < one 480-sample hop
    with pytest.raises(ValueError, match="shorter than one frame"):
        model.audio_embeds(torch.zeros(150), 16_000)  # 450 samples once at 48 kHz
    nan = _noise(1.0)
    nan[10] = float("nan")
    with pytest.raises(ValueError, match="clip 1 holds 1 NaN"):
        model.audio_embeds([_noise(1.0), nan], SR)
    with pytest.raises(ValueError, match="mono"):
        model.audio_embeds(torch.zeros(2, 2, SR), SR)
    with pytest.raises(ValueError, match="floating-point"):
        model.audio_embeds(torch.zeros(SR, dtype=torch.int16), SR)
    with pytest.raises(ValueError, match="empty list"):
        model.audio_embeds([], SR)
    with pytest.raises(ValueError, match="features must be"):
        model.encode_audio(torch.zeros(1, 1, 1001, 32))
    with pytest.raises(ValueError, match="features must be"):
        model.encode_audio(torch.zeros(1, 1, 1025, 64))
    with pytest.raises(TypeError, match="seed"):
        model.features(_noise(1.0), SR, seed=1.5)


def test_no_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer"):
        CLAP(PRESETS["tiny"]).text_embeds(["x"])


@pytest.mark.parametrize("change, message", [
    (dict(audio_dim=100), "audio_dim"),
    (dict(window_size=16), "multiple of window_size"),
    (dict(spec_size=250), "multiple of num_mel_bins"),
    (dict(padding="wrap"), "padding must be one of"),
    (dict(text_heads=5), "divisible"),
])
def test_bad_config(change, message):
    fields = PRESETS["tiny"].to_dict() | change
    with pytest.raises(ValueError, match=message):
        CLAPConfig(**fields)
    with pytest.raises(hub.CheckpointError, match=message):
        CLAPConfig.from_dict(fields)


# ----- checkpoints


def test_native_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "native")
    again = CLAP.from_pretrained(tmp_path / "native")
    assert again.config == model.config
    texts = ["soft piano <mask>", " drums "]
    assert torch.equal(again.tokenize(texts)[0], model.tokenize(texts)[0])
    assert (again.text_embeds(texts) - model.text_embeds(texts)).abs().max() <= TOL
    clip = _noise(1.0, 6)
    assert (again.audio_embeds(clip, SR) - model.audio_embeds(clip, SR)).abs().max() <= TOL
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "native")


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(hub.CheckpointError, match="no tokenizer"):
        CLAPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(hub.CheckpointError, match="BPE"):
        CLAPTokenizer.from_folder(tmp_path)


HF_CONFIG = {"model_type": "clap", "projection_dim": 16,
             "text_config": dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64),
             "audio_config": dict(patch_embeds_hidden_size=8, depths=[2, 2, 1, 2], num_attention_heads=[2, 2, 4, 4],
                                  hidden_size=64)}
FEATURES = {"feature_size": 64, "frequency_min": 50, "truncation": "rand_trunc"}


def test_config_translation_matches_tiny_preset():
    config = convert.config_from_transformers(HF_CONFIG, tokenizer_options={"model_max_length": 512},
                                              features=FEATURES, source="t")
    assert config == PRESETS["tiny"]


@pytest.mark.parametrize("patch, message", [
    (dict(audio_config=dict(HF_CONFIG["audio_config"], enable_fusion=True)), "enable_fusion"),
    (dict(text_config=dict(HF_CONFIG["text_config"], hidden_act="relu")), "hidden_act"),
    (dict(model_type="clap_text_model"), "expected 'clap'"),
    (dict(audio_config=dict(HF_CONFIG["audio_config"], patch_stride=[4, 2])), "not square"),
])
def test_converter_refuses_config(patch, message):
    with pytest.raises(hub.CheckpointError, match=message):
        convert.config_from_transformers(HF_CONFIG | patch, tokenizer_options={}, features=FEATURES, source="t")


@pytest.mark.parametrize("features, message", [
    (FEATURES | {"truncation": "fusion"}, "truncation"),
    ({"frequency_min": 50, "truncation": "rand_trunc", "feature_size": 80}, "mel bins"),
])
def test_converter_refuses_features(features, message):
    with pytest.raises(hub.CheckpointError, match=message):
        convert.config_from_transformers(HF_CONFIG, tokenizer_options={}, features=features, source="t")


def _theirs(model):
    """Our tiny model's tensors under transformers' names, q/k/v split again (the converter's inverse)."""
    inverse = {}
    for theirs, ours in convert.TABLE:
        inverse[ours] = theirs
    from musiclm_core.convert.keys import _compile

    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in inverse.items():
            m = _compile(ours).match(key)
            if m:
                name = theirs.format(**m.groupdict())
                break
        else:
            raise AssertionError(f"no row for {key}")
        if ".qkv." in name:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                state[name.replace(".qkv.", f".{part}.")] = chunk
        else:
            state[name] = value
    return state


def test_converter_key_table_is_strict(model):
    config = model.config
    state = _theirs(model)
    state["text_model.embeddings.position_ids"] = torch.arange(514)[None]
    state["text_model.embeddings.token_type_ids"] = torch.zeros(1, 514, dtype=torch.long)
    index = "audio_model.audio_encoder.layers.0.blocks.1.attention.self.relative_position_index"
    state[index] = relative_position_index(8)
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}  # as the pipelines' files
    loaded = convert.load_transformers(config, state, source="t")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ids = torch.tensor([[0, 7, 2]])
    assert (loaded.encode_text(ids) - model.encode_text(ids)).abs().max() <= TOL
    with pytest.raises(hub.CheckpointError, match="unexpected keys"):
        convert.load_transformers(config, state | {"audio_model.audio_encoder.head.weight": torch.zeros(1)},
                                  source="t")
    missing = dict(state)
    del missing["text_model.pooler.dense.bias"]
    with pytest.raises(hub.CheckpointError, match="missing keys"):
        convert.load_transformers(config, missing, source="t")
    with pytest.raises(hub.CheckpointError, match="relative position index"):
        convert.load_transformers(config, state | {index: relative_position_index(8).flip(0)}, source="t")
    with pytest.raises(hub.CheckpointError, match="token_type_ids"):
        convert.load_transformers(config, state | {"text_model.embeddings.token_type_ids":
                                                   torch.ones(1, 514, dtype=torch.long)}, source="t")
