"""HiFi-GAN against transformers' `SpeechT5HifiGan`, on checkpoints it wrote with `save_pretrained`.

Tiny configs (fast): random weights moved off their initialisation (every parameter plus noise, the biases
non-zero, the mean / scale buffers random), loaded by `HifiGan.from_pretrained` from the transformers folder,
from a diffusers-style pipeline folder (`vocoder/` inside), from a pickled `pytorch_model.bin`, and from a file
saved with weight norm applied (`parametrizations.weight.original0/1`); batched and unbatched input, with and
without `normalize_before`; through torch's convolutions and through the FFT route (kernels/conv1d.py, forced
with MUSICLM_CONV1D=fft: the tiny configs are below the sizes at which "auto" takes it). The official config
(specs/ldm.md §5.1) runs under `-m slow`, where "auto" sends the larger residual-block convolutions to the FFT.

Tolerance: max abs <= 1e-4 on the waveform (fp32).
"""

import json
import shutil

import pytest
import torch

from musiclm_core.hifigan import HifiGan
from musiclm_core.kernels import conv1d

transformers = pytest.importorskip("transformers")
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig  # noqa: E402

ATOL = 1e-4

TINY = dict(model_in_dim=16, upsample_initial_channel=32, upsample_rates=[4, 3], upsample_kernel_sizes=[8, 7],
            resblock_kernel_sizes=[3, 5, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 2, 3], [1, 1, 2]])
OFFICIAL = dict(model_in_dim=64, upsample_initial_channel=1024, upsample_rates=[5, 4, 2, 2, 2],
                upsample_kernel_sizes=[16, 16, 8, 4, 4], resblock_kernel_sizes=[3, 7, 11],
                resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], leaky_relu_slope=0.1,
                normalize_before=False)


@torch.no_grad()
def make_reference(config_kwargs: dict, seed: int = 0, weight_norm: bool = False) -> SpeechT5HifiGan:
    torch.manual_seed(seed)
    model = SpeechT5HifiGan(SpeechT5HifiGanConfig(**config_kwargs)).eval()
    for name, p in model.named_parameters():
        # transformers initialises weights N(0, 0.01) and biases 0: far from a trained model, and the output is
        # ~0. Noise of each weight's fan-in scale keeps the signal of order 1 through the stages.
        fan_in = p[0].numel() if p.dim() > 1 else 1
        p.add_(torch.randn_like(p) * (1.0 / fan_in ** 0.5 if p.dim() > 1 else 0.05))
    model.mean.copy_(torch.randn_like(model.mean) * 0.5)
    model.scale.copy_(torch.rand_like(model.scale) + 0.5)
    if weight_norm:
        model.apply_weight_norm()
    return model


def save(model: SpeechT5HifiGan, folder) -> None:
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hifigan_hf")
    out = {}
    for normalize in (False, True):
        name = f"norm{int(normalize)}"
        model = make_reference(dict(TINY, normalize_before=normalize))
        save(model, root / name)
        out[name] = (model, root / name)
    return out


@pytest.fixture(params=["direct", "fft"])
def conv_route(request, monkeypatch):
    """The convolution route for one test (route() reads MUSICLM_CONV1D once: its cache is cleared around)."""
    monkeypatch.setenv(conv1d.ENV, request.param)
    conv1d.route.cache_clear()
    yield request.param
    conv1d.route.cache_clear()


def mel(B, T, F, seed=1):
    return torch.randn(B, T, F, generator=torch.Generator().manual_seed(seed)) * 2 - 4  # log-mel-like


@pytest.mark.parametrize("name", ["norm0", "norm1"])
def test_parity_batched_and_unbatched(folders, name, conv_route):
    assert conv1d.route() == conv_route
    ref, folder = folders[name]
    ours = HifiGan.from_pretrained(folder)
    assert ours.config.normalize_before == (name == "norm1")
    x = mel(3, 23, 16)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
        assert got.shape == expected.shape == (3, ours.config.output_length(23))
        assert (got - expected).abs().max() <= ATOL
        assert expected.std() > 0.1  # the fixture makes real signals, not ~0
        one = ours(x[1])
        assert one.shape == (ours.config.output_length(23),)
        assert (one - ref(x[1])).abs().max() <= ATOL


