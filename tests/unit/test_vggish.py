"""VGGish at the tiny preset: the front-end against its definition, the framing of each convention, the PCA,
bad input, the evaluation adapter's protocol, loading torchvggish's files (strict keys, numpy or tensor PCA,
missing files). Parity with torchvggish is in tests/parity/test_vggish_parity.py.
"""

import math

import numpy as np
import pytest
import torch
from vggish_fixtures import calibration_clips, write_vggish_checkpoint

from musiclm_core.audio import resample
from musiclm_core.convert import vggish as convert
from musiclm_core.hub import CheckpointError
from musiclm_core.vggish import (CONVENTIONS, PRESETS, VGGish, VGGishConfig, VGGishEmbedding, example_count,
                                 log_mel, mel_matrix, min_samples, waveform_to_examples)

SR = 16_000
CFG = PRESETS["official"]  # the front-end is the same in every preset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_vggish_checkpoint(tmp_path_factory.mktemp("vggish"), tiny=True)


@pytest.fixture(scope="module")
def model(folder):
    return VGGish.from_pretrained(folder)


def _tone(seconds: float, hz: float = 440.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(round(seconds * SR))) / SR
    return amp * torch.sin(2 * torch.pi * hz * t)


# ----- the front-end


def test_mel_matrix_is_htk_triangles_over_125_to_7500_hz():
    weights = mel_matrix(SR, 512, 64, 125.0, 7500.0)  # (257, 64)
    hz = torch.linspace(0, SR / 2, 257, dtype=torch.float64)
    assert weights.shape == (257, 64) and weights.dtype == torch.float64
    assert (weights[0] == 0).all()  # the DC bin is left out
    assert (weights[(hz <= 125) | (hz >= 7500)] == 0).all()
    assert (weights <= 1).all() and weights.max(0).values.min() > 0.5  # peak-1 triangles, each band hit
    # band centres increase, and sit where the HTK mel scale puts them
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    edges = np.linspace(mel(125), mel(7500), 66)
    centre_hz = 700 * (np.exp(edges[1:-1] / 1127) - 1)
    peak_hz = hz[weights.argmax(0)].numpy()
    assert np.all(np.diff(peak_hz) >= 0)
    assert np.abs(peak_hz - centre_hz).max() <= SR / 512  # within one FFT bin


