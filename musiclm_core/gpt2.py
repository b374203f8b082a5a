"""GPT-2 as AudioLDM 2 uses it, and AudioLDM 2's projection model (Liu et al. 2023, "AudioLDM 2: Learning
Holistic Audio Generation with Self-supervised Pretraining": GPT-2 turns the text conditioning into a short
sequence of "language of audio" vectors).

AudioLDM 2 never feeds GPT-2 a token. Its text conditioning reaches GPT-2 as embeddings:

    CLAP text embedding (B, 1, 512)  -> projection,   [SOS ; . ; EOS]   -> (B, 3, 768)
    Flan-T5 states      (B, L, 1024) -> projection_1, [SOS1 ; . ; EOS1] -> (B, L + 2, 768)
    joined                                                              -> (B, L + 5, 768)
    GPT-2 `generate`                                                    -> (B, 8, 768)

and `generate` appends GPT-2's own last hidden state as the next input embedding, 8 times: the 8 vectors it
makes are the UNet's first cross-attention context. So `GPT2` here takes embeddings, not ids; the token table
`wte` is kept only so that checkpoints load strictly, key for key.

`GPT2.forward` is correct for any chunk length (the prefill of the prompt and one step) on the static `KVCache`
that MusicGen uses (`cache.py`): the caller makes it with `new_cache` and passes it in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.cache import KVCache, LayerCache
from musiclm_core.kernels import attention

KIND = "gpt2"  # model names in native config.json files
PROJECTION_KIND = "audioldm2_projection"


@dataclass
class GPT2Config:
    vocab_size: int = 50257     # rows of the token table `wte` (unused: AudioLDM 2 feeds embeddings)
    max_positions: int = 1024   # rows of the learned position table `wpe` (n_positions)
    dim: int = 768              # model width D (n_embd)
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072         # n_inner; transformers' None means 4 * dim
    norm_eps: float = 1e-5
    max_new_tokens: int = 8     # vectors `generate` makes by default (AudioLDM 2's language_model config field)
    # derived
    head_dim: int = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "max_positions", "dim", "num_layers", "num_heads", "ffn_dim", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        self.head_dim = self.dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "GPT2Config":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown GPT2Config fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid GPT-2 config: {err}") from err


PRESETS: dict[str, GPT2Config] = {
    # The `language_model` of cvssp/audioldm2, -large and -music: GPT-2 124M (specs/ldm.md §9).
    "audioldm2": GPT2Config(),
    "tiny": GPT2Config(vocab_size=64, max_positions=64, dim=32, num_layers=2, num_heads=4, ffn_dim=128),
}


class SelfAttention(nn.Module):
    """Causal self-attention. q, k and v come from one projection (GPT-2's `c_attn`, columns q | k | v)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # c_attn
        self.out = nn.Linear(dim, dim)      # c_proj

    def forward(self, x: Tensor, *, positions: Tensor, offset: int, key_mask: Tensor | None,
                cache: LayerCache | None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        if cache is None:  # the keys are this chunk's own: query t sees keys 0 .. t
            out = attention(q, k, v, causal=True, key_mask=key_mask)
        else:  # (B, H, max_len + 1, Dh): slots past the query are masked
            k, v = cache.update(positions, k, v)
            out = attention(q, k, v, causal=True, q_offset=offset, key_mask=key_mask)
        # Scale: the default 1 / sqrt(Dh), as GPT-2's scale_attn_weights=true (the converter refuses the others).
        return self.out(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with the tanh GELU ("gelu_new")."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        D = config.dim
        self.attn_norm = nn.LayerNorm(D, eps=config.norm_eps)  # ln_1
        self.attn = SelfAttention(D, config.num_heads)
        self.ffn_norm = nn.LayerNorm(D, eps=config.norm_eps)   # ln_2
        self.ffn_in = nn.Linear(D, config.ffn_dim)             # mlp.c_fc
        self.ffn_out = nn.Linear(config.ffn_dim, D)            # mlp.c_proj

    def forward(self, x: Tensor, *, positions: Tensor, offset: int, key_mask: Tensor | None,
                cache: LayerCache | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions=positions, offset=offset, key_mask=key_mask, cache=cache)
        # "gelu_new" is the tanh approximation, the same formula as approximate="tanh".
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 over input embeddings (transformers' `GPT2Model` called with `inputs_embeds`), and AudioLDM 2's
    generation of the "language of audio" vectors."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        D = config.dim
        # Unused: the inputs are embeddings (AudioLDM 2 never passes token ids). Kept so that a GPT2Model
        # checkpoint loads key for key, strictly, and saves back whole.
        self.wte = nn.Embedding(config.vocab_size, D)
        self.wpe = nn.Embedding(config.max_positions, D)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)  # ln_f

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention cache for `batch_size` rows and `max_len` positions."""
        c = self.config
        if max_len > c.max_positions:
            raise ValueError(f"a cache of {max_len} positions is longer than GPT-2's position table "
                             f"({c.max_positions})")
        return KVCache(c.num_layers, batch_size, c.num_heads, max_len, c.head_dim, dtype=self.dtype,
                       device=self.device)

    def forward(self, embeds: Tensor, *, offset: int = 0, cache: KVCache | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """The last hidden state (after `ln_f`), (B, S, D), of input embeddings (B, S, D) at positions
        offset .. offset + S - 1.

        cache: with it, the chunk attends to the positions written before it and writes its own (prefill: the
            whole prompt at offset 0; then one vector at a time). Without it, the chunk attends only to itself.
        attention_mask: (B, offset + S), one column per position from 0 (transformers' convention), nonzero =
            attend; zeros hide those positions as keys. None: every position is attended. A query with no key
            left to attend to (a mask that starts with 0) gets a zero attention output, as transformers' SDPA
            path gives (its eager path averages all keys instead); such rows reach no other position, being
            hidden keys for all of them.
        The position embedding of position p is wpe[p] whatever the mask says: transformers' GPT2Model counts
        positions from the cache length and does not skip padding (`modeling_gpt2.py`, GPT2Model.forward,
        "position_ids = torch.arange(...) + past_seen_tokens").
        """
        if not isinstance(embeds, Tensor) or embeds.dim() != 3:
            raise ValueError(f"embeds must be a (B, S, D) tensor, got "
                             f"{tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__}")
        B, S, D = embeds.shape
        if D != self.config.dim:
            raise ValueError(f"embeds are {D} wide, this GPT-2 is {self.config.dim} wide (embeds shape "
                             f"{tuple(embeds.shape)})")
        if S == 0 or B == 0:
            raise ValueError(f"embeds are empty: shape {tuple(embeds.shape)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0, got {offset!r}")
        if offset + S > self.config.max_positions:
            raise ValueError(f"positions {offset}..{offset + S - 1} are past GPT-2's position table "
                             f"({self.config.max_positions} positions)")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows, the input {B}")
            if offset + S > cache.max_len:
                raise ValueError(f"positions {offset}..{offset + S - 1} do not fit a cache of {cache.max_len}")
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, offset + S):
                raise ValueError(f"attention_mask must be (B, offset + S) = {(B, offset + S)}, one column per "
                                 f"position from 0, got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.to(device=embeds.device) != 0  # (B, offset + S)
            if cache is None:
                key_mask = key_mask[:, offset:]  # (B, S): the keys are the chunk's own
            else:  # one column per slot the attention sees (the KVCache's k: (L, B, H, slots, Dh)); slots past
                # the chunk are hidden by the causal mask anyway
                pad = key_mask.new_ones(B, cache.k.shape[3] - offset - S)
                key_mask = torch.cat([key_mask, pad], dim=1)  # (B, max_len + 1)
        positions = torch.arange(offset, offset + S, device=embeds.device)  # (S,)
        x = embeds.to(self.dtype) + self.wpe(positions)  # (B, S, D)
        caches = [None] * len(self.layers) if cache is None else cache.layers
        for layer, layer_cache in zip(self.layers, caches):
            x = layer(x, positions=positions, offset=offset, key_mask=key_mask, cache=layer_cache)
        return self.norm(x)

    @torch.no_grad()
    def generate(self, embeds: Tensor, attention_mask: Tensor | None = None,
                 max_new_tokens: int | None = None) -> Tensor:
        """AudioLDM 2's "language of audio": (B, max_new_tokens, D) vectors generated from embeds (B, L, D).

        As diffusers' `AudioLDM2Pipeline.generate_language_model` (pipeline_audioldm2.py): GPT-2 runs on the
        inputs; its last hidden state at the last position (`hidden_states[-1][:, -1:]`, after ln_f) is appended
        to the inputs as the next input embedding; max_new_tokens times, with a KV cache (the prompt first,
        then one vector a step). The last max_new_tokens inputs are returned.
        attention_mask (B, L): the projection's mask (padded Flan-T5 positions are 0). Each step appends a 1 for
        the new vector, as transformers' `_update_model_kwargs_for_generation` does for the pipeline. Padded
        positions still take a position each (wpe is not shifted, no position ids are passed: the pipeline's
        `prepare_inputs_for_generation` passes only inputs_embeds, attention_mask, past_key_values, use_cache),
        and are hidden as keys. The rows at padded positions are computed but reach no other position (they are
        hidden keys in every layer); only a mask whose last column is 0 would read the first vector from one
        (the projection's mask always ends with its EOS, a 1).
        max_new_tokens: None takes the config's (8), as the pipeline does.
        """
        N = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(N, bool) or not isinstance(N, int) or N <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {N!r}")
        if not isinstance(embeds, Tensor) or embeds.dim() != 3:
            raise ValueError(f"embeds must be a (B, L, D) tensor, got "
                             f"{tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__}")
        B, L, D = embeds.shape
        # The vector of the last step is never fed back: the last position used is L + N - 2.
        if L + N - 1 > self.config.max_positions:
            raise ValueError(f"{L} input embeddings + max_new_tokens={N} need {L + N - 1} positions, more than "
                             f"GPT-2's position table holds ({self.config.max_positions})")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask must be (B, L) = {(B, L)} like embeds {tuple(embeds.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            ones = attention_mask.new_ones(B, N - 1)
            mask = torch.cat([attention_mask, ones], dim=1).to(embeds.device)  # (B, L + N - 1)
        cache = self.new_cache(B, L + N - 1)
        hidden = self(embeds, cache=cache, attention_mask=None if mask is None else mask[:, :L])  # (B, L, D)
        out = [hidden[:, -1:]]
        for step in range(1, N):
            position = L + step - 1  # where the vector of the previous step goes in
            hidden = self(out[-1], offset=position, cache=cache,
                          attention_mask=None if mask is None else mask[:, :position + 1])  # (B, 1, D)
            out.append(hidden)
        return torch.cat(out, dim=1)  # (B, N, D)

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "GPT2":
        """A native folder, a transformers GPT2Model folder, or a diffusers AudioLDM 2 pipeline folder (its
        `language_model/`); a hub id is downloaded first (only that part)."""
        from musiclm_core.convert import gpt2 as convert, keys

        folder = resolve_component(name_or_path, "language_model", revision=revision)
        if hub.detect_layout(folder) == "native":
            config, state = hub.load_native(folder, KIND)
            config = GPT2Config.from_dict(config, source=str(folder / "config.json"))
            return keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        return convert.load_transformers_folder(folder, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# The projection model: CLAP and Flan-T5 states -> GPT-2's input embeddings


@dataclass
class ProjectionConfig:
    clap_dim: int = 512    # CLAP's text embedding (diffusers: text_encoder_dim)
    t5_dim: int = 1024     # Flan-T5-large's hidden states (text_encoder_1_dim)
    dim: int = 768         # GPT-2's width (langauge_model_dim, sic)

    def __post_init__(self):
        for name in ("clap_dim", "t5_dim", "dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ProjectionConfig.{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "ProjectionConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise hub.CheckpointError(f"{source}: unknown ProjectionConfig fields {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise hub.CheckpointError(f"{source}: invalid projection config: {err}") from err


PROJECTION_PRESETS: dict[str, ProjectionConfig] = {
    "audioldm2": ProjectionConfig(),  # cvssp/audioldm2*/projection_model (specs/ldm.md §8)
    "tiny": ProjectionConfig(clap_dim=16, t5_dim=24, dim=32),
}


class AudioLDM2Projection(nn.Module):
    """Projects the CLAP and the Flan-T5 states to GPT-2's width, wraps each sequence in learned start / end
    vectors and joins them (diffusers' `AudioLDM2ProjectionModel`, modeling_audioldm2.py):

        [clap_start ; clap_proj(clap) ; clap_end ; t5_start ; t5_proj(t5) ; t5_end]     (B, Lc + Lt + 4, dim)

    The TTS checkpoints' variant (a learned position embedding on VITS states) is not supported.
    """

    def __init__(self, config: ProjectionConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.clap_proj = nn.Linear(config.clap_dim, D)  # projection
        self.t5_proj = nn.Linear(config.t5_dim, D)      # projection_1
        # diffusers initialises them to ones; checkpoints hold the learned values
        self.clap_start = nn.Parameter(torch.ones(D))   # sos_embed
        self.clap_end = nn.Parameter(torch.ones(D))     # eos_embed
        self.t5_start = nn.Parameter(torch.ones(D))     # sos_embed_1
        self.t5_end = nn.Parameter(torch.ones(D))       # eos_embed_1

    @staticmethod
    def _wrap(x: Tensor, start: Tensor, end: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """[start ; x ; end] (B, L + 2, D) and the mask [1, mask, 1] (B, L + 2) in the mask's dtype.

        The end vector comes after the padding: padded positions stay inside the sequence (as diffusers'
        `add_special_tokens`)."""
        B, L, D = x.shape
        x = torch.cat([start.expand(B, 1, D), x, end.expand(B, 1, D)], dim=1)  # (B, L + 2, D)
        if mask is not None:
            one = mask.new_ones(B, 1)
            mask = torch.cat([one, mask, one], dim=1)  # (B, L + 2)
        return x, mask

    def forward(self, clap: Tensor, t5: Tensor, clap_mask: Tensor | None = None,
                t5_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """clap (B, Lc, clap_dim) (the pipeline passes Lc = 1, the text embedding), t5 (B, Lt, t5_dim), their
        masks (B, Lc) and (B, Lt) -> (embeds (B, Lc + Lt + 4, dim), mask (B, Lc + Lt + 4) or None).

        Masks as diffusers builds them: each gets a 1 for its start and its end vector, and the two are joined;
        with both masks None the result is None. With only one given, diffusers fails (it calls `new_ones` on a
        slice of the hidden states, modeling_audioldm2.py, AudioLDM2ProjectionModel.forward); here the missing
        one counts as all ones, which is what that code means to do. The pipeline always passes both.
        """
        c = self.config
        for name, x, width in (("clap", clap, c.clap_dim), ("t5", t5, c.t5_dim)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{name} states must be (B, L, {width}), got {shape}")
        if clap.shape[0] != t5.shape[0]:
            raise ValueError(f"clap states have {clap.shape[0]} rows, t5 states {t5.shape[0]}")
        for name, mask, x in (("clap_mask", clap_mask, clap), ("t5_mask", t5_mask, t5)):
            if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{name} must be (B, L) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if (clap_mask is None) != (t5_mask is None):
            given = clap_mask if clap_mask is not None else t5_mask
            clap_mask = given.new_ones(clap.shape[:2]) if clap_mask is None else clap_mask
            t5_mask = given.new_ones(t5.shape[:2]) if t5_mask is None else t5_mask
        a, a_mask = self._wrap(self.clap_proj(clap.to(self.clap_proj.weight.dtype)), self.clap_start,
                               self.clap_end, clap_mask)
        b, b_mask = self._wrap(self.t5_proj(t5.to(self.t5_proj.weight.dtype)), self.t5_start, self.t5_end, t5_mask)
        mask = None if a_mask is None else torch.cat([a_mask, b_mask], dim=1)  # (B, Lc + Lt + 4)
        return torch.cat([a, b], dim=1), mask  # (B, Lc + Lt + 4, dim)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None) -> "AudioLDM2Projection":
        """A native folder, a diffusers `AudioLDM2ProjectionModel` folder, or an AudioLDM 2 pipeline folder (its
        `projection_model/`); a hub id is downloaded first (only that part)."""
        from musiclm_core.convert import gpt2 as convert, keys

        folder = resolve_component(name_or_path, "projection_model", revision=revision)
        config = hub.read_json(folder / "config.json")
        if hub.NATIVE_FORMAT in config:
            config, state = hub.load_native(folder, PROJECTION_KIND)
            config = ProjectionConfig.from_dict(config, source=str(folder / "config.json"))
            return keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        return convert.load_projection_folder(folder, dtype=dtype)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, PROJECTION_KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)


def resolve_component(name_or_path: str | os.PathLike, subfolder: str, *, revision: str | None = None) -> Path:
    """The folder of one component: the folder itself, or `subfolder` of a diffusers pipeline folder (one with a
    model_index.json). A hub id is downloaded in two steps: its top-level json files say whether it is a
    pipeline, then only the component's files are fetched (safetensors, or .bin when there are none)."""
    local = Path(name_or_path).expanduser().is_dir()

    def fetch(patterns: list[str]) -> Path:
        return hub.resolve(name_or_path, revision=revision, allow_patterns=patterns)

    root = fetch(["model_index.json", "config.json"])
    pipeline = (root / "model_index.json").is_file()
    prefix = f"{subfolder}/" if pipeline else ""
    if not local:
        root = fetch([f"{prefix}*.json", f"{prefix}*.safetensors"])
        folder = root / subfolder if pipeline else root
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            root = fetch([f"{prefix}*.json", f"{prefix}*.bin"])
    folder = root / subfolder if pipeline else root
    if not folder.is_dir():
        raise hub.CheckpointError(f"{root} is a diffusers pipeline folder (model_index.json) without a "
                                  f"{subfolder}/ folder")
    return folder
