"""EnCodec on tiny configs: shapes, frame counts, chunking, input checks, checkpoints in every layout.

The transformers and audiocraft folders here are written by hand from one of our models (our key table run
backwards, weight norm split into g and v, training buffers added), so these tests need no reference library;
tests/parity/test_encodec_parity.py checks the same loaders on folders the reference libraries wrote.
"""

import dataclasses
import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from musiclm_core import CheckpointError
from musiclm_core.audio import resample
from musiclm_core.convert import encodec as convert
from musiclm_core.convert.keys import rename
from musiclm_core.encodec import (PRESETS, EnCodec, EnCodecConfig, conv1d_by_taps, conv_transpose1d_by_matmul,
                                  pad1d)

TINY = PRESETS["tiny"]  # 16 kHz, hop 8, 256-entry codebooks, 16 / 32 kbps -> 1 / 2 codebooks
# The 48 kHz model's extras at tiny size: stereo, GroupNorm, per-chunk RMS, 100-sample chunks 90 apart.
TINY_CHUNKED = dataclasses.replace(TINY, channels=2, group_norm=True, conv_shortcut=True, normalize=True,
                                   chunk_length_s=100 / 16_000, overlap=0.1)
TINY_CAUSAL = dataclasses.replace(TINY, causal=True, conv_shortcut=True, num_residual_layers=2,
                                  pad_mode="constant", trim_right_ratio=0.5)


def make(config: EnCodecConfig) -> EnCodec:
    torch.manual_seed(0)
    return EnCodec(config).eval()


@pytest.fixture(scope="module")
def codec():
    return make(TINY)


@pytest.fixture(scope="module")
def chunked():
    return make(TINY_CHUNKED)


# ---------------------------------------------------------------------------------------------------------------
# Shapes and frame counts


@pytest.mark.parametrize("config", [TINY, TINY_CAUSAL], ids=["tiny", "causal"])
@pytest.mark.parametrize("N", [1, 3, 7, 8, 9, 64, 333])
def test_frame_count_is_ceil_of_samples_over_hop(config, N):
    codec = make(config)
    wav = torch.randn(2, 1, N)
    codes = codec.encode(wav, bandwidth=32.0)
    T = math.ceil(N / codec.hop_length)
    assert codes.shape == (2, 2, T) and codes.dtype == torch.int64
    assert codec.encoder(wav).shape == (2, config.dimension, T)
    assert codec.decode(codes).shape == (2, 1, T * codec.hop_length)


def test_properties_and_bandwidths(codec):
    assert (codec.sample_rate, codec.hop_length, codec.frame_rate, codec.num_codebooks) == (16_000, 8, 2000, 2)
    wav = torch.randn(1, 1, 80)
    assert codec.encode(wav).shape == (1, 1, 10)  # default: the first target bandwidth, as transformers does
    assert codec.encode(wav, bandwidth=16.0).shape == (1, 1, 10)
    assert codec.encode(wav, bandwidth=32.0).shape == (1, 2, 10)
    # Fewer codebooks than the model holds decode too (a lower bandwidth).
    assert codec.decode(codec.encode(wav, bandwidth=16.0)).shape == (1, 1, 80)


@pytest.mark.parametrize("name,expected", [("24khz", (24_000, 320, 75, 32)), ("32khz", (32_000, 640, 50, 4)),
                                           ("48khz", (48_000, 320, 150, 16))])
def test_official_presets_derived_values(name, expected):
    c = PRESETS[name]
    assert (c.sample_rate, c.hop_length, c.frame_rate, c.num_codebooks) == expected
    assert [c.codebooks_for_bandwidth(b) for b in c.target_bandwidths] == {
        "24khz": [2, 4, 8, 16, 32], "32khz": [4], "48khz": [2, 4, 8, 16]}[name]


def test_batch_rows_are_independent(codec):
    wav = torch.randn(3, 1, 200)
    codes = codec.encode(wav, bandwidth=32.0)
    for b in range(3):
        assert torch.equal(codes[b: b + 1], codec.encode(wav[b: b + 1], bandwidth=32.0))
    audio = codec.decode(codes)
    torch.testing.assert_close(audio[1:2], codec.decode(codes[1:2]), rtol=0, atol=1e-6)


