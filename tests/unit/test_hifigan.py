"""HiFi-GAN on tiny configs: output length, batching, config translation, checkpoint accounting, bad input.

The numbers themselves are checked against transformers in tests/parity/test_hifigan_parity.py; the folders
here are written by hand (a transformers-style config.json + safetensors with the reference's key names), so
these tests need no reference library.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from musiclm_core.convert import hifigan as convert
from musiclm_core.hifigan import PRESETS, HifiGan, HifiGanConfig
from musiclm_core.hub import CheckpointError

TINY = PRESETS["tiny"]


def make(config: HifiGanConfig = TINY) -> HifiGan:
    torch.manual_seed(0)
    return HifiGan(config).eval()


def hf_config(config: HifiGanConfig) -> dict:
    """What transformers' SpeechT5HifiGanConfig.save_pretrained writes for `config`."""
    return {"architectures": ["SpeechT5HifiGan"], "model_type": "speecht5_hifigan", "dtype": "float32",
            "transformers_version": "5.23.0", "initializer_range": 0.01, "model_in_dim": config.mel_bins,
            "sampling_rate": config.sample_rate, "upsample_initial_channel": config.initial_channels,
            "upsample_rates": list(config.upsample_rates), "upsample_kernel_sizes": list(config.upsample_kernel_sizes),
            "resblock_kernel_sizes": list(config.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in config.resblock_dilations],
            "leaky_relu_slope": config.leaky_relu_slope, "normalize_before": config.normalize_before}


def write_hf(folder, model: HifiGan, state=None, config=None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or hf_config(model.config)))
    save_file({k: v.contiguous() for k, v in (state or model.state_dict()).items()}, str(folder / "model.safetensors"))
    return folder


def test_official_preset_shapes():
    c = PRESETS["musicldm"]
    assert c == PRESETS["audioldm2"]
    assert c.hop_length == 160
    assert [c.output_length(t) for t in (1, 512, 1024)] == [192, 81_952, 163_872]
    with torch.device("meta"):
        model = HifiGan(c)
    assert sum(p.numel() for p in model.parameters()) + 128 == 55_265_025  # + mean, scale (specs/ldm.md §5.3)


@pytest.mark.parametrize("T", [1, 2, 7, 30])
def test_output_length_and_unbatched(T):
    model = make()
    mel = torch.randn(2, T, 16)
    with torch.no_grad():
        wav = model(mel)
        one = model(mel[1])
    assert wav.shape == (2, TINY.output_length(T))
    assert one.shape == (TINY.output_length(T),)
    torch.testing.assert_close(one, wav[1], atol=1e-5, rtol=0)
    assert wav.abs().max() <= 1  # tanh


def test_config_round_trip_and_errors():
    assert HifiGanConfig.from_dict(TINY.to_dict()) == TINY
    assert json.loads(json.dumps(TINY.to_dict())) == TINY.to_dict()
    with pytest.raises(CheckpointError, match=r"unknown HifiGanConfig fields \['bogus'\]"):
        HifiGanConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="odd kernel sizes"):
        HifiGanConfig(resblock_kernel_sizes=(3, 4, 11))
    with pytest.raises(ValueError, match="same length"):
        HifiGanConfig(upsample_rates=(5, 4), upsample_kernel_sizes=(16,))
    with pytest.raises(ValueError, match="kernel >= stride"):
        HifiGanConfig(upsample_rates=(5, 4, 2, 2, 2), upsample_kernel_sizes=(4, 16, 8, 4, 4))
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* 5"):
        HifiGanConfig(initial_channels=48)


def test_config_from_transformers():
    assert convert.config_from_transformers(hf_config(PRESETS["musicldm"])) == PRESETS["musicldm"]
    # omitted fields take transformers' defaults (microsoft/speecht5_hifigan: 80 bins, normalize_before)
    c = convert.config_from_transformers({"model_type": "speecht5_hifigan"})
    assert (c.mel_bins, c.initial_channels, c.upsample_rates, c.normalize_before) == (80, 512, (4, 4, 4, 4), True)
    with pytest.raises(CheckpointError, match=r"does not know: \['resblock_type'\]"):
        convert.config_from_transformers({**hf_config(TINY), "resblock_type": "2"})
    with pytest.raises(CheckpointError, match="model_type 'speecht5' is not a SpeechT5HifiGan"):
        convert.config_from_transformers({**hf_config(TINY), "model_type": "speecht5"})


