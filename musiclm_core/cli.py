"""The `musiclm` command.

    musiclm encode IN.wav OUT.codes --model facebook/encodec_32khz [--bandwidth KBPS] [--overwrite]
    musiclm decode IN.codes OUT.wav [--model M] [--overwrite]
    musiclm convert SRC OUT [--overwrite]
    musiclm convert --random-tiny DIR       # a small random MusicGen (T5, EnCodec, LM) for smoke tests, offline
    musiclm generate "80s pop track with bassy drums and synth" --model facebook/musicgen-small --duration 8 -o out.wav
    musiclm generate --prompts-file prompts.txt --duration 8 -o out.wav      # out_0.wav, out_1.wav, ...
    musiclm generate "..." --model ucsd-reach/musicldm --steps 50 --scheduler dpm -n 3 -o out.wav  # also AudioLDM 2
    musiclm generate --prompts prompts.jsonl --out DIR [--batch-size N]     # an evaluation set: DIR/<id>.wav + .txt
    musiclm eval --generated DIR --reference DIR --embedding clap|encodec|vggish [--kl passt] [--melody DIR] --out DIR
                                              # FAD, CLAP score, KL, melody similarity, report
    musiclm clap "text" a.wav b.wav [--model M]                             # CLAP score matrix
    musiclm train musicgen --data DIR --model facebook/musicgen-small --out runs/x --steps N [--lora R] [--resume]
    musiclm train ldm --data DIR --model ucsd-reach/musicldm --out runs/y --steps N [--lora R] [--resume]

Adding a command: write `_add_<name>(subparsers)`, which declares the arguments on `_command(subparsers, ...)`
(it shows every default in --help) and ends with `p.set_defaults(run=_<name>)`, and `_<name>(args) -> int`,
which runs it; then call `_add_<name>` in `build_parser`. Import torch and the models inside `_<name>`: `musiclm
--help` must not pay for them. Raise `UsageError` for flag values or combinations that can never work (exit status
2, as argparse's own usage errors) and `CLIError` for what goes wrong with files, models or the run (status 1);
the API's ValueError / CheckpointError / OSError are status 1 too. Every error prints as one line naming the
flags, not the API's argument names (`_FLAG_NAMES`). Ctrl-C prints one line and exits with 130. Outputs are
written atomically (a temporary file in the same folder, then a rename), so an interrupted command leaves no
partial file, and an existing output is only replaced with --overwrite.

A codes file is a safetensors file holding `codes` (1, K, T) int64, `scales` (1, chunks) float for codecs that
normalise their input, and text metadata: the codec (`model`: a hub id, or a folder's absolute path), a
fingerprint of the codec's config (`codec_config`), its `sample_rate`, the `bandwidth`, the audio `channels` and
the original `length` in samples at the codec's rate, so `decode` can check that the codec matches and trim the
padding back off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from pathlib import Path

CODES_FORMAT = "musiclm_core.codes"
CODES_VERSION = "2"  # 2: absolute codec path, codec_config fingerprint; version 1 files are still read

# Names only: the torch dtypes and kernels.quant.MODES (a test checks they agree) would import torch here.
DTYPES = ("float32", "float16", "bfloat16")
QUANT_MODES = ("int8", "int4", "bf16")

# --duration past this needs --allow-long: 300 s of audio are 15,000 decoding steps (one a frame, 50 frames/s),
# ~12 min at the ~20 steps/s of MusicGen small on a CPU for one prompt (medium and large are slower), so that a
# mistyped duration (100000) is refused with what it would cost instead of running for days.
LONG_DURATION = 300.0
CPU_STEPS_PER_S = 20.0
FRAME_RATE = 50  # of every released MusicGen codec: one decoding step per frame
MUSICGEN_GUIDANCE_SCALE = 3.0  # generate's --guidance-scale for MusicGen (the diffusion pipelines have their own)
# model_index.json `_class_name`s that `generate` runs (musiclm_core.musicldm / musiclm_core.audioldm2)
DIFFUSION_PIPELINES = ("MusicLDMPipeline", "AudioLDM2Pipeline")
DIFFUSION_STEPS = 200  # --steps default: the pipelines' num_inference_steps


class CLIError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback (exit status 1)."""


