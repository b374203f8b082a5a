"""LoRA adapters (musiclm_core/train/lora.py) on the tiny MusicGen LM and the tiny UNet: targets, merge and
unmerge (outputs equal within 1e-5), the adapter saved alone and loaded onto a fresh pretrained model, training
only the adapter, and bad input."""

import pytest
import torch

from musiclm_core.musicgen import PRESETS as LM_PRESETS, MusicGenLM
from musiclm_core.train import lora
from musiclm_core.unet import UNet


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, a second thread only waits


def lm_and_input():
    torch.manual_seed(0)
    lm = MusicGenLM(LM_PRESETS["tiny"]).eval()
    codes = torch.randint(0, 2048, (2, 4, 6))
    text, mask = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.long)
    return lm, (lambda model: model(codes, memory=model.cross_memory(text, mask)))


def unet_and_input():
    torch.manual_seed(0)
    unet = UNet.from_preset("tiny-musicldm").eval()
    sample, class_embed = torch.randn(2, 8, 16, 8), torch.randn(2, 24)
    return unet, (lambda model: model(sample, torch.tensor([10, 500]), class_embed=class_embed))


def randomise_adapters(model):
    """B starts at zero (the adapted model starts as the base); move it off so that merging has work to do."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.05)


@pytest.mark.parametrize("make", [lm_and_input, unet_and_input], ids=["musicgen_lm", "unet"])
def test_merge_unmerge_and_adapter_round_trip(make, tmp_path):
    model, run = make()
    with torch.no_grad():
        base = run(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    targets = lora.add_lora(model, rank=4, alpha=8)
    assert targets == lora.attention_projections(model) and len(targets) > 0
    assert all(name.rpartition(".")[2] in ("qkv", "out", "q", "k", "v", "kv") for name in targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    with torch.no_grad():
        assert torch.allclose(run(model), base, atol=1e-6)  # B = 0: the adapted model starts as the base
        randomise_adapters(model)
        unmerged = run(model)
        assert (unmerged - base).abs().max() > 1e-3  # the adapter changes the output
        merged_state = lora.merged_state_dict(model)
        assert set(merged_state) == set(weights)  # the model's own keys, no adapter keys
        lora.merge(model)
        merged = run(model)
        assert (merged - unmerged).abs().max() <= 1e-5
        for key, value in merged_state.items():
            assert torch.allclose(model.state_dict()[key], value, atol=1e-7)
        lora.merge(model)  # merging twice is a no-op
        assert (run(model) - unmerged).abs().max() <= 1e-5
        lora.unmerge(model)
        assert (run(model) - unmerged).abs().max() <= 1e-5
        for key, value in weights.items():
            assert torch.allclose(model.state_dict()[key], value, atol=1e-6)

    path = lora.save_adapter(model, tmp_path / "adapter")
    fresh, _ = make()  # the same pretrained weights, no adapter
    lora.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert (run(fresh) - unmerged).abs().max() <= 1e-6
    assert path.stat().st_size < sum(v.numel() * 4 for v in weights.values()) / 2  # the adapter alone
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert all(k.endswith(("lora_a", "lora_b")) for k in f.keys())


def test_adapter_errors(tmp_path):
    lm, _ = lm_and_input()
    with pytest.raises(ValueError, match="LoRA rank must be an integer >= 1, got 0"):
        lora.add_lora(lm, 0)
    with pytest.raises(ValueError, match="has no LoRA adapter to save"):
        lora.save_adapter(lm, tmp_path)
    lora.add_lora(lm, 2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(lm, 2, targets=["layers.0.self_attn.qkv"])
    lora.save_adapter(lm, tmp_path / "a")
    unet, _ = unet_and_input()
    with pytest.raises(ValueError, match=r"the model has no layer layers\.0\.\w+\.\w+ to put this adapter on"):
        lora.load_adapter(unet, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no LoRA adapter at"):
        lora.load_adapter(unet, tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"text_proj is a Linear|LoRA adapts nn.Linear"):
        lora.add_lora(MusicGenLM(LM_PRESETS["tiny"]), 2, targets=["layers.0.self_norm"])
    other = MusicGenLM(LM_PRESETS["tiny"])
    lora.add_lora(other, 3)  # another rank: shapes differ
    with pytest.raises(ValueError, match=r"lora_a has shape \(2, 64\), the model's is \(3, 64\)"):
        lora.load_adapter(other, tmp_path / "a")


def test_training_moves_only_the_adapter(tmp_path):
    from musiclm_core.cli import random_tiny_musicgen
    from musiclm_core.musicgen import MusicGen
    from musiclm_core.train import data, loop, musicgen as tm

    pipe = random_tiny_musicgen(0)
    base = {k: v.clone() for k, v in pipe.lm.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    clips = [data.EncodedClip(torch.randint(0, 2048, (4, 30), generator=g), f"clip {i}") for i in range(3)]
    tm.train_musicgen(pipe, clips, tmp_path / "run", loop.TrainConfig(steps=3, lr=1e-2), batch_size=2,
                      segment_frames=20, lora_rank=2)
    assert (tmp_path / "run" / lora.ADAPTER_FILE).is_file()
    state = pipe.lm.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base weights did not move
    saved = MusicGen.from_pretrained(tmp_path / "run").lm.state_dict()  # the run folder holds the merged weights
    merged = lora.merged_state_dict(pipe.lm)
    assert all(torch.allclose(saved[k], merged[k], atol=1e-7) for k in saved)
    assert max((saved[k] - base[k]).abs().max() for k in lora.attention_projections(pipe.lm)
               for k in [k + ".weight"]) > 1e-4
