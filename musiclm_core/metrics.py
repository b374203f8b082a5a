"""Evaluation of generated music: Fréchet audio distance (FAD) on CLAP, EnCodec or VGGish embeddings, CLAP score,
and the melody chroma cosine similarity (the KL divergence on PaSST's labels is in passt.py).

    audio files -> embeddings (n, D) per file -> pooled mean (D,) and covariance (D, D), float64
    FAD = |mu_g - mu_r|^2 + tr(S_g) + tr(S_r) - 2 tr((S_g S_r)^(1/2))        (Fréchet distance of two Gaussians)
    CLAP score = mean over generated files of cos(text_embeds(caption), audio_embeds(clip))   (MusicLDM, §4.1)
    chroma cosine = sum over (generated, melody) pairs and frames of cos(chroma_g, chroma_m) / frames  (MusicGen)

VGGish (`vggish.VGGishEmbedding`, the embedding of the original FAD and of the MusicGen paper) has the same
protocol as the two embeddings here; vggish.py says how each FAD tool cuts clips into its examples.

Embeddings follow fadtk (Gui et al. 2024, "Adapting Fréchet Audio Distance for Generative Music Evaluation";
microsoft/fadtk `fadtk/model_loader.py`), which recommends CLAP-music and EnCodec for music:

* `EnCodecEmbedding`: the continuous output of the EnCodec encoder before quantisation, one D = 128 vector per
  frame (75 per second at 24 kHz), audio converted to the codec's rate and channels. As fadtk, the encoder is
  called directly: no loudness normalisation, and a chunked codec (48 kHz) is run on back-to-back 1 s chunks.
* `ClapEmbedding`: the CLAP audio tower (D = 512) on 10 s windows every `hop_s` seconds (fadtk: 1 s). A clip of
  10 s or less is one window, filled as CLAP fills it (repeat-pad); fadtk zero-pads windows that run past the
  end, which embeds mostly silence for the last windows of every clip: here the windows end at the clip's end.
  fadtk also rounds the audio to 16 bits first; 16-bit PCM files (what `musiclm generate` writes) are already.

The statistics pool the frames or windows of all files (as fadtk does), so FAD needs at least D + 1 embeddings
in each set for a full-rank covariance (`check_count` says how many more). A reference folder's statistics are
computed once and cached (`reference_stats`), keyed by the folder, the embedding model and a fingerprint of the
files (names, sizes, modification times): a changed folder is recomputed.

Conventions, against the two packages people compute FAD with (fadtk 1.1.0 `fad.py` / `utils.py` /
`model_loader.py`; frechet-audio-distance 0.3.4 `fad.py` / `utils.py`); tests/parity/test_metrics_parity.py holds
our Fréchet distance to both at 1e-6 relative on the same embeddings (measured 1e-13 to 6e-12):

* Resampling: both use resampy's "kaiser_best" filter (fadtk through torchaudio's sinc_interp_kaiser: cutoff
  0.9476 of the lower Nyquist frequency, 64 zero crossings, Kaiser beta 14.77; frechet-audio-distance through
  resampy itself). We take its cutoff and length (FAD_ROLLOFF, FAD_ZEROS) with `audio.resample`'s Kaiser window
  (beta 10: it has no beta setting): on white noise 48 -> 16 kHz that is 1 % RMS from theirs, all of it at the
  band edge, where our default filter (cutoff 0.90) was 16 %, and would cut VGGish's top mel band (to 7.5 kHz)
  at 7.2 kHz. Channels are averaged to mono before (all three). fadtk then rounds the audio to 16-bit PCM (it
  caches a .wav); we do not (a change of ~1.5e-5 in each sample). audiocraft's FAD (VGGish through Google's
  tool, the MusicGen paper's) resamples with julius instead (Hann sinc, cutoff 0.945, 24 zero crossings, edges
  repeated): one filter for every embedding here, the FAD packages', is the choice; passt.py follows julius for
  the KL metric, where audiocraft is the only reference.
* Covariance: ddof 1 (numpy's np.cov) in all three; fadtk merges per-file statistics with Chan's update as
  `StatsAccumulator` does, frechet-audio-distance concatenates the embeddings first.
* Precision: fadtk caches embeddings in float16 and takes each file's mean in float16, which moved FAD by 3e-6 to
  2e-5 relative in our measurements (random sets, D = 32 to 512); frechet-audio-distance keeps float32 embeddings
  and takes the mean in float32. We keep the models' float32 output and compute every statistic in float64 (a
  float32 mean keeps about 7 significant digits, float64 about 16).
* The square root: fadtk takes tr((cov1 cov2)^(1/2)) from `scipy.linalg.eig` of the non-symmetric product,
  frechet-audio-distance from `scipy.linalg.sqrtm` of it in complex arithmetic; both add eps = 1e-6 to both
  diagonals only when that is not finite, and drop an imaginary part below 1e-3. We use the symmetric form (see
  `frechet_distance`), which needs no eps; on full-rank covariances the three agree to round-off.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from musiclm_core.audio import _FORMATS as AUDIO_FORMATS, load_audio

STATS_FORMAT = "musiclm_core.fad_stats"
STATS_VERSION = "2"  # 2: audio resampled with FAD_ROLLOFF / FAD_ZEROS; statistics of another version are stale
# resampy's "kaiser_best" cutoff (a fraction of the lower Nyquist frequency) and zero crossings: see the docstring
FAD_ROLLOFF = 0.9475937167399596
FAD_ZEROS = 64


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition; eigenvalues that
    round-off made slightly negative are taken as 0."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64:

        |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))

    The trace of the square root is taken as tr((A cov2 A)^(1/2)) with A = cov1^(1/2): cov1 cov2 = A (A cov2 A)
    A^-1 is similar to A cov2 A, so both have the same eigenvalues, and A cov2 A is symmetric positive
    semi-definite, whose square root `eigh` gives with real, non-negative eigenvalues. The route of pytorch-fid and
    fadtk, `scipy.linalg.sqrtm(cov1 @ cov2)` on the non-symmetric product, returns complex parts from round-off
    and fails on singular covariances (they add eps to the diagonals and drop the imaginary part); this one does
    not. The result is clipped at 0 (round-off can make it -1e-12).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    D = mu1.shape[-1]
    if mu1.shape != (D,) or mu2.shape != (D,) or cov1.shape != (D, D) or cov2.shape != (D, D):
        raise ValueError(f"expected means (D,) and covariances (D, D) of one D, got {mu1.shape}, {cov1.shape}, "
                         f"{mu2.shape}, {cov2.shape}")
    root1 = _psd_sqrt((cov1 + cov1.T) / 2)
    middle = root1 @ cov2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt), 0.0)


@dataclass
class EmbeddingStats:
    """Mean (D,) and covariance (D, D, ddof 1) of `count` embeddings, float64; `embedding` names the model
    that made them (`Embedding.name`); `fingerprint` the files they came from ("" when not from files)."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    embedding: str
    fingerprint: str = ""

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def from_embeddings(cls, x: np.ndarray | Tensor, embedding: str) -> "EmbeddingStats":
        acc = StatsAccumulator()
        acc.add(x)
        return acc.stats(embedding)

    def save(self, path: str | os.PathLike, *, source: str = "") -> None:
        """A safetensors file (mean, cov as float64; the rest as metadata), written atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        metadata = {"format": STATS_FORMAT, "version": STATS_VERSION, "count": str(self.count),
                    "embedding": self.embedding, "fingerprint": self.fingerprint, "source": source}
        try:
            save_file({"mean": self.mean, "cov": self.cov}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                mean, cov = f.get_tensor("mean"), f.get_tensor("cov")
        except Exception as err:  # SafetensorError, a missing key, OSError
            raise ValueError(f"{path} is not an embedding statistics file ({type(err).__name__}: {err})") from err
        if meta.get("format") != STATS_FORMAT or not meta.get("count", "").isdigit():
            raise ValueError(f"{path} is not an embedding statistics file (format {meta.get('format')!r})")
        if meta.get("version") != STATS_VERSION:
            raise ValueError(f"{path} holds statistics of version {meta.get('version')!r} (this is "
                             f"{STATS_VERSION!r}: audio loaded another way); compute them again")
        D = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or cov.shape != (D, D):
            raise ValueError(f"{path}: mean {mean.shape} and cov {cov.shape} are not (D,) and (D, D)")
        return cls(mean.astype(np.float64), cov.astype(np.float64), int(meta["count"]), meta.get("embedding", ""),
                   meta.get("fingerprint", ""))


class StatsAccumulator:
    """Mean and covariance of embeddings added a batch at a time, in float64, merged with Chan et al.'s pairwise
    update (no sum of squares: it loses the covariance to cancellation when the mean is large)."""

    def __init__(self):
        self.count, self.mean, self.scatter = 0, None, None  # scatter: sum of (x - mean)(x - mean)^T

    def add(self, x: np.ndarray | Tensor) -> None:
        x = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"embeddings must be (n, D) with n >= 1, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"embeddings hold {int((~np.isfinite(x)).sum())} NaN or infinite value(s)")
        n, mean = x.shape[0], x.mean(0)
        centred = x - mean
        scatter = centred.T @ centred  # (D, D)
        if self.count == 0:
            self.count, self.mean, self.scatter = n, mean, scatter
            return
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"embeddings of dimension {x.shape[1]} added to statistics of dimension "
                             f"{self.mean.shape[0]}")
        total = self.count + n
        delta = mean - self.mean
        self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def stats(self, embedding: str, fingerprint: str = "") -> EmbeddingStats:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 embeddings, got {self.count}")
        return EmbeddingStats(self.mean, self.scatter / (self.count - 1), self.count, embedding, fingerprint)


def check_count(count: int, dim: int, *, what: str, files: int) -> None:
    """ValueError unless `count` embeddings (from `files` files) are enough for a full-rank (dim, dim) covariance:
    dim + 1 at least. Fewer leave it singular, and FAD then measures the sample size more than the audio."""
    if count > dim:
        return
    per_file = count / max(files, 1)
    more = math.ceil((dim + 1 - count) / per_file) if per_file > 0 else dim + 1
    raise ValueError(f"{what}: {count} embeddings from {files} file(s), but a covariance of {dim}-dimensional "
                     f"embeddings needs at least {dim + 1}: add about {more} more file(s) of this length")


def fad(generated: EmbeddingStats, reference: EmbeddingStats) -> float:
    """FAD between two sets' statistics, which must come from the same embedding."""
    if generated.embedding != reference.embedding or generated.dim != reference.dim:
        raise ValueError(f"statistics of different embeddings: {generated.embedding} ({generated.dim}-dim) vs "
                         f"{reference.embedding} ({reference.dim}-dim)")
    return frechet_distance(generated.mean, generated.cov, reference.mean, reference.cov)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings


