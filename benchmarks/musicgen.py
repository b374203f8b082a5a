"""MusicGen decoding speed: transformers against musiclm_core, in one run, with the memory roofline.

    python benchmarks/musicgen.py [--device cpu|cuda] [--steps N] [--threads 2] [--repeat 1] [--parity-steps 100]
                                  [--variants fp32 bf16 int8 int4 ...]

Both fp32 linear routes on one machine (kernels/linear.py: "linear" = F.linear, the route an Intel CPU takes;
"blocked" = the route an AMD CPU takes), so that either kind of machine shows the other kind's choice:

    python benchmarks/musicgen.py --steps 64 --repeat 1 --parity-steps 0 --variants fp32@linear fp32@blocked int8

CPU (default). transformers' `MusicgenForConditionalGeneration` is built at the official musicgen-small config
(decoder 1024 x 24 layers, the full T5-base text encoder config, the full EnCodec 32 kHz config) with random
weights and written with `save_pretrained` to a temporary folder. Both sides load that folder: transformers with
its `from_pretrained`, ours with `MusicGen.from_pretrained` (the whole loader at full size). Then, one prompt
(batch 1), classifier-free guidance 3.0 (2 rows per step), sampling with top_k 250, fp32, `--threads` threads:

* transformers: `generate(max_new_tokens=N)`; ours: `MusicGen.generate_codes(max_new_tokens=N)`, fp32, and with
  its LM's weights in bf16, int8 and int4 (`kernels/quant.py`). fp32 takes the linear route this CPU gets
  (kernels/linear.py, column "route"); `fp32@linear` / `fp32@blocked` force one (MUSICLM_LINEAR in the worker).
  `--variants int4+compile` (any format +compile): with `lm.compile_decode()`, compiled during a 4-step
  generation before the timed one; that time is the column "compile s" (inductor's on-disk cache shortens it
  after the first run), its memory counts in "gen peak", and "(+x GB)" after it is the summed peak RSS of the
  compile worker processes still alive then, if any.
* steps/s of the decode loop only: a timestamp is taken each time a column of tokens has been sampled (a logits
  processor appended to transformers' list; our `progress` callback), and steps/s = (n - 1) / (t_n - t_1). That
  leaves out the text encoder, the prefill and the audio decoding, and times the same thing on both sides: one
  decoder forward over one column (2 rows) plus the sampling.
* memory: each side runs in its own subprocess; `VmHWM` (peak resident set) after generation, with the peak
  reset after loading (/proc/self/clear_refs), so "gen peak" is the peak while generating, weights included;
  "load peak" is the peak of the whole process.
* roofline: the bytes one decode step must read (every LM weight the step touches: the decoder layers without
  the cross-attention k/v projections, which run once per generation, the final norm and the K heads; K
  embedding rows; the self-attention keys and values of the visible prefix and the text's cross-attention keys
  and values) over the memory read bandwidth measured with torch (sum over a 1 GiB fp32 tensor, best of 7) =
  the fastest a step can be. "% roofline" = measured steps/s over that bound. The quantised paths read fewer
  weight bytes, so their bound is higher: they are reported against their own bound and against fp32's.
* parity (`--parity-steps`, 0 = skip): bf16 / int8 / int4 against fp32 on the tiny preset (random init) and on the
  small model from the folder: logits max abs error over a teacher-forced pass, top-1 agreement of those logits,
  and the share of identical tokens over a free-running greedy (CFG) generation of that many steps.

CUDA (`--device cuda`): small / medium / large built at random on the GPU in bf16, batch 1 (with CFG: 2 rows) and
batch 8 (16 rows): transformers eager, ours eager, ours with every decode step replayed from a CUDA graph
(`generate_codes(..., cuda_graph=True)`), with our Triton attention and with torch's SDPA. steps/s and % of the
HBM roofline (measured copy bandwidth, and the datasheet figure for the device).

Every table starts with the machine (`_common.machine_lines`: date, CPU model, vendor and family, its vector
extensions AVX2 / AVX-512 / VNNI / BF16 / AMX, the fp32 linear route, torch and its BLAS) and the load average;
each worker's row has the 1-minute load when it finished. Timings on a shared machine move with its load: a line
says WARNING when the load is high (above 0.5 per logical CPU); run it twice, or when the machine is idle.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import load_average, load_line, machine_lines  # benchmarks/ (the script's folder is on sys.path)

PROMPT = "80s pop track with bassy drums and synth"
GUIDANCE, TOP_K = 3.0, 250
RESULT = "RESULT "  # prefix of the one JSON line a worker prints

# Datasheet HBM bandwidth (bytes/s) by device-name fragment, for the GPU table next to the measured figure.
HBM = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.55e12}


# ---------------------------------------------------------------------------------------------------------------
# Configs and the reference checkpoint


def official_config(size: str = "small", smoke: bool = False):
    """transformers MusicgenConfig of facebook/musicgen-{size}: T5-base + EnCodec 32 kHz + the decoder.

    smoke: 2 decoder layers and 1 T5 layer, to check the script end to end in seconds (not for figures).
    """
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    width, layers, heads = {"small": (1024, 24, 16), "medium": (1536, 48, 24), "large": (2048, 48, 32)}[size]
    layers = 2 if smoke else layers
    t5 = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=1 if smoke else 12, num_heads=12,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
                  layer_norm_epsilon=1e-6, dropout_rate=0.1, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    codec = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
                          hidden_size=128, codebook_dim=128, codebook_size=2048, target_bandwidths=[2.2],
                          normalize=False, num_lstm_layers=2, num_residual_layers=1, residual_kernel_size=3,
                          kernel_size=7, last_kernel_size=7, dilation_growth_rate=2, compress=2,
                          use_causal_conv=False, pad_mode="reflect", trim_right_ratio=1.0, norm_type="weight_norm",
                          use_conv_shortcut=False, chunk_length_s=None, overlap=None)
    decoder = MusicgenDecoderConfig(vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=layers,
                                    ffn_dim=4 * width, num_attention_heads=heads, hidden_size=width,
                                    num_codebooks=4, audio_channels=1, activation_function="gelu",
                                    scale_embedding=False, pad_token_id=2048, bos_token_id=2048,
                                    tie_word_embeddings=False)
    return MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())


def _set_generation_config(model) -> None:
    # The official generation_config.json (specs/musicgen.md 1.6).
    model.generation_config.update(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048,
                                   do_sample=True, guidance_scale=GUIDANCE, max_length=1500)


def train_spiece(folder: Path) -> None:
    """A small sentencepiece model (MusicGen repos keep T5's spiece.model at their root; the real one is not
    needed for timing: only the prompt's length matters)."""
    import random

    import sentencepiece as spm

    words = ("80s pop track with bassy drums and synth the a of music song guitar piano beat tempo loud soft calm "
             "happy sad rock jazz electronic melody rhythm ambient dark bright warm funk").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 10))) for _ in range(2000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"),
                                   model_type="unigram", vocab_size=100, hard_vocab_limit=False, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)


