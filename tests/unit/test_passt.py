"""PaSST and its KL metric without the reference packages: presets, shapes, checkpoint loading and its errors,
segmenting, cropping, the metric's arithmetic, and clear errors on bad input. Tiny preset (2 s segments)."""

import pathlib

import pytest
import torch

from musiclm_core import hub
from musiclm_core.convert import passt as convert
from musiclm_core.passt import (CHECKPOINTS, PRESETS, KLDivergence, PaSST, checkpoint_path, kaldi_mel_banks,
                                kl_divergence, label_distributions, segment_distributions)

from passt_fixtures import random_passt, sounds, write_passt_checkpoint

SR = 32_000


@pytest.fixture(scope="module")
def model():
    return random_passt(tiny=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_passt_checkpoint(tmp_path_factory.mktemp("passt"), tiny=True)


def test_presets_fit_their_segments():
    for name, positions, seconds in (("10sec", 99, 10), ("20sec", 200, 20), ("30sec", 300, 30), ("tiny", 20, 2)):
        c = PRESETS[name]
        assert (c.time_positions, c.segment_s, c.freq_patches) == (positions, seconds, 12)
        # a whole segment uses every time position but (at most) one: 10 s -> 1000 frames -> 99 patches
        assert c.time_positions - 1 <= c.patches(c.segment_samples) <= c.time_positions
        assert c.patches(c.min_samples) == 0 and c.patches(c.min_samples + 1) == 1  # 0.15 s is one patch
    assert PRESETS["20sec"].dim == 768 and PRESETS["20sec"].depth == 12 and PRESETS["20sec"].num_labels == 527
    with pytest.raises(ValueError, match="time positions"):
        type(PRESETS["tiny"])(time_positions=20, segment_s=20.0)


def test_kaldi_mel_banks():
    banks = kaldi_mel_banks(128, 1024, SR, 0.0, 15_000.0)  # (128, 513)
    assert banks.shape == (128, 513) and banks.dtype == torch.float64
    assert banks.min() >= 0 and banks.max() <= 1
    assert banks[:, -1].abs().max() == 0  # the Nyquist bin
    assert banks[:, round(15_000 / 31.25) + 1:].abs().max() == 0  # nothing above f_max
    peaks = banks.argmax(dim=1)
    assert bool((peaks[1:] >= peaks[:-1]).all())  # bands in order of frequency
    assert banks[-20:].max(dim=1).values.min() > 0.9  # wide bands at the top reach their peak


def test_logits_shape_batch_and_listening(model):
    s = sounds(1.0)
    wav = torch.cat([s["noise"], s["tone"]])  # (2, N)
    logits = model.logits(wav)
    assert logits.shape == (2, 527) and logits.dtype == torch.float32
    single = torch.cat([model.logits(wav[:1]), model.logits(wav[1])])  # (N,) is a batch of one
    assert (logits - single).abs().max() <= 1e-4
    assert (logits[0] - logits[1]).abs().max() > 1.0  # different sounds, different labels


def test_forward_takes_mel_with_or_without_channel(model):
    mel = model.mel(sounds(0.5)["tone"])  # (1, 128, T)
    assert mel.shape == (1, 128, (16_000 - 1) // 320 + 1)
    assert (model(mel) - model(mel[:, None])).abs().max() <= 1e-6


def test_from_pretrained_file_and_folder(model, checkpoint):
    wav = sounds(0.5)["clicks"]
    for where in (checkpoint, checkpoint.parent):
        loaded = PaSST.from_pretrained(where, preset="tiny")
        assert not loaded.training
        assert (loaded.logits(wav) - model.logits(wav)).abs().max() <= 1e-5


def test_from_pretrained_default_location_is_torch_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name, url = CHECKPOINTS["20sec"]
    with pytest.raises(FileNotFoundError) as err:
        PaSST.from_pretrained()
    assert str(tmp_path / "hub" / "checkpoints" / name) in str(err.value) and url in str(err.value)
    write_passt_checkpoint(tmp_path / "hub" / "checkpoints" / CHECKPOINTS["tiny"][0], tiny=True)
    assert checkpoint_path(None, "tiny") == tmp_path / "hub" / "checkpoints" / "passt-tiny.pt"
    PaSST.from_pretrained(preset="tiny")


def test_missing_checkpoint_names_path_and_url(tmp_path):
    for preset in ("10sec", "20sec", "30sec"):
        name, url = CHECKPOINTS[preset]
        with pytest.raises(FileNotFoundError, match="download it from") as err:
            PaSST.from_pretrained(tmp_path, preset=preset)
        assert str(tmp_path / name) in str(err.value) and url in str(err.value)
    with pytest.raises(ValueError, match="unknown PaSST preset"):
        PaSST.from_pretrained(tmp_path, preset="40sec")


def test_strict_key_accounting(tmp_path, checkpoint):
    state = torch.load(checkpoint, weights_only=True)

    def load(s):
        path = tmp_path / "x.pt"
        torch.save(s, path)
        return PaSST.from_pretrained(path, preset="tiny")

    with pytest.raises(hub.CheckpointError, match="blocks.0.extra"):
        load({**state, "blocks.0.extra": torch.zeros(1)})
    with pytest.raises(hub.CheckpointError, match="missing keys.*\n.*blocks.1.norm1.weight"):
        load({k: v for k, v in state.items() if k != "blocks.1.norm1.weight"})
    with pytest.raises(hub.CheckpointError, match=r"time_pos: checkpoint \(1, 32, 1, 20\), model \(1, 768, 1, 200\)"):
        PaSST.from_pretrained(checkpoint, preset="20sec")  # the tiny file is not the 20 s model
    # DeiT's {"model": state} wrapper and a linear patch embedding (hear21passt's checkpoint_filter_fn) load
    wrapped = {**state, "patch_embed.proj.weight": state["patch_embed.proj.weight"].reshape(32, 256)}
    assert isinstance(load({"model": wrapped}), PaSST)
    with pytest.raises(hub.CheckpointError, match="ImageNet"):
        load({"pos_embed": torch.zeros(1, 10, 32), "cls_token": torch.zeros(1, 1, 32)})


def test_pickles_are_loaded_weights_only(tmp_path, checkpoint):
    path = tmp_path / "evil.pt"
    torch.save({**torch.load(checkpoint, weights_only=True), "obj": pathlib.PurePosixPath("x")}, path)
    with pytest.raises(hub.CheckpointError, match="weights-only"):
        PaSST.from_pretrained(path, preset="tiny")


def test_reference_layout_round_trip(model):
    state = convert.to_reference(model)
    assert "head.1.weight" in state and "head_dist.bias" in state and "blocks.1.attn.qkv.weight" in state
    again = convert.load_state(state, model.config, source="round trip")
    wav = sounds(0.3)["drone"]
    assert (again.logits(wav) - model.logits(wav)).abs().max() <= 1e-6


@pytest.mark.parametrize("extra, rows", [(0, 1), (4800, 1), (4801, 2), (64_000, 2), (64_000 + 4801, 3)])
def test_segments(model, extra, rows):
    """2 s segments; a last piece of 0.15 s (4800 samples) or less is dropped, as audiocraft drops it."""
    wav = sounds(5.0)["noise"][:, :64_000 + extra]
    probs = label_distributions(model, wav, SR)
    assert probs.shape == (rows, 527)
    assert torch.allclose(probs.sum(-1), torch.ones(rows), atol=1e-5)
    # each row is the softmax of that segment alone
    first = model.logits(wav[:, :64_000]).softmax(-1)
    assert (probs[0] - first[0]).abs().max() <= 1e-5


def test_segment_distributions_keep_order_across_batches(model):
    s = sounds(2.0)
    pieces = [s["noise"][0], s["tone"][0], s["clicks"][0, :10_000], s["drone"][0], s["tone"][0, :10_000]]
    batched = segment_distributions(model, pieces, batch_size=2)
    alone = torch.cat([model.logits(p).softmax(-1) for p in pieces])
    assert batched.shape == (5, 527)
    assert (batched - alone).abs().max() <= 1e-5


def test_label_distributions_mono_and_rate(model):
    s = sounds(2.5)
    stereo = torch.cat([s["tone"], s["clicks"]])  # (2, N)
    mono = stereo.mean(0)
    assert (label_distributions(model, stereo, SR) - label_distributions(model, mono, SR)).abs().max() <= 1e-6
    # the same sound at 16 kHz: resampled to 32 kHz, band-limited to 8 kHz, so close but not equal
    low = sounds(2.5, 16_000)["tone"]
    at16 = label_distributions(model, low, 16_000)
    assert at16.shape == (2, 527)
    assert kl_divergence(at16, label_distributions(model, s["tone"], SR)).max() < 0.5


def test_kl_divergence_formula():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(4, 527, generator=g), -1)
    q = torch.softmax(3 * torch.randn(4, 527, generator=g), -1)
    p[0, :200] = 0
    p[0] /= p[0].sum()
    pd, qd = p.double(), q.double()
    expected = torch.where(pd > 0, pd * (pd.clamp_min(1e-300).log() - (qd + 1e-6).log()), 0.0).sum(-1)
    assert torch.allclose(kl_divergence(q, p).double(), expected, rtol=1e-5)
    # only the eps: -sum p log(1 + eps / p) ~ -eps * (labels with p > 0), slightly below 0
    assert -1e-3 < kl_divergence(p, p).min() and kl_divergence(p, p).max() <= 0
    with pytest.raises(ValueError, match="one shape"):
        kl_divergence(p, q[:, :10])


def test_metric_averages_over_segment_pairs(model):
    a, b = sounds(5.0), sounds(5.0, seed=1)
    pairs = [(a["noise"][:, :160_000], a["tone"][:, :160_000]),  # 5 s: 3 segment pairs
             (a["clicks"][:, :40_000], b["noise"][:, :40_000])]  # 1.25 s: 1 pair
    metric = KLDivergence(model)
    values = [metric.add(g, r, SR) for g, r in pairs]
    assert [v["kld_pq"].shape[0] for v in values] == [3, 1] and metric.count == 4
    pq = torch.cat([kl_divergence(label_distributions(model, g, SR), label_distributions(model, r, SR))
                    for g, r in pairs])
    qp = torch.cat([kl_divergence(label_distributions(model, r, SR), label_distributions(model, g, SR))
                    for g, r in pairs])
    out = metric.compute()
    assert out["kld"] == out["kld_pq"] == pytest.approx(pq.mean().item(), rel=1e-5)  # not a mean of clip means
    assert out["kld_qp"] == pytest.approx(qp.mean().item(), rel=1e-5)
    assert out["kld_both"] == pytest.approx(out["kld_pq"] + out["kld_qp"])
    assert out["kld"] > 0.5  # different sounds
    same = KLDivergence(model)
    same.add(a["tone"], a["tone"].clone(), SR)
    assert same.compute()["kld"] < 1e-3
    metric.reset()
    with pytest.raises(ValueError, match="no clip pairs"):
        metric.compute()


def test_metric_crops_to_the_shorter_clip(model):
    s = sounds(5.0)
    long, short = s["noise"], s["tone"][:, :100_000]  # 5 s and 3.125 s
    cropped = KLDivergence(model)
    cropped.add(long, short, SR)
    explicit = KLDivergence(model)
    explicit.add(long[:, :100_000], short, SR)
    assert cropped.count == explicit.count == 2
    assert cropped.compute() == pytest.approx(explicit.compute(), rel=1e-6)
    # the reference at another rate: both are cropped at 32 kHz, after resampling
    mixed = KLDivergence(model)
    mixed.add(long, sounds(3.125, 16_000)["tone"], SR, reference_sample_rate=16_000)
    assert mixed.count == 2


def test_add_probs(model):
    p = torch.softmax(torch.randn(3, 527), -1)
    metric = KLDivergence(model)
    metric.add_probs(p, p.roll(1, 0))
    assert metric.count == 3
    with pytest.raises(ValueError, match="one shape"):
        metric.add_probs(p, p[:2])


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match=r"more than 0.15 s \(4800 samples\)"):
        label_distributions(model, torch.zeros(1, 4800), SR)
    with pytest.raises(ValueError, match=r"more than 0.15 s"):
        label_distributions(model, torch.zeros(1, 3300), 22_050)  # 0.1497 s
    with pytest.raises(ValueError, match="at least one patch of 16 frames, 4801 samples"):
        model.logits(torch.zeros(1, 4800))
    assert model.logits(torch.zeros(1, 4801)).shape == (1, 527)
    nan = sounds(1.0)["noise"].clone()
    nan[0, 100] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        label_distributions(model, nan, SR)
    with pytest.raises(ValueError, match="generated holds 1 NaN"):
        KLDivergence(model).add(nan, sounds(1.0)["tone"], SR)
    with pytest.raises(ValueError, match="NaN"):
        model.logits(nan)
    for rate in (0, -32_000, 44_100.0, True):
        with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
            label_distributions(model, sounds(1.0)["tone"], rate)
    with pytest.raises(ValueError, match="resample it first"):
        model.logits(sounds(1.0, 44_100)["tone"], 44_100)
    with pytest.raises(ValueError, match="one clip"):
        label_distributions(model, torch.zeros(2, 1, 32_000), SR)
    with pytest.raises(ValueError, match="empty"):
        label_distributions(model, torch.zeros(1, 0), SR)
    with pytest.raises(ValueError, match="floating-point"):
        label_distributions(model, torch.zeros(1, 32_000, dtype=torch.int16), SR)
    with pytest.raises(ValueError, match=r"mel must be \(B, 128, T\)"):
        model(torch.zeros(1, 64, 100))
    with pytest.raises(ValueError, match="this model takes 1 to 20"):
        model(torch.zeros(1, 128, 16 + 20 * 10))  # 21 time patches, 20 positions