class UsageError(CLIError):
    """A flag value or combination that can never work (exit status 2, as argparse's usage errors)."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, except where there is none to show (None, False) or the help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _command(subparsers, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter)


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CLIError(f"{path} exists; pass --overwrite to replace it")


def _check_input(path: Path) -> None:
    if not path.exists():
        raise CLIError(f"no such file: {path}")
    if path.is_dir():
        raise CLIError(f"{path} is a directory, not a file")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("musiclm-core")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Codes files


def codec_fingerprint(config) -> str:
    """16 hex digits of the SHA-256 of an EnCodecConfig's fields: codecs of one architecture and settings share
    it (it does not see the weights: the recorded `model` names those)."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def codec_reference(model: str) -> str:
    """What a codes file records of `--model`: a folder's absolute path (the file may be decoded from elsewhere),
    or the hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def save_codes(path: str | os.PathLike, codes, scales, metadata: dict[str, str], *, overwrite: bool = False) -> Path:
    """Write a codes file atomically: a hidden temporary file in the target folder, then `os.replace`."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_output(path, overwrite)
    tensors = {"codes": codes.detach().cpu().contiguous()}
    if scales is not None:
        tensors["scales"] = scales.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": CODES_FORMAT, "version": CODES_VERSION, **metadata})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_codes(path: str | os.PathLike) -> tuple:
    """(codes (1, K, T), scales (1, chunks) or None, metadata) of a codes file written by `save_codes`."""
    from safetensors import safe_open

    path = Path(path)
    _check_input(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError on other files
        raise CLIError(f"{path} is not a codes file (not readable as safetensors: {err})") from err
    if metadata.get("format") != CODES_FORMAT or "codes" not in tensors:
        raise CLIError(f"{path} is not a codes file written by `musiclm encode` (format {metadata.get('format')!r})")
    needed = ["model", "sample_rate", "length"]
    if metadata.get("version") != "1":
        needed += ["codec_config", "bandwidth", "channels"]
    missing = [k for k in needed if k not in metadata]
    if missing:
        raise CLIError(f"{path}: codes file without {missing} in its metadata")
    for key in ("sample_rate", "length", "channels"):
        if key in metadata and not re.fullmatch(r"[1-9][0-9]*", metadata[key]):
            raise CLIError(f"{path}: metadata {key} = {metadata[key]!r} is not a positive integer")
    codes = tensors["codes"]
    if codes.dim() != 3 or codes.shape[0] != 1 or codes.is_floating_point():
        raise CLIError(f"{path}: codes must be (1, K, T) integers, got {tuple(codes.shape)} {codes.dtype}")
    return codes, tensors.get("scales"), metadata


def encoded_frames(config, length: int) -> int:
    """Frames `EnCodec.encode` gives for `length` samples: ceil(length / hop), summed over the chunks of a
    chunked codec."""
    hop = config.hop_length
    if config.chunk_length is None:
        return math.ceil(length / hop)
    return sum(math.ceil(min(config.chunk_length, length - i) / hop) for i in range(0, length, config.chunk_stride))


def check_codes_match(codes, metadata: dict[str, str], codec, *, path: Path, model: str) -> None:
    """CLIError unless `codec` (loaded from `model`) is the one the codes file was written with and the codes
    hold what the metadata says: each message names both sides."""
    recorded = metadata["model"]
    if "codec_config" in metadata and metadata["codec_config"] != codec_fingerprint(codec.config):
        raise CLIError(f"{path} was encoded with the codec {recorded} (config {metadata['codec_config']}), but "
                       f"{model} is another codec (config {codec_fingerprint(codec.config)}): pass the codec it "
                       f"was encoded with (--model)")
    if int(metadata["sample_rate"]) != codec.sample_rate:
        raise CLIError(f"{path} was encoded at {metadata['sample_rate']} Hz with {recorded}, but {model} runs at "
                       f"{codec.sample_rate} Hz: pass the codec it was encoded with (--model)")
    if "channels" in metadata and int(metadata["channels"]) != codec.channels:
        raise CLIError(f"{path} holds {metadata['channels']} channel(s), {model} codes {codec.channels}")
    K, T = codes.shape[1:]
    if "bandwidth" in metadata:
        try:
            expected = codec.config.codebooks_for_bandwidth(float(metadata["bandwidth"]))
        except ValueError as err:
            raise CLIError(f"{path}: metadata bandwidth {metadata['bandwidth']!r} kbps does not fit {model}: "
                           f"{err}") from err
        if K != expected:
            raise CLIError(f"{path} holds {K} codebooks, but its bandwidth {metadata['bandwidth']} kbps uses "
                           f"{expected} with {model}: the file is incomplete or altered")
    length = int(metadata["length"])
    if encoded_frames(codec.config, length) != T:
        raise CLIError(f"{path}: metadata length {length} samples would encode to "
                       f"{encoded_frames(codec.config, length)} frames at hop {codec.hop_length}, but the file "
                       f"holds {T} frames")


def _checkpoint_kind(src: str) -> tuple[str, str]:
    """(layout, model kind) of a checkpoint: the kind is the transformers model_type, or what the files say."""
    from musiclm_core import hub

    folder = hub.resolve(src, allow_patterns=["*.json"])  # a hub id: only the configs, to see what it is
    layout = hub.detect_layout(folder)
    if layout == "native":
        return layout, str(hub.read_json(folder / "config.json")[hub.NATIVE_FORMAT].get("model"))
    if layout == "transformers":
        return layout, str(hub.read_json(folder / "config.json").get("model_type"))
    if layout == "audiocraft":
        # The LM (state_dict.bin) and the codec (compression_state_dict.bin) of a MusicGen repo.
        return layout, "musicgen" if (folder / "state_dict.bin").is_file() else "encodec"
    if layout == "diffusers":  # the pipeline class: MusicLDMPipeline, AudioLDM2Pipeline, ...
        return layout, str(hub.read_json(folder / "model_index.json").get("_class_name"))
    return layout, "unknown"


# ---------------------------------------------------------------------------------------------------------------
# encode


def _add_encode(subparsers) -> None:
    p = _command(subparsers, "encode", help="audio file -> EnCodec codes file",
                 description="Encode an audio file (wav/flac/ogg) into EnCodec codes.")
    p.add_argument("input", type=Path, help="audio file; resampled and mixed to the codec's rate and channels")
    p.add_argument("output", type=Path, help="codes file to write (safetensors)")
    p.add_argument("--model", default="facebook/encodec_32khz",
                   help="codec: hub id or folder (native, transformers or audiocraft layout)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="target bandwidth in kbps, one of the codec's (default: its first)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_encode)


def _encode(args: argparse.Namespace) -> int:
    from musiclm_core.audio import load_audio
    from musiclm_core.encodec import EnCodec

    _check_input(args.input)
    _check_output(args.output, args.overwrite)
    codec = EnCodec.from_pretrained(args.model)
    wav, sample_rate = load_audio(args.input, sample_rate=codec.sample_rate, channels=codec.channels)  # (C, N)
    bandwidth = codec.config.target_bandwidths[0] if args.bandwidth is None else args.bandwidth
    codes, scales = codec.encode(wav[None], bandwidth, return_scales=True)  # (1, K, T)
    metadata = {"model": codec_reference(args.model), "codec_config": codec_fingerprint(codec.config),
                "sample_rate": str(sample_rate), "bandwidth": str(bandwidth), "channels": str(codec.channels),
                "length": str(wav.shape[-1])}
    save_codes(args.output, codes, scales, metadata, overwrite=args.overwrite)
    K, T = codes.shape[1:]
    print(f"{args.input} -> {args.output}: {K} codebooks x {T} frames at {bandwidth} kbps")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# decode


def _add_decode(subparsers) -> None:
    p = _command(subparsers, "decode", help="EnCodec codes file -> audio file",
                 description="Decode a codes file written by `musiclm encode` into audio. The codec must be the "
                             "one it was encoded with (the file records it and a fingerprint of its config).")
    p.add_argument("input", type=Path, help="codes file")
    p.add_argument("output", type=Path, help="audio file to write (.wav, .flac or .ogg)")
    p.add_argument("--model", default=None, help="codec (default: the one named in the codes file)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_decode)


def _decode(args: argparse.Namespace) -> int:
    from musiclm_core import hub
    from musiclm_core.audio import save_audio
    from musiclm_core.encodec import EnCodec

    codes, scales, metadata = load_codes(args.input)
    _check_output(args.output, args.overwrite)
    model = args.model or metadata["model"]
    try:
        codec = EnCodec.from_pretrained(model)
    except hub.CheckpointError as err:
        if args.model:
            raise
        raise CLIError(f"{args.input} names the codec {model}, which cannot be loaded here ({err}); pass the "
                       f"codec with --model") from err
    check_codes_match(codes, metadata, codec, path=args.input, model=model)
    wav = codec.decode(codes, scales)[0, :, : int(metadata["length"])]  # (C, N): the padding trimmed off
    save_audio(args.output, wav, codec.sample_rate, overwrite=args.overwrite)
    print(f"{args.input} -> {args.output}: {wav.shape[-1] / codec.sample_rate:.2f} s, {wav.shape[0]} channel(s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# convert


def _add_convert(subparsers) -> None:
    p = _command(subparsers, "convert", help="official checkpoint -> native folder",
                 description="Convert a checkpoint (hub id or folder, transformers or audiocraft layout) into the "
                             "native format (config.json + model.safetensors). With --random-tiny DIR instead: "
                             "write a small MusicGen with random weights (a T5, an EnCodec at 32 kHz and a "
                             "2-layer LM, about 10 MB) to DIR, which `musiclm generate --model DIR` runs in "
                             "seconds without the hub: a smoke test of an installation. Its audio is noise.")
    p.add_argument("src", nargs="?", help="hub id or folder")
    p.add_argument("out", nargs="?", type=Path, help="native folder to write")
    p.add_argument("--random-tiny", type=Path, metavar="DIR", help="write a random tiny MusicGen to DIR instead")
    p.add_argument("--seed", type=int, default=0, help="--random-tiny: seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    if args.random_tiny is not None:
        if args.src is not None:
            raise UsageError("give either SRC OUT or --random-tiny DIR, not both")
        _check_output(args.random_tiny, args.overwrite)
        random_tiny_musicgen(args.seed).save_pretrained(args.random_tiny, overwrite=args.overwrite)
        print(f"random tiny MusicGen (seed {args.seed}) -> {args.random_tiny}")
        return 0
    if args.src is None or args.out is None:
        raise UsageError("give SRC and OUT (or --random-tiny DIR)")
    _check_output(args.out, args.overwrite)
    layout, kind = _checkpoint_kind(args.src)
    if layout == "native":
        raise CLIError(f"{args.src} is already a native checkpoint (a {kind!r} model)")
    # One branch per model family; a family's from_pretrained does the conversion.
    if kind == "encodec":
        from musiclm_core.encodec import EnCodec

        model = EnCodec.from_pretrained(args.src)
    elif kind == "musicgen":  # the whole pipeline: LM, codec and T5 (for audiocraft folders T5 comes from the hub)
        from musiclm_core.musicgen import MusicGen

        model = MusicGen.from_pretrained(args.src)
    elif kind == "musicgen_melody":
        from musiclm_core.melody import MusicGenMelody

        model = MusicGenMelody.from_pretrained(args.src)
    elif kind == "t5":
        from musiclm_core.t5 import T5Encoder

        model = T5Encoder.from_pretrained(args.src)
    else:
        raise CLIError(f"{args.src}: converting a {kind!r} checkpoint ({layout} layout) is not supported yet")
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"{args.src} ({layout} {kind}) -> {args.out}")
    return 0


TINY_WORDS = ("the a of and with music song track drums bass guitar synth piano violin beat tempo loud soft calm "
              "happy sad pop rock jazz electronic melody rhythm vocals ambient dark bright warm funk").split()


def random_tiny_musicgen(seed: int = 0):
    """A MusicGen with random weights, small and quick, for smoke tests without the hub: T5 (2 layers, 32 wide,
    a 100-piece sentencepiece model trained on music words), an EnCodec at 32 kHz with 4 codebooks of 2048
    entries at 50 frames/s (as facebook/encodec_32khz, 4 filters wide) and a 2-layer LM 64 wide. Its codebooks
    are random (not zero), so its audio depends on the codes; the global RNG is left as it was."""
    import random
    import tempfile

    import sentencepiece as spm
    import torch

    from musiclm_core.encodec import EnCodec, EnCodecConfig
    from musiclm_core.musicgen import MusicGen, MusicGenConfig, MusicGenLM
    from musiclm_core.t5 import T5Config, T5Encoder, T5Tokenizer

    rng = random.Random(seed)
    phrases = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, 10))) for _ in range(500)]
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        # T5's ids: pad 0, eos 1, unk 2, no bos; 100 pieces + T5Tokenizer's 100 sentinels < vocab_size 256.
        spm.SentencePieceTrainer.train(sentence_iterator=iter(phrases), model_prefix=str(Path(tmp) / "spiece"),
                                       model_type="unigram", vocab_size=100, hard_vocab_limit=False, pad_id=0,
                                       eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        torch.manual_seed(seed)
        t5 = T5Encoder(T5Config(vocab_size=256, dim=32, head_dim=8, ffn_dim=64, num_layers=2, num_heads=4))
        t5.tokenizer = T5Tokenizer.from_folder(tmp, max_length=t5.config.max_length)
        codec = EnCodec(EnCodecConfig(num_filters=4, dimension=16, lstm_layers=1))  # 32 kHz, hop 640, 2.2 kbps
        lm = MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=32))
    return MusicGen(lm, codec, t5)


