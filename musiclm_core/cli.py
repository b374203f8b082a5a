"""The `musiclm` command.

    musiclm encode IN.wav OUT.codes --model facebook/encodec_32khz [--bandwidth KBPS] [--overwrite]
    musiclm decode IN.codes OUT.wav [--model M] [--overwrite]
    musiclm convert SRC OUT [--overwrite]

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
import os
import secrets
import sys
from pathlib import Path

import torch

from musiclm_core import hub

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
    else:
        raise CLIError(f"{args.src}: converting a {kind!r} checkpoint ({layout} layout) is not supported yet")
    model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"{args.src} ({layout} {kind}) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="musiclm", description="Text-to-music models and their audio codec.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_encode(subparsers)
    _add_decode(subparsers)
    _add_convert(subparsers)
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
