"""PaSST and its KL metric against hear21passt 0.0.26 and audiocraft 1.3.0's `PasstKLDivergenceMetric`.

References: hear21passt (kkoutini/passt_hear21) `models/preprocess.py::AugmentMelSTFT` (eval mode),
`models/passt.py::PaSST`, `wrapper.py::PasstBasicWrapper` (mode "logits"), and `base20sec.get_basic_model` for the
official size; audiocraft `metrics/kld.py` (`kl_divergence`, `PasstKLDivergenceMetric.update / compute`), imported
with its package `__init__` files skipped (they import every model and solver) and run on the same weights.
hear21passt imports timm's `download_cached_file` at module level and nothing else of timm; where timm is not
installed a stub stands in; either way hear21passt's loader is given a `download_cached_file` that serves the
checkpoint file the test wrote instead of downloading (the slow tests make hear21passt and audiocraft load our
fixture file through their own loaders this way).

Checkpoints are made the way the release files are: hear21passt's PaSST with random weights pushed off their
init (every parameter gets noise, the head is scaled up so that the label distributions are peaked), its
`state_dict()` saved with torch.save, loaded by `PaSST.from_pretrained(file, preset=...)`. The tiny config keeps
the official front-end, patching (16x16 every 10) and 527 labels, on 2 s segments (20 time positions), as
`PRESETS["tiny"]`; the 20 s official size runs under `-m slow`.

Tolerances (fp32): mel front-end max abs <= 1e-4 (normalised log-mel); logits max abs <= 1e-4; KL numbers:
relative 1e-4 at 32 kHz input (audiocraft runs each segment alone, we batch the full ones: round-off only).
Input at another rate (44.1 kHz): audiocraft resamples with julius, we with musiclm_core.audio.resample set to
julius's filter and edges (`passt._resample_julius`); label probabilities max abs <= 1e-5 (measured 2e-6), KL
numbers relative 1e-4.
"""

import contextlib
import functools
import importlib.machinery
import importlib.util
import io
import os
import sys
import types
import warnings

import pytest
import torch