class EnCodecEmbedding:
    """Frame embeddings of the EnCodec encoder (fadtk's `encodec-emb`): (C, N) audio at the codec's rate ->
    (T, D) float32, T = ceil(N / hop) (summed over 1 s chunks for a chunked codec)."""

    kind = "encodec"

    def __init__(self, codec, model: str):
        self.codec = codec.eval()
        self.name = f"encodec:{model}"
        self.dim = codec.config.dimension
        self.sample_rate, self.channels = codec.sample_rate, codec.channels

    @torch.inference_mode()
    def __call__(self, wav: Tensor) -> Tensor:
        C, N = wav.shape
        length = self.codec.config.chunk_length or N  # fadtk: back-to-back segments, no overlap
        param = next(self.codec.parameters())
        frames = [self.codec.encoder(wav[None, :, i: i + length].to(param))[0] for i in range(0, N, length)]
        return torch.cat(frames, dim=-1).T.float().cpu()  # (T, D)


class ClapEmbedding:
    """CLAP audio-tower embeddings of 10 s windows `hop_s` apart (fadtk's `clap-laion-music` with hop 1 s):
    (1, N) audio at 48 kHz -> (windows, D) float32, L2-normalised. The windows end at the clip's end (the last
    one is moved back to end there); a clip of 10 s or less is one window, repeat-padded by CLAP."""

    kind = "clap"

    def __init__(self, clap, model: str, hop_s: float = 1.0):
        if not hop_s > 0:
            raise ValueError(f"hop_s must be a positive number of seconds, got {hop_s}")
        self.clap = clap.eval()
        self.name = f"clap:{model}"
        self.dim = clap.config.projection_dim
        self.sample_rate, self.channels = clap.config.sample_rate, 1
        self.window = clap.config.max_samples
        self.hop = max(1, round(hop_s * self.sample_rate))

    def windows(self, wav: Tensor) -> list[Tensor]:
        clip = wav[0]  # (N,)
        N = clip.shape[-1]
        if N <= self.window:
            return [clip]
        starts = list(range(0, N - self.window + 1, self.hop))
        if starts[-1] != N - self.window:
            starts.append(N - self.window)
        return [clip[s: s + self.window] for s in starts]

    def __call__(self, wav: Tensor) -> Tensor:
        return self.clap.audio_embeds(self.windows(wav), self.sample_rate).float().cpu()  # (windows, D)


