"""Without a GPU the kernel tests run in Triton's interpreter on the CPU.

The switch must be on before triton builds the kernels (at the import of musiclm_core.kernels.triton_attention,
which `attention` imports lazily), so it is set here, when pytest enters this folder. With a GPU it stays off:
the CUDA tests must run the compiled kernels, not the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
