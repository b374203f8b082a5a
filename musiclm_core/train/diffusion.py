"""Diffusion UNet fine-tuning on VAE latents of mel spectrograms (MusicLDM, AudioLDM 2).

    clip (16 kHz) --wav_to_mel--> log-mel (1, 1024, 64) --VAE encoder--> posterior N(mean, std) [cached]
    step n:  z0 = scaling_factor * (mean + std * e)      e, noise ~ N(0, 1), t ~ U{0 .. T-1}, from (seed, n)
             x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise                 (the checkpoint's noise schedule)
             loss = || UNet(x_t, t, conditioning) - target ||^2,   target = noise (epsilon) or
                                                                   sqrt(abar_t) noise - sqrt(1 - abar_t) z0 (v)

The VAE and the conditioning encoders stay frozen; the conditioning of each clip is computed once, when it is
encoded, by a `condition` function, and cached with its latents:

    MusicLDM     {"class_embed": CLAP audio embedding of the clip} (`clap_audio_condition`): MusicLDM trains on
                 the audio embedding and generates from the text one (CLAP aligns the two; specs/ldm.md §16)
    AudioLDM 2   {"encoder_hidden_states": the 8 GPT-2 vectors, "encoder_hidden_states_1": the Flan-T5 states,
                 "encoder_attention_mask_1": their mask} of the caption (`audioldm2_text_condition`, the T5
                 states padded to one length for every clip)

Condition dropout replaces a row's conditioning by `null_condition` (MusicLDM: the CLAP text embedding of "",
probability 0.1 in its training config; AudioLDM 2: the condition of the caption "").

Mixup (MusicLDM, `encode_mixtures`): each clip mixed once with a partner of its tempo group, beat-synchronously
(train/mixup.py), and encoded and conditioned as a clip; a row takes its clip's mixture with probability `mixup`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from musiclm_core.train import losses
from musiclm_core.train.data import cache_name, clip_indices, clips_and_cache, fingerprint, step_generator
from musiclm_core.train.loop import STATE_FILE, Trainer, TrainConfig, autocast, differentiable_attention

CONDITION_KEYS = ("class_embed", "encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_1",
                  "encoder_attention_mask_1")  # the UNet's conditioning arguments


@dataclass
class LatentClip:
    mean: Tensor                  # (C, t, f) the VAE posterior's mean (unscaled)
    std: Tensor                   # (C, t, f)
    condition: dict[str, Tensor]  # per clip, without a batch axis: a subset of CONDITION_KEYS
    caption: str


def clap_audio_condition(clap) -> Callable[[Tensor, int, str], dict[str, Tensor]]:
    """MusicLDM's training condition: the CLAP audio embedding of the clip."""
    def condition(wav: Tensor, sample_rate: int, caption: str) -> dict[str, Tensor]:
        return {"class_embed": clap.audio_embeds(wav, sample_rate)[0].float().cpu()}
    return condition


def audioldm2_text_condition(pipeline, t5_length: int = 64) -> Callable[[Tensor, int, str], dict[str, Tensor]]:
    """AudioLDM 2's condition of a caption, as its pipeline computes it at inference: the 8 GPT-2 vectors and the
    Flan-T5 states padded (and cut) to `t5_length` tokens with their mask (`AudioLDM2.encode_text`)."""
    def condition(wav: Tensor, sample_rate: int, caption: str) -> dict[str, Tensor]:
        with torch.no_grad():
            generated, t5, mask = pipeline.encode_text([caption], t5_length)
        return {"encoder_hidden_states": generated[0].float().cpu(), "encoder_hidden_states_1": t5[0].float().cpu(),
                "encoder_attention_mask_1": mask[0].cpu()}
    return condition