def audio_files(folder: str | os.PathLike, *, what: str = "folder") -> list[Path]:
    """The audio files (.wav, .flac, .ogg) under `folder`, recursively, sorted; an error if there are none.
    Hidden files (a temporary file of an unfinished write) are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_FORMATS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{what} {folder} holds no audio file ({', '.join(sorted(AUDIO_FORMATS))})")
    return files


def load_for(embedding, path: Path) -> Tensor:
    """(C, N) audio of `path` at the embedding's rate and channels (resampled with the FAD packages' cutoff and
    filter length, see the module docstring); an unreadable or empty file is an error naming it."""
    from musiclm_core.audio import resample

    wav, rate = load_audio(path, channels=embedding.channels)
    if wav.shape[-1] == 0:
        raise ValueError(f"{path} holds no audio (0 samples)")
    if rate != embedding.sample_rate:
        wav = resample(wav, rate, embedding.sample_rate, rolloff=FAD_ROLLOFF, zeros=FAD_ZEROS)
    return wav


def embed_file(embedding, path: Path, wav: Tensor | None = None) -> Tensor:
    """(n, D) embeddings of one file; errors from the model name the file."""
    wav = load_for(embedding, path) if wav is None else wav
    try:
        return embedding(wav)
    except (ValueError, RuntimeError) as err:  # RuntimeError: torch on a clip too short for a convolution
        raise ValueError(f"{path}: {err}") from err


def files_fingerprint(folder: Path, files: Sequence[Path]) -> str:
    """16 hex digits of the SHA-256 of each file's relative path, size and modification time: what changes when
    a file is added, removed, renamed or rewritten."""
    digest = hashlib.sha256()
    for path in files:
        info = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def model_reference(name: str) -> str:
    """What names an embedding model in cached statistics: a hub id as given, or a folder's absolute path plus
    the fingerprint of its files (retrained weights in the same folder are another model)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return f"{folder.resolve()}@{files_fingerprint(folder, files)}"


