"""MusicGen LM fine-tuning: the objective module and the run that wires data, model and loop together.

The codec and the text encoder stay frozen (audiocraft trains the LM only): the clips are encoded to codes once
(`data.encode_folder`) and each batch's captions go through T5 without gradients. Classifier-free guidance needs
the model to know the null condition, so a fraction `cond_dropout` of the rows (audiocraft's
`classifier_free_guidance.training_dropout`, 0.2 in its MusicGen configs) is trained with it: zero text states
with an all-False mask, which is exactly the null row `generate.py` feeds at inference, and for MusicGen Melody
also the null chroma (`chroma.null_chroma`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from musiclm_core import hub
from musiclm_core.cache import CrossMemory
from musiclm_core.kernels import linear
from musiclm_core.train import losses
from musiclm_core.train.data import EncodedClip, MusicGenBatch, MusicGenBatches
from musiclm_core.train.loop import STATE_FILE, Trainer, TrainConfig, autocast, differentiable_attention


def plain_linears(module: nn.Module) -> nn.Module:
    """Swap `kernels.linear.BlockedLinear` layers (the CPU decode layout `from_pretrained` may choose) back to
    `nn.Linear` in place: training multiplies many rows at once, where the plain layer is the fast one, and the
    LoRA adapters wrap plain layers. Returns `module`."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, linear.BlockedLinear)]
    for name, blocked in targets:
        plain = nn.Linear(blocked.in_features, blocked.out_features, bias=blocked.bias is not None,
                          device=blocked.blocks.device, dtype=blocked.blocks.dtype)
        with torch.no_grad():
            plain.weight.copy_(blocked.weight)
            if blocked.bias is not None:
                plain.bias.copy_(blocked.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, plain)
    return module


def is_melody(lm: nn.Module) -> bool:
    return hasattr(lm, "melody_config")


class MusicGenObjective(nn.Module):
    """Teacher-forced cross-entropy of the LM on delayed codes (`losses.codebook_cross_entropy`).

    forward(codes (B, K, T), text_states (B, Lt, text_dim), text_mask (B, Lt), chroma (B, F, 12) or None)
    -> (loss, per-codebook losses (K,)). A module, so that DDP can wrap it (DDP prepares its gradient averaging
    in the wrapper's forward). checkpointing: recompute each decoder layer in the backward pass instead of
    keeping its activations (activation checkpointing: about a third more compute for a fraction of the memory).
    """

    def __init__(self, lm: nn.Module, *, checkpointing: bool = False):
        super().__init__()
        self.lm = lm
        self.checkpointing = checkpointing

    def forward(self, codes: Tensor, text_states: Tensor, text_mask: Tensor,
                chroma: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lm, c = self.lm, self.lm.config
        inputs, targets = losses.delayed_inputs(codes, c.delays, c.special)  # (B, K, S-1) each
        x = lm.embed(inputs)  # (B, S-1, D)
        memory, P = None, 0
        if is_melody(lm):
            prefix = lm.prefix(chroma, text_states, text_mask)  # (B, P, D)
            P = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + S-1, D)
        else:
            memory = lm.cross_memory(text_states, text_mask)
        logits = self.decoder(x, memory)[:, :, P:]  # (B, K, S-1, card)
        return losses.codebook_cross_entropy(logits, targets, c.special)

    def decoder(self, x: Tensor, memory: CrossMemory | None) -> Tensor:
        """The LM's `forward_embeds` without a cache; with checkpointing, each layer is recomputed in backward."""
        lm = self.lm
        if not self.checkpointing:
            return lm.forward_embeds(x, memory=memory)
        B, T, _ = x.shape
        lm.ensure_positions(T)
        positions = torch.arange(T, device=x.device)  # (T,)
        x = x + lm.sinusoids[:T].to(x.dtype)
        memories = [None] * len(lm.layers) if memory is None else memory.layers
        for layer, layer_memory in zip(lm.layers, memories):
            x = checkpoint(layer, x, positions=positions, offset=0, memory=layer_memory, cache=None,
                           use_reentrant=False)
        x = lm.norm(x)
        return torch.stack([head(x) for head in lm.heads], dim=1)  # (B, K, T, card)


def conditioning(pipeline, batch: MusicGenBatch, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """(text states (B, Lt, text_dim), mask (B, Lt), chroma (B, F, 12) or None) of a batch, with the dropped rows
    set to the null condition (zero states, all-False mask, null chroma)."""
    from musiclm_core.chroma import null_chroma

    with torch.no_grad():
        states, mask = pipeline.text_encoder.encode_text(batch.captions)
    keep = ~batch.dropped.to(device)
    states = states.to(device) * keep[:, None, None].to(states.dtype)
    mask = mask.to(device) * keep[:, None].to(mask.dtype)
    chroma = batch.chroma
    if chroma is not None:
        chroma = chroma.to(device)
        null = null_chroma(chroma.shape[0], chroma.shape[1], device=device, dtype=chroma.dtype)
        chroma = torch.where(keep[:, None, None], chroma, null)
    return states, mask, chroma


def save_run_weights(pipeline, out: Path, lm_state: dict[str, Tensor], step: int) -> None:
    """Make `out` a native pipeline folder that `from_pretrained` loads: lm/ rewritten with `lm_state` (the
    merged weights when training LoRA adapters), codec/ and text_encoder/ written once, config.json (last, with
    the training step: `weights_step`)."""
    lm = pipeline.lm
    config = lm.melody_config.to_dict() if is_melody(lm) else lm.config.to_dict()
    hub.save_native(out / "lm", _lm_kind(lm), config, lm_state, overwrite=True)
    if not (out / "codec" / "config.json").is_file():
        pipeline.codec.save_pretrained(out / "codec", overwrite=True)
    if not (out / "text_encoder" / "config.json").is_file():
        pipeline.text_encoder.save_pretrained(out / "text_encoder", overwrite=True)
    meta = {hub.NATIVE_FORMAT: {"model": pipeline.kind, "version": 1},
            "config": {"max_duration": pipeline.max_duration}, "training": {"step": step}}
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "config.json")


