"""AudioLDM 2 (Liu et al. 2024, "AudioLDM 2: Learning Holistic Audio Generation with Self-supervised Pretraining"):
text -> CLAP + Flan-T5 -> GPT-2 "language of audio" -> latent diffusion -> mel -> HiFi-GAN -> 16 kHz waveform.

    prompt ──CLAP text tower──> (B, 1, 512)  ┐
    prompt ──Flan-T5 encoder──> (B, L, 1024) ┴─projection─> (B, L + 5, 768) ──GPT-2, 8 generated vectors──> (B, 8, 768)
    noise ──sampler × UNet(x, t, GPT-2 vectors (slots 0-1), Flan-T5 states + mask (slot 2))──> latents
    latents ──VAE decoder──> log-mel ──HiFi-GAN──> waveform ──CLAP ranking of the n candidates of each prompt

The UNet cross-attends to the generated vectors *and* to the Flan-T5 states themselves (not the projection). The
loop, the tail and the ranking are `ldm.LatentDiffusion`'s.

>>> ldm = AudioLDM2.from_pretrained("cvssp/audioldm2-music")      # or cvssp/audioldm2, cvssp/audioldm2-large
>>> wav = ldm.generate(["a calm piano melody"], audio_length_in_s=5.0, num_inference_steps=50, scheduler="dpm",
...                    seed=0)                                        # (1, 1, 80000) float32 at 16 kHz
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from musiclm_core import hub
from musiclm_core.clap import CLAP
from musiclm_core.gpt2 import GPT2, AudioLDM2Projection
from musiclm_core.hifigan import HifiGan
from musiclm_core.ldm import LatentDiffusion
from musiclm_core.t5 import SPIECE, T5Encoder
from musiclm_core.unet import UNet
from musiclm_core.vae import AutoencoderKL


GRAPH_T5_TOKENS = 32  # a kept UNet graph serves the prompts of up to a multiple of this many Flan-T5 tokens


class Conditioning(NamedTuple):
    """What every UNet call reads, one row per latent row."""
    generated: Tensor  # (rows, 8, 768) GPT-2 vectors: encoder_hidden_states
    t5: Tensor         # (rows, L, 1024) Flan-T5 states: encoder_hidden_states_1
    t5_mask: Tensor    # (rows, L), 1 = token: encoder_attention_mask_1


class AudioLDM2(LatentDiffusion):
    """diffusers' `AudioLDM2Pipeline` (pipelines/audioldm2/pipeline_audioldm2.py), text-to-audio and text-to-music
    checkpoints; `generate` is `LatentDiffusion.generate` with guidance_scale 3.5 by default. The TTS variants
    (a VITS text encoder) are not supported."""

    default_guidance_scale = 3.5
    pipeline_class = "AudioLDM2Pipeline"

    def __init__(self, unet: UNet, vae: AutoencoderKL, vocoder: HifiGan, clap: CLAP, t5: T5Encoder,
                 projection: AudioLDM2Projection, gpt2: GPT2, scheduler_config: dict, sample_size: int | None = None):
        super().__init__(unet, vae, vocoder, clap, scheduler_config, sample_size)
        self.t5, self.projection, self.gpt2 = t5, projection, gpt2
        if t5.tokenizer is None:
            raise ValueError("the Flan-T5 encoder has no tokenizer (T5Encoder.from_pretrained attaches one)")
        widths = {"the projection's CLAP input": (projection.config.clap_dim, clap.config.projection_dim),
                  "the projection's T5 input": (projection.config.t5_dim, t5.config.dim),
                  "GPT-2": (gpt2.config.dim, projection.config.dim),
                  "the UNet's encoder_hidden_states": (unet.config.context_width, gpt2.config.dim),
                  "the UNet's encoder_hidden_states_1": (unet.config.context_width_1, t5.config.dim)}
        for name, (takes, given) in widths.items():
            if takes != given:
                raise ValueError(f"{name} is {takes} wide, its input {given}")

    def encode_text(self, texts: list[str], t5_length: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """(GPT-2 vectors (B, 8, D), Flan-T5 states (B, L, 1024), T5 mask (B, L)) of texts.

        CLAP reads the texts truncated to its tokenizer's limit (512; the pipeline also pads them to it, which the
        attention mask makes no difference to but time: see MusicLDM.encode_text). Flan-T5 reads them padded to
        the longest, or, with t5_length, padded and truncated to that many tokens (the negative prompts:
        pipeline_audioldm2.py pads them to the positive prompts' length so that both halves of the batch have one
        width, cutting a longer negative prompt short)."""
        ids, mask = self.clap.tokenize(texts, padding="longest", max_length=self.clap.config.max_text_length)
        clap = self.clap.encode_text(ids, mask)[:, None]  # (B, 1, 512); its mask is ones
        if t5_length is None:
            ids, t5_mask = self.t5.tokenizer(texts, max_length=self.t5.config.max_length)
        else:
            ids, t5_mask = self.t5.tokenizer(texts, max_length=t5_length, padding="max_length")
        device = self.t5.embed.weight.device
        ids, t5_mask = ids.to(device), t5_mask.to(device)
        t5 = self.t5(ids, t5_mask)  # (B, L, 1024)
        embeds, embeds_mask = self.projection(clap, t5, t5_mask.new_ones(clap.shape[:2]), t5_mask)  # (B, L + 5, D)
        return self.gpt2.generate(embeds, embeds_mask), t5, t5_mask

    def _encode(self, prompts: list[str], negatives: list[str] | None, n: int) -> Conditioning:
        """Rows: prompts each repeated n times, after the negatives (same layout) if any."""
        parts = [t.repeat_interleave(n, dim=0) for t in self.encode_text(prompts, None)]  # p0, p0, ..., p1, ...
        if negatives is not None:
            negative = [t.repeat_interleave(n, dim=0) for t in self.encode_text(negatives, parts[1].shape[1])]
            parts = [torch.cat([u, c]) for u, c in zip(negative, parts)]
        return Conditioning(*parts)

    def _graph_conditioning(self, cond: Conditioning) -> Conditioning:
        """For a kept CUDA graph of the UNet call (ldm._graphed_noise): the Flan-T5 states, as long as the longest
        prompt, padded to a multiple of GRAPH_T5_TOKENS with masked-out tokens, so that prompts of other token
        lengths replay one capture. The cross-attention gives a masked key no weight: the same UNet output to
        rounding (3e-6 on outputs of ~3, tiny model; tests/unit/test_ldm.py)."""
        pad = -cond.t5.shape[1] % GRAPH_T5_TOKENS
        if not pad:
            return cond
        return Conditioning(cond.generated, F.pad(cond.t5, (0, 0, 0, pad)), F.pad(cond.t5_mask, (0, pad)))

    def _noise(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        # No mask for the GPT-2 vectors, as the pipeline passes none.
        return self.unet(x, t, encoder_hidden_states=cond.generated, encoder_hidden_states_1=cond.t5,
                         encoder_attention_mask_1=cond.t5_mask)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "AudioLDM2":
        """A diffusers AudioLDM 2 pipeline: a hub id (cvssp/audioldm2, cvssp/audioldm2-large, cvssp/audioldm2-music)
        or a local folder with model_index.json and unet/, vae/, vocoder/, text_encoder/, tokenizer/,
        text_encoder_2/, tokenizer_2/ (with spiece.model), projection_model/, language_model/, scheduler/."""
        source, scheduler_config, sample_size = cls._pipeline_folder(name_or_path, revision)
        if isinstance(source, Path):
            t5_root = source
        else:  # the Flan-T5 files only (T5Encoder.from_pretrained of a hub id would fetch the whole repo)
            t5_root = hub.resolve(source, revision=revision,
                                  allow_patterns=["text_encoder_2/*.json", "text_encoder_2/*.safetensors",
                                                  f"tokenizer_2/{SPIECE}"])
        if not (t5_root / "tokenizer_2" / SPIECE).is_file():
            raise hub.CheckpointError(f"{t5_root / 'tokenizer_2'} has no {SPIECE}: the Flan-T5 tokenizer needs the "
                                      f"sentencepiece model")
        t5 = T5Encoder.from_pretrained(t5_root / "text_encoder_2", dtype=dtype,
                                       tokenizer_folder=t5_root / "tokenizer_2")
        return cls(UNet.from_pretrained(source, dtype=dtype, revision=revision),
                   AutoencoderKL.from_pretrained(source, dtype=dtype, revision=revision),
                   HifiGan.from_pretrained(source, dtype=dtype, revision=revision),
                   CLAP.from_pretrained(source, dtype=dtype, revision=revision), t5,
                   AudioLDM2Projection.from_pretrained(source, dtype=dtype, revision=revision),
                   GPT2.from_pretrained(source, dtype=dtype, revision=revision), scheduler_config, sample_size)