def encode_latent_folder(folder: str | os.PathLike, vae: nn.Module, cache_dir: str | os.PathLike, *,
                         condition: Callable[[Tensor, int, str], dict[str, Tensor]], condition_name: str,
                         target_frames: int = 1024, mel_config=None, progress: bool = False) -> list[LatentClip]:
    """Each captioned clip of `folder` (as `data.read_captions`) as VAE posterior moments of its mel
    (`mel.wav_to_mel`, cut or padded to `target_frames`, 1024 = 10.24 s) and `condition(wav (1, N), sample_rate,
    caption)`; cached in `cache_dir` under a key of the clip, the VAE's weights and `condition_name`."""
    from safetensors.torch import load_file

    from musiclm_core.mel import PRESETS

    mel_config = mel_config or PRESETS["16khz"]
    cache_dir, clips = clips_and_cache(folder, cache_dir)
    key = _encoder_print(vae, condition_name, target_frames, mel_config)
    out = []
    for i, clip in enumerate(clips):
        cached = cache_dir / cache_name(clip.path, key)
        if cached.is_file():
            tensors = load_file(str(cached))
        else:
            wav, sr = _read(clip.path, mel_config.sample_rate)
            tensors = _encode_wav(wav, sr, clip.caption, vae, condition, target_frames, mel_config)
            _save(tensors, cached)
        out.append(_latent_clip(tensors, clip.caption))
        if progress:
            print(f"\rencoded {i + 1} / {len(clips)} clips", end="\n" if i + 1 == len(clips) else "", flush=True)
    return out


def encode_mixtures(folder: str | os.PathLike, vae: nn.Module, cache_dir: str | os.PathLike, *,
                    condition: Callable[[Tensor, int, str], dict[str, Tensor]], condition_name: str,
                    target_frames: int = 1024, mel_config=None, seed: int = 0,
                    progress: bool = False) -> list[LatentClip | None]:
    """MusicLDM's beat-synchronous audio mixup (train/mixup.py) for each clip of `folder`, drawn once: a partner
    from the clip's tempo group (its first beat moved onto the clip's), lam ~ Beta(5, 5), the mixture encoded and
    conditioned as `encode_latent_folder` does a clip (MusicLDM: the CLAP audio embedding of the mixture, as its
    paper's BAM). None for a clip alone in its tempo group. The draws come from `seed`; the beats and the mixtures
    are cached in `cache_dir`.

    MusicLDM mixes afresh at every step; here each clip has one mixture, so that training keeps reading cached
    latents (the price: fewer distinct mixtures, one per clip)."""
    from safetensors.torch import load_file

    from musiclm_core.mel import PRESETS
    from musiclm_core.train.beats import HOP_SECONDS, beat_track
    from musiclm_core.train.mixup import beat_synchronous_mixup, sample_lambda, tempo_group

    mel_config = mel_config or PRESETS["16khz"]
    cache_dir, clips = clips_and_cache(folder, cache_dir)
    sr = mel_config.sample_rate
    tracked = []
    for clip in clips:  # each clip's tempo and first beat (the beats of its whole file, as MusicLDM's tracker)
        cached = cache_dir / cache_name(clip.path, f"beats {HOP_SECONDS} {sr}")
        if not cached.is_file():
            beats = beat_track(_read(clip.path, sr)[0], sr)
            _save({"bpm": torch.tensor([beats.bpm], dtype=torch.float64), "times": beats.times.double()}, cached)
        tracked.append(load_file(str(cached)))
    groups: dict[int, list[int]] = {}
    for i, beats in enumerate(tracked):
        groups.setdefault(tempo_group(float(beats["bpm"])), []).append(i)
    rng = np.random.default_rng(seed)
    model = _encoder_print(vae, condition_name, target_frames, mel_config)
    out: list[LatentClip | None] = []
    for i, clip in enumerate(clips):
        partners = [j for j in groups[tempo_group(float(tracked[i]["bpm"]))] if j != i]
        if not partners:
            out.append(None)
            continue
        j = partners[int(rng.integers(len(partners)))]
        lam = float(sample_lambda(rng))
        partner = clips[j]
        cached = cache_dir / cache_name(clip.path, f"{model} mixup {cache_name(partner.path, '')} {lam!r}")
        caption = f"{clip.caption} + {partner.caption}"
        if cached.is_file():
            tensors = load_file(str(cached))
        else:
            first = [float(tracked[k]["times"][0]) if len(tracked[k]["times"]) else 0.0 for k in (i, j)]
            mixture = beat_synchronous_mixup(_read(clip.path, sr)[0], _read(partner.path, sr)[0], sr, lam,
                                             anchor_downbeat=first[0], partner_downbeat=first[1])
            tensors = _encode_wav(mixture, sr, caption, vae, condition, target_frames, mel_config)
            _save(tensors, cached)
        out.append(_latent_clip(tensors, caption))
        if progress:
            print(f"\rmixed {i + 1} / {len(clips)} clips", end="\n" if i + 1 == len(clips) else "", flush=True)
    return out


