"""Evaluation metrics against the packages people compute them with.

Melody: `metrics.ChromaCosineSimilarity` against audiocraft 1.3.0's `ChromaCosineSimilarityMetric` itself, with
MusicGen's solver config (`config/solver/musicgen/default.yaml`: sample_rate 32000, n_chroma 12, radix2_exp 14,
argmax true). At 32 kHz (no resampling on either side) the one-hot chroma is identical on every frame, white noise
included (a near-tie of all 12 classes), clips past 30 s included (ours is computed in 30 s pieces), and the
metric agrees to 1e-6 (the only difference: audiocraft divides in float32, we in float64). Argmax ties (silent
frames, exactly equal classes) go to the first class on both sides (torch.argmax). At 44.1 kHz audiocraft
resamples with julius (edge samples repeated) and we with chroma.py's torchaudio filter (zero-padded edges):
the clips' first and last frames can differ; the test states the measured agreement.

FAD: `metrics.frechet_distance` / `metrics.fad` on the same embeddings as fadtk 1.1.0 (`calc_frechet_distance`,
with its statistics from `calc_embd_statistics` and `calculate_embd_statistics_online`) and as
frechet-audio-distance 0.3.4 (`FrechetAudioDistance.calculate_embd_statistics` /
`calculate_frechet_distance`): 1e-6 relative. Both packages import heavy model packages at module level
(laion_clap, torchlibrosa, resampy, hypy_utils); those are stubbed, and every stub fails if it is used, except
the three helpers fadtk's statistics call (a logger, a sequential `pmap`).

Install the references with `bash tests/install_references.sh` (each with --no-deps).
"""

import importlib.machinery
import importlib.util
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch

from musiclm_core import metrics
from musiclm_core.metrics import ChromaCosineSimilarity, EmbeddingStats, melody_chroma

from stubs import Stub

SR = 32000




def _stub(name, **attrs):
    top = name.split(".")[0]
    if not isinstance(sys.modules.get(top), Stub) and importlib.util.find_spec(top) is not None:
        return None  # the real package is installed: use it
    module = Stub(name)
    module.__dict__.update(attrs)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules.setdefault(name, module)
    parent, _, child = name.rpartition(".")
    if parent and isinstance(sys.modules.get(parent), Stub):
        setattr(sys.modules[parent], child, sys.modules[name])
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------------------------
# Melody: chroma cosine similarity


def _audiocraft_metric_class():
    """audiocraft's ChromaCosineSimilarityMetric without audiocraft's package `__init__`s (they import every
    model, solver and metric, av and spacy among them): the four packages on its path are registered bare while
    it is imported, then taken out of sys.modules again, so that other tests import audiocraft as they expect."""
    if importlib.util.find_spec("audiocraft") is None or importlib.util.find_spec("torchmetrics") is None:
        pytest.fail("the audiocraft / torchmetrics references are not installed: bash tests/install_references.sh")
    if "audiocraft.metrics.chroma_cosinesim" in sys.modules:
        return sys.modules["audiocraft.metrics.chroma_cosinesim"].ChromaCosineSimilarityMetric
    root = list(importlib.util.find_spec("audiocraft").submodule_search_locations)[0]  # also when registered bare
    added = []
    for package in ("audiocraft", "audiocraft.data", "audiocraft.metrics", "audiocraft.modules"):
        if package in sys.modules:
            continue
        module = types.ModuleType(package)
        module.__path__ = [os.path.join(root, *package.split(".")[1:])]
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = module.__path__
        sys.modules[package] = module
        added.append(package)
    try:
        from audiocraft.metrics.chroma_cosinesim import ChromaCosineSimilarityMetric
        from audiocraft.modules import chroma  # noqa: F401  (kept importable: see the extractor test)
    finally:
        for package in added:
            del sys.modules[package]
    return ChromaCosineSimilarityMetric


def _chroma_extractor_class():
    _audiocraft_metric_class()
    return sys.modules["audiocraft.modules.chroma"].ChromaExtractor


def _musicgen_metric():
    # config/solver/musicgen/default.yaml, metrics.chroma_cosine.chroma_base
    return _audiocraft_metric_class()(sample_rate=SR, n_chroma=12, radix2_exp=14, argmax=True)


