"""AutoencoderKL (musiclm_core/vae.py) on its tiny preset: shapes, the CPU inference routes against the plain
torch ops, the posterior, bad input, the native format and the diffusers config translation. Parity with diffusers
itself is tests/parity/test_vae_parity.py.

Tolerance between computation paths (fast CPU routes vs torch's ops): max abs 1e-4 on outputs of order 1-10.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from musiclm_core.convert.vae import config_from_diffusers
from musiclm_core.hub import CheckpointError
from musiclm_core.kernels import winograd
from musiclm_core.vae import PRESETS, AutoencoderKL, DiagonalGaussian, Upsample, VAEConfig, upsample_conv_weights

ATOL = 1e-4

# cvssp/audioldm2 vae/config.json as specs/ldm.md §4.1 lists it.
AUDIOLDM2_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.21.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3, "force_upcast": True,
    "in_channels": 1, "latent_channels": 8, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 1,
    "sample_size": 1024, "scaling_factor": 0.4110932946205139, "up_block_types": ["UpDecoderBlock2D"] * 3,
}


def tiny_model(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(PRESETS["tiny"]).eval()
    with torch.no_grad():  # off torch's init (GroupNorm 1/0 included), so every parameter matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_shapes(model):
    config = model.config
    assert config.downsample_factor == 2 and config.latent_bins == 8
    mel = torch.randn(2, 1, 12, 16)
    with torch.no_grad():
        posterior = model.encode(mel)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 8, 6, 8)
        assert model.decode(posterior.mean).shape == (2, 1, 12, 16)
        # An odd T loses its last frame at the down-sampling (diffusers' pad-right-then-stride-2 rounds down).
        assert model.encode(torch.randn(1, 1, 13, 16)).mean.shape == (1, 8, 6, 8)
        assert model(mel).shape == (2, 1, 12, 16)


def test_cpu_routes_match_torch_ops(model):
    """Inference on the CPU takes the channels-last convolutions and the sub-pixel upsampling; with gradients on
    the model runs torch's plain NCHW ops. Both give the same numbers."""
    mel = torch.randn(2, 1, 10, 16)
    z = torch.randn(2, 8, 5, 8)
    with torch.no_grad():
        fast_mean, fast_mel = model.encode(mel).mean, model.decode(z)
    plain_mean, plain_mel = model.encode(mel).mean.detach(), model.decode(z).detach()  # grad enabled
    assert (fast_mean - plain_mean).abs().max() <= ATOL
    assert (fast_mel - plain_mel).abs().max() <= ATOL
    assert plain_mel.abs().max() > 0.5  # outputs of order 1: the tolerance means something
    assert fast_mel.is_contiguous()


@pytest.fixture
def conv_route(monkeypatch):
    """Set MUSICLM_CONV3X3 for one test, with the Winograd routes taken from 6 channels (a tiny model stands
    for the official one); route() is read once per process, its cache is cleared around the test."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", {2: 6, 4: 6})
    monkeypatch.setattr(winograd, "MIN_CHANNELS_THREADED", 6)

    def set_route(value: str):
        monkeypatch.setenv(winograd.ENV, value)
        winograd.route.cache_clear()
    yield set_route
    winograd.route.cache_clear()


@pytest.mark.parametrize("route", ["winograd", "conv"])
@pytest.mark.parametrize("H, W", [(1, 1), (3, 5), (8, 16)])
def test_upsample_routes(H, W, route, conv_route, monkeypatch):
    """Upsample on the CPU without gradients: F(2x2, 3x3) on the upsampled image (winograd.upsample_conv3x3)
    under the Winograd routes, the folded sub-pixel convolution under "conv"; both against interpolate + conv."""
    conv_route(route)
    calls = []
    real = winograd.upsample_conv3x3
    monkeypatch.setattr(winograd, "upsample_conv3x3", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, H, W)
    expected = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    with torch.no_grad():
        out = up(x)
    assert out.shape == (2, 6, 2 * H, 2 * W)
    assert (out - expected).abs().max() <= 1e-5
    assert len(calls) == (route == "winograd")
    assert upsample_conv_weights(up.conv.weight).shape == (24, 6, 2, 2)


@pytest.mark.parametrize("route", ["winograd", "winograd2", "winograd4"])
def test_winograd_routes_match_torch_ops(route, conv_route, monkeypatch):
    """The tiny model with the 3x3 convs of its 32- and 64-channel stages on the Winograd routes (by default
    F(4x4) from 64 channels and F(2x2) from 32 here, or one tile size forced) and the upsampling by
    upsample_conv3x3, against torch's plain ops (gradients on): max abs 1e-4 (outputs of order 1-10)."""
    conv_route(route)
    monkeypatch.setattr(winograd, "MIN_CHANNELS", {2: 32, 4: 64} if route == "winograd" else {2: 32, 4: 32})
    upsampled = []
    real_up = winograd.upsample_conv3x3
    monkeypatch.setattr(winograd, "upsample_conv3x3", lambda *a, **k: upsampled.append(1) or real_up(*a, **k))
    tiles = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, U, *a, **k: tiles.append(U.shape[0]) or real(x, U, *a, **k))
    model = tiny_model(1)
    mel = torch.randn(2, 1, 24, 16)
    z = torch.randn(2, 8, 12, 8)
    with torch.no_grad():
        fast_mean, fast_mel = model.encode(mel).mean, model.decode(z)
    plain_mean, plain_mel = model.encode(mel).mean.detach(), model.decode(z).detach()  # grad enabled
    expected = {"winograd": {16, 36}, "winograd2": {16}, "winograd4": {36}}[route]
    assert set(tiles) == expected and upsampled
    assert (fast_mean - plain_mean).abs().max() <= ATOL
    assert (fast_mel - plain_mel).abs().max() <= ATOL
    assert plain_mel.abs().max() > 0.5