def _encoder_print(vae: nn.Module, condition_name: str, target_frames: int, mel_config) -> str:
    """The part of a cached clip's or mixture's key that says how it was encoded: the VAE's weights and config,
    the condition, the frame count and the mel settings."""
    return fingerprint(vae, {"vae": vae.config.to_dict(), "condition": condition_name, "frames": target_frames,
                             "mel": repr(mel_config)})


def _read(path: Path, sample_rate: int) -> tuple[Tensor, int]:
    """A training clip as (1, N) mono audio at sample_rate, or ValueError naming the file."""
    from musiclm_core.audio import load_audio

    try:
        wav, sr = load_audio(path, sample_rate=sample_rate, channels=1)
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot read training audio {path}: {err}") from err
    if wav.shape[-1] == 0:
        raise ValueError(f"training audio {path} is empty")
    return wav, sr


def _encode_wav(wav: Tensor, sample_rate: int, caption: str, vae: nn.Module,
                condition: Callable[[Tensor, int, str], dict[str, Tensor]], target_frames: int,
                mel_config) -> dict[str, Tensor]:
    """(1, N) audio -> {"mean", "std"} of the VAE posterior of its mel and {"condition.<key>"} of `condition`."""
    from musiclm_core.mel import wav_to_mel

    with torch.no_grad():
        mel = wav_to_mel(wav, sample_rate, target_frames, mel_config)  # (1, 1, T, n_mels)
        posterior = vae.encode(mel.to(next(vae.parameters()).device))
        tensors = {"mean": posterior.mean[0].float().cpu(), "std": posterior.std[0].float().cpu()}
        tensors.update({f"condition.{k}": v for k, v in condition(wav, sample_rate, caption).items()})
    unknown = [k for k in tensors if k.startswith("condition.") and k[10:] not in CONDITION_KEYS]
    if unknown:
        raise ValueError(f"condition gave {unknown}; the UNet takes {CONDITION_KEYS}")
    return tensors


def _save(tensors: dict[str, Tensor], cached: Path) -> None:
    from safetensors.torch import save_file

    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")  # ranks may encode the same clip at once
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, cached)


def _latent_clip(tensors: dict[str, Tensor], caption: str) -> LatentClip:
    condition = {k[10:]: v for k, v in tensors.items() if k.startswith("condition.")}
    return LatentClip(tensors["mean"], tensors["std"], condition, caption)


@dataclass
class LatentBatch:
    z0: Tensor                    # (B, C, t, f) scaled latents
    noise: Tensor                 # (B, C, t, f)
    timesteps: Tensor             # (B,) int64
    condition: dict[str, Tensor]  # batched, dropped rows set to the null condition
    dropped: Tensor               # (B,) bool


