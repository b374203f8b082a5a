"""Time our EnCodec against transformers' EncodecModel in the same run.

    python benchmarks/encodec.py            # print the table
    python benchmarks/encodec.py --write    # and put it in benchmarks/RESULTS.md under "## EnCodec"

The 32 kHz config (MusicGen's codec) with random weights: transformers' initialisation with the codebooks filled
with random rows (its zero codebooks would make every code 0), written with save_pretrained and loaded by ours,
so both run the same weights. fp32 on the CPU with 2 threads; 10 s of mono audio (noise at -20 dBFS) -> 500
frames x 4 codebooks, and those codes back to audio. Each figure is the median of the repeats after one warm-up
call; the calls of ours and transformers alternate, so that both see the same load on a shared machine. The
real-time factor is seconds of audio per second of compute (higher is faster). A second table times the CPU
inference routes of musiclm_core/encodec.py (convolutions as matrix products, the LSTM recurrence on one thread)
against the torch ops they replace.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

import torch

from _common import cpu_model, median_s, parse_args, report  # benchmarks/ (the script's folder is on sys.path)

SECONDS = 10.0


def main() -> None:
    args = parse_args(__doc__, reps=5)

    import transformers
    from transformers import EncodecConfig, EncodecModel

    from musiclm_core.encodec import EnCodec

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = EncodecConfig(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=64,
                           sampling_rate=32_000, codebook_size=2048, use_causal_conv=False, normalize=False,
                           use_conv_shortcut=False)
    reference = EncodecModel(config).eval()
    with torch.no_grad():
        for layer in reference.quantizer.layers:
            layer.codebook.embed.normal_(0, 0.1)
    folder = Path(tempfile.mkdtemp(prefix="encodec_bench_"))
    try:
        reference.save_pretrained(str(folder))
        ours = EnCodec.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    wav = 0.1 * torch.randn(1, 1, int(SECONDS * config.sampling_rate))
    load = os.getloadavg()[0]
    with torch.inference_mode():
        codes = ours.encode(wav)
        hf_codes = reference.encode(wav).audio_codes  # (1, B, K, T)
        assert torch.equal(codes, hf_codes[0]), "the codes differ"
        err = (ours.decode(codes) - reference.decode(hf_codes, [None])[0]).abs().max().item()
        rows = [
            ("encode", *median_s(lambda: ours.encode(wav), lambda: reference.encode(wav), args.reps)),
            ("decode", *median_s(lambda: ours.decode(codes), lambda: reference.decode(hf_codes, [None]), args.reps)),
        ]

    # The CPU inference routes of musiclm_core/encodec.py against the torch ops they replace, on the decoder's
    # largest layers (the claims in their docstrings).
    import torch.nn.functional as F

    from musiclm_core.encodec import conv1d_by_taps, conv_transpose1d_by_matmul, pad1d

    x64, w_res, b_res = torch.randn(1, 64, 320_000), 0.1 * torch.randn(32, 64, 3), torch.randn(32)
    x128, w_up, b_up = torch.randn(1, 128, 80_000), 0.02 * torch.randn(128, 64, 8), torch.randn(64)
    with torch.inference_mode():
        routes = [
            ("conv1d 64 -> 32, k3, 320k samples (reflect pad)",
             *median_s(lambda: conv1d_by_taps(x64, w_res, b_res, 1, 1, 1, "reflect"),
                       lambda: F.conv1d(pad1d(x64, 1, 1, "reflect"), w_res, b_res), args.reps)),
            ("conv_transpose1d 128 -> 64, stride 4, 80k frames",
             *median_s(lambda: conv_transpose1d_by_matmul(x128, w_up, b_up, 4),
                       lambda: F.conv_transpose1d(x128, w_up, b_up, 4), args.reps)),
        ]

    lines = [
        f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__} "
        f"with 2 threads, transformers {transformers.__version__}. encodec_32khz config, random weights, fp32; "
        f"{SECONDS:.0f} s of mono audio at 32 kHz (500 frames x 4 codebooks). Median of {args.reps} runs after a "
        f"warm-up, ours and transformers alternated; identical codes, decoded audio max abs difference "
        f"{err:.1e}. Load average at the start: {load:.1f} on {os.cpu_count()} cores (a shared machine: absolute "
        f"times move with the load, the ratio less so). `python benchmarks/encodec.py --write`.",
        "",
        "| what | ours (s) | transformers (s) | ours real-time factor | transformers real-time factor "
        "| speed-up (transformers / ours) |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {what} 10 s | {a:.2f} | {b:.2f} | {SECONDS / a:.1f}x | {SECONDS / b:.1f}x | {b / a:.2f} |"
          for what, a, b in rows],
        "",
        "The CPU inference routes of `musiclm_core/encodec.py` against the torch ops they replace (same inputs, "
        "same run, alternated):",
        "",
        "| layer | our route (s) | torch (s) | speed-up |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {a:.3f} | {b:.3f} | {b / a:.2f} |" for what, a, b in routes],
    ]
    report("## EnCodec", lines, write=args.write)


if __name__ == "__main__":
    main()
