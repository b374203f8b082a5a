"""The `musiclm` command.

    musiclm encode IN.wav OUT.codes --model facebook/encodec_32khz [--bandwidth KBPS] [--overwrite]
    musiclm decode IN.codes OUT.wav [--model M] [--overwrite]
    musiclm convert SRC OUT [--overwrite]
    musiclm generate "80s pop track with bassy drums and synth" --model facebook/musicgen-small --duration 8 -o out.wav
    musiclm generate --prompts-file prompts.txt --duration 8 -o out.wav      # out_0.wav, out_1.wav, ...

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and one `_<name>(args) -> int`
function that runs it; `build_parser` calls the `_add_*` functions. Errors the user can fix (missing files, bad
input, unusable checkpoints) print one line to stderr and exit with status 1; argparse's usage errors exit with 2.
Outputs are written atomically (a temporary file in the same folder, then a rename) and an existing output is
only replaced with --overwrite.

A codes file is a safetensors file holding `codes` (1, K, T) int64, `scales` (1, chunks) float for codecs that
normalise their input, and text metadata: the codec (`model`), its `sample_rate`, the `bandwidth`, the audio
`channels` and the original `length` in samples at the codec's rate, so `decode` can trim the padding back off.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import time
import warnings
from pathlib import Path

import torch

from musiclm_core import hub
from musiclm_core.kernels.quant import MODES as QUANT_MODES

CODES_FORMAT = "musiclm_core.codes"
CODES_VERSION = "1"


class CLIError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CLIError(f"{path} exists; pass --overwrite to replace it")


def _check_input(path: Path) -> None:
    if not path.exists():
        raise CLIError(f"no such file: {path}")


def save_codes(path: str | os.PathLike, codes: torch.Tensor, scales: torch.Tensor | None,
               metadata: dict[str, str], *, overwrite: bool = False) -> Path:
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


def load_codes(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, str]]:
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
    missing = [k for k in ("model", "sample_rate", "length") if k not in metadata]
    if missing:
        raise CLIError(f"{path}: codes file without {missing} in its metadata")
    return tensors["codes"], tensors.get("scales"), metadata


def _checkpoint_kind(src: str) -> tuple[str, str]:
    """(layout, model kind) of a checkpoint: the kind is the transformers model_type, or what the files say."""
    folder = hub.resolve(src, allow_patterns=["*.json"])  # a hub id: only the configs, to see what it is
    layout = hub.detect_layout(folder)
    if layout == "native":
        return layout, str(hub.read_json(folder / "config.json")[hub.NATIVE_FORMAT].get("model"))
    if layout == "transformers":
        return layout, str(hub.read_json(folder / "config.json").get("model_type"))
    if layout == "audiocraft":
        # The LM (state_dict.bin) and the codec (compression_state_dict.bin) of a MusicGen repo.
        return layout, "musicgen" if (folder / "state_dict.bin").is_file() else "encodec"
    return layout, "unknown"


# ---------------------------------------------------------------------------------------------------------------
# encode


def _add_encode(subparsers) -> None:
    p = subparsers.add_parser("encode", help="audio file -> EnCodec codes file",
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
    metadata = {"model": str(args.model), "sample_rate": str(sample_rate), "bandwidth": str(bandwidth),
                "channels": str(codec.channels), "length": str(wav.shape[-1])}
    save_codes(args.output, codes, scales, metadata, overwrite=args.overwrite)
    K, T = codes.shape[1:]
    print(f"{args.input} -> {args.output}: {K} codebooks x {T} frames at {bandwidth} kbps")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# decode


def _add_decode(subparsers) -> None:
    p = subparsers.add_parser("decode", help="EnCodec codes file -> audio file",
                              description="Decode a codes file written by `musiclm encode` into audio.")
    p.add_argument("input", type=Path, help="codes file")
    p.add_argument("output", type=Path, help="audio file to write (.wav, .flac or .ogg)")
    p.add_argument("--model", default=None, help="codec (default: the one named in the codes file)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(run=_decode)


def _decode(args: argparse.Namespace) -> int:
    from musiclm_core.audio import save_audio
    from musiclm_core.encodec import EnCodec

    codes, scales, metadata = load_codes(args.input)
    _check_output(args.output, args.overwrite)
    codec = EnCodec.from_pretrained(args.model or metadata["model"])
    if int(metadata["sample_rate"]) != codec.sample_rate:
        raise CLIError(f"{args.input} was encoded at {metadata['sample_rate']} Hz, but this codec runs at "
                       f"{codec.sample_rate} Hz: pass the codec it was encoded with (--model)")
    wav = codec.decode(codes, scales)[0, :, : int(metadata["length"])]  # (C, N): the padding trimmed off
    save_audio(args.output, wav, codec.sample_rate, overwrite=args.overwrite)
    print(f"{args.input} -> {args.output}: {wav.shape[-1] / codec.sample_rate:.2f} s, {wav.shape[0]} channel(s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# convert


def _add_convert(subparsers) -> None:
    p = subparsers.add_parser("convert", help="official checkpoint -> native folder",
                              description="Convert a checkpoint (hub id or folder, transformers or audiocraft "
                                          "layout) into the native format (config.json + model.safetensors).")
    p.add_argument("src", help="hub id or folder")
    p.add_argument("out", type=Path, help="native folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
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


# ---------------------------------------------------------------------------------------------------------------
# generate

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="text -> music (MusicGen)",
        description="Generate music from a text prompt, or from each line of --prompts-file, with MusicGen. "
                    "Several prompts give several files, in prompt order: -o out.wav writes out_0.wav, out_1.wav, "
                    "..., and -o FOLDER/ (an existing folder, or a path ending in /) writes FOLDER/0.wav, "
                    "FOLDER/1.wav, ... (from 10 prompts on, the numbers are zero-padded to one width: 00, 01, ...). "
                    "Every output path is checked before the model is loaded: an existing file is only replaced "
                    "with --overwrite.")
    p.add_argument("prompt", nargs="?", help="the text prompt (or --prompts-file)")
    p.add_argument("-o", "--output", required=True,
                   help="audio file to write (.wav, .flac or .ogg), or a folder (see above)")
    p.add_argument("--prompts-file", type=Path, help="UTF-8 text file, one prompt per line; blank lines are skipped")
    p.add_argument("--model", default="facebook/musicgen-small",
                   help="hub id or folder (transformers, audiocraft or native layout)")
    p.add_argument("--duration", type=float, default=8.0,
                   help="seconds of audio per prompt, the --continue audio included (default 8); past 30 s the "
                        "music is extended window by window")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, which is printed)")
    p.add_argument("--guidance-scale", type=float, default=3.0,
                   help="classifier-free guidance scale; 1 or less turns it off (default 3)")
    p.add_argument("--top-k", type=int, default=250, help="sample among the k most likely codes; 0 = off (default 250)")
    p.add_argument("--top-p", type=float, default=0.0,
                   help="sample among the most likely codes that make up this probability; 0 = off (default)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature > 0 (default 1)")
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
                   help="prompts generated together (default 1: each output then depends only on its prompt "
                        "and the seed; larger batches are faster on a GPU)")
    p.add_argument("--normalize", choices=["peak", "loudness", "rms", "none"], default="loudness",
                   help="level of the written audio: loudness -14 LUFS (default, as audiocraft's examples), "
                        "peak -1 dBFS, rms -18 dBFS, or none; samples beyond [-1, 1] are clipped")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="model weights dtype (default float32)")
    p.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="store the LM's linear weights in int8, int4 or bf16 (weight-only; close to, not "
                        "identical with, the float32 results: see benchmarks/RESULTS.md). int8 decodes faster on a "
                        "CPU; int4 (CPU only) faster still and coarser; bf16 halves the weight memory and is faster "
                        "only on CPUs with native bf16 arithmetic")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA devices: replay each decoding step from a CUDA graph (much faster at small batches)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: run the decoding steps through torch.compile'd decoder layers (needs a C++ compiler; "
                        "compiling takes 10-30 s once; int8 / int4 steps are then ~20%% faster, fp32 ones, bound by "
                        "memory, are not)")
    p.set_defaults(run=_generate)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        if args.prompt is None:
            raise CLIError("give a text prompt, or --prompts-file FILE with one prompt per line")
        if not args.prompt.strip():
            raise CLIError("the prompt is empty: describe the music to generate")
        return [args.prompt]
    if args.prompt is not None:
        raise CLIError("give either a prompt or --prompts-file, not both")
    path = args.prompts_file
    _check_input(path)
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
            raise CLIError(f"cannot tell the audio format of {p}: use one of the extensions {sorted(AUDIO_FORMATS)}")
        _check_output(p, overwrite)
    return paths


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


class Progress:
    """A `progress(done, total)` callback that draws one line on a terminal: bar, frames, rate, time left.

    Nothing is drawn when the stream is not a terminal (a log file would collect every redraw).
    """

    def __init__(self, label: str, stream=None, width: int = 30):
        self.stream = sys.stderr if stream is None else stream
        self.label, self.width = label, width
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self.drawn = 0  # length of the line on screen, to blank what a shorter line leaves

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(total, 1)
        rate = done / max(time.monotonic() - self.start, 1e-6)
        left = f"{(total - done) / rate:.0f} s left" if rate > 0 else ""
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} frames, "
                f"{rate:.1f} frames/s, {left}")
        self.stream.write("\r" + line.ljust(self.drawn) + ("\n" if done >= total else ""))
        self.stream.flush()
        self.drawn = len(line)


def _generate(args: argparse.Namespace) -> int:
    from musiclm_core import generate as gen
    from musiclm_core.audio import load_audio, save_audio
    from musiclm_core.musicgen import MusicGen

    # Everything that can be checked without the model first: loading it takes a while.
    prompts = _read_prompts(args)
    if not math.isfinite(args.duration) or args.duration <= 0:
        raise CLIError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.normalize == "loudness" and args.duration < 0.4:
        # BS.1770 loudness is measured over 400 ms blocks: refuse now rather than after generating.
        raise CLIError(f"--normalize loudness needs at least 0.4 s of audio (--duration {args.duration}); use "
                       f"--normalize peak, rms or none")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    gen.check_sampling(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, do_sample=not args.greedy)
    paths = _output_paths(args.output, len(prompts), args.overwrite)
    if args.continue_from is not None:
        _check_input(args.continue_from)
    if args.melody is not None:
        _check_input(args.melody)
    device, dtype = _device(args.device), _DTYPES[args.dtype]
    if args.cuda_graph and device.type != "cuda":
        raise CLIError(f"--cuda-graph needs a CUDA device, the model would run on {device}")
    if args.compile and device.type != "cpu":
        raise CLIError(f"--compile is for CPU decoding, the model would run on {device} (on CUDA: --cuda-graph)")

    pipeline = MusicGen
    if _checkpoint_kind(args.model)[1] == "musicgen_melody":  # the same generate, plus melody=
        from musiclm_core.melody import MusicGenMelody

        pipeline = MusicGenMelody
        if args.continue_from is not None:
            raise CLIError("--continue is not supported by MusicGen Melody checkpoints")
    elif args.melody is not None:
        raise CLIError(f"--melody needs a MusicGen Melody checkpoint; {args.model} is not one")
    model = pipeline.from_pretrained(args.model, dtype=dtype, quantize=args.quantize).to(device)
    if args.compile:
        model.lm.compile_decode()
    conditioning = {}  # inputs besides the text, the same for every prompt: (C, N) audio at the model's rate
    if args.melody is not None:
        melody, melody_rate = load_audio(args.melody)  # as it is: the chroma mixes it down and resamples it
        conditioning["melody"] = melody.to(device)
    if args.continue_from is not None:
        wav, _ = load_audio(args.continue_from, sample_rate=model.sample_rate, channels=model.channels)
        conditioning["prompt_audio"] = wav.to(device=device, dtype=dtype)
    seed = args.seed
    if seed is None:
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
            with warnings.catch_warnings(record=True) as caught:  # clipping is reported in one line
                warnings.simplefilter("always")
                save_audio(path, wav.float().cpu(), model.sample_rate,
                           normalize=None if args.normalize == "none" else args.normalize, overwrite=args.overwrite)
            for warning in caught:
                print(f"musiclm generate: warning: {warning.message}", file=sys.stderr)
            print(f"{path}: {wav.shape[-1] / model.sample_rate:.2f} s, {wav.shape[0]} channel(s) at "
                  f"{model.sample_rate} Hz")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musiclm", description="Text-to-music models and their audio codec.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(subparsers)
    _add_decode(subparsers)
    _add_convert(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, hub.CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"musiclm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
