"""The listening report of `musiclm eval`: one static HTML page (no server, no script) with the summary table (each
metric with the model or embedding it came from) and, per generated sample, its caption, an <audio> player, a mel
spectrogram, its CLAP score and its other per-sample metrics (KL divergence, melody similarity), worst CLAP score
first.

The audio is not copied: each player points at the file by its path relative to the page (so the page and the
generated folder move together, or the page is opened where it was written). The spectrograms are PNG files in
`mels/` next to the page, written here with zlib and struct (a PNG is a signature and three chunks: IHDR, IDAT,
IEND, each length + type + data + CRC-32), so the package needs no imaging library. Players load nothing and
images load lazily until they are needed: a page of thousands of samples opens at once.
"""

from __future__ import annotations

import html
import math
import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor

from musiclm_core.audio import load_audio
from musiclm_core.mel import mel_filterbank

# Five points of the "magma" colour map (0, 0.25, 0.5, 0.75, 1): dark = quiet, light = loud.
MAGMA = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64)
MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}


@dataclass
class Sample:
    """One generated file in the report: its path, caption, CLAP score (None without captions) and its other
    per-sample values by column name (a column for each name any sample has; "–" where one has none)."""

    audio: Path
    caption: str | None = None
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit RGB, no interlace, filter 0 on every row)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    H, W, _ = rgb.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.concatenate([np.zeros((H, 1), np.uint8), rgb.reshape(H, W * 3)], axis=1)  # a filter byte per row
    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


def mel_image(wav: Tensor, sample_rate: int, *, n_mels: int = 128, width: int = 600,
              top_db: float = 80.0) -> np.ndarray:
    """(N,) or (C, N) audio -> (n_mels, ~width, 3) uint8 image of its log-mel power spectrogram, low frequencies
    at the bottom, the top_db below the loudest bin mapped onto MAGMA (channels are averaged)."""
    wav = torch.as_tensor(wav, dtype=torch.float64)
    wav = wav.mean(0) if wav.dim() == 2 else wav  # (N,)
    n_fft = 2048 if sample_rate >= 32_000 else 1024
    wav = torch.nn.functional.pad(wav, (0, max(0, n_fft - wav.shape[-1])))
    hop = max(n_fft // 4, math.ceil(wav.shape[-1] / width))  # about `width` columns, never coarser than n_fft/4
    spec = torch.stft(wav, n_fft, hop, window=torch.hann_window(n_fft, dtype=torch.float64), center=True,
                      return_complex=True).abs().square()  # (n_fft / 2 + 1, T)
    mel = mel_filterbank(sample_rate, n_fft, n_mels, 0.0, min(sample_rate / 2, 16_000.0)) @ spec  # (n_mels, T)
    db = 10 * torch.log10(mel.clamp(min=1e-10))
    level = ((db - db.max() + top_db) / top_db).clamp(0, 1).flip(0).numpy()  # (n_mels, T), 1 = loudest
    position = level * (len(MAGMA) - 1)
    low = np.minimum(position.astype(int), len(MAGMA) - 2)
    frac = (position - low)[..., None]
    return np.round(MAGMA[low] * (1 - frac) + MAGMA[low + 1] * frac).astype(np.uint8)  # (n_mels, T, 3)


def _number(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def render(samples: list[Sample], summary: dict[str, object], page: Path,
           sources: dict[str, str] | None = None) -> str:
    """The report's HTML for `page`, whose spectrograms it writes to `mels/NNNNN.png` next to it (audio paths are
    made relative to the page's folder); samples sorted by CLAP score, lowest first (in path order without
    scores). `sources` names, for a summary row, the model or embedding its value came from (a "from" column)."""
    sources = sources or {}
    ordered = sorted(samples, key=lambda s: (math.inf if s.score is None else s.score, str(s.audio)))
    columns = list(dict.fromkeys(name for sample in samples for name in sample.metrics))
    mels = page.parent / "mels"
    mels.mkdir(parents=True, exist_ok=True)
    rows = []
    for rank, sample in enumerate(ordered, 1):
        wav, rate = load_audio(sample.audio)
        (mels / f"{rank:05d}.png").write_bytes(png(mel_image(wav, rate)))
        source = quote(Path(os.path.relpath(Path(sample.audio).resolve(), page.parent.resolve())).as_posix())
        name = html.escape(Path(sample.audio).name)
        caption = html.escape(sample.caption) if sample.caption is not None else "<i>no caption</i>"
        rows.append(
            f'<tr><td>{rank}</td><td class="score">{_number(sample.score)}</td>'
            + "".join(f'<td class="score">{_number(sample.metrics.get(c))}</td>' for c in columns) +
            f'<td><div class="caption">{caption}</div><div class="file">{name}</div></td>'
            f'<td><audio controls preload="none" src="{source}" '
            f'data-type="{MIME.get(Path(sample.audio).suffix.lower(), "")}"></audio></td>'
            f'<td><img src="mels/{rank:05d}.png" loading="lazy" alt="mel spectrogram of {name}"></td></tr>')
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{_number(v)}</td>"
                    f'<td class="file">{html.escape(sources.get(k, ""))}</td></tr>' for k, v in summary.items())
    headers = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>musiclm eval report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.4em 0.6em; text-align: left; vertical-align: middle; }}
.samples img {{ display: block; height: 128px; max-width: 600px; image-rendering: pixelated; }}
.caption {{ max-width: 28em; }} .file {{ color: #777; font-size: 0.85em; margin-top: 0.3em; }}
.score {{ font-variant-numeric: tabular-nums; }}
</style></head>
<body>
<h1>musiclm eval report</h1>
<table class="summary">{table}</table>
<h2>Generated samples ({len(ordered)}, lowest CLAP score first)</h2>
<table class="samples">
<tr><th>#</th><th>CLAP score</th>{headers}<th>caption</th><th>audio</th><th>mel spectrogram</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically: a hidden temporary file in the same folder, then a rename, so that an
    interrupted write leaves the old file or none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_report(path: str | os.PathLike, samples: list[Sample], summary: dict[str, object],
                 sources: dict[str, str] | None = None) -> Path:
    """Write the report page (atomically, `write_text`); `sources` as in `render`."""
    return write_text(path, render(samples, summary, Path(path), sources))