# ---------------------------------------------------------------------------------------------------------------
# generate

# The API's argument names in its messages -> the flags that set them.
_FLAG_NAMES = {"do_sample=False": "--greedy", "guidance_scale": "--guidance-scale", "top_k": "--top-k",
               "top_p": "--top-p", "temperature": "--temperature", "seed": "--seed",
               "audio_length_in_s": "--duration", "num_inference_steps": "--steps",
               "num_waveforms_per_prompt": "-n", "negative_prompt": "--negative-prompt"}


def _flag_names(message: str) -> str:
    for name, flag in _FLAG_NAMES.items():  # whole words only, and not a part of a path ("runs/seed/a.wav")
        message = re.sub(rf"(?<![\w/-]){re.escape(name)}(?![\w=/])", flag, message)
    return message


def _add_generate(subparsers) -> None:
    p = _command(
        subparsers, "generate", help="text -> music (MusicGen, MusicLDM, AudioLDM 2)",
        description="Generate music from a text prompt, or from each line of --prompts-file, with MusicGen, or "
                    "with MusicLDM / AudioLDM 2 when --model is such a diffusers pipeline (model_index.json). "
                    "Several prompts give several files, in prompt order: -o out.wav writes out_0.wav, out_1.wav, "
                    "..., and -o FOLDER/ (an existing folder, or a path ending in /) writes FOLDER/0.wav, "
                    "FOLDER/1.wav, ... (from 10 prompts on, the numbers are zero-padded to one width: 00, 01, ...). "
                    "Every output path is checked before the model is loaded: an existing file is only replaced "
                    "with --overwrite. Progress goes to stderr: a bar on a terminal, a line every 10 s elsewhere. "
                    "An evaluation set instead: --prompts prompts.jsonl --out DIR (see --prompts).")
    p.add_argument("prompt", nargs="?", help="the text prompt (or --prompts-file)")
    p.add_argument("-o", "--output",
                   help="audio file to write (.wav, .flac or .ogg), or a folder (see above)")
    p.add_argument("--prompts-file", type=Path, help="UTF-8 text file, one prompt per line; blank lines are skipped")
    p.add_argument("--prompts", type=Path, metavar="JSONL",
                   help='evaluation set: a JSON-lines file of {"id", "caption"}; writes OUT/<id>.wav and its caption '
                        "OUT/<id>.txt (what `musiclm eval --generated OUT` reads), skips the ids already written "
                        "(a stopped run restarts where it stopped), and under torchrun each rank (RANK, WORLD_SIZE) "
                        "takes every WORLD_SIZE-th prompt. Any model: MusicGen, MusicLDM, AudioLDM 2 (one waveform per "
                        "prompt). The seed of each batch is --seed (default 0 here) plus the index of its first "
                        "prompt, so with --batch-size 1 a file depends only on its line")
    p.add_argument("--out", type=Path, metavar="DIR", help="--prompts: the folder to write")
    p.add_argument("--model", default="facebook/musicgen-small",
                   help="hub id or folder (transformers, audiocraft or native layout)")
    p.add_argument("--duration", type=float, default=8.0,
                   help=f"seconds of audio per prompt, the --continue audio included; past 30 s the music is "
                        f"extended window by window, past {LONG_DURATION:.0f} s only with --allow-long")
    p.add_argument("--allow-long", action="store_true",
                   help=f"allow --duration beyond {LONG_DURATION:.0f} s (over 12 min of decoding a prompt on a CPU)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed in [0, 2**64 - 1] (default: a random one, which is printed; --greedy needs "
                        "none)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale; 1 or less turns it off (default: 3.0 for MusicGen, the "
                        "pipeline's for MusicLDM (2.0) and AudioLDM 2 (3.5))")
    p.add_argument("--steps", type=int, default=None,
                   help="MusicLDM / AudioLDM 2: denoising steps (default 200, the pipelines'; DPM-Solver++ does well "
                        "with 20-50)")
    p.add_argument("--scheduler", choices=["ddim", "dpm", "pndm", "euler", "lms"], default=None,
                   help="MusicLDM / AudioLDM 2: the sampler (default: the checkpoint's, DDIM; dpm = DPM-Solver++)")
    p.add_argument("-n", "--num-waveforms", type=int, default=None,
                   help="MusicLDM / AudioLDM 2: candidates per prompt, all written, best first by CLAP score (-o "
                        "out.wav with -n 3 writes out_0.wav, out_1.wav, out_2.wav; default 1)")
    p.add_argument("--negative-prompt", default=None,
                   help="MusicLDM / AudioLDM 2: what guidance steers away from, for every prompt (e.g. \"low "
                        "quality\")")
    p.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes; 0 = off")
    p.add_argument("--top-p", type=float, default=0.0,
                   help="sample among the most likely codes that make up this probability; 0 = off")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature > 0")
    p.add_argument("--greedy", action="store_true", help="take the most likely code at every step (no sampling)")
    p.add_argument("--continue", dest="continue_from", type=Path, metavar="AUDIO",
                   help="audio file to continue, resampled and mixed to the model's rate and channels; the output "
                        "starts with it (as the codec reproduces it)")
    # A conditioning input of another model family (e.g. MusicGen Melody's --melody AUDIO) is declared here and
    # passed on in _generate's `conditioning`.
    p.add_argument("--melody", type=Path, metavar="AUDIO",
                   help="MusicGen Melody checkpoints only: audio whose melody (chroma, first 30 s) every prompt "
                        "follows")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts generated together (1: each output then depends only on its prompt and the "
                        "seed; larger batches are faster on a GPU)")
    p.add_argument("--normalize", choices=["peak", "loudness", "rms", "none"], default="loudness",
                   help="level of the written audio: loudness -14 LUFS (as audiocraft's examples), peak -1 dBFS, "
                        "rms -18 dBFS, or none; samples beyond [-1, 1] are clipped")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights dtype")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="store the LM's linear weights in int8, int4 or bf16 (weight-only; close to, not "
                        "identical with, the float32 results: see benchmarks/RESULTS.md). int8 decodes faster than "
                        "float32 on Intel and AMD CPUs; int4 (CPU only) faster still and coarser; bf16 halves the "
                        "weight memory but is not faster than float32 except, a little, on CPUs with native bf16 "
                        "arithmetic (AVX512-BF16 / AMX)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA devices: replay each decoding step (MusicGen) or UNet call (MusicLDM, AudioLDM 2) from "
                        "a CUDA graph (much faster at small batches)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: run the decoding steps through torch.compile'd decoder layers (needs a C++ compiler; "
                        "compiling takes 10-30 s once; int8 / int4 steps are then ~20%% faster, fp32 ones, bound by "
                        "memory, are not)")
    p.set_defaults(run=_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        if args.prompt is None:
            raise UsageError("give a text prompt, or --prompts-file FILE with one prompt per line")
        if not args.prompt.strip():
            raise UsageError("the prompt is empty: describe the music to generate")
        return [args.prompt]
    if args.prompt is not None:
        raise UsageError("give either a prompt or --prompts-file, not both")
    path = args.prompts_file
    if not path.exists():
        raise CLIError(f"no such file: {path}")
    if not path.is_file():
        raise CLIError(f"--prompts-file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"--prompts-file {path} is not UTF-8 text ({err})") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CLIError(f"--prompts-file {path} holds no prompt (one per line, blank lines are skipped)")
    return prompts


def _check_duration(args: argparse.Namespace, count: int) -> None:
    """UsageError for a --duration that is not a length, or that is past LONG_DURATION without --allow-long
    (with the work it would take)."""
    if not math.isfinite(args.duration) or args.duration <= 0:
        raise UsageError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.normalize == "loudness" and args.duration < 0.4:
        # BS.1770 loudness is measured over 400 ms blocks: refuse now rather than after generating.
        raise UsageError(f"--normalize loudness needs at least 0.4 s of audio (--duration {args.duration}); use "
                         f"--normalize peak, rms or none")
    if args.duration > LONG_DURATION and not args.allow_long:
        steps = args.duration * FRAME_RATE * math.ceil(count / args.batch_size)
        hours = steps / CPU_STEPS_PER_S / 3600
        raise UsageError(f"--duration {args.duration:g} s is about {steps:,.0f} decoding steps"
                         f"{f' for {count} prompts' if count > 1 else ''}, ~{hours:,.1f} h at the "
                         f"~{CPU_STEPS_PER_S:.0f} steps/s of MusicGen small on a CPU; past {LONG_DURATION:.0f} s "
                         f"pass --allow-long")


def _output_paths(output: str, count: int, overwrite: bool) -> list[Path]:
    """The files `generate` writes for `count` prompts (see the subcommand's description); checked up front."""
    from musiclm_core.audio import _FORMATS as AUDIO_FORMATS  # the extensions save_audio writes

    path = Path(output)
    width = len(str(count - 1))  # numbers of one width sort in prompt order
    if path.is_dir() or output.endswith(("/", os.sep)):
        paths = [path / f"{i:0{width}d}.wav" for i in range(count)]
    elif count == 1:
        paths = [path]
    else:
        paths = [path.with_name(f"{path.stem}_{i:0{width}d}{path.suffix}") for i in range(count)]
    for p in paths:
        if p.suffix.lower() not in AUDIO_FORMATS:
            raise UsageError(f"cannot tell the audio format of {p}: use one of the extensions "
                             f"{sorted(AUDIO_FORMATS)}")
        _check_output(p, overwrite)
    return paths


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


class Progress:
    """A `progress(done, total)` callback that shows how far a generation is, on a stream (stderr).

    On a terminal: one line redrawn at each new count (bar, frames, rate, time left), ended once at the end.
    Elsewhere (a log file, a pipe): a plain line every `every` seconds and one at the end, so that a long run
    shows it is alive without filling the log with redraws. A count reported twice is drawn once.
    """

    def __init__(self, label: str, stream=None, width: int = 30, every: float = 10.0, unit: str = "frames"):
        self.stream = sys.stderr if stream is None else stream
        self.label, self.width, self.every, self.unit = label, width, every, unit
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.printed = time.monotonic()
        self.drawn = 0  # length of the line on screen, to blank what a shorter line leaves
        self.last: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        if (done, total) == self.last:
            return
        self.last = (done, total)
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-6)
        left = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        status = f"{done}/{total} {self.unit}, {rate:.1f} {self.unit}/s{left}"
        if self.terminal:
            filled = self.width * min(done, total) // max(total, 1)
            line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {status}"
            self.stream.write("\r" + line.ljust(self.drawn) + ("\n" if done >= total else ""))
            self.drawn = len(line)
        elif done >= total or now - self.printed >= self.every:
            self.stream.write(f"{self.label}: {status}\n")
            self.printed = now
        self.stream.flush()


def _load_generator(args: argparse.Namespace, device, dtype):
    """The pipeline of --model on `device`, for --melody / --continue as given (a clear error where the model
    family takes neither). MusicGen's generate takes duration=, top_k=, ...; MusicLDM's and AudioLDM 2's take
    audio_length_in_s=, num_inference_steps=, ... (see _generate_diffusion)."""
    from musiclm_core.musicgen import MusicGen

    kind = _checkpoint_kind(args.model)[1]
    if kind in DIFFUSION_PIPELINES:
        if args.melody is not None or args.continue_from is not None:
            raise CLIError(f"--melody and --continue are for MusicGen checkpoints; {args.model} is a {kind}")
        pipeline = _diffusion_class(kind)
        return pipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipeline = MusicGen
    if kind == "musicgen_melody":  # the same generate, plus melody=
        from musiclm_core.melody import MusicGenMelody

        pipeline = MusicGenMelody
        if args.continue_from is not None:
            raise CLIError("--continue is not supported by MusicGen Melody checkpoints")
    elif args.melody is not None:
        raise CLIError(f"--melody needs a MusicGen Melody checkpoint; {args.model} is not one")
    model = pipeline.from_pretrained(args.model, dtype=dtype, quantize=args.quantize).to(device)
    if args.compile:
        model.lm.compile_decode()
    return model


def _generate(args: argparse.Namespace) -> int:
    if _diffusion_kind(args.model) is not None:
        return _generate_diffusion(args)
    for flag, value in (("--steps", args.steps), ("--scheduler", args.scheduler), ("-n", args.num_waveforms),
                        ("--negative-prompt", args.negative_prompt)):
        if value is not None:
            raise UsageError(f"{flag} is for MusicLDM / AudioLDM 2 checkpoints; {args.model} is not one")
    if args.guidance_scale is None:
        args.guidance_scale = MUSICGEN_GUIDANCE_SCALE
    if args.prompts is not None or args.out is not None:
        return _generate_set(args)
    if args.output is None:
        raise UsageError("give -o/--output FILE (or --prompts JSONL --out DIR for an evaluation set)")
    # Everything that can be checked without the model first: loading it takes a while.
    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_duration(args, len(prompts))
    paths = _output_paths(args.output, len(prompts), args.overwrite)

    import torch

    from musiclm_core import generate as gen
    from musiclm_core.audio import load_audio

    try:
        gen.check_sampling(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, do_sample=not args.greedy, seed=args.seed)
    except ValueError as err:
        raise UsageError(_flag_names(str(err))) from err
    device, dtype = _device(args.device), getattr(torch, args.dtype)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, the model would run on {device}")
    if args.compile and device.type != "cpu":
        raise UsageError(f"--compile is for CPU decoding, the model would run on {device} (on CUDA: --cuda-graph)")
    if args.continue_from is not None:
        _check_input(args.continue_from)
    if args.melody is not None:
        _check_input(args.melody)

    model = _load_generator(args, device, dtype)
    conditioning = {}  # inputs besides the text, the same for every prompt: (C, N) audio at the model's rate
    if args.melody is not None:
        melody, melody_rate = load_audio(args.melody)  # as it is: the chroma mixes it down and resamples it
        conditioning["melody"] = melody.to(device)
    if args.continue_from is not None:
        wav, _ = load_audio(args.continue_from, sample_rate=model.sample_rate, channels=model.channels)
        conditioning["prompt_audio"] = wav.to(device=device, dtype=dtype)
    seed = args.seed
    if seed is None and not args.greedy:  # greedy decoding draws no random number
        seed = secrets.randbelow(2**31)
        print(f"seed {seed} (pass --seed {seed} to generate the same music again)", file=sys.stderr)
    settings = dict(duration=args.duration, guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, do_sample=not args.greedy, seed=seed, cuda_graph=args.cuda_graph)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start: start + args.batch_size]
        B = len(batch)
        extra = {}
        if "prompt_audio" in conditioning:
            extra = dict(prompt_audio=conditioning["prompt_audio"][None].repeat(B, 1, 1),  # (B, C, N)
                         prompt_sample_rate=model.sample_rate)
        if "melody" in conditioning:
            extra = dict(melody=[conditioning["melody"]] * B, melody_sample_rate=melody_rate)
        label = f"prompt {start + 1}/{len(prompts)}" if B == 1 else \
            f"prompts {start + 1}-{start + B}/{len(prompts)}"
        with torch.no_grad():
            audio = model.generate(batch, progress=Progress(label), **settings, **extra)  # (B, C, N)
        for path, wav in zip(paths[start: start + B], audio):
            _write_generated(path, wav, model.sample_rate, args)
    return 0


