"""`musiclm eval`, `musiclm clap` and `musiclm generate --prompts` end to end, offline, on tiny models: a CLAP
(tests/clap_fixtures.py), an EnCodec (tiny preset, 16 kHz, 16-dimensional frames, weights off init), a VGGish
(tests/vggish_fixtures.py, tiny, 128-dimensional), a PaSST (tests/passt_fixtures.py, tiny, 2 s segments) and the
tiny MusicGen of tests/fixtures.py (3200 Hz, 50 frames/s).

The numbers the commands print and write are checked against the library computed apart (metrics.folder_stats,
CLAP.score, passt.KLDivergence, metrics.ChromaCosineSimilarity, MusicGen.generate): FAD to 1e-9 relative (the
same float64 arithmetic), CLAP scores to 1e-5, KL and chroma similarity to 1e-9 (the same computation), audio to
16-bit rounding.
"""

import html
import json
import re

import pytest
import torch

from musiclm_core import metrics
from musiclm_core.audio import load_audio, save_audio
from musiclm_core.cli import main
from musiclm_core.encodec import PRESETS as CODEC_PRESETS, EnCodec

from fixtures import tiny_musicgen, train_spm
from passt_fixtures import write_passt_checkpoint
from vggish_fixtures import write_vggish_checkpoint

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


# ---------------------------------------------------------------------------------------------------------------
# VGGish FAD, PaSST KL divergence, melody chroma similarity


