"""Time our T5 encoder and tokenizer against transformers' in the same run.

    python benchmarks/t5.py            # print the table
    python benchmarks/t5.py --write    # and put it in benchmarks/RESULTS.md under "## T5"

t5-base config with random weights (transformers' initialisation, written with save_pretrained and loaded by
ours, so both run the same weights), fp32 on the CPU with 2 threads, a batch of 8 prompts. The tokenizer is a
sentencepiece Unigram model trained here on a small corpus (the real spiece.model needs the network), so the
token counts differ a little from T5's 32k vocabulary. Rows:

* tokenize: the 8 prompts -> padded ids + mask (ours: sentencepiece + our normaliser in Python; transformers:
  the Rust `tokenizers` pipeline of T5Tokenizer);
* encoder: forward of the padded batch (B = 8, L = longest prompt) and of an 8 x 128 batch;
* encode_text: both together (ours: `T5Encoder.encode_text`; transformers: tokenizer + T5EncoderModel).

Each figure is the median of the repeats after one warm-up call, under torch.inference_mode; the calls of ours
and transformers alternate, so that both see the same load when the machine is shared.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from _common import cpu_model, median_s, parse_args, report  # benchmarks/ (the script's folder is on sys.path)

PROMPTS = [
    "80s pop track with bassy drums and synth",
    "90s rock song with loud guitars and heavy drums",
    "a light and cheerful EDM track, with syncopated drums, airy pads, and strong emotions, tempo 130 bpm",
    "lofi slow bpm electro chill with organic samples",
    "a grand orchestral arrangement with thunderous percussion, epic brass fanfares, and soaring strings",
    "smooth jazz with a warm saxophone lead and brushed drums",
    "ambient soundscape with evolving pads and distant piano, calm and cinematic",
    "funky disco groove, slap bass, bright horns, 120 bpm",
]


def median_ms(ours, theirs, reps: int) -> tuple[float, float]:
    """`median_s` in milliseconds."""
    a, b = median_s(ours, theirs, reps)
    return a * 1e3, b * 1e3


def train_tokenizer(folder: Path) -> None:
    import sentencepiece as spm

    words = " ".join(PROMPTS).replace(",", " ").split()
    corpus = [" ".join(words[(i * 7) % len(words):] + words[:(i * 7) % len(words)]) for i in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(folder / "spiece"),
                                   model_type="unigram", vocab_size=400, hard_vocab_limit=False, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)


def main() -> None:
    args = parse_args(__doc__, reps=15)

    import transformers

    from musiclm_core.t5 import T5Encoder

    torch.set_num_threads(2)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="t5_bench_"))
    try:
        train_tokenizer(folder)
        config = transformers.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                       num_heads=12, feed_forward_proj="relu")
        reference = transformers.T5EncoderModel(config).eval()
        reference.save_pretrained(str(folder))
        hf_tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder))
        ours = T5Encoder.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def hf_tokenize():
        out = hf_tokenizer(PROMPTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    load = os.getloadavg()[0]  # other processes on a shared machine slow both sides alike (calls alternate)
    ids, mask = hf_tokenize()
    long_ids = torch.randint(3, 32100, (8, 128))
    long_mask = torch.ones_like(long_ids)
    few = max(3, args.reps // 3)
    with torch.inference_mode():
        ours_ids, ours_mask = ours.tokenizer(PROMPTS)
        assert torch.equal(ours_ids, ids) and torch.equal(ours_mask, mask), "the tokenizers disagree"
        err = (ours(ids, mask) - reference(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max()
        rows = [
            ("tokenize", "8 prompts", *median_ms(lambda: ours.tokenizer(PROMPTS), hf_tokenize, args.reps * 10)),
            ("encoder", f"8 x {ids.shape[1]} (padded)",
             *median_ms(lambda: ours(ids, mask), lambda: reference(input_ids=ids, attention_mask=mask), args.reps)),
            ("encoder", "8 x 128", *median_ms(lambda: ours(long_ids, long_mask),
                                              lambda: reference(input_ids=long_ids, attention_mask=long_mask), few)),
            ("encode_text", "8 prompts",
             *median_ms(lambda: ours.encode_text(PROMPTS), lambda: reference(*hf_tokenize()), args.reps)),
        ]

    lines = [
        f"t5-base config, random weights, fp32, CPU ({cpu_model()}, {os.cpu_count()} cores), torch "
        f"{torch.__version__} with 2 threads, transformers {transformers.__version__}. Median of {args.reps} runs "
        f"(tokenize: {args.reps * 10}, 8 x 128: {few}) after a warm-up, ours and transformers alternated; same "
        f"weights and ids in both (max abs difference of the padded-batch hidden states: {err:.1e}). "
        f"Load average at the start: {load:.1f} on {os.cpu_count()} cores. `python benchmarks/t5.py`.",
        "",
        "| what | batch | ours (ms) | transformers (ms) | ours / transformers |",
        "|---|---|---:|---:|---:|",
        *[f"| {what} | {batch} | {a:.2f} | {b:.2f} | {a / b:.2f} |" for what, batch, a, b in rows],
    ]
    report("## T5", lines, write=args.write)


if __name__ == "__main__":
    main()