class LatentBatches:
    """Batches of step n, micro-batch m: clips in per-epoch permutations as `data.MusicGenBatches`; the posterior
    sample, the noise, the timesteps, the condition dropout and the mixup are drawn from (seed, n, m).

    mixtures, mixup: with probability `mixup` a row takes its clip's mixture (`encode_mixtures`: latents and
    condition) instead of the clip, where the clip has one."""

    def __init__(self, clips: Sequence[LatentClip], *, batch_size: int, scaling_factor: float,
                 num_train_timesteps: int, null_condition: dict[str, Tensor] | None = None, cond_dropout: float = 0.0,
                 seed: int = 0, grad_accum: int = 1, rank: int = 0, world_size: int = 1,
                 mixtures: Sequence[LatentClip | None] | None = None, mixup: float = 0.0):
        if cond_dropout > 0 and null_condition is None:
            raise ValueError("cond_dropout > 0 needs a null_condition (MusicLDM: the CLAP text embedding of \"\")")
        keys = set(clips[0].condition) if clips else set()
        if null_condition is not None and set(null_condition) != keys:
            raise ValueError(f"null_condition has {sorted(null_condition)}, the clips' conditions {sorted(keys)}")
        if not 0.0 <= mixup <= 1.0:
            raise ValueError(f"mixup probability must be in [0, 1], got {mixup}")
        if mixup > 0 and (mixtures is None or len(mixtures) != len(clips)):
            raise ValueError(f"mixup > 0 needs one mixture (or None) per clip: {len(clips)} clips, "
                             f"{'no' if mixtures is None else len(mixtures)} mixtures")
        self.clips, self.batch_size, self.scaling_factor = list(clips), batch_size, scaling_factor
        self.num_train_timesteps, self.null, self.cond_dropout = num_train_timesteps, null_condition, cond_dropout
        self.seed, self.grad_accum, self.rank, self.world_size = seed, grad_accum, rank, world_size
        self.mixtures, self.mixup = None if mixtures is None else list(mixtures), mixup

    def batch(self, step: int, micro: int = 0) -> LatentBatch:
        rows = self.batch_size * self.world_size
        start = (step * self.grad_accum + micro) * rows
        indices = clip_indices(self.seed, start, rows, len(self.clips))
        g = step_generator(self.seed, step, micro)
        shape = (rows,) + tuple(self.clips[indices[0]].mean.shape)  # (B', C, t, f), the global batch
        e = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        timesteps = torch.randint(0, self.num_train_timesteps, (rows,), generator=g)
        dropped = torch.rand(rows, generator=g) < self.cond_dropout
        sources = [self.clips[i] for i in indices]
        if self.mixup > 0:  # (with its mixtures: __init__) drawn last: without mixup the draws are as before
            mixed = (torch.rand(rows, generator=g) < self.mixup).tolist()
            sources = [self.mixtures[i] if m and self.mixtures[i] is not None else clip
                       for i, m, clip in zip(indices, mixed, sources)]
        mean = torch.stack([clip.mean for clip in sources])
        std = torch.stack([clip.std for clip in sources])
        z0 = self.scaling_factor * (mean + std * e)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        condition = {}
        for key in sources[0].condition:
            values = torch.stack([clip.condition[key] for clip in sources])
            if self.null is not None:
                null = self.null[key].to(values.dtype).expand_as(values)
                values = torch.where(dropped.view(-1, *[1] * (values.dim() - 1)), null, values)
            condition[key] = values[mine]
        return LatentBatch(z0[mine], noise[mine], timesteps[mine], condition, dropped[mine])


class DiffusionObjective(nn.Module):
    """forward(z0, noise, timesteps, conditioning...) -> the MSE of the UNet's prediction against the target of
    `prediction_type` (default: the schedule's) on the schedule's noisy latents."""

    def __init__(self, unet: nn.Module, schedule, prediction_type: str | None = None):
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self.prediction_type = prediction_type or schedule.prediction_type

    def forward(self, z0: Tensor, noise: Tensor, timesteps: Tensor, *, class_embed: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                encoder_hidden_states_1: Tensor | None = None,
                encoder_attention_mask_1: Tensor | None = None) -> Tensor:
        x_t = self.schedule.add_noise(z0, noise, timesteps)
        prediction = self.unet(x_t, timesteps, class_embed=class_embed, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask,
                               encoder_hidden_states_1=encoder_hidden_states_1,
                               encoder_attention_mask_1=encoder_attention_mask_1)
        target = losses.diffusion_target(z0, noise, timesteps, self.schedule, self.prediction_type)
        return losses.diffusion_loss(prediction, target)


