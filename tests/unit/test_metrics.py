"""musiclm_core.metrics: the Fréchet distance against closed forms and scipy's sqrtm route, FAD's behaviour (0 on
a set against itself, growing with a perturbation), the streaming statistics, the embeddings (EnCodec frames,
CLAP windows) against direct calls of the models, the reference cache, captions and their errors; the melody
chroma similarity (its chroma of long clips against one STFT of the whole clip, exact) and file pairing.
(tests/parity/test_metrics_parity.py holds FAD against fadtk and frechet-audio-distance, the melody metric against
audiocraft's.)

Tolerances (float64 statistics): closed forms and scipy's route 1e-9 relative; FAD of a set against itself
<= 1e-6; streamed statistics vs numpy's one-shot mean and covariance 1e-9; embeddings vs direct model calls
(fp32) 1e-5.
"""

import json
import os

import numpy as np
import pytest
import torch

from musiclm_core import metrics
from musiclm_core.audio import save_audio
from musiclm_core.encodec import PRESETS as CODEC_PRESETS, EnCodec, EnCodecConfig
from musiclm_core.metrics import (ClapEmbedding, EmbeddingStats, EnCodecEmbedding, StatsAccumulator, fad,
                                  frechet_distance)

SR = 16_000  # the tiny EnCodec's rate


def _random_cov(rng, D, rank=None):
    A = rng.normal(size=(D, rank or D))
    return A @ A.T / D + (0 if rank else 0.1 * np.eye(D))


