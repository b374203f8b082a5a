"""Scale-out through torchrun (an existing engine, not our own): DDP, and FSDP for the large models.

    torchrun --nproc-per-node 8 -m musiclm_core.cli train musicgen ... --distributed ddp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT -m musiclm_core.cli train musicgen ...

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `rank_and_world` initialises the default process group from them
(NCCL on CUDA, gloo on the CPU) and puts each process on its local GPU. Every process takes `batch_size` rows of
each global batch (`data.MusicGenBatches`), DDP averages the gradients in the backward pass, so a step equals a
single-process step on the whole global batch (tests/unit/test_train_distributed.py checks that on the CPU with
two gloo processes). FSDP (torch's `fully_shard`, FSDP2) shards the parameters, gradients and optimiser state
across the processes, for models whose AdamW state does not fit one device; checkpoints gather them whole.
"""

from __future__ import annotations

import os

import torch
from torch import nn

MODES = ("ddp", "fsdp")


def rank_and_world(mode: str | None) -> tuple[int, int]:
    """(rank, world size): (0, 1) without `mode`; else from the process group, initialised from torchrun's
    environment if it is not yet."""
    if mode is None:
        return 0, 1
    if mode not in MODES:
        raise ValueError(f"distributed must be None or one of {MODES}, got {mode!r}")
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(f"--distributed {mode} runs under torchrun (RANK and WORLD_SIZE are not set)")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def wrap(model: nn.Module, mode: str | None) -> nn.Module:
    """`model` for `mode`: itself (None), DistributedDataParallel ("ddp"), or sharded in place with FSDP2's
    `fully_shard` as one group, the whole model ("fsdp"; why not layer by layer: below)."""
    if mode is None:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        # find_unused_parameters: with LoRA most parameters are frozen, which DDP handles; unused trainable
        # ones (none in our models) would need it.
        return DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One shard group for the whole model: the parameters are gathered for the forward and backward and
        # freed after, the gradients and the AdamW state (two fp32 copies of the weights, the bulk of the memory)
        # stay sharded. Not layer by layer: MusicGen's `cross_memory` calls every layer's cross-attention k and v
        # projections outside that layer's forward, where a per-layer shard would not be gathered.
        fully_shard(model)
        return model
    raise ValueError(f"distributed must be None or one of {MODES}, got {mode!r}")