def test_log_mel_of_silence_is_the_offset_and_a_tone_lands_in_its_band():
    silence = log_mel(torch.zeros(SR), CFG)
    assert silence.shape == (1 + (SR - 400) // 160, 64)
    assert torch.allclose(silence, torch.full_like(silence, math.log(0.01)))
    tone = log_mel(_tone(1.0, 1000.0), CFG)
    band = int(mel_matrix(SR, 512, 64, 125.0, 7500.0)[32].argmax())  # 1000 Hz is FFT bin 32
    assert int(tone.mean(0).argmax()) == band


def test_example_counts_at_the_boundaries():
    google, fadtk = CONVENTIONS["google"], CONVENTIONS["fadtk"]
    assert [example_count(n, CFG, google) for n in (15_999, 16_000, 23_999, 24_000, 160_000)] == [0, 1, 1, 2, 19]
    one = CFG.example_samples  # 95 hops + one 400-sample window
    assert one == 15_600
    step = 96 * 160
    assert [example_count(n, CFG, fadtk) for n in (one - 1, one, one + step - 1, one + step, 160_000)] == \
        [0, 1, 1, 2, 10]
    assert min_samples(CFG, google) == 16_000 and min_samples(CFG, fadtk) == 15_600
    for n in (16_000, 17_000, 39_000, 56_000):  # the examples fit in the frames of the clip
        for c in (google, fadtk):
            assert waveform_to_examples(torch.randn(n), CFG, c).shape == (example_count(n, CFG, c), 96, 64)


def test_google_examples_are_every_50_frames_of_the_peak_normalised_clip():
    wav = 0.3 * torch.randn(3 * SR)
    examples = waveform_to_examples(wav, CFG, "google")  # (5, 96, 64)
    mel = log_mel(wav.double() / wav.double().max(), CFG)
    for i in range(examples.shape[0]):
        assert torch.allclose(examples[i], mel[50 * i: 50 * i + 96], atol=1e-12)
    plain = waveform_to_examples(wav, CFG, "fadtk")  # non-overlapping, not normalised
    assert torch.allclose(plain[1], log_mel(wav, CFG)[96:192], atol=1e-12)


def test_peak_normalisation_uses_the_positive_maximum_with_a_floor():
    wav = 0.3 * torch.randn(2 * SR, dtype=torch.float64)  # float64: a gain of 0.1 is then exact to 1e-16
    ref = waveform_to_examples(wav, CFG, "google")
    assert (waveform_to_examples(0.1 * wav, CFG, "google") - ref).abs().max() < 1e-9  # gain does not matter
    assert (waveform_to_examples(0.1 * wav, CFG, "fadtk") - waveform_to_examples(wav, CFG, "fadtk")).abs().max() > 1
    # a clip with no positive sample is divided by the floor (0.1 of a 16-bit step), as the TF tool does
    negative = -wav.abs() * 1e-6
    expected = log_mel(negative / (0.1 / 32768), CFG)[:96]
    assert torch.allclose(waveform_to_examples(negative, CFG, "google")[0], expected, atol=1e-9)


# ----- the network and the PCA


def test_postprocess_is_pca_clip_and_8_bit_quantisation(model):
    e = torch.randn(50, 128) * 3
    # vggish_postprocess.py's arithmetic in float64 numpy: PCA on columns, clip, scale to 0..255, round
    pca = model.pca_matrix.double().numpy() @ (e.double().numpy().T - model.pca_means.double().numpy()[:, None])
    unrounded = (np.clip(pca.T, -2, 2) + 2) * 255 / 4
    diff = np.abs(model.postprocess(e).numpy() - np.round(unrounded))
    near_half = np.abs(unrounded - np.floor(unrounded) - 0.5) <= 1e-3  # float32 may round these either way
    assert diff.max() <= 1 and (diff[~near_half] == 0).all()
    assert 0.3 < ((unrounded > 0) & (unrounded < 255)).mean() < 1  # some clipped, most not
    fresh = VGGish(PRESETS["tiny"])  # identity PCA: only clip and quantise
    assert fresh.postprocess(torch.tensor([[-3.0, -2.0, 0.0, 2.0, 3.0] + [0.0] * 123]))[0, :5].tolist() == \
        [0.0, 0.0, 128.0, 255.0, 255.0]


def test_fixture_listens_and_its_pca_spreads(model):
    clips = calibration_clips()
    embeds = [model.embed(c, SR) for c in clips]
    for i in range(len(clips)):
        for j in range(i + 1, len(clips)):
            assert (embeds[i].mean(0) - embeds[j].mean(0)).abs().max() > 0.1
    quantised = torch.cat([model.embed(c, SR, convention="torchvggish") for c in clips])
    assert ((quantised > 0) & (quantised < 255)).float().mean() > 0.5


def test_batching_does_not_change_the_embeddings(model):
    wav = 0.2 * torch.randn(6 * SR)
    full = model.embed(wav, SR, batch_size=64)
    assert full.shape == (11, 128)
    assert (model.embed(wav, SR, batch_size=3) - full).abs().max() <= 1e-5


def test_relu_convention_is_the_relu_of_the_embedding(model):
    wav = 0.2 * torch.randn(3 * SR)
    pre = model.embed(wav, SR, convention="fadtk")
    assert (pre < 0).any()  # pre-activation: the TF model's `vggish/embedding`
    from musiclm_core.vggish import Convention

    relu = Convention(hop_frames=96, window_samples=None, peak_normalize=False, activation=True, postprocess=False)
    assert torch.allclose(model.embed(wav, SR, convention=relu), pre.relu())


# ----- bad input


def test_too_short_clip_says_its_length_and_the_minimum(model):
    with pytest.raises(ValueError, match=r"15999 samples \(1\.000 s.*16000 samples"):
        model.embed(torch.randn(15_999), SR)
    with pytest.raises(ValueError, match=r"15599 samples.*15600 samples"):
        model.embed(torch.randn(15_599), SR, convention="fadtk")


def test_nan_wrong_rate_and_channels_are_refused(model):
    wav = torch.randn(2 * SR)
    wav[100] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        model.embed(wav, SR)
    with pytest.raises(ValueError, match=r"16000 Hz audio, got 44100 Hz: resample"):
        model.embed(torch.randn(44_100), 44_100)
    with pytest.raises(ValueError, match=r"mono audio shaped \(N,\) or \(1, N\), got \(2, 32000\)"):
        model.embed(torch.randn(2, 2 * SR), SR)
    with pytest.raises(ValueError, match="floating-point"):
        model.embed(torch.ones(2 * SR, dtype=torch.int16), SR)
    with pytest.raises(ValueError, match="unknown VGGish convention 'tf'"):
        model.embed(torch.randn(2 * SR), SR, convention="tf")
    with pytest.raises(ValueError, match=r"\(B, 96, 64\) log-mel examples, got \(2, 64, 96\)"):
        model(torch.randn(2, 64, 96))
    # the remedy works: resampled audio is accepted
    assert model.embed(resample(torch.randn(44_100), 44_100, SR), SR).shape == (1, 128)


def test_config_checks():
    with pytest.raises(ValueError, match="4 widths"):
        VGGishConfig(channels=(8, 8))
    with pytest.raises(ValueError, match="multiples of 16"):
        VGGishConfig(example_frames=100)
    with pytest.raises(ValueError, match="f_max"):
        VGGishConfig(f_max=9000.0)


# ----- the evaluation adapter


def test_embedding_adapter_protocol(model):
    embedding = VGGishEmbedding(model, "/models/vggish")
    assert (embedding.kind, embedding.name, embedding.dim, embedding.sample_rate, embedding.channels) == \
        ("vggish", "vggish:/models/vggish", 128, 16_000, 1)
    out = embedding(0.2 * torch.randn(1, 10 * SR))
    assert out.shape == (19, 128) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert VGGishEmbedding(model, "m", convention="fadtk").name == "vggish-fadtk:m"
    assert embedding.min_samples() == 16_000
    with pytest.raises(ValueError, match="too short for VGGish"):
        embedding(torch.randn(1, 8000))
    with pytest.raises(ValueError, match="unknown VGGish convention"):
        VGGishEmbedding(model, "m", convention="audioset")


def test_embedding_adapter_follows_the_models_dtype(folder):
    half = VGGish.from_pretrained(folder, dtype=torch.bfloat16)
    out = VGGishEmbedding(half, "m")(0.2 * torch.randn(1, 2 * SR))
    assert out.dtype == torch.float32 and out.shape == (3, 128)


# ----- loading torchvggish's files


def test_default_folder_is_torch_hubs_checkpoints(folder, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        VGGish.from_pretrained()
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / convert.WEIGHTS_FILE) in message
    assert convert.WEIGHTS_URL in message and convert.PCA_URL in message
    (tmp_path / "checkpoints").mkdir()
    for name in (convert.WEIGHTS_FILE, convert.PCA_FILE):
        (tmp_path / "checkpoints" / name).write_bytes((folder / name).read_bytes())
    wav = 0.2 * torch.randn(2 * SR)
    assert torch.equal(VGGish.from_pretrained().embed(wav, SR), VGGish.from_pretrained(folder).embed(wav, SR))


def test_explicit_files_and_a_tensor_pca(folder, tmp_path):
    pca = torch.load(folder / convert.PCA_FILE, weights_only=False)  # numpy arrays, as written
    assert isinstance(pca["pca_means"], np.ndarray)
    tensors = {"pca_eigen_vectors": torch.from_numpy(pca["pca_eigen_vectors"]).float(),
               "pca_means": torch.from_numpy(pca["pca_means"]).float()[:, None]}  # a (128, 1) column
    torch.save(tensors, tmp_path / "pca.pth")
    a = VGGish.from_pretrained(folder / convert.WEIGHTS_FILE, pca=tmp_path / "pca.pth")
    b = VGGish.from_pretrained(folder)
    assert torch.allclose(a.pca_means, b.pca_means) and torch.allclose(a.pca_matrix, b.pca_matrix)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        VGGish.from_pretrained(tmp_path / "absent")


def _write(tmp_path, weights, pca):
    torch.save(weights, tmp_path / convert.WEIGHTS_FILE)
    torch.save(pca, tmp_path / convert.PCA_FILE)
    return tmp_path


def test_strict_keys(folder, tmp_path):
    weights = torch.load(folder / convert.WEIGHTS_FILE, weights_only=True)
    pca = torch.load(folder / convert.PCA_FILE, weights_only=False)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+features\.99\.weight"):
        VGGish.from_pretrained(_write(tmp_path, {**weights, "features.99.weight": torch.zeros(1)}, pca))
    without = {k: v for k, v in weights.items() if k != "features.8.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+blocks\.2\.1\.bias"):
        VGGish.from_pretrained(_write(tmp_path, without, pca))
    bad = {**weights, "embeddings.0.weight": torch.zeros(32, 100)}
    with pytest.raises(CheckpointError, match=r"fc1\.weight: checkpoint \(32, 100\), model \(32, 384\)"):
        VGGish.from_pretrained(_write(tmp_path, bad, pca))
    with pytest.raises(CheckpointError, match="unexpected keys.*\n.*pca_scale"):
        VGGish.from_pretrained(_write(tmp_path, weights, {**pca, "pca_scale": np.ones(3)}))
    torch.save({"pca_means": "x"}, tmp_path / convert.PCA_FILE)
    with pytest.raises(CheckpointError, match="pca_means is str"):
        VGGish.from_pretrained(tmp_path)
    (tmp_path / convert.WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        VGGish.from_pretrained(tmp_path)


def test_round_trip_through_torchvggish_layout(model, tmp_path):
    weights, pca = convert.torchvggish_state(model)
    assert sorted(weights) == sorted(theirs for theirs, _ in convert.TABLE)
    again = VGGish.from_pretrained(_write(tmp_path, weights, pca))
    wav = 0.2 * torch.randn(2 * SR)
    assert torch.equal(again.embed(wav, SR, convention="torchvggish"), model.embed(wav, SR, convention="torchvggish"))
