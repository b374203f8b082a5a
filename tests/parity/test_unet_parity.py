"""UNet against diffusers, on checkpoints diffusers wrote (save_pretrained) and `UNet.from_pretrained` read.

Tiny configs with the official block types (DownBlock2D then CrossAttnDownBlock2D, mirrored up, the cross-attention
mid block), three levels, so that two upsamplings meet odd sizes:

* musicldm-like: `UNet2DConditionModel`, "simple_projection" class embedding concatenated after the time
  embedding, cross_attention_dim = block_out_channels and no context (attn2 attends to its own input);
* audioldm2-like: `AudioLDM2UNet2DConditionModel`, cross_attention_dim [None, 24, 40] (self, "GPT-2", "T5");
* audioldm2-large-like: [None, 24, 40, None] with transformer_layers_per_block=2.

Every parameter, norms included, is moved off its initialisation (diffusers zero-initialises nothing here, but
GroupNorm/LayerNorm start at 1 and 0). Checked: the noise prediction at several timesteps, a CFG batch of 2 with
different conditions, a T5 mask with zeros, a latent whose height is not a multiple of 4, .bin weights, the
pipeline folder layout, and that a different condition moves the output by far more than the tolerance.
The official configs run under `-m slow` (one model at a time, a small latent); their key accounting runs on the
meta device in the default suite.

Tolerance: max abs difference <= 1e-4 (fp32), on outputs of order 1.
"""

import gc
import json

import pytest
import torch

from musiclm_core.convert import keys, unet as convert
from musiclm_core.hub import CheckpointError
from musiclm_core.unet import PRESETS, UNet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel  # noqa: E402

ATOL = 1e-4

TINY_BASE = dict(in_channels=8, out_channels=8, block_out_channels=(16, 32, 48), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                 attention_head_dim=4)
TINY = {
    "musicldm": (UNet2DConditionModel, dict(TINY_BASE, cross_attention_dim=(16, 32, 48),
                                            class_embed_type="simple_projection",
                                            projection_class_embeddings_input_dim=12, class_embeddings_concat=True)),
    "audioldm2": (AudioLDM2UNet2DConditionModel, dict(TINY_BASE, cross_attention_dim=[[None, 24, 40]] * 3)),
    "audioldm2-large": (AudioLDM2UNet2DConditionModel, dict(TINY_BASE, cross_attention_dim=[[None, 24, 40, None]] * 3,
                                                            transformer_layers_per_block=2)),
}
OFFICIAL_BASE = dict(in_channels=8, out_channels=8, block_out_channels=(128, 256, 384, 640), layers_per_block=2,
                     down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                     up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=8)
OFFICIAL = {
    "musicldm": (UNet2DConditionModel, dict(OFFICIAL_BASE, cross_attention_dim=(128, 256, 384, 640),
                                            class_embed_type="simple_projection",
                                            projection_class_embeddings_input_dim=512, class_embeddings_concat=True)),
    "audioldm2": (AudioLDM2UNet2DConditionModel, dict(OFFICIAL_BASE, cross_attention_dim=[[None, 768, 1024]] * 4)),
    "audioldm2-large": (AudioLDM2UNet2DConditionModel,
                        dict(OFFICIAL_BASE, cross_attention_dim=[[None, 768, 1024, None]] * 4,
                             transformer_layers_per_block=2)),
}


def make_reference(cls, kwargs, scale=0.1):
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def conditions(kind, B, widths, seed):
    """(diffusers' kwargs, ours) for batch B; AudioLDM 2's second row keeps only 3 of its 7 T5 tokens."""
    g = torch.Generator().manual_seed(seed)
    if kind == "musicldm":
        clap = torch.nn.functional.normalize(torch.randn(B, widths[0], generator=g), dim=-1)
        return dict(encoder_hidden_states=None, class_labels=clap), dict(class_embed=clap)
    gpt2, t5 = torch.randn(B, 8, widths[0], generator=g), torch.randn(B, 7, widths[1], generator=g)
    mask = torch.ones(B, 7)
    mask[1:, 3:] = 0
    both = dict(encoder_hidden_states=gpt2, encoder_hidden_states_1=t5, encoder_attention_mask_1=mask)
    return both, both


def widths_of(kind, official=False):
    if kind == "musicldm":
        return (512,) if official else (12,)
    return (768, 1024) if official else (24, 40)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet_diffusers")
    for kind, (cls, kwargs) in TINY.items():
        make_reference(cls, kwargs).save_pretrained(root / kind)
    return root


@pytest.mark.parametrize("kind", list(TINY))
def test_parity(tiny_checkpoints, kind):
    cls = TINY[kind][0]
    reference = cls.from_pretrained(tiny_checkpoints / kind).eval()
    ours = UNet.from_pretrained(tiny_checkpoints / kind)
    x = torch.randn(2, 8, 22, 8, generator=torch.Generator().manual_seed(3))  # 22: not a multiple of 4
    theirs_kw, ours_kw = conditions(kind, 2, widths_of(kind), seed=4)
    with torch.no_grad():
        worst = 0.0
        for t in (1, 250.5, torch.tensor([999, 400]), torch.tensor(600)):
            expected = reference(x, t, **theirs_kw).sample
            got = ours(x, t, **ours_kw)
            assert got.shape == expected.shape == x.shape
            worst = max(worst, (got - expected).abs().max().item())
        assert worst <= ATOL, f"{kind}: max abs difference {worst}"
        assert expected.abs().max() > 0.5  # outputs of order 1: the tolerance means something
        # The CFG batch's two rows have different conditions: each must listen (row 1 against row 0's).
        swapped_theirs, swapped_ours = conditions(kind, 2, widths_of(kind), seed=5)
        other = ours(x, 600, **swapped_ours)
        assert (other - got).abs().max() > 100 * ATOL
        torch.testing.assert_close(other, reference(x, 600, **swapped_theirs).sample, atol=ATOL, rtol=0)


