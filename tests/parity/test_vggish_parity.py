"""VGGish against torchvggish 0.2 (harritaylor/torchvggish, the port fadtk and frechet-audio-distance load).

Model: torchvggish's own `VGG` module (its `features` / `embeddings` nn.Sequentials and its forward, with the
NHWC flatten) with random weights, saved with torch.save into a torch hub checkpoints folder under torchvggish's
file names, next to a PCA file in its layout, and loaded by `VGGish.from_pretrained`. The weights are He-normal
rather than PyTorch's default init (under which the activations shrink layer by layer and every clip embeds
alike); the PCA is fitted loosely to them so that the quantised values spread over 0..255. Fast: the official
block structure at the tiny widths (their `VGG` built on the meta device, its two Sequentials replaced by ones
of the same layout at the tiny widths); `-m slow`: torchvggish's own `_vgg()`, the official size (72 M).
torchvggish's `Postprocessor` reads the PCA file from the same folder, through torch hub, offline.

Front-end: `waveform_to_examples` (float32 output) and its float64 `mel_features` functions; Google's framing
(google-research frechet_audio_distance `audioset_model.py`, `extract_features`: peak normalisation, 1 s
windows every 0.5 s) restated here on top of torchvggish's `mel_features`, which is Google's file.

Tolerances: examples max abs <= 1e-6 against torchvggish's float32 examples and <= 1e-9 against its float64
functions; embeddings (pre-activation, ReLU, PCA before quantisation) max abs <= 1e-4. The 8-bit quantisation
rounds (x + 2) * 255 / 4: where our unrounded value lies within 1e-3 of a half-integer, float round-off may put
the two sides on different integers, so there the test allows a difference of exactly one step; everywhere else
the quantised values must be equal, and the test asserts that such boundary cases are rare (<= 1 %).
"""

import numpy as np
import pytest
import torch
from torch import nn

torchvggish = pytest.importorskip("torchvggish")
from torchvggish import mel_features, vggish_input  # noqa: E402
from torchvggish import torchvggish as tv  # noqa: E402
from vggish_fixtures import calibration_clips, fit_pca, he_init_  # noqa: E402

from musiclm_core.convert import vggish as convert  # noqa: E402
from musiclm_core.vggish import (PRESETS, VGGish, VGGishEmbedding, log_mel,  # noqa: E402
                                 waveform_to_examples)

SR = 16_000
ATOL = 1e-4
HALF_STEP_BAND = 1e-3