def test_posterior():
    torch.manual_seed(0)
    moments = torch.randn(2, 16, 3, 4) * 5
    moments[0, 8, 0, 0], moments[0, 9, 0, 0] = 100.0, -100.0  # log-variances outside [-30, 20]
    posterior = DiagonalGaussian(moments)
    assert torch.equal(posterior.mean, moments[:, :8]) and torch.equal(posterior.mode(), moments[:, :8])
    assert posterior.logvar[0, 0, 0, 0] == 20.0 and posterior.logvar[0, 1, 0, 0] == -30.0
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    noise = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(posterior.sample(noise), posterior.mean + posterior.std * noise)
    a = posterior.sample(generator=torch.Generator().manual_seed(3))
    b = posterior.sample(generator=torch.Generator().manual_seed(3))
    c = posterior.sample(generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 0.1
    with pytest.raises(ValueError, match="shape"):
        posterior.sample(torch.randn(2, 8, 3, 5))
    with pytest.raises(ValueError, match="not both"):
        posterior.sample(noise, generator=torch.Generator())


def test_bad_input(model):
    with pytest.raises(ValueError, match=r"latents must be \(B, 8, T, 8\).*\(1, 4, 5, 8\)"):
        model.decode(torch.randn(1, 4, 5, 8))
    with pytest.raises(ValueError, match=r"latents must be \(B, 8, T, 8\).*\(1, 8, 5, 16\)"):
        model.decode(torch.randn(1, 8, 5, 16))
    with pytest.raises(ValueError, match=r"mel must be \(B, 1, T, 16\).*\(1, 1, 12, 64\)"):
        model.encode(torch.randn(1, 1, 12, 64))
    with pytest.raises(ValueError, match=r"mel must be \(B, 1, T, 16\).*\(1, 2, 12, 16\)"):
        model.encode(torch.randn(1, 2, 12, 16))
    with pytest.raises(ValueError, match=r"add the channel axis"):
        model.encode(torch.randn(1, 12, 16))
    with pytest.raises(ValueError, match="1 frames; this VAE needs at least 2"):
        model.encode(torch.randn(1, 1, 1, 16))
    with pytest.raises(ValueError, match="0 frames"):
        model.decode(torch.randn(1, 8, 0, 8))
    with pytest.raises(ValueError, match="empty batch"):
        model.decode(torch.randn(0, 8, 4, 8))
    mel = torch.randn(1, 1, 12, 16)
    mel[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="mel holds 1 NaN"):
        model.encode(mel)
    z = torch.randn(1, 8, 4, 8)
    z[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="latents holds 1 NaN or infinite"):
        model.decode(z)
    with pytest.raises(ValueError, match="floating point"):
        model.decode(torch.zeros(1, 8, 4, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.decode([[1.0]])


def test_native_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config == model.config and loaded.scaling_factor == 0.5
    z = torch.randn(1, 8, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=ATOL)
    # A pipeline folder (model_index.json) is read through its vae/ folder.
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MusicLDMPipeline"}))
    assert AutoencoderKL.from_pretrained(tmp_path).config == model.config
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "vae")


def test_presets_and_config():
    a, m = PRESETS["audioldm2"].to_dict(), PRESETS["musicldm"].to_dict()
    assert {k for k in a if a[k] != m[k]} == {"scaling_factor"}
    assert VAEConfig.from_dict(a) == PRESETS["audioldm2"]
    with pytest.raises(CheckpointError, match="unknown VAEConfig fields"):
        VAEConfig.from_dict(dict(a, attention_heads=8))
    with pytest.raises(CheckpointError, match="not divisible by norm_num_groups"):
        VAEConfig.from_dict(dict(a, block_out_channels=[100, 200]))
    with pytest.raises(ValueError, match="mel_bins 66"):
        VAEConfig(mel_bins=66)


def test_config_from_diffusers():
    assert config_from_diffusers(AUDIOLDM2_VAE_CONFIG) == PRESETS["audioldm2"]
    musicldm = dict(AUDIOLDM2_VAE_CONFIG, scaling_factor=1.075324296951294)
    assert config_from_diffusers(musicldm) == PRESETS["musicldm"]
    with pytest.raises(CheckpointError, match=r"does not know: \[.tile_size.\]"):
        config_from_diffusers(dict(AUDIOLDM2_VAE_CONFIG, tile_size=3))
    with pytest.raises(CheckpointError, match="act_fn = 'gelu' is not supported"):
        config_from_diffusers(dict(AUDIOLDM2_VAE_CONFIG, act_fn="gelu"))
    with pytest.raises(CheckpointError, match="use_quant_conv = False"):
        config_from_diffusers(dict(AUDIOLDM2_VAE_CONFIG, use_quant_conv=False))
    with pytest.raises(CheckpointError, match="down_block_types"):
        config_from_diffusers(dict(AUDIOLDM2_VAE_CONFIG, down_block_types=["DownEncoderBlock2D"] * 2))
    with pytest.raises(CheckpointError, match="is not an AutoencoderKL"):
        config_from_diffusers(dict(AUDIOLDM2_VAE_CONFIG, _class_name="AutoencoderTiny"))