def test_mask_zeros_matter(tiny_checkpoints):
    """The T5 mask's zeros are applied as diffusers applies them (-10000 bias): a different mask changes both
    outputs by far more than the tolerance, and identically."""
    reference = AudioLDM2UNet2DConditionModel.from_pretrained(tiny_checkpoints / "audioldm2").eval()
    ours = UNet.from_pretrained(tiny_checkpoints / "audioldm2")
    x = torch.randn(2, 8, 16, 8, generator=torch.Generator().manual_seed(6))
    cond, _ = conditions("audioldm2", 2, widths_of("audioldm2"), seed=7)
    full = dict(cond, encoder_attention_mask_1=torch.ones(2, 7))
    with torch.no_grad():
        masked, unmasked = ours(x, 300, **cond), ours(x, 300, **full)
        assert (masked[1] - unmasked[1]).abs().max() > 100 * ATOL
        torch.testing.assert_close(masked, reference(x, 300, **cond).sample, atol=ATOL, rtol=0)
        torch.testing.assert_close(unmasked, reference(x, 300, **full).sample, atol=ATOL, rtol=0)
        # A mask on the GPT-2 vectors too (the pipeline passes none; the UNet takes one as diffusers does).
        gpt2_mask = torch.ones(2, 8)
        gpt2_mask[0, 5:] = 0
        both = dict(cond, encoder_attention_mask=gpt2_mask)
        got = ours(x, 300, **both)
        assert (got[0] - masked[0]).abs().max() > 100 * ATOL
        torch.testing.assert_close(got, reference(x, 300, **both).sample, atol=ATOL, rtol=0)


def test_bin_weights_and_pipeline_folder(tmp_path):
    """A pickled .bin checkpoint inside a pipeline folder (model_index.json + unet/) loads the same."""
    cls, kwargs = TINY["audioldm2-large"]
    reference = make_reference(cls, kwargs)
    reference.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=False)
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline"}))
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.bin").is_file()
    ours = UNet.from_pretrained(tmp_path / "pipe")
    x = torch.randn(1, 8, 12, 4)
    theirs_kw, ours_kw = conditions("audioldm2", 1, widths_of("audioldm2"), seed=8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 42, **ours_kw), reference(x, 42, **theirs_kw).sample, atol=ATOL, rtol=0)


def test_bad_checkpoints(tiny_checkpoints, tmp_path):
    """A missing tensor and a foreign one are reported by name."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoints / "audioldm2" / "config.json").read_text())
    state = load_file(tiny_checkpoints / "audioldm2" / "diffusion_pytorch_model.safetensors")
    del state["mid_block.attentions.1.proj_out.bias"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    mid.transformers.1.proj_out.bias"):
        UNet.from_pretrained(folder)
    state["mid_block.attentions.1.proj_out.bias"] = torch.zeros(48)
    state["add_embedding.linear_1.weight"] = torch.zeros(4, 4)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    add_embedding.linear_1.weight"):
        UNet.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="holds no UNet"):
        UNet.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", list(OFFICIAL))
def test_official_key_accounting(kind):
    """Every tensor of diffusers' model at the official config lands on one of ours with its shape (meta device:
    no memory, no weights)."""
    cls, kwargs = OFFICIAL[kind]
    with torch.device("meta"):
        reference = cls(**kwargs)
        config = convert.config_from_diffusers({**reference.config, "_class_name": cls.__name__}, source=kind)
        ours = UNet(config)
    assert config == PRESETS[kind]
    state = keys.rename(reference.state_dict(), convert.diffusers_table(config), source=kind)
    state = convert.fuse_projections(convert.squeeze_projections(state), ours)
    keys.check_keys(ours, state, source=kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OFFICIAL))
def test_official_parity(tmp_path, kind):
    """The official sizes on a small latent (CFG batch of 2, 36 x 16), random weights moved off init."""
    cls, kwargs = OFFICIAL[kind]
    x = torch.randn(2, 8, 36, 16, generator=torch.Generator().manual_seed(9))  # 36: not a multiple of 8
    theirs_kw, ours_kw = conditions(kind, 2, widths_of(kind, official=True), seed=10)
    reference = make_reference(cls, kwargs, scale=0.02)
    reference.save_pretrained(tmp_path / kind)
    with torch.no_grad():
        expected = reference(x, 500, **theirs_kw).sample
    del reference  # one model in memory at a time (audioldm2-large: 2.9 GB each)
    gc.collect()
    ours = UNet.from_pretrained(tmp_path / kind)
    with torch.no_grad():
        got = ours(x, 500, **ours_kw)
    err = (got - expected).abs().max().item()
    assert err <= ATOL, f"{kind}: max abs difference {err} (output max {expected.abs().max().item():.2f})"