def _clip(seconds: float, seed: int) -> torch.Tensor:
    """Noise plus two tones, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(round(seconds * SR))) / SR
    f = 100.0 + 700.0 * seed
    return 0.1 * torch.randn(t.shape, generator=g) + 0.3 * torch.sin(2 * torch.pi * f * t) \
        + 0.2 * torch.sin(2 * torch.pi * 2.5 * f * t)


def _their_layers(channels) -> nn.Sequential:
    """torchvggish's `make_layers` layout (conv, relu, [pool]) at the given widths."""
    layers, c_in = [], 1
    for v in (channels[0], "M", channels[1], "M", channels[2], channels[2], "M", channels[3], channels[3], "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers)


def _their_vgg(preset: str) -> nn.Module:
    """torchvggish's VGG without postprocessing: `_vgg()` for the official size, else its class with the two
    Sequentials at the preset's widths."""
    if preset == "official":
        ref = tv._vgg(postprocess=False)
    else:
        config = PRESETS[preset]
        with torch.device("meta"):  # their __init__ makes the official 4096-wide layers; not worth allocating
            ref = tv.VGG(nn.Sequential(), postprocess=False)
        ref.features = _their_layers(config.channels)
        ref.embeddings = nn.Sequential(
            nn.Linear(config.channels[-1] * 6 * 4, config.fc_dims[0]), nn.ReLU(True),
            nn.Linear(config.fc_dims[0], config.fc_dims[1]), nn.ReLU(True),
            nn.Linear(config.fc_dims[1], config.embedding_dim), nn.ReLU(True))
    he_init_(ref, seed=3)
    return ref.eval()


def _pair(preset, tmp_path_factory):
    """(ours, theirs with its Postprocessor), both from one hub checkpoints folder."""
    hub = tmp_path_factory.mktemp(f"hub_{preset}")
    checkpoints = hub / "checkpoints"
    checkpoints.mkdir()
    ref = _their_vgg(preset)
    with torch.inference_mode():
        examples = torch.cat([vggish_input.waveform_to_examples(c.double().numpy(), SR).detach()
                              for c in calibration_clips()])
        pre = nn.Sequential(*list(ref.embeddings.children())[:-1])
        embeddings = pre(ref.features(examples).permute(0, 2, 3, 1).flatten(1))
    torch.save(ref.state_dict(), checkpoints / convert.WEIGHTS_FILE)
    torch.save(fit_pca(embeddings, seed=4), checkpoints / convert.PCA_FILE)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        ours = VGGish.from_pretrained()  # the default place: torch hub's checkpoints folder
        ref.postprocess, ref.pproc = True, tv.Postprocessor()  # reads the PCA file there, as torchvggish does
    finally:
        torch.hub.set_dir(old)
    return ours, ref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _pair("tiny", tmp_path_factory)


def _theirs(ref, wav: torch.Tensor, *, activation: bool, postprocess: bool) -> torch.Tensor:
    """torchvggish from a waveform: waveform_to_examples, then its VGG forward, optionally without the last ReLU
    (fadtk's use_activation=False) and without the Postprocessor."""
    examples = vggish_input.waveform_to_examples(wav.double().numpy(), SR).detach()
    embeddings, saved = ref.embeddings, (ref.postprocess, ref.embeddings)
    try:
        if not activation:
            ref.embeddings = nn.Sequential(*list(embeddings.children())[:-1])
        ref.postprocess = postprocess
        with torch.inference_mode():
            return ref(examples)
    finally:
        ref.postprocess, ref.embeddings = saved


# ----- the front-end


@pytest.mark.parametrize("seconds", [0.975, 1.0, 2.9, 3.3, 10.0])
def test_examples_match_waveform_to_examples(seconds):
    wav = _clip(seconds, seed=1)
    ours = waveform_to_examples(wav, PRESETS["official"], "fadtk")  # (n, 96, 64) float64
    theirs = vggish_input.waveform_to_examples(wav.double().numpy(), SR).detach()[:, 0]  # float32
    assert ours.shape == theirs.shape
    assert (ours - theirs.double()).abs().max() <= 1e-6
    # and against their float64 functions, before the float32 cast
    mel64 = mel_features.log_mel_spectrogram(wav.double().numpy(), audio_sample_rate=SR, log_offset=0.01,
                                             window_length_secs=0.025, hop_length_secs=0.010, num_mel_bins=64,
                                             lower_edge_hertz=125, upper_edge_hertz=7500)
    framed = mel_features.frame(mel64, window_length=96, hop_length=96)
    assert np.abs(ours.numpy() - framed).max() <= 1e-9
    full = log_mel(wav, PRESETS["official"])
    assert np.abs(full.numpy() - mel64).max() <= 1e-9


def _google_examples(int16: np.ndarray) -> np.ndarray:
    """google-research frechet_audio_distance AudioSetModel.extract_features with its defaults (normalize=True,
    step_size 8000 from create_embeddings_main), on the integer samples scipy.io.wavfile reads from a 16-bit wav,
    restated on torchvggish's copy of Google's mel_features."""
    x = int16.astype(np.float64)
    x /= np.maximum(0.1, np.amax(x))
    out = []
    for i in range(0, x.shape[0] - SR + 1, 8000):
        mel = mel_features.log_mel_spectrogram(x[i:i + SR], audio_sample_rate=SR, log_offset=0.01,
                                               window_length_secs=0.025, hop_length_secs=0.010, num_mel_bins=64,
                                               lower_edge_hertz=125, upper_edge_hertz=7500)
        out.append(mel_features.frame(mel, window_length=96, hop_length=96))
    return np.concatenate(out)


@pytest.mark.parametrize("seconds", [1.0, 1.4999, 1.5, 3.7, 10.0])
def test_google_framing_matches_the_tf_fad_tool(seconds):
    wav = _clip(seconds, seed=2)
    int16 = np.clip(np.round(wav.double().numpy() * 32768), -32768, 32767).astype(np.int16)
    ours = waveform_to_examples(torch.from_numpy(int16 / 32768.0), PRESETS["official"], "google")
    theirs = _google_examples(int16)
    assert ours.shape == theirs.shape  # (N - 16000) // 8000 + 1 examples
    assert np.abs(ours.numpy() - theirs).max() <= 1e-9
    # the normalisation took effect: a quieter copy gives the same examples, to round-off
    quiet = waveform_to_examples(torch.from_numpy(int16 / 32768.0 * 0.25), PRESETS["official"], "google")
    assert (quiet - ours).abs().max() <= 1e-9


# ----- the network and the PCA


def _check_quantised(ours_q, theirs_q, ours_unrounded):
    diff = (ours_q - theirs_q).abs()
    assert diff.max() <= 1.0
    near_half = ((ours_unrounded - ours_unrounded.floor()) - 0.5).abs() <= HALF_STEP_BAND
    assert bool((diff[~near_half] == 0).all()), "quantised values differ away from a rounding boundary"
    assert near_half.float().mean() <= 0.01
    inside = ((theirs_q > 0) & (theirs_q < 255)).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of the quantised values are off the clip rails: the PCA is not fitted"


def _compare(ours: VGGish, ref, wav: torch.Tensor):
    fadtk = VGGishEmbedding(ours, "test", convention="fadtk")(wav[None])
    theirs = _theirs(ref, wav, activation=False, postprocess=False)
    assert fadtk.shape == theirs.shape
    assert (fadtk - theirs).abs().max() <= ATOL

    relu = ours.embed(wav, SR, convention="fadtk").relu()
    theirs_relu = _theirs(ref, wav, activation=True, postprocess=False)
    assert (relu - theirs_relu).abs().max() <= ATOL

    # The PCA before quantisation, with their stored parameters (torchvggish's Postprocessor attributes).
    pca = (relu - ours.pca_means) @ ours.pca_matrix.T
    their_pca = torch.mm(ref.pproc._pca_matrix, theirs_relu.T - ref.pproc._pca_means).T
    assert (pca - their_pca).abs().max() <= ATOL

    quantised = VGGishEmbedding(ours, "test", convention="torchvggish")(wav[None])
    theirs_q = _theirs(ref, wav, activation=True, postprocess=True)
    _check_quantised(quantised, theirs_q, (pca.clamp(-2, 2) + 2) * 255 / 4)
    return fadtk


def test_embeddings_match_torchvggish(tiny):
    ours, ref = tiny
    a = _compare(ours, ref, _clip(4.0, seed=1))
    b = _compare(ours, ref, _clip(4.0, seed=2))
    # the fixture listens: different audio, different embeddings (by far more than the tolerance)
    assert (a - b).abs().max() > 1000 * ATOL


def test_their_postprocessor_read_our_fixture_folder(tiny):
    """Their PCA parameters are ours: the folder holds torchvggish's layout under its file names."""
    ours, ref = tiny
    assert torch.allclose(ref.pproc._pca_matrix, ours.pca_matrix, atol=1e-7)
    assert torch.allclose(ref.pproc._pca_means[:, 0], ours.pca_means, atol=1e-7)


def test_fixture_checkpoint_loads_into_their_layout(tmp_path):
    """tests/vggish_fixtures.py writes keys and shapes their module loads strictly."""
    from vggish_fixtures import write_vggish_checkpoint

    folder = write_vggish_checkpoint(tmp_path, tiny=True)
    ref = _their_vgg("tiny")
    ref.load_state_dict(torch.load(folder / convert.WEIGHTS_FILE, weights_only=True), strict=True)
    pca = torch.load(folder / convert.PCA_FILE, weights_only=False)
    assert set(pca) == {"pca_eigen_vectors", "pca_means"}
    assert pca["pca_eigen_vectors"].shape == (128, 128) and pca["pca_means"].shape == (128,)
    ours = VGGish.from_pretrained(folder)
    wav = _clip(2.0, seed=5)
    assert (ours.embed(wav, SR, convention="fadtk") - _theirs(ref, wav, activation=False, postprocess=False)
            ).abs().max() <= ATOL


@pytest.mark.slow
def test_official_size_matches_torchvggish(tmp_path_factory):
    ours, ref = _pair("official", tmp_path_factory)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    a = _compare(ours, ref, _clip(3.0, seed=1))
    b = _compare(ours, ref, _clip(3.0, seed=2))
    assert (a - b).abs().max() > 1000 * ATOL
