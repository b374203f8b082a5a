"""What the ours-against-transformers benchmarks share: alternated timing, the machine's name, RESULTS.md.

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
