"""Training data: a folder of audio files with captions, encoded once and cached on disk.

    DIR/a.wav  DIR/a.txt          sidecar captions (the .txt next to each audio file), or
    DIR/captions.jsonl            one {"path": "a.wav", "caption": "..."} per line (paths relative to DIR)

Both may be present: a captions.jsonl entry wins over a sidecar file. Every audio file must have a caption, and
every captions.jsonl path must exist: either is an error naming the file. The source folder is only read.

`encode_folder` turns each clip into EnCodec codes (MusicGen) once and keeps them in a cache folder, one
safetensors file per clip named by a hash of the clip's path, size and modification time and of the codec's
config and weights, so a changed clip or another codec is encoded again and nothing else is.

`MusicGenBatches` draws the batches. Its randomness (clip order, crop offsets, condition dropout) is a function
of (seed, step) alone, so a run that resumes at step n draws exactly what the uninterrupted run drew there: the
data position is the step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
CAPTIONS_FILE = "captions.jsonl"
CACHE_VERSION = "1"


@dataclass
class Clip:
    path: Path      # the audio file
    caption: str


def read_captions(folder: str | os.PathLike) -> list[Clip]:
    """The captioned clips of `folder` (searched recursively), sorted by path; ValueError naming the file for a
    clip without a caption or a bad captions.jsonl line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder {folder} does not exist or is not a folder")
    audio = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    listed: dict[Path, str] = {}
    captions_file = folder / CAPTIONS_FILE
    if captions_file.is_file():
        for number, line in enumerate(captions_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{captions_file} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not JSON ({err.msg})") from err
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                    or not isinstance(entry.get("caption"), str):
                raise ValueError(f"{where} must be an object with string fields 'path' and 'caption', got {line!r}")
            path = (folder / entry["path"]).resolve()
            if not path.is_file():
                raise ValueError(f"{where}: audio file {folder / entry['path']} does not exist")
            if not entry["caption"].strip():
                raise ValueError(f"{where}: the caption of {entry['path']} is empty")
            listed[path] = entry["caption"].strip()
    if not audio and not listed:
        raise ValueError(f"{folder} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    clips = []
    for path in sorted(set(p.resolve() for p in audio) | set(listed)):
        caption = listed.get(path)
        if caption is None:
            sidecar = path.with_suffix(".txt")
            if not sidecar.is_file():
                raise ValueError(f"{path} has no caption: add {sidecar.name} next to it or an entry in "
                                 f"{CAPTIONS_FILE}")
            caption = sidecar.read_text(encoding="utf-8").strip()
            if not caption:
                raise ValueError(f"{sidecar} (the caption of {path.name}) is empty")
        clips.append(Clip(path, caption))
    return clips


def fingerprint(model: torch.nn.Module, config: dict) -> str:
    """A hash of a frozen model's config and weights: cached encodings are only reused with the same model."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def clips_and_cache(folder: str | os.PathLike, cache_dir: str | os.PathLike) -> tuple[Path, list[Clip]]:
    """(the cache folder, made; the captioned clips of `folder`), the cache checked to lie outside the data."""
    folder, cache_dir = Path(folder).resolve(), Path(cache_dir)
    clips = read_captions(folder)
    if cache_dir.resolve() == folder or folder in cache_dir.resolve().parents:
        raise ValueError(f"the cache folder {cache_dir} must lie outside the data folder {folder} (which is only "
                         f"read)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir, clips


def cache_name(path: Path, model_print: str) -> str:
    stat = path.stat()
    key = f"{CACHE_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{model_print}"
    return hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors"


@dataclass
class EncodedClip:
    codes: Tensor                  # (K, T) int64
    caption: str
    chroma: Tensor | None = None   # (F, 12) float one-hot chroma of the whole clip (MusicGen Melody), else None


def encode_folder(folder: str | os.PathLike, pipeline, cache_dir: str | os.PathLike, *, chroma: bool = False,
                  progress: bool = False) -> list[EncodedClip]:
    """Each captioned clip of `folder` as codes of `pipeline` (a MusicGen or MusicGenMelody), from the cache in
    `cache_dir` where present, else encoded and written there. chroma=True also keeps the clip's chroma."""
    from safetensors.torch import load_file, save_file

    from musiclm_core.audio import load_audio
    from musiclm_core.chroma import chroma_features

    cache_dir, clips = clips_and_cache(folder, cache_dir)
    codec_print = fingerprint(pipeline.codec, pipeline.codec.config.to_dict())
    encoded = []
    for i, clip in enumerate(clips):
        cached = cache_dir / cache_name(clip.path, codec_print + ("+chroma" if chroma else ""))
        if cached.is_file():
            tensors = load_file(str(cached))
        else:
            try:
                wav, sr = load_audio(clip.path, sample_rate=pipeline.sample_rate, channels=pipeline.channels)
            except (ValueError, OSError) as err:
                raise ValueError(f"cannot read training audio {clip.path}: {err}") from err
            if wav.shape[-1] == 0:
                raise ValueError(f"training audio {clip.path} is empty")
            with torch.no_grad():
                codes = pipeline.encode_audio(wav[None].to(pipeline.device))[0].cpu()  # (K, T)
            tensors = {"codes": codes}
            if chroma:
                tensors["chroma"] = chroma_features(wav.mean(0, keepdim=True)[None], sr)[0].cpu()  # (F, 12)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")  # ranks may encode the same clip at once
            save_file(tensors, str(tmp))
            os.replace(tmp, cached)  # atomic: an interrupted run leaves no half-written entry
        encoded.append(EncodedClip(tensors["codes"].long(), clip.caption, tensors.get("chroma")))
        if progress:
            print(f"\rencoded {i + 1} / {len(clips)} clips", end="\n" if i + 1 == len(clips) else "", flush=True)
    return encoded


def step_generator(seed: int, step: int, part: int = 0) -> torch.Generator:
    """A generator for one purpose at one step: the draws of step n never depend on the steps before it."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 16 + part)


def clip_indices(seed: int, start: int, count: int, num_clips: int) -> list[int]:
    """Clips at positions start .. start + count - 1 of the run's sequence: one permutation per epoch, drawn from
    (seed, epoch)."""
    out = []
    for position in range(start, start + count):
        epoch, i = divmod(position, num_clips)
        order = torch.randperm(num_clips, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(order[i]))
    return out


@dataclass
class MusicGenBatch:
    codes: Tensor                 # (B, K, T) int64; `special` past the end of a shorter clip
    captions: list[str]
    dropped: Tensor               # (B,) bool: rows whose conditioning is dropped (classifier-free guidance)
    chroma: Tensor | None = None  # (B, F, 12) for MusicGen Melody


class MusicGenBatches:
    """Batches of `batch_size` clips cropped to `segment_frames` frames, for step n and micro-batch m.

    The clips are visited in epochs: a permutation of the clips per epoch drawn from (seed, epoch); the global
    batch of step n, micro-batch m is the next `batch_size * world_size` positions of that sequence, of which
    this process (rank) takes its own `batch_size`. Crop offsets and condition dropout come from (seed, step, m).
    """

    def __init__(self, clips: Sequence[EncodedClip], *, batch_size: int, segment_frames: int, special: int,
                 seed: int = 0, grad_accum: int = 1, cond_dropout: float = 0.0, rank: int = 0, world_size: int = 1,
                 chroma_frames_per_frame: float | None = None):
        if not clips:
            raise ValueError("no training clips")
        if batch_size < 1 or segment_frames < 1 or grad_accum < 1:
            raise ValueError(f"batch_size, segment_frames and grad_accum must be >= 1, got {batch_size}, "
                             f"{segment_frames}, {grad_accum}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        self.clips, self.batch_size, self.segment_frames = list(clips), batch_size, segment_frames
        self.special, self.seed, self.grad_accum, self.cond_dropout = special, seed, grad_accum, cond_dropout
        self.rank, self.world_size = rank, world_size
        self.chroma_frames_per_frame = chroma_frames_per_frame

    def batch(self, step: int, micro: int = 0) -> MusicGenBatch:
        global_rows = self.batch_size * self.world_size
        start = (step * self.grad_accum + micro) * global_rows
        indices = clip_indices(self.seed, start, global_rows, len(self.clips))
        g = step_generator(self.seed, step, micro)
        offsets = torch.rand(global_rows, generator=g)  # crops, drawn for the global batch: same on every rank
        dropped = torch.rand(global_rows, generator=g) < self.cond_dropout
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        codes, captions, chromas = [], [], []
        for index, u in zip(indices[rows], offsets[rows].tolist()):
            clip = self.clips[index]
            K, T = clip.codes.shape
            start_frame = int(u * max(0, T - self.segment_frames + 1))
            piece = clip.codes[:, start_frame: start_frame + self.segment_frames]
            row = piece.new_full((K, self.segment_frames), self.special)
            row[:, : piece.shape[1]] = piece
            codes.append(row)
            captions.append(clip.caption)
            if clip.chroma is not None and self.chroma_frames_per_frame is not None:
                a = int(start_frame * self.chroma_frames_per_frame)
                n = max(1, round(self.segment_frames * self.chroma_frames_per_frame))
                chromas.append(_fit(clip.chroma[a: a + n], n))
        return MusicGenBatch(torch.stack(codes), captions, dropped[rows], torch.stack(chromas) if chromas else None)


def _fit(chroma: Tensor, frames: int) -> Tensor:
    """(F, 12) chroma cut or padded (with its last frame) to `frames` frames."""
    if chroma.shape[0] >= frames:
        return chroma[:frames]
    return torch.cat([chroma, chroma[-1:].expand(frames - chroma.shape[0], -1)], dim=0)
