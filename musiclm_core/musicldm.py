"""MusicLDM (Chen et al. 2023, "MusicLDM: Enhancing Novelty in Text-to-Music Generation Using Beat-Synchronous
Mixup Strategies"): text -> CLAP text vector -> latent diffusion -> mel -> HiFi-GAN -> 16 kHz waveform.

    prompt ──CLAP text tower──> (B, 512) unit vector ──UNet class embedding (concatenated after the time embedding)
    noise ──sampler × UNet (no cross-attention context: attn2 attends to the latent itself)──> latents
    latents ──VAE decoder──> log-mel ──HiFi-GAN──> waveform ──CLAP ranking of the n candidates of each prompt

The model was trained on the CLAP *audio* embedding of its clips and is run on the *text* embedding of the prompt
(CLAP puts both in one space). The loop, the tail and the ranking are `ldm.LatentDiffusion`'s.

>>> ldm = MusicLDM.from_pretrained("ucsd-reach/musicldm")
>>> wav = ldm.generate(["lo-fi hip hop with a jazzy piano"], audio_length_in_s=5.0, num_inference_steps=50,
...                    scheduler="dpm", seed=0)          # (1, 1, 80000) float32 at ldm.sample_rate (16 kHz)
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from musiclm_core.clap import CLAP
from musiclm_core.hifigan import HifiGan
from musiclm_core.ldm import LatentDiffusion
from musiclm_core.unet import UNet
from musiclm_core.vae import AutoencoderKL


class MusicLDM(LatentDiffusion):
    """diffusers' `MusicLDMPipeline` (pipelines/deprecated/musicldm/pipeline_musicldm.py); `generate` is
    `LatentDiffusion.generate` with guidance_scale 2.0 by default."""

    default_guidance_scale = 2.0
    pipeline_class = "MusicLDMPipeline"

    def __init__(self, unet: UNet, vae: AutoencoderKL, vocoder: HifiGan, clap: CLAP, scheduler_config: dict,
                 sample_size: int | None = None):
        super().__init__(unet, vae, vocoder, clap, scheduler_config, sample_size)
        if unet.config.class_embed_dim != clap.config.projection_dim:
            raise ValueError(f"the UNet's class embedding takes {unet.config.class_embed_dim} values, CLAP's text "
                             f"embedding has {clap.config.projection_dim}")

    def encode_text(self, texts: list[str], max_length: int) -> Tensor:
        """(B, D) CLAP text embeddings of texts truncated to max_length tokens.

        The pipeline pads every text to max_length (512) tokens; padding is masked out of the attention and the
        pooled <s> token, so padding to the longest text gives the same embedding to float round-off, ~50x
        cheaper for short prompts."""
        ids, mask = self.clap.tokenize(texts, padding="longest", max_length=max_length)
        return self.clap.encode_text(ids, mask)

    def _encode(self, prompts: list[str], negatives: list[str] | None, n: int) -> Tensor:
        """(rows, D) class embeddings: prompts each repeated n times, after the negatives (same layout) if any."""
        cond = self.encode_text(prompts, self.clap.config.max_text_length)  # (B, D)
        cond = cond.repeat_interleave(n, dim=0)  # (B·n, D): p0, p0, ..., p1, p1, ... (repeat(1, n).view)
        if negatives is None:
            return cond
        # The negatives are padded (and truncated) to prompt_embeds.shape[1]: the embedding width (512), not the
        # tokenizer's limit; the two happen to agree for the checkpoint (pipeline_musicldm.py, _encode_prompt).
        uncond = self.encode_text(negatives, cond.shape[1]).repeat_interleave(n, dim=0)  # (B·n, D)
        return torch.cat([uncond, cond])  # (2·B·n, D)

    def _noise(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x, t, class_embed=cond)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "MusicLDM":
        """A diffusers MusicLDM pipeline: a hub id (ucsd-reach/musicldm) or a local folder with model_index.json,
        unet/, vae/, vocoder/, text_encoder/, tokenizer/ and scheduler/."""
        source, scheduler_config, sample_size = cls._pipeline_folder(name_or_path, revision)
        return cls(UNet.from_pretrained(source, dtype=dtype, revision=revision),
                   AutoencoderKL.from_pretrained(source, dtype=dtype, revision=revision),
                   HifiGan.from_pretrained(source, dtype=dtype, revision=revision),
                   CLAP.from_pretrained(source, dtype=dtype, revision=revision), scheduler_config, sample_size)
