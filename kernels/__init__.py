"""Hot kernels behind one signature each: a PyTorch reference path and a Triton path chosen at run time."""

from musiclm_core.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