def _closed_form_diag(mu1, var1, mu2, var2):
    """Fréchet distance of two Gaussians with diagonal (or jointly diagonalisable) covariances."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())


def test_frechet_closed_form_diagonal_and_commuting():
    rng = np.random.default_rng(0)
    D = 6
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    var1, var2 = rng.uniform(0.1, 3, D), rng.uniform(0.1, 3, D)
    expected = _closed_form_diag(mu1, var1, mu2, var2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)
    Q, _ = np.linalg.qr(rng.normal(size=(D, D)))  # a shared rotation: the covariances commute
    got = frechet_distance(mu1, Q @ np.diag(var1) @ Q.T, mu2, Q @ np.diag(var2) @ Q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_closed_form_scaled_covariance():
    """cov2 = c^2 cov1: the distance is |mu1 - mu2|^2 + tr(cov1) (1 - c)^2."""
    rng = np.random.default_rng(1)
    D, c = 8, 1.7
    cov = _random_cov(rng, D)
    mu1, mu2 = rng.normal(size=D), rng.normal(size=D)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(cov) * (1 - c) ** 2
    assert frechet_distance(mu1, cov, mu2, c ** 2 * cov) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_route():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    for D, n in ((4, 50), (16, 300), (64, 500)):
        a = EmbeddingStats.from_embeddings(rng.normal(size=(n, D)) @ rng.normal(size=(D, D)), "x")
        b = EmbeddingStats.from_embeddings(rng.normal(size=(n, D)) * 1.3 + 0.2, "x")
        root = scipy_linalg.sqrtm(a.cov @ b.cov).real
        reference = ((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(root)
        assert fad(a, b) == pytest.approx(reference, rel=1e-9)


def test_frechet_on_singular_covariances_is_finite():
    """Covariances of rank 3 in 10 dimensions (fewer samples than dimensions): the eigh route stays real and
    exact, |mu1 - mu2|^2 for equal covariances."""
    rng = np.random.default_rng(3)
    cov = _random_cov(rng, 10, rank=3)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-8, abs=1e-8)
    assert np.isfinite(frechet_distance(mu1, cov, mu2, _random_cov(rng, 10, rank=2)))


def test_fad_of_a_set_against_itself_is_zero():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 50.0  # a large mean, as real embeddings have
    stats = EmbeddingStats.from_embeddings(x, "x")
    assert fad(stats, stats) <= 1e-6
    shuffled = EmbeddingStats.from_embeddings(x[rng.permutation(len(x))], "x")
    assert fad(stats, shuffled) <= 1e-6
    assert fad(stats, EmbeddingStats.from_embeddings(x + 0.1, "x")) > 1e-3  # the fixture listens


def test_fad_grows_with_the_perturbation():
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    noise = rng.normal(size=reference.shape)
    ref = EmbeddingStats.from_embeddings(reference, "x")
    values = [fad(EmbeddingStats.from_embeddings(reference + s * noise, "x"), ref) for s in (0, 0.2, 0.5, 1, 2)]
    assert values[0] <= 1e-6
    assert all(b > a * 1.5 for a, b in zip(values[1:], values[2:])) and values[1] > 1e-3


def test_fad_refuses_different_embeddings():
    a = EmbeddingStats.from_embeddings(np.random.default_rng(0).normal(size=(20, 4)), "clap:a")
    with pytest.raises(ValueError, match="different embeddings: clap:a .* clap:b"):
        fad(a, EmbeddingStats.from_embeddings(np.random.default_rng(1).normal(size=(20, 4)), "clap:b"))
    with pytest.raises(ValueError, match=r"means \(D,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streamed_statistics_match_numpy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1000, 12)) * rng.uniform(0.01, 3, 12) + 1e4  # far from 0: sums of squares would cancel
    acc = StatsAccumulator()
    for chunk in np.array_split(x, [1, 7, 300, 301, 800]):
        acc.add(torch.from_numpy(chunk))  # tensors and arrays alike
    stats = acc.stats("x")
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"\(n, D\) with n >= 1"):
        acc.add(np.zeros((0, 12)))
    with pytest.raises(ValueError, match="dimension 5 added to statistics of dimension 12"):
        acc.add(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(np.full((2, 12), np.nan))


def test_check_count_says_how_many_are_needed():
    metrics.check_count(17, 16, what="x", files=1)
    with pytest.raises(ValueError, match=r"generated: 12 embeddings from 3 file\(s\).* 16-dimensional .*at least "
                                         r"17: add about 2 more file"):
        metrics.check_count(12, 16, what="generated", files=3)


def test_stats_file_round_trip_and_bad_file(tmp_path):
    stats = EmbeddingStats.from_embeddings(np.random.default_rng(7).normal(size=(30, 5)), "encodec:m", )
    stats.fingerprint = "abc"
    stats.save(tmp_path / "s.safetensors")
    again = EmbeddingStats.load(tmp_path / "s.safetensors")
    assert (again.count, again.embedding, again.fingerprint) == (30, "encodec:m", "abc")
    np.testing.assert_array_equal(again.cov, stats.cov)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors is not an embedding statistics file"):
        EmbeddingStats.load(tmp_path / "bad.safetensors")


def test_stats_of_another_version_are_stale(tmp_path):
    """Version 1 statistics came from audio resampled with another filter: refused, so the cache recomputes."""
    from safetensors.numpy import save_file

    stats = EmbeddingStats.from_embeddings(np.random.default_rng(7).normal(size=(30, 5)), "encodec:m")
    save_file({"mean": stats.mean, "cov": stats.cov}, str(tmp_path / "old.safetensors"),
              metadata={"format": metrics.STATS_FORMAT, "version": "1", "count": "30", "embedding": "encodec:m"})
    with pytest.raises(ValueError, match=r"old.safetensors holds statistics of version '1' \(this is '2'"):
        EmbeddingStats.load(tmp_path / "old.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


def _off_init(model, scale=0.1):
    """Every parameter moved off its init (the tiny codec's init maps audio to near-constant embeddings)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return _off_init(EnCodec(CODEC_PRESETS["tiny"]))


@pytest.fixture(scope="module")
def clap(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from clap_fixtures import tiny_clap

    return tiny_clap(tmp_path_factory.mktemp("bpe"))


def _noise(seconds, seed, rate=SR):
    return 0.1 * torch.randn(1, int(seconds * rate), generator=torch.Generator().manual_seed(seed))


def test_encodec_frames_are_the_encoder_output(codec):
    wav = _noise(0.3, 0)
    frames = EnCodecEmbedding(codec, "tiny")(wav)
    T = -(-wav.shape[-1] // codec.hop_length)
    assert frames.shape == (T, codec.config.dimension)
    with torch.no_grad():
        direct = codec.encoder(wav[None])[0].T  # (T, D)
    assert (frames - direct).abs().max() <= 1e-5
    assert (EnCodecEmbedding(codec, "tiny")(_noise(0.3, 1)) - frames).abs().max() > 1e-2


def test_encodec_chunked_codec_runs_back_to_back_segments_without_normalising():
    """A 48 kHz-style codec (chunks, RMS normalisation): fadtk calls the encoder on back-to-back 1 s segments
    and skips the normalisation, so louder audio gives other embeddings."""
    torch.manual_seed(0)
    config = EnCodecConfig(**{**CODEC_PRESETS["tiny"].to_dict(), "chunk_length_s": 0.1, "overlap": 0.01,
                              "normalize": True})
    codec = _off_init(EnCodec(config))
    wav = _noise(0.25, 2)
    frames = EnCodecEmbedding(codec, "chunked")(wav)
    L = config.chunk_length
    with torch.no_grad():
        direct = torch.cat([codec.encoder(wav[None, :, i: i + L])[0] for i in (0, L, 2 * L)], -1).T
    assert frames.shape == direct.shape and (frames - direct).abs().max() <= 1e-5
    assert (EnCodecEmbedding(codec, "chunked")(2 * wav) - frames).abs().max() > 1e-2


def test_clap_windows(clap):
    embedding = ClapEmbedding(clap, "tiny", hop_s=0.2)
    short = _noise(3.0, 3, rate=48_000)
    one = embedding(short)
    assert one.shape == (1, clap.config.projection_dim)
    assert (one - clap.audio_embeds(short, 48_000)).abs().max() <= 1e-5
    long = _noise(10.5, 4, rate=48_000)
    windows = embedding.windows(long)
    starts = [0, 9600, 19200, 24000]  # every 0.2 s, then the last one moved back to end at the clip's end
    assert [w.shape[-1] for w in windows] == [480_000] * 4
    for w, s in zip(windows, starts):
        assert torch.equal(w, long[0, s: s + 480_000])
    got = embedding(long)
    direct = clap.audio_embeds(torch.stack([long[0, s: s + 480_000] for s in starts]), 48_000)
    assert got.shape == (4, clap.config.projection_dim) and (got - direct).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="hop_s must be a positive"):
        ClapEmbedding(clap, "tiny", hop_s=0)


def _write_set(folder, count, seconds, seed, scale=0.1, rate=SR):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        save_audio(folder / f"{i:02d}.wav", scale / 0.1 * _noise(seconds, seed + i, rate), rate)
    return folder


def test_fad_grows_when_the_generated_audio_is_perturbed(codec, tmp_path):
    embedding = EnCodecEmbedding(codec, "tiny")
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(4000) / SR)[None]
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        save_audio(ref / f"{i}.wav", 0.5 * tone.roll(300 * i, -1), SR)
    reference = metrics.folder_stats(ref, embedding)
    values = []
    for level in (0.0, 0.05, 0.2, 0.8):
        gen = tmp_path / f"gen{level}"
        gen.mkdir()
        for i in range(3):
            save_audio(gen / f"{i}.wav", 0.5 * tone.roll(300 * i, -1) + level * _noise(0.25, 10 + i), SR)
        values.append(fad(metrics.folder_stats(gen, embedding), reference))
    # The same audio gives 0; each step up in noise at least doubles the distance.
    assert values[0] <= 1e-6 and values[1] > 1000 * max(values[0], 1e-12)
    assert values[2] > 2 * values[1] and values[3] > 2 * values[2]


def test_reference_stats_are_cached_until_the_folder_changes(codec, tmp_path):
    calls = []

    class Counting(EnCodecEmbedding):
        def __call__(self, wav):
            calls.append(wav.shape)
            return super().__call__(wav)

    embedding = Counting(codec, "tiny")
    ref = _write_set(tmp_path / "ref", 3, 0.1, 0)
    first, cached = metrics.reference_stats(ref, embedding, cache_dir=tmp_path / "cache")
    assert not cached and len(calls) == 3
    again, cached = metrics.reference_stats(ref, embedding, cache_dir=tmp_path / "cache")
    assert cached and len(calls) == 3
    np.testing.assert_array_equal(again.cov, first.cov)
    assert again.count == first.count and again.embedding == "encodec:tiny"
    save_audio(ref / "01.wav", _noise(0.1, 99), SR, overwrite=True)  # a file rewritten: recomputed
    os.utime(ref / "01.wav", ns=(1, 1))
    changed, cached = metrics.reference_stats(ref, embedding, cache_dir=tmp_path / "cache")
    assert not cached and len(calls) == 6 and fad(changed, first) > 1e-6
    _, cached = metrics.reference_stats(ref, Counting(codec, "other"), cache_dir=tmp_path / "cache")
    assert not cached  # another embedding model: its own statistics


def test_generated_stats_clap_score_is_the_mean_cosine(clap, tmp_path):
    gen = _write_set(tmp_path / "gen", 3, 1.0, 20, rate=48_000)
    files = metrics.audio_files(gen)
    captions = {f.resolve(): c for f, c in zip(files, ["soft piano", "dark ambient drone", "fast jazz"])}
    embedding = ClapEmbedding(clap, "tiny")
    with pytest.raises(ValueError, match=r"3 embeddings from 3 file\(s\).*at least 17"):
        metrics.generated_stats(gen, files, embedding, clap=clap, captions=captions)
    files = files * 6  # 18 clips: enough for a 16-dimensional covariance
    stats, scores = metrics.generated_stats(gen, files, embedding, clap=clap, captions=captions)
    assert stats.count == 18
    clips = [metrics.load_for(embedding, f)[0] for f in files[:3]]
    expected = clap.score(list(captions.values()), clips, 48_000).diagonal()
    assert (scores[:3] - expected).abs().max() <= 1e-5 and (scores[3:6] - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Files and captions


def test_audio_files_and_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no audio file"):
        metrics.audio_files(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        metrics.audio_files(tmp_path / "missing")
    _write_set(tmp_path / "sub", 2, 0.05, 0)
    (tmp_path / ".x.wav.123.tmp.wav").write_bytes(b"")  # an unfinished write
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in metrics.audio_files(tmp_path)] == ["00.wav", "01.wav"]


def test_unreadable_audio_is_named(codec, tmp_path):
    folder = _write_set(tmp_path / "set", 2, 0.05, 0)
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="broken.wav could not be read as audio"):
        metrics.folder_stats(folder, EnCodecEmbedding(codec, "tiny"))


def test_captions_sidecar_and_jsonl(tmp_path):
    folder = _write_set(tmp_path / "gen", 2, 0.05, 0)
    files = metrics.audio_files(folder)
    assert metrics.read_captions(folder, files) is None
    (folder / "00.txt").write_text("soft piano\n")
    with pytest.raises(ValueError, match=r"1 of 2 audio files .* no caption file .*01.wav"):
        metrics.read_captions(folder, files)
    (folder / "01.txt").write_text("loud drums")
    assert list(metrics.read_captions(folder, files).values()) == ["soft piano", "loud drums"]

    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(json.dumps({"path": f"gen/{n}", "caption": c})
                               for n, c in [("01.wav", "b"), ("00.wav", "a")]) + "\n")
    assert [metrics.read_captions(folder, files, jsonl)[f.resolve()] for f in files] == ["a", "b"]
    cases = [
        ([{"path": "gen/00.wav", "caption": "a"}], r"no caption for 1 of the 2 audio files .*01.wav"),
        ([{"path": "gen/00.wav", "caption": "a"}, {"path": "gen/02.wav", "caption": "c"}],
         r"line 2: gen/02.wav is not an audio file of"),
        ([{"path": "gen/00.wav", "caption": "a"}, {"path": "gen/00.wav", "caption": "b"}],
         r"line 2: gen/00.wav has a caption already"),
        ([{"path": "gen/00.wav"}], r'line 1: expected \{"path": ..., "caption": ...\}'),
    ]
    for records, message in cases:
        jsonl.write_text("\n".join(json.dumps(r) for r in records))
        with pytest.raises(ValueError, match=message):
            metrics.read_captions(folder, files, jsonl)
    jsonl.write_text("{not json")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        metrics.read_captions(folder, files, jsonl)
    # The training layout: folder/captions.jsonl is read by default, instead of the sidecars.
    (folder / "captions.jsonl").write_text(json.dumps({"path": "00.wav", "caption": "from jsonl"}) + "\n"
                                           + json.dumps({"path": "01.wav", "caption": "also"}) + "\n")
    assert list(metrics.read_captions(folder, files).values()) == ["from jsonl", "also"]


