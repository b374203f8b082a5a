"""musiclm_core: readable, fast PyTorch implementations of open text-to-music models."""

from musiclm_core.audio import load_audio, save_audio
from musiclm_core.chroma import chroma_features
from musiclm_core.encodec import EnCodec, EnCodecConfig
from musiclm_core.hub import CheckpointError
from musiclm_core.melody import MusicGenMelody
from musiclm_core.musicgen import MusicGen, MusicGenConfig, MusicGenLM
from musiclm_core.t5 import T5Encoder, T5Tokenizer

__all__ = ["MusicGen", "MusicGenMelody", "MusicGenConfig", "MusicGenLM", "load_audio", "save_audio", "CheckpointError", "chroma_features", "EnCodec", "EnCodecConfig", "T5Encoder", "T5Tokenizer"]
