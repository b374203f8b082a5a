"""UNet at tiny configs: shapes, odd latent sizes, conditioning, native round trip, config checks, bad input.

Parity with diffusers is in tests/parity/test_unet_parity.py.
"""

import pytest
import torch

from musiclm_core.convert import keys, unet as convert
from musiclm_core.hub import CheckpointError
from musiclm_core.unet import PRESETS, UNet, UNetConfig, timestep_embedding


def tiny(name: str) -> UNet:
    torch.manual_seed(0)
    model = UNet.from_preset(name).eval()
    with torch.no_grad():  # off the zero/one inits, so every path contributes
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def audioldm2_inputs(B=2, T=16, F=8, L=5, L1=7):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 8, T, F, generator=g),
            dict(encoder_hidden_states=torch.randn(B, L, 24, generator=g),
                 encoder_hidden_states_1=torch.randn(B, L1, 40, generator=g),
                 encoder_attention_mask_1=torch.ones(B, L1)))


def test_param_counts_match_official_checkpoints():
    """Total parameters at the official presets = the diffusers models' (specs/ldm.md §10.3, §11.3); q/k/v are
    fused here, so the counts, not the key names, are what compare."""
    expected = {"musicldm": 185_036_552, "audioldm2": 346_943_496, "audioldm2-large": 718_012_296}
    for name, count in expected.items():
        with torch.device("meta"):
            model = UNet(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize("T,F", [(16, 8), (13, 6), (7, 5)])
def test_shapes_and_odd_sizes(T, F):
    """Latent sizes that do not divide by 4 (two down-samplings) come back at their own size."""
    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs(T=T, F=F)
    with torch.no_grad():
        out = model(x, 10, **cond)
    assert out.shape == x.shape and out.is_contiguous() and torch.isfinite(out).all()


def test_timestep_forms_agree():
    model = tiny("tiny-musicldm")
    x, clap = torch.randn(2, 8, 8, 4), torch.randn(2, 24)
    with torch.no_grad():
        ref = model(x, torch.tensor([250, 250]), class_embed=clap)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([250.0, 250.0])):
            torch.testing.assert_close(model(x, t, class_embed=clap), ref, atol=1e-5, rtol=0)
        other = model(x, torch.tensor([250, 900]), class_embed=clap)
    assert (other[0] - ref[0]).abs().max() < 1e-5 and (other[1] - ref[1]).abs().max() > 1e-2


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)  # freqs exp(-ln(1e4) k / 4), k = 0..3
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_conditioning_changes_the_output():
    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs()
    with torch.no_grad():
        base = model(x, 10, **cond)
        for key in ("encoder_hidden_states", "encoder_hidden_states_1"):
            moved = model(x, 10, **{**cond, key: cond[key] + 1.0})
            assert (moved - base).abs().max() > 1e-2, key
        # The masked T5 tokens are ignored: changing them moves nothing (their scores are -10000 down).
        mask = cond["encoder_attention_mask_1"].clone()
        mask[:, 4:] = 0
        masked = model(x, 10, **{**cond, "encoder_attention_mask_1": mask})
        states = cond["encoder_hidden_states_1"].clone()
        states[:, 4:] = 100.0
        same = model(x, 10, **{**cond, "encoder_attention_mask_1": mask, "encoder_hidden_states_1": states})
    assert (masked - base).abs().max() > 1e-2
    assert (same - masked).abs().max() < 1e-5


def test_musicldm_class_embedding_is_what_conditions():
    model = tiny("tiny-musicldm")
    x = torch.randn(2, 8, 8, 4)
    with torch.no_grad():
        a = model(x, 10, class_embed=torch.randn(2, 24))
        b = model(x, 10, class_embed=torch.randn(2, 24))
    assert (a - b).abs().max() > 1e-2


def test_native_round_trip(tmp_path):
    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs()
    model.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet")
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 10, **cond), model(x, 10, **cond), atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "unet")


