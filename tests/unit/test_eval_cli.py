"""`musiclm eval`, `musiclm clap` and `musiclm generate --prompts` end to end, offline, on tiny models: a CLAP
(tests/clap_fixtures.py), an EnCodec (tiny preset, 16 kHz, 16-dimensional frames, weights off init) and the tiny
MusicGen of tests/fixtures.py (3200 Hz, 50 frames/s).

The numbers the commands print and write are checked against the library computed apart (metrics.folder_stats,
CLAP.score, MusicGen.generate): FAD to 1e-9 relative (the same float64 arithmetic), CLAP scores to 1e-5, audio
to 16-bit rounding.
"""

import json
import re

import pytest
import torch

from musiclm_core import metrics
from musiclm_core.audio import load_audio, save_audio
from musiclm_core.cli import main
from musiclm_core.encodec import PRESETS as CODEC_PRESETS, EnCodec

from fixtures import tiny_musicgen, train_spm

pytest.importorskip("tokenizers")
from clap_fixtures import tiny_clap_folder  # noqa: E402

SR = 16_000
CAPTIONS = ["soft piano and loud drums", "dark ambient drone", "fast jazz guitar solo"]
PCM16 = 1 / 32768


def _noise(seconds, seed, rate=SR):
    return 0.1 * torch.randn(1, int(seconds * rate), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    clap = tiny_clap_folder(root / "clap")
    torch.manual_seed(0)
    codec = EnCodec(CODEC_PRESETS["tiny"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in codec.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    codec.save_pretrained(root / "codec")
    return clap, root / "codec"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """generated/: 3 files with a caption .txt each; reference/: 4 files."""
    root = tmp_path_factory.mktemp("eval_sets")
    for name, count in (("generated", 3), ("reference", 4)):
        (root / name).mkdir()
        for i in range(count):
            tone = 0.3 * torch.sin(2 * torch.pi * (220 + 110 * i) * torch.arange(SR // 2) / SR)[None]
            save_audio(root / name / f"{i}.wav", tone + _noise(0.5, 10 * count + i), SR)
            if name == "generated":
                (root / name / f"{i}.txt").write_text(CAPTIONS[i] + "\n")
    return root / "generated", root / "reference"


def _eval(models, generated, reference, out, *extra):
    clap, codec = models
    return main(["eval", "--generated", str(generated), "--reference", str(reference), "--embedding", "encodec",
                 "--encodec", str(codec), "--clap", str(clap), "--out", str(out),
                 "--cache-dir", str(out.parent / "cache"), *extra])


def test_eval_encodec_with_captions(models, sets, tmp_path, capsys):
    generated, reference = sets
    assert _eval(models, generated, reference, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(result) >= {"fad", "clap_score", "n_generated", "n_reference", "embedding"}
    assert (result["n_generated"], result["n_reference"], result["embedding"]) == (3, 4, "encodec")

    from musiclm_core.clap import CLAP

    embedding = metrics.EnCodecEmbedding(EnCodec.from_pretrained(models[1]), str(models[1]))
    expected = metrics.fad(metrics.folder_stats(generated, embedding), metrics.folder_stats(reference, embedding))
    assert result["fad"] == pytest.approx(expected, rel=1e-9) and expected > 1e-6
    clap = CLAP.from_pretrained(models[0])
    clips = [load_audio(generated / f"{i}.wav", channels=1)[0][0] for i in range(3)]
    scores = clap.score(CAPTIONS, clips, SR).diagonal()
    assert result["clap_score"] == pytest.approx(float(scores.mean()), abs=1e-5)
    assert f"{result['fad']:.6g}" in printed and "3 generated files" in printed and "4 reference files" in printed
    assert f"CLAP score ({models[0]}): {result['clap_score']:.4f}" in printed

    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<audio ") == 3 and page.count("<img ") == 3
    shown = [float(v) for v in re.findall(r'<td class="score">([-0-9.]+)</td>', page)]
    assert shown == sorted(shown) and shown == pytest.approx(sorted(scores.tolist()), abs=1e-4)
    for caption in CAPTIONS:
        assert caption in page


def test_eval_caches_the_reference_and_refuses_to_overwrite(models, sets, tmp_path, capsys):
    _, reference = sets
    generated = tmp_path / "generated"  # no captions: no CLAP to load
    generated.mkdir()
    for i in range(2):
        save_audio(generated / f"{i}.wav", _noise(0.2, 100 + i), SR)
    assert _eval(models, generated, reference, tmp_path / "out") == 0
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "cached statistics" not in capsys.readouterr().out
    assert _eval(models, generated, reference, tmp_path / "out") == 1
    assert "metrics.json exists; pass --overwrite" in capsys.readouterr().err
    assert _eval(models, generated, reference, tmp_path / "out", "--overwrite") == 0
    assert "cached statistics" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fad"] == pytest.approx(first["fad"],
                                                                                             rel=1e-12)


def test_eval_without_captions_loads_no_clap(models, sets, tmp_path, capsys):
    _, reference = sets
    clap, codec = models
    code = main(["eval", "--generated", str(reference), "--reference", str(reference), "--embedding", "encodec",
                 "--encodec", str(codec), "--clap", str(tmp_path / "no_such_clap"), "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["clap_score"] is None and result["fad"] <= 1e-6  # the reference against itself
    assert "CLAP score" not in capsys.readouterr().out


def test_eval_clap_embedding(models, tmp_path, capsys):
    """Two 10.8 s files, windows every 0.1 s: 9 windows each, 18 >= 17 for the 16-dimensional tiny CLAP."""
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(2):
        save_audio(folder / f"{i}.wav", _noise(10.8, i), SR)
    clap, _ = models
    code = main(["eval", "--generated", str(folder), "--reference", str(folder), "--embedding", "clap", "--clap",
                 str(clap), "--hop", "0.1", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["embedding"] == "clap" and result["embeddings_generated"] == 18 and result["fad"] <= 1e-6


@pytest.mark.parametrize("case, message, status", [
    ("empty", r"--generated .*empty holds no audio file", 1),
    ("unreadable", r"broken.wav could not be read as audio", 1),
    ("too_few", r"16-dimensional embeddings needs at least 17", 1),
    ("captions_mismatch", r"no caption for 1 of the 2 audio files", 1),
    ("captions_missing", r"no such file: .*missing.jsonl", 1),
    ("hop", r"--hop must be a positive number of seconds, got 0.0", 2),
])
def test_eval_bad_input(models, sets, tmp_path, capsys, case, message, status):
    _, reference = sets
    folder = tmp_path / case
    folder.mkdir()
    extra = []
    if case in ("unreadable", "captions_mismatch"):
        save_audio(folder / "a.wav", _noise(0.1, 0), SR)
        save_audio(folder / "b.wav", _noise(0.1, 1), SR)
    if case == "unreadable":
        (folder / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    if case == "too_few":
        save_audio(folder / "a.wav", _noise(0.005, 0), SR)  # 80 samples: 10 frames of 16 dimensions
    if case == "captions_mismatch":
        (tmp_path / "c.jsonl").write_text(json.dumps({"path": f"{case}/a.wav", "caption": "x"}) + "\n")
        extra = ["--captions", str(tmp_path / "c.jsonl")]
    if case == "captions_missing":
        save_audio(folder / "a.wav", _noise(0.1, 0), SR)
        extra = ["--captions", str(tmp_path / "missing.jsonl")]
    if case == "hop":
        extra = ["--hop", "0"]
    assert _eval(models, folder, reference, tmp_path / "out", *extra) == status
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len([line for line in err.splitlines() if "error" in line]) == 1  # one line (besides progress)


def test_clap_command_prints_the_score_matrix(models, sets, capsys):
    from musiclm_core.clap import CLAP

    generated, _ = sets
    files = [generated / "0.wav", generated / "2.wav"]
    assert main(["clap", CAPTIONS[0], *map(str, files), "--text", CAPTIONS[2], "--model", str(models[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and str(files[1]) in lines[0]
    printed = [[float(v) for v in line[len(max(CAPTIONS, key=len)):].split()] for line in lines[1:]]
    expected = CLAP.from_pretrained(models[0]).score_files([CAPTIONS[0], CAPTIONS[2]], files)
    assert torch.tensor(printed) == pytest.approx(expected, abs=1e-4)
    assert main(["clap", " ", str(files[0]), "--model", str(models[0])]) == 2


# ---------------------------------------------------------------------------------------------------------------
# generate --prompts


@pytest.fixture(scope="module")
def musicgen_folder(tmp_path_factory):
    from musiclm_core.t5 import T5Tokenizer

    spm = train_spm(tmp_path_factory.mktemp("set_spm"), lines=500, vocab_size=100)
    folder = tmp_path_factory.mktemp("set_musicgen") / "tiny"
    tiny_musicgen(T5Tokenizer.from_folder(spm), ratios=(8, 8), bandwidth=2.2).save_pretrained(folder)
    return folder


def _prompts(tmp_path, captions=CAPTIONS, ids=("a", "b", "c")):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in zip(ids, captions)))
    return path


def _generate_set(musicgen_folder, prompts, out, *extra):
    return main(["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(musicgen_folder),
                 "--duration", "0.2", "--normalize", "none", "--seed", "5", *extra])


def test_generate_set_writes_then_skips(musicgen_folder, tmp_path, capsys):
    from musiclm_core.musicgen import MusicGen

    out = tmp_path / "set"
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out, "--batch-size", "2") == 0
    err = capsys.readouterr().err
    assert "3 prompts, 0 written already, 3 to generate" in err and "3/3 of the set written" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "a.wav", "b.txt", "b.wav", "c.txt", "c.wav"]
    assert [(out / f"{i}.txt").read_text().strip() for i in "abc"] == CAPTIONS
    # Batch seeds: --seed + the index of the batch's first prompt (c is alone in the second batch: 5 + 2).
    model = MusicGen.from_pretrained(musicgen_folder)
    expected = model.generate([CAPTIONS[2]], duration=0.2, seed=7)[0]
    wav, rate = load_audio(out / "c.wav")
    assert rate == model.sample_rate and (wav - expected.clamp(-1, 1)).abs().max() <= PCM16 + 1e-6
    times = [(out / f"{i}.wav").stat().st_mtime_ns for i in "abc"]
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 0
    assert "3 written already, 0 to generate" in capsys.readouterr().err
    assert [(out / f"{i}.wav").stat().st_mtime_ns for i in "abc"] == times

    changed = _prompts(tmp_path, captions=["another caption", *CAPTIONS[1:]])
    assert _generate_set(musicgen_folder, changed, out) == 1
    assert "a.wav exists but a.txt does not hold its caption" in capsys.readouterr().err


def test_generate_set_restarts_after_an_interrupt(musicgen_folder, tmp_path, monkeypatch, capsys):
    import musiclm_core.audio

    real, calls = musiclm_core.audio.save_audio, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "set"
    monkeypatch.setattr(musiclm_core.audio, "save_audio", interrupted_on_the_second)
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 130
    monkeypatch.setattr(musiclm_core.audio, "save_audio", real)
    assert sorted(p.name for p in out.glob("*.wav")) == ["a.wav"]
    assert not list(out.glob(".*"))  # no temporary file left behind
    capsys.readouterr()
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 0
    assert "1 written already, 2 to generate" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.wav")) == ["a.wav", "b.wav", "c.wav"]


def test_generate_set_rank_shares(musicgen_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "set"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 0
    assert "(rank 1 of 2: 1 prompts)" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.wav")) == ["b.wav"]
    monkeypatch.setenv("RANK", "0")
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 0
    assert "3/3 of the set written" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "2")
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out) == 1
    assert "RANK 2 is not in [0, WORLD_SIZE 2)" in capsys.readouterr().err


@pytest.mark.parametrize("lines, extra, message, status", [
    (['{"id": "a", "caption": "x"}', '{"id": "a", "caption": "y"}'], [], r"line 2: id 'a' is used on line 1", 1),
    (['{"id": "../a", "caption": "x"}'], [], r"line 1: id '../a' cannot be a file name", 1),
    (['{"id": "a"}'], [], r'line 1: expected \{"id": ..., "caption": ...\}', 1),
    (["not json"], [], r"line 1 is not JSON", 1),
    ([""], [], r"holds no prompt", 1),
    (['{"id": "a", "caption": "x"}'], ["-o", "x.wav"], r"take no prompt, --prompts-file or -o/--output", 2),
])
def test_generate_set_bad_input(musicgen_folder, tmp_path, capsys, lines, extra, message, status):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines))
    assert _generate_set(musicgen_folder, path, tmp_path / "out", *extra) == status
    assert re.search(message, capsys.readouterr().err)
    assert main(["generate", "--prompts", str(path), "--model", str(musicgen_folder)]) == 2


def test_generate_then_evaluate(musicgen_folder, models, sets, tmp_path, capsys):
    """The README's two commands: an evaluation set, then its FAD and CLAP score from the sidecar captions."""
    _, reference = sets
    out = tmp_path / "set"
    assert _generate_set(musicgen_folder, _prompts(tmp_path), out, "--batch-size", "3") == 0
    assert _eval(models, out, reference, tmp_path / "eval") == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["n_generated"] == 3 and result["clap_score"] is not None and result["fad"] > 0


@pytest.mark.slow  # tiny, but writing the pipeline with diffusers and running it takes ~17 s on 2 cores
def test_generate_set_with_a_diffusion_pipeline(tmp_path, capsys):
    """MusicLDM (a tiny pipeline folder written by diffusers): the same set layout, one waveform per prompt."""
    pytest.importorskip("diffusers")
    import ldm_fixtures

    from musiclm_core.musicldm import MusicLDM

    folder = ldm_fixtures.write_musicldm(tmp_path / "ldm")
    out = tmp_path / "set"
    prompts = _prompts(tmp_path, ids=("a", "b"), captions=CAPTIONS[:2])
    run = ["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(folder), "--duration", "0.5",
           "--steps", "2", "--seed", "3", "--normalize", "none"]
    assert main(run) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "a.wav", "b.txt", "b.wav"]
    expected = MusicLDM.from_pretrained(folder).generate([CAPTIONS[1]], audio_length_in_s=0.5, num_inference_steps=2,
                                                         seed=4)[0]  # b: --seed + its index
    wav, _ = load_audio(out / "b.wav")
    assert wav.shape == expected.shape and (wav - expected.clamp(-1, 1)).abs().max() <= PCM16 + 1e-6
    assert main(run) == 0 and "2 written already, 0 to generate" in capsys.readouterr().err
    assert main([*run, "-n", "2"]) == 2
