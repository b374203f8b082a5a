"""The audiocraft layout of MusicGen's LM (`state_dict.bin`) against audiocraft's own modules.

Reference: audiocraft 1.3.0 from PyPI (`audiocraft/models/lm.py::LMModel`, `audiocraft/modules/transformer.py`,
`audiocraft/modules/conditioners.py::T5Conditioner`, `audiocraft/models/builders.py::get_lm_model`,
`audiocraft/models/loaders.py::load_lm_model`, `audiocraft/utils/export.py::export_lm`), installed without its
dependencies by `bash tests/install_audiocraft_reference.sh`.

The checkpoint is made the way a released one is: audiocraft's builder makes the LM from a training config
(`xp.cfg`, here the musicgen-small config of `config/model/lm/{default,musicgen_lm}.yaml`,
`config/conditioner/text2music.yaml` and `config/solver/musicgen/default.yaml` at small dimensions), and the
file holds {'best_state': its state dict in fp16, 'xp.cfg': the YAML, 'version', 'exported': True} as
`export_lm` writes it. audiocraft's own loader reads the file back (strict `load_state_dict`), and so does ours.

Checks: every audiocraft tensor lands in exactly one of ours (matched by content: all weights are distinct
random values, LayerNorms included), in the same layer; logits of audiocraft's `LMModel.forward` and ours on
the same weights, text and codes (max abs err <= 1e-4; the texts are not padded, G8: audiocraft's cross-attention
does not mask padded text keys, transformers and we do); greedy generation with CFG token-identical to
audiocraft's `LMModel.generate` (40 frames); and config fields that change audiocraft's model without changing
its keys (causal, cross_attention_pos_emb, activation, max_period, normalize_text) are refused by our converter.
Mono (musicgen-small) and stereo (musicgen-stereo-small: 8 interleaved codebooks) configs.
"""

import importlib.machinery
import importlib.util
import os
import re
import sys
import types

import pytest
import torch

if importlib.util.find_spec("audiocraft") is None or importlib.util.find_spec("omegaconf") is None:
    pytest.skip("the audiocraft reference is not installed; install it with "
                "`bash tests/install_audiocraft_reference.sh`", allow_module_level=True)
try:
    import torchaudio  # noqa: F401  (audiocraft's data and chroma modules import it at module level)