def test_bad_input_messages():
    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs()
    cases = [
        (dict(sample=torch.randn(2, 4, 16, 8)), "sample has 4 channels, this UNet takes 8"),
        (dict(sample=torch.randn(8, 16, 8)), r"sample must be a float tensor \(B, 8, T, F\)"),
        (dict(encoder_hidden_states=torch.randn(2, 5, 32)), r"encoder_hidden_states must be \(B, L, 24\)"),
        (dict(encoder_hidden_states_1=torch.randn(2, 7, 24)), r"encoder_hidden_states_1 must be \(B, L, 40\)"),
        (dict(encoder_hidden_states=torch.randn(3, 5, 24)), r"= \(2, L, 24\), got \(3, 5, 24\)"),
        (dict(encoder_hidden_states_1=None), r"needs encoder_hidden_states_1 \(B, L, 40\)"),
        (dict(encoder_hidden_states=None), r"needs encoder_hidden_states \(B, L, 24\)"),
        (dict(encoder_attention_mask_1=torch.ones(2, 6)), r"encoder_attention_mask_1 must be \(B, L\) = \(2, 7\)"),
        (dict(timestep=torch.tensor([1, 2, 3])), r"timestep must be a number or a tensor of shape"),
        (dict(class_embed=torch.randn(2, 24)), "this UNet has no class embedding"),
    ]
    for change, message in cases:
        args = dict(sample=x, timestep=10, **cond)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            model(args.pop("sample"), args.pop("timestep"), **args)

    musicldm = tiny("tiny-musicldm")
    x = torch.randn(2, 8, 8, 4)
    with pytest.raises(ValueError, match=r"needs class_embed \(B, 24\)"):
        musicldm(x, 10)
    with pytest.raises(ValueError, match=r"class_embed must be \(B, 24\) = \(2, 24\), got \(2, 12\)"):
        musicldm(x, 10, class_embed=torch.randn(2, 12))
    with pytest.raises(ValueError, match="no slot that reads encoder_hidden_states"):
        musicldm(x, 10, class_embed=torch.randn(2, 24), encoder_hidden_states=torch.randn(2, 3, 24))


def test_config_checks():
    with pytest.raises(ValueError, match="must share one width"):
        UNetConfig(context_dims=(16, 24))
    with pytest.raises(ValueError, match="one flag per level"):
        UNetConfig(attention=(True, True))
    with pytest.raises(ValueError, match="divisible by norm_groups"):
        UNetConfig(channels=(48, 96, 144, 240), attention=(False, True, True, True))
    with pytest.raises(CheckpointError, match=r"unknown UNetConfig fields \['heads'\]"):
        UNetConfig.from_dict({"heads": 8})
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet.from_preset("stable-diffusion")


AUDIOLDM2_CONFIG = {
    "_class_name": "AudioLDM2UNet2DConditionModel", "_diffusers_version": "0.21.0", "sample_size": 256,
    "in_channels": 8, "out_channels": 8, "block_out_channels": [128, 256, 384, 640], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "cross_attention_dim": [[None, 768, 1024]] * 4,
    "transformer_layers_per_block": 1, "attention_head_dim": 8, "num_attention_heads": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_type": "positional", "use_linear_projection": False,
    "upcast_attention": False, "only_cross_attention": False, "resnet_time_scale_shift": "default",
}


def test_config_translation():
    assert convert.config_from_diffusers(AUDIOLDM2_CONFIG) == PRESETS["audioldm2"]
    large = dict(AUDIOLDM2_CONFIG, cross_attention_dim=[[None, 768, 1024, None]] * 4, transformer_layers_per_block=2)
    assert convert.config_from_diffusers(large) == PRESETS["audioldm2-large"]


