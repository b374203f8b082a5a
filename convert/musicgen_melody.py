"""MusicGen Melody LM checkpoints: transformers' `MusicgenMelodyForConditionalGeneration` and audiocraft's
`state_dict.bin`.

The decoder is MusicGen's without cross-attention, so its keys go through the tables of `convert/musicgen.py`;
this module adds the chroma projection and the melody-specific config fields (specs/musicgen.md §1.3, §2.1, §2.3):

    transformers  `audio_enc_to_dec_proj.{weight,bias}`                            -> `chroma_proj.*`
    audiocraft    `condition_provider.conditioners.self_wav.output_proj.{...}`     -> `chroma_proj.*`
                  `condition_provider.conditioners.self_wav.chroma.spec.window`    dropped (a Hann window)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from musiclm_core import hub
from musiclm_core.chroma import HOP_LENGTH, N_CHROMA, N_FFT, SAMPLE_RATE as CHROMA_SAMPLE_RATE
from musiclm_core.convert import keys, musicgen
from musiclm_core.hub import CheckpointError
from musiclm_core.melody import TRANSFORMERS_MODEL_TYPE, MusicGenMelodyConfig, MusicGenMelodyLM

# ---------------------------------------------------------------------------------------------------------------
# transformers

TRANSFORMERS_TABLE = [
    *musicgen.TRANSFORMERS_TABLE,
    ("audio_enc_to_dec_proj.weight", "chroma_proj.weight"),
    ("audio_enc_to_dec_proj.bias", "chroma_proj.bias"),
]
TRANSFORMERS_DROPPED = musicgen.TRANSFORMERS_DROPPED
lm_part = musicgen.lm_part  # everything but text_encoder.* and audio_encoder.*
read_state = musicgen.read_state  # the same file layout


def config_from_transformers(config: dict[str, Any], *, source: str = "config.json") -> MusicGenMelodyConfig:
    """MusicGenMelodyConfig from a transformers `MusicgenMelodyConfig` dict (model_type "musicgen_melody")."""
    # The decoder and text sub-configs read exactly as MusicGen's; only the cross-attention is absent.
    lm = musicgen.config_from_transformers(config, model_type=TRANSFORMERS_MODEL_TYPE, cross_attention=False,
                                           source=source)
    num_chroma = config.get("num_chroma", N_CHROMA)
    if num_chroma != N_CHROMA:
        raise CheckpointError(f"num_chroma = {num_chroma!r} is not supported: the chroma extractor gives "
                              f"{N_CHROMA} pitch classes")
    if num_chroma == lm.dim:
        # transformers then builds no audio_enc_to_dec_proj; no official checkpoint does this.
        raise CheckpointError(f"num_chroma equals the decoder width {lm.dim}: a MusicGen Melody without "
                              f"audio_enc_to_dec_proj is not supported")
    return MusicGenMelodyConfig(lm, num_chroma=num_chroma, chroma_length=config.get("chroma_length", 235))


def load_transformers(config: dict[str, Any], state: dict[str, torch.Tensor], *, source: str,
                      dtype: torch.dtype = torch.float32) -> MusicGenMelodyLM:
    """MusicGenMelodyLM from a transformers MusicGen Melody config dict and the LM part of its state dict."""
    ours = config_from_transformers(config, source=f"{source} config.json")
    renamed = keys.rename(state, TRANSFORMERS_TABLE, dropped=TRANSFORMERS_DROPPED, source=source)
    return keys.build(lambda: MusicGenMelodyLM(ours), musicgen.fuse_self_attention(renamed), source=source,
                      dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# audiocraft

AUDIOCRAFT_TABLE = [
    *musicgen.AUDIOCRAFT_TABLE,
    ("condition_provider.conditioners.self_wav.output_proj.weight", "chroma_proj.weight"),
    ("condition_provider.conditioners.self_wav.output_proj.bias", "chroma_proj.bias"),
]
AUDIOCRAFT_DROPPED = [
    *musicgen.AUDIOCRAFT_DROPPED,
    # The chroma extractor's STFT window (periodic Hann, 16384): a derived constant that chroma.py makes itself.
    "condition_provider.conditioners.self_wav.chroma.spec.window",
]


def config_from_audiocraft(xp_cfg: str | dict[str, Any]) -> MusicGenMelodyConfig:
    """MusicGenMelodyConfig from an audiocraft melody training config (`xp.cfg`, conditioner chroma2music)."""
    cfg = musicgen.parse_xp_cfg(xp_cfg)
    get = musicgen.get_field
    cross, prepend = get(cfg, "fuser.cross", []) or [], get(cfg, "fuser.prepend", []) or []
    if cross or sorted(prepend) != ["description", "self_wav"]:
        raise CheckpointError(f"audiocraft fuser cross = {cross!r}, prepend = {prepend!r}: a MusicGen Melody "
                              f"prepends [self_wav, description] and cross-attends to nothing")
    model = get(cfg, "conditioners.self_wav.model")
    if model != "chroma_stem":
        raise CheckpointError(f"audiocraft conditioners.self_wav.model = {model!r} is not supported (expected "
                              f"'chroma_stem')")
    # The chroma extractor settings of chroma.py (specs/musicgen.md §4.1).
    for path, expected in (("n_chroma", N_CHROMA), ("radix2_exp", N_FFT.bit_length() - 1), ("argmax", True),
                           ("sample_rate", CHROMA_SAMPLE_RATE)):
        value = get(cfg, f"conditioners.self_wav.chroma_stem.{path}")
        if value != expected:
            raise CheckpointError(f"audiocraft conditioners.self_wav.chroma_stem.{path} = {value!r} is not "
                                  f"supported (expected {expected!r})")
    # Everything else (the decoder, the text conditioner) is read as MusicGen's.
    lm = musicgen.config_from_audiocraft(cfg, cross_attention=False)
    # audiocraft's pretrained melody models match the chroma to the training segment (match_len_on_eval): the
    # STFT frames of `segment_duration` seconds, 1 + N // hop (235 for 30 s).
    duration = get(cfg, "dataset.segment_duration", 30)
    chroma_length = 1 + int(duration * CHROMA_SAMPLE_RATE) // HOP_LENGTH
    return MusicGenMelodyConfig(lm, num_chroma=N_CHROMA, chroma_length=chroma_length)


def load_audiocraft(package: dict[str, Any], *, source: str, dtype: torch.dtype = torch.float32) -> MusicGenMelodyLM:
    """MusicGenMelodyLM from the loaded content of an audiocraft melody `state_dict.bin`."""
    return musicgen.load_audiocraft(package, source=source, dtype=dtype, read_config=config_from_audiocraft,
                                    lm_class=MusicGenMelodyLM, table=AUDIOCRAFT_TABLE, dropped=AUDIOCRAFT_DROPPED)


def load_audiocraft_file(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> MusicGenMelodyLM:
    path = Path(path)
    return load_audiocraft(hub.load_tensors(path), source=str(path), dtype=dtype)
