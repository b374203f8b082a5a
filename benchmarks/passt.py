"""Time PaSST label distributions (the KL metric's cost) against hear21passt as audiocraft runs it, in one run.

    flock /tmp/heavy.lock python benchmarks/passt.py            # print the table
    flock /tmp/heavy.lock python benchmarks/passt.py --write    # and put it in benchmarks/RESULTS.md under "## PaSST"

The 20 s model (hear21passt.base20sec's architecture, audiocraft's `pretrained_length: 20`) with random weights,
built by hear21passt, saved in the release layout and loaded by ours, so both run the same weights. fp32 on the
CPU with 2 threads. One call = the label distributions of a batch of 10 s mono clips at 32 kHz: theirs is
audiocraft's `PasstKLDivergenceMetric._get_model_preds` path (the wrapper's mel + PaSST on one segment, softmax)
run clip by clip as audiocraft does; ours is `label_distributions` per clip, `PaSST.logits` on the whole batch, and
`KLDivergence.add` on the clips taken as (generated, reference) pairs (each pair's segments in one batch; its KL
arithmetic included). Figures are clips per second, the median of the repeats
after one warm-up call, ours and theirs alternated so that both see the same load on a shared machine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import io
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch

from _common import load_line, machine_lines, median_s, parse_args, report  # benchmarks/ (the script's folder)

SR = 32_000
CLIPS = 4  # 10 s each


def _import_hear21passt():
    """hear21passt's model, preprocessing and wrapper; it imports timm's download helper at module level and
    nothing else of timm, so a bare stand-in serves where timm is not installed (nothing is downloaded here)."""
    if importlib.util.find_spec("timm") is None and "timm" not in sys.modules:
        for name in ("timm", "timm.models", "timm.models._hub"):
            module = types.ModuleType(name)
            module.__path__ = []
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            sys.modules[name] = module
        sys.modules["timm.models._hub"].download_cached_file = None
    from hear21passt.models import passt
    from hear21passt.models.preprocess import AugmentMelSTFT
    from hear21passt.wrapper import PasstBasicWrapper

    return passt, AugmentMelSTFT, PasstBasicWrapper


def main() -> None:
    args = parse_args(__doc__, reps=5)
    torch.set_num_threads(2)
    import hear21passt

    from musiclm_core.passt import KLDivergence, PaSST, label_distributions

    passt, AugmentMelSTFT, PasstBasicWrapper = _import_hear21passt()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        # base20sec.get_basic_model without the download: the same mel and network, random weights
        mel = AugmentMelSTFT(n_mels=128, sr=SR, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                             htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
        net = passt.get_model(arch="passt_20sec", pretrained=False, input_tdim=2000)
        reference = PasstBasicWrapper(mel=mel, net=net, max_model_window=20000, mode="logits").eval()
        passt.first_RUN = False
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "passt-20sec.pt"
        torch.save(net.state_dict(), path)
        ours = PaSST.from_pretrained(path, preset="20sec")

    g = torch.Generator().manual_seed(0)
    clips = 0.1 * torch.randn(CLIPS, 10 * SR, generator=g)  # (B, N): 10 s each

    stft = functools.partial(torch.stft, return_complex=False)  # audiocraft's _patch_passt_stft

    def theirs():
        old, torch.stft = torch.stft, stft
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.cat([torch.softmax(reference(clip[None]), dim=-1) for clip in clips])
        finally:
            torch.stft = old

    def ours_per_clip():
        return torch.cat([label_distributions(ours, clip[None], SR) for clip in clips])

    def ours_batched():
        return torch.softmax(ours.logits(clips), dim=-1)

    def ours_metric():  # CLIPS / 2 (generated, reference) pairs: each pair's segments run as one batch
        metric = KLDivergence(ours)
        for i in range(0, CLIPS, 2):
            metric.add(clips[i:i + 1], clips[i + 1:i + 2], SR)
        return metric.compute()

    head = machine_lines()
    with torch.inference_mode():
        expected = theirs()
        errors = ((ours_per_clip() - expected).abs().max().item(), (ours_batched() - expected).abs().max().item())
        per_clip = median_s(ours_per_clip, theirs, args.reps)
        batched = median_s(ours_batched, theirs, args.reps)
        metric = median_s(ours_metric, theirs, args.reps)
    after = load_line("after")

    lines = [
        *head[:3],
        f"# hear21passt {hear21passt.__version__}; passt-s-f128-20sec architecture (768 wide, 12 blocks, 200 time "
        f"positions), random weights, fp32, {CLIPS} clips of 10 s at 32 kHz per call. Median of {args.reps} "
        f"after a warm-up, ours and hear21passt alternated. Max abs difference of the probabilities: "
        f"{errors[0]:.1e} (per clip), {errors[1]:.1e} (batched). `flock /tmp/heavy.lock python benchmarks/passt.py`",
        f"# {head[3][2:]}; {after}",
        "",
        "| label distributions, 10 s clips | ours (clips/s) | hear21passt as audiocraft (clips/s) | speed-up |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {CLIPS / a:.2f} | {CLIPS / b:.2f} | {b / a:.2f} |"
          for what, (a, b) in (("one clip at a time (`label_distributions`)", per_clip),
                               (f"batch of {CLIPS} (`PaSST.logits`)", batched),
                               (f"KL metric, {CLIPS // 2} pairs (`KLDivergence.add`)", metric))],
    ]
    report("## PaSST", lines, write=args.write)


if __name__ == "__main__":
    main()