except (ImportError, OSError) as e:  # OSError: torchaudio's compiled libraries do not match our torch
    pytest.skip(f"torchaudio cannot be imported ({e}); install it with `bash tests/install_torchaudio_reference.sh`",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")

from musiclm_core import generate as G  # noqa: E402
from musiclm_core.musicgen import MusicGenLM  # noqa: E402

from fixtures import train_spm  # noqa: E402
from stubs import Stub  # noqa: E402

LOGIT_TOL = 1e-4
# Code embeddings larger than the sinusoids (norm ~ sqrt(dim / 2)): with the 0.2 of the other weights the random
# LM barely sees its past codes and greedy decoding falls into short loops.
EMB_STD = 2.0




def _stub(name, **attrs):
    module = Stub(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package without submodules: `import name.sub` fails with ImportError
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = module
    return module


def _import_audiocraft():
    """audiocraft's LM modules, with stubs for its heavy module-level imports that are not installed.

    - xformers (CUDA wheels): audiocraft's default attention backend is torch's SDPA; only `ops.unbind` is
      called on that path (it is torch.unbind returning views), and `LowerTriangularMask()` is only tested for
      `is not None` there (-> SDPA is_causal=True).
    - spacy (text normalisation, off in MusicGen), av (reading audio files), librosa (the melody chroma
      filters), flashy (training and distributed helpers).
    The package `__init__` files of `audiocraft` and `audiocraft.models` import every model and solver
    (diffusion, MAGNeT, dora, ...); they are skipped by registering the two packages bare.
    """
    if "audiocraft.models.lm" in sys.modules:
        return sys.modules["audiocraft.models.builders"], sys.modules["audiocraft.models.loaders"]
    if importlib.util.find_spec("xformers") is None:
        _stub("xformers", ops=_stub("xformers.ops", unbind=torch.unbind,
                                    LowerTriangularMask=type("LowerTriangularMask", (), {})))
    for name in ("spacy", "av", "librosa", "flashy"):
        if importlib.util.find_spec(name) is None:
            _stub(name)
    if isinstance(sys.modules.get("librosa"), Stub):
        sys.modules["librosa"].filters = _stub("librosa.filters")
    if isinstance(sys.modules.get("flashy"), Stub):
        sys.modules["flashy"].distrib = _stub("flashy.distrib")
    root = os.path.dirname(importlib.util.find_spec("audiocraft").origin)
    for package in ("audiocraft", "audiocraft.models"):
        module = types.ModuleType(package)
        module.__path__ = [os.path.join(root, *package.split(".")[1:])]
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__spec__.submodule_search_locations = module.__path__
        sys.modules[package] = module
    import audiocraft.data  # noqa: F401  (first, as audiocraft/__init__.py does: conditioners <-> data cycle)
    from audiocraft.models import builders, loaders
    from audiocraft.modules import transformer

    assert transformer._efficient_attention_backend == "torch"
    return builders, loaders


# The musicgen-small training config as exported in `xp.cfg` (OmegaConf.to_yaml of the composed hydra config),
# reduced to the groups the LM builder reads plus a few unrelated ones, at small dimensions. Values copied from
# audiocraft 1.3.0 config/config.yaml, config/model/lm/default.yaml, config/model/lm/musicgen_lm.yaml,
# config/conditioner/text2music.yaml and config/solver/musicgen/default.yaml.
XP_CFG = """\
device: cpu
dtype: float32
autocast: true
autocast_dtype: float16
seed: 2036
efficient_attention_backend: torch
dora:
  dir: /checkpoint/${{oc.env:USER}}/experiments/audiocraft/outputs
solver: musicgen
sample_rate: 32000
channels: {channels}
compression_model_checkpoint: //pretrained/facebook/encodec_32khz
interleave_stereo_codebooks:
  use: {stereo}
  per_timestep: false
dataset:
  batch_size: 192
  segment_duration: 30
lm_model: transformer_lm
codebooks_pattern:
  modeling: delay
  delay:
    delays: {delays}
    flatten_first: 0
    empty_initial: 0
  unroll:
    flattening: [0, 1, 2, 3]
    delays: [0, 0, 0, 0]
  music_lm:
    group_by: 2
  coarse_first:
    delays: [0, 0, 0]
transformer_lm:
  dim: 64
  num_heads: 4
  num_layers: 3
  hidden_scale: 4
  n_q: {n_q}
  card: 2048
  dropout: 0.0
  emb_lr: null
  activation: gelu
  norm_first: true
  bias_ff: false
  bias_attn: false
  bias_proj: false
  past_context: null
  causal: true
  custom: false
  memory_efficient: true
  attention_as_float32: false
  layer_scale: null
  positional_embedding: sin
  xpos: false
  checkpointing: none
  weight_init: gaussian
  depthwise_init: current
  zero_bias_init: true
  norm: layer_norm
  cross_attention: false
  qk_layer_norm: false
  qk_layer_norm_cross: false
  attention_dropout: null
  kv_repeat: 1
  two_step_cfg: false
classifier_free_guidance:
  training_dropout: 0.3
  inference_coef: 3.0
attribute_dropout: {{}}
fuser:
  cross_attention_pos_emb: false
  cross_attention_pos_emb_scale: 1
  sum: []
  prepend: []
  cross: [description]
  input_interpolate: []
conditioners:
  description:
    model: t5
    t5:
      name: t5-base
      finetune: false
      word_dropout: 0.3
      normalize_text: false
"""


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    """A tiny T5 at t5-base's width (audiocraft fixes 768 for "t5-base") and a small sentencepiece tokenizer:
    they stand in for the hub download audiocraft's T5Conditioner makes."""
    folder = train_spm(tmp_path_factory.mktemp("ac_spm"), lines=500, vocab_size=100)
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=128, d_model=768, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, feed_forward_proj="relu")
    return tokenizer, transformers.T5EncoderModel(config).eval()


class Reference:
    """audiocraft's LM made from XP_CFG, its `state_dict.bin`, and what audiocraft's and our loaders read."""

    def __init__(self, folder, channels, text_encoder):
        from omegaconf import OmegaConf

        builders, loaders = _import_audiocraft()
        tokenizer, t5 = text_encoder
        conditioners = sys.modules["audiocraft.modules.conditioners"]
        delays = [0, 1, 2, 3] if channels == 1 else [0, 0, 1, 1, 2, 2, 3, 3]
        self.xp_cfg = XP_CFG.format(channels=channels, stereo="true" if channels == 2 else "false",
                                    delays=delays, n_q=len(delays))
        built = builders.get_lm_model(OmegaConf.create(self.xp_cfg)).eval()
        # Distinct random values in every tensor (the builder's init leaves LayerNorms at ones and zeros),
        # fp16-representable because the file stores fp16.
        g = torch.Generator().manual_seed(channels)
        with torch.no_grad():
            for name, p in built.named_parameters():
                std = EMB_STD if name.startswith("emb.") else 0.2
                p.copy_((torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0)).half())
        self.best_state = {k: v.half() for k, v in built.state_dict().items()}
        self.path = folder / "state_dict.bin"
        torch.save({"best_state": self.best_state, "xp.cfg": self.xp_cfg, "version": "1.3.0", "exported": True},
                   self.path)
        self.ac = loaders.load_lm_model(self.path)  # audiocraft's own loader: strict load_state_dict
        self.ours = MusicGenLM.from_pretrained(folder)  # the folder holds only state_dict.bin: audiocraft layout
        self.tokenizer, self.t5 = tokenizer, t5
        self.conditioners = conditioners

    def condition(self, texts):
        """audiocraft's condition tensors {'description': (projected states, mask)}, and the T5 states and mask
        to give our LM, for the texts; None stands for the null condition (CFG)."""
        attributes = [self.conditioners.ConditioningAttributes(text={"description": t}) for t in texts]
        provider = self.ac.condition_provider
        tensors = provider(provider.tokenize(attributes))
        batch = self.tokenizer([t or "" for t in texts], padding=True, return_tensors="pt")
        mask = batch.attention_mask * torch.tensor([t is not None for t in texts])[:, None]
        with torch.no_grad():
            states = self.t5(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        assert torch.equal(tensors["description"][1].cpu(), mask)
        return tensors, states, mask


@pytest.fixture(scope="module")
def make_reference(tmp_path_factory, text_encoder):
    """Reference(channels), made once each, with audiocraft's T5 download replaced by the tiny T5 while the
    module's tests run (audiocraft's builder makes a T5Conditioner, which loads "t5-base" from the hub)."""
    _import_audiocraft()
    tokenizer, t5 = text_encoder

    class Tokenizer:
        @staticmethod
        def from_pretrained(name):
            assert name == "t5-base"
            return tokenizer

    class Encoder:
        @staticmethod
        def from_pretrained(name):
            assert name == "t5-base"
            return t5

    made = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        conditioners = sys.modules["audiocraft.modules.conditioners"]
        monkeypatch.setattr(conditioners, "T5Tokenizer", Tokenizer)
        monkeypatch.setattr(conditioners, "T5EncoderModel", Encoder)

        def make(channels):
            if channels not in made:
                made[channels] = Reference(tmp_path_factory.mktemp("ac_lm"), channels, text_encoder)
            return made[channels]
        yield make


@pytest.fixture(params=[1, 2], ids=["mono", "stereo"])
def ref(request, make_reference):
    return make_reference(request.param)


@pytest.fixture
def mono(make_reference):
    return make_reference(1)


# Texts that tokenize to the same length: no padding among the conditional rows (G8).
TEXTS = ["calm piano with soft violin", "loud rock drums and bass"]


def test_every_key_accounted_for(ref):
    # Our loader is strict (keys.build); here every audiocraft tensor (with the cross-attention's fused q/k/v split
    # in three; our self-attention keeps them fused) must equal exactly one of ours, in the same layer: a
    # bijection between the two state dicts.
    assert set(ref.best_state) == set(ref.ac.state_dict())  # what audiocraft's module defines is what is stored
    pieces = {}
    for key, value in ref.best_state.items():
        if key.endswith("cross_attention.in_proj_weight"):
            for name, part in zip("qkv", value.float().chunk(3)):
                pieces[f"{key}[{name}]"] = part
        else:
            pieces[key] = value.float()
    ours = ref.ours.state_dict()
    assert len(pieces) == len(ours)
    matched = {}
    for key, value in pieces.items():
        same = [k for k, v in ours.items() if v.shape == value.shape and torch.equal(v, value)]
        assert len(same) == 1, f"audiocraft's {key} matches {same} of ours"
        matched[key] = same[0]
        assert re.findall(r"\.(\d+)\.", key) == re.findall(r"\.(\d+)\.", same[0]), (key, same[0])
    assert sorted(matched.values()) == sorted(ours)
    c = ref.ours.config
    assert (c.dim, c.num_layers, c.num_heads, c.ffn_dim, c.text_dim) == (64, 3, 4, 256, 768)
    assert c.num_codebooks == ref.ac.num_codebooks and c.audio_channels == (2 if c.num_codebooks == 8 else 1)
    print(f"{len(ref.best_state)} audiocraft tensors -> {len(ours)} of ours, one to one")


def test_logits_match_audiocraft(ref):
    tensors, states, mask = ref.condition(TEXTS + [None, None])  # [cond; null] as in audiocraft's CFG batch
    assert bool(mask[:2].all()) and not bool(mask[2:].any())
    B, K, S = 4, ref.ac.num_codebooks, 12
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2049, (B, K, S), generator=g)
    codes[:, :, 0] = 2048  # the special (BOS) step first, as in generation
    with torch.no_grad():
        theirs = ref.ac(codes, conditions=[], condition_tensors=tensors)  # (B, K, S, card)
        ours = ref.ours(codes, memory=ref.ours.cross_memory(states, mask))
    err = (ours - theirs).abs().max().item()
    print(f"audiocraft logits ({K} codebooks): max abs err {err:.2e}")
    assert err <= LOGIT_TOL
    assert (theirs[:2] - theirs[2:]).abs().max() > 1e-2  # the text matters: the null rows differ