def test_quantiser_picks_the_nearest_entry_each_stage(codec):
    latents = codec.encoder(torch.randn(1, 1, 400)).detach()  # (1, D, T)
    codes = codec.quantizer.encode(latents, 2)
    residual = latents[0].T  # (T, D)
    for k in range(2):
        book = codec.quantizer.codebooks[k].detach()
        expected = torch.cdist(residual, book).argmin(-1)
        assert torch.equal(codes[0, k], expected)
        residual = residual - book[expected]
    decoded = codec.quantizer.decode(codes)  # (1, D, T)
    books = codec.quantizer.codebooks.detach()
    torch.testing.assert_close(decoded[0].T, books[0][codes[0, 0]] + books[1][codes[0, 1]])


def test_reflect_padding_of_signals_shorter_than_the_pad():
    x = torch.arange(1.0, 3.0).view(1, 1, 2)  # [1, 2], pad 3 on each side
    # Zero-extended to [1, 2, 0, 0], reflected to [0, 0, 2 | 1, 2, 0, 0 | 0, 2, 1], the 2 extra samples cut.
    assert pad1d(x, 3, 3, "reflect").flatten().tolist() == [0.0, 0.0, 2.0, 1.0, 2.0, 0.0, 0.0, 0.0]
    assert pad1d(x, 1, 1, "reflect").flatten().tolist() == [2.0, 1.0, 2.0, 1.0]
    assert pad1d(x, 2, 1, "constant").flatten().tolist() == [0.0, 0.0, 1.0, 2.0, 0.0]


def test_decoder_depends_on_every_codebook(codec):
    codes = codec.encode(torch.randn(1, 1, 160), bandwidth=32.0)
    audio = codec.decode(codes)
    for k in range(2):
        other = codes.clone()
        other[:, k] = (other[:, k] + 1) % codec.codebook_size
        assert (codec.decode(other) - audio).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Chunked, normalising models (the 48 kHz kind)


def test_chunked_encode_concatenates_chunks_and_returns_scales(chunked):
    c = chunked.config
    assert (c.chunk_length, c.chunk_stride, c.frames_per_chunk) == (100, 90, 13)
    wav = torch.randn(2, 2, 250)  # chunks at 0, 90, 180 of 100, 100, 70 samples -> 13 + 13 + 9 frames
    codes, scales = chunked.encode(wav, bandwidth=32.0, return_scales=True)
    assert codes.shape == (2, 2, 35) and scales.shape == (2, 3)
    # Each chunk is coded on its own, after dividing by its RMS.
    for i, (start, frames) in enumerate([(0, slice(0, 13)), (90, slice(13, 26)), (180, slice(26, 35))]):
        chunk = wav[..., start: start + 100]
        rms = chunk.mean(1).pow(2).mean(-1).sqrt() + 1e-8
        torch.testing.assert_close(scales[:, i], rms)
        expected = chunked.quantizer.encode(chunked.encoder(chunk / rms.view(2, 1, 1)), 2)
        assert torch.equal(codes[..., frames], expected)
    audio = chunked.decode(codes, scales)
    assert audio.shape == (2, 2, 180 + 9 * 8)


def test_chunked_decode_cross_fades_scaled_chunks(chunked):
    codes, scales = chunked.encode(torch.randn(1, 2, 180), bandwidth=32.0, return_scales=True)
    assert codes.shape[-1] == 13 + 12 and scales.shape == (1, 2)  # chunks [0, 100) and [90, 180)
    a = chunked.decoder(chunked.quantizer.decode(codes[..., :13])) * scales[0, 0]  # (1, 2, 104)
    b = chunked.decoder(chunked.quantizer.decode(codes[..., 13:])) * scales[0, 1]  # (1, 2, 96)
    audio = chunked.decode(codes, scales)
    assert audio.shape == (1, 2, 90 + 96)
    torch.testing.assert_close(audio[..., :90], a[..., :90])  # only the first chunk covers these
    torch.testing.assert_close(audio[..., 104:], b[..., 14:])  # only the second
    w = torch.linspace(0, 1, 106)[1:-1]
    w = 0.5 - (w - 0.5).abs()  # the triangle over 104 samples
    t = torch.arange(90, 104)
    expected = (w[t] * a[..., t] + w[t - 90] * b[..., t - 90]) / (w[t] + w[t - 90])
    torch.testing.assert_close(audio[..., 90:104], expected)


