"""musiclm_core.convert.keys: declarative renames, strict key accounting, meta-device build, tensor surgery."""

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from musiclm_core.convert import keys
from musiclm_core.hub import CheckpointError

TABLE = [
    ("encoder.layers.{i}.conv.weight", "enc.{i}.conv.weight"),
    ("encoder.layers.{i}.conv.bias", "enc.{i}.conv.bias"),
    ("decoder.block.{i}.layer.{j}.w", "dec.{i}.{j}.w"),
    ("quantizer.layers.{q}.codebook.embed", "rvq.{q}.codebook"),
    ("final_norm.weight", "norm.weight"),
]


def t(*shape) -> torch.Tensor:
    return torch.randn(*shape)


# ---------------------------------------------------------------------------------------------------------------
# rename


def test_rename_with_placeholders():
    state = {"encoder.layers.0.conv.weight": t(2), "encoder.layers.12.conv.bias": t(2),
             "decoder.block.3.layer.10.w": t(1), "quantizer.layers.7.codebook.embed": t(4, 2),
             "final_norm.weight": t(3)}
    out = keys.rename(state, TABLE, source="test.ckpt")
    assert list(out) == ["enc.0.conv.weight", "enc.12.conv.bias", "dec.3.10.w", "rvq.7.codebook", "norm.weight"]
    for theirs, ours in zip(state, out):
        assert out[ours] is state[theirs]  # renamed, not copied


def test_rename_matches_whole_keys_only():
    # No substring matches: a prefix, a suffix, or a non-digit index is not the pattern.
    for key in ("model.encoder.layers.0.conv.weight", "encoder.layers.0.conv.weight_g",
                "encoder.layers.x.conv.weight", "encoder.layers..conv.weight", "final_norm.weight.extra"):
        with pytest.raises(CheckpointError, match=f"unexpected keys \\(1\\):\\s+{key.replace('.', '[.]')}$"):
            keys.rename({key: t(1)}, TABLE, source="test.ckpt")


def test_rename_lists_every_unknown_key_at_once():
    state = {"encoder.layers.0.conv.weight": t(1), "zz.unknown": t(1), "aa.unknown": t(1)}
    with pytest.raises(CheckpointError) as info:
        keys.rename(state, TABLE, source="facebook/encodec_24khz")
    message = str(info.value)
    assert message.startswith("facebook/encodec_24khz: keys the converter does not know")
    assert "unexpected keys (2):\n    aa.unknown\n    zz.unknown" in message


