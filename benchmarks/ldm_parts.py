"""Time the latent-diffusion tail, VAE decode and HiFi-GAN vocoder, against diffusers / transformers in one run.

    python benchmarks/ldm_parts.py            # print the table
    python benchmarks/ldm_parts.py --write    # and put it in benchmarks/RESULTS.md under "## LDM parts"
    python benchmarks/ldm_parts.py --part vocoder --reps 3    # one part only (printed, never written)

The official configs (specs/ldm.md §4.1, §5.1) with random weights: diffusers' `AutoencoderKL` and transformers'
`SpeechT5HifiGan` at their own initialisation, written with save_pretrained and loaded by ours through
`from_pretrained`, so both run the same weights. fp32 on the CPU with 2 threads (the vocoder also with 1); a 10.24 s
clip: latents (1, 8, 256, 16) -> mel (1, 1, 1024, 64), and 1024 mel frames -> 163 872 samples at 16 kHz. Each figure
is the median of the repeats after one warm-up call; the calls of ours and the reference alternate, so that both see
the same load on a shared machine. "max abs diff" compares each row's output with the fp32 reference output.

Variants: the reference VAE run in the channels-last layout (`.to(memory_format=torch.channels_last)`, what our
decoder does inside), and our VAE and vocoder in bfloat16 (weights and activations, against the fp32 reference;
CPUs without native bf16 arithmetic run them slowly).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

# benchmarks/ (the script's folder is on sys.path)
from _common import load_line, machine_lines, median_s, report

SECONDS = 10.24
FRAMES = 1024  # mel frames of a 10.24 s clip (hop 160 at 16 kHz)


def build_vae(folder: Path):
    from diffusers import AutoencoderKL as Reference

    from musiclm_core.vae import AutoencoderKL

    torch.manual_seed(0)
    reference = Reference(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                          up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[128, 256, 512],
                          layers_per_block=2, latent_channels=8, norm_num_groups=32, sample_size=1024,
                          scaling_factor=0.4110932946205139).eval()
    reference.save_pretrained(str(folder / "vae"))
    return reference, AutoencoderKL.from_pretrained(folder / "vae"), \
        AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.bfloat16)


def build_vocoder(folder: Path):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    from musiclm_core.hifigan import HifiGan

    torch.manual_seed(0)
    config = SpeechT5HifiGanConfig(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024,
                                   upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                                   resblock_kernel_sizes=[3, 7, 11],
                                   resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                                   normalize_before=False)
    reference = SpeechT5HifiGan(config).eval()
    with torch.no_grad():
        # transformers initialises with std 0.01 (initializer_range), which leaves the output near 0: every conv
        # gets unit gain instead (std 1 / sqrt(fan-in), a transposed conv's fan-in being C_in * K / stride), so the
        # waveform is of order 0.1-1 and the max abs difference means something.
        for module in reference.modules():
            if isinstance(module, torch.nn.ConvTranspose1d):
                C_in, _, K = module.weight.shape
                module.weight.normal_(0, (C_in * K / module.stride[0]) ** -0.5)
            elif isinstance(module, torch.nn.Conv1d):
                _, C_in, K = module.weight.shape
                module.weight.normal_(0, (C_in * K) ** -0.5)
    reference.save_pretrained(str(folder / "vocoder"))
    return reference, HifiGan.from_pretrained(folder / "vocoder"), \
        HifiGan.from_pretrained(folder / "vocoder", dtype=torch.bfloat16)


def parse_args() -> argparse.Namespace:
    """_common.parse_args' options (--write, --reps) and --part: one part alone is printed, never written (the
    RESULTS.md section holds both)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--part", choices=("all", "vae", "vocoder"), default="all")
    args = parser.parse_args()
    if args.write and args.part != "all":
        parser.error("--write needs --part all (the RESULTS.md section holds both parts)")
    return args


