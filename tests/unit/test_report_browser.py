"""The listening report (musiclm_core.report): the PNG writer and the mel image, and the page in a real browser.

The browser test renders report.html in headless Chromium (Debian's `chromium`; skipped with the install command
where it is missing): a screenshot, and the DOM after a small script has waited for every <audio> to load its
metadata (a playable source: the browser can play its type and reads a duration) and every <img> to decode.
The audio files sit in a sibling folder with a space and a '#' in their names, in wav, flac and ogg; the page is
long enough that some images are below the fold (loaded lazily).
"""

import html
import json
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch

from musiclm_core.audio import save_audio
from musiclm_core.report import Sample, mel_image, png, write_report

SR = 16_000
INSTALL = "apt-get update && apt-get install -y chromium"


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i: i + 4])
        kind, body = data[i + 4: i + 8], data[i + 8: i + 8 + length]
        assert struct.unpack(">I", data[i + 8 + length: i + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        i += 12 + length
    return chunks


def test_png_structure_and_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = png(image)
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (7, 5, 8, 2, 0, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(5, 1 + 7 * 3)
    assert (rows[:, 0] == 0).all() and np.array_equal(rows[:, 1:].reshape(5, 7, 3), image)
    PIL = pytest.importorskip("PIL.Image")  # an independent decoder, where installed
    import io

    assert np.array_equal(np.asarray(PIL.open(io.BytesIO(data)).convert("RGB")), image)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        png(image.astype(np.float32))


@pytest.mark.parametrize("hz", [500.0, 3000.0])
def test_mel_image_puts_a_tone_at_its_height(hz):
    """The loudest row of a pure tone is the mel band centred nearest to it (low frequencies at the bottom)."""
    from musiclm_core.mel import hz_to_mel

    t = torch.arange(SR) / SR
    image = mel_image(0.5 * torch.sin(2 * torch.pi * hz * t), SR)
    H = image.shape[0]
    brightness = image.astype(float).sum(-1)[:, 5:-5].mean(1)  # (H,)
    low, high = hz_to_mel(torch.tensor([0.0, SR / 2], dtype=torch.float64)).tolist()
    centres = torch.linspace(low, high, H + 2, dtype=torch.float64)[1:-1]
    expected_row = H - 1 - int((centres - hz_to_mel(torch.tensor(hz, dtype=torch.float64))).abs().argmin())
    assert abs(int(brightness.argmax()) - expected_row) <= 1


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip(f"headless Chromium is not installed: install it with `{INSTALL}`")


CHECK = """<script>
(async () => {
  const loaded = el => new Promise(done => {  // the players load nothing until asked (preload="none")
    el.addEventListener('loadedmetadata', () => done(el.duration > 0));
    el.addEventListener('error', () => done(false));
    el.preload = 'metadata';
    el.load();
  });
  for (const im of document.images) im.loading = 'eager';  // lazy images below the fold would wait
  const audio = await Promise.all([...document.querySelectorAll('audio')].map(async el =>
    ({src: el.getAttribute('src'), playable: el.canPlayType(el.dataset.type) !== '' && await loaded(el)})));
  const images = await Promise.all([...document.images].map(im =>
    im.decode().then(() => im.naturalWidth, () => 0)));
  document.body.setAttribute('data-check', JSON.stringify({audio, images}));
})();
</script>"""


def _run(browser, tmp_path, *args):
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_in_headless_chromium(tmp_path):
    browser = _chromium()
    audio = tmp_path / "generated set"
    audio.mkdir()
    t = torch.arange(SR) / SR
    samples = []
    names = [("take #1.wav", 220), ("b flat.flac", 466), ("c.ogg", 1000)] + [(f"n{k}.wav", 300 + 50 * k)
                                                                            for k in range(6)]
    for i, (name, hz) in enumerate(names):
        save_audio(audio / name, (0.3 * torch.sin(2 * torch.pi * hz * t))[None], SR)
        samples.append(Sample(audio / name, f"caption <{i}> & more", 0.3 - 0.1 * i))
    page = write_report(tmp_path / "out" / "report.html", samples, {"FAD": 1.5, "CLAP score": 0.2})
    text = page.read_text()
    assert text.index("n5.wav") < text.index("c.ogg") < text.index("b flat.flac") < text.index("take #1.wav")
    assert "caption &lt;0&gt; &amp; more" in text and "take%20%231.wav" in text

    shot = tmp_path / "shot.png"
    result = _run(browser, tmp_path, "--hide-scrollbars", "--window-size=1200,900", f"--screenshot={shot}",
                  page.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) == (1200, 900) and shot.stat().st_size > 10_000  # a rendered page, not a blank one

    check = page.with_name("check.html")
    check.write_text(text.replace("</body>", CHECK + "</body>"))
    result = _run(browser, tmp_path, "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    found = re.search(r'data-check="([^"]*)"', result.stdout)
    assert found, result.stderr[-2000:]
    state = json.loads(html.unescape(found.group(1)))
    assert len(state["audio"]) == 9 and all(a["playable"] for a in state["audio"]), state
    width = mel_image(torch.sin(2 * torch.pi * 220 * t), SR).shape[1]  # all 1 s long: one width
    assert state["images"] == [width] * 9
    assert sorted(p.name for p in (page.parent / "mels").iterdir()) == [f"{k:05d}.png" for k in range(1, 10)]
