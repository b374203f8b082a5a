"""AutoencoderKL against diffusers' AutoencoderKL, on checkpoints diffusers wrote.

A tiny config with the official structure (three stages of DownEncoderBlock2D / UpDecoderBlock2D, two ResBlocks per
encoder stage and three per decoder stage, width changes that need conv shortcuts, 1-channel mel in and out,
8 latent channels, one-head mid-block attention), random weights moved off diffusers' initialisation (every
parameter gets noise, GroupNorm scales and shifts included), written with `save_pretrained` and loaded by
`AutoencoderKL.from_pretrained`: from the vae folder, from a pipeline folder, from a `.bin` file. The official
config runs under `-m slow`.

Tolerance: max abs difference <= 1e-4 in fp32 for the posterior's mean, log-variance and std, for a sample drawn
with a given noise tensor or a seeded generator, and for the decoded mel (outputs of order 1-10).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from musiclm_core.hub import CheckpointError
from musiclm_core.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as Reference  # noqa: E402

ATOL = 1e-4

TINY = dict(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=2,
            latent_channels=8, norm_num_groups=8, sample_size=64, scaling_factor=0.6)
# cvssp/audioldm2 vae/config.json (specs/ldm.md §4.1).
OFFICIAL = dict(TINY, block_out_channels=[128, 256, 512], norm_num_groups=32, sample_size=1024,
                scaling_factor=0.4110932946205139)


def make_reference(config: dict, seed: int = 0) -> Reference:
    torch.manual_seed(seed)
    model = Reference(**config).eval()
    with torch.no_grad():
        # 10 % noise relative to each tensor's spread; GroupNorm's ones and zeros (no spread) get 0.1. Absolute
        # noise of 0.1 would multiply the official config's 3x3 convs (fan-in 4608, init std ~0.015) by ~7 and
        # push the log-variance into its clamp at 20, where std = e^10 turns 1e-7 relative rounding into 2e-3.
        for p in model.parameters():
            spread = p.std().item() if p.numel() > 1 else 0.0
            p.add_(0.1 * (spread if spread > 0 else 1.0) * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(reference model, pipeline-shaped folder with vae/ in diffusers' layout)."""
    root = tmp_path_factory.mktemp("vae_diffusers")
    reference = make_reference(TINY)
    reference.save_pretrained(str(root / "vae"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    return reference, root


def check_encode(reference, ours, mel):
    with torch.no_grad():
        theirs = reference.encode(mel).latent_dist
        posterior = ours.encode(mel)
        assert posterior.mean.shape == theirs.mean.shape
        for name in ("mean", "logvar", "std"):
            err = (getattr(posterior, name) - getattr(theirs, name)).abs().max().item()
            assert err <= ATOL, f"{name} differs by {err}"
        noise = torch.randn(theirs.mean.shape, generator=torch.Generator().manual_seed(5))
        err = (posterior.sample(noise) - (theirs.mean + theirs.std * noise)).abs().max().item()
        assert err <= ATOL, f"sample(noise) differs by {err}"
        a = posterior.sample(generator=torch.Generator().manual_seed(7))
        b = theirs.sample(generator=torch.Generator().manual_seed(7))
        assert (a - b).abs().max() <= ATOL
    return posterior


def check_decode(reference, ours, z):
    with torch.no_grad():
        expected = reference.decode(z).sample
        out = ours.decode(z)
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    assert err <= ATOL, f"decoded mel differs by {err}"
    assert expected.abs().max() > 0.5  # of order 1: the tolerance is small next to it
    return out


def test_parity(checkpoint):
    reference, root = checkpoint
    ours = AutoencoderKL.from_pretrained(root / "vae")
    assert ours.scaling_factor == 0.6 and ours.downsample_factor == 4
    mel = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(1))
    posterior = check_encode(reference, ours, mel)
    assert posterior.mean.shape == (2, 8, 8, 16)
    check_decode(reference, ours, posterior.sample(generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():  # the whole round trip, through the posterior's mode
        assert (ours(mel) - reference(mel, sample_posterior=False).sample).abs().max() <= ATOL


def test_parity_odd_length(checkpoint):
    """T = 30 is not a multiple of 4: each down-sampling rounds down (30 -> 15 -> 7), the decoder gives 28."""
    reference, root = checkpoint
    ours = AutoencoderKL.from_pretrained(root / "vae")
    mel = torch.randn(1, 1, 30, 64, generator=torch.Generator().manual_seed(3))
    posterior = check_encode(reference, ours, mel)
    assert posterior.mean.shape == (1, 8, 7, 16)
    assert check_decode(reference, ours, posterior.mean).shape == (1, 1, 28, 64)


def test_fixture_listens(checkpoint):
    """A different input changes the output by far more than the tolerance (encode and decode)."""
    _, root = checkpoint
    ours = AutoencoderKL.from_pretrained(root / "vae")
    g = torch.Generator().manual_seed(4)
    mel_a, mel_b = torch.randn(1, 1, 16, 64, generator=g), torch.randn(1, 1, 16, 64, generator=g)
    z_a, z_b = torch.randn(1, 8, 4, 16, generator=g), torch.randn(1, 8, 4, 16, generator=g)
    with torch.no_grad():
        assert (ours.encode(mel_a).mean - ours.encode(mel_b).mean).abs().max() > 100 * ATOL
        assert (ours.decode(z_a) - ours.decode(z_b)).abs().max() > 100 * ATOL
        # ... and so does a small change to one latent
        z_c = z_a.clone()
        z_c[0, 3, 2, 5] += 0.5
        assert (ours.decode(z_a) - ours.decode(z_c)).abs().max() > 10 * ATOL


def test_pipeline_folder_and_bin(checkpoint, tmp_path):
    reference, root = checkpoint
    z = torch.randn(1, 8, 4, 16, generator=torch.Generator().manual_seed(6))
    check_decode(reference, AutoencoderKL.from_pretrained(root), z)  # the pipeline folder: picks vae/
    reference.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    check_decode(reference, AutoencoderKL.from_pretrained(tmp_path / "bin"), z)
    # Converted once and saved in our format, it loads back to the same model.
    AutoencoderKL.from_pretrained(root).save_pretrained(tmp_path / "native")
    check_decode(reference, AutoencoderKL.from_pretrained(tmp_path / "native"), z)


def _rewrite(src, dst, change):
    """Copy a diffusers vae folder with its state dict passed through `change`."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = change(load_file(str(src / "diffusion_pytorch_model.safetensors")))
    save_file(state, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_bad_checkpoints(checkpoint, tmp_path):
    _, root = checkpoint
    vae = root / "vae"
    missing = _rewrite(vae, tmp_path / "missing",
                       lambda s: {k: v for k, v in s.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\s+decoder.conv_out.bias"):
        AutoencoderKL.from_pretrained(missing)
    extra = _rewrite(vae, tmp_path / "extra", lambda s: dict(s, **{"encoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\s+encoder.extra.weight"):
        AutoencoderKL.from_pretrained(extra)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_legacy(state):
        out = {}
        for k, v in state.items():
            for new, old in legacy_names.items():
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            out[k] = v
        return out

    legacy = _rewrite(vae, tmp_path / "legacy", to_legacy)
    with pytest.raises(CheckpointError, match="pre-0.14 names"):
        AutoencoderKL.from_pretrained(legacy)
    misshaped = _rewrite(vae, tmp_path / "misshaped", lambda s: dict(
        s, **{"encoder.mid_block.attentions.0.to_q.weight": torch.zeros(32, 32, 1, 1)}))
    with pytest.raises(CheckpointError, match=r"to_q.weight: checkpoint \(32, 32, 1, 1\), model \(32, 32\)"):
        AutoencoderKL.from_pretrained(misshaped)
    (tmp_path / "no_vae").mkdir()
    (tmp_path / "no_vae" / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without a vae/ folder"):
        AutoencoderKL.from_pretrained(tmp_path / "no_vae")


@pytest.mark.slow
def test_parity_official_config(tmp_path):
    """The official config at 2.56 s (256 mel frames -> 64 x 16 latents; the mid attention over 1024 positions),
    and a 10.24 s decode (256 x 16 latents -> 1024 x 64 mel)."""
    reference = make_reference(OFFICIAL)
    reference.save_pretrained(str(tmp_path / "vae"))
    ours = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert ours.config.block_out_channels == (128, 256, 512) and ours.config.mel_bins == 64
    mel = torch.randn(1, 1, 256, 64, generator=torch.Generator().manual_seed(1))
    posterior = check_encode(reference, ours, mel)
    check_decode(reference, ours, posterior.mean)
    check_decode(reference, ours, torch.randn(1, 8, 256, 16, generator=torch.Generator().manual_seed(2)))