def vae_rows(rows: list, z, ref_vae, vae, vae_bf16, reps: int) -> None:
    expected = ref_vae.decode(z).sample
    scale = expected.abs().max().item()
    err = (vae.decode(z) - expected).abs().max().item()
    rows.append(("VAE decode, fp32", *median_s(lambda: vae.decode(z), lambda: ref_vae.decode(z), reps),
                 err, scale, "diffusers"))
    err = (vae_bf16.decode(z.bfloat16()).float() - expected).abs().max().item()
    rows.append(("VAE decode, ours bf16", *median_s(lambda: vae_bf16.decode(z.bfloat16()),
                                                    lambda: ref_vae.decode(z), reps),
                 err, scale, "diffusers fp32"))
    ref_vae_cl = ref_vae.to(memory_format=torch.channels_last)  # in place: the last VAE row
    z_cl = z.contiguous(memory_format=torch.channels_last)
    err = (ref_vae_cl.decode(z_cl).sample - expected).abs().max().item()
    rows.append(("VAE decode, fp32 (reference channels-last)",
                 *median_s(lambda: vae.decode(z), lambda: ref_vae_cl.decode(z_cl), reps),
                 (vae.decode(z) - expected).abs().max().item(), scale,
                 f"diffusers channels-last (itself {err:.1e} from NCHW)"))


def vocoder_rows(rows: list, mel, ref_vocoder, vocoder, vocoder_bf16, reps: int) -> None:
    expected = ref_vocoder(mel)
    err = (vocoder(mel) - expected).abs().max().item()
    rows.append(("vocoder 1024 frames, fp32", *median_s(lambda: vocoder(mel), lambda: ref_vocoder(mel), reps),
                 err, expected.abs().max().item(), "transformers"))
    err_bf16 = (vocoder_bf16(mel).float() - expected).abs().max().item()  # torch's bf16 convolutions throughout
    rows.append(("vocoder 1024 frames, ours bf16", *median_s(lambda: vocoder_bf16(mel), lambda: ref_vocoder(mel),
                                                             reps),
                 err_bf16, expected.abs().max().item(), "transformers fp32"))
    # One thread as well: steadier on a shared machine, and what a process that runs several jobs gets.
    torch.set_num_threads(1)
    rows.append(("vocoder 1024 frames, fp32, 1 thread",
                 *median_s(lambda: vocoder(mel), lambda: ref_vocoder(mel), reps),
                 err, expected.abs().max().item(), "transformers"))
    torch.set_num_threads(2)


def main() -> None:
    args = parse_args()

    import diffusers
    import transformers

    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="ldm_parts_bench_"))
    ref_vae = vae = vae_bf16 = ref_vocoder = vocoder = vocoder_bf16 = None
    try:
        if args.part in ("all", "vae"):
            ref_vae, vae, vae_bf16 = build_vae(folder)
        if args.part in ("all", "vocoder"):
            ref_vocoder, vocoder, vocoder_bf16 = build_vocoder(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    z = torch.randn(1, 8, FRAMES // 4, 16, generator=torch.Generator().manual_seed(1))
    mel = torch.randn(1, FRAMES, 64, generator=torch.Generator().manual_seed(2))
    header = machine_lines()  # with the load average before the runs
    rows = []  # (what, ours s, reference s, max abs diff, reference output max abs)
    with torch.inference_mode():
        if vae is not None:
            vae_rows(rows, z, ref_vae, vae, vae_bf16, args.reps)
        if vocoder is not None:
            vocoder_rows(rows, mel, ref_vocoder, vocoder, vocoder_bf16, args.reps)

    lines = [
        *header,
        f"# {load_line('after')}",
        "",
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}. Official AutoencoderKL and "
        f"SpeechT5HifiGan configs, random weights, fp32 unless the row says otherwise; {SECONDS} s clip: latents "
        f"(1, 8, 256, 16) -> mel (1, 1, 1024, 64) -> 163 872 samples. Median of {args.reps} runs after a warm-up, "
        f"ours and the reference alternated (a shared machine: absolute times move with the load, the ratio less "
        f"so). `python benchmarks/ldm_parts.py --part {args.part} --reps {args.reps}`.",
        "",
        "| what | reference | ours (ms) | reference (ms) | speed-up (reference / ours) | max abs diff "
        "| reference output max abs |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[f"| {what} | {ref} | {a * 1e3:.0f} | {b * 1e3:.0f} | {b / a:.2f} | {err:.1e} | {scale:.2f} |"
          for what, a, b, err, scale, ref in rows],
    ]
    report("## LDM parts", lines, write=args.write)


if __name__ == "__main__":
    main()