def test_greedy_generation_matches_audiocraft(ref):
    attributes = [ref.conditioners.ConditioningAttributes(text={"description": t}) for t in TEXTS]
    frames = 40
    with torch.no_grad():
        theirs = ref.ac.generate(conditions=attributes, max_gen_len=frames, use_sampling=False, cfg_coef=3.0,
                                 two_step_cfg=False)
    _, states, mask = ref.condition(TEXTS)
    assert bool(mask.all())
    ours = G.generate_codes(ref.ours, states, mask, num_frames=frames, guidance_scale=3.0, do_sample=False)
    assert ours.shape == theirs.shape == (2, ref.ac.num_codebooks, frames)
    mismatch = (ours != theirs).sum().item()
    print(f"greedy + CFG vs audiocraft, {frames} frames: {mismatch} of {ours.numel()} tokens differ; "
          f"{ours.unique().numel()} distinct tokens")
    assert torch.equal(ours, theirs)
    for row in ours:
        assert row.unique().numel() >= 20, "the fixture generates near-constant tokens"
    assert (ours[0] != ours[1]).float().mean() > 0.5  # the two texts lead to different codes


# Config fields that change audiocraft's LM without changing its keys: audiocraft builds a different model from
# the same weights (its logits change), and our converter must refuse the config rather than load it silently.
@pytest.mark.parametrize("field,old,new", [
    ("transformer_lm.causal", "causal: true", "causal: false"),
    ("fuser.cross_attention_pos_emb", "cross_attention_pos_emb: false", "cross_attention_pos_emb: true"),
    ("transformer_lm.activation", "activation: gelu", "activation: relu"),
    ("transformer_lm.max_period", "xpos: false", "xpos: false\n  max_period: 1000"),
])
def test_fields_that_change_the_maths_are_refused(mono, field, old, new):
    from omegaconf import OmegaConf

    from musiclm_core.convert import musicgen as convert
    from musiclm_core.hub import CheckpointError

    builders, _ = _import_audiocraft()
    ref = mono
    assert ref.xp_cfg.count(old) == 1
    changed = ref.xp_cfg.replace(old, new)
    other = builders.get_lm_model(OmegaConf.create(changed)).eval()
    other.load_state_dict(ref.best_state)  # the same keys and weights
    tensors, _, _ = ref.condition(TEXTS)
    codes = torch.randint(0, 2048, (2, 4, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = ref.ac(codes, conditions=[], condition_tensors=tensors)
        assert (other(codes, conditions=[], condition_tensors=tensors) - base).abs().max() > 1e-3
    with pytest.raises(CheckpointError, match=re.escape(field)):
        convert.load_audiocraft({"best_state": ref.best_state, "xp.cfg": changed}, source="state_dict.bin")


def test_text_normalisation_is_refused(mono):
    # normalize_text lemmatises the text with spacy before T5 (not installed here); we feed the text as it is.
    from musiclm_core.convert import musicgen as convert
    from musiclm_core.hub import CheckpointError

    changed = mono.xp_cfg.replace("normalize_text: false", "normalize_text: true")
    with pytest.raises(CheckpointError, match="normalize_text"):
        convert.load_audiocraft({"best_state": mono.best_state, "xp.cfg": changed}, source="state_dict.bin")