def train_unet(unet: nn.Module, schedule, clips: Sequence[LatentClip], out: str | os.PathLike,
               config: TrainConfig, *, scaling_factor: float, batch_size: int = 2, cond_dropout: float = 0.1,
               null_condition: dict[str, Tensor] | None = None, prediction_type: str | None = None,
               lora_rank: int = 0, lora_alpha: float | None = None, resume: bool = False,
               distributed: str | None = None, mixtures: Sequence[LatentClip | None] | None = None,
               mixup: float = 0.0, progress: bool = False,
               log: Callable[[dict], None] | None = None) -> list[float]:
    """Fine-tune `unet` on `clips` (`encode_latent_folder`) to `config.steps`; returns the losses of the steps
    taken. With `mixup` > 0 a row takes its clip's mixture (`encode_mixtures`) with that probability. out/unet is
    a native UNet folder with the latest weights (merged with the LoRA adapter, which is also saved alone in out/),
    next to trainer_state.pt and metrics.jsonl. With resume=True (and no LoRA) pass the UNet loaded from
    out/unet."""
    from musiclm_core import hub
    from musiclm_core.train import distributed as dist_setup, lora
    from musiclm_core.unet import KIND

    out = Path(out)
    rank, world_size = dist_setup.rank_and_world(distributed)
    device = next(unet.parameters()).device
    unet.requires_grad_(True)
    if lora_rank:
        lora.add_lora(unet, lora_rank, lora_alpha)
        if resume:
            lora.load_adapter(unet, out)
    objective = dist_setup.wrap(DiffusionObjective(unet, schedule, prediction_type), distributed)
    batches = LatentBatches(clips, batch_size=batch_size, scaling_factor=scaling_factor,
                            num_train_timesteps=schedule.num_train_timesteps, null_condition=null_condition,
                            cond_dropout=cond_dropout, seed=config.seed, grad_accum=config.grad_accum, rank=rank,
                            world_size=world_size, mixtures=mixtures, mixup=mixup)

    def step_loss(step: int, micro: int) -> tuple[Tensor, int]:
        b = batches.batch(step, micro)
        condition = {k: v.to(device) for k, v in b.condition.items()}
        with autocast(device, config.bf16), differentiable_attention():
            loss = objective(b.z0.to(device), b.noise.to(device), b.timesteps.to(device), **condition)
        return loss, b.z0.numel()

    def save_weights(folder: Path, step: int, gathered: dict[str, Tensor] | None) -> None:
        state = None if gathered is None else {k[len("unet."):]: v for k, v in gathered.items()}  # FSDP
        hub.save_native(folder / "unet", KIND, unet.config.to_dict(), lora.merged_state_dict(unet, state),
                        overwrite=True)
        if lora_rank:
            lora.save_adapter(unet, folder, state)
        tmp = folder / "training.json.tmp"
        tmp.write_text(json.dumps({"step": step}) + "\n")
        os.replace(tmp, folder / "training.json")

    settings = {"batch_size": batch_size, "cond_dropout": cond_dropout, "lora_rank": lora_rank,
                "lora_alpha": lora_alpha, "prediction_type": objective_prediction(objective),
                "world_size": world_size, "distributed": distributed, "clips": len(clips), **vars(config),
                **({"mixup": mixup} if mixup else {})}  # runs saved before mixup existed resume as they were
    trainer = Trainer(objective, config, out, step_loss, save_weights, rank=rank, settings=settings)
    if resume:
        if not (out / STATE_FILE).is_file():
            raise FileNotFoundError(f"no checkpoint to resume from: {out / STATE_FILE} does not exist")
        trainer.resume(json.loads((out / "training.json").read_text())["step"])
    return trainer.train(progress=progress, log=log)


def objective_prediction(objective: nn.Module) -> str:
    return getattr(objective, "module", objective).prediction_type