def _melody(seconds, seed, rate=SR, notes=8):
    """A tune: `notes` equal-length notes (fundamental + 2 harmonics) drawn from one octave, a little noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    pitches = 220 * 2 ** (torch.randint(0, 12, (notes,), generator=g) / 12)
    f = pitches.repeat_interleave(-(-n // notes))[:n]  # (n,)
    phase = 2 * torch.pi * torch.cumsum(f / rate, 0)
    tone = sum(0.3 / k * torch.sin(k * phase) for k in (1, 2, 3))
    return (tone + 0.01 * torch.randn(n, generator=g))[None]  # (1, n)


def _noise(seconds, seed, rate=SR):
    return 0.3 * torch.randn(1, int(seconds * rate), generator=torch.Generator().manual_seed(seed))


def _audiocraft_pairs(metric, pairs):
    """Feed (generated, reference) pairs one at a time (a batch of one: audiocraft's batch zero-pads every clip
    to the longest, which changes the last frames of the shorter ones), the generated clip cut or zero-padded to
    the reference's length as the solver's generation is."""
    for gen, ref in pairs:
        N = ref.shape[-1]
        gen = torch.nn.functional.pad(gen[..., :N], (0, max(0, N - gen.shape[-1])))
        metric.update(gen[None], ref[None], torch.tensor([N]), torch.tensor([SR]))
    return metric.compute()


def test_melody_chroma_equals_audiocraft_extractor_past_30_s():
    # argmax=False: the normalised chroma, so that near-ties can be told apart (its argmax is the reference's)
    extractor = _chroma_extractor_class()(sample_rate=SR, n_chroma=12, radix2_exp=14, argmax=False)
    # 5 s; exactly 30 s; 30 s + a piece shorter than a window; 70 s; under one window (zero-padded to 5 frames)
    for n in (5 * SR, 960_000, 960_000 + 13_924, 70 * SR + 123, 1000):
        x = _noise(n / SR, n)  # white noise: the closest to a 12-way tie
        ours = melody_chroma(x, SR)
        theirs = extractor(x[None])[0]  # (T, 12), each frame's largest class 1
        assert ours.shape == theirs.shape, n
        # Two computation paths: a frame whose two largest classes are within float32 round-off of each other may
        # pick either on another CPU (measured here: identical on every frame).
        top2 = theirs.topk(2, dim=-1).values  # (T, 2)
        near_tie = top2[:, 0] - top2[:, 1] <= 1e-5 * top2[:, 0]
        assert not ((ours.argmax(-1) != theirs.argmax(-1)) & ~near_tie).any(), n
        assert (ours.sum(-1) == 1).all()


def test_chroma_cosine_similarity_equals_audiocraft():
    """Pairs: a melody and the same melody with more noise; a melody and another; noise and noise; a generated
    clip shorter than its melody (zero-padded) and one longer (cut); a 35 s pair (ours in pieces); silence
    against a melody (silent frames: class 0 on both sides)."""
    pairs = [
        (_melody(4, 0) + _noise(4, 1) * 0.3, _melody(4, 0)),
        (_melody(4, 2), _melody(4, 3)),
        (_noise(3, 4), _noise(3, 5)),
        (_melody(2, 6), _melody(3, 6)),
        (_melody(5, 7), _melody(3.3, 7)),
        (_melody(35, 8, notes=40) + _noise(35, 9) * 0.3, _melody(35, 8, notes=40)),
        (torch.zeros(1, 2 * SR), _melody(2, 10)),
    ]
    ours = ChromaCosineSimilarity()
    per_pair = [ours.add(gen, SR, ref, SR) for gen, ref in pairs]
    expected = _audiocraft_pairs(_musicgen_metric(), pairs)
    assert ours.compute() == pytest.approx(expected, abs=1e-6)
    for (gen, ref), value in zip(pairs, per_pair):
        assert value == pytest.approx(_audiocraft_pairs(_musicgen_metric(), [(gen, ref)]), abs=1e-6)
    # It listens: the same melody scores high, another melody and noise low, and the pairs differ.
    assert per_pair[0] > 0.9 and per_pair[1] < 0.5 and per_pair[2] < 0.5
    assert ours.frames == sum(-(-ref.shape[-1] // 4096) for _, ref in pairs)


def test_chroma_cosine_similarity_batch_of_equal_lengths():
    """audiocraft's metric on one batch of three equal-length pairs (no padding) equals ours pair by pair."""
    gens = torch.stack([_melody(3, i) + 0.2 * _noise(3, 10 + i) for i in range(3)])  # (3, 1, N)
    refs = torch.stack([_melody(3, i if i != 2 else 99) for i in range(3)])
    metric = _musicgen_metric()
    metric.update(gens, refs, torch.tensor([gens.shape[-1]] * 3), torch.tensor([SR] * 3))
    ours = ChromaCosineSimilarity()
    for gen, ref in zip(gens, refs):
        ours.add(gen, SR, ref, SR)
    assert ours.compute() == pytest.approx(metric.compute(), abs=1e-6)