def _tune(seconds, seed, rate=SR):
    """Four notes (fundamental + 2 harmonics) drawn from seed, a little noise: (1, N)."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * rate)
    f = (220 * 2 ** (torch.randint(0, 12, (4,), generator=g) / 12)).repeat_interleave(-(-n // 4))[:n]
    phase = 2 * torch.pi * torch.cumsum(f / rate, 0)
    return (sum(0.3 / k * torch.sin(k * phase) for k in (1, 2, 3)) + 0.01 * torch.randn(n, generator=g))[None]


@pytest.fixture(scope="module")
def vggish_folder(tmp_path_factory):
    return write_vggish_checkpoint(tmp_path_factory.mktemp("vggish") / "weights", tiny=True)


@pytest.fixture(scope="module")
def passt_file(tmp_path_factory):
    return write_passt_checkpoint(tmp_path_factory.mktemp("passt"), tiny=True)


def test_eval_vggish(models, vggish_folder, tmp_path, capsys):
    """4 + 5 files of 17 s: 33 one-second windows each (Google's convention), 132 >= 129 for 128 dimensions."""
    from musiclm_core.vggish import VGGish, VGGishEmbedding

    folders = {name: tmp_path / name for name in ("generated", "reference")}
    for (name, folder), count in zip(folders.items(), (4, 5)):
        folder.mkdir()
        for i in range(count):
            save_audio(folder / f"{i}.wav", _tune(17, 10 * count + i) + _noise(17, i) * (2 if count == 4 else 1),
                       SR)
    run = ["eval", "--generated", str(folders["generated"]), "--reference", str(folders["reference"]),
           "--embedding", "vggish", "--vggish", str(vggish_folder), "--out", str(tmp_path / "out"),
           "--cache-dir", str(tmp_path / "cache")]
    assert main(run) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    embedding = VGGishEmbedding(VGGish.from_pretrained(vggish_folder), str(vggish_folder))
    expected = metrics.fad(metrics.folder_stats(folders["generated"], embedding),
                           metrics.folder_stats(folders["reference"], embedding))
    assert result["fad"] == pytest.approx(expected, rel=1e-9) and expected > 1e-3
    assert (result["embedding"], result["embeddings_generated"], result["vggish_convention"]) == ("vggish", 132,
                                                                                                  "google")
    assert result["embedding_model"] == str(vggish_folder) and result["sources"]["fad"].startswith("vggish:")
    assert "kld" not in result and "chroma_cosine" not in result
    assert "FAD (vggish:" in capsys.readouterr().out
    page = (tmp_path / "out" / "report.html").read_text()
    assert "vggish:" in page

    # fadtk's convention: 0.96 s examples back to back, 17 a file: too few for 128 dimensions, and said so.
    assert main([*run, "--vggish-convention", "fadtk", "--overwrite"]) == 1
    assert "68 embeddings from 4 file(s)" in capsys.readouterr().err


def test_eval_vggish_clip_too_short_is_named(models, vggish_folder, sets, tmp_path, capsys):
    _, reference = sets
    folder = tmp_path / "short"
    folder.mkdir()
    save_audio(folder / "long.wav", _noise(3, 0), SR)
    save_audio(folder / "short.wav", _noise(0.5, 1), SR)
    code = main(["eval", "--generated", str(folder), "--reference", str(reference), "--embedding", "vggish",
                 "--vggish", str(vggish_folder), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert code == 1
    assert re.search(r"short.wav: the clip is too short for VGGish.*0.500 s", capsys.readouterr().err)


@pytest.fixture
def paired(tmp_path):
    """generated/{a.wav, sub/b.wav, c.wav}; reference/ the same names (a as .flac, b at 32 kHz) holding other
    tunes; melody/ the same names holding the generated tunes without noise (c: a different tune). 1.5 s each."""
    root = {name: tmp_path / name for name in ("generated", "reference", "melody")}
    for folder in root.values():
        (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("a", "sub/b", "c")):
        save_audio(root["generated"] / f"{name}.wav", _tune(1.5, i) + 0.05 * _noise(1.5, 30 + i), SR)
        ext, rate = (".flac", SR) if name == "a" else (".wav", 32_000 if name == "sub/b" else SR)
        save_audio(root["reference"] / f"{name}{ext}", _tune(1.5, 10 + i, rate) + 0.05 * _noise(1.5, 40 + i, rate),
                   rate)
        save_audio(root["melody"] / f"{name}.wav", _tune(1.5, i if name != "c" else 77), SR)
    return root


def _eval_paired(models, paired, passt_file, out, *extra):
    _, codec = models
    return main(["eval", "--generated", str(paired["generated"]), "--reference", str(paired["reference"]),
                 "--embedding", "encodec", "--encodec", str(codec), "--out", str(out),
                 "--cache-dir", str(out.parent / "cache"), "--kl", "passt", "--passt", str(passt_file),
                 "--passt-preset", "tiny", "--melody", str(paired["melody"]), *extra])


def test_eval_kl_and_melody(models, paired, passt_file, tmp_path, capsys):
    from musiclm_core.passt import KLDivergence, PaSST

    assert _eval_paired(models, paired, passt_file, tmp_path / "out") == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    names = ["a", "sub/b", "c"]
    gen = [load_audio(paired["generated"] / f"{n}.wav") for n in names]
    ref = [load_audio(next(paired["reference"].glob(f"{n}.*"))) for n in names]
    mel = [load_audio(paired["melody"] / f"{n}.wav") for n in names]

    kl = KLDivergence(PaSST.from_pretrained(passt_file, preset="tiny"))
    for (g, gr), (r, rr) in zip(gen, ref):
        kl.add(g, r, gr, rr)
    expected = kl.compute()
    for key in ("kld", "kld_pq", "kld_qp", "kld_both"):
        assert result[key] == pytest.approx(expected[key], rel=1e-9), key
    assert expected["kld"] > 1e-3 and result["kl_pairs"] == 3 and result["kl_segments"] == kl.count
    assert result["kl_model"].startswith("passt-tiny:") and result["sources"]["kld"] == result["kl_model"]

    chroma = metrics.ChromaCosineSimilarity()
    values = [chroma.add(g, gr, m, mr) for (g, gr), (m, mr) in zip(gen, mel)]
    assert result["chroma_cosine"] == pytest.approx(chroma.compute(), rel=1e-9)
    assert values[0] > 0.9 and values[1] > 0.9 and values[2] < 0.6  # c's melody is another tune
    assert result["chroma_pairs"] == 3 and result["chroma_frames"] == chroma.frames
    assert result["sources"]["chroma_cosine"].startswith("chroma")
    assert f"kld {result['kld']:.4f}" in printed and f"chroma cosine similarity: {chroma.compute():.4f}" in printed

    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>KL (ref || gen)</th>" in html.unescape(page)
    assert "<th>chroma cosine</th>" in page and "passt-tiny:" in page and "melody folder" in page
    for value in values:
        assert f"{value:.4f}" in page


def test_eval_kl_of_a_set_against_itself_is_zero(models, paired, passt_file, tmp_path, capsys):
    """It listens: the same files as generated, reference and melody: KL 0 (up to audiocraft's eps: KL(p || p +
    1e-6) is about -1e-6 for each of the 527 labels), similarity 1."""
    same = dict(paired, reference=paired["generated"], melody=paired["generated"])
    assert _eval_paired(models, same, passt_file, tmp_path / "out") == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert abs(result["kld"]) <= 527e-6 and abs(result["kld_both"]) <= 2 * 527e-6
    assert result["chroma_cosine"] == 1.0


@pytest.mark.parametrize("case, message, status", [
    ("no_reference_partner", r"1 generated file\(s\) have no file of the same name .* in --reference .*: "
                             r".*generated/c.wav", 1),
    ("no_generated_partner", r"1 file\(s\) of --melody .* have no generated file of the same name .*: "
                             r".*melody/extra.wav", 1),
    ("two_of_one_name", r"--reference .*: .*a.flac and .*a.wav have one name without extension", 1),
    ("kl_too_short", r"reference/sub/b.wav is 0.100 s long; the KL metric \(PaSST\) needs more than 0.15 s", 1),
    ("passt_missing", r"no PaSST checkpoint for preset 'tiny' at .*nowhere.pt", 1),
    ("passt_without_kl", r"--passt and --passt-preset choose the model of --kl passt", 2),
    ("vggish_without_vggish", r"--vggish and --vggish-convention are for --embedding vggish", 2),
])
def test_eval_paired_bad_input(models, paired, passt_file, tmp_path, capsys, case, message, status):
    extra = []
    if case == "no_reference_partner":
        (paired["reference"] / "c.wav").unlink()
    if case == "no_generated_partner":
        save_audio(paired["melody"] / "extra.wav", _noise(1, 0), SR)
    if case == "two_of_one_name":
        save_audio(paired["reference"] / "a.wav", _noise(1, 0), SR)
    if case == "kl_too_short":
        save_audio(paired["reference"] / "sub" / "b.wav", _noise(0.1, 0), SR, overwrite=True)
    if case == "passt_without_kl":
        _, codec = models
        code = main(["eval", "--generated", str(paired["generated"]), "--reference", str(paired["reference"]),
                     "--embedding", "encodec", "--encodec", str(codec), "--out", str(tmp_path / "out"),
                     "--passt", str(passt_file)])
    elif case == "passt_missing":
        code = _eval_paired(models, paired, tmp_path / "nowhere.pt", tmp_path / "out")
    elif case == "vggish_without_vggish":
        code = _eval_paired(models, paired, passt_file, tmp_path / "out", "--vggish", "x")
    else:
        code = _eval_paired(models, paired, passt_file, tmp_path / "out", *extra)
    assert code == status
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not re.search(r"^generated: \d+/\d+ files", err, re.M)  # each fails before the FAD embeds a file


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