def _write_generated(path: Path, wav, sample_rate: int, args: argparse.Namespace) -> None:
    """Save one generated (C, N) waveform at --normalize (--overwrite as given) and print what was written."""
    from musiclm_core.audio import save_audio

    with warnings.catch_warnings(record=True) as caught:  # clipping is reported in one line
        warnings.simplefilter("always")
        save_audio(path, wav.float().cpu(), sample_rate,
                   normalize=None if args.normalize == "none" else args.normalize, overwrite=args.overwrite)
    for warning in caught:
        print(f"musiclm generate: warning: {warning.message}", file=sys.stderr)
    print(f"{path}: {wav.shape[-1] / sample_rate:.2f} s, {wav.shape[0]} channel(s) at {sample_rate} Hz")


def _diffusion_class(kind: str):
    """The pipeline class for a model_index.json `_class_name` in DIFFUSION_PIPELINES."""
    if kind == "MusicLDMPipeline":
        from musiclm_core.musicldm import MusicLDM

        return MusicLDM
    from musiclm_core.audioldm2 import AudioLDM2

    return AudioLDM2


def _diffusion_kind(model: str) -> str | None:
    """The `_class_name` of --model when it is a MusicLDM / AudioLDM 2 pipeline, else None (also when it cannot be
    read: the MusicGen path then reports that as it always has)."""
    from musiclm_core import hub

    try:
        kind = _checkpoint_kind(model)[1]
    except hub.CheckpointError:
        return None
    return kind if kind in DIFFUSION_PIPELINES else None