def test_scales_are_required_only_by_normalising_models(codec, chunked):
    codes = chunked.encode(torch.randn(1, 2, 150), bandwidth=32.0)
    with pytest.raises(ValueError, match=r"needs the scales, shape \(B, chunks\) = \(1, 2\)"):
        chunked.decode(codes)
    with pytest.raises(ValueError, match=r"scales must be \(B, chunks\) = \(1, 2\).*\(1, 3\)"):
        chunked.decode(codes, torch.ones(1, 3))
    assert chunked.decode(codes, torch.ones(1, 2)).shape == (1, 2, 90 + 8 * 8)
    with pytest.raises(ValueError, match="takes no scales"):
        codec.decode(codec.encode(torch.randn(1, 1, 16)), torch.ones(1, 1))
    assert codec.encode(torch.randn(1, 1, 16), return_scales=True)[1] is None


# ---------------------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("wav,message", [
    (torch.randn(1, 2, 100), r"takes 1-channel audio, got 2 channels"),
    (torch.randn(1, 1, 0), r"wav is empty: shape \(1, 1, 0\)"),
    (torch.randn(0, 1, 10), r"wav is empty: shape \(0, 1, 10\)"),
    (torch.randn(1, 100), r"must be \(B, C, N\).*got shape \(1, 100\) \(add the batch axis: wav\[None\]\)"),
    (torch.randn(100), r"must be \(B, C, N\).*got shape \(100,\)"),
    (torch.randn(1, 1, 1, 100), r"must be \(B, C, N\).*got shape \(1, 1, 1, 100\)"),
    (torch.zeros(1, 1, 10, dtype=torch.int16), r"floating point audio.*torch.int16"),
    (torch.tensor([[[0.0, float("nan"), 1.0]]]), r"1 NaN or infinite sample"),
    (torch.tensor([[[float("inf"), 0.0, -float("inf")]]]), r"2 NaN or infinite sample"),
])
def test_encode_rejects_bad_audio(codec, wav, message):
    with pytest.raises(ValueError, match=message):
        codec.encode(wav)


def test_encode_rejects_a_bandwidth_the_model_lacks(codec):
    with pytest.raises(ValueError, match=r"bandwidth 6.0 kbps.*one of \[16.0, 32.0\]"):
        codec.encode(torch.randn(1, 1, 16), bandwidth=6.0)


@pytest.mark.parametrize("codes,message", [
    (torch.full((1, 1, 4), 256), r"code 256 at \(b, k, t\) = \(0, 0, 0\) is out of range \[0, 256\)"),
    (torch.tensor([[[0, 3, -1]]]), r"code -1 at \(b, k, t\) = \(0, 0, 2\) is out of range"),
    (torch.zeros(1, 3, 4, dtype=torch.long), r"codes have 3 codebooks; this EnCodec has 2"),
    (torch.zeros(1, 0, 4, dtype=torch.long), r"codes have 0 codebooks"),
    (torch.zeros(2, 4, dtype=torch.long), r"codes must be \(B, K, T\).*got shape \(2, 4\)"),
    (torch.zeros(1, 1, 0, dtype=torch.long), r"codes are empty"),
    (torch.zeros(1, 1, 4), r"codes must be integers, got dtype torch.float32"),
])
def test_decode_rejects_bad_codes(codec, codes, message):
    with pytest.raises(ValueError, match=message):
        codec.decode(codes)


def test_decode_accepts_other_integer_dtypes(codec):
    codes = codec.encode(torch.randn(1, 1, 40), bandwidth=32.0)
    torch.testing.assert_close(codec.decode(codes.int()), codec.decode(codes))


