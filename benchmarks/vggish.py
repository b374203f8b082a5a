"""VGGish embedding throughput (clips/s) on the CPU: ours (musiclm_core.vggish) against torchvggish 0.2, same run.

    flock /tmp/heavy.lock python benchmarks/vggish.py            # print the table
    flock /tmp/heavy.lock python benchmarks/vggish.py --write    # and put it in RESULTS.md ("## VGGish embeddings")

The official size (72 M parameters), random weights of torchvggish's own `_vgg()`, written under its file names
and loaded by `VGGish.from_pretrained`. One 10 s clip of 16 kHz noise per call, waveform to embeddings:
* fadtk's convention (what fadtk and frechet-audio-distance compute through torchvggish): 10 non-overlapping
  0.96 s examples, pre-activation, no PCA. Theirs: `vggish_input.waveform_to_examples` + the VGG with its last
  ReLU removed and postprocess off. Ours: `VGGishEmbedding(convention="fadtk")`.
* Google's convention (the TF FAD tool, audiocraft's FAD; our default): 19 examples (1 s windows every 0.5 s),
  ours only (torchvggish has no such framing); clips/s are per clip, so about half the fadtk figure is expected.
fp32 with 2 threads; each figure is the median of the repeats after a warm-up, ours and theirs alternated.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _common import load_line, machine_lines, median_s, parse_args, report


def pair(folder: Path):
    from torchvggish import torchvggish as tv

    from musiclm_core.convert import vggish as convert
    from musiclm_core.vggish import VGGish

    torch.manual_seed(0)
    reference = tv._vgg(postprocess=False).eval()
    torch.save(reference.state_dict(), folder / convert.WEIGHTS_FILE)
    rng = np.random.RandomState(0)
    torch.save({"pca_eigen_vectors": rng.randn(128, 128), "pca_means": rng.randn(128)}, folder / convert.PCA_FILE)
    reference.embeddings = nn.Sequential(*list(reference.embeddings.children())[:-1])  # fadtk: no last ReLU
    return VGGish.from_pretrained(folder), reference


def main() -> None:
    args = parse_args(__doc__, reps=5)
    from importlib.metadata import version

    from torchvggish import vggish_input

    from musiclm_core.vggish import VGGishEmbedding

    torch.set_num_threads(2)
    head = machine_lines()
    rng = np.random.RandomState(0)
    wav = (0.1 * rng.randn(160_000)).astype(np.float32)  # 10 s at 16 kHz
    audio = torch.from_numpy(wav)[None]
    with tempfile.TemporaryDirectory(prefix="vggish_bench_") as tmp, torch.inference_mode():
        ours, reference = pair(Path(tmp))
        fadtk = VGGishEmbedding(ours, "bench", convention="fadtk")
        google = VGGishEmbedding(ours, "bench")

        def theirs():
            return reference(vggish_input.waveform_to_examples(wav.astype(np.float64), 16_000).detach())

        error = (fadtk(audio) - theirs()).abs().max().item()
        fadtk_s, theirs_s = median_s(lambda: fadtk(audio), theirs, args.reps)
        google(audio)  # warm-up
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            google(audio)
            times.append(time.perf_counter() - start)
        google_s = statistics.median(times)

    lines = [
        *head,
        f"# torchvggish {version('torchvggish')}; fp32, 2 threads, one 10 s clip per call, "
        f"median of {args.reps} after a warm-up, alternated. Max abs difference of the embeddings (fadtk "
        f"convention): {error:.1e}",
        "",
        "| VGGish, 10 s clip at 16 kHz | ours (clips/s) | torchvggish (clips/s) | ours / torchvggish |",
        "|---|---:|---:|---:|",
        f"| fadtk convention: 10 examples of 0.96 s -> 10 x 128 | {1 / fadtk_s:.2f} | {1 / theirs_s:.2f} | "
        f"{theirs_s / fadtk_s:.2f} |",
        f"| Google's convention (our default): 19 examples every 0.5 s -> 19 x 128 | {1 / google_s:.2f} | - | - |",
        "",
        f"# {load_line('after')}",
    ]
    report("## VGGish embeddings", lines, write=args.write)


if __name__ == "__main__":
    main()
