"""Time MusicLDM / AudioLDM 2 end to end against the reference pipeline, in one run, split by stage.

    flock /tmp/heavy.lock python benchmarks/ldm.py                      # MusicLDM, print the table
    flock /tmp/heavy.lock python benchmarks/ldm.py --model audioldm2    # AudioLDM 2
    ... --write                                                         # and put it in benchmarks/RESULTS.md
    python benchmarks/ldm.py --device cuda --model musicldm             # the GPU rows (`main_cuda`)

The official configs with random weights (tests/ldm_fixtures.py: every weight moved off its init), written by
diffusers' save_pretrained and loaded by ours through `from_pretrained`, so both run the same weights. The reference
is the stock diffusers pipeline with its transformers-5 crash site patched (tests/ldm_fixtures.py). A 10.24 s clip,
20 DPM-Solver++ steps, guidance on, one waveform per prompt, the same initial latents on both sides; fp32 on the CPU
with 2 threads. Stages: text encoding (the pipeline's prompt encoding, negatives included), UNet loop (the rest of
the call: latents, the 20 guided UNet calls, the sampler), VAE decode, vocoder; the ranking (CLAP scores of 2
candidates, resampling included) is timed on its own, since one waveform per prompt skips it. Each figure is the
median over the repeats; the calls of ours and the reference alternate, so that both see the same load.

Before the timed runs each side generates once with 2 steps and ranks once (`--no-warmup` skips it): a process's
first generation also pays one-off work, ours more than the reference's (the Winograd weight transforms, ~1 GB of
fresh memory for the UNet's, and oneDNN's kernels for each new shape: 1-3 s of a ~30 s clip on the 2-core EPYC),
which a researcher generating many clips in one process pays once. `--no-warmup --reps 1` times that first clip.
"""

from __future__ import annotations

import functools
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# benchmarks/ (the script's folder is on sys.path); tests/ for the pipeline folders and the reference
from _common import load_line, machine_lines, report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SECONDS, STEPS = 10.24, 20
PROMPT, NEGATIVE = ["a calm piano melody with soft strings"], ["low quality"]


