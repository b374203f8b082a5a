"""Time one step of our UNet against diffusers' in the same run (MusicLDM and AudioLDM 2 configs).

    flock /tmp/heavy.lock python benchmarks/unet.py                # print the table (2 threads)
    flock /tmp/heavy.lock python benchmarks/unet.py --threads 1    # one thread: steadier on a shared machine
    flock /tmp/heavy.lock python benchmarks/unet.py --write        # and put it in RESULTS.md under "## UNet"

One noise prediction under classifier-free guidance: batch 2 (two different conditions), a 10.24 s latent
(2, 8, 256, 16), timestep 500. Random weights at the official sizes (diffusers' initialisation, moved off it by
noise, written with save_pretrained and loaded by `UNet.from_pretrained`, so both run the same weights):

* musicldm: `UNet2DConditionModel`, CLAP vector (2, 512) as the class embedding;
* audioldm2: `AudioLDM2UNet2DConditionModel`, GPT-2 vectors (2, 8, 768) and T5 states (2, 32, 1024) whose
  second row is masked after 12 tokens.

Columns: diffusers fp32 as it comes (its default NCHW layout and attention processors); ours fp32 (channels-last,
fused q/k/v, 1x1 projections as linears, and its CPU routes: Winograd for the stride-1 3x3 convolutions
(kernels/winograd.py: F(4x4, 3x3) from 128 channels on one thread, from 256 on two, F(2x2, 3x3) where that needs
fewer products), the x2 upsampling convolutions as F(2x2, 3x3) on the upsampled image built from the input (256+
channels) or folded into 2x2 sub-pixel kernels (below), oneDNN matmuls for the transformers' linears with GELU fused
into the GEGLU's, the ResBlocks' 1x1 skips as oneDNN matmuls, all these matmuls against weights packed once into
oneDNN's layout (kernels/packed.py), and the two rows of the batch as two streams on
their share of the threads, kernels/streams.py); ours fp32 again with those routes off (MUSICLM_CONV3X3=conv, MKL's
linears and torch's 1x1 convolutions, MUSICLM_STREAMS=off; the folding stays); both again with bf16 weights and
activations. Times are wall-clock medians, and the fp32 speed-up is also given by process CPU time (both
threads' CPU seconds), which moves less with the load. Max abs difference of each of ours against diffusers' fp32
output, whose magnitude is printed alongside, and of diffusers' bf16 against its fp32 (what bf16 costs either way).
A line above the table gives a 2048^3 fp32 and bf16 matmul's GFLOPS in the same run: the roofline a compute-bound
UNet step works against (the step's GFLOP, from torch's FlopCounterMode, divided by its time, is the "ours GFLOPS"
column: convolutions, linears and attention are nearly all of it). CPU with 2 threads (--threads) and
OMP_WAIT_POLICY=PASSIVE (on a shared 2-core machine spinning OpenMP threads slow everything down, specs/NOTES.md;
`--default-wait` leaves it unset, libgomp's default, as a user's process runs: the end-to-end benchmark's setting).
Medians of the repeats after one warm-up; the five calls alternate so that they see the same load.
"""

from __future__ import annotations

import os
import sys

if "--default-wait" not in sys.argv:  # read when OpenMP starts, i.e. before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from _common import cpu_model, cuda_median_ms, report  # noqa: E402  (benchmarks/ is on sys.path)

BASE = dict(in_channels=8, out_channels=8, block_out_channels=(128, 256, 384, 640), layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), attention_head_dim=8)


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags)


def matmul_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(3))
    return 2 * n ** 3 / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def parse_args():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--default-wait", action="store_true",
                        help="leave OMP_WAIT_POLICY unset (libgomp's default: spin a while, then sleep), as a user's "
                             "process runs, instead of PASSIVE")
    return parser.parse_args()


def set_routes(on: bool) -> None:
    """Our CPU routes on (the defaults) or off, for the next calls (see the module docstring)."""
    from musiclm_core import unet
    from musiclm_core.kernels import streams, winograd

    os.environ[winograd.ENV] = "winograd" if on else "conv"
    os.environ[streams.ENV] = "on" if on else "off"
    winograd.route.cache_clear()
    streams.route.cache_clear()
    unet.ONEDNN_LINEAR = on and torch.backends.mkldnn.is_available()


