"""What a new user hits (issue 18): the random tiny checkpoint, fast help, lengths that are refused or visible,
codes files that carry their codec, and errors that are one line in the flags' own names.

Most tests run on the folder `musiclm convert --random-tiny` writes: a MusicGen at 32 kHz (hop 640, 50 frames/s)
with 4 codebooks of 2048 entries, a 2-layer LM and a 2-layer T5; 0.5 s is 25 frames.
"""

import io
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import musiclm_core
from musiclm_core import cli, hub
from musiclm_core.audio import load_audio, save_audio
from musiclm_core.cli import main
from musiclm_core.musicgen import MusicGen


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new_user") / "tiny"
    assert main(["convert", "--random-tiny", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return MusicGen.from_pretrained(tiny_folder)


def _err_line(capsys, command="generate") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"musiclm {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# The random tiny checkpoint (README: Offline)


def test_random_tiny_generates_and_its_audio_depends_on_the_codes(tiny_folder, tiny, tmp_path, capsys):
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["codec", "config.json", "lm", "text_encoder"]
    assert tiny.sample_rate == 32_000 and tiny.frame_rate == 50 and tiny.codec.num_codebooks == 4
    codebooks = tiny.codec.quantizer.codebooks
    assert codebooks.abs().min(dim=-1).values.max() > 0 and codebooks.std() > 0.5  # random, not zero

    out = tmp_path / "out.wav"
    assert main(["generate", "calm piano", "--model", str(tiny_folder), "--duration", "0.5", "--seed", "1",
                 "-o", str(out), "--normalize", "none"]) == 0
    assert f"{out}: 0.50 s, 1 channel(s) at 32000 Hz" in capsys.readouterr().out
    wav, sr = load_audio(out)
    assert sr == 32_000 and wav.shape == (1, 25 * 640) and wav.abs().max() > 1e-3

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2048, (1, 4, 25), generator=g)
    b = a.clone()
    b[:, 0] = torch.randint(0, 2048, (1, 25), generator=g)  # another first codebook
    with torch.no_grad():
        wa, wb = tiny.decode_codes(a), tiny.decode_codes(b)
    assert (wa - wb).abs().max() > 100 * 1e-4 * wa.abs().max()  # far beyond any rounding

    # The same seed writes the same weights; another seed others.
    assert main(["convert", "--random-tiny", str(tmp_path / "again")]) == 0
    again = MusicGen.from_pretrained(tmp_path / "again")
    assert all(torch.equal(v, tiny.lm.state_dict()[k]) for k, v in again.lm.state_dict().items())
    assert main(["convert", "--random-tiny", str(tmp_path / "other"), "--seed", "1"]) == 0
    other = MusicGen.from_pretrained(tmp_path / "other")
    assert not torch.equal(other.lm.heads[0].weight, tiny.lm.heads[0].weight)
    assert main(["convert", "--random-tiny", str(tmp_path / "other")]) == 1
    assert "other exists; pass --overwrite" in _err_line(capsys, "convert")
    assert main(["convert", "x", "--random-tiny", str(tmp_path / "third")]) == 2
    assert "either SRC OUT or --random-tiny DIR" in _err_line(capsys, "convert")


# ---------------------------------------------------------------------------------------------------------------
# Help, version, defaults


def test_help_imports_neither_torch_nor_the_models():
    code = ("import sys; import musiclm_core; from musiclm_core.cli import build_parser; "
            "build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'huggingface_hub', 'musiclm_core.musicgen') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_package_names_load_on_first_use():
    assert sorted(musiclm_core.__all__) == sorted(musiclm_core._EXPORTS)
    for name in musiclm_core.__all__:
        value = getattr(musiclm_core, name)
        assert value.__name__ == name and name in dir(musiclm_core)
    from musiclm_core import MusicGen as imported

    assert imported is MusicGen
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        musiclm_core.Nope


def test_version_and_defaults_in_every_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping (textwrap also breaks at hyphens)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("musiclm 0.")
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"encode", "decode", "convert", "generate", "clap", "eval", "train"}
    nested = {f"train {name}": sub for name, sub in commands["train"]._subparsers._group_actions[0].choices.items()}
    assert set(nested) == {"train musicgen", "train ldm"}
    for name, sub in {**commands, **nested}.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.default not in (None, False) and action.help is not None and action.dest != "help":
                assert f"(default: {action.default})" in text or "default" in action.help, (name, action.dest)
    generate = " ".join(commands["generate"].format_help().split())
    assert "(default: facebook/musicgen-small)" in generate and "(default: 250)" in generate
    assert "(default: facebook/encodec_32khz)" in " ".join(commands["encode"].format_help().split())


def test_cli_choices_match_the_library():
    from musiclm_core.kernels import quant

    assert sorted(cli.QUANT_MODES) == sorted(quant.MODES)
    assert all(isinstance(getattr(torch, name), torch.dtype) for name in cli.DTYPES)


# ---------------------------------------------------------------------------------------------------------------
# Bounded, visible work


def test_long_duration_needs_a_flag_and_says_what_it_costs(tiny_folder, tmp_path, monkeypatch, capsys):
    argv = ["generate", "x", "--model", str(tiny_folder), "--duration", "100000", "-o", str(tmp_path / "a.wav")]
    assert main(argv) == 2
    err = _err_line(capsys)
    assert "--duration 100000 s is about 5,000,000 decoding steps" in err and "--allow-long" in err
    assert " h at the ~20 steps/s" in err

    def no_load(*args, **kwargs):
        raise cli.CLIError("loading was reached")

    monkeypatch.setattr(MusicGen, "from_pretrained", no_load)
    assert main(argv + ["--allow-long"]) == 1  # the check passes with the flag
    assert "loading was reached" in _err_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_max_new_tokens_beyond_memory_is_refused_before_allocating(tiny):
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 needs about [\d.]+ TB for the decoding state "
                                         r".* more than the .* of memory on cpu: ask for less"):
        tiny.generate_codes(["calm piano"], max_new_tokens=10**9)  # TBs of KV cache: refused, nothing allocated
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 1000000000.0"):
        tiny.generate_codes(["calm piano"], max_new_tokens=1e9)
    assert tiny.generate_codes(["calm piano"], max_new_tokens=8, do_sample=False).shape == (1, 4, 5)


