"""MusicGen training speed: one forward + backward of the small LM, transformers against musiclm_core, same batch.

    flock /tmp/heavy.lock python benchmarks/train.py [--reps 3] [--batch 2] [--frames 150] [--threads 2] [--write]

transformers' `MusicgenForCausalLM` is built at the musicgen-small decoder config (1024 wide, 24 layers, 4
codebooks of 2048) with random weights, moved off their init; ours (`MusicGenLM`) is converted from the same weights
with our transformers converter (`convert.musicgen.load_transformers`), so both compute the same function. One
batch of `--batch` clips of `--frames` frames (50 frames/s) with 12 text tokens, laid out with the delay pattern:

* transformers: `forward(input_ids, encoder_hidden_states, labels)` (its per-codebook cross-entropy, pads masked),
  then `loss.backward()`; the text goes through the composite model's `enc_to_dec_proj` first, as in its
  `MusicgenForConditionalGeneration`.
* ours: `train.musicgen.MusicGenObjective` (the text projection, the decoder, the masked cross-entropy averaged
  over codebooks) forward + backward, fp32, plain linears (what training runs with); and again with bf16 autocast.

tokens/s = codes predicted per second (batch x codebooks x frames, the delay padding not counted), the median of
`--reps` alternated calls after a warm-up. The losses of both are printed: equal up to fp32 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import _common


def build(frames: int, batch: int):
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForCausalLM, T5Config

    from musiclm_core.convert import musicgen as convert
    from musiclm_core.train import losses
    from musiclm_core.train.musicgen import plain_linears

    torch.manual_seed(0)
    decoder = MusicgenDecoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                                    num_codebooks=4, vocab_size=2048, dropout=0.0)
    theirs = MusicgenForCausalLM(decoder).train()
    with torch.no_grad():  # off their init: layer norms and all
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    proj = torch.nn.Linear(768, 1024)
    config = MusicgenConfig(text_encoder=T5Config(d_model=768).to_dict(), audio_encoder=EncodecConfig().to_dict(),
                            decoder=decoder.to_dict()).to_dict()
    state = {f"decoder.{k}": v for k, v in theirs.state_dict().items()}
    state.update({"enc_to_dec_proj.weight": proj.weight.detach(), "enc_to_dec_proj.bias": proj.bias.detach()})
    ours = plain_linears(convert.load_transformers(config, convert.lm_part(state), source="benchmark")).train()

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2048, (batch, 4, frames), generator=g)
    text = torch.randn(batch, 12, 768, generator=g)
    mask = torch.ones(batch, 12, dtype=torch.long)
    inputs, targets = losses.delayed_inputs(codes, ours.config.delays, ours.config.special)  # (B, K, S-1)
    B, K, S = inputs.shape
    input_ids = inputs.reshape(B * K, S)
    labels = targets.transpose(1, 2)  # (B, S, K): transformers masks the pad id itself
    return theirs, proj, ours, (codes, text, mask), (input_ids, labels, text, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from musiclm_core.train.loop import autocast
    from musiclm_core.train.musicgen import MusicGenObjective

    lines = _common.machine_lines()
    theirs, proj, ours, our_batch, their_batch = build(args.frames, args.batch)
    objective = MusicGenObjective(ours)
    tokens = args.batch * 4 * args.frames
    results = {}

    def run_ours(bf16=False):
        ours.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), bf16):
            loss, _ = objective(*our_batch)
        loss.backward()
        results["ours-bf16" if bf16 else "ours"] = loss.item()

    def run_theirs():
        theirs.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        input_ids, labels, text, mask = their_batch
        hidden = proj(text) * mask[..., None]
        loss = theirs(input_ids=input_ids, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                      labels=labels).loss
        loss.backward()
        results["theirs"] = loss.item()

    ours_s, theirs_s = _common.median_s(run_ours, run_theirs, args.reps)
    run_ours(True)  # warm-up
    bf16 = []
    for _ in range(args.reps):
        start = time.perf_counter()
        run_ours(True)
        bf16.append(time.perf_counter() - start)
    bf16_s = statistics.median(bf16)
    lines += [f"# MusicGen small LM, batch {args.batch} x {args.frames} frames ({tokens} codes), 12 text tokens, "
              f"forward + backward, {args.threads} threads, median of {args.reps}",
              f"# loss: transformers {results['theirs']:.6f}, ours {results['ours']:.6f} "
              f"(|diff| {abs(results['theirs'] - results['ours']):.1e}), ours bf16 {results['ours-bf16']:.4f}",
              "",
              "| | s / step | tokens/s | vs transformers |",
              "|---|---|---|---|",
              f"| transformers MusicgenForCausalLM fp32 | {theirs_s:.2f} | {tokens / theirs_s:.0f} | 1.00x |",
              f"| ours MusicGenObjective fp32 | {ours_s:.2f} | {tokens / ours_s:.0f} | {theirs_s / ours_s:.2f}x |",
              f"| ours MusicGenObjective bf16 autocast | {bf16_s:.2f} | {tokens / bf16_s:.0f} | "
              f"{theirs_s / bf16_s:.2f}x |",
              "", f"# {_common.load_line('after')}"]
    _common.report("## Training: MusicGen small forward + backward (benchmarks/train.py)", lines, write=args.write)


if __name__ == "__main__":
    main()
