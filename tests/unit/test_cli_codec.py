"""`musiclm encode / decode / convert` on a tiny native codec: round trip, files written, errors and exit codes."""

import json

import pytest
import torch
from safetensors import safe_open

from musiclm_core.audio import load_audio, save_audio
from musiclm_core.cli import main
from musiclm_core.encodec import PRESETS, EnCodec


@pytest.fixture(scope="module")
def codec_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cli") / "codec"
    EnCodec(PRESETS["tiny"]).save_pretrained(folder)
    return folder


@pytest.fixture
def wav_file(tmp_path):
    wav = 0.5 * torch.sin(torch.arange(1000) / 7.0)[None]  # (1, 1000): 125 frames of 8 samples
    return save_audio(tmp_path / "in.wav", wav, 16_000)


def test_encode_decode_round_trip(codec_folder, wav_file, tmp_path, capsys):
    codes_path, out_path = tmp_path / "x.codes", tmp_path / "out.wav"
    assert main(["encode", str(wav_file), str(codes_path), "--model", str(codec_folder), "--bandwidth", "32"]) == 0
    assert "2 codebooks x 125 frames at 32.0 kbps" in capsys.readouterr().out
    with safe_open(str(codes_path), framework="pt") as f:
        meta, codes = f.metadata(), f.get_tensor("codes")
    assert meta["model"] == str(codec_folder.resolve()) and meta["sample_rate"] == "16000" and meta["length"] == "1000"
    assert meta["bandwidth"] == "32.0" and meta["channels"] == "1"
    codec = EnCodec.from_pretrained(codec_folder)
    wav, _ = load_audio(wav_file)
    assert torch.equal(codes, codec.encode(wav[None], 32.0))

    assert main(["decode", str(codes_path), str(out_path)]) == 0  # the codec named in the codes file
    decoded, sr = load_audio(out_path)
    assert sr == 16_000 and decoded.shape == (1, 1000)  # trimmed back to the input's length
    expected = codec.decode(codes)[0, :, :1000].clamp(-1, 1)
    assert (decoded - expected).abs().max() <= 1 / 32768 + 1e-6  # 16-bit PCM rounding


def test_outputs_are_not_overwritten_without_the_flag(codec_folder, wav_file, tmp_path, capsys):
    codes_path = tmp_path / "x.codes"
    codes_path.write_text("keep me")
    assert main(["encode", str(wav_file), str(codes_path), "--model", str(codec_folder)]) == 1
    assert "x.codes exists; pass --overwrite" in capsys.readouterr().err
    assert codes_path.read_text() == "keep me"
    assert main(["encode", str(wav_file), str(codes_path), "--model", str(codec_folder), "--overwrite"]) == 0
    assert main(["decode", str(codes_path), str(wav_file), "--model", str(codec_folder)]) == 1
    assert "in.wav exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.wav", "x.codes"]  # no temporary files left


def test_missing_input_file(codec_folder, tmp_path, capsys):
    assert main(["encode", str(tmp_path / "nope.wav"), str(tmp_path / "x.codes"), "--model", str(codec_folder)]) == 1
    assert capsys.readouterr().err.startswith("musiclm encode: error: no such file: ")
    assert main(["decode", str(tmp_path / "nope.codes"), str(tmp_path / "out.wav")]) == 1
    assert "musiclm decode: error: no such file: " in capsys.readouterr().err
    assert not (tmp_path / "x.codes").exists() and not (tmp_path / "out.wav").exists()


def test_bad_inputs(codec_folder, wav_file, tmp_path, capsys):
    assert main(["encode", str(wav_file), str(tmp_path / "x.codes"), "--model", str(codec_folder),
                 "--bandwidth", "6"]) == 1
    assert "bandwidth 6.0 kbps is not one this model was trained for" in capsys.readouterr().err
    assert main(["decode", str(wav_file), str(tmp_path / "out.wav")]) == 1
    assert "is not a codes file" in capsys.readouterr().err
    assert main(["encode", str(wav_file), str(tmp_path / "x.codes"), "--model", str(tmp_path / "no_model")]) == 1
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["encode", str(wav_file)])  # argparse usage error
    assert exit_.value.code == 2


def test_convert_writes_a_native_folder(codec_folder, tmp_path, capsys):
    # A transformers-layout folder (written from our own model by the unit tests' helper) -> native.
    from test_encodec import write_transformers_folder

    codec = EnCodec.from_pretrained(codec_folder)
    src = write_transformers_folder(codec, tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "config.json").read_text())["musiclm_core"]["model"] == "encodec"
    wav = torch.randn(1, 1, 64)
    assert torch.equal(EnCodec.from_pretrained(tmp_path / "native").encode(wav, 32.0), codec.encode(wav, 32.0))
    assert main(["convert", str(src), str(tmp_path / "native")]) == 1
    assert "native exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "native"), "--overwrite"]) == 0
    assert main(["convert", str(codec_folder), str(tmp_path / "again")]) == 1
    assert "already a native checkpoint" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    assert main(["convert", str(tmp_path / "other"), str(tmp_path / "other_native")]) == 1
    assert "converting a 'wav2vec2' checkpoint (transformers layout) is not supported yet" in capsys.readouterr().err
