"""Diffusion UNet fine-tuning (musiclm_core/train/diffusion.py) on the tiny UNet and VAE: the epsilon and v
targets, the cached latents of a clip folder, condition dropout, a tiny UNet overfitting, exact resume."""


import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm_core.mel import PRESETS as MEL_PRESETS, wav_to_mel
from musiclm_core.schedulers import NoiseSchedule
from musiclm_core.train import diffusion, loop, losses
from musiclm_core.train.data import clip_indices
from musiclm_core.unet import UNet
from musiclm_core.vae import PRESETS as VAE_PRESETS, AutoencoderKL

MEL = MEL_PRESETS["tiny"]  # 8 kHz, hop 40, 16 bins: what the tiny VAE takes
SCHEDULE = dict(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")  # the checkpoints'


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, a second thread only waits


def tiny_clips(n=4, seed=0):
    """Latent clips with a random 'CLAP' vector each: (8, 8, 8) latents for the tiny-musicldm UNet."""
    g = torch.Generator().manual_seed(seed)
    return [diffusion.LatentClip(torch.randn(8, 8, 8, generator=g), 0.05 * torch.ones(8, 8, 8),
                                 {"class_embed": torch.randn(24, generator=g)}, f"clip {i}") for i in range(n)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_recover_the_clean_latent(prediction_type):
    schedule = NoiseSchedule(**SCHEDULE, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 8, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = schedule.add_noise(z0, noise, t)
    target = losses.diffusion_target(z0, noise, t, schedule, prediction_type)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    if prediction_type == "epsilon":
        recovered = (x_t - (1 - abar).sqrt() * target) / abar.sqrt()
    else:  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        recovered = abar.sqrt() * x_t - (1 - abar).sqrt() * target
    assert torch.allclose(recovered, z0, atol=1e-4)
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        losses.diffusion_target(z0, noise, t, schedule, "sample")


def test_latent_folder_is_encoded_once(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    t = np.arange(8000) / 8000
    for i in range(2):
        sf.write(folder / f"a{i}.wav", (0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t)).astype(np.float32), 8000)
        (folder / f"a{i}.txt").write_text(f"tone {i}")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    calls = []

    def condition(wav, sr, caption):
        calls.append(caption)
        return {"class_embed": torch.full((24,), float(len(caption)))}

    clips = diffusion.encode_latent_folder(folder, vae, tmp_path / "cache", condition=condition,
                                           condition_name="test", target_frames=64, mel_config=MEL)
    assert calls == ["tone 0", "tone 1"] and clips[0].mean.shape == (8, 32, 8)
    with torch.no_grad():
        wav = torch.from_numpy(sf.read(folder / "a1.wav", dtype="float32")[0])[None]
        posterior = vae.encode(wav_to_mel(wav, 8000, 64, MEL))
    assert torch.allclose(clips[1].mean, posterior.mean[0], atol=1e-6)
    assert torch.allclose(clips[1].std, posterior.std[0], atol=1e-6)
    assert (clips[0].mean - clips[1].mean).abs().max() > 1e-3
    again = diffusion.encode_latent_folder(folder, vae, tmp_path / "cache", condition=condition,
                                           condition_name="test", target_frames=64, mel_config=MEL)
    assert len(calls) == 2 and torch.equal(again[1].mean, clips[1].mean)  # from the cache
    (folder / "a1.wav").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"cannot read training audio .*a1\.wav"):
        diffusion.encode_latent_folder(folder, vae, tmp_path / "cache2", condition=condition,
                                       condition_name="test", target_frames=64, mel_config=MEL)


def test_condition_dropout_uses_the_null_condition():
    clips = tiny_clips()
    null = {"class_embed": torch.zeros(24)}
    batches = diffusion.LatentBatches(clips, batch_size=4, scaling_factor=0.5, num_train_timesteps=1000,
                                      null_condition=null, cond_dropout=0.5, seed=2)
    b = batches.batch(0)
    assert 0 < int(b.dropped.sum()) < 4
    assert (b.condition["class_embed"][b.dropped] == 0).all()
    assert (b.condition["class_embed"][~b.dropped] != 0).all()
    assert b.z0.shape == (4, 8, 8, 8) and b.timesteps.shape == (4,)
    with pytest.raises(ValueError, match="needs a null_condition"):
        diffusion.LatentBatches(clips, batch_size=2, scaling_factor=1.0, num_train_timesteps=10, cond_dropout=0.1)


def test_mixup_rows_take_their_clips_mixtures():
    """With mixup p a row takes its clip's mixture (latents and condition) with probability p where the clip has
    one; p = 0 leaves the batches as they were without mixtures (the same draws)."""
    clips, mixed = tiny_clips(4), tiny_clips(4, seed=1)
    mixtures = [mixed[0], None, mixed[2], mixed[3]]  # clip 1 is alone in its tempo group
    common = dict(batch_size=4, scaling_factor=0.5, num_train_timesteps=1000, seed=3)
    always = diffusion.LatentBatches(clips, mixtures=mixtures, mixup=1.0, **common).batch(0)
    plain = diffusion.LatentBatches(clips, **common).batch(0)
    rows = clip_indices(3, 0, 4, 4)  # the clip of each row of step 0
    assert any(mixtures[i] is None for i in rows) and any(mixtures[i] is not None for i in rows)
    for r, i in enumerate(rows):
        source = clips[i] if mixtures[i] is None else mixtures[i]
        assert torch.equal(always.condition["class_embed"][r], source.condition["class_embed"])
        e = (plain.z0[r] / 0.5 - clips[i].mean) / clips[i].std  # the posterior noise both batches drew
        assert torch.allclose(always.z0[r], 0.5 * (source.mean + source.std * e), atol=1e-5)
    assert torch.equal(always.noise, plain.noise) and torch.equal(always.timesteps, plain.timesteps)
    never = diffusion.LatentBatches(clips, mixtures=mixtures, mixup=0.0, **common).batch(0)
    assert torch.equal(never.z0, plain.z0)
    assert torch.equal(never.condition["class_embed"], plain.condition["class_embed"])
    half = diffusion.LatentBatches(clips, mixtures=mixtures, mixup=0.5, **common)
    taken = eligible = 0
    for step in range(8):
        b = half.batch(step)
        for r, i in enumerate(clip_indices(3, 4 * step, 4, 4)):
            if mixtures[i] is not None:
                eligible += 1
                taken += torch.equal(b.condition["class_embed"][r], mixtures[i].condition["class_embed"])
    assert 0 < taken < eligible
    with pytest.raises(ValueError, match=r"mixup probability must be in \[0, 1\], got 1.5"):
        diffusion.LatentBatches(clips, mixtures=mixtures, mixup=1.5, **common)
    with pytest.raises(ValueError, match=r"mixup > 0 needs one mixture \(or None\) per clip: 4 clips, no mixtures"):
        diffusion.LatentBatches(clips, mixup=0.5, **common)


def clicks(bpm, first, seconds, sample_rate, seed):
    """(N,) decaying 1 kHz clicks every 60 / bpm s from `first` s on, with a little noise."""
    n = int(seconds * sample_rate)
    t = np.arange(int(0.02 * sample_rate)) / sample_rate
    click = np.sin(2 * np.pi * 1000 * t) * np.exp(-t / 0.004)
    wav = np.random.default_rng(seed).normal(0, 0.01, n)
    s = first
    while s * sample_rate + len(click) < n:
        i = round(s * sample_rate)
        wav[i:i + len(click)] += click
        s += 60 / bpm
    return (0.5 * wav).astype(np.float32)


def test_mixtures_are_beat_synchronous_mixes_of_one_tempo_group(tmp_path):
    """encode_mixtures: each clip mixed once with a partner of its tempo group (lam and partner from the seed), its
    first beat on the clip's; the mixture encoded and conditioned like a clip; None for a clip alone in its
    group; the beats and mixtures read back from the cache."""
    from musiclm_core.train import beats, mixup

    folder = tmp_path / "data"
    folder.mkdir()
    for name, bpm, first in (("a", 120, 0.10), ("b", 121, 0.35), ("c", 90, 0.2)):  # a, b: group 40; c: 30
        sf.write(folder / f"{name}.wav", clicks(bpm, first, 4.0, 8000, seed=len(name) + bpm), 8000)
        (folder / f"{name}.txt").write_text(f"clicks {name}")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    heard = []

    def condition(wav, sr, caption):
        heard.append((wav, caption))
        return {"class_embed": wav[0, :24].clone()}

    def encode():
        return diffusion.encode_mixtures(folder, vae, tmp_path / "cache", condition=condition,
                                         condition_name="test", target_frames=64, mel_config=MEL, seed=5)

    mixtures = encode()
    assert mixtures[2] is None and [c for _, c in heard] == ["clicks a + clicks b", "clicks b + clicks a"]
    wavs = [torch.from_numpy(sf.read(folder / f"{n}.wav", dtype="float32")[0])[None] for n in "ab"]
    found = [beats.beat_track(w, 8000) for w in wavs]
    assert abs(found[0].bpm - 120) < 2 and abs(float(found[1].times[0]) - 0.35) < 0.02
    rng = np.random.default_rng(5)
    rng.integers(1)  # clip a's partner: b, its only choice
    lam = float(mixup.sample_lambda(rng))
    want = mixup.beat_synchronous_mixup(wavs[0], wavs[1], 8000, lam, anchor_downbeat=float(found[0].times[0]),
                                        partner_downbeat=float(found[1].times[0]))
    assert torch.allclose(heard[0][0], want, atol=1e-6) and 0 < lam < 1
    with torch.no_grad():
        posterior = vae.encode(wav_to_mel(want, 8000, 64, MEL))
    assert torch.allclose(mixtures[0].mean, posterior.mean[0], atol=1e-6)
    assert torch.allclose(mixtures[0].condition["class_embed"], want[0, :24])
    assert (mixtures[0].mean - mixtures[1].mean).abs().max() > 1e-3
    again = encode()
    assert len(heard) == 2 and torch.equal(again[1].mean, mixtures[1].mean)  # from the cache


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tiny_unet_overfits(tmp_path, prediction_type):
    torch.manual_seed(0)
    unet = UNet.from_preset("tiny-musicldm")
    schedule = NoiseSchedule(**SCHEDULE, prediction_type=prediction_type)
    clips = tiny_clips()
    # a fixed evaluation batch: the loss on it before and after
    probe = diffusion.LatentBatches(clips, batch_size=4, scaling_factor=0.5, num_train_timesteps=1000, seed=99)
    b = probe.batch(0)
    objective = diffusion.DiffusionObjective(unet, schedule)

    def probe_loss():
        with torch.no_grad():
            return objective(b.z0, b.noise, b.timesteps, class_embed=b.condition["class_embed"]).item()

    before = probe_loss()
    run = diffusion.train_unet(unet, schedule, clips, tmp_path / "run",
                               loop.TrainConfig(steps=60, lr=5e-3, warmup_steps=5), scaling_factor=0.5, batch_size=4,
                               cond_dropout=0.0)
    after = probe_loss()
    # Fresh noise and timesteps every step: the UNet learns to denoise these 4 latents at every noise level,
    # which 60 steps of a 16-channel UNet do only partly. Measured: 1.08 -> 0.40 (epsilon), 0.45 -> 0.29 (v).
    factor = {"epsilon": 2.0, "v_prediction": 1.3}[prediction_type]
    assert after < before / factor, (before, after)
    assert len(run) == 60 and loop.read_metrics(tmp_path / "run")[-1]["step"] == 60
    saved = UNet.from_pretrained(tmp_path / "run" / "unet")  # the run folder's UNet loads
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in saved.state_dict().items())


def test_resume_is_exact_and_lora_trains(tmp_path):
    schedule = NoiseSchedule(**SCHEDULE)
    clips = tiny_clips()
    null = {"class_embed": torch.zeros(24)}
    config = loop.TrainConfig(steps=4, lr=1e-3, save_every=2, seed=1)
    kwargs = dict(scaling_factor=0.5, batch_size=2, cond_dropout=0.5, null_condition=null)
    torch.manual_seed(0)
    whole = diffusion.train_unet(UNet.from_preset("tiny-musicldm"), schedule, clips, tmp_path / "a", config, **kwargs)

    def stop(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        diffusion.train_unet(UNet.from_preset("tiny-musicldm"), schedule, clips, tmp_path / "b", config, log=stop,
                             **kwargs)
    rest = diffusion.train_unet(UNet.from_pretrained(tmp_path / "b" / "unet"), schedule, clips, tmp_path / "b",
                                config, resume=True, **kwargs)
    assert rest == whole[2:]
    torch.manual_seed(0)
    base = UNet.from_preset("tiny-musicldm")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    diffusion.train_unet(base, schedule, clips, tmp_path / "lora", config, lora_rank=2, **kwargs)
    assert (tmp_path / "lora" / "adapter.safetensors").is_file()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    merged = UNet.from_pretrained(tmp_path / "lora" / "unet").state_dict()
    assert max((merged[k] - before[k]).abs().max() for k in before) > 1e-5
