"""musiclm_core: readable, fast PyTorch implementations of open text-to-music models."""

from musiclm_core.hub import CheckpointError

__all__ = ["CheckpointError"]
