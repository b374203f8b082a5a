"""Scale-out (musiclm_core/train/distributed.py): two CPU processes with the gloo backend under DDP compute the
same averaged gradients, losses and weights as one process on the same global batch; under FSDP the same losses
and weights, gathered into the run folder."""

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from musiclm_core.cli import random_tiny_musicgen
from musiclm_core.train import data, loop, musicgen as tm

WORLD = 2
CONFIG = dict(steps=3, lr=3e-3, warmup_steps=1, seed=5)


def clips():
    g = torch.Generator().manual_seed(0)
    # every clip longer than the segment: each process then has as many targets as the other, and the mean of
    # the two per-process losses is the loss of the global batch
    return [data.EncodedClip(torch.randint(0, 2048, (4, 40), generator=g), f"clip {i}") for i in range(5)]


def gradients(objective, pipeline, batches):
    batch = batches.batch(0)
    states, mask, _ = tm.conditioning(pipeline, batch, torch.device("cpu"))
    loss, _ = objective(batch.codes, states, mask)
    loss.backward()
    return {n: p.grad.clone() for n, p in pipeline.lm.named_parameters()}


def worker(rank, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        pipe = random_tiny_musicgen(0)
        lm = tm.prepare_lm(pipe)
        from musiclm_core.train import distributed
        ddp = distributed.wrap(tm.MusicGenObjective(lm), "ddp")
        batches = data.MusicGenBatches(clips(), batch_size=2, segment_frames=20, special=2048, seed=1,
                                       cond_dropout=0.5, rank=rank, world_size=WORLD)
        grads = gradients(ddp, pipe, batches)
        if rank == 0:
            torch.save(grads, f"{folder}/grads.pt")
        losses = tm.train_musicgen(random_tiny_musicgen(0), clips(), f"{folder}/ddp", loop.TrainConfig(**CONFIG),
                                   batch_size=2, segment_frames=20, cond_dropout=0.5, distributed="ddp")
        if rank == 0:
            torch.save(torch.tensor(losses, dtype=torch.float64), f"{folder}/losses.pt")
        losses = tm.train_musicgen(random_tiny_musicgen(0), clips(), f"{folder}/fsdp", loop.TrainConfig(**CONFIG),
                                   batch_size=2, segment_frames=20, cond_dropout=0.5, distributed="fsdp")
        if rank == 0:
            torch.save(torch.tensor(losses, dtype=torch.float64), f"{folder}/fsdp_losses.pt")

        def interrupt(record):  # Ctrl-C once step 2 is logged, before its checkpoint: the last is step 1's
            if record["step"] == 2:
                raise KeyboardInterrupt

        settings = dict(batch_size=2, segment_frames=20, cond_dropout=0.5, distributed="fsdp")
        config = loop.TrainConfig(**CONFIG, save_every=1)
        try:
            tm.train_musicgen(random_tiny_musicgen(0), clips(), f"{folder}/fsdp_resumed", config, log=interrupt,
                              **settings)
        except KeyboardInterrupt:
            pass
        dist.barrier()
        from musiclm_core.musicgen import MusicGen
        rest = tm.train_musicgen(MusicGen.from_pretrained(f"{folder}/fsdp_resumed"), clips(),
                                 f"{folder}/fsdp_resumed", config, resume=True, **settings)
        if rank == 0:
            torch.save(torch.tensor(rest, dtype=torch.float64), f"{folder}/fsdp_rest.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_ddp_matches_one_process_on_the_global_batch(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = random_tiny_musicgen(0)
        lm = tm.prepare_lm(pipe)
        batches = data.MusicGenBatches(clips(), batch_size=2 * WORLD, segment_frames=20, special=2048, seed=1,
                                       cond_dropout=0.5)
        expected = gradients(tm.MusicGenObjective(lm), pipe, batches)
        single = random_tiny_musicgen(0)
        losses = tm.train_musicgen(single, clips(), tmp_path / "single", loop.TrainConfig(**CONFIG),
                                   batch_size=2 * WORLD, segment_frames=20, cond_dropout=0.5)
    finally:
        torch.set_num_threads(threads)
    averaged = torch.load(tmp_path / "grads.pt", weights_only=True)
    assert averaged.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(averaged[name], grad, atol=1e-6, rtol=1e-5), name
    assert max(g.abs().max() for g in expected.values()) > 1e-3  # the gradients are not all zero
    ddp_losses = torch.load(tmp_path / "losses.pt", weights_only=True)
    assert torch.allclose(ddp_losses, torch.tensor(losses, dtype=torch.float64), atol=1e-5)
    from musiclm_core.musicgen import MusicGen
    for mode in ("ddp", "fsdp"):
        state = MusicGen.from_pretrained(tmp_path / mode).lm.state_dict()
        for name, value in single.lm.state_dict().items():
            assert torch.allclose(state[name], value, atol=1e-5), (mode, name)
    fsdp_losses = torch.load(tmp_path / "fsdp_losses.pt", weights_only=True)
    assert torch.allclose(fsdp_losses, torch.tensor(losses, dtype=torch.float64), atol=1e-5)
    optimizer = torch.load(tmp_path / "fsdp" / loop.STATE_FILE, weights_only=True)["optimizer"]
    assert len(optimizer["state"]) == len(list(single.lm.parameters()))  # the whole AdamW state, gathered
    rest = torch.load(tmp_path / "fsdp_rest.pt", weights_only=True)  # resumed after step 1 (its checkpoint)
    assert torch.allclose(rest, fsdp_losses[1:], atol=1e-6)