def test_different_mel_different_waveform(folders):
    ref, folder = folders["norm0"]
    ours = HifiGan.from_pretrained(folder)
    with torch.no_grad():
        a, b = ours(mel(1, 20, 16, seed=1)), ours(mel(1, 20, 16, seed=2))
        assert (a - b).abs().max() > 100 * ATOL
        # and a changed frame changes the samples it reaches, not far ones only
        x = mel(1, 20, 16, seed=1)
        x2 = x.clone()
        x2[0, 10] += 1.0
        d = (ours(x2) - ours(x)).abs()[0]
        hop = ours.config.hop_length
        assert d[10 * hop: 11 * hop].max() > 100 * ATOL


def test_normalize_before_uses_the_buffers(folders):
    ref, folder = folders["norm1"]
    ours = HifiGan.from_pretrained(folder)
    torch.testing.assert_close(ours.mean, ref.mean)
    with torch.no_grad():
        plain = ours(mel(1, 12, 16))
        ours.config.normalize_before = False
        assert (ours(mel(1, 12, 16)) - plain).abs().max() > 100 * ATOL


def test_pipeline_folder_pytorch_bin_and_weight_norm(folders, tmp_path):
    ref, folder = folders["norm0"]
    x = mel(2, 15, 16)
    with torch.no_grad():
        expected = ref(x)
    # a diffusers pipeline folder: model_index.json + vocoder/
    shutil.copytree(folder, tmp_path / "pipe" / "vocoder")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "MusicLDMPipeline",
                                                                    "vocoder": ["transformers", "SpeechT5HifiGan"]}))
    # a pickled state dict instead of safetensors
    (tmp_path / "bin").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "bin" / "config.json")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    # weights saved with weight norm applied
    make_reference(dict(TINY, normalize_before=False), weight_norm=True).save_pretrained(tmp_path / "wn")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "wn" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("parametrizations.weight.original0") for k in f.keys())
    for sub in ("pipe", "bin", "wn"):
        with torch.no_grad():
            got = HifiGan.from_pretrained(tmp_path / sub)(x)
        assert (got - expected).abs().max() <= ATOL, sub


def test_native_round_trip(folders, tmp_path):
    ref, folder = folders["norm1"]
    ours = HifiGan.from_pretrained(folder)
    ours.save_pretrained(tmp_path / "native")
    again = HifiGan.from_pretrained(tmp_path / "native")
    x = mel(1, 9, 16)
    with torch.no_grad():
        assert (again(x) - ref(x)).abs().max() <= ATOL
    assert again.config == ours.config


@pytest.mark.slow
@pytest.mark.parametrize("route", ["auto", "direct"])
def test_parity_official_config(tmp_path, route, monkeypatch):
    monkeypatch.setenv(conv1d.ENV, route)
    conv1d.route.cache_clear()
    ref = make_reference(OFFICIAL)
    ref.save_pretrained(tmp_path / "official")
    ours = HifiGan.from_pretrained(tmp_path / "official")
    x = mel(2, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    conv1d.route.cache_clear()
    assert got.shape == expected.shape == (2, 160 * 64 + 32)
    assert (got - expected).abs().max() <= ATOL
    assert expected.std() > 0.1


def test_bfloat16_against_the_fp32_reference(folders):
    """Weights and activations in bfloat16 (`from_pretrained(dtype=torch.bfloat16)`: torch's convolutions, the FFT
    route being fp32 only) against transformers in fp32: bf16's 8-bit mantissa, ~4e-3 relative per rounding,
    accumulates through the 2 x 3 x 3 convolutions of a stage (measured: 0.8 % RMS error, 2.4 % of the output's
    peak at most). Tolerance: 3 % relative RMS error, 5 % of the output's peak for the largest one."""
    ref, folder = folders["norm1"]
    ours = HifiGan.from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.conv_pre.weight.dtype == torch.bfloat16
    x = mel(2, 23, 16)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    err = got.float() - expected
    assert err.pow(2).mean().sqrt() <= 0.03 * expected.pow(2).mean().sqrt()
    assert err.abs().max() <= 0.05 * expected.abs().max()
    assert err.abs().max() > ATOL  # it is bf16: a fp32 run would be within 1e-4
