"""Independent rows of one CPU call side by side: each group of rows in its own thread, on its share of the cores.

A guided diffusion step runs the UNet on a batch of two rows (the unguided and the guided one) that never meet
until the sampler combines their outputs. torch parallelises each op over all intra-op threads instead, which on
a few cores costs twice: every op is a parallel region (a thread handoff, and under OMP_WAIT_POLICY=PASSIVE a
wake-up, some 1,400 of them per UNet step), and our Winograd routes are tuned per thread count (F(4x4) at 128
channels pays on one thread, not on two: kernels/winograd.py). Two streams of one thread each, one per row, run
every op single-threaded, with no handoffs.

Measured (2-core AMD EPYC Zen 4, idle, one MusicLDM step at batch 2, 10.24 s latent, alternated with the same
step without streams and diffusers'): under OMP_WAIT_POLICY=PASSIVE 999-1082 ms against 1126-1175 (0.87-0.92x
the time); under libgomp's default waits 994-1038 ms against 1023-1059 (0.96-0.98x), where the handoffs cost
less. benchmarks/unet.py over runs: MusicLDM 1.20-1.33x diffusers, AudioLDM 2 1.27-1.32x (1.16-1.29x / 1.19-1.27x
before). Same arithmetic per row (a batch-1 GEMM can group its sums differently from a batch-2 one: ~1e-6).
The workers' rows allocate from their threads' own malloc arenas, which glibc trims and refills: a step takes
25-35k page faults against diffusers' 14-15k. At the ~1.5 us a fault measured on that VM that is ~2 % of a step;
MALLOC_ARENA_MAX=1 or larger MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ remove most of them, but only
process-wide, so they are left to the user (benchmarks/RESULTS.md, fifth session).

Tried and not taken: the HiFi-GAN vocoder's three residual blocks of a stage as streams (dynamically balanced
over 2 threads, the longest kernel first): 4018 ms against 3751 ms without, the FFT route's memory passes share
the one memory system.

The HiFi-GAN vocoder's FFT convolutions (kernels/conv1d.py) use the same workers for the channels of one
convolution: its FFTs, copies and thin products barely use a second intra-op thread, one thread per share does.

`split(fn, parts)` runs fn on each part in a worker thread that holds threads // len(parts) intra-op threads;
`streams(rows, x)` says how many parts a call takes: min(rows, threads) for a CPU call outside autograd and
autocast with 2+ threads, else 1 (as one call: nothing to split). MUSICLM_STREAMS=off turns it off (measuring,
debugging); it is off under OMP_WAIT_POLICY=ACTIVE (`route`). The UNet does not split a call while forward hooks
are registered (unet.UNet._hooked): hooks that capture activations see whole batches.

Thread counts: `torch.set_num_threads` in a worker sets that thread's OpenMP and MKL counts, and also torch's
process-wide default for threads that have not run an op yet; the caller's own count is set again after each
split so that the default stays the caller's.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

from musiclm_core.kernels.switch import env_route

ENV = "MUSICLM_STREAMS"
ROUTES = ("on", "off")

Part = TypeVar("Part")
Result = TypeVar("Result")


@functools.cache
def route() -> str:
    """This process's setting: MUSICLM_STREAMS if set, else "on", or "off" under OMP_WAIT_POLICY=ACTIVE, whose
    spinning OpenMP threads of the caller hold the cores the streams need (measured: 0.90x the step without
    streams, where PASSIVE and libgomp's default gain). Decided once."""
    choice = env_route(ENV, ROUTES)
    if choice is None:
        choice = "off" if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "active" else "on"
    return choice


def streams(rows: int, x: Tensor) -> int:
    """How many groups the rows of a call on x run in (module docstring): 1 means one ordinary call."""
    if (route() == "off" or x.device.type != "cpu" or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):
        return 1
    return max(1, min(rows, torch.get_num_threads()))


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """The worker threads, made once per process: a forked child (a DataLoader worker) inherits the parent's pool
    object but not its threads, and would wait forever on it; keyed by pid, the child makes its own."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="musiclm-stream")


def split(fn: Callable[[Part], Result], parts: Sequence[Part]) -> list[Result]:
    """[fn(part) for part in parts], each in its own worker thread with threads // len(parts) intra-op threads,
    in the caller's grad / inference mode (both are per thread)."""
    threads = torch.get_num_threads()
    share = max(1, threads // len(parts))
    inference = torch.is_inference_mode_enabled()

    def run(part: Part) -> Result:
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        # no_grad inside: inference_mode(False) turns gradients back on
        with torch.inference_mode(inference), torch.no_grad():
            return fn(part)

    try:
        return list(_pool(len(parts), os.getpid()).map(run, parts))
    finally:
        torch.set_num_threads(threads)  # the process-wide default back to the caller's (module docstring)