def _generate_diffusion(args: argparse.Namespace) -> int:
    """`generate` for MusicLDM / AudioLDM 2: each prompt gives -n files (candidates best first by CLAP score),
    --duration seconds each (the pipelines' length rules: a multiple of 40 ms is generated, then cut)."""
    for flag, used in (("--melody", args.melody is not None), ("--continue", args.continue_from is not None),
                       ("--quantize", args.quantize is not None), ("--greedy", args.greedy),
                       ("--compile", args.compile)):
        if used:
            raise UsageError(f"{flag} is for MusicGen checkpoints; {args.model} is a diffusion pipeline")
    if args.prompts is not None or args.out is not None:
        return _generate_set(args, diffusion=True)
    if args.output is None:
        raise UsageError("give -o/--output FILE")
    prompts = _read_prompts(args)
    n = 1 if args.num_waveforms is None else args.num_waveforms
    steps = DIFFUSION_STEPS if args.steps is None else args.steps
    for flag, value in (("--batch-size", args.batch_size), ("-n", n), ("--steps", steps)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    _check_duration(args, len(prompts))
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    paths = _output_paths(args.output, len(prompts) * n, args.overwrite)

    import torch

    device = _device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, the model would run on {device}")
    model = _load_generator(args, device, getattr(torch, args.dtype))
    seed = args.seed
    if seed is None:
        seed = secrets.randbelow(2**31)
        print(f"seed {seed} (pass --seed {seed} to generate the same audio again)", file=sys.stderr)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start: start + args.batch_size]
        B = len(batch)
        label = f"prompt {start + 1}/{len(prompts)}" if B == 1 else \
            f"prompts {start + 1}-{start + B}/{len(prompts)}"
        audio = model.generate(batch, audio_length_in_s=args.duration, num_inference_steps=steps,
                               guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                               num_waveforms_per_prompt=n, scheduler=args.scheduler, seed=seed,
                               cuda_graph=args.cuda_graph, progress=Progress(label, unit="steps"))  # (B·n, 1, N)
        for path, wav in zip(paths[start * n: (start + B) * n], audio):
            _write_generated(path, wav, model.sample_rate, args)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# generate --prompts: an evaluation set

_SET_SEED = 0  # the default --seed of an evaluation set: a restarted run makes what the first would have made


def _read_prompt_set(path: Path) -> list[tuple[str, str]]:
    """(id, caption) of each line of a --prompts file; ids must be unique plain file names."""
    if not path.is_file():
        raise CLIError(f"--prompts {path} is not a file")
    from musiclm_core.metrics import jsonl_records

    items, seen = [], {}
    for number, record in jsonl_records(path, f"--prompts {path}"):
        if not isinstance(record.get("id"), (str, int)) or not isinstance(record.get("caption"), str) \
                or not record["caption"].strip():
            raise CLIError(f'--prompts {path} line {number}: expected {{"id": ..., "caption": ...}} with a '
                           f"non-empty caption, got {json.dumps(record)[:100]}")
        name = str(record["id"])
        if not re.fullmatch(r"[^/\\\x00.][^/\\\x00]{0,199}", name) or name != name.strip():
            raise CLIError(f"--prompts {path} line {number}: id {name!r} cannot be a file name (1-200 characters, "
                           f"no / or \\, not starting with '.', no spaces at the ends)")
        if name in seen:
            raise CLIError(f"--prompts {path} line {number}: id {name!r} is used on line {seen[name]} already")
        seen[name] = number
        items.append((name, record["caption"].strip()))
    if not items:
        raise CLIError(f"--prompts {path} holds no prompt (one JSON object per line)")
    return items


def _rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK and WORLD_SIZE, (0, 1) without them."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise CLIError(f"RANK / WORLD_SIZE must be integers ({err})") from err
    if not 0 <= rank < world:
        raise CLIError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
    return rank, world