def timed(owner, name: str, times: dict[str, float], stage: str, sync=lambda: None) -> None:
    """Replace owner.name by a wrapper that adds each call's seconds to times[stage] (an instance attribute:
    nn.Module.__call__ finds a patched forward). sync: torch.cuda.synchronize on the GPU, so that a stage's
    seconds are its own work, not the queue before it."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            times[stage] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def instrument(ours, ref, kind: str, sync=lambda: None) -> tuple[dict, dict]:
    mine, theirs = defaultdict(float), defaultdict(float)
    timed(ours, "_encode", mine, "text encoding", sync)
    timed(ours.vae, "decode", mine, "VAE decode", sync)
    timed(ours.vocoder, "forward", mine, "vocoder", sync)
    timed(ref, "_encode_prompt" if kind == "musicldm" else "encode_prompt", theirs, "text encoding", sync)
    timed(ref.vae, "decode", theirs, "VAE decode", sync)
    timed(ref.vocoder, "forward", theirs, "vocoder", sync)
    return mine, theirs


STAGES = ["text encoding", "UNet loop", "VAE decode", "vocoder", "end to end"]


def run_timed(fn, times: dict, sync=lambda: None):
    """fn()'s output; times gets its stages (those `instrument` records, "end to end", and "UNet loop" as the
    rest of the call)."""
    times.clear()
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    times["end to end"] = time.perf_counter() - start
    times["UNet loop"] = times["end to end"] - sum(times[s] for s in ("text encoding", "VAE decode", "vocoder"))
    return out


def main_cuda(args, path: Path, name: str) -> None:
    """The GPU rows: the reference pipeline and ours in fp32 and bf16 on the GPU, ours also with its UNet call
    replayed from a CUDA graph (`generate(..., cuda_graph=True)`): the capture the pipeline kept from the warm-up
    run, and a new capture in every run (a process's first generation, or one of other shapes); the stages split as
    on the CPU."""
    import diffusers
    import transformers

    import ldm_fixtures as lf
    from diffusers import DPMSolverMultistepScheduler
    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.musicldm import MusicLDM

    sync = torch.cuda.synchronize
    reps = max(args.reps, 3)
    rows, errors = [], []
    want = None
    for dtype in (torch.float32, torch.bfloat16):
        label = "fp32" if dtype == torch.float32 else "bf16"
        ours = (MusicLDM if args.model == "musicldm" else AudioLDM2).from_pretrained(path, dtype=dtype).to("cuda")
        reference = (lf.reference_musicldm if args.model == "musicldm" else lf.reference_audioldm2)(path)
        reference = reference.to("cuda", dtype)
        reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
        latents = lf.latents_for(ours, 1, SECONDS).to("cuda", dtype)
        mine, theirs = instrument(ours, reference, args.model, sync)
        run = dict(audio_length_in_s=SECONDS, num_inference_steps=STEPS, negative_prompt=NEGATIVE)

        def graphed(capture: bool) -> torch.Tensor:
            if capture:
                ours._graph = None  # forget the kept capture (ldm._graphed_noise): this run captures the UNet again
            return ours.generate(PROMPT, scheduler="dpm", latents=latents.clone(), cuda_graph=True, **run)[:, 0]

        paths = {f"reference {label}": (lambda: reference(PROMPT, latents=latents.clone(), output_type="pt",
                                                           **run).audios, theirs),
                 f"ours {label}": (lambda: ours.generate(PROMPT, scheduler="dpm", latents=latents.clone(), **run)[:, 0],
                                   mine),
                 f"ours {label}, CUDA graph": (lambda: graphed(False), mine),
                 f"ours {label}, CUDA graph, captured in the run": (lambda: graphed(True), mine)}
        working = {}
        with torch.inference_mode():
            for key, (fn, times) in paths.items():
                try:
                    run_timed(fn, times, sync)  # warm-up: kernels chosen, Triton compiled, the graph captured
                    working[key] = (fn, times)
                except Exception as e:  # report and go on: one failing path should not hide the others
                    errors.append(f"{key} failed: {type(e).__name__}: {str(e)[:300]}")
            per_path, outputs = defaultdict(list), {}
            for _ in range(reps):
                for key, (fn, times) in working.items():
                    outputs[key] = run_timed(fn, times, sync).float().cpu()
                    per_path[key].append(dict(times))
        want = outputs.get("reference fp32", want)  # fp32's loop runs first: bf16 compares with it
        for key in working:
            diff = "" if want is None else f"{(outputs[key] - want).abs().max().item():.1e}"
            rows.append((key, [statistics.median(t[s] for t in per_path[key]) for s in STAGES], diff))
        del ours, reference, paths
        torch.cuda.empty_cache()
    lines = [
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{name}, official configs with random weights on the GPU; a {SECONDS} s clip, {STEPS} DPM-Solver++ steps "
        f"with guidance and a negative prompt, one waveform, the same initial latents on every path. Median of {reps}"
        f" runs after a warm-up run of each path (seconds; CUDA synchronised around each stage). TF32: cuDNN "
        f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32} (torch's defaults). "
        f"`python benchmarks/ldm.py --device cuda --model {args.model}`.",
        "",
        "| path | " + " | ".join(STAGES) + " | max abs vs reference fp32 |",
        "|---|" + "---:|" * (len(STAGES) + 1),
        *[f"| {key} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {diff} |" for key, values, diff in rows],
        *[f"- {e}" for e in errors],
    ]
    report(f"## {name} end to end on the GPU", lines, write=args.write)


def main() -> None:
    import argparse

    import diffusers
    import transformers

    import ldm_fixtures as lf
    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.musicldm import MusicLDM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["musicldm", "audioldm2"], default="musicldm")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configs (a smoke test of this script)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU rows (fp32, bf16, CUDA graph; main_cuda)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="time the process's first generation too (no 2-step generation and ranking before)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    name = "MusicLDM" if args.model == "musicldm" else "AudioLDM 2"
    folder = Path(tempfile.mkdtemp(prefix="ldm_bench_"))
    if args.device == "cuda":
        try:
            write = lf.write_musicldm if args.model == "musicldm" else lf.write_audioldm2
            return main_cuda(args, write(folder, official=not args.tiny), name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    torch.set_num_threads(2)
    try:
        if args.model == "musicldm":
            path = lf.write_musicldm(folder, official=not args.tiny)
            ours, ref = MusicLDM.from_pretrained(path), lf.reference_musicldm(path)
        else:
            path = lf.write_audioldm2(folder, official=not args.tiny)
            ours, ref = AudioLDM2.from_pretrained(path), lf.reference_audioldm2(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    from diffusers import DPMSolverMultistepScheduler

    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    latents = lf.latents_for(ours, 1, SECONDS)
    mine, theirs = instrument(ours, ref, args.model)
    run = dict(audio_length_in_s=SECONDS, num_inference_steps=STEPS, negative_prompt=NEGATIVE)

    header = machine_lines()
    per_rep: list[tuple[dict, dict]] = []
    with torch.inference_mode():
        if args.warmup:  # every layer once, at the clip's shapes (module docstring)
            short = dict(run, num_inference_steps=2)
            ours.generate(PROMPT, scheduler="dpm", latents=latents.clone(), **short)
            ref(PROMPT, latents=latents.clone(), output_type="pt", **short)
        for _ in range(args.reps):
            results = []
            for fn, times in ((lambda: ours.generate(PROMPT, scheduler="dpm", latents=latents.clone(), **run), mine),
                              (lambda: ref(PROMPT, latents=latents.clone(), output_type="pt", **run).audios,
                               theirs)):
                results.append(run_timed(fn, times))
            per_rep.append((dict(mine), dict(theirs)))
        err = (results[0][:, 0] - results[1]).abs().max().item()
        scale = results[1].abs().max().item()
        # The ranking: two 10.24 s candidates (the generated clip and its reverse) scored against the prompt.
        candidates = torch.cat([results[0][:, 0], results[0][:, 0].flip(-1)])  # (2, N)
        rank_ours, rank_ref = [], []
        if args.warmup:
            ours.rank(PROMPT, candidates, 2, seed=0)
            ref.score_waveforms(PROMPT, candidates, 2, "cpu", torch.float32)
        for _ in range(args.reps):
            for fn, out in ((lambda: ours.rank(PROMPT, candidates, 2, seed=0), rank_ours),
                            (lambda: ref.score_waveforms(PROMPT, candidates, 2, "cpu", torch.float32), rank_ref)):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)

    rows = [(s, statistics.median(m[s] for m, _ in per_rep), statistics.median(t[s] for _, t in per_rep))
            for s in STAGES]
    rows.append(("ranking, 2 candidates (separate)", statistics.median(rank_ours), statistics.median(rank_ref)))
    lines = [
        *header,
        f"# {load_line('after')}",
        "",
        f"{name}, official configs with random weights, fp32, 2 threads; a {SECONDS} s clip, {STEPS} DPM-Solver++ "
        f"steps with guidance and a negative prompt, one waveform; the same initial latents on both sides (end-to-end "
        f"max abs diff {err:.1e}, reference output max abs {scale:.2f}). Reference: diffusers {diffusers.__version__}"
        f" pipeline (transformers {transformers.__version__}, its crash site patched: tests/ldm_fixtures.py). "
        f"Median of {args.reps} runs{' after a 2-step warm-up generation' if args.warmup else ', no warm-up'}, "
        f"ours and the reference alternated. `flock /tmp/heavy.lock python benchmarks/ldm.py --model {args.model}"
        f"{'' if args.warmup else ' --no-warmup'} --reps {args.reps}`.",
        "",
        "| stage | ours (s) | reference (s) | speed-up (reference / ours) |",
        "|---|---:|---:|---:|",
        *[f"| {stage} | {a:.2f} | {b:.2f} | {b / a:.2f} |" for stage, a, b in rows],
    ]
    report(f"## {name} end to end", lines, write=args.write)


if __name__ == "__main__":
    main()
