"""`musiclm train musicgen` end to end on the tiny random MusicGen (`musiclm convert --random-tiny`): a run,
its metrics and progress line, resume to a larger --steps, the run folder loading and generating, LoRA, and
the usage errors."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm_core.cli import main
from musiclm_core.musicgen import MusicGen
from musiclm_core.train import lora


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, a second thread only waits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    data = root / "data"
    data.mkdir()
    t = np.arange(32000) / 32000
    for i in range(3):
        sf.write(data / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), 32000)
    (data / "captions.jsonl").write_text("".join(json.dumps({"path": f"c{i}.wav", "caption": f"tone {i}"}) + "\n"
                                                 for i in range(3)))
    assert main(["convert", "--random-tiny", str(root / "tiny")]) == 0
    return root, data


def train(root, data, out, *extra):
    return main(["train", "musicgen", "--data", str(data), "--model", str(root / "tiny"), "--out", str(out),
                 "--segment", "0.4", "--lr", "1e-3", *extra])


def test_train_resume_and_generate(setup, capsys):
    root, data = setup
    out = root / "runs" / "x"
    assert train(root, data, out, "--steps", "3", "--save-every", "2") == 0
    err = capsys.readouterr().err
    assert "step      3 / 3" in err and "tokens/s" in err and "loss" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert train(root, data, out, "--steps", "3") == 1  # a run is there: only --resume continues it
    assert "holds a training run" in capsys.readouterr().err
    assert train(root, data, out, "--steps", "5", "--resume") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    pipe = MusicGen.from_pretrained(out)
    start = MusicGen.from_pretrained(root / "tiny")
    moved = max((pipe.lm.state_dict()[k] - v).abs().max() for k, v in start.lm.state_dict().items())
    assert moved > 1e-4  # the run folder holds the trained weights
    wav = pipe.generate(["tone 1"], duration=0.2, seed=0)
    assert wav.shape == (1, 1, 6400) and torch.isfinite(wav).all()
    assert sorted(p.name for p in data.iterdir()) == ["c0.wav", "c1.wav", "c2.wav", "captions.jsonl"]


def test_lora_run(setup):
    root, data = setup
    out = root / "runs" / "lora"
    assert train(root, data, out, "--steps", "2", "--lora", "2") == 0
    assert (out / lora.ADAPTER_FILE).is_file()
    assert train(root, data, out, "--steps", "3", "--lora", "2", "--resume") == 0
    assert MusicGen.from_pretrained(out).lm.state_dict().keys() == MusicGen.from_pretrained(root / "tiny").lm \
        .state_dict().keys()


@pytest.mark.parametrize("flags, status, message", [
    (["--steps", "0"], 2, "--steps must be >= 1, got 0"),
    (["--steps", "2", "--resume"], 1, "no checkpoint to resume from"),
    (["--steps", "2", "--cache", "DATA/cache"], 2, "--out and --cache must lie outside --data"),
])
def test_usage_errors(setup, capsys, flags, status, message):
    root, data = setup
    flags = [f.replace("DATA", str(data)) for f in flags]
    assert train(root, data, root / "runs" / "bad", *flags) == status
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def musicldm_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    import ldm_fixtures

    return ldm_fixtures.write_musicldm(tmp_path_factory.mktemp("train_musicldm"))


def _tones(folder, hz, captions):
    """One 1 s, 16 kHz sine clip per caption (at hz, 2 hz, ...), each with its caption file: a training folder."""
    folder.mkdir()
    t = np.arange(16000) / 16000
    for i, caption in enumerate(captions):
        sf.write(folder / f"c{i}.wav", (0.3 * np.sin(2 * np.pi * hz * (i + 1) * t)).astype(np.float32), 16000)
        (folder / f"c{i}.txt").write_text(caption)
    return folder


def _unet_change(trained, start) -> float:
    """The largest change of any UNet parameter between two saved models (the trained run's unet/ and its start)."""
    from musiclm_core.unet import UNet

    after, before = UNet.from_pretrained(trained).state_dict(), UNet.from_pretrained(start).state_dict()
    return max((after[k] - v).abs().max().item() for k, v in before.items())


def test_train_ldm_resume_and_load(setup, musicldm_folder, capsys):
    root, _ = setup
    data = _tones(root / "data16k", 330, ["tone 0", "tone 1"])
    out = root / "runs" / "ldm"
    base = ["train", "ldm", "--data", str(data), "--model", str(musicldm_folder), "--out", str(out),
            "--seconds", "0.32", "--lr", "1e-3", "--cond-dropout", "0.5"]
    assert main([*base, "--steps", "2"]) == 0
    assert "step      2 / 2" in capsys.readouterr().err
    assert main([*base, "--steps", "2"]) == 1
    assert "holds a training run" in capsys.readouterr().err
    assert main([*base, "--steps", "3", "--resume"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert _unet_change(out / "unet", musicldm_folder) > 1e-5


def test_train_ldm_audioldm2(setup, tmp_path_factory, capsys):
    pytest.importorskip("diffusers")
    import ldm_fixtures

    folder = ldm_fixtures.write_audioldm2(tmp_path_factory.mktemp("train_audioldm2"))
    root, _ = setup
    data = _tones(root / "data_a2", 440, ["a tone 0", "a tone 1 and more"])  # captions of two token lengths
    out = root / "runs" / "a2"
    assert main(["train", "ldm", "--data", str(data), "--model", str(folder), "--out", str(out), "--steps", "2",
                 "--seconds", "0.32", "--lr", "1e-3", "--cond-dropout", "0.5"]) == 0
    assert "step      2 / 2" in capsys.readouterr().err
    assert _unet_change(out / "unet", folder) > 1e-5


def test_train_ldm_mixup(setup, musicldm_folder, capsys):
    """--mixup: MusicLDM trains with its clips' beat-synchronous mixtures (encoded once, next to the clips'
    latents); the probability is checked, and AudioLDM 2 (conditioned on captions) refuses it."""
    root, _ = setup
    data = root / "data_clicks"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, first in enumerate((0.05, 0.2)):  # two 4 s click tracks at 120 BPM: one tempo group
        wav = rng.normal(0, 0.005, 64000).astype(np.float32)
        for start in np.arange(first, 3.95, 0.5):
            n = round(start * 16000)
            wav[n:n + 160] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(160) / 16000) * np.exp(-np.arange(160) / 64)
        sf.write(data / f"c{i}.wav", wav, 16000)
        (data / f"c{i}.txt").write_text(f"clicks {i}")
    out = root / "runs" / "mixup"
    base = ["train", "ldm", "--data", str(data), "--model", str(musicldm_folder), "--out", str(out),
            "--seconds", "0.32", "--lr", "1e-3", "--steps", "1"]
    assert main([*base, "--mixup", "1.5"]) == 2
    assert "--mixup must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main([*base, "--mixup", "1"]) == 0
    printed = capsys.readouterr()
    assert "step      1 / 1" in printed.err and "mixup: 2 of 2 clips have a partner" in printed.out
    assert len(list((out / "cache").glob("*.safetensors"))) == 2 + 2 + 2  # latents, beats, mixtures
    assert torch.load(out / "trainer_state.pt", weights_only=True)["settings"]["mixup"] == 1.0
    lone = root / "data_lone"  # one clip: no partner
    lone.mkdir()
    for name in ("c0.wav", "c0.txt"):
        (lone / name).write_bytes((data / name).read_bytes())
    assert main(["train", "ldm", "--data", str(lone), "--model", str(musicldm_folder), "--out",
                 str(root / "runs" / "lone"), "--seconds", "0.32", "--steps", "1", "--mixup", "0.5"]) == 1
    assert "no two clips of" in capsys.readouterr().err
    fake = root / "fake_audioldm2"
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline"}))
    assert main(["train", "ldm", "--data", str(data), "--model", str(fake), "--out", str(root / "runs" / "a2mix"),
                 "--steps", "1", "--mixup", "0.5"]) == 2
    assert "--mixup is MusicLDM's" in capsys.readouterr().err
