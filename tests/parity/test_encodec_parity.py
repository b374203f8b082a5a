"""EnCodec against the reference implementations, on checkpoints they wrote.

* transformers: `EncodecModel` at tiny configs covering every code path (the 32 kHz MusicGen codec's shape, the
  24 kHz causal one with conv shortcuts, constant padding with odd kernels and a partial right trim, and the
  48 kHz kind: stereo, GroupNorm, RMS normalisation, chunks with overlap), saved with `save_pretrained`, loaded
  by transformers itself and by `EnCodec.from_pretrained`. The full official configs run under `-m slow`.
* audiocraft layout: the original `encodec` package (facebookresearch/encodec; test environment only:
  `pip install --no-deps encodec==0.1.1`, as its torchaudio requirement would replace torch; it imports torchaudio,
  see tests/install_torchaudio_reference.sh). Its modules are the ones audiocraft's EnCodec copied, and its
  state-dict keys are the ones of audiocraft's `compression_state_dict.bin`: `encoder.model.N.conv.conv.weight_g`,
  `decoder.model.N.convtr.convtr.weight_v`, `quantizer.vq.layers.N._codebook.{embed,embed_avg,cluster_size,inited}`.
  Its SEANet encoder/decoder and residual VQ are built with the 32 kHz hyper-parameters, wrapped with an xp.cfg
  as audiocraft exports them, and loaded by `EnCodec.from_pretrained`.

Random codebooks would make these tests hollow (transformers initialises them to zeros: every frame gets code 0
and the audio does not depend on the codes; specs/NOTES.md), so each codebook is filled with frames of the residual
it will see, the decoder's gains are raised so that its output depends clearly on its input, and every test checks
that many distinct codes occur and that changing the codes changes the audio by far more than the tolerance.

Tolerances: codes identical; latents and audio max abs error <= 1e-4 (fp32).
"""

import pytest
import torch

from musiclm_core import EnCodec
from musiclm_core.convert.encodec import config_from_transformers
from musiclm_core.encodec import PRESETS

transformers = pytest.importorskip("transformers")
from transformers import EncodecConfig, EncodecModel  # noqa: E402

ATOL = 1e-4

# Tiny configs: 8 kHz, hop 8 -> 1000 frames/s; 1024-entry codebooks (10 bits) -> 10 kbps per codebook.
BASE = dict(sampling_rate=8000, upsampling_ratios=[4, 2], num_filters=8, hidden_size=16, codebook_size=1024,
            target_bandwidths=[10.0, 20.0, 40.0])
TINY = {
    # facebook/encodec_32khz's shape: non-causal, reflect padding, identity skips, 2 LSTM layers.
    "32khz-like": dict(BASE, use_causal_conv=False, use_conv_shortcut=False, pad_mode="reflect"),
    # facebook/encodec_24khz's shape: causal, conv shortcuts, and two residual layers (dilations 1 and 2).
    "24khz-like": dict(BASE, use_causal_conv=True, use_conv_shortcut=True, num_residual_layers=2, num_lstm_layers=1),
    # Zero padding, odd kernels, dilation base 3, causal with the trim split between both ends.
    "odd": dict(BASE, use_causal_conv=True, pad_mode="constant", trim_right_ratio=0.5, kernel_size=5,
                last_kernel_size=3, residual_kernel_size=5, dilation_growth_rate=3, num_residual_layers=2,
                compress=4, upsampling_ratios=[3, 2], target_bandwidths=[14.0, 28.0]),
    # facebook/encodec_48khz's kind: stereo, GroupNorm, RMS normalisation, 400-sample chunks 360 apart.
    "48khz-like": dict(BASE, audio_channels=2, use_causal_conv=False, use_conv_shortcut=True,
                       norm_type="time_group_norm", normalize=True, chunk_length_s=0.05, overlap=0.1),
}
# The official configs (transformers' converter, convert_encodec_checkpoint_to_pytorch.py; specs §1.4).
OFFICIAL = {
    "24khz": dict(),  # EncodecConfig's defaults are the 24 kHz model
    "32khz": dict(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=64, sampling_rate=32_000,
                  codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False),
    "48khz": dict(upsampling_ratios=[8, 5, 4, 2], target_bandwidths=[3.0, 6.0, 12.0, 24.0], sampling_rate=48_000,
                  audio_channels=2, use_causal_conv=False, norm_type="time_group_norm", normalize=True,
                  chunk_length_s=1.0, overlap=0.01),
}


@torch.no_grad()
def fill_codebooks(latents: torch.Tensor, codebooks: list[torch.Tensor], seed: int = 0) -> None:
    """Fill each codebook (V, D), in place, with frames of the residual it will see: latents (B, D, T) ->
    residual after codebooks 0..k-1 -> entries of codebook k. Each entry is jittered by the residual's own spread,
    so the entries differ and the residual does not shrink to nothing over 32 codebooks (which would leave the
    deep codebooks with one code)."""
    g = torch.Generator().manual_seed(seed)
    residual = latents.transpose(1, 2).reshape(-1, latents.shape[1])  # (B*T, D)
    for book in codebooks:
        V, D = book.shape
        pick = torch.randint(len(residual), (V,), generator=g)
        book.copy_(residual[pick] + residual.std(0) * torch.randn(V, D, generator=g))
        residual = residual - book[torch.cdist(residual, book).argmin(-1)]


