"""`musiclm generate` end to end on a tiny native MusicGen folder, and `musiclm convert` of MusicGen and T5.

The tiny pipeline: T5 (tiny preset, a sentencepiece model trained in a blink), an EnCodec at 3200 Hz with 4
codebooks of 2048 entries at 50 frames/s (hop 64, as the official 32 kHz codec has 50 frames/s) and a 2-layer
LM: a 0.5 s piece is 25 frames. Loudness normalisation (the default) needs at least 0.4 s.
"""

import io
import json
import shutil

import pytest
import torch

from musiclm_core.audio import load_audio, save_audio
from musiclm_core.cli import Progress, main
from musiclm_core.musicgen import MusicGen

from fixtures import WORDS, tiny_musicgen, train_spm

SR, HOP = 3200, 64  # 50 frames/s
PCM16 = 1 / 32768  # wav files hold 16-bit samples


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("cli_spm"), lines=500, vocab_size=100)


def _tiny_pipeline(spm_folder, channels=1):
    from musiclm_core.t5 import T5Tokenizer

    return tiny_musicgen(T5Tokenizer.from_folder(spm_folder), channels=channels, ratios=(8, 8), bandwidth=2.2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, spm_folder):
    folder = tmp_path_factory.mktemp("cli_musicgen") / "tiny"
    _tiny_pipeline(spm_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_folder):
    from musiclm_core.musicgen import MusicGen

    return MusicGen.from_pretrained(model_folder)


def _run(model_folder, *args):
    return main(["generate", *args, "--model", str(model_folder)])


def _same_audio(path, expected):
    """The file holds `expected` (C, N) up to 16-bit rounding (and clipping to [-1, 1])."""
    wav, sr = load_audio(path)
    assert sr == SR and wav.shape == expected.shape
    assert (wav - expected.clamp(-1, 1)).abs().max() <= PCM16 + 1e-6


