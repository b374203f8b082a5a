"""musiclm_core: readable, fast PyTorch implementations of open text-to-music models.

The public names are imported on first use (PEP 562 module `__getattr__`): `import musiclm_core` and `musiclm
--help` do not pay for torch and the models. `from musiclm_core import MusicGen` works as usual. To export a new
name, add it to `_EXPORTS` (name -> the module that defines it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "MusicGen": "musiclm_core.musicgen",
    "MusicGenConfig": "musiclm_core.musicgen",
    "MusicGenLM": "musiclm_core.musicgen",
    "MusicGenMelody": "musiclm_core.melody",
    "load_audio": "musiclm_core.audio",
    "save_audio": "musiclm_core.audio",
    "CheckpointError": "musiclm_core.hub",
    "chroma_features": "musiclm_core.chroma",
    "EnCodec": "musiclm_core.encodec",
    "EnCodecConfig": "musiclm_core.encodec",
    "T5Encoder": "musiclm_core.t5",
    "T5Tokenizer": "musiclm_core.t5",
    "CLAP": "musiclm_core.clap",
    "CLAPConfig": "musiclm_core.clap",
    "GPT2": "musiclm_core.gpt2",
    "GPT2Config": "musiclm_core.gpt2",
    "AudioLDM2Projection": "musiclm_core.gpt2",
    "ProjectionConfig": "musiclm_core.gpt2",
    "UNet": "musiclm_core.unet",
    "UNetConfig": "musiclm_core.unet",
    "AutoencoderKL": "musiclm_core.vae",
    "VAEConfig": "musiclm_core.vae",
    "HifiGan": "musiclm_core.hifigan",
    "HifiGanConfig": "musiclm_core.hifigan",
    "wav_to_mel": "musiclm_core.mel",
    "load_scheduler": "musiclm_core.schedulers",
    "DiagonalGaussian": "musiclm_core.vae",
    "MusicLDM": "musiclm_core.musicldm",
    "AudioLDM2": "musiclm_core.audioldm2",
    "VGGish": "musiclm_core.vggish",
    "VGGishConfig": "musiclm_core.vggish",
    "VGGishEmbedding": "musiclm_core.vggish",
    "PaSST": "musiclm_core.passt",
    "PaSSTConfig": "musiclm_core.passt",
    "KLDivergence": "musiclm_core.passt",
    "label_distributions": "musiclm_core.passt",
    "kl_divergence": "musiclm_core.passt",
    "ChromaCosineSimilarity": "musiclm_core.metrics",
    "melody_chroma": "musiclm_core.metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'musiclm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access does not come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from musiclm_core.audio import load_audio, save_audio
    from musiclm_core.chroma import chroma_features
    from musiclm_core.encodec import EnCodec, EnCodecConfig
    from musiclm_core.hub import CheckpointError
    from musiclm_core.melody import MusicGenMelody
    from musiclm_core.musicgen import MusicGen, MusicGenConfig, MusicGenLM
    from musiclm_core.t5 import T5Encoder, T5Tokenizer
    from musiclm_core.clap import CLAP, CLAPConfig
    from musiclm_core.gpt2 import GPT2, AudioLDM2Projection, GPT2Config, ProjectionConfig
    from musiclm_core.hifigan import HifiGan, HifiGanConfig
    from musiclm_core.mel import wav_to_mel
    from musiclm_core.schedulers import load_scheduler
    from musiclm_core.unet import UNet, UNetConfig
    from musiclm_core.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
    from musiclm_core.musicldm import MusicLDM
    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.vggish import VGGish, VGGishConfig, VGGishEmbedding
    from musiclm_core.passt import KLDivergence, PaSST, PaSSTConfig, kl_divergence, label_distributions
    from musiclm_core.metrics import ChromaCosineSimilarity, melody_chroma
