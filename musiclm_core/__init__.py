"""musiclm_core: readable, fast PyTorch implementations of open text-to-music models."""

from musiclm_core.audio import load_audio, save_audio
from musiclm_core.hub import CheckpointError

__all__ = ["load_audio", "save_audio", "CheckpointError"]