@pytest.mark.parametrize("change,message", [
    (dict(freq_shift=1), "freq_shift=1 is not supported"),
    (dict(flip_sin_to_cos=False), "flip_sin_to_cos=False is not supported"),
    (dict(use_linear_projection=True), "use_linear_projection=True is not supported"),
    (dict(only_cross_attention=True), "only_cross_attention=True is not supported"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift' is not supported"),
    (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
    (dict(transformer_layers_per_block=[1, 1, 2, 2]), r"transformer_layers_per_block=\[1, 1, 2, 2\]"),
    (dict(cross_attention_dim=[[None, 768], [None, 768], [None, 768, 1024], [None, 768, 1024]]),
     "only one list shared by every level with attention"),
    (dict(down_block_types=["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
     r"down_block_types \['AttnDownBlock2D'\] are not supported"),
    (dict(up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
     "do not mirror down_block_types"),
    (dict(addition_embed_type="text"), "addition_embed_type='text' is not supported"),
    (dict(brand_new_field=1), r"does not know: \['brand_new_field'\]"),
    (dict(_class_name="UNet2DModel"), "_class_name 'UNet2DModel' is not one of"),
])
def test_config_translation_errors(change, message):
    with pytest.raises(CheckpointError, match=message):
        convert.config_from_diffusers({**AUDIOLDM2_CONFIG, **change}, source="unet/config.json")


def test_musicldm_needs_its_own_layout():
    musicldm = dict(AUDIOLDM2_CONFIG, _class_name="UNet2DConditionModel", cross_attention_dim=[128, 256, 384, 640],
                    class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                    class_embeddings_concat=True)
    assert convert.config_from_diffusers(musicldm) == PRESETS["musicldm"]
    assert convert.config_from_diffusers(dict(musicldm, mid_block_only_cross_attention=False)) == PRESETS["musicldm"]
    with pytest.raises(CheckpointError, match="mid_block_only_cross_attention=True is not supported"):
        convert.config_from_diffusers(dict(musicldm, mid_block_only_cross_attention=True))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel with cross_attention_dim=768 is not supported"):
        convert.config_from_diffusers(dict(musicldm, cross_attention_dim=768))
    with pytest.raises(CheckpointError, match="'simple_projection' concatenated"):
        convert.config_from_diffusers(dict(musicldm, class_embeddings_concat=False))


def test_key_accounting_is_strict():
    """Every key of a diffusers state dict must land, and every key of ours must be filled."""
    config = PRESETS["tiny-audioldm2"]
    rows = convert.diffusers_table(config)
    good = {"conv_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv_shortcut.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    down_blocks.0.resnet.0.norm1.weight"):
        keys.rename({**good, "down_blocks.0.resnet.0.norm1.weight": torch.zeros(1)}, rows, source="x")
    # The flat attentions.{n} of diffusers' up level lands in our layers.{n // 3}.transformers.{n % 3}.
    renamed = keys.rename({"up_blocks.1.attentions.4.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1)},
                             rows, source="x")
    assert list(renamed) == ["up.1.layers.1.transformers.1.blocks.0.attn2.k.weight"]
    with torch.device("meta"):
        layout = UNet(config)
    with pytest.raises(CheckpointError, match="attention projections missing"):
        convert.fuse_projections({}, layout)


def test_memory_formats_agree():
    """Channels-last (the default) and row-major layouts are the same computation."""
    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs(T=13, F=6)
    with torch.no_grad():
        default = model(x, 10, **cond)
        model.memory_format = torch.contiguous_format
        row_major = model(x, 10, **cond)
    torch.testing.assert_close(row_major, default, atol=1e-5, rtol=0)


# -- the CPU routes against the plain computations ----------------------------------------------------------------


@pytest.fixture
def onednn(monkeypatch):
    """The oneDNN linear route on, with a count of its matmul calls (to show a route ran)."""
    import musiclm_core.unet as unet_module

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(unet_module, "ONEDNN_LINEAR", True)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[3]) or real(*a))
    return calls


def test_geglu_matches_plain(onednn):
    """unet.geglu on the oneDNN route (two matmuls, GELU fused into the gate's) against value * GELU(gate) from
    F.linear: max abs <= 1e-5 on outputs ~1; a layer that is not a plain nn.Linear (LoRA) takes the plain path."""
    import torch.nn.functional as F

    from musiclm_core.unet import geglu

    torch.manual_seed(0)
    x = torch.randn(2, 17, 48)
    for bias in (True, False):
        layer = torch.nn.Linear(48, 2 * 40, bias=bias)
        value, gate = F.linear(x, layer.weight, layer.bias).chunk(2, dim=-1)
        with torch.no_grad():
            fast = geglu(layer, x)
            assert (geglu(layer, x + 0.1) - fast).abs().max() > 1e-2  # the comparison can fail
        assert fast.shape == (2, 17, 40)
        torch.testing.assert_close(fast, value * F.gelu(gate), atol=1e-5, rtol=0)
    assert onednn.count("gelu") == 2 * 2  # the fused route ran, twice per bias setting

    class Adapter(torch.nn.Linear):
        def forward(self, h):
            return super().forward(h) + 1.0

    onednn.clear()
    adapter = Adapter(48, 80)
    value, gate = (F.linear(x, adapter.weight, adapter.bias) + 1.0).chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(geglu(adapter, x), value * F.gelu(gate), atol=1e-6, rtol=0)
    assert not onednn


def test_pointwise_conv_matches_conv(onednn):
    """unet.pointwise_conv (a 1x1 conv as a oneDNN matmul over the channels) against F.conv2d, for channels-last
    and row-major inputs: max abs <= 1e-5 on outputs ~1, channels-last strides out; gradients on: nn.Conv2d."""
    import torch.nn.functional as F

    from musiclm_core.unet import pointwise_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(48, 24, 1)
    x = torch.randn(2, 48, 7, 5)
    expected = F.conv2d(x, conv.weight, conv.bias)
    with torch.no_grad():
        for layout in (torch.channels_last, torch.contiguous_format):
            y = pointwise_conv(conv, x.contiguous(memory_format=layout))
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
            assert y.is_contiguous(memory_format=torch.channels_last)
        assert (pointwise_conv(conv, x + 0.1) - expected).abs().max() > 1e-2  # the comparison can fail
    assert len(onednn) == 3
    y = pointwise_conv(conv, x)
    assert y.requires_grad and len(onednn) == 3  # differentiable: nn.Conv2d's own forward


@pytest.mark.parametrize("route", ["winograd", "conv"])
def test_upsample_routes_match_interpolate_then_conv(monkeypatch, route):
    """UpsampleConv's x2 routes (F(2x2, 3x3) on the upsampled image, kernels/winograd.upsample_conv3x3; the
    folded 2x2 convolution under MUSICLM_CONV3X3=conv) against F.interpolate + F.conv2d: max abs <= 1e-5 on
    outputs ~1. A size that is not x2 takes the plain path; so does a call with gradients."""
    import torch.nn.functional as F

    import musiclm_core.unet as unet_module
    from musiclm_core.kernels import winograd
    from musiclm_core.unet import UpsampleConv

    monkeypatch.setattr(winograd, "MIN_CHANNELS", {2: 16, 4: 16})  # tiny channels take the route too
    monkeypatch.setenv(winograd.ENV, route)
    winograd.route.cache_clear()
    taken = []
    for module, name in ((winograd, "upsample_conv3x3"), (unet_module, "upsample_conv")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: taken.append(_n) or _f(*a))
    try:
        torch.manual_seed(0)
        layer = UpsampleConv(24)
        x = torch.randn(2, 24, 5, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for size in ((10, 6), (9, 5)):
                expected = F.conv2d(F.interpolate(x, size=size), layer.weight, layer.bias, padding=1)
                y = layer(x, size)
                torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
                assert (layer(x + 0.1, size) - expected).abs().max() > 1e-2  # the comparison can fail
        assert layer(x, (10, 6)).requires_grad  # gradients on: interpolate + conv, differentiable
    finally:
        winograd.route.cache_clear()
    assert taken == [{"winograd": "upsample_conv3x3", "conv": "upsample_conv"}[route]] * 2  # the x2 calls only


@pytest.mark.parametrize("name", ["tiny-musicldm", "tiny-audioldm2"])
def test_streams_match_one_call(monkeypatch, name):
    """The rows of a batch in two streams (kernels/streams.py, on by default on 2+ threads) give the output of
    one batched call, with the per-row conditioning (class embedding, contexts, masks) kept with its row."""
    from musiclm_core.kernels import streams

    model = tiny(name)
    x, cond = audioldm2_inputs(B=3, T=13, F=6)
    cond["encoder_attention_mask_1"][1, 4:] = 0
    if name == "tiny-musicldm":
        g = torch.Generator().manual_seed(3)
        cond = dict(class_embed=torch.randn(3, model.config.class_embed_dim, generator=g))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    calls = []
    real = streams.split
    monkeypatch.setattr(streams, "split", lambda fn, parts: calls.append(len(parts)) or real(fn, parts))
    out = {}
    try:
        for route in ("on", "off"):
            monkeypatch.setenv(streams.ENV, route)
            streams.route.cache_clear()
            with torch.inference_mode():
                out[route] = model(x, torch.tensor([3, 10, 500]), **cond)
    finally:
        torch.set_num_threads(threads)
        streams.route.cache_clear()
    assert calls == [2]  # streams ran once (rows 0 and 1-2), not with the switch off
    torch.testing.assert_close(out["on"], out["off"], atol=1e-5, rtol=0)
    assert (out["on"][0] - out["on"][1]).abs().max() > 1e-2  # the rows differ: a mix-up of rows would show


def test_hooks_see_whole_batches(monkeypatch):
    """With a forward hook on a submodule (capturing activations), the rows are not split into streams: the hook
    sees the batch in one call, as it would in diffusers. Without the hook the same call splits."""
    from musiclm_core.kernels import streams

    model = tiny("tiny-audioldm2")
    x, cond = audioldm2_inputs(B=2)
    monkeypatch.delenv(streams.ENV, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    streams.route.cache_clear()
    calls, seen = [], []
    real = streams.split
    monkeypatch.setattr(streams, "split", lambda fn, parts: calls.append(len(parts)) or real(fn, parts))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            model(x, 10, **cond)
            assert calls == [2]  # unhooked: two streams
            handle = model.mid.res.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
            model(x, 10, **cond)
            handle.remove()
    finally:
        torch.set_num_threads(threads)
        streams.route.cache_clear()
    assert seen == [2] and calls == [2]