def test_load_transformers_folder_and_native(tmp_path):
    model = make()
    mel = torch.randn(1, 9, 16)
    with torch.no_grad():
        expected = model(mel)
        loaded = HifiGan.from_pretrained(write_hf(tmp_path / "hf", model))
        torch.testing.assert_close(loaded(mel), expected, atol=1e-6, rtol=0)
        loaded.save_pretrained(tmp_path / "native")
        torch.testing.assert_close(HifiGan.from_pretrained(tmp_path / "native")(mel), expected, atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        loaded.save_pretrained(tmp_path / "native")


def test_weight_norm_is_folded(tmp_path):
    model = make()
    state = dict(model.state_dict())
    w = state.pop("upsampler.0.weight")  # ConvTranspose1d (in, out, k): weight norm over dims 1, 2 (dim=0)
    g = w.norm(dim=(1, 2), keepdim=True)
    state["upsampler.0.weight_g"], state["upsampler.0.weight_v"] = g, w * 2  # the older naming
    w = state.pop("conv_post.weight")
    g = w.norm(dim=(1, 2), keepdim=True)
    state["conv_post.parametrizations.weight.original0"] = g
    state["conv_post.parametrizations.weight.original1"] = w / 3
    loaded = HifiGan.from_pretrained(write_hf(tmp_path / "hf", model, state))
    torch.testing.assert_close(loaded.upsampler[0].weight, model.upsampler[0].weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded.conv_post.weight, model.conv_post.weight, atol=1e-6, rtol=1e-5)


def test_missing_statistics(tmp_path):
    model = make()
    state = {k: v for k, v in model.state_dict().items() if k not in ("mean", "scale")}
    loaded = HifiGan.from_pretrained(write_hf(tmp_path / "a", model, state))
    assert (loaded.mean == 0).all() and (loaded.scale == 1).all()
    normalizing = make(dataclasses.replace(TINY, normalize_before=True))
    with pytest.raises(CheckpointError, match=r"input statistics are incomplete.*normalize_before=True"):
        HifiGan.from_pretrained(write_hf(tmp_path / "b", normalizing, state))


def test_key_accounting(tmp_path):
    model = make()
    extra = {**model.state_dict(), "resblocks.0.convs3.0.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+resblocks\.0\.convs3\.0\.weight"):
        HifiGan.from_pretrained(write_hf(tmp_path / "a", model, extra))
    missing = {k: v for k, v in model.state_dict().items() if k != "resblocks.3.convs2.1.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+resblocks\.3\.convs2\.1\.bias"):
        HifiGan.from_pretrained(write_hf(tmp_path / "b", model, missing))
    other = dataclasses.replace(TINY, initial_channels=64)
    misshaped = r"(?s)mis-shaped keys.*conv_pre\.weight: checkpoint \(32, 16, 7\), model \(64, 16, 7\)"
    with pytest.raises(CheckpointError, match=misshaped):
        HifiGan.from_pretrained(write_hf(tmp_path / "c", model, config=hf_config(other)))


def test_pipeline_folder_without_vocoder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without a vocoder/ folder"):
        HifiGan.from_pretrained(tmp_path)


@pytest.mark.parametrize("mel, match", [
    (torch.randn(2, 10, 12), r"12 bins.*takes 16.*\(2, 10, 12\)"),
    (torch.randn(10), r"\(B, T, F\) or \(T, F\).*16 mel bins.*\(10,\)"),
    (torch.randn(2, 1, 10, 16), r"VAE output.*mel\[:, 0\]"),
    (torch.randn(2, 0, 16), r"empty"),
    (torch.ones(2, 5, 16, dtype=torch.long), r"floating-point.*int64"),
    (torch.tensor([[float("nan")] + [0.0] * 15] * 3), r"3 NaN or infinite"),
])
def test_bad_mel(mel, match):
    with pytest.raises(ValueError, match=match):
        make()(mel)