def folder_stats(folder: str | os.PathLike, embedding, *, what: str = "folder",
                 progress: Callable[[int, int], None] | None = None) -> EmbeddingStats:
    """Statistics of every audio file under `folder`, not cached."""
    folder = Path(folder)
    files = audio_files(folder, what=what)
    acc = StatsAccumulator()
    for i, path in enumerate(files):
        acc.add(embed_file(embedding, path))
        if progress is not None:
            progress(i + 1, len(files))
    check_count(acc.count, embedding.dim, what=f"{what} {folder}", files=len(files))
    return acc.stats(embedding.name, files_fingerprint(folder, files))


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "musiclm_core" / "fad_stats"


def reference_stats(folder: str | os.PathLike, embedding, *, cache_dir: str | os.PathLike | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[EmbeddingStats, bool]:
    """(statistics of `folder`, whether they came from the cache). The cache file is named by the folder's
    absolute path and the embedding; it is used only while the files' fingerprint is unchanged, and rewritten
    otherwise."""
    folder = Path(folder).resolve()
    files = audio_files(folder, what="reference folder")
    fingerprint = files_fingerprint(folder, files)
    key = hashlib.sha256(json.dumps([str(folder), embedding.name]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"{embedding.kind}-{key}.safetensors"
    if path.is_file():
        try:
            cached = EmbeddingStats.load(path)
        except ValueError:
            cached = None  # unreadable: recompute and replace it
        if cached is not None and cached.fingerprint == fingerprint and cached.embedding == embedding.name:
            return cached, True
    stats = folder_stats(folder, embedding, what="reference folder", progress=progress)
    stats.save(path, source=str(folder))
    return stats, False


# ---------------------------------------------------------------------------------------------------------------
# Captions and CLAP score


def jsonl_records(path: str | os.PathLike, what: str):
    """(line number, object) of each non-blank line of a JSON-lines file; a line that is not a JSON object is
    an error naming `what` (e.g. "--prompts x.jsonl") and the line."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} line {number} is not JSON ({err})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{what} line {number}: expected a JSON object, got {line.strip()[:100]}")
        yield number, record


def read_captions(folder: str | os.PathLike, files: Sequence[Path],
                  captions: str | os.PathLike | None = None) -> dict[Path, str] | None:
    """The caption of each of `files` (under `folder`): from `captions`, a JSON-lines file of {"path", "caption"}
    (paths relative to the captions file's folder, or absolute), by default `folder/captions.jsonl` where there is
    one (the training data layout), or else from a sidecar `.txt` next to each file (`a.wav` -> `a.txt`). None
    when there is no captions file and no sidecar at all. Captions that do not match the files (a file without
    one, a line naming no file of the folder, a path twice) are an error naming them."""
    files = [Path(f).resolve() for f in files]
    if captions is None and (Path(folder) / "captions.jsonl").is_file():
        captions = Path(folder) / "captions.jsonl"
    if captions is None:
        found = {f: f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()}
        if not found:
            return None
        missing = [f for f in files if f not in found]
        if missing:
            raise ValueError(f"{len(missing)} of {len(files)} audio files in {folder} have no caption file "
                             f"(.txt next to them): {', '.join(str(m) for m in missing[:5])}")
        texts = {f: found[f].read_text(encoding="utf-8").strip() for f in files}
        empty = [str(found[f]) for f, t in texts.items() if not t]
        if empty:
            raise ValueError(f"empty caption file(s): {', '.join(empty[:5])}")
        return texts
    captions = Path(captions)
    texts: dict[Path, str] = {}
    wanted = set(files)
    for number, record in jsonl_records(captions, str(captions)):
        if not isinstance(record.get("path"), str) or not isinstance(record.get("caption"), str) \
                or not record["caption"].strip():
            raise ValueError(f'{captions} line {number}: expected {{"path": ..., "caption": ...}} with a '
                             f"non-empty caption, got {json.dumps(record)[:100]}")
        path = (captions.parent / record["path"]).resolve()
        if path not in wanted:
            raise ValueError(f"{captions} line {number}: {record['path']} is not an audio file of {folder}")
        if path in texts:
            raise ValueError(f"{captions} line {number}: {record['path']} has a caption already")
        texts[path] = record["caption"].strip()
    missing = [f for f in files if f not in texts]
    if missing:
        raise ValueError(f"{captions} has no caption for {len(missing)} of the {len(files)} audio files in "
                         f"{folder}: {', '.join(str(m) for m in missing[:5])}")
    return texts


def clap_scores(clap, captions: Sequence[str], audio_embeds: Tensor, *, batch_size: int = 32) -> Tensor:
    """(B,) cosine similarity of each caption with its clip's (B, D) L2-normalised CLAP audio embedding: the
    per-sample CLAP score (their mean is the set's)."""
    if len(captions) != audio_embeds.shape[0]:
        raise ValueError(f"{len(captions)} captions for {audio_embeds.shape[0]} audio embeddings")
    text = torch.cat([clap.text_embeds(list(captions[i: i + batch_size]))
                      for i in range(0, len(captions), batch_size)])  # (B, D)
    return (text.float().cpu() * audio_embeds.float()).sum(-1)


def generated_stats(folder: str | os.PathLike, files: Sequence[Path], embedding, *, clap=None,
                    captions: dict[Path, str] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[EmbeddingStats, Tensor | None]:
    """(statistics of `files`, their (B,) CLAP scores or None). With `captions` (keyed by resolved path) and a
    `clap`, each file's score is its caption against CLAP's embedding of the whole clip (`CLAP.audio_embeds`,
    which crops a clip longer than 10 s at a start drawn from seed 0); for a clip of 10 s or less that is its
    one `ClapEmbedding` window, reused rather than computed twice."""
    acc, audio = StatsAccumulator(), []
    for i, path in enumerate(files):
        wav = load_for(embedding, path)
        embeds = embed_file(embedding, path, wav)
        acc.add(embeds)
        if captions is not None:
            if isinstance(embedding, ClapEmbedding) and embeds.shape[0] == 1:
                audio.append(embeds[0])
            else:
                mono, rate = load_audio(path, channels=1)  # (1, N)
                audio.append(clap.audio_embeds(mono, rate)[0].float().cpu())
        if progress is not None:
            progress(i + 1, len(files))
    check_count(acc.count, embedding.dim, what=f"generated folder {folder}", files=len(files))
    stats = acc.stats(embedding.name, files_fingerprint(Path(folder), files))
    if captions is None:
        return stats, None
    texts = [captions[Path(f).resolve()] for f in files]
    return stats, clap_scores(clap, texts, torch.stack(audio))


# ---------------------------------------------------------------------------------------------------------------
# Melody: chroma cosine similarity

CHROMA_EPS = 1e-8  # audiocraft's ChromaCosineSimilarityMetric: the eps of F.cosine_similarity


def _mono_32k(wav: Tensor, sample_rate: int) -> Tensor:
    """(C, N) or (N,) float audio -> (N', ) mono float32 at chroma.SAMPLE_RATE.

    The resampling filter is chroma.py's (torchaudio's Hann sinc, rolloff 0.945, 24 zero crossings: what MusicGen
    Melody's conditioning uses, and what transformers uses). audiocraft's metric calls julius.resample_frac with
    the same sinc parameters, but julius repeats the edge samples where torchaudio pads with zeros and rounds the
    output length down where torchaudio rounds it up: the two agree to ~2e-5 in the interior and differ in the
    first and last ~24 input samples (and by one output sample in length for some lengths). At 32 kHz, MusicGen's
    own rate and the only one audiocraft evaluates at, neither resamples and the metric is identical.
    Downmix first, then resample, as chroma.py (both are linear; audiocraft resamples first: round-off only).
    """
    from musiclm_core import chroma
    from musiclm_core.audio import resample

    wav = torch.as_tensor(wav)
    if wav.dim() not in (1, 2) or wav.shape[-1] == 0 or not wav.is_floating_point():
        raise ValueError(f"expected (C, N) or (N,) float audio with N >= 1, got {tuple(wav.shape)} {wav.dtype}")
    mono = (wav.mean(0) if wav.dim() == 2 else wav).float()  # (N,)
    if sample_rate != chroma.SAMPLE_RATE:
        mono = resample(mono, sample_rate, chroma.SAMPLE_RATE, window="hann", rolloff=0.945, zeros=24)
    return mono


def melody_chroma(wav: Tensor, sample_rate: int) -> Tensor:
    """One-hot chroma of a clip of any length: (C, N) or (N,) audio -> (1 + N32 // 4096, 12) float32, N32 its
    length at 32 kHz: chroma.py's `chroma_features` (MusicGen Melody's melody features, = audiocraft's
    ChromaExtractor with argmax), without its 30 s limit (a conditioning rule, not the metric's).

    A clip longer than 30 s is computed in overlapping 30 s pieces of `chroma.normalized_chroma`, each keeping
    only the frames whose 16384-sample window lies inside it (or whose padding is the clip's own, at its start
    and end): each kept frame is the same STFT frame of the same samples as in one STFT of the whole clip.
    Argmax ties (two classes with exactly the largest energy; a silent frame, all zero) go to the first class,
    as torch.argmax and the reference.
    """
    from musiclm_core import chroma

    x = _mono_32k(wav, sample_rate)  # (N,)
    N, hop, half, longest = x.shape[0], chroma.HOP_LENGTH, chroma.N_FFT // 2, chroma.MAX_SAMPLES
    lo = -(-half // hop)  # first frame of a piece whose window starts inside it
    step = (longest - half) // hop + 1 - lo  # the next piece's frame `lo` follows this piece's last kept frame
    last_start = max(0, -(-(N - longest) // hop))  # the last piece ends at the clip's end
    with warnings.catch_warnings():
        # chroma.py warns that a silent melody conditions like no melody; a silent clip is just a score here
        warnings.filterwarnings("ignore", message=".*is silent")
        if N <= longest:  # one piece (a clip under 16384 samples is zero-padded to 5 frames, as the reference)
            out = chroma.normalized_chroma(x, chroma.SAMPLE_RATE)[0]  # (T, 12)
            return torch.nn.functional.one_hot(out.argmax(-1), chroma.N_CHROMA).float()
        out = x.new_empty(1 + N // hop, chroma.N_CHROMA)  # (T, 12)
        for start in [*range(0, last_start, step), last_start]:
            piece = x[start * hop: start * hop + longest]
            norm = chroma.normalized_chroma(piece, chroma.SAMPLE_RATE)[0]  # (1 + len // hop, 12)
            first = 0 if start == 0 else lo
            last = norm.shape[0] - 1 if start == last_start else (piece.shape[0] - half) // hop
            out[start + first: start + last + 1] = norm[first: last + 1]
    return torch.nn.functional.one_hot(out.argmax(-1), chroma.N_CHROMA).float()  # (T, 12)


class ChromaCosineSimilarity:
    """Melody adherence (MusicGen, Copet et al. 2023, §4.3): the cosine similarity of the chroma of each
    generated clip with the chroma of the melody it was conditioned on, frame by frame, averaged over all frames
    of the set: audiocraft's `ChromaCosineSimilarityMetric` with MusicGen's solver config (sample rate 32000,
    12 classes, 2^14-sample window, hop 4096, argmax one-hot).

    Each pair contributes the frames of the reference's length, ceil(N32 / 4096) for N32 samples at 32 kHz (the
    STFT has one frame more when N32 is a multiple of 4096; audiocraft drops it too). The generated clip is cut or
    zero-padded to the reference's length first, as audiocraft's batch collation pads a clip with zeros. Where
    the reference is not at 32 kHz, audiocraft divides its length at the input rate by the 32 kHz hop, a frame
    count in the wrong unit; here the length is taken at 32 kHz. Sums are in float64 (audiocraft: float32, exact
    for integer sums below 2^24 frames; its final division is in float32, ~6e-8 relative from ours).

        metric = ChromaCosineSimilarity()
        metric.add(generated, 32000, melody, 44100)   # -> this pair's mean similarity
        metric.compute()                              # -> the set's: sum over pairs / total frames
    """

    def __init__(self):
        self.cosine_sum, self.frames, self.pairs = 0.0, 0, 0

    def add(self, generated: Tensor, generated_rate: int, reference: Tensor, reference_rate: int) -> float:
        """Add one pair ((C, N) or (N,) float audio each, at their rates); returns the pair's mean similarity."""
        from musiclm_core import chroma

        ref = _mono_32k(reference, reference_rate)  # (N,)
        gen = _mono_32k(generated, generated_rate)  # (N_g,)
        N = ref.shape[0]
        gen = torch.nn.functional.pad(gen[:N], (0, max(0, N - gen.shape[0])))  # (N,)
        T = -(-N // chroma.HOP_LENGTH)  # ceil(N / hop) frames of the reference's length
        cosine = torch.nn.functional.cosine_similarity(melody_chroma(ref, chroma.SAMPLE_RATE)[:T],
                                                       melody_chroma(gen, chroma.SAMPLE_RATE)[:T], dim=1,
                                                       eps=CHROMA_EPS)  # (T,)
        total = float(cosine.double().sum())
        self.cosine_sum += total
        self.frames += T
        self.pairs += 1
        return total / T

    def compute(self) -> float:
        if self.frames == 0:
            raise ValueError("no clip pair was added: the chroma cosine similarity of an empty set is undefined")
        return self.cosine_sum / self.frames


# ---------------------------------------------------------------------------------------------------------------
# Paired metrics: each generated file against the file of the same name in another folder


def pair_files(generated_folder: str | os.PathLike, generated: Sequence[Path], folder: str | os.PathLike, *,
               what: str) -> list[tuple[Path, Path]]:
    """(generated file, its partner) for each of `generated` (files under `generated_folder`), the partner being
    the audio file under `folder` at the same relative path without extension (`a/b.wav` <-> `a/b.flac`), in the
    order of `generated`. A file on either side without a partner, or two files of one name on one side
    (`a.wav` and `a.flac`), is an error naming them; `what` names the folder's flag ("--reference")."""
    def by_name(root: Path, files: Sequence[Path], side: str) -> dict[str, Path]:
        named: dict[str, Path] = {}
        for path in files:
            name = Path(path).relative_to(root).with_suffix("").as_posix()
            if name in named:
                raise ValueError(f"{side}: {named[name]} and {path} have one name without extension; files are "
                                 f"paired by name, so keep one of them")
            named[name] = Path(path)
        return named

    generated_folder, folder = Path(generated_folder), Path(folder)
    ours = by_name(generated_folder, generated, f"--generated {generated_folder}")
    theirs = by_name(folder, audio_files(folder, what=what), f"{what} {folder}")
    alone = [str(ours[n]) for n in ours if n not in theirs]
    if alone:
        raise ValueError(f"{len(alone)} generated file(s) have no file of the same name (relative path without "
                         f"extension) in {what} {folder}: {', '.join(alone[:5])}")
    alone = [str(theirs[n]) for n in theirs if n not in ours]
    if alone:
        raise ValueError(f"{len(alone)} file(s) of {what} {folder} have no generated file of the same name "
                         f"(relative path without extension) in {generated_folder}: {', '.join(alone[:5])}")
    return [(ours[n], theirs[n]) for n in ours]


def check_durations(paths: Sequence[Path], min_seconds: float, *, what: str) -> None:
    """ValueError naming the first of `paths` that is not longer than `min_seconds`, from the files' headers
    (nothing is decoded: this runs before the models do). Unreadable files are left to the loader's error."""
    import soundfile as sf

    for path in paths:
        try:
            info = sf.info(str(path))
        except Exception:  # soundfile's LibsndfileError / RuntimeError: load_audio names the file later
            continue
        if info.frames / info.samplerate <= min_seconds:
            raise ValueError(f"{path} is {info.frames / info.samplerate:.3f} s long; {what} needs more than "
                             f"{min_seconds} s")


def _load_native(path: Path) -> tuple[Tensor, int]:
    wav, rate = load_audio(path)
    if wav.shape[-1] == 0:
        raise ValueError(f"{path} holds no audio (0 samples)")
    return wav, rate


def melody_similarity(pairs: Sequence[tuple[Path, Path]], *,
                      progress: Callable[[int, int], None] | None = None) -> tuple[ChromaCosineSimilarity,
                                                                                    list[float]]:
    """(the set's ChromaCosineSimilarity, each pair's mean similarity) of (generated, melody) file pairs."""
    metric, values = ChromaCosineSimilarity(), []
    for i, (generated, melody) in enumerate(pairs):
        gen, gen_rate = _load_native(generated)
        ref, ref_rate = _load_native(melody)
        values.append(metric.add(gen, gen_rate, ref, ref_rate))
        if progress is not None:
            progress(i + 1, len(pairs))
    return metric, values


def kl_files(metric, pairs: Sequence[tuple[Path, Path]], *,
             progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Add (generated, reference) file pairs to `metric` (a `passt.KLDivergence`); returns each pair's mean
    KL(reference || generated) over its segments. Each pair is cropped to its shorter clip (passt.KLDivergence);
    a clip not longer than the model's shortest segment (0.15 s) is an error naming the file."""
    config, values = metric.model.config, []
    for i, (generated, reference) in enumerate(pairs):
        clips = [(generated, *_load_native(generated)), (reference, *_load_native(reference))]
        for path, wav, rate in clips:
            at_model_rate = math.ceil(wav.shape[-1] * config.sample_rate / rate)
            if at_model_rate <= config.min_samples:
                raise ValueError(f"{path} is {wav.shape[-1] / rate:.3f} s long; the KL metric (PaSST) needs more "
                                 f"than {config.min_segment_s} s, as audiocraft drops shorter segments")
        try:
            pair = metric.add(clips[0][1], clips[1][1], clips[0][2], clips[1][2])
        except ValueError as err:
            raise ValueError(f"{generated} against {reference}: {err}") from err
        values.append(float(pair["kld_pq"].double().mean()))
        if progress is not None:
            progress(i + 1, len(pairs))
    return values
