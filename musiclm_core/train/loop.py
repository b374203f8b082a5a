"""The training loop shared by the MusicGen and the diffusion fine-tuning: AdamW, warm-up + cosine learning rate,
gradient accumulation and clipping, bf16 autocast, metrics, and checkpoints that resume exactly.

A run folder (`out`) holds

    trainer_state.pt    step, optimiser state, RNG states, the run's settings (torch.save; read weights_only)
    metrics.jsonl       one record per step: {"step", "loss", "lr", "grad_norm", "tokens_per_s", ...}
    (the weights)       written by the task's `save_weights` (e.g. a native MusicGen pipeline folder)

The batches are a function of the step (`data.MusicGenBatches`), the learning rate is a function of the step, and
the optimiser state and RNG states are saved, so a run resumed at step n takes the same steps as the uninterrupted
run: on the CPU its losses agree bit for bit (tests/unit/test_train_loop.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
FREE_SETTINGS = ("steps", "save_every")  # what a resumed run may change


@dataclass
class TrainConfig:
    steps: int = 1000               # the run's total number of optimiser steps (a resumed run continues to it)
    lr: float = 1e-5
    warmup_steps: int = 0           # linear warm-up from 0, then a cosine decay to min_lr_ratio * lr at `steps`
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95             # audiocraft's MusicGen optimiser
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global gradient norm; 0 = off
    grad_accum: int = 1             # micro-batches per step
    bf16: bool = False              # autocast the forward to bfloat16 (CPU and CUDA); weights and AdamW stay fp32
    save_every: int = 0             # steps between checkpoints (0: only at the end)
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0 or self.save_every < 0:
            raise ValueError(f"steps and grad_accum must be >= 1, warmup_steps and save_every >= 0, got steps="
                             f"{self.steps}, grad_accum={self.grad_accum}, warmup_steps={self.warmup_steps}, "
                             f"save_every={self.save_every}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warm-up, then cosine to min_lr_ratio * lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms, biases and embeddings' 1-D params keep theirs)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU or CUDA (CPU autocast covers the matmuls and convolutions)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def differentiable_attention():
    """Route `kernels.attention` to its PyTorch path (MUSICLM_ATTENTION=torch) while the block runs: the Triton
    kernels, which auto would pick on CUDA, have no backward pass."""
    before = os.environ.get("MUSICLM_ATTENTION")
    os.environ["MUSICLM_ATTENTION"] = "torch"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MUSICLM_ATTENTION"]
        else:
            os.environ["MUSICLM_ATTENTION"] = before


def rng_state() -> dict:
    """torch's, Python's and numpy's global RNG states, in types that `torch.load(weights_only=True)` reads."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(),
             "python": [version, torch.tensor(words, dtype=torch.int64), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words.tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs `step_loss(step, micro) -> (loss, tokens)` for steps `start .. config.steps - 1`.

    model: the module whose trainable parameters are optimised (DDP averages a DDP wrapper's gradients; an FSDP
    module's parameters are sharded DTensors, gathered whole for each checkpoint).
    save_weights(out, step, state): writes the weights the run folder loads with (at each checkpoint, by rank 0)
    and records `step` with them, so that `resume` can tell weights and trainer state of different saves apart;
    `state` is the model's gathered state dict under FSDP, None otherwise (read the model itself).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, out: str | os.PathLike,
                 step_loss: Callable[[int, int], tuple[Tensor, int]],
                 save_weights: Callable[[Path, int, dict | None], None], *, rank: int = 0,
                 settings: dict | None = None):
        self.model, self.config, self.out = model, config, Path(out)
        self.step_loss, self.save_weights, self.rank = step_loss, save_weights, rank
        self.settings = settings or {}
        self.optimizer = make_optimizer(model.parameters(), config)
        self.step = 0

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP shards (DTensors)."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.params)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Weights first, then the trainer state, each replaced atomically: a crash between the two leaves a
        state older than the weights, which `resume` refuses (the steps differ) rather than mixing them.
        Under FSDP every rank takes part (the shards are gathered), rank 0 writes."""
        model_state = None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        else:
            optimizer_state = self.optimizer.state_dict()
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save({"step": self.step, "optimizer": optimizer_state, "rng": rng_state(),
                    "config": asdict(self.config), "settings": self.settings}, tmp)
        self.save_weights(self.out, self.step, model_state)
        os.replace(tmp, self.out / STATE_FILE)

    def resume(self, weights_step: int | None) -> None:
        """Load the optimiser, RNG states and step from `out`; FileNotFoundError when there is no checkpoint.
        weights_step: the step the weights the model was loaded with were saved at (None: not known)."""
        path = self.out / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
        state = torch.load(path, weights_only=True)
        if weights_step is not None and weights_step != state["step"]:
            raise ValueError(f"{self.out}: the weights are from step {weights_step}, the trainer state from step "
                             f"{state['step']} (the last save was interrupted); cannot resume exactly")
        saved = {k: v for k, v in state["settings"].items() if k not in FREE_SETTINGS}
        mine = {k: v for k, v in self.settings.items() if k not in FREE_SETTINGS}
        if saved != mine:
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"{path}: the run was made with other settings ({', '.join(changed)}: "
                             f"{[saved.get(k) for k in changed]} there, {[mine.get(k) for k in changed]} now)")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        metrics = self.out / METRICS_FILE
        if self.rank == 0 and metrics.is_file():  # drop records of steps taken after the checkpoint
            kept = [r for r in read_metrics(self.out) if r["step"] <= self.step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # -- the loop ---------------------------------------------------------------------------------------------

    def train(self, *, progress: bool = False, log: Callable[[dict], None] | None = None) -> list[float]:
        """Run to `config.steps`; returns the losses of the steps it ran. Checkpoints every `save_every` steps
        and at the end; metrics.jsonl gets one record per step (rank 0)."""
        c = self.config
        if self.step >= c.steps:
            raise ValueError(f"the run in {self.out} is already at step {self.step} of --steps {c.steps}: raise "
                             f"--steps to train further")
        metrics = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = open(self.out / METRICS_FILE, "a", encoding="utf-8")
        board = _tensorboard(self.out) if self.rank == 0 else None
        losses = []
        shown = 0.0  # when the last progress line was printed
        self.model.train()
        try:
            while self.step < c.steps:
                record = self.one_step()
                losses.append(record["loss"])
                self.step += 1
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                if board is not None:
                    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        board.add_scalar(f"train/{name}", record[name], record["step"])
                if log is not None:
                    log(record)
                if progress and self.rank == 0:
                    shown = show_progress(record, c.steps, shown)
                if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                    self.save()
            self.save()
        finally:
            if metrics is not None:
                metrics.close()
            if board is not None:
                board.close()
            if progress and self.rank == 0 and sys.stderr.isatty():
                print(file=sys.stderr)
        return losses

    def one_step(self) -> dict:
        c = self.config
        start = time.perf_counter()
        lr = learning_rate(c, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = 0.0, 0
        for micro in range(c.grad_accum):
            # DDP averages the gradients at the last micro-batch only (no_sync before it)
            sync = (self.model.no_sync() if hasattr(self.model, "no_sync") and micro < c.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                loss, count = self.step_loss(self.step, micro)
                (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
            tokens += count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the logged loss and token count are the global batch's (the gradients are averaged by DDP)
            totals = torch.tensor([total, tokens], dtype=torch.float64, device=self.params[0].device)
            torch.distributed.all_reduce(totals)
            total, tokens = totals[0].item() / torch.distributed.get_world_size(), int(totals[1])
        if not math.isfinite(total):
            raise FloatingPointError(f"the loss is {total} at step {self.step}: lower the learning rate or check "
                                     f"the data")
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip if c.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        seconds = time.perf_counter() - start
        return {"step": self.step + 1, "loss": total, "lr": lr, "grad_norm": float(norm), "tokens": tokens,
                "tokens_per_s": tokens / seconds, "seconds": seconds}


def show_progress(record: dict, steps: int, shown: float, every: float = 10.0) -> float:
    """One progress line on stderr: redrawn in place on a terminal, else (a log file) a line every `every` s and
    at the last step. Returns when a line was last printed."""
    line = (f"step {record['step']:6d} / {steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:,.0f} tokens/s")
    now = time.monotonic()
    if sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)
        return now
    if now - shown >= every or record["step"] == steps:
        print(line, file=sys.stderr, flush=True)
        return now
    return shown


def _tensorboard(out: Path):
    """A TensorBoard writer in out/tensorboard when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