def test_chroma_cosine_similarity_at_44k_is_close_to_audiocraft():
    """At 44.1 kHz both resample to 32 kHz (julius vs chroma.py's torchaudio filter, see metrics._mono_32k):
    the summed similarities agree (measured: the one-hot chroma is identical on every frame, tunes and white
    noise alike; the bound allows one edge frame a pair to flip). The frame counts do not: audiocraft counts
    ceil(N / 4096) frames with N at 44.1 kHz (33 for 3 s) where the chroma has 24, and divides by that count
    (its score here: 72 / 99 = 0.73 for clips that agree on every frame); ours counts frames at 32 kHz."""
    rate = 44_100
    pairs = [(_melody(3, i, rate) + 0.2 * _noise(3, 20 + i, rate), _melody(3, i, rate)) for i in range(3)]
    ours = ChromaCosineSimilarity()
    for gen, ref in pairs:
        ours.add(gen, rate, ref, rate)
    metric = _musicgen_metric()
    for gen, ref in pairs:
        metric.update(gen[None], ref[None], torch.tensor([ref.shape[-1]]), torch.tensor([rate]))
    assert abs(ours.cosine_sum - metric.cosine_sum.item()) <= len(pairs)
    assert ours.frames == 3 * (-(-3 * SR // 4096)) and metric.weight.item() == 3 * (-(-3 * rate // 4096))
    assert ours.compute() > 0.9


# ---------------------------------------------------------------------------------------------------------------
# FAD


def _import_fadtk():
    """fadtk's statistics and Fréchet distance. fadtk imports hypy_utils (tqdm helpers, a logger, a downloader)
    at module level and calls `setup_logger()` at import: the logger is a plain logging.Logger, `pmap` (used by
    `calculate_embd_statistics_online`) a sequential map; the rest fail if used."""
    if importlib.util.find_spec("fadtk") is None:
        pytest.fail("fadtk is not installed: bash tests/install_references.sh")
    _stub("hypy_utils", write=None)
    _stub("hypy_utils.tqdm_utils", pmap=lambda fn, items, **_: [fn(x) for x in items])
    _stub("hypy_utils.logging_utils", setup_logger=lambda *a, **k: logging.getLogger("fadtk"))
    _stub("hypy_utils.downloader")
    _stub("hypy_utils.nlp_utils")
    from fadtk import fad, utils

    return fad, utils


def _import_frechet_audio_distance():
    """frechet_audio_distance's FrechetAudioDistance class, without its models: laion_clap, torchlibrosa,
    resampy and encodec are stubbed where they are not installed (the class is made without its __init__,
    which loads a model; the two methods tested use numpy and scipy only)."""
    if importlib.util.find_spec("frechet_audio_distance") is None:
        pytest.fail("frechet-audio-distance is not installed: bash tests/install_references.sh")
    for name in ("laion_clap", "resampy", "encodec", "torchlibrosa", "torchlibrosa.stft",
                 "torchlibrosa.augmentation"):
        _stub(name)
    from frechet_audio_distance.fad import FrechetAudioDistance

    return object.__new__(FrechetAudioDistance)


def _embedding_sets(D=32, seed=0):
    """A generated and a reference set as lists of per-file (n, D) embeddings, correlated features with a
    mean far from 0 (as real embeddings: cancellation would show), the generated set shifted and rescaled."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    ref = [rng.normal(size=(rng.integers(20, 40), D)) @ mix + 5.0 for _ in range(8)]
    gen = [1.3 * rng.normal(size=(rng.integers(20, 40), D)) @ mix + 5.2 for _ in range(6)]
    return gen, ref


def _ours(files):
    acc = metrics.StatsAccumulator()
    for x in files:
        acc.add(x)
    return acc.stats("test")


def test_fad_equals_fadtk(tmp_path):
    fad, utils = _import_fadtk()
    gen, ref = _embedding_sets()
    ours = metrics.fad(_ours(gen), _ours(ref))
    # fadtk's score(): per-file .npy embeddings -> calculate_embd_statistics_online -> calc_frechet_distance
    paths = {}
    for name, files in (("gen", gen), ("ref", ref)):
        paths[name] = []
        for i, x in enumerate(files):
            paths[name].append(tmp_path / f"{name}{i}.npy")
            np.save(paths[name][-1], x)
    mu_g, cov_g = utils.calculate_embd_statistics_online(paths["gen"])
    mu_r, cov_r = utils.calculate_embd_statistics_online(paths["ref"])
    online = fad.calc_frechet_distance(mu_r, cov_r, mu_g, cov_g)  # score(baseline, eval)
    # fadtk's score_inf / score_individual route: all embeddings at once
    mu_g2, cov_g2 = fad.calc_embd_statistics(np.concatenate(gen))
    mu_r2, cov_r2 = fad.calc_embd_statistics(np.concatenate(ref))
    at_once = fad.calc_frechet_distance(mu_r2, cov_r2, mu_g2, cov_g2)
    assert ours > 1.0  # it listens: the sets differ ...
    assert ours == pytest.approx(float(np.real(online)), rel=1e-6)
    assert ours == pytest.approx(float(np.real(at_once)), rel=1e-6)
    # ... and the statistics are the same (ddof 1)
    assert _ours(gen).cov == pytest.approx(cov_g, rel=1e-9, abs=1e-12)
    assert _ours(gen).mean == pytest.approx(mu_g, rel=1e-12)
    # a set against itself
    same = metrics.frechet_distance(mu_r, cov_r, mu_r, cov_r)
    assert same <= 1e-6 and abs(float(np.real(fad.calc_frechet_distance(mu_r, cov_r, mu_r, cov_r)))) <= 1e-6


def test_fad_equals_frechet_audio_distance():
    fad_object = _import_frechet_audio_distance()
    gen, ref = _embedding_sets(seed=1)
    mu_g, cov_g = fad_object.calculate_embd_statistics(np.concatenate(gen))
    mu_r, cov_r = fad_object.calculate_embd_statistics(np.concatenate(ref))
    theirs = fad_object.calculate_frechet_distance(mu_r, cov_r, mu_g, cov_g)  # score(background, eval)
    ours = metrics.fad(_ours(gen), _ours(ref))
    assert ours > 1.0
    assert ours == pytest.approx(float(np.real(theirs)), rel=1e-6)
    assert metrics.frechet_distance(mu_g, cov_g, mu_r, cov_r) == pytest.approx(float(np.real(theirs)), rel=1e-6)


@pytest.mark.parametrize("dim, count", [(128, 400), (512, 700)])
def test_fad_equals_references_at_the_real_dimensions(dim, count):
    """VGGish (128) and CLAP (512) sizes, fewer embeddings than a real set but more than the dimension."""
    fad, _ = _import_fadtk()
    fad_object = _import_frechet_audio_distance()
    rng = np.random.default_rng(dim)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    gen = rng.normal(size=(count, dim)) @ mix * 1.1 + 0.05
    ref = rng.normal(size=(count + 50, dim)) @ mix
    ours = metrics.fad(EmbeddingStats.from_embeddings(gen, "x"), EmbeddingStats.from_embeddings(ref, "x"))
    mu_g, cov_g = np.mean(gen, 0), np.cov(gen, rowvar=False)
    mu_r, cov_r = np.mean(ref, 0), np.cov(ref, rowvar=False)
    assert ours == pytest.approx(float(np.real(fad.calc_frechet_distance(mu_r, cov_r, mu_g, cov_g))), rel=1e-6)
    assert ours == pytest.approx(float(np.real(fad_object.calculate_frechet_distance(mu_r, cov_r, mu_g, cov_g))),
                                 rel=1e-6)