def _generate_set(args: argparse.Namespace, *, diffusion: bool = False) -> int:
    """`generate --prompts --out`, for MusicGen or (diffusion=True, its flags checked by _generate_diffusion)
    MusicLDM / AudioLDM 2: one waveform per prompt."""
    if args.prompts is None or args.out is None:
        raise UsageError("an evaluation set needs both --prompts JSONL and --out DIR")
    if args.prompt is not None or args.prompts_file is not None or args.output is not None:
        raise UsageError("--prompts/--out take no prompt, --prompts-file or -o/--output")
    if args.melody is not None or args.continue_from is not None:
        raise UsageError("--melody and --continue are not supported with --prompts")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_waveforms not in (None, 1):
        raise UsageError(f"-n {args.num_waveforms}: an evaluation set holds one waveform per prompt")
    steps = DIFFUSION_STEPS if args.steps is None else args.steps
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    items = _read_prompt_set(args.prompts)
    rank, world = _rank()
    mine = list(range(rank, len(items), world))  # indices into items: this rank's share
    _check_duration(args, len(mine))
    out = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is not a folder")
    audio = [out / f"{name}.wav" for name, _ in items]

    def written(i: int) -> bool:
        """The prompt's audio is there, from this caption (else an error: the folder holds another set)."""
        if args.overwrite or not audio[i].exists():
            return False
        caption = audio[i].with_suffix(".txt")
        if not caption.is_file() or caption.read_text(encoding="utf-8").strip() != items[i][1]:
            raise CLIError(f"{audio[i]} exists but {caption.name} does not hold its caption from --prompts: it was "
                           f"made from another prompt; remove it or pass --overwrite")
        return True

    todo = [i for i in mine if not written(i)]
    share = f" (rank {rank} of {world}: {len(mine)} prompts)" if world > 1 else ""
    print(f"{len(items)} prompts{share}, {len(mine) - len(todo)} written already, {len(todo)} to generate -> {out}",
          file=sys.stderr)
    if not todo:
        return 0

    import torch

    from musiclm_core import generate as gen
    from musiclm_core.audio import save_audio
    from musiclm_core.report import write_text

    seed = None if args.greedy else (_SET_SEED if args.seed is None else args.seed)
    if diffusion and not 0 <= seed < 2**64:
        raise UsageError(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    if not diffusion:
        try:
            gen.check_sampling(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, do_sample=not args.greedy, seed=seed)
        except ValueError as err:
            raise UsageError(_flag_names(str(err))) from err
    device = _device(args.device)
    if args.device is None and device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per rank
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device, the model would run on {device}")
    if args.compile and device.type != "cpu":
        raise UsageError(f"--compile is for CPU decoding, the model would run on {device} (on CUDA: --cuda-graph)")
    model = _load_generator(args, device, getattr(torch, args.dtype))
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(duration=args.duration, guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                    temperature=args.temperature, do_sample=not args.greedy, cuda_graph=args.cuda_graph)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start: start + args.batch_size]
        batch_seed = None if seed is None else (seed + batch[0]) % 2**64
        captions, label = [items[i][1] for i in batch], f"{items[batch[0]][0]}.wav"
        with torch.no_grad():
            if diffusion:
                wavs = model.generate(captions, audio_length_in_s=args.duration, num_inference_steps=steps,
                                      guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                                      scheduler=args.scheduler, seed=batch_seed, cuda_graph=args.cuda_graph,
                                      progress=Progress(label, unit="steps"))  # (B, 1, N)
            else:
                wavs = model.generate(captions, seed=batch_seed, progress=Progress(label), **settings)  # (B, C, N)
        for i, wav in zip(batch, wavs):
            # The caption first: an audio file is only ever there with its caption next to it.
            write_text(audio[i].with_suffix(".txt"), items[i][1] + "\n")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                save_audio(audio[i], wav.float().cpu(), model.sample_rate,
                           normalize=None if args.normalize == "none" else args.normalize, overwrite=True)
            for warning in caught:
                print(f"musiclm generate: warning: {audio[i]}: {warning.message}", file=sys.stderr)
        done = sum(path.exists() for path in audio)  # over the whole set: every rank's files count
        print(f"{done}/{len(items)} of the set written; {', '.join(audio[i].name for i in batch)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# clap


def _add_clap(subparsers) -> None:
    p = _command(subparsers, "clap", help="CLAP scores of texts against audio files",
                 description="Print the CLAP cosine similarity of each text (rows) with each audio file (columns). "
                             "Audio longer than 10 s is cropped at a start drawn from seed 0, as CLAP's feature "
                             "extractor does.")
    p.add_argument("text", help="a text")
    p.add_argument("audio", nargs="+", type=Path, help="audio files (any rate; channels are averaged)")
    p.add_argument("--text", dest="more_texts", action="append", default=[], metavar="TEXT",
                   help="another text (a row more); repeat it for more")
    p.add_argument("--model", default="laion/larger_clap_music", help="CLAP: hub id or folder")
    p.set_defaults(run=_clap)


def _clap(args: argparse.Namespace) -> int:
    texts = [args.text, *args.more_texts]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise UsageError("a text is empty: describe the music to score the audio against")
    for path in args.audio:
        _check_input(path)
    from musiclm_core.clap import CLAP, format_scores

    clap = CLAP.from_pretrained(args.model).eval()
    scores = clap.score_files(texts, args.audio)
    print(format_scores(scores, texts, [str(p) for p in args.audio]))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# eval


def _add_eval(subparsers) -> None:
    p = _command(subparsers, "eval", help="FAD, CLAP score, KL divergence and melody similarity of generated audio, "
                                          "and a listening report",
                 description="Compute the Fréchet audio distance between a folder of generated audio and a "
                             "reference folder on CLAP, EnCodec or VGGish embeddings (as fadtk: CLAP on 10 s "
                             "windows, EnCodec per frame; VGGish as --vggish-convention says), and the CLAP score "
                             "of the generated files against their captions when there are any (--captions, or a "
                             ".txt next to each file, as `musiclm generate --prompts` writes them). With --kl "
                             "passt, also the KL divergence of PaSST's AudioSet label distributions between each "
                             "generated file and the reference file of the same name; with --melody DIR, the "
                             "chroma cosine similarity of each generated file with the melody of the same name "
                             "(MusicGen's melody metrics). Files are paired by their path relative to their folder "
                             "without the extension (a/b.wav with a/b.flac). Writes OUT/metrics.json and "
                             "OUT/report.html (a static page: players, mel spectrograms in OUT/mels/, the scores, "
                             "worst CLAP score first). The reference folder's FAD statistics are cached "
                             "(--cache-dir) until its files change.")
    p.add_argument("--generated", type=Path, required=True, help="folder of generated audio (.wav/.flac/.ogg)")
    p.add_argument("--reference", type=Path, required=True, help="folder of reference audio")
    p.add_argument("--captions", type=Path, default=None,
                   help='JSON lines of {"path", "caption"} for the generated files, paths relative to this file '
                        "(default: GENERATED/captions.jsonl if there is one, else the .txt next to each file, "
                        "if any)")
    p.add_argument("--embedding", choices=["clap", "encodec", "vggish"], required=True, help="embedding of the FAD")
    p.add_argument("--clap", default="laion/larger_clap_music", help="CLAP model: hub id or folder")
    p.add_argument("--encodec", default="facebook/encodec_24khz", help="EnCodec model: hub id or folder")
    p.add_argument("--vggish", type=Path, default=None,
                   help="VGGish weights: the folder holding torchvggish's two .pth files, or its "
                        "vggish-10086976.pth with the PCA file next to it (default: torch hub's checkpoints "
                        "folder, where torchvggish downloads them)")
    p.add_argument("--vggish-convention", choices=["google", "fadtk", "torchvggish"], default="google",
                   help="how clips become VGGish embeddings: google = 1 s windows every 0.5 s, peak-normalised "
                        "(the FAD of audiocraft and the MusicGen paper); fadtk = 0.96 s examples back to back "
                        "(fadtk, frechet-audio-distance); torchvggish = the package as it comes (ReLU + PCA)")
    p.add_argument("--hop", type=float, default=1.0, help="--embedding clap: seconds between 10 s windows")
    p.add_argument("--kl", choices=["passt"], default=None,
                   help="also the KL divergence of PaSST's label distributions, each generated file against the "
                        "--reference file of the same name (every file needs a partner)")
    p.add_argument("--passt", type=Path, default=None,
                   help="PaSST checkpoint: the release .pt file or a folder holding it (default: torch hub's "
                        "checkpoints folder, where hear21passt downloads it)")
    p.add_argument("--passt-preset", choices=["10sec", "20sec", "30sec", "tiny"], default="20sec",
                   help="the PaSST model: its segment length (20sec: MusicGen's evaluation)")
    p.add_argument("--melody", type=Path, default=None,
                   help="folder of the melodies the generated files were conditioned on: the chroma cosine "
                        "similarity of each generated file with the melody of the same name (every file needs a "
                        "partner; a generated file is cut or zero-padded to its melody's length)")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json and report.html")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where reference statistics are kept (default: $XDG_CACHE_HOME or ~/.cache, "
                        "musiclm_core/fad_stats)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT/metrics.json, OUT/report.html and its OUT/mels/")
    p.set_defaults(run=_eval)


def _eval_embedding(args: argparse.Namespace, metrics, clap, device):
    """The FAD embedding of --embedding, and the model name recorded with it."""
    if args.embedding == "clap":
        return metrics.ClapEmbedding(clap, metrics.model_reference(args.clap), hop_s=args.hop), args.clap
    if args.embedding == "encodec":
        from musiclm_core.encodec import EnCodec

        codec = EnCodec.from_pretrained(args.encodec).to(device)
        return metrics.EnCodecEmbedding(codec, metrics.model_reference(args.encodec)), args.encodec
    from musiclm_core.vggish import VGGish, VGGishEmbedding, default_folder

    where = str(args.vggish if args.vggish is not None else default_folder())
    model = VGGish.from_pretrained(args.vggish).to(device)
    return VGGishEmbedding(model, metrics.model_reference(where), convention=args.vggish_convention), where