def worker_build(args) -> dict:
    from transformers import MusicgenForConditionalGeneration

    torch.manual_seed(0)
    t = time.perf_counter()
    model = MusicgenForConditionalGeneration(official_config("small", args.smoke)).eval()
    _set_generation_config(model)
    folder = Path(args.folder)
    model.save_pretrained(folder)
    train_spiece(folder)
    return {"build_s": time.perf_counter() - t,
            "params": {name: sum(p.numel() for p in part.parameters()) for name, part in
                       (("decoder", model.decoder), ("text_encoder", model.text_encoder),
                        ("audio_encoder", model.audio_encoder))}}


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def _status(field: str, pid: int | str = "self") -> int:
    """A /proc/<pid>/status size field (VmRSS, VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _descendants_peak() -> int:
    """Summed VmHWM of this process's live descendants in bytes: torch.compile's compile workers, whose memory
    the generation needs too but which the worker's own VmHWM leaves out."""
    parent = {}
    for entry in Path("/proc").iterdir():
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):  # not a process, or one that just ended
            continue
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    total = 0
    for pid in family - {os.getpid()}:
        try:
            total += max(_status("VmHWM", pid), 0)
        except OSError:
            continue
    return total


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rate(stamps: list[tuple[float, float]]) -> dict:
    """steps/s between the first and the last stamp, by the wall clock and by this process's CPU time (with one
    thread the latter leaves out the time other processes held the core: the machine's own speed)."""
    wall = [w for w, _ in stamps]
    gaps = [b - a for a, b in zip(wall, wall[1:])]
    return {"steps_per_s": len(gaps) / (wall[-1] - wall[0]), "median_step_ms": statistics.median(gaps) * 1e3,
            "cpu_steps_per_s": len(gaps) / (stamps[-1][1] - stamps[0][1]), "intervals": len(gaps)}