def write_hf_checkpoint(folder, config_kwargs: dict, fill_samples: int) -> None:
    torch.manual_seed(0)
    config = EncodecConfig(**config_kwargs)
    model = EncodecModel(config).eval()
    wav = torch.randn(2, config.audio_channels, fill_samples, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        # One thread: torch's LSTM pays a thread synchronisation per time step, seconds over these 1000+ steps
        # on a loaded 2-core machine; this only makes the fixture's weights.
        torch.set_num_threads(1)
        with torch.no_grad():
            latents = model.encoder(wav)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        fill_codebooks(latents, [layer.codebook.embed for layer in model.quantizer.layers])
        # At transformers' initialisation the decoded audio is a near-constant ~0.1 that the codes move by ~1e-3;
        # doubling the decoder's weight-norm gains makes it of order 1 and clearly code-dependent.
        for name, param in model.decoder.named_parameters():
            if name.endswith("parametrizations.weight.original0"):
                param.mul_(2.0)
    model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encodec_hf")
    for name, kwargs in TINY.items():
        write_hf_checkpoint(root / name, kwargs, fill_samples=8192)
    return root


def hf_encode(model, wav, bandwidth):
    """transformers' codes laid out as ours: (chunks, B, K, frames) with a padded last chunk -> (B, K, T)."""
    out = model.encode(wav, bandwidth=bandwidth)
    codes = torch.cat(list(out.audio_codes), dim=-1)
    if out.last_frame_pad_length:
        codes = codes[..., : codes.shape[-1] - out.last_frame_pad_length]
    scales = None if out.audio_scales[0] is None else torch.cat(out.audio_scales, dim=1)  # (B, chunks)
    return out, codes, scales


def check_parity(hf, ours, wav, bandwidths):
    """Codes, scales, latents and audio against transformers; returns (max latent err, max audio err)."""
    with torch.no_grad():
        latent_err = (hf.encoder(wav) - ours.encoder(wav)).abs().max().item()
        assert latent_err <= ATOL
        audio_err = 0.0
        for bandwidth in bandwidths:
            out, codes, scales = hf_encode(hf, wav, bandwidth)
            our_codes, our_scales = ours.encode(wav, bandwidth, return_scales=True)
            assert our_codes.shape == codes.shape
            assert torch.equal(our_codes, codes), f"codes differ at {bandwidth} kbps"
            if scales is None:
                assert our_scales is None
            else:
                torch.testing.assert_close(our_scales, scales, rtol=1e-6, atol=0)
            audio = hf.decode(out.audio_codes, out.audio_scales, last_frame_pad_length=out.last_frame_pad_length)[0]
            our_audio = ours.decode(our_codes, our_scales)
            assert our_audio.shape == audio.shape
            audio_err = max(audio_err, (audio - our_audio).abs().max().item())
            assert audio_err <= ATOL, f"audio differs by {audio_err} at {bandwidth} kbps"
    return latent_err, audio_err


def check_not_degenerate(ours, wav, bandwidth, min_distinct: int):
    """Many distinct codes in every codebook, and audio that changes when the codes do."""
    codes, scales = ours.encode(wav, bandwidth, return_scales=True)
    for k in range(codes.shape[1]):
        assert codes[:, k].unique().numel() >= min_distinct, f"codebook {k} uses few codes"
    audio = ours.decode(codes, scales)
    other = ours.decode((codes + 1) % ours.codebook_size, scales)
    assert (audio - other).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_configs_match_transformers(tiny_checkpoints, name):
    folder = tiny_checkpoints / name
    hf = EncodecModel.from_pretrained(folder).eval()
    ours = EnCodec.from_pretrained(folder)
    C = hf.config.audio_channels
    g = torch.Generator().manual_seed(2)
    bandwidths = [hf.config.target_bandwidths[0], hf.config.target_bandwidths[-1]]
    # The chunked model cuts 1200 samples into chunks at 0, 360, 720, 1080 (400, 400, 400 and 120 samples).
    wav = torch.randn(2, C, 1200 if hf.config.chunk_length_s else 2000, generator=g)
    check_not_degenerate(ours, wav, bandwidths[-1], min_distinct=100)
    errors = [check_parity(hf, ours, wav, bandwidths)]
    # A ragged end (for the chunked model, 761 samples: a last chunk of 41) and a single sample, shorter than
    # every reflect pad (G5).
    for N in (761 if hf.config.chunk_length_s else 1003, 1):
        errors.append(check_parity(hf, ours, torch.randn(2, C, N, generator=g), bandwidths))
    print(f"\n{name}: latent max abs err {max(e[0] for e in errors):.2e}, "
          f"audio max abs err {max(e[1] for e in errors):.2e}")


def test_official_configs_translate_to_our_presets():
    for name, kwargs in OFFICIAL.items():
        assert config_from_transformers(EncodecConfig(**kwargs).to_dict()) == PRESETS[name], name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_configs_match_transformers(tmp_path, name):
    """Full size, random weights: 24 kHz (2 s), 32 kHz (2 s), 48 kHz (2.3 s: three 1 s chunks, the last short)."""
    write_hf_checkpoint(tmp_path / name, OFFICIAL[name], fill_samples=48_000)
    hf = EncodecModel.from_pretrained(tmp_path / name).eval()
    ours = EnCodec.from_pretrained(tmp_path / name)
    sr, C = hf.config.sampling_rate, hf.config.audio_channels
    # Unit-variance noise like the audio that filled the codebooks, so that the codes spread over them.
    wav = torch.randn(1, C, int(2.3 * sr) if name == "48khz" else 2 * sr, generator=torch.Generator().manual_seed(3))
    bandwidths = hf.config.target_bandwidths
    check_not_degenerate(ours, wav, bandwidths[-1], min_distinct=40)
    latent_err, audio_err = check_parity(hf, ours, wav, [bandwidths[0], bandwidths[-1]])
    print(f"\n{name}: latent max abs err {latent_err:.2e}, audio max abs err {audio_err:.2e}")


# ---------------------------------------------------------------------------------------------------------------
# audiocraft layout, against the original `encodec` package


XP_CFG_32KHZ = """\
# As audiocraft exports it (OmegaConf.to_yaml of the solver config): unresolved ${...} references included.
device: cuda
sample_rate: 32000
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: false
seanet:
  dimension: 128
  channels: ${channels}
  causal: false
  n_filters: 64
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {"alpha": 1.}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: PAD_MODE
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 4
  q_dropout: false
  bins: 2048
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
  orthogonal_reg_active_codes_only: false
  orthogonal_reg_max_codes: null
optim:
  lr: 3.0e-4
  epochs: 200
"""


# audiocraft's own default is "constant" (config/model/encodec/default.yaml); "reflect" is what transformers uses.
@pytest.mark.parametrize("pad_mode", ["constant", pytest.param("reflect", marks=pytest.mark.slow)])
def test_audiocraft_layout_matches_the_encodec_package(tmp_path, pad_mode):
    pytest.importorskip("encodec", reason="pip install --no-deps encodec==0.1.1 (the original EnCodec package)")
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    # The 32 kHz model's hyper-parameters (the xp.cfg above; audiocraft config/model/encodec/encodec_musicgen_32khz).
    seanet = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                  norm="weight_norm", causal=False, pad_mode=pad_mode, true_skip=True, compress=2, lstm=2)
    torch.manual_seed(0)
    reference = torch.nn.Module()
    reference.encoder = SEANetEncoder(**seanet).eval()
    reference.decoder = SEANetDecoder(**seanet).eval()
    reference.quantizer = ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048, kmeans_init=False).eval()
    wav = 0.1 * torch.randn(1, 1, 32_000, generator=torch.Generator().manual_seed(4))  # 1 s, 50 frames
    with torch.no_grad():
        fill_codebooks(reference.encoder(wav), [layer._codebook.embed for layer in reference.quantizer.vq.layers])
        for name, param in reference.decoder.named_parameters():
            if name.endswith("weight_g"):
                param.mul_(2.0)  # as in write_hf_checkpoint: audio of order 0.1-1 that depends on the codes
    state = reference.state_dict()
    assert "encoder.model.0.conv.conv.weight_g" in state and "decoder.model.3.convtr.convtr.weight_v" in state
    assert "quantizer.vq.layers.3._codebook.embed_avg" in state
    (tmp_path / "ac").mkdir()
    torch.save({"best_state": state, "xp.cfg": XP_CFG_32KHZ.replace("PAD_MODE", pad_mode),
                "version": "1.3.0", "exported": True}, tmp_path / "ac" / "compression_state_dict.bin")

    ours = EnCodec.from_pretrained(tmp_path / "ac")
    assert ours.config == PRESETS["32khz"].__class__(**{**PRESETS["32khz"].to_dict(), "pad_mode": pad_mode})
    check_not_degenerate(ours, wav, 2.2, min_distinct=20)
    with torch.no_grad():
        latents = reference.encoder(wav)
        assert (ours.encoder(wav) - latents).abs().max() <= ATOL
        codes = reference.quantizer.encode(latents, 50, 2.2)  # (K, B, T); the "sample_rate" it takes is frames/s
        assert torch.equal(ours.encode(wav, 2.2), codes.transpose(0, 1))
        audio = reference.decoder(reference.quantizer.decode(codes))
        assert (ours.decode(codes.transpose(0, 1)) - audio).abs().max() <= ATOL