def test_generate_one_prompt(model_folder, model, tmp_path, capsys):
    out = tmp_path / "out.wav"
    assert _run(model_folder, "80s pop track with bassy drums and synth", "--duration", "0.5", "--seed", "3",
                "-o", str(out), "--normalize", "none") == 0
    assert f"{out}: 0.50 s, 1 channel(s) at 3200 Hz" in capsys.readouterr().out
    expected = model.generate(["80s pop track with bassy drums and synth"], duration=0.5, seed=3)[0]
    assert expected.shape == (1, 25 * HOP)  # int(0.5 * 50) = 25 frames
    _same_audio(out, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temporary file left

    # The sampling options reach the model: greedy with CFG, then top-p and temperature sampling.
    greedy = tmp_path / "greedy.wav"
    assert _run(model_folder, "calm piano", "--duration", "0.5", "--greedy", "--guidance-scale", "2",
                "-o", str(greedy), "--normalize", "none") == 0
    _same_audio(greedy, model.generate(["calm piano"], duration=0.5, do_sample=False, guidance_scale=2.0)[0])
    nucleus = tmp_path / "nucleus.flac"
    assert _run(model_folder, "calm piano", "--duration", "0.5", "--seed", "1", "--top-k", "0", "--top-p", "0.9",
                "--temperature", "0.7", "-o", str(nucleus), "--normalize", "none") == 0
    _same_audio(nucleus, model.generate(["calm piano"], duration=0.5, seed=1, top_k=0, top_p=0.9,
                                        temperature=0.7)[0])
    assert not torch.equal(load_audio(nucleus)[0], load_audio(greedy)[0])

    # --quantize reaches the loader: the same as the pipeline loaded with quantize=mode
    for mode in ("int8", "int4"):
        out = tmp_path / f"{mode}.wav"
        assert _run(model_folder, "calm piano", "--duration", "0.5", "--greedy", "--quantize", mode,
                    "-o", str(out), "--normalize", "none") == 0
        quantized = MusicGen.from_pretrained(model_folder, quantize=mode)
        _same_audio(out, quantized.generate(["calm piano"], duration=0.5, do_sample=False)[0])

    # --compile: the compiled decode steps give the eager model's greedy output (fp32)
    out = tmp_path / "compiled.wav"
    assert _run(model_folder, "calm piano", "--duration", "0.5", "--greedy", "--compile", "-o", str(out),
                "--normalize", "none") == 0
    _same_audio(out, model.generate(["calm piano"], duration=0.5, do_sample=False)[0])


def test_seed_is_printed_when_not_given(model_folder, tmp_path, capsys):
    assert _run(model_folder, "warm synth", "--duration", "0.4", "-o", str(tmp_path / "a.wav")) == 0
    err = capsys.readouterr().err
    seed = int(err.split("--seed ")[1].split()[0])
    assert _run(model_folder, "warm synth", "--duration", "0.4", "--seed", str(seed),
                "-o", str(tmp_path / "b.wav")) == 0
    assert "--seed" not in capsys.readouterr().err
    assert torch.equal(load_audio(tmp_path / "a.wav")[0], load_audio(tmp_path / "b.wav")[0])


@pytest.mark.parametrize("normalize", ["peak", "rms", "loudness"])
def test_normalize(model_folder, model, tmp_path, normalize):
    from musiclm_core import audio

    out = tmp_path / "out.wav"
    assert _run(model_folder, "soft jazz", "--duration", "0.5", "--seed", "0", "--normalize", normalize,
                "-o", str(out)) == 0
    wav = model.generate(["soft jazz"], duration=0.5, seed=0)[0]
    expected = {"peak": lambda: audio.normalize_peak(wav), "rms": lambda: audio.normalize_rms(wav),
                "loudness": lambda: audio.normalize_loudness(wav, SR)}[normalize]()
    assert (expected - wav).abs().max() > 1e-3  # the level changed
    _same_audio(out, expected)


def test_prompts_file(model_folder, model, tmp_path, capsys):
    prompts = ["calm piano", "loud rock drums", "ambient pads"]
    listing = tmp_path / "prompts.txt"
    listing.write_text(f"{prompts[0]}\n\n  {prompts[1]}  \n{prompts[2]}\n", encoding="utf-8")  # blank line skipped
    assert _run(model_folder, "--prompts-file", str(listing), "--duration", "0.4", "--seed", "5",
                "-o", str(tmp_path / "song.wav"), "--normalize", "none") == 0
    out = capsys.readouterr().out
    for i, prompt in enumerate(prompts):  # batch size 1: each output is its prompt's generation with the seed
        assert f"song_{i}.wav: 0.40 s" in out
        _same_audio(tmp_path / f"song_{i}.wav", model.generate([prompt], duration=0.4, seed=5)[0])

    # A folder as the output, prompts generated two at a time.
    folder = tmp_path / "outs"
    folder.mkdir()
    assert _run(model_folder, "--prompts-file", str(listing), "--duration", "0.4", "--seed", "5", "--batch-size",
                "2", "-o", str(folder), "--normalize", "none") == 0
    assert sorted(p.name for p in folder.iterdir()) == ["0.wav", "1.wav", "2.wav"]
    batch = model.generate(prompts[:2], duration=0.4, seed=5)
    _same_audio(folder / "0.wav", batch[0])
    _same_audio(folder / "1.wav", batch[1])
    _same_audio(folder / "2.wav", model.generate(prompts[2:], duration=0.4, seed=5)[0])

    # Twelve prompts into a new folder ("name/"): the numbers are zero-padded so that the files sort in order.
    listing.write_text("\n".join(f"{w} beat" for w in WORDS[:12]), encoding="utf-8")
    assert _run(model_folder, "--prompts-file", str(listing), "--duration", "0.4", "-o",
                str(tmp_path / "many") + "/", "--batch-size", "12") == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [f"{i:02d}.wav" for i in range(12)]


def test_output_names(tmp_path):
    from musiclm_core.cli import _output_paths

    assert _output_paths(str(tmp_path / "a.flac"), 1, False) == [tmp_path / "a.flac"]
    assert _output_paths(str(tmp_path / "a.ogg"), 3, False) == [tmp_path / f"a_{i}.ogg" for i in range(3)]
    assert _output_paths(str(tmp_path / "a.wav"), 11, False)[-2:] == [tmp_path / "a_09.wav", tmp_path / "a_10.wav"]
    assert _output_paths(str(tmp_path), 2, False) == [tmp_path / "0.wav", tmp_path / "1.wav"]
    assert _output_paths(str(tmp_path / "new") + "/", 1, False) == [tmp_path / "new" / "0.wav"]
    assert list(tmp_path.iterdir()) == []  # nothing is made before the audio is written


def test_continue(model_folder, model, tmp_path, capsys):
    # A stereo prompt at another rate: resampled to 3200 Hz and mixed to mono, as load_audio does.
    t = torch.arange(1600) / 8000  # 0.2 s: 10 frames
    prompt = save_audio(tmp_path / "prompt.wav", 0.4 * torch.stack([torch.sin(2 * torch.pi * 300 * t),
                                                                      torch.sin(2 * torch.pi * 500 * t)]), 8000)
    out = tmp_path / "out.wav"
    assert _run(model_folder, "funk bass", "--continue", str(prompt), "--duration", "0.5", "--seed", "2",
                "-o", str(out), "--normalize", "none") == 0
    wav, _ = load_audio(prompt, sample_rate=SR, channels=1)  # (1, 640)
    with torch.no_grad():
        codes = model.generate_codes(["funk bass"], duration=0.5, seed=2, prompt_audio=wav[None])
    assert codes.shape == (1, 4, 25)
    assert torch.equal(codes[:, :, :10], model.encode_audio(wav[None]))  # the output starts with the prompt
    _same_audio(out, model.decode_codes(codes)[0])
    free = model.generate_codes(["funk bass"], duration=0.5, seed=2)
    assert (codes[:, :, 10:] != free[:, :, :15]).float().mean() > 0.5  # the prompt changed the music
    # A prompt as long as the duration leaves nothing to generate.
    assert _run(model_folder, "funk bass", "--continue", str(prompt), "--duration", "0.2", "--normalize", "none",
                "-o", str(tmp_path / "long.wav")) == 1
    assert "is not shorter than the duration asked for" in capsys.readouterr().err
    assert not (tmp_path / "long.wav").exists()


def test_refuses_to_overwrite(model_folder, tmp_path, capsys):
    out = tmp_path / "out.wav"
    out.write_bytes(b"keep me")
    assert _run(model_folder, "calm piano", "--duration", "0.4", "-o", str(out)) == 1
    assert "out.wav exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    # With several prompts every output is checked before anything is generated or written.
    listing = tmp_path / "prompts.txt"
    listing.write_text("a\nb\nc\n")
    (tmp_path / "song_1.wav").write_bytes(b"keep me too")
    assert _run(model_folder, "--prompts-file", str(listing), "--duration", "0.4", "-o",
                str(tmp_path / "song.wav")) == 1
    assert "song_1.wav exists" in capsys.readouterr().err
    assert not (tmp_path / "song_0.wav").exists() and (tmp_path / "song_1.wav").read_bytes() == b"keep me too"
    assert _run(model_folder, "calm piano", "--duration", "0.4", "-o", str(out), "--overwrite") == 0
    assert load_audio(out)[0].shape == (1, 20 * HOP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav", "prompts.txt", "song_1.wav"]


@pytest.mark.parametrize("args,message,status", [  # status 2: flags that can never work; 1: files, models, runs
    ([""], "the prompt is empty", 2),
    (["   "], "the prompt is empty", 2),
    ([], "give a text prompt, or --prompts-file", 2),
    (["x", "--prompts-file", "p.txt"], "either a prompt or --prompts-file, not both", 2),
    (["--prompts-file", "missing.txt"], "no such file: missing.txt", 1),
    (["--prompts-file", "blank.txt"], "holds no prompt", 1),
    (["--prompts-file", "binary.txt"], "is not UTF-8 text", 1),
    (["--prompts-file", "."], "is not a file", 1),
    (["x", "--duration", "0"], "--duration must be a positive number of seconds, got 0.0", 2),
    (["x", "--duration", "-2"], "--duration must be a positive number", 2),
    (["x", "--duration", "nan"], "--duration must be a positive number", 2),
    (["x", "--duration", "inf"], "--duration must be a positive number", 2),
    (["x", "--duration", "301"], "--duration 301 s is about 15,050 decoding steps", 2),
    (["x", "--duration", "0.001", "--normalize", "none"], "shorter than one frame", 1),
    (["x", "--duration", "0.2"], "--normalize loudness needs at least 0.4 s of audio (--duration 0.2)", 2),
    (["x", "--top-p", "1.5"], "--top-p must be in [0, 1]", 2),
    (["x", "--top-k", "-1"], "--top-k must be an integer >= 0", 2),
    (["x", "--temperature", "0"], "--temperature must be a finite number > 0", 2),
    (["x", "--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0", 2),
    (["x", "--seed", str(2**64)], "--seed must be an integer in [0, 2**64 - 1", 2),
    (["x", "--batch-size", "0"], "--batch-size must be at least 1", 2),
    (["x", "--continue", "missing.wav"], "no such file: missing.wav", 1),
    (["x", "--continue", "."], "is a directory, not a file", 1),
    (["x", "--continue", "binary.txt"], "could not be read as audio", 1),
    (["x", "-o", "out.mp3"], "cannot tell the audio format of out.mp3", 2),
    (["x", "--device", "cuda:0"] if not torch.cuda.is_available() else ["x", "--device", "nonsense"],
     "--device", 1 if not torch.cuda.is_available() else 2),
    (["x", "--model", "./no_such_model_folder"], "no such folder: no_such_model_folder", 1),
    (["x", "--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device, the model would run on cpu", 2),
    (["x", "--compile", "--device", "meta"], "--compile is for CPU decoding, the model would run on meta", 2),
])
def test_errors(model_folder, tmp_path, monkeypatch, capsys, args, message, status):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    argv = ["generate", *args] + (["--seed", "0"] if "--seed" not in args else [])  # no line tells a random seed
    if "-o" not in args:
        argv += ["-o", "out.wav"]
    if "--model" not in args:
        argv += ["--model", str(model_folder)]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("musiclm generate: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1  # one line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "blank.txt", "p.txt"]  # nothing written


def test_usage_errors_exit_2(model_folder, tmp_path):
    for args in (["x", "--duration", "abc"], ["x", "--normalize", "loud"], ["x", "--dtype", "float64"]):
        argv = ["generate", *args, "--model", str(model_folder), "-o", "out.wav"]
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2  # argparse: a bad value
    # -o is optional for argparse (the --prompts/--out mode has none): its absence is our own usage error
    assert main(["generate", "x", "--model", str(model_folder)]) == 2


def test_progress_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress("prompt 1/1", stream=screen, width=10)
    for done in (0, 5, 10):
        progress(done, 10)
    lines = screen.getvalue().split("\r")[1:]
    assert lines[0].startswith("prompt 1/1 [..........] 0/10 frames")
    assert lines[1].startswith("prompt 1/1 [#####.....] 5/10 frames")
    assert lines[2].startswith("prompt 1/1 [##########] 10/10 frames") and lines[2].endswith("\n")
    log = io.StringIO()  # not a terminal: nothing is drawn
    Progress("x", stream=log)(5, 10)
    assert log.getvalue() == ""


def test_stereo_and_dtype(spm_folder, tmp_path):
    folder = tmp_path / "stereo"
    _tiny_pipeline(spm_folder, channels=2).save_pretrained(folder)
    out = tmp_path / "out.wav"
    assert main(["generate", "wide synth", "--model", str(folder), "--duration", "0.4", "--dtype", "bfloat16",
                 "--device", "cpu", "-o", str(out)]) == 0
    wav, sr = load_audio(out)
    assert sr == SR and wav.shape == (2, 20 * HOP) and not torch.equal(wav[0], wav[1])


# --------------------------------------------------------------------------------------------------------------
# convert


def test_convert_musicgen_and_t5(spm_folder, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from musiclm_core.musicgen import MusicGen
    from musiclm_core.t5 import T5Encoder

    torch.manual_seed(0)
    t5 = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, feed_forward_proj="relu")
    codec = transformers.EncodecConfig(sampling_rate=SR, audio_channels=1, hidden_size=16, num_filters=4,
                                       upsampling_ratios=[8, 8], codebook_size=2048, target_bandwidths=[2.2],
                                       num_lstm_layers=1, use_causal_conv=False, use_conv_shortcut=False,
                                       normalize=False)
    decoder = transformers.MusicgenDecoderConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 ffn_dim=256, num_codebooks=4, vocab_size=2048,
                                                 max_position_embeddings=256)
    config = transformers.MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(),
                                         decoder=decoder.to_dict())
    hf = transformers.MusicgenForConditionalGeneration(config).eval()
    src = tmp_path / "hf_musicgen"
    hf.save_pretrained(src)
    shutil.copy(spm_folder / "spiece.model", src / "spiece.model")
    assert main(["convert", str(src), str(tmp_path / "native")]) == 0
    assert "(transformers musicgen) ->" in capsys.readouterr().out
    meta = json.loads((tmp_path / "native" / "config.json").read_text())
    assert meta["musiclm_core"]["model"] == "musicgen"
    kwargs = dict(duration=0.4, seed=1)
    assert torch.equal(MusicGen.from_pretrained(tmp_path / "native").generate(["calm piano"], **kwargs),
                       MusicGen.from_pretrained(src).generate(["calm piano"], **kwargs))
    assert main(["convert", str(src), str(tmp_path / "native")]) == 1
    assert "native exists; pass --overwrite" in capsys.readouterr().err
    assert main(["generate", "calm piano", "--model", str(src), "--duration", "0.4",
                 "-o", str(tmp_path / "from_hf.wav")]) == 0  # generate reads the transformers folder as well

    t5_src = tmp_path / "hf_t5"
    transformers.T5EncoderModel(t5).save_pretrained(t5_src)
    shutil.copy(spm_folder / "spiece.model", t5_src / "spiece.model")
    assert main(["convert", str(t5_src), str(tmp_path / "t5_native")]) == 0
    ours, ref = T5Encoder.from_pretrained(tmp_path / "t5_native"), T5Encoder.from_pretrained(t5_src)
    with torch.no_grad():
        a, b = ours.encode_text(["calm piano", "loud drums"]), ref.encode_text(["calm piano", "loud drums"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
