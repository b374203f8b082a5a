"""What the ours-against-transformers benchmarks share: alternated timing, the machine's description (CPU model,
vector extensions, which fp32 linear route it takes, load average), RESULTS.md.

Every table should say which machine it comes from: the CPUs differ by more than most changes measured here
(F.linear's skinny fp32 products read their weights near the memory bandwidth on an Intel Xeon and at a fifth to
a third of it on an AMD EPYC, whose MKL path differs; bf16 is slower than fp32 without AVX512-BF16/AMX). Print
`machine_lines()` above each table (and put them in RESULTS.md with it), and `load_line("after")` after the runs.

Imported as `_common` by scripts run as `python benchmarks/<name>.py` (Python puts the script's folder first on
sys.path).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def parse_args(doc: str, reps: int) -> argparse.Namespace:
    """The options every one of these scripts takes: --write (the table into RESULTS.md) and --reps; the help
    text is the first paragraph of the script's docstring `doc`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--reps", type=int, default=reps)
    return parser.parse_args()


def median_s(ours, theirs, reps: int) -> tuple[float, float]:
    """Median seconds of each over `reps` calls after one warm-up call; the calls alternate so that both see
    the same load on a shared machine."""
    ours(), theirs()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector extensions that decide which matmul kernels run (AVX2, AVX-512, VNNI, BF16, AMX), as
    /proc/cpuinfo spells them, e.g. "avx2 avx512f avx512_vnni"; "none of avx2/avx512/amx" if none."""
    from musiclm_core.kernels.linear import cpu_info

    return " ".join(cpu_info().extensions()) or "none of avx2/avx512/amx"


def cpu_description() -> str:
    """One line: model, vendor and family, logical CPUs, vector extensions and this process's fp32 linear route,
    e.g. "AMD EPYC (AuthenticAMD, family 25 model 17), 2 logical CPUs, avx2 avx512f avx512_vnni avx512_bf16; fp32
    linear route: blocked (kernels/linear.py)"."""
    from musiclm_core.kernels.linear import cpu_info, route

    info = cpu_info()
    vendor = f" ({', '.join(part for part in (info.vendor, info.family) if part)})" if info.vendor else ""
    return (f"{cpu_model()}{vendor}, {os.cpu_count()} logical CPUs, {cpu_flags()}; fp32 linear route: {route()} "
            f"(kernels/linear.py)")


HIGH_LOAD = 0.5  # 1-minute load per logical CPU above which timings are not a quiet machine's


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages (0s where the OS does not say)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def load_line(when: str) -> str:
    """"load average {when}: 1.02 0.80 0.45 (2 logical CPUs)", plus a warning when the machine is busy."""
    load = load_average()
    cpus = os.cpu_count() or 1
    line = f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({cpus} logical CPUs)"
    if load[0] > HIGH_LOAD * cpus:
        line += (f" -- WARNING: the machine is busy (above {HIGH_LOAD:g} per CPU): other processes share its "
                 f"cores and memory bandwidth, so these timings are below a quiet machine's; run again when it is "
                 f"idle, or with 1 thread")
    return line


def machine_lines() -> list[str]:
    """What to print above a table: date and time (UTC), the CPU (`cpu_description`), torch and its BLAS, the
    load average now."""
    import torch

    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node() or 'this machine'}",
            f"# CPU: {cpu_description()}",
            f"# torch {torch.__version__} ({blas}, CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} threads",
            f"# {load_line('before')}"]


def report(heading: str, lines: list[str], *, write: bool) -> None:
    """Print the section's lines; with `write`, also put them into RESULTS.md under `heading`."""
    body = "\n".join(lines)
    print(body)
    if write:
        write_section(heading, body)


def write_section(heading: str, body: str) -> None:
    """Replace our section of RESULTS.md (or append it at the end), leaving every other section as it is.

    Re-reads the file just before writing and swaps the new one in with os.replace: another writer's sections
    are kept, and a reader never sees half a file.
    """
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{heading}\n\n{body}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    tmp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)


def cuda_median_ms(run, reps: int) -> float:
    """Median milliseconds of run() on the GPU over `reps` calls, CUDA events around each (warm up first)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