def _eval(args: argparse.Namespace) -> int:
    from musiclm_core import metrics

    if not args.hop > 0:
        raise UsageError(f"--hop must be a positive number of seconds, got {args.hop}")
    if args.kl is None and (args.passt is not None or args.passt_preset != "20sec"):
        raise UsageError("--passt and --passt-preset choose the model of --kl passt; add --kl passt")
    if args.embedding != "vggish" and (args.vggish is not None or args.vggish_convention != "google"):
        raise UsageError("--vggish and --vggish-convention are for --embedding vggish")
    generated = metrics.audio_files(args.generated, what="--generated")
    metrics.audio_files(args.reference, what="--reference")  # an empty folder fails before a model loads
    # Pairing errors (a file without a partner) also come before any model loads.
    kl_pairs = metrics.pair_files(args.generated, generated, args.reference, what="--reference") if args.kl \
        else None
    melody_pairs = None if args.melody is None else \
        metrics.pair_files(args.generated, generated, args.melody, what="--melody")
    if args.captions is not None:
        _check_input(args.captions)
    captions = metrics.read_captions(args.generated, generated, args.captions)
    for name in ("metrics.json", "report.html"):
        _check_output(args.out / name, args.overwrite)
    if kl_pairs is not None:
        from musiclm_core.passt import PRESETS as PASST_PRESETS, checkpoint_path

        # A missing checkpoint or a clip too short for the metric fails before the FAD runs.
        passt_file = checkpoint_path(args.passt, args.passt_preset)
        metrics.check_durations([path for pair in kl_pairs for path in pair],
                                PASST_PRESETS[args.passt_preset].min_segment_s,
                                what="the KL metric (PaSST)")
    device = _device(args.device)

    clap = None
    if args.embedding == "clap" or captions is not None:
        from musiclm_core.clap import CLAP

        clap = CLAP.from_pretrained(args.clap).to(device).eval()
    embedding, embedding_model = _eval_embedding(args, metrics, clap, device)
    stats, scores = metrics.generated_stats(args.generated, generated, embedding, clap=clap, captions=captions,
                                            progress=Progress("generated", unit="files"))
    reference, cached = metrics.reference_stats(args.reference, embedding, cache_dir=args.cache_dir,
                                                progress=Progress("reference", unit="files"))
    fad = metrics.fad(stats, reference)
    clap_score = None if scores is None else float(scores.mean())
    n_reference = len(metrics.audio_files(args.reference))
    per_sample: dict[Path, dict[str, float]] = {path: {} for path in generated}

    kl, kl_model = None, None
    if kl_pairs is not None:
        from musiclm_core.passt import KLDivergence, PaSST

        kl_model = f"passt-{args.passt_preset}:{passt_file.resolve()}"
        kl_metric = KLDivergence(PaSST.from_pretrained(passt_file, preset=args.passt_preset).to(device).eval())
        values = metrics.kl_files(kl_metric, kl_pairs, progress=Progress("KL (PaSST)", unit="pairs"))
        kl = kl_metric.compute()
        for (path, _), value in zip(kl_pairs, values):
            per_sample[path]["KL (ref || gen)"] = value
    chroma, chroma_model = None, None
    if melody_pairs is not None:
        chroma_model = "chroma: MusicGen Melody's (32 kHz, 12 classes, 16384-sample window, hop 4096, argmax)"
        chroma, values = metrics.melody_similarity(melody_pairs, progress=Progress("melody", unit="pairs"))
        for (path, _), value in zip(melody_pairs, values):
            per_sample[path]["chroma cosine"] = value

    result = {"fad": fad, "clap_score": clap_score, "n_generated": len(generated), "n_reference": n_reference,
              "embedding": args.embedding, "embedding_model": embedding_model,
              "embedding_name": embedding.name,
              "embeddings_generated": stats.count, "embeddings_reference": reference.count,
              "clap_model": args.clap if clap_score is not None else None}
    if args.embedding == "vggish":
        result["vggish_convention"] = args.vggish_convention
    if kl is not None:
        result.update({**kl, "kl_model": kl_model, "kl_pairs": len(kl_pairs), "kl_segments": kl_metric.count})
    if chroma is not None:
        result.update({"chroma_cosine": chroma.compute(), "chroma_model": chroma_model,
                       "melody_folder": str(args.melody.resolve()), "chroma_pairs": chroma.pairs,
                       "chroma_frames": chroma.frames})
    result["sources"] = {"fad": embedding.name, "clap_score": result["clap_model"], "kld": kl_model,
                         "chroma_cosine": chroma_model}
    from musiclm_core.report import Sample, write_report, write_text

    write_text(args.out / "metrics.json", json.dumps(result, indent=2) + "\n")

    samples = [Sample(path, None if captions is None else captions[path.resolve()],
                      None if scores is None else float(scores[i]), per_sample[path])
               for i, path in enumerate(generated)]
    summary: dict[str, object] = {"FAD": fad, "CLAP score": clap_score}
    sources = {"FAD": embedding.name, "CLAP score": args.clap if clap_score is not None else ""}
    if kl is not None:
        summary.update({"KL (ref || gen), kld": kl["kld"], "KL (gen || ref)": kl["kld_qp"],
                        "KL both directions": kl["kld_both"]})
        sources.update(dict.fromkeys(("KL (ref || gen), kld", "KL (gen || ref)", "KL both directions"), kl_model))
    if chroma is not None:
        summary["chroma cosine similarity"] = chroma.compute()
        sources["chroma cosine similarity"] = chroma_model
    summary.update({
        "generated files": len(generated), "reference files": n_reference, "embedding": embedding.name,
        "generated embeddings": stats.count, "reference embeddings": reference.count,
        "generated folder": str(args.generated.resolve()), "reference folder": str(args.reference.resolve())})
    if chroma is not None:
        summary["melody folder"] = str(args.melody.resolve())
    write_report(args.out / "report.html", samples, summary, sources)
    print(f"FAD ({embedding.name}): {fad:.6g}  [{len(generated)} generated files ({stats.count} embeddings), "
          f"{n_reference} reference files ({reference.count} embeddings{', cached statistics' if cached else ''})]")
    if clap_score is not None:
        print(f"CLAP score ({args.clap}): {clap_score:.4f}  [{len(generated)} captioned files]")
    if kl is not None:
        print(f"KL divergence ({kl_model}): kld {kl['kld']:.4f}, kld_qp {kl['kld_qp']:.4f}, kld_both "
              f"{kl['kld_both']:.4f}  [{len(kl_pairs)} pairs]")
    if chroma is not None:
        print(f"chroma cosine similarity: {chroma.compute():.4f}  [{chroma.pairs} pairs, {chroma.frames} frames]")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'report.html'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# train


