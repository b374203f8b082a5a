"""MusicGen LM fine-tuning (musiclm_core/train): the delayed-code loss, the data folder and its cache, the loop
(overfitting a tiny set, exact resume, activation checkpointing, condition dropout, bf16), on tiny models."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm_core.cli import random_tiny_musicgen
from musiclm_core.delay import apply_delay
from musiclm_core.musicgen import MusicGen, MusicGenConfig, MusicGenLM
from musiclm_core.train import data, losses, loop
from musiclm_core.train import musicgen as tm

SR = 32000  # the tiny random MusicGen's codec: 32 kHz, hop 640, 50 frames/s


def write_clips(folder, n=4, seconds=1.0, sidecar=True):
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    for i in range(n):
        sf.write(folder / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t)).astype(np.float32), SR)
        if sidecar:
            (folder / f"clip{i}.txt").write_text(f"tone number {i}\n")
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, a second thread only waits


@pytest.fixture(scope="module")
def pipeline():
    return random_tiny_musicgen(0)


@pytest.fixture(scope="module")
def clips(pipeline, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return data.encode_folder(write_clips(root / "data"), pipeline, root / "cache")


# -- the loss ---------------------------------------------------------------------------------------------------


def test_delayed_inputs_shift_by_one_step():
    codes = torch.arange(12).view(1, 3, 4)
    inputs, targets = losses.delayed_inputs(codes, [0, 1, 2], special=99)
    steps = apply_delay(codes, [0, 1, 2], 99)
    assert torch.equal(inputs, steps[:, :, :-1]) and torch.equal(targets, steps[:, :, 1:])
    assert inputs[0, 0, 0] == 99  # the BOS column is read, never predicted


def test_cross_entropy_masks_padding_and_averages_codebooks():
    torch.manual_seed(0)
    B, K, T, V, P = 2, 3, 5, 7, 7
    codes = torch.randint(0, V, (B, K, T))
    codes[1, :, 3:] = P  # a shorter clip: frames past its end are special
    _, targets = losses.delayed_inputs(codes, [0, 1, 2], P)
    logits = torch.randn(B, K, targets.shape[-1], V)
    loss, per = losses.codebook_cross_entropy(logits, targets, P)
    # the definition, written out: each codebook's mean over its real targets, then the mean over codebooks
    expected = []
    for k in range(K):
        terms = [-torch.log_softmax(logits[b, k, s], -1)[targets[b, k, s]] for b in range(B)
                 for s in range(targets.shape[-1]) if targets[b, k, s] != P]
        assert len(terms) == 5 + 3  # the delay padding and the missing frames are not targets
        expected.append(torch.stack(terms).mean())
    assert torch.allclose(per, torch.stack(expected), atol=1e-6)
    assert abs(loss.item() - torch.stack(expected).mean().item()) < 1e-6
    # masked slots do not count; a real slot does
    masked = (targets == P).nonzero()[0].tolist()
    changed = logits.clone()
    changed[(*masked, 0)] += 100.0  # one class of a masked slot
    assert abs(losses.codebook_cross_entropy(changed, targets, P)[0].item() - loss.item()) < 1e-6
    real = (targets != P).nonzero()[0].tolist()
    changed = logits.clone()
    changed[(*real, targets[tuple(real)])] += 5.0  # its target's logit
    assert abs(losses.codebook_cross_entropy(changed, targets, P)[0].item() - loss.item()) > 1e-2


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"targets must be \(B, K, S\)"):
        losses.codebook_cross_entropy(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"codebook\(s\) \[1\] have no target"):
        targets = torch.tensor([[[0, 1, 4], [4, 4, 4]]])
        losses.codebook_cross_entropy(torch.zeros(1, 2, 3, 4), targets, 4)


# -- data -------------------------------------------------------------------------------------------------------


def test_captions_from_sidecars_and_jsonl(tmp_path):
    folder = write_clips(tmp_path / "d", n=3)
    (folder / "clip2.txt").unlink()
    (folder / "captions.jsonl").write_text(json.dumps({"path": "clip2.wav", "caption": "from jsonl"}) + "\n"
                                           + json.dumps({"path": "clip0.wav", "caption": "jsonl wins"}) + "\n")
    found = {c.path.name: c.caption for c in data.read_captions(folder)}
    assert found == {"clip0.wav": "jsonl wins", "clip1.wav": "tone number 1", "clip2.wav": "from jsonl"}


@pytest.mark.parametrize("breakage, message", [
    ("no_caption", r"clip1\.wav has no caption: add clip1\.txt"),
    ("empty_caption", r"clip1\.txt \(the caption of clip1\.wav\) is empty"),
    ("bad_json", r"captions\.jsonl line 1 is not JSON"),
    ("missing_audio", r"captions\.jsonl line 1: audio file .*gone\.wav does not exist"),
    ("not_a_dir", r"does not exist or is not a folder"),
])
def test_caption_errors_name_the_file(tmp_path, breakage, message):
    folder = write_clips(tmp_path / "d", n=2)
    if breakage == "no_caption":
        (folder / "clip1.txt").unlink()
    elif breakage == "empty_caption":
        (folder / "clip1.txt").write_text("  \n")
    elif breakage == "bad_json":
        (folder / "captions.jsonl").write_text("{not json\n")
    elif breakage == "missing_audio":
        (folder / "captions.jsonl").write_text(json.dumps({"path": "gone.wav", "caption": "x"}) + "\n")
    else:
        folder = folder / "clip0.wav"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.read_captions(folder)


def test_unreadable_audio_names_the_file(pipeline, tmp_path):
    folder = write_clips(tmp_path / "d", n=2)
    (folder / "clip1.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match=r"cannot read training audio .*clip1\.wav"):
        data.encode_folder(folder, pipeline, tmp_path / "cache")


def test_cache_is_reused_and_source_untouched(pipeline, tmp_path):
    folder = write_clips(tmp_path / "d", n=3)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    first = data.encode_folder(folder, pipeline, tmp_path / "cache")
    entries = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(entries) == 3
    second = data.encode_folder(folder, pipeline, tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == entries  # read, not rewritten
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(first, second))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before
    with torch.no_grad():  # the cached codes are the pipeline's encoding of the clip
        wav = torch.from_numpy(sf.read(folder / "clip0.wav", dtype="float32")[0])[None, None]
        assert torch.equal(first[0].codes, pipeline.encode_audio(wav)[0])
    with pytest.raises(ValueError, match="must lie outside the data folder"):
        data.encode_folder(folder, pipeline, folder / "cache")


def test_batches_are_a_function_of_the_step(clips):
    batches = data.MusicGenBatches(clips, batch_size=3, segment_frames=20, special=2048, seed=1, cond_dropout=0.5)
    a, b = batches.batch(5), batches.batch(5)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.dropped, b.dropped)
    assert not torch.equal(batches.batch(6).codes, a.codes)
    long = data.MusicGenBatches(clips, batch_size=1, segment_frames=80, special=2048)
    assert (long.batch(0).codes[0, :, 50:] == 2048).all()  # a 50-frame clip padded to 80 with the special id
    # two ranks take the two halves of the global batch
    whole = data.MusicGenBatches(clips, batch_size=4, segment_frames=20, special=2048, seed=1)
    halves = [data.MusicGenBatches(clips, batch_size=2, segment_frames=20, special=2048, seed=1, rank=r,
                                   world_size=2).batch(3).codes for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole.batch(3).codes)


# -- the objective ----------------------------------------------------------------------------------------------


def test_checkpointing_gives_the_same_loss_and_gradients(pipeline, clips):
    torch.manual_seed(0)
    lm = MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=32))
    batch = data.MusicGenBatches(clips, batch_size=2, segment_frames=20, special=2048).batch(0)
    states, mask, _ = tm.conditioning(pipeline, batch, torch.device("cpu"))
    results = []
    for flag in (False, True):
        lm.zero_grad()
        loss, _ = tm.MusicGenObjective(lm, checkpointing=flag)(batch.codes, states, mask)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lm.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_dropped_rows_get_the_null_condition(pipeline, clips):
    batches = data.MusicGenBatches(clips, batch_size=4, segment_frames=20, special=2048, cond_dropout=0.5, seed=3)
    batch = batches.batch(0)
    assert 0 < int(batch.dropped.sum()) < 4
    states, mask, _ = tm.conditioning(pipeline, batch, torch.device("cpu"))
    assert (mask[batch.dropped] == 0).all() and (states[batch.dropped] == 0).all()
    assert (mask[~batch.dropped].sum(-1) > 0).all()
    lm = pipeline.lm
    with torch.no_grad():
        with_memory = lm(batch.codes, memory=lm.cross_memory(states, mask))
        null = lm(batch.codes, memory=None)  # generation's unconditional rows
    d = batch.dropped
    assert torch.allclose(with_memory[d], null[d], atol=1e-5)
    assert (with_memory[~d] - null[~d]).abs().max() > 1e-3  # the kept rows do hear the text


def test_melody_objective_uses_the_chroma_prefix():
    from musiclm_core.melody import PRESETS, MusicGenMelodyLM

    torch.manual_seed(0)
    lm = MusicGenMelodyLM(PRESETS["tiny"])
    codes = torch.randint(0, 2048, (2, 4, 10))
    states, mask = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.long)
    chroma = torch.nn.functional.one_hot(torch.randint(0, 12, (2, 8)), 12).float()
    objective = tm.MusicGenObjective(lm)
    loss, per = objective(codes, states, mask, chroma)
    assert per.shape == (4,) and math.isfinite(loss.item())
    other = objective(codes, states, mask, chroma.roll(3, dims=-1))[0]
    assert abs(other.item() - loss.item()) > 1e-4  # the chroma matters
    loss.backward()
    assert lm.chroma_proj.weight.grad.abs().sum() > 0


def test_bf16_autocast_on_the_cpu(pipeline, clips):
    batch = data.MusicGenBatches(clips, batch_size=2, segment_frames=20, special=2048).batch(0)
    states, mask, _ = tm.conditioning(pipeline, batch, torch.device("cpu"))
    objective = tm.MusicGenObjective(pipeline.lm)
    with torch.no_grad():
        fp32 = objective(batch.codes, states, mask)[0]
        with loop.autocast(torch.device("cpu"), True):
            bf16 = objective(batch.codes, states, mask)[0]
    assert bf16.dtype == torch.float32  # the loss is taken in fp32
    assert abs(bf16.item() - fp32.item()) < 0.05 and bf16.item() != fp32.item()


# -- the loop ---------------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_then_decays():
    config = loop.TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [loop.learning_rate(config, s) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[109] > 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    with pytest.raises(ValueError, match="steps and grad_accum must be >= 1"):
        loop.TrainConfig(steps=0)


def test_tiny_model_overfits_a_tiny_set(clips, tmp_path):
    pipe = random_tiny_musicgen(1)
    config = loop.TrainConfig(steps=40, lr=5e-3, warmup_steps=5)
    losses_ = tm.train_musicgen(pipe, clips, tmp_path / "run", config, batch_size=4, segment_frames=20,
                                cond_dropout=0.0)
    assert losses_[0] > 7.0  # about ln(2048) = 7.6 at the start
    assert losses_[0] / np.mean(losses_[-5:]) > 10  # 4 clips of 1 s memorised
    records = loop.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 41)) and records[0]["loss"] == losses_[0]
    assert all(r["tokens"] == 4 * 4 * 20 and r["tokens_per_s"] > 0 for r in records)


def test_resume_reproduces_the_uninterrupted_run(clips, tmp_path):
    config = loop.TrainConfig(steps=6, lr=3e-3, warmup_steps=2, grad_accum=2, grad_clip=0.5, seed=4, save_every=2)
    settings = dict(batch_size=2, segment_frames=12, cond_dropout=0.5)
    whole = tm.train_musicgen(random_tiny_musicgen(2), clips, tmp_path / "a", config, **settings)

    def interrupt(record):  # Ctrl-C after step 3: the last checkpoint is step 2's
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tm.train_musicgen(random_tiny_musicgen(2), clips, tmp_path / "b", config, log=interrupt, **settings)
    assert tm.weights_step(tmp_path / "b") == 2
    resumed_pipe = MusicGen.from_pretrained(tmp_path / "b")  # what the CLI does: the run folder's latest weights
    torch.manual_seed(123)  # the global RNG is restored from the checkpoint, whatever it is now
    rest = tm.train_musicgen(resumed_pipe, clips, tmp_path / "b", config, resume=True, **settings)
    assert rest == whole[2:]  # bit for bit on the CPU: the same computation, resumed
    a, b = (MusicGen.from_pretrained(tmp_path / x).lm.state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in loop.read_metrics(tmp_path / "b")] == list(range(1, 7))
    more = loop.TrainConfig(**{**vars(config), "steps": 7})
    with pytest.raises(ValueError, match=r"other settings \(batch_size"):
        tm.train_musicgen(resumed_pipe, clips, tmp_path / "b", more, resume=True, **{**settings, "batch_size": 3})
    with pytest.raises(ValueError, match="already at step 6 of --steps 6"):
        tm.train_musicgen(resumed_pipe, clips, tmp_path / "b", config, resume=True, **settings)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        tm.train_musicgen(resumed_pipe, clips, tmp_path / "c", config, resume=True, **settings)
    state = tmp_path / "b" / loop.STATE_FILE  # weights newer than the trainer state: refused
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    meta["training"]["step"] = 5
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights are from step 5, the trainer state from step 6"):
        tm.train_musicgen(resumed_pipe, clips, tmp_path / "b", more, resume=True, **settings)
    assert state.is_file()


def test_run_folder_loads_and_generates(clips, tmp_path):
    pipe = random_tiny_musicgen(3)
    tm.train_musicgen(pipe, clips, tmp_path / "run", loop.TrainConfig(steps=3, lr=1e-3), batch_size=2,
                      segment_frames=20)
    loaded = MusicGen.from_pretrained(tmp_path / "run")
    trained = pipe.lm.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.lm.state_dict().items())
    wav = loaded.generate(["tone number 1"], duration=0.2, seed=0)
    assert wav.shape == (1, 1, 10 * 640) and torch.isfinite(wav).all()


def test_melody_run_with_chroma_from_the_clips(tmp_path):
    from musiclm_core.melody import PRESETS, MusicGenMelody, MusicGenMelodyLM

    tiny = random_tiny_musicgen(4)
    torch.manual_seed(0)
    pipe = MusicGenMelody(MusicGenMelodyLM(PRESETS["tiny"]), tiny.codec, tiny.text_encoder)
    clips = data.encode_folder(write_clips(tmp_path / "d", n=3, seconds=2.0), pipe, tmp_path / "cache", chroma=True)
    assert clips[0].chroma.shape == (1 + 64000 // 4096, 12) and (clips[0].chroma.sum(-1) == 1).all()
    assert (clips[0].chroma[:, 9] == 1).all() and (clips[2].chroma[:, 4] == 1).all()  # 110 Hz: A, 330 Hz: E
    batch = data.MusicGenBatches(clips, batch_size=2, segment_frames=50, special=2048, cond_dropout=1.0,
                                 chroma_frames_per_frame=640 / 4096).batch(0)
    _, _, chroma = tm.conditioning(pipe, batch, torch.device("cpu"))
    assert chroma.shape == (2, 8, 12) and (chroma[..., 0] == 1).all()  # dropped rows: the null chroma
    losses_ = tm.train_musicgen(pipe, clips, tmp_path / "run", loop.TrainConfig(steps=3, lr=1e-3), batch_size=2,
                                segment_frames=50, cond_dropout=0.3)
    assert len(losses_) == 3 and all(math.isfinite(x) for x in losses_)
    loaded = MusicGenMelody.from_pretrained(tmp_path / "run")
    assert all(torch.equal(v, pipe.lm.state_dict()[k]) for k, v in loaded.lm.state_dict().items())


def test_plain_linears_undo_the_blocked_layout():
    from musiclm_core.kernels import linear

    torch.manual_seed(0)
    lm = MusicGenLM(MusicGenConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=2048, text_dim=32))
    codes = torch.randint(0, 2048, (2, 4, 5))
    with torch.no_grad():
        before = lm(codes)
        linear.relayout(lm, route_name="blocked", block=512)  # ffn_out (2048 inputs) becomes 4 blocks
        assert isinstance(lm.layers[0].ffn_out, linear.BlockedLinear)
        tm.plain_linears(lm)
        assert not any(isinstance(m, linear.BlockedLinear) for m in lm.modules())
        assert type(lm.layers[0].ffn_out) is torch.nn.Linear
        assert torch.allclose(lm(codes), before, atol=1e-5)