def step_bytes(lm, rows: int, visible: float, text_len: int) -> float:
    """Bytes one decode step of our LM reads (see the module docstring), `visible` self-attention keys."""
    def size(module) -> int:  # parameters and buffers (works on meta too), without the sinusoid table
        tensors = itertools.chain(module.parameters(), module.buffers())
        return sum(t.numel() * t.element_size() for t in tensors if t is not getattr(lm, "sinusoids", None))

    c = lm.config
    once = size(lm.text_proj) + size(lm.embeddings)  # text projection: once per generation; embeddings: K rows
    for layer in lm.layers:
        if c.cross_attention:
            once += size(layer.cross_attn.k) + size(layer.cross_attn.v)  # in the cross memory, made once
    elt = torch.finfo(lm.dtype).bits // 8
    rows_read = c.num_codebooks * rows * c.dim * elt
    kv = c.num_layers * 2 * rows * c.dim * elt * (visible + (text_len if c.cross_attention else 0))
    return size(lm) - once + rows_read + kv


def _tokens(folder: Path):
    from musiclm_core.t5 import T5Tokenizer

    ids, mask = T5Tokenizer.from_folder(folder)([PROMPT])
    return ids, mask


def worker_hf(args) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList, MusicgenForConditionalGeneration

    folder = Path(args.folder)
    t = time.perf_counter()
    model = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    load_s = time.perf_counter() - t
    ids, mask = _tokens(folder)
    stamps: list[tuple[float, float]] = []

    class Stamp(LogitsProcessor):
        """Appended after transformers' own processors: called once per step, after the decoder forward."""

        def __call__(self, input_ids, scores):
            stamps.append(_stamp())
            return scores

    _release_freed_memory()
    rss_loaded, load_peak = _status("VmRSS"), _status("VmHWM")
    reset = _reset_peak()
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.steps, do_sample=True,
                       guidance_scale=GUIDANCE, top_k=TOP_K, logits_processor=LogitsProcessorList([Stamp()]))
    total_s = time.perf_counter() - t
    gen_peak = _status("VmHWM") if reset else None
    return {**_rate(stamps), "total_s": total_s, "load_s": load_s, "rss_loaded": rss_loaded,
            "rss_anon": _status("RssAnon"), "rss_file": _status("RssFile"),
            "gen_peak": gen_peak, "load_peak": load_peak, "text_len": int(mask.sum()),
            "bandwidth": measure_bandwidth(5), "route": "F.linear", "load": load_average()[0]}