def weights_step(out: Path) -> int | None:
    """The training step recorded with a run folder's weights (`save_run_weights`), None if there is none."""
    path = out / "config.json"
    return hub.read_json(path).get("training", {}).get("step") if path.is_file() else None


def _lm_kind(lm: nn.Module) -> str:
    from musiclm_core import melody, musicgen

    return melody.LM_KIND if is_melody(lm) else musicgen.LM_KIND


def prepare_lm(pipeline, *, lora_rank: int = 0, lora_alpha: float | None = None) -> nn.Module:
    """The pipeline's LM made trainable: plain linears, fp32 weights, and with lora_rank > 0 LoRA adapters on
    its attention projections (everything else frozen). The codec and the text encoder are frozen."""
    from musiclm_core.train import lora

    for frozen in (pipeline.codec, pipeline.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    lm = plain_linears(pipeline.lm)
    lm.requires_grad_(True)
    if lora_rank:
        lora.add_lora(lm, lora_rank, lora_alpha)
    return lm


def load_for_training(pipeline_class, model: str | os.PathLike, out: str | os.PathLike, *, resume: bool,
                      lora_rank: int = 0, device: torch.device | str = "cpu"):
    """The pipeline a run starts from: `model`, or with `resume` (without LoRA) the run folder's latest weights.
    A run folder that holds a run is only continued with resume=True (FileExistsError otherwise)."""
    out = Path(out)
    has_state = (out / STATE_FILE).is_file()
    if resume and not has_state:
        raise FileNotFoundError(f"no checkpoint to resume from: {out / STATE_FILE} does not exist")
    if not resume and has_state:
        raise FileExistsError(f"{out} holds a training run ({STATE_FILE}): resume it (CLI: --resume), or choose "
                              f"another output folder")
    source = out if resume and not lora_rank else model
    return pipeline_class.from_pretrained(source).to(device)


def train_musicgen(pipeline, clips: Sequence[EncodedClip], out: str | os.PathLike, config: TrainConfig, *,
                   batch_size: int = 2, segment_frames: int = 500, cond_dropout: float = 0.2,
                   lora_rank: int = 0, lora_alpha: float | None = None, checkpointing: bool = False,
                   resume: bool = False, distributed: str | None = None, progress: bool = False,
                   log: Callable[[dict], None] | None = None) -> list[float]:
    """Fine-tune `pipeline`'s LM on `clips` (`data.encode_folder`) for steps up to `config.steps`; returns the
    losses of the steps taken. The run folder `out` becomes a native pipeline folder with the latest weights
    (merged with the adapter when lora_rank > 0; the adapter alone in out/adapter.safetensors), a trainer
    state and metrics.jsonl. resume=True continues from out's last checkpoint: with LoRA the adapter is read
    from out; without, `pipeline` must be the one loaded from out (the CLI does that).

    log: called with each step's metrics record.
    distributed: None, "ddp" or "fsdp" (run under torchrun: the process group is initialised from its
    environment; each process takes batch_size rows of every global batch).
    """
    from musiclm_core.train import distributed as dist_setup, lora

    out = Path(out)
    rank, world_size = dist_setup.rank_and_world(distributed)
    device = pipeline.device
    lm = prepare_lm(pipeline, lora_rank=lora_rank, lora_alpha=lora_alpha)
    if resume and lora_rank:
        lora.load_adapter(lm, out)
    objective = dist_setup.wrap(MusicGenObjective(lm, checkpointing=checkpointing), distributed)
    hop = pipeline.codec.hop_length
    batches = MusicGenBatches(clips, batch_size=batch_size, segment_frames=segment_frames, special=lm.config.special,
                              seed=config.seed, grad_accum=config.grad_accum, cond_dropout=cond_dropout, rank=rank,
                              world_size=world_size, chroma_frames_per_frame=_chroma_rate(pipeline, hop))

    def step_loss(step: int, micro: int) -> tuple[Tensor, int]:
        batch = batches.batch(step, micro)
        states, mask, chroma = conditioning(pipeline, batch, device)
        codes = batch.codes.to(device)
        with autocast(device, config.bf16), differentiable_attention():
            loss, _ = objective(codes, states, mask, chroma)
        return loss, int((codes != lm.config.special).sum())

    def save_weights(folder: Path, step: int, gathered: dict[str, Tensor] | None) -> None:
        state = None if gathered is None else {k[len("lm."):]: v for k, v in gathered.items()}  # FSDP
        save_run_weights(pipeline, folder, lora.merged_state_dict(lm, state), step)
        if lora_rank:
            lora.save_adapter(lm, folder, state)

    settings = {"batch_size": batch_size, "segment_frames": segment_frames, "cond_dropout": cond_dropout,
                "lora_rank": lora_rank, "lora_alpha": lora_alpha, "checkpointing": checkpointing,
                "world_size": world_size, "distributed": distributed, "clips": len(clips), **vars(config)}
    trainer = Trainer(objective, config, out, step_loss, save_weights, rank=rank, settings=settings)
    if resume:
        trainer.resume(weights_step(out))
    return trainer.train(progress=progress, log=log)


def _chroma_rate(pipeline, hop: int) -> float | None:
    """Chroma frames per code frame for MusicGen Melody (chroma hop 4096 at 32 kHz, codes hop 640), else None."""
    if not is_melody(pipeline.lm):
        return None
    from musiclm_core.chroma import HOP_LENGTH

    return hop / HOP_LENGTH