def test_model_reference_sees_a_changed_model_folder(tmp_path):
    assert metrics.model_reference("laion/larger_clap_music") == "laion/larger_clap_music"
    (tmp_path / "model.safetensors").write_bytes(b"1")
    first = metrics.model_reference(str(tmp_path))
    assert first.startswith(f"{tmp_path.resolve()}@") and metrics.model_reference(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"22")  # retrained weights: other cached statistics
    assert metrics.model_reference(str(tmp_path)) != first


def test_load_for_resamples_with_the_fad_packages_cutoff(codec, tmp_path):
    """A 48 kHz file for the 16 kHz codec: resampled with resampy kaiser_best's cutoff and length (FAD_ROLLOFF,
    FAD_ZEROS), which keeps more of the top of the band than load_audio's default filter."""
    from musiclm_core.audio import load_audio, resample

    embedding = EnCodecEmbedding(codec, "tiny")
    t = torch.arange(48_000) / 48_000
    save_audio(tmp_path / "a.wav", 0.5 * torch.sin(2 * torch.pi * 7400 * t)[None], 48_000)  # near 8 kHz Nyquist
    got = metrics.load_for(embedding, tmp_path / "a.wav")
    raw, _ = load_audio(tmp_path / "a.wav")
    expected = resample(raw, 48_000, SR, rolloff=metrics.FAD_ROLLOFF, zeros=metrics.FAD_ZEROS)
    assert (got - expected).abs().max() <= 1e-6
    default, _ = load_audio(tmp_path / "a.wav", sample_rate=SR)
    middle = slice(1000, -1000)
    # 7.4 kHz is past the default filter's 0.90 * 8 kHz cutoff and inside kaiser_best's 0.9476 * 8 kHz
    assert got[0, middle].abs().max() > 0.45 and default[0, middle].abs().max() < 0.3