def test_melody_max_new_tokens_beyond_memory_is_refused():
    from musiclm_core import melody
    from musiclm_core.chroma import null_chroma

    lm = melody.MusicGenMelodyLM(melody.PRESETS["tiny"]).eval()
    with pytest.raises(ValueError, match=r"max_new_tokens=1000000000 needs about [\d.]+ TB"):
        melody.generate_codes(lm, null_chroma(1, 3), max_new_tokens=10**9)
    assert melody.generate_codes(lm, null_chroma(1, 3), max_new_tokens=8, do_sample=False).shape == (1, 4, 5)


def test_progress_lines_off_a_terminal(monkeypatch):
    clock = iter([0.0, 1.0, 5.0, 12.0, 13.0, 30.0])
    monkeypatch.setattr(cli.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    progress = cli.Progress("prompt 1/1", stream=log, every=10.0)  # t = 0
    for done in (10, 20, 30, 30, 50):  # t = 1, 5, 12, (repeat: no clock read), 13
        progress(done, 50)
    lines = log.getvalue().splitlines()
    assert lines == ["prompt 1/1: 30/50 frames, 2.5 frames/s, 8 s left", "prompt 1/1: 50/50 frames, 3.8 frames/s"]


def test_progress_bar_on_a_terminal_draws_each_count_once():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = cli.Progress("prompt 1/1", stream=screen, width=10)
    for done in (0, 5, 5, 10, 10, 10):
        progress(done, 10)
    draws = screen.getvalue().split("\r")[1:]
    assert len(draws) == 3 and screen.getvalue().count("\n") == 1
    assert draws[1].startswith("prompt 1/1 [#####.....] 5/10 frames")
    assert draws[2].startswith("prompt 1/1 [##########] 10/10 frames") and draws[2].endswith("\n")


def test_long_form_reports_each_frame_count_once(tiny):
    tiny.max_duration = 0.4  # windows of 20 frames, extended by 10 at a time: 0.8 s takes three windows
    try:
        calls = []
        tiny.generate_codes(["calm piano"], duration=0.8, extend_stride=0.2, do_sample=False,
                            progress=lambda done, total: calls.append((done, total)))
    finally:
        tiny.max_duration = 30.0
    assert calls == [(i, 40) for i in range(1, 41)]  # before: the finished count came max(delays) + 1 times


# ---------------------------------------------------------------------------------------------------------------
# Codes files carry their codec


@pytest.fixture
def codes_file(tiny_folder, tmp_path, monkeypatch):
    """A codes file encoded with the tiny pipeline's codec given as a relative path (from its parent folder)."""
    wav = 0.5 * torch.sin(torch.arange(16_000) / 7.0)[None]  # 0.5 s at 32 kHz: 25 frames
    save_audio(tmp_path / "in.wav", wav, 32_000)
    monkeypatch.chdir(tiny_folder.parent)
    assert main(["encode", str(tmp_path / "in.wav"), str(tmp_path / "x.codes"), "--model", "tiny/codec"]) == 0
    monkeypatch.chdir(tmp_path)
    return tmp_path / "x.codes"


def _rewrite(path, codes=None, **metadata):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if codes is not None:
        tensors["codes"] = codes
    save_file(tensors, str(path), metadata={**meta, **metadata})


def test_codes_file_records_the_codec_and_decodes_from_elsewhere(codes_file, tiny_folder, capsys):
    with safe_open(str(codes_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == str((tiny_folder / "codec").resolve()) and meta["version"] == "2"
    assert meta["codec_config"] == cli.codec_fingerprint(MusicGen.from_pretrained(tiny_folder).codec.config)
    assert main(["decode", str(codes_file), "out.wav"]) == 0  # another working directory than the encode's
    assert load_audio("out.wav")[0].shape == (1, 16_000)


def test_decoding_with_another_codec_is_refused(codes_file, tiny_folder, tmp_path, capsys):
    from musiclm_core.encodec import PRESETS, EnCodec

    EnCodec(PRESETS["tiny"]).save_pretrained(tmp_path / "other_codec")  # 16 kHz, other widths
    assert main(["decode", str(codes_file), "out.wav", "--model", str(tmp_path / "other_codec")]) == 1
    err = _err_line(capsys, "decode")
    assert f"was encoded with the codec {(tiny_folder / 'codec').resolve()} (config " in err
    assert f"but {tmp_path / 'other_codec'} is another codec (config " in err
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize("change,message", [
    (dict(length="99999"), "metadata length 99999 samples would encode to 157 frames at hop 640, but the file "
                           "holds 25 frames"),
    (dict(length="12"), "metadata length 12 samples would encode to 1 frames"),
    (dict(length="-5"), "metadata length = '-5' is not a positive integer"),
    (dict(codes="drop"), "holds 3 codebooks, but its bandwidth 2.2 kbps uses 4 with"),
    (dict(bandwidth="6.0"), "metadata bandwidth '6.0' kbps does not fit"),
    (dict(codec_config="0123456789abcdef"), "(config 0123456789abcdef), but"),
    (dict(codes="float"), "codes must be (1, K, T) integers"),
])
def test_codes_file_that_does_not_add_up(codes_file, tmp_path, capsys, change, message):
    if "codes" in change:
        with safe_open(str(codes_file), framework="pt") as f:
            codes = f.get_tensor("codes")
        _rewrite(codes_file, codes[:, :3] if change.pop("codes") == "drop" else codes.float(), **change)
    else:
        _rewrite(codes_file, **change)
    assert main(["decode", str(codes_file), "out.wav"]) == 1
    assert message in _err_line(capsys, "decode")
    assert not (tmp_path / "out.wav").exists()


def test_recorded_codec_that_is_gone(codes_file, tmp_path, capsys):
    _rewrite(codes_file, model=str(tmp_path / "moved_codec"))
    assert main(["decode", str(codes_file), "out.wav"]) == 1
    err = _err_line(capsys, "decode")
    assert f"names the codec {tmp_path / 'moved_codec'}, which cannot be loaded here" in err
    assert "no such folder" in err and "pass the codec with --model" in err


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line, the flags' names, exit status 2 for usage, 1 for failures, 130 for Ctrl-C


def test_flag_names_in_messages(tiny_folder, tmp_path, capsys):
    base = ["generate", "x", "--model", str(tiny_folder), "-o", str(tmp_path / "a.wav"), "--seed", "0"]
    for args, message in [(["--top-k", "-1"], "--top-k must be an integer >= 0 (0 = off), got -1"),
                          (["--top-p", "2"], "--top-p must be in [0, 1]"),
                          (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
                          (["--temperature", "0"], "(use --greedy for greedy decoding)")]:
        assert main(base + args) == 2
        err = _err_line(capsys)
        assert message in err and "top_k" not in err and "do_sample" not in err, err
    assert cli._flag_names("top_k and top_p; seed; --seed; guidance_scale; runs/seed/a.wav; seed_1.wav") == \
        "--top-k and --top-p; --seed; --seed; --guidance-scale; runs/seed/a.wav; seed_1.wav"


def test_seed_out_of_range_is_refused_before_loading(tiny_folder, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(MusicGen, "from_pretrained", no_load)
    for seed in (str(2**70), "-1"):
        assert main(["generate", "x", "--model", str(tiny_folder), "-o", str(tmp_path / "a.wav"),
                     "--seed", seed]) == 2
        assert f"--seed must be an integer in [0, 2**64 - 1 = 18446744073709551615], got {seed}" in \
            _err_line(capsys)


def test_seed_range_in_the_api(tiny):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1"):
        tiny.generate(["x"], duration=0.1, seed=2**70)
    with pytest.raises(ValueError, match="seed must be an integer"):
        tiny.generate(["x"], duration=0.1, seed=1.5)
    assert tiny.generate_codes(["x"], duration=0.1, seed=2**64 - 1).shape == (1, 4, 5)


def test_greedy_prints_no_seed(tiny_folder, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tiny_folder), "--greedy", "--duration", "0.5",
                 "-o", str(tmp_path / "a.wav")]) == 0
    assert "seed" not in capsys.readouterr().err


def test_empty_prompt_is_refused_by_the_api_as_by_the_cli(tiny, tiny_folder, tmp_path, capsys):
    for prompts in ([""], ["calm piano", "   "]):
        with pytest.raises(ValueError, match=r"prompt \d is empty \('\s*'\): describe the music, or pass "
                                             r"prompts=None"):
            tiny.generate(prompts, duration=0.1)
    with pytest.raises(ValueError, match=r"prompt 0 is NoneType \(None\)"):
        tiny.generate([None], duration=0.1)
    assert main(["generate", "  ", "--model", str(tiny_folder), "-o", str(tmp_path / "a.wav")]) == 2
    assert "the prompt is empty" in _err_line(capsys)


def test_ctrl_c_exits_130_without_traceback_or_partial_file(tiny_folder, tmp_path, monkeypatch, capsys):
    import soundfile

    out = tmp_path / "out.wav"
    argv = ["generate", "x", "--model", str(tiny_folder), "--duration", "0.5", "--seed", "0", "-o", str(out)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(MusicGen, "generate", interrupted)
        assert main(argv) == 130
    assert capsys.readouterr().err == "musiclm generate: interrupted\n"
    write = soundfile.write

    def write_then_interrupt(*args, **kwargs):  # Ctrl-C while the file is half written
        write(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(soundfile, "write", write_then_interrupt)
    assert main(argv) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither out.wav nor its temporary file


def test_config_value_of_the_wrong_type(tiny_folder, tmp_path, capsys):
    import shutil

    from musiclm_core.convert import musicgen as convert

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    config = json.loads((broken / "lm" / "config.json").read_text())
    config["config"]["num_layers"] = "two"
    (broken / "lm" / "config.json").write_text(json.dumps(config))
    expected = f"{broken / 'lm' / 'config.json'}: field num_layers = 'two' is not an integer"
    with pytest.raises(hub.CheckpointError) as info:
        MusicGen.from_pretrained(broken)
    assert str(info.value) == expected
    assert main(["generate", "x", "--model", str(broken), "--seed", "0", "-o", str(tmp_path / "a.wav")]) == 1
    assert expected in _err_line(capsys)

    # transformers' names in a transformers config
    hf = {"model_type": "musicgen", "text_encoder": {"model_type": "t5", "d_model": 32},
          "decoder": {"hidden_size": 64, "num_hidden_layers": "two", "num_attention_heads": 4}}
    with pytest.raises(hub.CheckpointError, match=r"^hf/config.json: field decoder.num_hidden_layers = 'two' is "
                                                  r"not an integer$"):
        convert.config_from_transformers(hf, source="hf/config.json")
    hf["decoder"]["num_hidden_layers"] = 2
    hf["text_encoder"]["d_model"] = 32.5
    with pytest.raises(hub.CheckpointError, match=r"field text_encoder.d_model = 32.5 is not an integer or null"):
        convert.config_from_transformers(hf, source="hf/config.json")
    hf["text_encoder"]["d_model"] = 32
    assert convert.config_from_transformers(hf).num_layers == 2


def test_check_value_kinds():
    for value, kind in [(2, int), (2, float), (1.5, float), (True, bool), ("a", str), (None, float | None),
                        ([1, 2], tuple[int, ...]), ((0.5, 1), tuple[float, ...])]:
        assert hub.check_value(value, kind, field="f", source="s") == value
    for value, kind, expected in [(True, int, "an integer"), ("1", float, "a number"), (1, bool, "a boolean"),
                                  ([1, "x"], tuple[int, ...], "a list of integers"), ("x", int | None,
                                                                                     "an integer or null")]:
        with pytest.raises(hub.CheckpointError, match=rf"^s: field f = .* is not {expected}$"):
            hub.check_value(value, kind, field="f", source="s")


def test_audiocraft_config_value_of_the_wrong_type():
    from test_musicgen import _audiocraft_package

    from musiclm_core.convert import musicgen as convert
    from musiclm_core.musicgen import MusicGenConfig, MusicGenLM

    xp = _audiocraft_package(MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256,
                                                       text_dim=768)))["xp.cfg"]
    assert convert.config_from_audiocraft(xp).num_layers == 2
    with pytest.raises(hub.CheckpointError, match=r"^audiocraft xp\.cfg: field transformer_lm\.num_layers = 'two' "
                                                  r"is not an integer$"):
        convert.config_from_audiocraft(xp.replace("num_layers: 2", "num_layers: two"))


def test_native_t5_and_encodec_configs_of_the_wrong_type(tiny_folder, tmp_path):
    """The T5 and EnCodec parts of a native folder check their field types as the LM's does."""
    import shutil

    from musiclm_core import EnCodec, T5Encoder

    for part, field, load in [("text_encoder", "num_layers", T5Encoder.from_pretrained),
                              ("codec", "num_filters", EnCodec.from_pretrained)]:
        broken = tmp_path / part
        shutil.copytree(tiny_folder / part, broken)
        config = json.loads((broken / "config.json").read_text())
        assert field in config["config"], sorted(config["config"])
        config["config"][field] = "two"
        (broken / "config.json").write_text(json.dumps(config))
        with pytest.raises(hub.CheckpointError, match=rf"^{broken / 'config.json'}: field {field} = 'two' is not "
                                                      r"an integer$"):
            load(broken)