def worker_ours(args) -> dict:
    from musiclm_core.kernels import linear
    from musiclm_core.musicgen import MusicGen

    folder = Path(args.folder)
    t = time.perf_counter()
    quant, _, compiled = args.quant.partition("@")[0].partition("+")
    mg = MusicGen.from_pretrained(folder, quantize=None if quant == "fp32" else quant)
    load_s = time.perf_counter() - t
    load_peak = _status("VmHWM")
    _release_freed_memory()
    rows = 2  # one prompt and its CFG null row
    text_len = int(_tokens(folder)[1].sum())
    stamps: list[tuple[float, float]] = []

    rss_loaded = _status("VmRSS")
    reset = _reset_peak()  # the compiler's memory counts in the generation's peak
    compile_s = None
    if compiled:
        t = time.perf_counter()
        mg.lm.compile_decode()
        mg.generate_codes([PROMPT], max_new_tokens=4, guidance_scale=GUIDANCE, top_k=TOP_K, seed=0)
        compile_s = time.perf_counter() - t
    workers_peak = _descendants_peak()
    t = time.perf_counter()
    mg.generate_codes([PROMPT], max_new_tokens=args.steps, guidance_scale=GUIDANCE, top_k=TOP_K, do_sample=True,
                      seed=0, progress=lambda done, total: stamps.append(_stamp()))
    total_s = time.perf_counter() - t
    # The timed intervals are the decode steps at offsets 1 .. steps - 1: offset p sees p + 1 keys.
    visible = statistics.mean(range(2, args.steps + 1))
    gen_peak = _status("VmHWM") if reset else None
    return {**_rate(stamps), "total_s": total_s, "load_s": load_s, "compile_s": compile_s,
            "workers_peak": workers_peak,
            "rss_loaded": rss_loaded, "rss_anon": _status("RssAnon"), "rss_file": _status("RssFile"),
            "gen_peak": gen_peak, "load_peak": load_peak, "bytes_per_step": step_bytes(mg.lm, rows, visible, text_len),
            "text_len": text_len, "bandwidth": measure_bandwidth(5),
            "route": linear.route() if quant == "fp32" else quant, "load": load_average()[0]}


def measure_bandwidth(repeats: int = 7) -> dict:
    """Memory read bandwidth: sum over a 1 GiB fp32 tensor of random values, best of `repeats`, by the wall
    clock and by this process's CPU time."""
    x = torch.empty(256 * 1024 * 1024).normal_()
    x.sum()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = _stamp()
        x.sum()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"read_bytes_per_s": x.numel() * 4 / min(wall), "cpu_read_bytes_per_s": x.numel() * 4 / min(cpu)}


def worker_bandwidth(args) -> dict:
    return measure_bandwidth()


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them), so a peak measured next starts from what is
    really in use (after quantising, the fp32 weights are gone but their pages would still count)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def _parity(lm, states, mask, steps: int) -> dict:
    """bf16 / int8 / int4 copies of `lm` against it: teacher-forced logits on its own greedy codes, and greedy
    agreement."""
    import copy

    from musiclm_core import generate as G
    from musiclm_core.kernels.quant import quantize_weights

    greedy = G.generate_codes(lm, states, mask, max_new_tokens=steps, guidance_scale=GUIDANCE, do_sample=False)
    memory = lm.cross_memory(states, mask)
    ref = lm(greedy, memory=memory)  # (B, K, T, card), teacher-forced on the fp32 greedy frames
    out = {}
    for mode in ("bf16", "int8", "int4"):
        q = quantize_weights(copy.deepcopy(lm), mode)
        logits = q(greedy, memory=q.cross_memory(states, mask))
        err = (logits - ref).abs().max().item()
        q_greedy = G.generate_codes(q, states, mask, max_new_tokens=steps, guidance_scale=GUIDANCE,
                                    do_sample=False)
        same = (q_greedy == greedy).float()
        first = (same < 1).any(dim=1).any(dim=0).nonzero()
        out[mode] = {"logits_max_abs_err": err, "logits_max_abs": ref.abs().max().item(),
                     "teacher_forced_top1": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "greedy_identical": same.mean().item(),
                     "first_diverging_frame": int(first[0]) if len(first) else None, "frames": greedy.shape[-1]}
        del q
    return out


