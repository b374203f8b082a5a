"""What the two latent-diffusion pipelines (MusicLDM, AudioLDM 2) share: text in, 16 kHz waveform out.

    prompts ──(the pipeline's own text encoders)──> conditioning, [negative ; positive] rows under guidance
    noise (B·n, 8, T/4, 16) ──sampler loop: ε = UNet(x, t, conditioning), ε_u + w (ε_c − ε_u)──> latents
    latents / scaling_factor ──VAE decoder──> log-mel (B·n, 1, T, 64) ──HiFi-GAN──> waveform, cut to the length
    CLAP ranks the n candidates of each prompt, best first

Every step follows diffusers' `MusicLDMPipeline` / `AudioLDM2Pipeline.__call__` (pipeline_musicldm.py,
pipeline_audioldm2.py) so that the same initial latents and sampler give the same waveform, with one deliberate
difference: the ranking stays within each prompt's candidates (diffusers ranks all B·n waveforms for every prompt,
so one prompt can return another prompt's audio; its `score_waveforms`, issue #13602).

A pipeline class derives from `LatentDiffusion` and supplies two methods:
    _encode(prompts, negatives, n) -> conditioning for a batch of rows [negatives ×n ; prompts ×n] (or prompts ×n
        when negatives is None), in whatever form its UNet call needs;
    _noise(x, t, conditioning) -> the UNet's noise prediction for x (rows as the conditioning's).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from musiclm_core import hub, schedulers
from musiclm_core.clap import CLAP
from musiclm_core.generate import GraphedStep
from musiclm_core.hifigan import HifiGan
from musiclm_core.unet import UNet
from musiclm_core.vae import AutoencoderKL

Progress = Callable[[int, int], None]  # progress(done, total), called after each sampler step


# ---------------------------------------------------------------------------------------------------------------
# Lengths


def audio_frames(audio_length_in_s: float | None, *, default_frames: int | None, hop_s: float, factor: int,
                 sample_rate: int) -> tuple[int, int]:
    """(mel frames to generate, samples to return) for a requested length, as the pipelines compute them
    (`__call__` step 0, specs/ldm.md §2):

        frames  = int(length / hop_s), rounded up to a multiple of the VAE factor   (int() truncates: 0.29 s -> 28)
        samples = int(length · sample_rate)                                           (the vocoder makes more; cut)

    hop_s is the vocoder's seconds per mel frame (160 / 16000 = 0.01), factor the VAE's down-sampling (4), and
    default_frames the length used when audio_length_in_s is None (unet sample_size · factor = 1024 frames,
    10.24 s). The shortest length is one latent frame, factor · hop_s (0.04 s).
    """
    if audio_length_in_s is None:
        if default_frames is None:
            raise ValueError("this checkpoint's unet/config.json has no sample_size, so there is no default length: "
                             "pass audio_length_in_s")
        audio_length_in_s = default_frames * hop_s  # what the reference computes: sample_size · factor · hop_s
    if isinstance(audio_length_in_s, bool) or not isinstance(audio_length_in_s, (int, float, np.number)) \
            or not math.isfinite(audio_length_in_s):
        raise ValueError(f"audio_length_in_s must be a finite number of seconds, got {audio_length_in_s!r}")
    shortest = hop_s * factor
    if audio_length_in_s < shortest:
        raise ValueError(f"audio_length_in_s must be at least {shortest:g} s (one latent frame: {factor} mel frames "
                         f"of {hop_s:g} s), got {audio_length_in_s!r}")
    frames = int(audio_length_in_s / hop_s)
    if frames % factor:
        frames = int(np.ceil(frames / factor)) * factor
    return frames, int(audio_length_in_s * sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def check_prompts(prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None) \
        -> tuple[list[str], list[str] | None]:
    """(prompts, negatives) as lists of strings of the same length; negatives None when not given.

    A single string is one prompt; a single negative string applies to every prompt (diffusers refuses a string
    negative for a list of prompts). A prompt must say something: an empty one is an error (the empty text is
    what the unguided half of classifier-free guidance already uses).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; item(s) {bad[:5]} are not")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} are empty: describe the audio to generate")
    if negative_prompt is None:
        return list(prompts), None
    if isinstance(negative_prompt, str):
        return list(prompts), [negative_prompt] * len(prompts)
    if not isinstance(negative_prompt, Sequence) or any(not isinstance(p, str) for p in negative_prompt):
        raise TypeError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    if len(negative_prompt) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompt(s): give one "
                         f"per prompt, or one string for all")
    return list(prompts), list(negative_prompt)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def initial_latents(shape: tuple[int, ...], sampler: schedulers.Sampler, *, latents: Tensor | None,
                    generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The sampler's starting point: `latents` (checked for shape) or standard normal noise, times the sampler's
    init_noise_sigma (1 for DDIM / DPM-Solver / PNDM, √(σ_max² + 1) for Euler and LMS), as `prepare_latents` does.

    The noise is drawn as diffusers' `randn_tensor` draws it: on the generator's device (the CPU for a seeded
    generator, so a seed gives the same latents on every device), in `dtype`, then moved.
    """
    if latents is None:
        where = generator.device if generator is not None else torch.device("cpu")
        latents = torch.randn(shape, generator=generator, device=where, dtype=dtype)
    elif not isinstance(latents, Tensor) or tuple(latents.shape) != tuple(shape) or not latents.is_floating_point():
        got = f"shape {tuple(latents.shape)} {latents.dtype}" if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a float tensor of shape {tuple(shape)} (prompts · num_waveforms_per_prompt, "
                         f"latent channels, latent frames, latent bins), got {got}")
    return latents.to(device=device, dtype=dtype) * sampler.init_noise_sigma


def make_sampler(config: dict, scheduler: str | None, eta: float) -> schedulers.Sampler:
    """A fresh sampler (they keep per-trajectory state) from the checkpoint's scheduler_config.json: its own class,
    or `scheduler` ("ddim", "dpm", "pndm", "euler", "lms") on the same noise schedule. eta is DDIM's."""
    if scheduler is not None and scheduler not in schedulers.NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.NAMES)} (or None for "
                         f"the checkpoint's)")
    sampler = schedulers.from_config(config, scheduler)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if isinstance(sampler, schedulers.DDIM):
        sampler.eta = float(eta)
    elif eta:  # diffusers passes eta only to schedulers whose step takes it, and drops it silently otherwise
        raise ValueError(f"eta={eta} is DDIM's stochasticity; the {type(sampler).__name__} sampler has none "
                         f"(use scheduler='ddim', or eta=0)")
    return sampler