def test_rename_long_listing_is_cut():
    state = {f"junk.{i:02d}": t(1) for i in range(45)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(45\):[\s\S]*junk\.39\n    \.\.\. and 5 more$"):
        keys.rename(state, TABLE, source="x")


def test_rename_dropped_patterns():
    state = {"encoder.layers.0.conv.weight": t(1), "encoder.layers.3.bn.num_batches_tracked": torch.tensor(3),
             "rotary.inv_freq": t(4)}
    out = keys.rename(state, TABLE, dropped=["encoder.layers.{i}.bn.num_batches_tracked", "rotary.inv_freq"],
                      source="x")
    assert list(out) == ["enc.0.conv.weight"]


def test_rename_clash_detection():
    table = [("a.{i}.weight", "x.weight"), ("b.weight", "x.weight")]
    with pytest.raises(CheckpointError, match=r"keys that map to the same place \(2\):\s+"
                                              r"a\.0\.weight and a\.1\.weight -> x\.weight\s+"
                                              r"a\.1\.weight and b\.weight -> x\.weight"):
        keys.rename({"a.0.weight": t(1), "a.1.weight": t(1), "b.weight": t(1)}, table, source="x")


# ---------------------------------------------------------------------------------------------------------------
# check_keys and build


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.conv = nn.Conv1d(4, 2, kernel_size=3)
        self.norm = nn.BatchNorm1d(2)  # persistent buffers, one of them int64


class WithTable(nn.Module):
    """A derived constant kept out of checkpoints (like a sinusoid table), made again by reset_buffers()."""

    def __init__(self, size: int = 6):
        super().__init__()
        self.size = size
        self.lin = nn.Linear(2, 2)
        self.register_buffer("table", torch.empty(size), persistent=False)
        # Under keys.build the module is made on the meta device, where this maths would be wasted, and the
        # first float op on meta imports torch._dynamo (seconds). build calls reset_buffers() on the CPU.
        if not self.table.is_meta:
            self.reset_buffers()

    def reset_buffers(self):
        self.table = torch.arange(self.size, dtype=torch.float32).sin()


class WithTableNoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("table", torch.zeros(4), persistent=False)


def test_check_keys_accepts_a_matching_state():
    model = Small()
    keys.check_keys(model, model.state_dict(), source="x")


def test_check_keys_reports_everything_at_once():
    model = Small()
    state = dict(model.state_dict())
    del state["proj.bias"], state["norm.running_var"]
    state["conv.weight"] = t(2, 4, 5)
    state["extra.weight"] = t(1)
    with pytest.raises(CheckpointError) as info:
        keys.check_keys(model, state, source="some/repo")
    message = str(info.value)
    assert message.startswith("some/repo does not fit Small")
    assert "missing keys (2):\n    norm.running_var\n    proj.bias" in message
    assert "unexpected keys (1):\n    extra.weight" in message
    assert "mis-shaped keys (1):\n    conv.weight: checkpoint (2, 4, 5), model (2, 4, 3)" in message


def test_build_loads_strictly_in_the_dtype_asked():
    reference = Small()
    reference.norm.running_mean.normal_()
    reference.norm.num_batches_tracked.fill_(7)
    state = reference.state_dict()
    model = keys.build(Small, state, source="x")
    assert not model.training
    assert all(not p.is_meta for p in model.parameters()) and all(not b.is_meta for b in model.buffers())
    for k, v in model.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k

    half = keys.build(Small, state, source="x", dtype=torch.float16)
    assert half.proj.weight.dtype == torch.float16 and half.norm.running_mean.dtype == torch.float16
    assert half.norm.num_batches_tracked.dtype == torch.int64 and half.norm.num_batches_tracked.item() == 7
    assert torch.equal(half.proj.weight, state["proj.weight"].half())


def test_build_rejects_a_bad_state_before_loading():
    state = dict(Small().state_dict())
    state["proj.weight"] = t(4, 5)
    with pytest.raises(CheckpointError, match=r"proj\.weight: checkpoint \(4, 5\), model \(4, 3\)"):
        keys.build(Small, state, source="x")


def test_build_remakes_non_persistent_buffers():
    reference = WithTable()
    state = reference.state_dict()
    assert "table" not in state
    model = keys.build(WithTable, state, source="x")
    assert model.table.device.type == "cpu"
    assert torch.equal(model.table, reference.table)
    assert torch.equal(model.lin.weight, reference.lin.weight)
    assert keys.build(WithTable, state, source="x", dtype=torch.float64).table.dtype == torch.float64


def test_build_without_reset_buffers_is_a_type_error():
    with pytest.raises(TypeError, match=r"WithTableNoReset \(\) keeps non-persistent buffers but has no "
                                        r"reset_buffers\(\)"):
        keys.build(WithTableNoReset, WithTableNoReset().state_dict(), source="x")

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = WithTableNoReset()

    with pytest.raises(TypeError, match=r"WithTableNoReset \(inner\)"):
        keys.build(Outer, Outer().state_dict(), source="x")


# ---------------------------------------------------------------------------------------------------------------
# Tensor surgery


@pytest.mark.parametrize("make", [lambda: nn.Conv1d(4, 6, 3), lambda: nn.ConvTranspose1d(4, 6, 3)],
                         ids=["Conv1d", "ConvTranspose1d"])
@pytest.mark.parametrize("naming", ["parametrizations", "weight_g/weight_v"])
def test_fold_weight_norm(make, naming):
    conv = weight_norm(make())
    with torch.no_grad():
        conv.parametrizations.weight.original0.uniform_(0.5, 2.0)  # g away from ||v||: folding must use it
    state = {f"block.0.{k}": v for k, v in conv.state_dict().items()}
    if naming == "weight_g/weight_v":  # what torch.nn.utils.weight_norm saves (and the hub files hold)
        state = {k.replace("parametrizations.weight.original0", "weight_g")
                  .replace("parametrizations.weight.original1", "weight_v"): v for k, v in state.items()}
    folded = keys.fold_weight_norm(state)
    assert sorted(folded) == ["block.0.bias", "block.0.weight"]
    expected = conv.weight.detach()  # what the parametrisation computes
    assert folded["block.0.weight"].shape == expected.shape
    assert (folded["block.0.weight"] - expected).abs().max().item() < 1e-6
    assert folded["block.0.bias"] is state["block.0.bias"]
    # Guard against a vacuous test: the raw direction v is not the weight.
    v = state[next(k for k in state if k.endswith(("original1", "weight_v")))]
    assert (v - expected).abs().max().item() > 1e-2


def test_fold_weight_norm_computes_in_fp32():
    conv = weight_norm(nn.Conv1d(2, 3, 1))
    state = {f"conv.{k}": v.half() for k, v in conv.state_dict().items()}
    folded = keys.fold_weight_norm(state)["conv.weight"]
    assert folded.dtype == torch.float32
    assert (folded - conv.weight.detach()).abs().max().item() < 1e-2  # fp16 storage of g and v


def test_fold_weight_norm_incomplete_pair():
    with pytest.raises(CheckpointError, match=r"weight norm of enc\.conv is incomplete: found only \['g'\]"):
        keys.fold_weight_norm({"enc.conv.weight_g": t(2, 1, 1), "enc.conv.bias": t(2)})
    with pytest.raises(CheckpointError, match=r"weight norm of dec is incomplete: found only \['v'\]"):
        keys.fold_weight_norm({"dec.parametrizations.weight.original1": t(2, 3, 1)})


def test_split_fused_qkv():
    D = 4
    fused_w, fused_b = t(3 * D, D), t(3 * D)
    state = {"layers.0.attn.in_proj_weight": fused_w, "layers.0.attn.in_proj_bias": fused_b, "other": t(1)}
    out = keys.split_fused_qkv(state, "in_proj_weight", ["q.weight", "k.weight", "v.weight"])
    out = keys.split_fused_qkv(out, "in_proj_bias", ["q.bias", "k.bias", "v.bias"])
    assert sorted(out) == sorted(["layers.0.attn.q.weight", "layers.0.attn.k.weight", "layers.0.attn.v.weight",
                                  "layers.0.attn.q.bias", "layers.0.attn.k.bias", "layers.0.attn.v.bias", "other"])
    x = t(5, D)
    fused_out = x @ fused_w.T + fused_b  # (5, 3D): q, k, v side by side, as nn.MultiheadAttention computes them
    for i, name in enumerate("qkv"):
        part = x @ out[f"layers.0.attn.{name}.weight"].T + out[f"layers.0.attn.{name}.bias"]
        # Two matmul shapes: the same sums in another order (the last bit differs on some CPUs, e.g. AVX2 EPYC).
        torch.testing.assert_close(part, fused_out[:, i * D:(i + 1) * D], rtol=0, atol=1e-5)
    # The split is by rows, in order: swapping the parts would be off by far more than the tolerance.
    assert (x @ out["layers.0.attn.q.weight"].T - fused_out[:, D:2 * D]).abs().max() > 0.1

    with pytest.raises(CheckpointError, match=r"attn\.in_proj_weight has 10 rows, not divisible into 3 parts"):
        keys.split_fused_qkv({"attn.in_proj_weight": t(10, 4)}, "in_proj_weight", ["q", "k", "v"])


def test_renamed_onto():
    table = [("dec.layers.{i}.q_proj.weight", "layers.{i}.q.weight"),
             ("dec.layers.{i}.fc.weight", "layers.{i}.fc.weight")]
    copied = keys.renamed_onto(table, lambda ours: ours.endswith(".q.weight"))
    assert copied("dec.layers.12.q_proj.weight") and not copied("dec.layers.1.fc.weight")
    assert not copied("dec.layers.x.q_proj.weight") and not copied("other.dec.layers.1.q_proj.weight")


def test_concat_rows():
    state = {"l.0.q": t(2, 3), "l.0.k": t(2, 3) + 1, "l.0.v": t(2, 3) + 2, "l.0.out": t(3, 3)}
    out = keys.concat_rows(state, ("q", "k", "v"), "qkv")
    assert sorted(out) == ["l.0.out", "l.0.qkv"]
    assert torch.equal(out["l.0.qkv"], torch.cat([state["l.0.q"], state["l.0.k"], state["l.0.v"]]))
    del state["l.0.k"]
    with pytest.raises(CheckpointError, match=r"cannot make the qkv tensors: missing\n    l\.0\.k"):
        keys.concat_rows(state, ("q", "k", "v"), "qkv")


def test_strip_prefix():
    state = {"audio_encoder.a": t(1), "audio_encoder.b.c": t(1), "text_encoder.a": t(1)}
    assert list(keys.strip_prefix(state, "audio_encoder.")) == ["a", "b.c"]
    assert keys.strip_prefix(state, "audio_encoder.")["a"] is state["audio_encoder.a"]
    assert keys.strip_prefix(state, "decoder.") == {}