def worker_parity(args) -> dict:
    from musiclm_core.musicgen import PRESETS, MusicGen, MusicGenLM

    result = {}
    torch.manual_seed(0)
    tiny = MusicGenLM(PRESETS["tiny"]).eval()
    states = torch.randn(1, 8, tiny.config.text_dim)
    result["tiny"] = _parity(tiny, states, torch.ones(1, 8, dtype=torch.long), args.parity_steps)
    folder = Path(args.folder)
    mg = MusicGen.from_pretrained(folder)
    with torch.no_grad():
        states, mask = mg.text_encoder.encode_text([PROMPT])
    result["small"] = _parity(mg.lm, states, mask, args.parity_steps)
    return result


WORKERS = {"build": worker_build, "hf": worker_hf, "ours": worker_ours, "bandwidth": worker_bandwidth,
           "parity": worker_parity}


def run_worker(role: str, args, **extra) -> dict:
    """Run one measurement in a fresh interpreter (so peaks do not mix); its JSON result."""
    cmd = [sys.executable, __file__, "--worker", role, "--folder", str(args.folder), "--steps", str(args.steps),
           "--threads", str(args.threads), "--parity-steps", str(args.parity_steps)]
    if args.smoke:
        cmd.append("--smoke")
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads sleep instead of spinning (see RESULTS.md)
    route = str(extra.get("quant", "")).partition("@")[2]
    if route:
        env["MUSICLM_LINEAR"] = route  # kernels/linear.py: this worker's fp32 linear route
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"worker {role} {extra} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def main_cpu(args) -> None:
    print(f"# MusicGen small decode, {args.threads} threads, fp32, batch 1 + CFG {GUIDANCE} (2 rows), top_k {TOP_K}, "
          f"max_new_tokens {args.steps}")
    print("\n".join(machine_lines()), flush=True)
    with tempfile.TemporaryDirectory(prefix="musicgen_bench_") as tmp:
        args.folder = Path(tmp) / "musicgen-small-random"
        built = run_worker("build", args)
        print(f"# built and saved the transformers checkpoint in {built['build_s']:.0f} s; parameters: "
              + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in built["params"].items()))
        bandwidth = [run_worker("bandwidth", args) for _ in range(2)]
        bw = max(b["read_bytes_per_s"] for b in bandwidth)
        cpu_bw = max(b["cpu_read_bytes_per_s"] for b in bandwidth)
        rows = []
        for rep in range(args.repeat):
            rows.append(("transformers fp32", rep, run_worker("hf", args)))
            for quant in args.variants:
                rows.append((f"ours {quant}", rep, run_worker("ours", args, quant=quant)))
        parity = run_worker("parity", args) if args.parity_steps else None
    print(f"# {load_line('after')}")

    fp32_bytes = next((r["bytes_per_step"] for name, _, r in rows if name.startswith("ours fp32")), None)
    if fp32_bytes is None:  # transformers reads what our fp32 LM reads
        from musiclm_core.musicgen import PRESETS, MusicGenLM

        with torch.device("meta"):
            fp32_bytes = step_bytes(MusicGenLM(PRESETS["small"]), 2, statistics.mean(range(2, args.steps + 1)),
                                    rows[-1][2]["text_len"])
    one = args.threads == 1  # CPU time is the single core's time only with one thread
    print(f"\nmemory read bandwidth (torch sum over 1 GiB, best of 7, before the runs): {bw / 1e9:.2f} GB/s wall "
          f"clock" + (f", {cpu_bw / 1e9:.2f} GB/s by CPU time" if one else ""))
    print(f"bytes per decode step (fp32): {fp32_bytes / 1e9:.3f} GB -> fp32 roofline {bw / fp32_bytes:.2f} steps/s"
          + (f" (by CPU time {cpu_bw / fp32_bytes:.2f})" if one else ""))
    print("rooflines below use the bandwidth each worker measured right after its generation (same process, same "
          "neighbours), column 'bw'")
    print()
    head = (f"| {'variant':<19} | route    | run | steps/s | x transformers | x by median step | ms/step (median) | "
            f"GB/step | bw GB/s | % own roofline | % fp32 roofline |"
            + (" CPU-time steps/s | CPU-time bw GB/s | % own (CPU time) |" if one else "")
            + " gen peak RSS GB | of which file-backed GB | load peak GB | load s | compile s | load avg after |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    # The same run's transformers: by steps/s, and by the median step (a load spike in one run moves the first)
    theirs = {rep: r for name, rep, r in rows if name == "transformers fp32"}
    for name, rep, r in rows:
        nbytes = r.get("bytes_per_step", fp32_bytes)
        rbw, rcpu = r["bandwidth"]["read_bytes_per_s"], r["bandwidth"]["cpu_read_bytes_per_s"]
        line = (f"| {name:<19} | {r['route']:<8} | {rep + 1:>3} | {r['steps_per_s']:7.2f} | "
                f"{r['steps_per_s'] / theirs[rep]['steps_per_s']:13.2f}x | "
                f"{theirs[rep]['median_step_ms'] / r['median_step_ms']:15.2f}x | {r['median_step_ms']:16.0f} | "
                f"{nbytes / 1e9:7.3f} | {rbw / 1e9:7.2f} | {100 * r['steps_per_s'] * nbytes / rbw:13.0f}% | "
                f"{100 * r['steps_per_s'] * fp32_bytes / rbw:14.0f}% |")
        if one:
            line += (f" {r['cpu_steps_per_s']:16.2f} | {rcpu / 1e9:16.2f} | "
                     f"{100 * r['cpu_steps_per_s'] * nbytes / rcpu:15.0f}% |")
        compile_s = "" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
        if r.get("workers_peak"):
            compile_s += f" (+{gb(r['workers_peak'])} GB)"
        print(line + f" {gb(r['gen_peak']):>15} | {gb(r['rss_file']):>23} | {gb(r['load_peak']):>12} | "
              f"{r['load_s']:6.1f} | {compile_s:>9} | {r['load']:14.2f} |")
    if parity:
        print(f"\nparity against fp32 ({args.parity_steps} greedy CFG steps; random weights: near-flat logits, "
              f"so greedy argmaxes flip easily):")
        print("| model | mode | logits max abs err | max abs logit | teacher-forced top-1 | greedy identical | "
              "first diverging frame |")
        print("|---|---|---|---|---|---|---|")
        for model, modes in parity.items():
            for mode, p in modes.items():
                print(f"| {model} | {mode} | {p['logits_max_abs_err']:.2e} | {p['logits_max_abs']:.3f} | "
                      f"{100 * p['teacher_forced_top1']:.1f}% | {100 * p['greedy_identical']:.1f}% | "
                      f"{p['first_diverging_frame']} / {p['frames']} |")


# ---------------------------------------------------------------------------------------------------------------
# CUDA


def _hbm_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written (METHOD.md)."""
    src = torch.empty(512 * 1024 * 1024, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 512 * 1024 * 1024 * 4 / statistics.median(times)


def main_cuda(args) -> None:
    from transformers import LogitsProcessor, LogitsProcessorList, MusicgenForConditionalGeneration

    from musiclm_core import generate as G
    from musiclm_core.convert import musicgen as convert

    name = torch.cuda.get_device_name()
    datasheet = next((v for k, v in HBM.items() if k in name), None)
    bw = _hbm_bandwidth()
    print(f"# MusicGen decode, {name}, torch {torch.__version__}, bf16, CFG {GUIDANCE}, top_k {TOP_K}, "
          f"max_new_tokens {args.steps}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# HBM copy bandwidth (read + write) {bw / 1e12:.2f} TB/s; datasheet "
          f"{'-' if datasheet is None else f'{datasheet / 1e12:.2f} TB/s'}")
    head = "| model | batch | path | steps/s | ms/step | GB/step | % roofline (measured bw) | % datasheet | peak GB |"
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = MusicgenForConditionalGeneration(official_config(size, args.smoke))
        hf = hf.to(torch.bfloat16).eval()
        hf.audio_encoder.float()  # the codec is not timed; keep its LSTM out of bf16
        _set_generation_config(hf)
        lm = convert.load_transformers(hf.config.to_dict(), convert.lm_part(hf.state_dict()),
                                       source=f"random {size}", dtype=torch.bfloat16).to("cuda").eval()
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, 32000, (batch, 12), generator=g).to("cuda")
            ids[:, -1] = 1  # </s>
            mask = torch.ones_like(ids)
            with torch.no_grad():
                states = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            nbytes = step_bytes(lm, 2 * batch, statistics.mean(range(2, args.steps + 1)), ids.shape[1])
            for path in ("transformers eager", "ours eager", "ours cuda graph", "ours cuda graph, torch SDPA"):
                # kernels/attention.py reads MUSICLM_ATTENTION on every call: our Triton kernels or torch's SDPA
                os.environ["MUSICLM_ATTENTION"] = "torch" if path.endswith("torch SDPA") else "auto"
                stamps: list[tuple[float, float]] = []

                def stamp(*_):
                    torch.cuda.synchronize()
                    stamps.append(_stamp())

                class Stamp(LogitsProcessor):
                    def __call__(self, input_ids, scores):
                        stamp()
                        return scores

                torch.cuda.reset_peak_memory_stats()
                try:
                    with torch.no_grad():
                        if path == "transformers eager":
                            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.steps,
                                        do_sample=True, guidance_scale=GUIDANCE, top_k=TOP_K,
                                        logits_processor=LogitsProcessorList([Stamp()]))
                        else:
                            G.generate_codes(lm, states, mask, max_new_tokens=args.steps, guidance_scale=GUIDANCE,
                                             top_k=TOP_K, generator=torch.Generator("cuda").manual_seed(0),
                                             progress=stamp, cuda_graph="cuda graph" in path)
                except Exception as e:  # report and go on: one failing path should not hide the others
                    print(f"| {size} | {batch} | {path} | failed: {type(e).__name__}: {str(e)[:120]} |")
                    continue
                r = _rate(stamps)
                sheet = "-" if datasheet is None else f"{100 * r['steps_per_s'] * nbytes / datasheet:.0f}%"
                print(f"| {size} | {batch} | {path} | {r['steps_per_s']:.1f} | {r['median_step_ms']:.2f} | "
                      f"{nbytes / 1e9:.2f} | {100 * r['steps_per_s'] * nbytes / bw:.0f}% | {sheet} | "
                      f"{torch.cuda.max_memory_allocated() / 1e9:.1f} |", flush=True)
        os.environ.pop("MUSICLM_ATTENTION", None)
        del hf, lm
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=64, help="max_new_tokens (decoder steps) per generation")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeat", type=int, default=1, help="CPU: time every side this many times")
    parser.add_argument("--parity-steps", type=int, default=100, help="CPU: greedy steps of the parity check, 0=off")
    parser.add_argument("--omp-passive", action="store_true",
                        help="CPU: run the workers with OMP_WAIT_POLICY=PASSIVE (matters on a busy machine)")
    formats = ["fp32", "bf16", "int8", "int4"]
    variants = [f + extra for f in formats for extra in ("", "+compile")]
    variants += [f"{v}@{route}" for v in variants if v.startswith("fp32") for route in ("linear", "blocked")]
    parser.add_argument("--variants", nargs="+", default=formats, choices=variants, metavar="VARIANT",
                        help="CPU: which of our weight formats to time: fp32, bf16, int8, int4; +compile: with "
                             "`lm.compile_decode()`, compiled during a 4-step warm-up generation (column 'compile "
                             "s') before the timed one; fp32@linear / fp32@blocked (also with +compile): that fp32 "
                             "linear route (kernels/linear.py) instead of the one this CPU gets")
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large"], help="CUDA: model sizes")
    # internal: one measurement in a subprocess
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--quant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny decoder: checks the script
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the decode loop is timed between sampled columns)")
    if args.worker:
        torch.set_num_threads(args.threads)
        print(RESULT + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        main_cuda(args)
    else:
        torch.set_num_threads(args.threads)
        main_cpu(args)


if __name__ == "__main__":
    main()