# ---------------------------------------------------------------------------------------------------------------
# Melody: chroma cosine similarity


def _chroma_one_stft(x):
    """(N,) at 32 kHz -> (1 + N // 4096, 12) one-hot chroma from one STFT of the whole clip (no 30 s limit): the
    steps of chroma.py written out, to check metrics.melody_chroma's 30 s pieces."""
    from musiclm_core import chroma

    window = torch.hann_window(chroma.N_FFT)
    spec = torch.stft(x, chroma.N_FFT, chroma.HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True) / window.pow(2).sum().sqrt()  # (F, T)
    raw = chroma.chroma_filterbank(chroma.SAMPLE_RATE, chroma.N_FFT).float() @ spec.abs().pow(2)  # (12, T)
    return torch.nn.functional.one_hot(raw.argmax(0), 12).float()  # (T, 12)


def _tune(seconds, seed, rate=32_000):
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    f = (220 * 2 ** (torch.randint(0, 12, (max(1, int(seconds * 2)),), generator=g) / 12))
    f = f.repeat_interleave(-(-n // f.shape[0]))[:n]
    return 0.3 * torch.sin(2 * torch.pi * torch.cumsum(f / rate, 0))[None]  # (1, N)


@pytest.mark.parametrize("seconds", [29.9, 30.0, 30.3, 61.7])
def test_melody_chroma_of_long_clips_equals_one_stft(seconds):
    x = _tune(seconds, 0)[0] + 0.05 * _noise(seconds, 1, 32_000)[0]
    ours = metrics.melody_chroma(x, 32_000)
    expected = _chroma_one_stft(x)
    assert ours.shape == expected.shape == (1 + x.shape[0] // 4096, 12)
    agree = (ours.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree == 1.0  # the tune's classes are far from ties: any frame from the wrong samples would flip


def test_chroma_cosine_similarity_listens_and_counts_frames():
    melody = _tune(3, 0)
    metric = metrics.ChromaCosineSimilarity()
    assert metric.add(melody, 32_000, melody, 32_000) == 1.0
    assert metric.add(_tune(3, 5), 32_000, melody, 32_000) < 0.5  # another tune
    # the same tune at 16 kHz, and a generation half as long (zero-padded: its silent frames are class 0)
    low = torch.from_numpy(np.interp(np.arange(48_000) * 2, np.arange(96_000), melody[0].numpy()))[None].float()
    assert metric.add(low, 16_000, melody, 32_000) > 0.9
    half = metric.add(melody[:, :48_000], 32_000, melody, 32_000)
    assert 0.4 < half < 0.9  # the first half agrees; the padded half only where the melody's class is C (0)
    assert metric.pairs == 4 and metric.frames == 4 * 24  # ceil(96000 / 4096) frames of each reference
    longer = metrics.ChromaCosineSimilarity()
    assert longer.add(torch.cat([melody, _tune(3, 9)], 1), 32_000, melody, 32_000) == 1.0  # cut to the melody
    with pytest.raises(ValueError, match="no clip pair was added"):
        metrics.ChromaCosineSimilarity().compute()
    with pytest.raises(ValueError, match=r"expected \(C, N\) or \(N,\) float audio"):
        metric.add(torch.zeros(1, 0), 32_000, melody, 32_000)


def test_pair_files(tmp_path):
    gen, other = tmp_path / "gen", tmp_path / "other"
    for name in ("a.wav", "sub/b.wav", "c.flac"):
        save_audio(gen / name, _noise(0.01, 0), SR)
    for name in ("sub/b.flac", "c.wav", "a.ogg"):
        save_audio(other / name, _noise(0.01, 0), SR)
    files = metrics.audio_files(gen)
    pairs = metrics.pair_files(gen, files, other, what="--melody")
    assert [(g.relative_to(gen).as_posix(), o.relative_to(other).as_posix()) for g, o in pairs] == [
        ("a.wav", "a.ogg"), ("c.flac", "c.wav"), ("sub/b.wav", "sub/b.flac")]
    save_audio(other / "d.wav", _noise(0.01, 0), SR)
    with pytest.raises(ValueError, match=r"1 file\(s\) of --melody .* have no generated file .*other/d.wav"):
        metrics.pair_files(gen, files, other, what="--melody")
    (other / "d.wav").unlink()
    (other / "c.wav").unlink()
    with pytest.raises(ValueError, match=r"1 generated file\(s\) have no file of the same name .*gen/c.flac"):
        metrics.pair_files(gen, files, other, what="--melody")
    save_audio(gen / "c.wav", _noise(0.01, 0), SR)
    with pytest.raises(ValueError, match=r"gen/c.flac and .*gen/c.wav have one name without extension"):
        metrics.pair_files(gen, metrics.audio_files(gen), other, what="--melody")