def test_sample_rate_argument_resamples_or_refuses(codec):
    wav = torch.randn(1, 1, 400)  # 400 samples at 8 kHz -> 800 at 16 kHz -> 100 frames
    codes = codec.encode(wav, sample_rate=8000)
    assert torch.equal(codes, codec.encode(resample(wav, 8000, 16_000)))
    assert codes.shape == (1, 1, 100)
    assert torch.equal(codec.encode(wav, sample_rate=16_000, strict=True), codec.encode(wav))
    with pytest.raises(ValueError, match=r"wav is at 8000 Hz but this EnCodec runs at 16000 Hz \(strict=True"):
        codec.encode(wav, sample_rate=8000, strict=True)
    with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
        codec.encode(wav, sample_rate=-5)


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="power of two"):
        EnCodecConfig(codebook_size=1000)
    with pytest.raises(ValueError, match="leave no codebook"):
        EnCodecConfig(target_bandwidths=(0.1,))
    with pytest.raises(ValueError, match="pad_mode"):
        EnCodecConfig(pad_mode="replicate")
    with pytest.raises(ValueError, match="trim_right_ratio"):
        EnCodecConfig(trim_right_ratio=0.5)
    with pytest.raises(ValueError, match="overlap"):
        EnCodecConfig(chunk_length_s=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_native_round_trip(codec, tmp_path):
    codec.save_pretrained(tmp_path / "native")
    again = EnCodec.from_pretrained(tmp_path / "native")
    assert again.config == codec.config
    state = again.state_dict()
    assert list(state) == list(codec.state_dict())
    assert all(torch.equal(state[k], v) for k, v in codec.state_dict().items())
    wav = torch.randn(1, 1, 120)
    assert torch.equal(again.encode(wav, 32.0), codec.encode(wav, 32.0))
    with pytest.raises(FileExistsError, match="overwrite"):
        codec.save_pretrained(tmp_path / "native")
    codec.save_pretrained(tmp_path / "native", overwrite=True)


def test_native_checkpoint_with_missing_and_misshaped_keys(codec, tmp_path):
    codec.save_pretrained(tmp_path / "bad")
    state = load_file(tmp_path / "bad" / "model.safetensors")
    del state["decoder.stages.1.up.bias"]
    state["encoder.conv_in.weight"] = torch.zeros(8, 1, 5)
    save_file(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        EnCodec.from_pretrained(tmp_path / "bad")
    assert "missing keys (1):\n    decoder.stages.1.up.bias" in str(err.value)
    assert "encoder.conv_in.weight: checkpoint (8, 1, 5), model (8, 1, 7)" in str(err.value)


def test_native_config_with_unknown_field(codec, tmp_path):
    codec.save_pretrained(tmp_path / "cfg")
    meta = json.loads((tmp_path / "cfg" / "config.json").read_text())
    meta["config"]["dropout"] = 0.1
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unknown EnCodecConfig fields \['dropout'\]"):
        EnCodec.from_pretrained(tmp_path / "cfg")


def foreign_state(model: EnCodec, table, *, g_suffix: str, v_suffix: str, buffers: str) -> dict[str, torch.Tensor]:
    """Our state dict in a reference layout: keys through `table` backwards, conv weights split into weight
    norm's g and v (v scaled, so that folding has work to do), codebooks unstacked, training buffers added."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for q, book in enumerate(state.pop("quantizer.codebooks")):
        state[f"quantizer.codebooks.{q}"] = book
    theirs = rename(state, [(ours, their) for their, ours in table(model.config)], source="test")
    out = {}
    for key, value in theirs.items():
        if key.endswith(".weight") and value.dim() == 3:  # a conv (ConvTranspose too: norm over dim 0 either way)
            base = key[: -len(".weight")]
            out[base + g_suffix] = value.norm(dim=(1, 2), keepdim=True)
            out[base + v_suffix] = 3.0 * value
        else:
            out[key] = value
        if key.endswith(".embed"):
            V = value.shape[0]
            out[key + "_avg"] = torch.randn_like(value)
            out[key[: -len("embed")] + "cluster_size"] = torch.rand(V)
            out[key[: -len("embed")] + "inited"] = torch.ones(1)
    assert any(k.endswith("embed_avg") for k in out) and buffers in next(k for k in out if k.endswith("inited"))
    return out


def hf_config_dict(config: EnCodecConfig) -> dict:
    return {
        "architectures": ["EncodecModel"], "model_type": "encodec", "transformers_version": "4.31.0",
        "torch_dtype": "float32", "sampling_rate": config.sample_rate, "audio_channels": config.channels,
        "num_filters": config.num_filters, "upsampling_ratios": list(config.ratios), "hidden_size": config.dimension,
        "codebook_size": config.codebook_size, "codebook_dim": config.dimension,
        "target_bandwidths": list(config.target_bandwidths), "num_residual_layers": config.num_residual_layers,
        "num_lstm_layers": config.lstm_layers, "kernel_size": config.kernel_size,
        "last_kernel_size": config.last_kernel_size, "residual_kernel_size": config.residual_kernel_size,
        "dilation_growth_rate": config.dilation_base, "compress": config.compress, "use_causal_conv": config.causal,
        "pad_mode": config.pad_mode, "trim_right_ratio": config.trim_right_ratio,
        "use_conv_shortcut": config.conv_shortcut, "normalize": config.normalize,
        "norm_type": "time_group_norm" if config.group_norm else "weight_norm",
        "chunk_length_s": config.chunk_length_s, "overlap": config.overlap,
    }


def write_transformers_folder(model: EnCodec, folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config)))
    state = foreign_state(model, convert.transformers_table, g_suffix=".parametrizations.weight.original0",
                          v_suffix=".parametrizations.weight.original1", buffers="codebook.inited")
    save_file(state, folder / "model.safetensors")
    return folder


XP_CFG = """\
device: cpu
dtype: float32
sample_rate: {sample_rate}
channels: {channels}
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${{sample_rate}}
  channels: ${{channels}}
  causal: {causal}
  renormalize: {normalize}
seanet:
  dimension: {dimension}
  channels: ${{channels}}
  causal: {causal}
  n_filters: {num_filters}
  n_residual_layers: {num_residual_layers}
  ratios: {ratios}
  activation: ELU
  activation_params:
    alpha: 1.0
  norm: {norm}
  norm_params: {{}}
  kernel_size: {kernel_size}
  residual_kernel_size: {residual_kernel_size}
  last_kernel_size: {last_kernel_size}
  dilation_base: {dilation_base}
  pad_mode: {pad_mode}
  true_skip: {true_skip}
  compress: {compress}
  lstm: {lstm_layers}
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: {trim_right_ratio}
    final_activation: null
    final_activation_params: null
  encoder: {{}}
rvq:
  n_q: {n_q}
  q_dropout: false
  bins: {codebook_size}
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
  orthogonal_reg_max_codes: null
dataset:
  segment_duration: 1.0
  batch_size: 64
logging:
  folder: ${{dora.dir}}/logs
  user: ${{oc.env:USER}}
"""


def xp_cfg(config: EnCodecConfig) -> str:
    fields = dataclasses.asdict(config)
    fields.update(ratios=list(config.ratios), norm="time_group_norm" if config.group_norm else "weight_norm",
                  true_skip=not config.conv_shortcut, n_q=config.num_codebooks)
    return XP_CFG.format(**fields)


def write_audiocraft_folder(model: EnCodec, folder, cfg: str | None = None):
    folder.mkdir()
    state = foreign_state(model, convert.audiocraft_table, g_suffix=".weight_g", v_suffix=".weight_v",
                          buffers="_codebook.inited")
    package = {"best_state": state, "xp.cfg": cfg or xp_cfg(model.config), "version": "1.3.0", "exported": True}
    torch.save(package, folder / "compression_state_dict.bin")
    return folder


@pytest.mark.parametrize("config", [TINY, TINY_CHUNKED, TINY_CAUSAL], ids=["tiny", "chunked", "causal"])
@pytest.mark.parametrize("layout", ["transformers", "audiocraft"])
def test_from_pretrained_on_official_layouts(config, layout, tmp_path):
    if layout == "audiocraft" and config.chunk_length_s is not None:
        config = dataclasses.replace(config, chunk_length_s=None, overlap=None)  # audiocraft never chunks
    model = make(config)
    write = write_transformers_folder if layout == "transformers" else write_audiocraft_folder
    loaded = EnCodec.from_pretrained(write(model, tmp_path / layout))
    if layout == "audiocraft":  # its config gives the codebook count, which we turn into one bandwidth
        config = dataclasses.replace(config, target_bandwidths=(32.0,))
    assert loaded.config == config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    wav = torch.randn(2, config.channels, 300)
    codes, scales = model.encode(wav, 32.0, return_scales=True)
    assert torch.equal(loaded.encode(wav, 32.0), codes)
    torch.testing.assert_close(loaded.decode(codes, scales), model.decode(codes, scales), rtol=0, atol=1e-5)


def test_transformers_config_with_unknown_field(codec, tmp_path):
    folder = write_transformers_folder(codec, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["use_snake_activation"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"fields the converter does not know: \['use_snake_activation'\]"):
        EnCodec.from_pretrained(folder)


def test_transformers_checkpoint_with_unknown_and_incomplete_keys(codec, tmp_path):
    folder = write_transformers_folder(codec, tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    state["encoder.layers.99.conv.bias"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    encoder.layers.99.conv.bias"):
        EnCodec.from_pretrained(folder)
    del state["encoder.layers.99.conv.bias"], state["decoder.layers.0.conv.parametrizations.weight.original0"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weight norm of decoder.layers.0.conv is incomplete"):
        EnCodec.from_pretrained(folder)


def test_musicgen_folder_gives_its_audio_encoder(codec, tmp_path):
    folder = write_transformers_folder(codec, tmp_path / "codec")
    state = {f"audio_encoder.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["decoder.lm_heads.0.weight"] = torch.zeros(4, 4)
    (tmp_path / "mg").mkdir()
    save_file(state, tmp_path / "mg" / "model.safetensors")
    audio_encoder = {**json.loads((folder / "config.json").read_text()), "do_sample": False, "top_k": 50}
    (tmp_path / "mg" / "config.json").write_text(json.dumps({"model_type": "musicgen",
                                                             "audio_encoder": audio_encoder}))
    wav = torch.randn(1, 1, 64)
    assert torch.equal(EnCodec.from_pretrained(tmp_path / "mg").encode(wav, 32.0), codec.encode(wav, 32.0))


def test_audiocraft_reports_its_padding_mode(tmp_path, caplog):
    model = make(dataclasses.replace(TINY, pad_mode="constant"))
    with caplog.at_level(logging.INFO, logger="musiclm_core.convert.encodec"):
        loaded = EnCodec.from_pretrained(write_audiocraft_folder(model, tmp_path / "ac"))
    assert loaded.config.pad_mode == "constant"
    assert any("pad_mode is 'constant'" in r.message and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("edit,message", [
    (("true_skip: True", "true_skip: False"), "does not fit EnCodec"),  # shortcut keys expected, absent
    (("activation: ELU", "activation: ReLU"), r"only ELU\(alpha=1\) is supported"),
    (("final_activation: null", "final_activation: Tanh"), "final activation"),
    (("  encoder: {}", "  encoder: {n_filters: 4}"), "per-side seanet overrides"),
    (("  pad_mode:", "  snake: true\n  pad_mode:"), r"seanet settings the converter does not know: \['snake'\]"),
    (("  n_q: 2", "  n_q: 3"), r"codebooks \[2\] are missing|does not fit"),
    (("sample_rate: 16000", "sample_rate: ${nothing.here}"), r"leaves sample_rate = \$\{nothing.here\} unresolved"),
    (("autoencoder: seanet", "autoencoder: dac"), "only the seanet autoencoder"),
])
def test_audiocraft_config_errors(codec, tmp_path, edit, message):
    cfg = xp_cfg(codec.config)
    assert edit[0] in cfg
    folder = write_audiocraft_folder(codec, tmp_path / "ac", cfg.replace(edit[0], edit[1], 1))
    with pytest.raises(CheckpointError, match=message):
        EnCodec.from_pretrained(folder)


def test_audiocraft_pointer_is_followed(codec, tmp_path):
    codec.save_pretrained(tmp_path / "native")
    (tmp_path / "stereo").mkdir()
    # What the stereo MusicGen repos hold: a 589-byte pickle naming the transformers codec repo.
    torch.save({"pretrained": str(tmp_path / "native"), "exported": True, "version": "1.2.0"},
               tmp_path / "stereo" / "compression_state_dict.bin")
    wav = torch.randn(1, 1, 48)
    assert torch.equal(EnCodec.from_pretrained(tmp_path / "stereo").encode(wav), codec.encode(wav))


def test_audiocraft_pointer_to_an_unreachable_repo(tmp_path):
    (tmp_path / "stereo").mkdir()
    torch.save({"pretrained": "musiclm-core-tests/no-such-codec", "exported": True, "version": "1.2.0"},
               tmp_path / "stereo" / "compression_state_dict.bin")
    message = r"(?s)points to 'musiclm-core-tests/no-such-codec'.*could not get .*pass the folder"
    with pytest.raises(CheckpointError, match=message):
        EnCodec.from_pretrained(tmp_path / "stereo")


def test_audiocraft_folder_without_the_codec(tmp_path):
    (tmp_path / "lm_only").mkdir()
    torch.save({"best_state": {}}, tmp_path / "lm_only" / "state_dict.bin")
    with pytest.raises(CheckpointError, match="without compression_state_dict.bin"):
        EnCodec.from_pretrained(tmp_path / "lm_only")


# ---------------------------------------------------------------------------------------------------------------
# The CPU inference routes against torch's ops (which the layers use when gradients are on)


def test_conv_routes_match_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 50)
    w, b = torch.randn(5, 6, 3), torch.randn(5)
    for dilation in (1, 3):
        for left, right in ((0, 0), (2 * dilation, 0), (dilation, dilation), (0, 2 * dilation)):
            for mode in ("reflect", "constant"):
                expected = F.conv1d(pad1d(x, left, right, mode), w, b, dilation=dilation)
                torch.testing.assert_close(conv1d_by_taps(x, w, b, dilation, left, right, mode), expected)
        # Short signals, around the length below which it pads and calls torch's conv (the shortest ones are
        # shorter than the pads: reflection of a zero-extended signal, G5), and pads wider than the kernel.
        for N in range(1, 12):
            for left, right in ((3, 3), (7, 0), (1, 8)):
                for mode in ("reflect", "constant"):
                    expected = F.conv1d(pad1d(x[..., :N], left, right, mode), w, b, dilation=dilation)
                    got = conv1d_by_taps(x[..., :N], w, b, dilation, left, right, mode)
                    torch.testing.assert_close(got, expected, msg=f"N={N} pads={left},{right} {mode}")
    for stride in (1, 2, 5):
        wt = torch.randn(6, 4, 2 * stride)
        torch.testing.assert_close(conv_transpose1d_by_matmul(x, wt, b[:4], stride),
                                   F.conv_transpose1d(x, wt, b[:4], stride))


@pytest.mark.parametrize("config", [TINY, TINY_CHUNKED, TINY_CAUSAL], ids=["tiny", "chunked", "causal"])
def test_inference_routes_match_the_autograd_routes(config):
    codec = make(config)
    wav = torch.randn(2, config.channels, 333)
    latents = codec.encoder(wav)  # gradients on: torch's conv / LSTM ops
    assert latents.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(codec.encoder(wav), latents.detach(), rtol=0, atol=1e-5)
        audio = codec.decoder(latents)
    torch.testing.assert_close(audio, codec.decoder(latents).detach(), rtol=0, atol=1e-5)