# The references are installed by tests/install_references.sh; a missing one is an error here, not a skip.
_MISSING = [m for m in ("hear21passt", "audiocraft", "julius", "torchmetrics", "torchaudio")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    raise ImportError(f"the PaSST references are not installed: {_MISSING}; run `bash tests/install_references.sh` "
                      f"(hear21passt==0.0.26, torchmetrics and lightning-utilities with --no-deps, audiocraft and "
                      f"julius, torchaudio in pure-Python mode)")
import torchaudio  # noqa: E402,F401  (hear21passt's front-end and audiocraft's audio utils import it)

from musiclm_core.passt import KLDivergence, PaSST, kl_divergence, label_distributions  # noqa: E402

from passt_fixtures import sounds, write_passt_checkpoint  # noqa: E402

ATOL = 1e-4
SR = 32_000
TINY = dict(embed_dim=32, depth=2, num_heads=4, input_tdim=200)  # PRESETS["tiny"]: 200 frames -> 20 positions

# What the timm stub's download_cached_file serves: {url: local file}, filled by the tests.
_SERVED: dict[str, str] = {}


def _download_cached_file(url, check_hash=False, progress=False):
    if url not in _SERVED:
        raise RuntimeError(f"the test's timm stub does not download; no local file for {url}")
    return _SERVED[url]


def _bare_package(name: str, path: list[str]) -> None:
    module = types.ModuleType(name)
    module.__path__ = path
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__spec__.submodule_search_locations = path
    sys.modules[name] = module


def _import_references():
    """hear21passt's modules (timm stubbed where absent) and audiocraft's kld module (bare packages)."""
    if importlib.util.find_spec("timm") is None and "timm" not in sys.modules:
        for name in ("timm", "timm.models"):
            _bare_package(name, [])
        hub = types.ModuleType("timm.models._hub")
        hub.download_cached_file = _download_cached_file
        sys.modules["timm.models._hub"] = hub
    from hear21passt.models import passt as ref_passt
    from hear21passt.models.helpers import vit_helpers
    from hear21passt.models.preprocess import AugmentMelSTFT
    from hear21passt.wrapper import PasstBasicWrapper

    if "audiocraft.metrics.kld" in sys.modules:
        kld = sys.modules["audiocraft.metrics.kld"]
    else:
        # audiocraft's package __init__ imports its whole stack (av, spacy, ...): bare packages stand in for the
        # three parents while kld is imported, then leave sys.modules again, so that the other tests
        # (test_musicgen_audiocraft) import the real package. kld keeps working: it holds its own references.
        root = os.path.dirname(importlib.util.find_spec("audiocraft").origin)
        added = []
        for package in ("audiocraft", "audiocraft.data", "audiocraft.metrics"):
            if package not in sys.modules:
                _bare_package(package, [os.path.join(root, *package.split(".")[1:])])
                added.append(package)
        try:
            kld = importlib.import_module("audiocraft.metrics.kld")
        finally:
            for name in [m for m in sys.modules if m.startswith("audiocraft.")] + added:
                if name in added or name.startswith(tuple(p + "." for p in added)):
                    sys.modules.pop(name, None)

    # hear21passt's loader calls the name it imported from timm: serve local files whether timm is real or not.
    vit_helpers.download_cached_file = _download_cached_file
    return ref_passt, AugmentMelSTFT, PasstBasicWrapper, kld


ref_passt, AugmentMelSTFT, PasstBasicWrapper, ac_kld = _import_references()


def _quiet(fn, *args):
    """Call a hear21passt function without its prints (model summaries, shapes on the first run)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


def _reference_mel():
    """The front-end of hear21passt.base / base20sec / base30sec, in eval mode (no masking, no random range)."""
    return _quiet(functools.partial(AugmentMelSTFT, n_mels=128, sr=SR, win_length=800, hopsize=320, n_fft=1024,
                                    freqm=48, timem=192, htk=False, fmin=0.0, fmax=None, norm=1,
                                    fmin_aug_range=10, fmax_aug_range=2000)).eval()


def _perturb(net, seed=0, noise=0.05, head_scale=8.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
        net.head[1].weight.mul_(head_scale)
    return net


def _stft_patched(fn, *args):
    """hear21passt calls torch.stft without return_complex, which recent torch refuses: audiocraft patches it
    the same way (`kld._patch_passt_stft`)."""
    with ac_kld._patch_passt_stft():
        return _quiet(fn, *args)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(hear21passt wrapper in "logits" mode, ours) on the same random weights, through a saved file."""
    torch.manual_seed(0)
    net = _quiet(functools.partial(ref_passt.PaSST, img_size=(128, TINY["input_tdim"]), patch_size=16, stride=10,
                                   in_chans=1, num_classes=527, embed_dim=TINY["embed_dim"], depth=TINY["depth"],
                                   num_heads=TINY["num_heads"], distilled=True))
    net = _perturb(net).eval()
    path = tmp_path_factory.mktemp("passt") / "passt-tiny.pt"
    torch.save(net.state_dict(), path)
    ref = PasstBasicWrapper(mel=_reference_mel(), net=net, mode="logits").eval()
    return ref, PaSST.from_pretrained(path, preset="tiny")


def test_fixture_file_has_hear21passt_layout(tmp_path, tiny_pair):
    """write_passt_checkpoint's file: hear21passt's keys and shapes, loadable by its model with strict=True,
    and the two models agree on it."""
    ref, _ = tiny_pair
    path = write_passt_checkpoint(tmp_path, tiny=True)
    state = torch.load(path, weights_only=True)
    expected = {k: tuple(v.shape) for k, v in ref.net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    net = _quiet(functools.partial(ref_passt.PaSST, img_size=(128, 200), patch_size=16, stride=10, in_chans=1,
                                   num_classes=527, embed_dim=32, depth=2, num_heads=4, distilled=True)).eval()
    net.load_state_dict(state, strict=True)
    wav = sounds(1.5)["tone"]
    theirs = _stft_patched(PasstBasicWrapper(mel=_reference_mel(), net=net, mode="logits").eval(), wav)
    ours = PaSST.from_pretrained(path, preset="tiny").logits(wav)
    assert (ours - theirs).abs().max().item() <= ATOL


@pytest.mark.parametrize("samples", [4801, 5120, 32_000, 64_000])
def test_front_end_matches_augment_mel_stft(tiny_pair, samples):
    """From the shortest clip the metric keeps (0.15 s + 1 sample: 16 frames) to a whole tiny segment."""
    ref, ours = tiny_pair
    s = sounds(samples / SR + 0.01)
    wav = torch.cat([s["noise"], s["tone"]])[:, :samples]  # (2, N)
    theirs = _stft_patched(ref.mel, wav)
    mine = ours.mel(wav)
    assert mine.shape == theirs.shape == (2, 128, (samples - 1) // 320 + 1)
    assert (mine - theirs).abs().max().item() <= ATOL
    # The fixture listens: a different sound moves the mel by far more than the tolerance.
    assert (ours.mel(wav.flip(0)) - theirs).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("samples", [4801, 20_000, 64_000])
def test_logits_match_hear21passt(tiny_pair, samples):
    """End to end, wav -> logits, on 1 patch, a few and the most the time positions take (19 of 20)."""
    ref, ours = tiny_pair
    s = sounds(samples / SR + 0.01)
    wav = torch.cat([s["noise"], s["clicks"], s["drone"]])[:, :samples]  # (3, N)
    with torch.no_grad():
        theirs = _stft_patched(ref, wav)
    mine = ours.logits(wav, SR)
    assert mine.shape == theirs.shape == (3, 527)
    assert (mine - theirs).abs().max().item() <= ATOL
    assert (mine[0] - mine[1]).abs().max().item() > 1.0  # different sounds, different logits


def test_kl_divergence_formula_matches_audiocraft():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(4 * torch.randn(6, 527, generator=g), -1)
    q = torch.softmax(4 * torch.randn(6, 527, generator=g), -1)
    p[0, :100] = 0  # 0 log 0 = 0
    p[0] /= p[0].sum()
    for a, b in ((p, q), (q, p), (p, p)):
        assert torch.allclose(kl_divergence(a, b), ac_kld.kl_divergence(a, b), rtol=1e-6, atol=1e-7)


def _audiocraft_metric(ref, segment_s):
    """audiocraft's PasstKLDivergenceMetric, its model swapped for the tiny hear21passt one (only
    `_load_base_model` is replaced; segmenting, resampling, softmax, KL and averaging are audiocraft's)."""
    class TinyPasstKLD(ac_kld.PasstKLDivergenceMetric):
        def _load_base_model(self, pretrained_length):
            return ref, SR, int(pretrained_length * SR), int(0.15 * SR)

    return TinyPasstKLD(pretrained_length=segment_s)


def _batch(clips, sample_rate, n):
    """(B, C, n) zero-padded batch of (C, N_i) clips, as audiocraft's loader pads, with their sizes."""
    wav = torch.zeros(len(clips), clips[0].shape[0], n)
    for i, c in enumerate(clips):
        wav[i, :, :c.shape[-1]] = c
    return wav, torch.tensor([c.shape[-1] for c in clips]), torch.full((len(clips),), sample_rate)


def _pairs(sample_rate):
    """(generated, reference) stereo pairs of equal length: 3 s (2 segments), 4.1 s (a 0.1 s tail audiocraft
    drops), 4.2 s (a 0.2 s tail it keeps), 1 s (less than a segment). Different sounds in each pair."""
    s = sounds(4.2, sample_rate)
    out = []
    for seconds, (a, b) in zip((3.0, 4.1, 4.2, 1.0), (("noise", "tone"), ("tone", "clicks"), ("drone", "tone"),
                                                       ("clicks", "drone"))):
        n = int(seconds * sample_rate)
        gen = torch.cat([s[a], 0.5 * s[a].roll(1000)])[:, :n]  # (2, n): stereo, different channels
        ref = torch.cat([s[b], 0.8 * s[b].roll(-500)])[:, :n]
        out.append((gen, ref))
    return out


def test_kl_metric_matches_audiocraft(tiny_pair):
    ref, ours = tiny_pair
    segment_s = ours.config.segment_s
    pairs = _pairs(SR)
    n = max(g.shape[-1] for g, _ in pairs)
    gen, sizes, rates = _batch([g for g, _ in pairs], SR, n)
    target, _, _ = _batch([r for _, r in pairs], SR, n)
    metric = _audiocraft_metric(ref, segment_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.update(gen, target, sizes, rates)
    theirs = metric.compute()
    mine = KLDivergence(ours)
    rows = sum(mine.add(g, r, SR)["kld_pq"].shape[0] for g, r in pairs)
    assert rows == int(metric.weight) == 2 + 2 + 3 + 1
    got = mine.compute()
    assert set(got) == set(theirs)
    for key in theirs:
        assert got[key] == pytest.approx(theirs[key], rel=1e-4), key
    assert got["kld"] > 0.5  # the pairs are different sounds: far from 0


def test_label_distributions_match_audiocraft_segments(tiny_pair):
    """One clip's rows: audiocraft's `_get_label_distribution` for a batch of one."""
    ref, ours = tiny_pair
    clip = _pairs(SR)[2][0]  # 4.2 s stereo: segments of 2, 2 and 0.2 s
    metric = _audiocraft_metric(ref, ours.config.segment_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = metric._get_label_distribution(clip[None], torch.tensor([clip.shape[-1]]), torch.tensor([SR]))
    mine = label_distributions(ours, clip, SR)
    assert mine.shape == theirs.shape == (3, 527)
    assert (mine - theirs).abs().max().item() <= 1e-5


def test_kl_metric_at_another_rate_matches_audiocraft(tiny_pair):
    """44.1 kHz input: audiocraft resamples with julius, we with our resampler set to julius's filter and
    edges; same segments, same probabilities up to the resamplers' round-off, same KL numbers."""
    ref, ours = tiny_pair
    rate = 44_100
    pairs = [_pairs(rate)[i] for i in (0, 2)]  # 3 s and 4.2 s (julius makes its kernels anew for every clip: slow)
    n = max(g.shape[-1] for g, _ in pairs)
    gen, sizes, rates = _batch([g for g, _ in pairs], rate, n)
    target, _, _ = _batch([r for _, r in pairs], rate, n)
    metric = _audiocraft_metric(ref, ours.config.segment_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = metric._get_label_distribution(gen, sizes, rates)
        metric.update(gen, target, sizes, rates)
    mine = torch.cat([label_distributions(ours, g, rate) for g, _ in pairs])
    assert mine.shape == theirs.shape == (5, 527)
    assert (mine - theirs).abs().max().item() <= 1e-5
    kld = KLDivergence(ours)
    for g, r in pairs:
        kld.add(g, r, rate)
    got, expected = kld.compute(), metric.compute()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-4), key


# ---------------------------------------------------------------------------------------------------------------
# The official size (passt-s-f128-20sec-p16-s10-ap474-swa's architecture), loaded by hear21passt's own loader.


@pytest.fixture(scope="module")
def official_pair(tmp_path_factory):
    """hear21passt.base20sec.get_basic_model(mode="logits") -- what audiocraft loads -- with its pretrained file
    served from our fixture (random weights in the release layout), and ours from the same file."""
    from hear21passt import base20sec

    from musiclm_core.passt import CHECKPOINTS

    name, url = CHECKPOINTS["20sec"]
    path = write_passt_checkpoint(tmp_path_factory.mktemp("passt20") / name, tiny=False)
    _SERVED[url] = str(path)
    ref = _quiet(functools.partial(base20sec.get_basic_model, mode="logits")).eval()
    return ref, PaSST.from_pretrained(path.parent, preset="20sec")


@pytest.mark.slow
def test_official_20sec_logits(official_pair):
    ref, ours = official_pair
    s = sounds(20.0)
    wav = torch.cat([s["tone"], s["clicks"]])  # (2, 640000): 2000 frames, 199 time patches
    with torch.no_grad():
        theirs = _stft_patched(ref, wav)
    assert (ours.logits(wav) - theirs).abs().max().item() <= ATOL


@pytest.mark.slow
def test_official_20sec_kl_metric(official_pair):
    """audiocraft's PasstKLDivergenceMetric(pretrained_length=20) itself, its model loaded by hear21passt."""
    _, ours = official_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = _quiet(functools.partial(ac_kld.PasstKLDivergenceMetric, pretrained_length=20))
    s, t = sounds(25.0), sounds(25.0, seed=1)
    gen = torch.cat([s["noise"], s["tone"]])[:, None]  # (2, 1, 25 s): segments of 20 and 5 s
    target = torch.cat([t["noise"], s["drone"]])[:, None]
    sizes, rates = torch.tensor([gen.shape[-1]] * 2), torch.tensor([SR] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.update(gen, target, sizes, rates)
    theirs = metric.compute()
    mine = KLDivergence(ours)
    for i in range(2):
        mine.add(gen[i], target[i], SR)
    got = mine.compute()
    for key in theirs:
        assert got[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