def step_gflop(ours, kwargs: dict) -> float:
    """Floating-point operations of one step of `ours` (torch's FlopCounterMode, run on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = type(ours)(ours.config).eval()
        meta_kwargs = {k: torch.empty_like(v, device="meta") for k, v in kwargs.items()}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.empty(2, 8, 256, 16), 500, **meta_kwargs)
    return counter.get_total_flops() / 1e9


def make_reference(name: str):
    """(diffusers model, its inputs as diffusers' kwargs, ours as ours') at the official size."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

    g = torch.Generator().manual_seed(1)
    if name == "musicldm":
        model = UNet2DConditionModel(**BASE, cross_attention_dim=BASE["block_out_channels"],
                                     class_embed_type="simple_projection", projection_class_embeddings_input_dim=512,
                                     class_embeddings_concat=True)
        clap = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
        return model, dict(encoder_hidden_states=None, class_labels=clap), dict(class_embed=clap)
    model = AudioLDM2UNet2DConditionModel(**BASE, cross_attention_dim=[[None, 768, 1024]] * 4)
    gpt2, t5 = torch.randn(2, 8, 768, generator=g), torch.randn(2, 32, 1024, generator=g)
    mask = torch.ones(2, 32)
    mask[1, 12:] = 0
    both = dict(encoder_hidden_states=gpt2, encoder_hidden_states_1=t5, encoder_attention_mask_1=mask)
    return model, both, both


