"""FAD embedding throughput (clips/s) on the CPU: ours (musiclm_core.metrics) against transformers, same run.

    flock /tmp/heavy.lock python benchmarks/embeddings.py            # print the table
    flock /tmp/heavy.lock python benchmarks/embeddings.py --write    # and put it in RESULTS.md ("## FAD embeddings")

One 10 s clip per call, as `musiclm eval` embeds a folder file by file:
* CLAP at the laion/larger_clap_music config (HTS-AT base: 128 channels, depths 2-2-12-2; fadtk's
  clap-laion-music), random weights written by transformers' ClapModel and loaded by ours: 10 s of 48 kHz noise ->
  features -> audio embedding (one window). Theirs: ClapFeatureExtractor + get_audio_features.
* EnCodec at the facebook/encodec_24khz config (EncodecConfig's defaults), random weights written by
  transformers' EncodecModel: 10 s of 24 kHz noise -> 750 frame embeddings of 128 (fadtk's encodec-emb).
  Theirs: EncodecModel.encoder.
fp32 with 2 threads; each figure is the median of the repeats after a warm-up, ours and theirs alternated.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import load_line, machine_lines, median_s, parse_args, report
from clap import tokenizer_folder  # benchmarks/clap.py: a small byte-level BPE for the checkpoint folder

LARGER_MUSIC_AUDIO = dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)


def clap_pair(folder: Path):
    import transformers

    from musiclm_core.clap import CLAP

    torch.manual_seed(0)
    reference = transformers.ClapModel(transformers.ClapConfig(audio_config=LARGER_MUSIC_AUDIO)).eval()
    extractor = transformers.ClapFeatureExtractor(frequency_min=50, truncation="rand_trunc")
    folder.mkdir(parents=True)
    tokenizer_folder(folder)
    transformers.RobertaTokenizerFast.from_pretrained(str(folder), model_max_length=512).save_pretrained(folder)
    reference.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return CLAP.from_pretrained(folder), reference, extractor


def encodec_pair(folder: Path):
    import transformers

    from musiclm_core.encodec import EnCodec

    torch.manual_seed(0)
    reference = transformers.EncodecModel(transformers.EncodecConfig()).eval()  # the 24 kHz model's config
    reference.save_pretrained(folder)
    return EnCodec.from_pretrained(folder), reference


def main() -> None:
    args = parse_args(__doc__, reps=5)
    import transformers

    from musiclm_core.metrics import ClapEmbedding, EnCodecEmbedding

    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bars
    torch.set_num_threads(2)
    rng = np.random.RandomState(0)
    head = machine_lines()
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp, torch.inference_mode():
        ours, reference, extractor = clap_pair(Path(tmp) / "clap")
        embed = ClapEmbedding(ours, "larger_clap_music")
        wav = (0.1 * rng.randn(480_000)).astype(np.float32)  # 10 s at 48 kHz

        def their_clap():
            features = extractor(wav, sampling_rate=48_000, return_tensors="pt")["input_features"]
            return reference.get_audio_features(input_features=features).pooler_output

        errors["CLAP"] = (embed(torch.from_numpy(wav)[None]) - torch.nn.functional.normalize(their_clap(), dim=-1)
                          ).abs().max().item()
        rows.append(("CLAP larger_clap_music, 10 s -> 1 x 512",
                     *median_s(lambda: embed(torch.from_numpy(wav)[None]), their_clap, args.reps)))
        del ours, reference, embed
        shutil.rmtree(Path(tmp) / "clap")

        codec, codec_reference = encodec_pair(Path(tmp) / "encodec")
        frames = EnCodecEmbedding(codec, "encodec_24khz")
        audio = torch.from_numpy((0.1 * rng.randn(1, 240_000)).astype(np.float32))  # 10 s at 24 kHz

        def their_frames():
            return codec_reference.encoder(audio[None])[0].T

        errors["EnCodec"] = (frames(audio) - their_frames()).abs().max().item()
        rows.append(("EnCodec 24 kHz encoder, 10 s -> 750 x 128",
                     *median_s(lambda: frames(audio), their_frames, args.reps)))

    lines = [
        *head,
        f"# transformers {transformers.__version__}; fp32, 2 threads, one 10 s clip per call, median of {args.reps} "
        f"after a warm-up, alternated. Max abs difference of the embeddings: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
        "",
        "| embedding | ours (clips/s) | transformers (clips/s) | ours / transformers |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {1 / a:.2f} | {1 / b:.2f} | {b / a:.2f} |" for what, a, b in rows],
        "",
        f"# {load_line('after')}",
    ]
    report("## FAD embeddings", lines, write=args.write)


if __name__ == "__main__":
    main()
