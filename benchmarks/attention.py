"""Time our Triton attention against PyTorch's SDPA, eager and torch.compile'd, on MusicGen's shapes.

    python benchmarks/attention.py

Shapes: MusicGen small / medium / large (H = 16 / 24 / 32 heads of D = 64), bf16, batch 2 (one prompt with its CFG
null row) and 16:
  * decode: one query step at the last slot of a static cache of 1500 or 3000 slots (30 s / 60 s of audio), so
    every key is visible and all paths do the same work;
  * prefill: 500 queries at position 0 into a static cache of 1500 slots.

Ours gets what a model passes: the whole static cache, `causal=True` and the position as a 0-dim CUDA tensor. The
baselines get the best case for SDPA: only the visible keys (a slice of the cache), no mask for decode and
`is_causal=True` for prefill, which lets PyTorch choose its flash / cuDNN kernels.

Each timed call runs the attention over L separate caches, like L layers of the model, with L large enough that
the caches overflow the L2 cache (repeating one small cache would time L2, not memory); times are per layer.
"graph": the L calls captured once in a CUDA graph and replayed (device time: how a captured decode step runs).
"eager": the L calls launched from Python (includes the launch overhead). Medians of many repeats.
"floor": the bytes a decode step must read (q, visible K and V, out) over the measured copy bandwidth.

Without CUDA it times the reference path (SDPA) on the CPU on the small shapes only, and says so.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from musiclm_core.kernels import attention, attention_reference

from _common import cuda_median_ms  # benchmarks/ is on sys.path

MODELS = {"small": 16, "medium": 24, "large": 32}  # heads; D = 64 in all three
D = 64


def cases():
    for model, H in MODELS.items():
        for B in (2, 16):
            for cache in (1500, 3000):
                yield dict(model=model, kind="decode", B=B, H=H, Tq=1, Tk=cache, pos=cache - 1)
            yield dict(model=model, kind="prefill", B=B, H=H, Tq=500, Tk=1500, pos=0)


def time_eager(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    return cuda_median_ms(fn, reps)


def time_graph(fn, reps: int = 50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton / inductor compilation) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    return cuda_median_ms(graph.replay, reps)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def run_cuda() -> None:
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; torch {torch.__version__}; bf16; times in us per layer")
    rows = []
    for c in cases():
        B, H, Tq, Tk, pos = c["B"], c["H"], c["Tq"], c["Tk"], c["pos"]
        visible = pos + Tq
        layer_bytes = 2 * B * H * Tk * D * 2  # K and V of one layer's cache, bf16
        L = max(1, min(32, math.ceil(4 * props.L2_cache_size / layer_bytes)))
        kv = [(torch.randn(B, H, Tk, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(B, H, Tk, D, device="cuda", dtype=torch.bfloat16)) for _ in range(L)]
        q = torch.randn(B, H, Tq, D, device="cuda", dtype=torch.bfloat16)
        position = torch.tensor(pos, device="cuda")
        causal = c["kind"] == "prefill"

        def ours():
            return [attention(q, k, v, causal=True, q_offset=position, backend="triton") for k, v in kv]

        def sdpa_layer(q, k, v):
            return F.scaled_dot_product_attention(q, k[:, :, :visible], v[:, :, :visible], is_causal=causal)

        torch._dynamo.reset()  # a fresh compile per shape (the recompile limit would fall back to eager)
        compiled_layer = torch.compile(sdpa_layer, dynamic=False)
        paths = {"ours": ours,
                 "sdpa": lambda: [sdpa_layer(q, k, v) for k, v in kv],
                 "compiled": lambda: [compiled_layer(q, k, v) for k, v in kv]}

        # Correct first: ours against SDPA on the same inputs (the tests hold it to the fp32 reference).
        got, want = ours()[0].float(), paths["sdpa"]()[0].float()
        err = ((got - want).norm() / want.norm()).item()
        row = dict(c, L=L, err=err)
        for name, fn in paths.items():
            row[f"{name}_graph"] = time_graph(fn) * 1e3 / L
            row[f"{name}_eager"] = time_eager(fn) * 1e3 / L
        if c["kind"] == "decode":
            row["floor"] = (2 * B * H * visible * D + 2 * B * H * Tq * D) * 2 / bandwidth * 1e6
        rows.append(row)
        print(f"  done {c['model']} {c['kind']} B={B} Tk={Tk}", flush=True)

    print_table(rows)


def print_table(rows: list[dict]) -> None:
    header = (f"{'model':<7}{'kind':<8}{'B':>3}{'H':>4}{'Tq':>5}{'Tk':>6}{'L':>4} | {'ours':>8}{'sdpa':>8}"
              f"{'compiled':>9}{'sdpa/ours':>10}{'comp/ours':>10}{'floor':>7} | {'ours':>8}{'sdpa':>8}"
              f"{'compiled':>9} | {'rel err':>8}")
    bars = [i for i, ch in enumerate(header) if ch == "|"]  # the three column groups' borders
    print("\n" + " " * bars[0] + "| graph replay (us per layer)".ljust(bars[1] - bars[0])
          + "| eager (us per layer)".ljust(bars[2] - bars[1]) + "|")
    print(header)
    print("-" * len(header))
    for r in rows:
        floor = f"{r['floor']:7.1f}" if "floor" in r else f"{'':7}"
        print(f"{r['model']:<7}{r['kind']:<8}{r['B']:>3}{r['H']:>4}{r['Tq']:>5}{r['Tk']:>6}{r['L']:>4} | "
              f"{r['ours_graph']:8.1f}{r['sdpa_graph']:8.1f}{r['compiled_graph']:9.1f}"
              f"{r['sdpa_graph'] / r['ours_graph']:10.2f}{r['compiled_graph'] / r['ours_graph']:10.2f}{floor} | "
              f"{r['ours_eager']:8.1f}{r['sdpa_eager']:8.1f}{r['compiled_eager']:9.1f} | {r['err']:8.1e}")
    print("ratios > 1: ours is faster. rel err: ||ours - sdpa|| / ||sdpa|| on the first layer.")


def run_cpu() -> None:
    print("No CUDA device: timing the reference path (SDPA) on the CPU, small model, batch 2, fp32. "
          "The Triton kernels and the comparison need a GPU.")
    torch.manual_seed(0)
    H = MODELS["small"]
    print(f"{'kind':<8}{'B':>3}{'H':>4}{'Tq':>5}{'Tk':>6} | {'reference ms':>12}")
    for c in cases():
        if c["model"] != "small" or c["B"] != 2:
            continue
        B, Tq, Tk, pos = c["B"], c["Tq"], c["Tk"], c["pos"]
        q = torch.randn(B, H, Tq, D)
        k, v = torch.randn(B, H, Tk, D), torch.randn(B, H, Tk, D)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            attention_reference(q, k, v, causal=True, q_offset=pos)
            times.append(time.perf_counter() - start)
        print(f"{c['kind']:<8}{B:>3}{H:>4}{Tq:>5}{Tk:>6} | {statistics.median(times) * 1e3:12.2f}")


if __name__ == "__main__":
    run_cuda() if torch.cuda.is_available() else run_cpu()