def _add_train(subparsers) -> None:
    p = _command(subparsers, "train", help="fine-tune a model on a folder of captioned audio",
                 description="Fine-tune a model on a folder of audio files with captions (sidecar a.txt next to "
                             "a.wav, or captions.jsonl of {\"path\", \"caption\"}). The run folder --out gets the "
                             "latest weights (musicgen: OUT loads with MusicGen.from_pretrained and `musiclm "
                             "generate --model OUT`; ldm: OUT/unet with UNet.from_pretrained), trainer_state.pt and "
                             "metrics.jsonl (one record per step). Under torchrun (`torchrun --nproc-per-node N -m "
                             "musiclm_core.cli train ...`), add --distributed ddp (or fsdp).")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    m = _command(tasks, "musicgen", help="MusicGen LM (the codec and T5 stay frozen)",
                 description="Fine-tune the MusicGen LM: teacher forcing on delayed EnCodec codes (encoded once, "
                             "cached in --cache), cross-entropy averaged over codebooks, condition dropout for "
                             "classifier-free guidance, AdamW with warm-up and cosine decay.")
    m.add_argument("--data", type=Path, required=True, help="folder of audio files with captions (only read)")
    m.add_argument("--model", default="facebook/musicgen-small", help="hub id or folder to start from")
    m.add_argument("--out", type=Path, required=True, help="the run folder")
    m.add_argument("--steps", type=int, required=True, help="the run's total number of optimiser steps")
    m.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    m.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    m.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train rank-R LoRA adapters on the attention projections instead of every weight")
    m.add_argument("--batch-size", type=int, default=2, help="clips per micro-batch (per process)")
    m.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    m.add_argument("--segment", type=float, default=10.0, help="seconds of each clip per example (a random crop)")
    m.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    m.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    m.add_argument("--cond-dropout", type=float, default=0.2, help="fraction of rows trained without conditioning")
    m.add_argument("--bf16", action="store_true", help="bf16 autocast")
    m.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory)")
    m.add_argument("--seed", type=int, default=0, help="seed of the data order, crops and dropout")
    m.add_argument("--cache", type=Path, help="folder of the cached codes (default: OUT/cache)")
    m.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    m.add_argument("--distributed", choices=("ddp", "fsdp"), help="under torchrun: DDP or FSDP")
    m.set_defaults(run=_train)
    d = _command(tasks, "ldm", help="MusicLDM's or AudioLDM 2's diffusion UNet (the rest stays frozen)",
                 description="Fine-tune the UNet of a MusicLDM or AudioLDM 2 pipeline on the VAE latents of the "
                             "clips' mels (encoded once, cached in --cache) with the pipeline's noise schedule, "
                             "conditioned as the pipeline is: MusicLDM on each clip's CLAP audio embedding (null: "
                             "the CLAP text embedding of \"\"), AudioLDM 2 on the GPT-2 vectors and Flan-T5 states "
                             "of its caption (null: those of \"\"); the null condition for --cond-dropout of the "
                             "rows. OUT/unet loads with UNet.from_pretrained.")
    d.add_argument("--data", type=Path, required=True, help="folder of audio files with captions (only read)")
    d.add_argument("--model", default="ucsd-reach/musicldm",
                   help="MusicLDM or AudioLDM 2 pipeline: hub id or diffusers folder")
    d.add_argument("--out", type=Path, required=True, help="the run folder")
    d.add_argument("--steps", type=int, required=True, help="the run's total number of optimiser steps")
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    d.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    d.add_argument("--lora", type=int, default=0, metavar="R", help="train rank-R LoRA adapters instead")
    d.add_argument("--batch-size", type=int, default=2, help="clips per micro-batch (per process)")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    d.add_argument("--seconds", type=float, default=10.24, help="seconds of each clip (cut or padded)")
    d.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    d.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    d.add_argument("--cond-dropout", type=float, default=0.1, help="fraction of rows trained without conditioning")
    d.add_argument("--mixup", type=float, default=0.0, metavar="P",
                   help="MusicLDM: fraction of rows that take their clip's beat-synchronous mixture with a clip of "
                        "its tempo group (made once per clip, cached; train/diffusion.py encode_mixtures)")
    d.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what the UNet learns to predict (default: the pipeline scheduler's)")
    d.add_argument("--bf16", action="store_true", help="bf16 autocast")
    d.add_argument("--seed", type=int, default=0, help="seed of the data order, noise, timesteps and dropout")
    d.add_argument("--cache", type=Path, help="folder of the cached latents (default: OUT/cache)")
    d.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    d.add_argument("--distributed", choices=("ddp", "fsdp"), help="under torchrun: DDP or FSDP")
    d.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    seconds = args.segment if args.task == "musicgen" else args.seconds
    if args.save_every < 0 or args.lora < 0 or args.warmup < 0 or not seconds > 0:
        raise UsageError(f"--save-every, --lora and --warmup must be >= 0 and "
                         f"{'--segment' if args.task == 'musicgen' else '--seconds'} > 0")
    data, out = args.data.resolve(), args.out.resolve()
    if out == data or data in out.parents or (args.cache and data in args.cache.resolve().parents):
        raise UsageError(f"--out and --cache must lie outside --data ({args.data}), which is only read")
    from musiclm_core.train import distributed, loop

    rank, _ = distributed.rank_and_world(args.distributed)
    device = _device(args.device)
    config = loop.TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, grad_accum=args.grad_accum,
                              bf16=args.bf16, save_every=args.save_every, seed=args.seed)
    losses = (_train_musicgen if args.task == "musicgen" else _train_ldm)(args, config, device, rank)
    if rank == 0:
        print(f"trained to step {args.steps} (loss {losses[-1]:.4f}) -> {args.out}")
    return 0


def _train_musicgen(args: argparse.Namespace, config, device, rank: int) -> list[float]:
    from musiclm_core.melody import MusicGenMelody
    from musiclm_core.musicgen import MusicGen
    from musiclm_core.train import data as train_data, musicgen as train_musicgen

    pipeline_class = MusicGenMelody if "melody" in _checkpoint_kind(args.model)[1] else MusicGen
    pipeline = train_musicgen.load_for_training(pipeline_class, args.model, args.out, resume=args.resume,
                                                lora_rank=args.lora, device=device)
    clips = train_data.encode_folder(args.data, pipeline, args.cache or args.out / "cache",
                                     chroma=pipeline_class is MusicGenMelody, progress=rank == 0)
    return train_musicgen.train_musicgen(
        pipeline, clips, args.out, config, batch_size=args.batch_size,
        segment_frames=max(1, int(args.segment * pipeline.frame_rate)), cond_dropout=args.cond_dropout,
        lora_rank=args.lora, checkpointing=args.checkpointing, resume=args.resume, distributed=args.distributed,
        progress=True)


def _train_ldm(args: argparse.Namespace, config, device, rank: int) -> list[float]:
    import torch

    from musiclm_core import hub, schedulers
    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.musicldm import MusicLDM
    from musiclm_core.train import diffusion
    from musiclm_core.train.loop import STATE_FILE
    from musiclm_core.unet import UNet

    if not 0.0 <= args.mixup <= 1.0:
        raise UsageError(f"--mixup must be in [0, 1], got {args.mixup}")
    if (args.out / STATE_FILE).is_file() != args.resume:
        raise CLIError(f"{args.out} holds a training run: pass --resume to continue it, or choose another --out"
                       if not args.resume else f"no checkpoint to resume from in {args.out}")
    kind = hub.read_json(hub.resolve(args.model, allow_patterns=["model_index.json"]) / "model_index.json")
    if kind.get("_class_name") == AudioLDM2.pipeline_class:
        if args.mixup:
            raise UsageError("--mixup is MusicLDM's: its UNet is conditioned on the audio (a mixture's CLAP "
                             "embedding); AudioLDM 2's on the caption, which a mixture does not have")
        pipe = AudioLDM2.from_pretrained(args.model)
        frozen = [pipe.vae, pipe.clap, pipe.t5, pipe.projection, pipe.gpt2]
        condition, name = diffusion.audioldm2_text_condition(pipe), "audioldm2-text"
    else:
        pipe = MusicLDM.from_pretrained(args.model)
        frozen = [pipe.vae, pipe.clap]
        condition, name = diffusion.clap_audio_condition(pipe.clap), "clap-audio"
    for part in frozen:
        part.to(device).eval().requires_grad_(False)
    unet = UNet.from_pretrained(args.out / "unet") if args.resume and not args.lora else pipe.unet
    schedule = schedulers.from_config(pipe.scheduler_config).schedule
    cache = args.cache or args.out / "cache"
    frames = max(4, round(args.seconds * 100))
    condition_name = f"{name} {args.model}"
    clips = diffusion.encode_latent_folder(args.data, pipe.vae, cache, condition=condition,
                                           condition_name=condition_name, target_frames=frames, progress=rank == 0)
    mixtures = None
    if args.mixup:  # MusicLDM's beat-synchronous mixup: one mixture per clip, encoded and conditioned as the clips
        mixtures = diffusion.encode_mixtures(args.data, pipe.vae, cache, condition=condition,
                                             condition_name=condition_name, target_frames=frames, seed=args.seed,
                                             progress=rank == 0)
        paired = sum(m is not None for m in mixtures)
        if not paired:
            raise CLIError(f"--mixup: no two clips of {args.data} share a tempo group (BPM // 3, as MusicLDM): "
                           f"nothing to mix")
        if rank == 0:
            print(f"mixup: {paired} of {len(mixtures)} clips have a partner in their tempo group")
    if name == "clap-audio":  # MusicLDM's null condition: the CLAP text embedding of ""
        with torch.no_grad():
            null = {"class_embed": pipe.clap.text_embeds([""])[0].float().cpu()}
    else:
        null = condition(torch.zeros(1, 1), 16000, "")
    return diffusion.train_unet(unet.to(device), schedule, clips, args.out, config,
                                scaling_factor=pipe.vae.scaling_factor, batch_size=args.batch_size,
                                cond_dropout=args.cond_dropout, null_condition=null,
                                prediction_type=args.prediction_type, lora_rank=args.lora, resume=args.resume,
                                distributed=args.distributed, mixtures=mixtures, mixup=args.mixup, progress=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musiclm", description="Text-to-music models and their audio codec.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(subparsers)
    _add_decode(subparsers)
    _add_convert(subparsers)
    _add_generate(subparsers)
    _add_clap(subparsers)
    _add_eval(subparsers)
    _add_train(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns its exit status: 0, 1 (a failure), 2 (a usage error; argparse's own exit with
    SystemExit(2)) or 130 (interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"musiclm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError) as err:  # CheckpointError is a ValueError
        message = " ".join(str(err).split())  # one line: some messages list keys on lines of their own
        if args.command == "generate":
            message = _flag_names(message)
        print(f"musiclm {args.command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