def build(name: str) -> tuple:
    """(diffusers' model at the official size moved off its init, its kwargs, ours' kwargs, {dtype: our UNet}),
    ours in fp32 and bf16 loaded from the reference's save_pretrained (`make_reference`)."""
    from musiclm_core.unet import UNet

    torch.manual_seed(0)
    reference, their_kwargs, our_kwargs = make_reference(name)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    reference.eval()
    folder = Path(tempfile.mkdtemp(prefix="unet_bench_"))
    try:
        reference.save_pretrained(str(folder))
        ours = {dtype: UNet.from_pretrained(folder, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return reference, their_kwargs, our_kwargs, ours


def cuda_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() on the GPU over `reps` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    return cuda_median_ms(fn, reps)


def main_cuda(args) -> None:
    """The GPU rows: diffusers and ours in fp32 and bf16, ours with torch's SDPA instead of our Triton attention,
    and the bf16 steps (ours with either attention) replayed from a CUDA graph (generate.GraphedStep, as the
    pipelines' `cuda_graph=True`)."""
    import diffusers

    from musiclm_core.generate import GraphedStep

    reps = max(args.reps, 20)
    name = torch.cuda.get_device_name()
    print(f"# UNet step on {name}, torch {torch.__version__}, diffusers {diffusers.__version__}; batch 2 (CFG), "
          f"latent (2, 8, 256, 16), random weights at the official sizes; median of {reps} after 3 warm-ups, CUDA "
          f"events; TF32: cuDNN {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32} "
          f"(torch's defaults, both sides); {datetime.date.today().isoformat()}")
    print("| config | path | ms | diffusers same dtype / this | max abs vs diffusers fp32 |")
    print("|---|---|---:|---:|---:|")
    for config in ("musicldm", "audioldm2"):
        reference, their_kwargs, our_kwargs, ours = build(config)
        ours = {dtype: model.to("cuda") for dtype, model in ours.items()}
        theirs = {torch.float32: reference.to("cuda").eval(),
                  torch.bfloat16: copy.deepcopy(reference).to("cuda", torch.bfloat16).eval()}
        x = torch.randn(2, 8, 256, 16, generator=torch.Generator().manual_seed(2)).cuda()
        t = torch.tensor(500, device="cuda")

        def cast(kwargs: dict, dtype: torch.dtype) -> dict:  # floats to dtype, all on the GPU
            return {k: None if v is None else v.to("cuda", dtype if v.is_floating_point() else v.dtype)
                    for k, v in kwargs.items()}

        def call(side: str, dtype: torch.dtype, attention: str = "auto"):
            kwargs = cast(their_kwargs if side == "diffusers" else our_kwargs, dtype)
            model, xd = (theirs if side == "diffusers" else ours)[dtype], x.to(dtype)
            if side == "diffusers":
                return lambda: model(xd, t, **kwargs).sample

            def run():
                os.environ["MUSICLM_ATTENTION"] = attention  # read by kernels/attention.py on every call
                return model(xd, t, **kwargs)
            return run

        def graphed(fn):
            step = GraphedStep(lambda xd, td: fn())  # the inputs are fixed here: the graph reads x and t as captured
            return lambda: step(x, t)

        paths = {
            ("diffusers", "fp32"): call("diffusers", torch.float32),
            ("ours", "fp32"): call("ours", torch.float32),
            ("diffusers", "bf16"): call("diffusers", torch.bfloat16),
            ("ours", "bf16"): call("ours", torch.bfloat16),
            ("ours", "bf16, torch SDPA"): call("ours", torch.bfloat16, "torch"),
            ("diffusers", "bf16, CUDA graph"): graphed(call("diffusers", torch.bfloat16)),
            ("ours", "bf16, CUDA graph"): graphed(call("ours", torch.bfloat16)),
            ("ours", "bf16, torch SDPA, CUDA graph"): graphed(call("ours", torch.bfloat16, "torch")),
        }
        ms, err = {}, {}
        with torch.inference_mode():
            want = paths[("diffusers", "fp32")]().float()
            for key, fn in paths.items():
                try:
                    err[key] = (fn().float() - want).abs().max().item()
                    ms[key] = cuda_ms(fn, reps)
                except Exception as e:  # report and go on: one failing path should not hide the others
                    print(f"| {config} | {key[0]} {key[1]} | failed: {type(e).__name__}: {str(e)[:200]} | | |")
        os.environ.pop("MUSICLM_ATTENTION", None)
        for (side, variant), value in ms.items():
            same = ("diffusers", variant.replace(", torch SDPA", ""))
            ratio = f"{ms[same] / value:.2f}" if side == "ours" and same in ms else ""
            print(f"| {config} | {side} {variant} | {value:.2f} | {ratio} | {err[(side, variant)]:.1e} |", flush=True)
        del reference, theirs, ours, paths
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        return main_cuda(args)
    import diffusers

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    gflops = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    rows = []
    for name in ("musicldm", "audioldm2"):
        reference, their_kwargs, our_kwargs, built = build(name)
        ours, ours_bf16 = built[torch.float32], built[torch.bfloat16]
        reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
        x = torch.randn(2, 8, 256, 16, generator=torch.Generator().manual_seed(2))
        bf16_kwargs = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in our_kwargs.items()}
        their_bf16_kwargs = {k: (v.bfloat16() if v is not None and v.is_floating_point() else v)
                             for k, v in their_kwargs.items()}
        calls = {
            "diffusers": lambda: reference(x, 500, **their_kwargs).sample,
            "ours": lambda: set_routes(True) or ours(x, 500, **our_kwargs),
            "ours, routes off": lambda: set_routes(False) or ours(x, 500, **our_kwargs),
            "diffusers bf16": lambda: reference_bf16(x.bfloat16(), 500, **their_bf16_kwargs).sample,
            "ours bf16": lambda: set_routes(True) or ours_bf16(x.bfloat16(), 500, **bf16_kwargs),
        }
        with torch.inference_mode():
            outs = {k: f().float() for k, f in calls.items()}  # also the warm-up
            times = {k: [] for k in calls}
            for _ in range(args.reps):
                for k, f in calls.items():
                    times[k].append(timed_both(f))
        ms = {k: 1e3 * statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        err = {k: (outs[k] - outs["diffusers"]).abs().max().item()
               for k in ("ours", "ours, routes off", "diffusers bf16", "ours bf16")}
        rows.append((name, ms, cpu, err, outs["diffusers"].abs().max().item(), step_gflop(ours, our_kwargs)))
        del reference, reference_bf16, built, ours, ours_bf16, calls, outs
        gc.collect()
    load_end = os.getloadavg()

    lines = [
        f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}), "
        f"torch {torch.__version__} with {args.threads} thread(s), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, diffusers "
        f"{diffusers.__version__}. One UNet step, batch 2 (CFG), latent (2, 8, 256, 16) = 10.24 s, random weights "
        f"at the official sizes. Median of {args.reps} after a warm-up, the five calls alternated. Load average "
        f"(1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end, on {os.cpu_count()} cores. "
        f"A 2048^3 matmul in the same run: fp32 {gflops[torch.float32]:.0f} GFLOPS, bf16 "
        f"{gflops[torch.bfloat16]:.0f} GFLOPS. `flock /tmp/heavy.lock python benchmarks/unet.py "
        f"--threads {args.threads}{' --default-wait' if args.default_wait else ''}`.",
        "",
        "| config (GFLOP per step) | dtype | diffusers (ms) | ours (ms) | speed-up (diffusers / ours) "
        "| ours GFLOPS | ours vs diffusers fp32 | diffusers vs diffusers fp32 | output max abs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ms, cpu, err, scale, gflop in rows:
        lines.append(f"| {name} ({gflop:.0f}) | fp32 | {ms['diffusers']:.0f} | {ms['ours']:.0f} | "
                     f"{ms['diffusers'] / ms['ours']:.2f} (CPU time: {cpu['diffusers'] / cpu['ours']:.2f}) | "
                     f"{1e3 * gflop / ms['ours']:.0f} | {err['ours']:.1e} | 0 | {scale:.2f} |")
        off = "ours, routes off"
        lines.append(f"| {name} | fp32, our routes off | {ms['diffusers']:.0f} | {ms[off]:.0f} | "
                     f"{ms['diffusers'] / ms[off]:.2f} (CPU time: {cpu['diffusers'] / cpu[off]:.2f}) | "
                     f"{1e3 * gflop / ms[off]:.0f} | {err[off]:.1e} | 0 | {scale:.2f} |")
        lines.append(f"| {name} | bf16 | {ms['diffusers bf16']:.0f} | {ms['ours bf16']:.0f} | "
                     f"{ms['diffusers bf16'] / ms['ours bf16']:.2f} (vs diffusers fp32: "
                     f"{ms['diffusers'] / ms['ours bf16']:.2f}) | {1e3 * gflop / ms['ours bf16']:.0f} | "
                     f"{err['ours bf16']:.1e} | {err['diffusers bf16']:.1e} | {scale:.2f} |")
    report("## UNet", lines, write=args.write)


if __name__ == "__main__":
    main()