# ---------------------------------------------------------------------------------------------------------------
# The shared pipeline


class LatentDiffusion(nn.Module):
    """The parts and the generation loop both pipelines share (see the module docstring for what a subclass adds).

    unet, vae, vocoder, clap: the models; scheduler_config: the checkpoint's scheduler_config.json;
    sample_size: unet/config.json's sample_size (latent frames of the default length), or None.
    """

    default_guidance_scale = 2.0
    pipeline_class = ""  # model_index.json's _class_name

    def __init__(self, unet: UNet, vae: AutoencoderKL, vocoder: HifiGan, clap: CLAP, scheduler_config: dict,
                 sample_size: int | None):
        super().__init__()
        self.unet, self.vae, self.vocoder, self.clap = unet, vae, vocoder, clap
        self.scheduler_config = dict(scheduler_config)
        self.sample_size = sample_size
        schedulers.from_config(self.scheduler_config)  # a config we cannot run fails at load time, not later
        if vocoder.config.mel_bins != vae.config.mel_bins:
            raise hub.CheckpointError(f"the vocoder takes {vocoder.config.mel_bins} mel bins, the VAE makes "
                                      f"{vae.config.mel_bins}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise hub.CheckpointError(f"the UNet takes {unet.config.in_channels} latent channels, the VAE makes "
                                      f"{vae.config.latent_channels}")
        self._graph: tuple[tuple, GraphedStep, list[Tensor]] | None = None  # `_graphed_noise`'s kept capture

    def _apply(self, fn, recurse=True):
        self._graph = None  # .to() / .cuda() / .half() move the tensors a captured graph reads
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**self.__dict__, "_graph": None}  # a CUDA graph is neither copied nor pickled

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[str], *, audio_length_in_s: float | None = None,
                 num_inference_steps: int = 200, guidance_scale: float | None = None,
                 negative_prompt: str | Sequence[str] | None = None, num_waveforms_per_prompt: int = 1,
                 scheduler: str | None = None, latents: Tensor | None = None, seed: int | None = None,
                 eta: float = 0.0, progress: Progress | None = None, cuda_graph: bool = False) -> Tensor:
        """Text -> (B · num_waveforms_per_prompt, 1, N) float32 waveforms at `sample_rate`, the n candidates of
        each prompt together, best first by CLAP score when n > 1.

        audio_length_in_s: None = unet sample_size · 4 · 0.01 s (10.24 s); N = int(audio_length_in_s · 16000).
        guidance_scale: None = the pipeline's default (MusicLDM 2.0, AudioLDM 2 3.5); <= 1 turns guidance off.
        negative_prompt: what guidance steers away from (one string for all prompts, or one per prompt); None:
            the empty text.
        scheduler: None = the checkpoint's (DDIM), or "ddim", "dpm" (DPM-Solver++ 2M), "pndm", "euler", "lms" on
            the checkpoint's noise schedule (diffusers' `XScheduler.from_config(pipe.scheduler.config)`).
        latents: the initial noise (B · n, C, frames / 4, bins / 4), as the reference's `latents` argument.
        seed: seeds a CPU torch.Generator for the noise (and DDIM's eta noise), and the CLAP crop of long
            candidates; None draws from torch's global generator.
        progress: called as progress(done, total) after each sampler step.
        cuda_graph: replay the UNet call from a CUDA graph (`denoise`); the model must be on a CUDA device.
        """
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {self.device}")
        prompts, negatives = check_prompts(prompts, negative_prompt)
        n = _check_count("num_waveforms_per_prompt", num_waveforms_per_prompt)
        steps = _check_count("num_inference_steps", num_inference_steps)
        w = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        factor = self.vae.downsample_factor
        hop_s = self.vocoder.config.hop_length / self.sample_rate
        frames, samples = audio_frames(audio_length_in_s, hop_s=hop_s, factor=factor, sample_rate=self.sample_rate,
                                       default_frames=None if self.sample_size is None
                                       else self.sample_size * factor)
        sampler = make_sampler(self.scheduler_config, scheduler, eta)
        sampler.set_timesteps(steps)
        generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        shape = (len(prompts) * n, self.unet.config.in_channels, frames // factor,
                 self.vocoder.config.mel_bins // factor)
        x = initial_latents(shape, sampler, latents=latents, generator=generator, dtype=self.dtype,
                            device=self.device)

        guided = w > 1.0
        if guided and negatives is None:
            negatives = [""] * len(prompts)
        conditioning = self._encode(prompts, negatives if guided else None, n)
        x = self.denoise(x, conditioning, sampler, guidance_scale=w if guided else None, generator=generator,
                         progress=progress, cuda_graph=cuda_graph)
        wav = self.decode(x)[:, :samples]  # (B·n, N)
        if n > 1:
            wav = self.rank(prompts, wav, n, seed=seed)
        return wav[:, None]  # (B·n, 1, N)

    def denoise(self, x: Tensor, conditioning: Any, sampler: schedulers.Sampler, *, guidance_scale: float | None,
                generator: torch.Generator | None = None, progress: Progress | None = None,
                cuda_graph: bool = False) -> Tensor:
        """Run the sampler over its timesteps from x (B, C, t, f). With guidance_scale, the conditioning holds
        [unguided ; guided] rows and each UNet call runs both halves as one batch: ε = ε_u + w (ε_c − ε_u).

        cuda_graph: the UNet call replays a CUDA graph (generate.GraphedStep), captured at the first step. A UNet
        step launches hundreds of kernels, many of them small at batch 2, whose launches cost the GPU more than
        their arithmetic: on an H200 in bf16 a MusicLDM step takes 24 ms eager and 4.3 ms replayed, and 20 steps
        of MusicLDM 0.49 s against 0.17 s with a capture (two eager warm-up calls and one captured), 0.09 s
        replaying a kept one (benchmarks/RESULTS.md, seventh session). The conditioning is the same at every step
        and the timestep goes in as a device tensor, so one capture serves every step; the sampler's arithmetic
        stays eager. The capture is kept for the next generation of the same shapes (`_graphed_noise`; AudioLDM
        2 pads its Flan-T5 states for it, `_graph_conditioning`)."""
        noise = self._graphed_noise(x, conditioning, guidance_scale is not None) if cuda_graph else None
        total = len(sampler.timesteps)
        for i, t in enumerate(sampler.timesteps):
            x_in = torch.cat([x, x]) if guidance_scale is not None else x  # (2B, C, t, f) under guidance
            x_in = sampler.scale_model_input(x_in, t)
            if noise is None:
                eps = self._noise(x_in, t, conditioning)
            else:  # a copy: the next replay overwrites the graph's output, and PNDM keeps past outputs
                eps = noise(x_in, torch.as_tensor(t, device=x.device)).clone()
            if guidance_scale is not None:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = sampler.step(eps, t, x, generator=generator)
            if progress is not None:
                progress(i + 1, total)
        return x

    def _graphed_noise(self, x: Tensor, conditioning: Tensor | tuple[Tensor, ...], guided: bool) -> GraphedStep:
        """The UNet call `_noise` as a GraphedStep, kept for the next generation: its conditioning lives in buffers
        of its own, into which each generation copies its values. Captured again when the latents' or the
        conditioning's shapes or dtypes, the UNet's parameters (their storage: a LoRA adapter, a reload that
        replaces them) or the attention switch (MUSICLM_ATTENTION) differ. Its memory (the graph's pool of
        activations) stays allocated in between; `.to()` drops it (`pipe.to(pipe.device)` to free it)."""
        conditioning = self._graph_conditioning(conditioning)
        leaves = [conditioning] if isinstance(conditioning, Tensor) else list(conditioning)  # AudioLDM 2: a tuple
        key = (tuple(x.shape), x.dtype, x.device, guided, tuple((tuple(c.shape), c.dtype) for c in leaves),
               tuple(p.data_ptr() for p in self.unet.parameters()), os.environ.get("MUSICLM_ATTENTION"))
        if self._graph is not None and self._graph[0] == key:
            _, step, static = self._graph
            for buffer, value in zip(static, leaves):
                buffer.copy_(value)
            return step
        self._graph = None  # the old graph's memory goes back before the new capture
        static = [c.clone() for c in leaves]
        held = static[0] if isinstance(conditioning, Tensor) else type(conditioning)(*static)
        step = GraphedStep(lambda x_in, t: self._noise(x_in, t, held))
        self._graph = (key, step, static)
        return step

    def _graph_conditioning(self, conditioning: Any) -> Any:
        """The conditioning as a kept UNet graph holds it (`_graphed_noise`): as it is, unless a pipeline can give
        conditionings of several shapes one shape with the same UNet output (AudioLDM 2)."""
        return conditioning

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, t, f) -> (B, 160 · 4t + 32) float32 waveforms: VAE decoder, then the vocoder."""
        mel = self.vae.decode(latents * (1 / self.vae.scaling_factor))  # (B, 1, 4t, 64); the reference's 1/s · x
        return self.vocoder(mel[:, 0]).float()  # (B, N)

    def rank(self, prompts: list[str], wav: Tensor, n: int, *, seed: int | None = None) -> Tensor:
        """Reorder the n candidates of each prompt (rows i·n .. i·n + n − 1 of wav (B·n, N)) best first by CLAP
        logits_per_text (text tokenised with padding="longest", audio resampled to 48 kHz, as `score_waveforms`).
        Candidates longer than CLAP's 10 s window are cropped at a random start drawn from `seed`."""
        scores = self.clap.score(prompts, wav, self.sample_rate, seed=seed, scaled=True)  # (B, B·n)
        order = []
        for i in range(len(prompts)):
            own = scores[i, i * n:(i + 1) * n]  # this prompt's candidates only
            order.append(i * n + torch.argsort(own, descending=True))
        return wav[torch.cat(order).to(wav.device)]

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def _pipeline_folder(cls, name_or_path: str | os.PathLike,
                         revision: str | None) -> tuple[Path | str, dict, int | None]:
        """(where each part loads from, the scheduler config, unet/config.json's sample_size) of a diffusers
        pipeline, checked to be this class's pipeline. A hub id fetches only these small files here and is
        returned as it is: each part then fetches its own files."""
        folder = hub.resolve(name_or_path, revision=revision,
                             allow_patterns=["model_index.json", "unet/config.json", "scheduler/scheduler_config.json"])
        index = folder / "model_index.json"
        if not index.is_file():
            raise hub.CheckpointError(f"{folder} is not a diffusers pipeline folder: no model_index.json")
        kind = hub.read_json(index).get("_class_name")
        if kind != cls.pipeline_class:
            raise hub.CheckpointError(f"{index}: _class_name is {kind!r}; {cls.__name__} loads {cls.pipeline_class} "
                                      f"folders")
        for part in ("unet/config.json", "scheduler/scheduler_config.json"):
            if not (folder / part).is_file():
                raise hub.CheckpointError(f"{folder} has no {part}")
        sample_size = hub.read_json(folder / "unet" / "config.json").get("sample_size")
        if isinstance(sample_size, (list, tuple)):  # diffusers allows (height, width); the height is the time axis
            sample_size = sample_size[0]
        source = folder if Path(name_or_path).expanduser().is_dir() else str(name_or_path)
        return source, hub.read_json(folder / "scheduler" / "scheduler_config.json"), sample_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(sample_rate={self.sample_rate}, unet channels={self.unet.config.channels}, "
                f"sample_size={self.sample_size})")
