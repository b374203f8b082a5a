"""Time our CLAP against transformers' ClapModel / ClapFeatureExtractor in the same run.

    flock /tmp/heavy.lock python benchmarks/clap.py            # print the table
    flock /tmp/heavy.lock python benchmarks/clap.py --write    # and put it in benchmarks/RESULTS.md under "## CLAP"

The laion/clap-htsat-unfused config (RoBERTa-base text tower, HTS-AT tiny audio tower) with random weights
(transformers' initialisation), written with save_pretrained and loaded by ours, so both run the same weights; a
byte-level BPE trained here stands in for RoBERTa's (tokenising is a small share of the text time). fp32 on the
CPU with 2 threads, batch 1 for audio: 10 s of 48 kHz noise -> log-mel features (1, 1, 1001, 64) -> audio
embedding; 8 prompts -> text embeddings (padding to the longest). Each figure is the median of the repeats after
one warm-up call; ours and transformers alternate, so that both see the same load on a shared machine.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import cpu_model, median_s, parse_args, report  # benchmarks/ (the script's folder is on sys.path)

PROMPTS = [
    "80s pop track with bassy drums and synth",
    "a calm piano melody with soft strings in the background",
    "heavy metal guitar riff with double bass drums",
    "lofi hip hop beat with vinyl crackle, chill and relaxing",
    "orchestral cinematic music with a building crescendo and brass",
    "jazz trio: upright bass, brushed drums and a walking piano line",
    "techno track at 130 bpm with a driving kick and acid synth",
    "acoustic folk song with finger-picked guitar and a gentle voice",
]


def cpu_flags() -> str:
    """The vector extensions lscpu reports (they decide which matmul kernels run)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "flags unknown"
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags:")), [])
    return "flags: " + (" ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags) or "none")


def tokenizer_folder(folder: Path) -> None:
    """A byte-level BPE (1000 entries, RoBERTa's special tokens) trained on the prompts, as vocab.json +
    merges.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(PROMPTS * 20, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.save(str(folder))


def main() -> None:
    args = parse_args(__doc__, reps=5)

    import transformers

    from musiclm_core.clap import CLAP

    torch.set_num_threads(2)
    torch.manual_seed(0)
    reference = transformers.ClapModel(transformers.ClapConfig()).eval()  # the htsat-unfused sizes
    extractor = transformers.ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc")
    folder = Path(tempfile.mkdtemp(prefix="clap_bench_"))
    try:
        tokenizer_folder(folder)
        tokenizer = transformers.RobertaTokenizerFast.from_pretrained(str(folder), model_max_length=512)
        reference.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        extractor.save_pretrained(str(folder))
        ours = CLAP.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    wav = (0.1 * np.random.RandomState(0).randn(480_000)).astype(np.float32)  # 10 s at 48 kHz

    def their_features():
        return extractor(wav, sampling_rate=48_000, return_tensors="pt")["input_features"]

    def their_text():
        return reference.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output

    load_before = os.getloadavg()
    with torch.inference_mode():
        features = their_features()
        errors = {
            "features": (ours.features(wav, 48_000) - features).abs().max().item(),
            "audio": (ours.encode_audio(features)
                      - reference.get_audio_features(input_features=features).pooler_output).abs().max().item(),
            "text": (ours.text_embeds(PROMPTS) - their_text()).abs().max().item(),
        }
        rows = [
            ("log-mel features, 10 s", *median_s(lambda: ours.features(wav, 48_000), their_features, args.reps)),
            ("audio tower, features -> embedding", *median_s(
                lambda: ours.encode_audio(features),
                lambda: reference.get_audio_features(input_features=features).pooler_output, args.reps)),
            ("text embeddings, 8 prompts (tokenising included)",
             *median_s(lambda: ours.text_embeds(PROMPTS), their_text, args.reps)),
        ]
    load_after = os.getloadavg()

    lines = [
        f"{datetime.date.today().isoformat()}, {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}), "
        f"torch {torch.__version__} with 2 threads, transformers {transformers.__version__}. "
        f"laion/clap-htsat-unfused config, random weights, fp32, batch 1 for audio. Median of {args.reps} runs "
        f"after a warm-up, ours and transformers alternated. Max abs differences: features "
        f"{errors['features']:.1e} dB, audio embedding {errors['audio']:.1e}, text embeddings "
        f"{errors['text']:.1e}. Load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f} on "
        f"{os.cpu_count()} cores. `flock /tmp/heavy.lock python benchmarks/clap.py --write`.",
        "",
        "| what | ours (s) | transformers (s) | speed-up (transformers / ours) |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {a:.3f} | {b:.3f} | {b / a:.2f} |" for what, a, b in rows],
    ]
    report("## CLAP", lines, write=args.write)


if __name__ == "__main__":
    main()
