"""MusicGen (Copet et al. 2023, "Simple and Controllable Music Generation"): the language model over EnCodec codes.

A pre-norm transformer decoder over K parallel codebook streams laid out with the delay pattern (`delay.py`):

    codes (B, K, T) -> sum_k embedding_k(codes[:, k]) + sinusoid(position)     (B, T, D)
                    -> L x [causal self-attention, cross-attention over the projected text, GELU FFN]
                    -> LayerNorm -> K heads                                    (B, K, T, card)

The text (T5 hidden states) is projected to the model width once per generation and turned into every layer's
cross-attention keys and values (`cross_memory`). The self-attention keys and values live in a `KVCache` that
the caller makes and passes in, so the same `forward` serves the prefill (T > 1) and one decode step (T = 1).
Sampling, classifier-free guidance and the delay pattern live in `generate.py`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.cache import CrossMemory, KVCache
from musiclm_core.kernels import attention


@dataclass
class MusicGenConfig:
    dim: int = 1024                  # model width D
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    num_codebooks: int = 4           # K rows of the delay pattern (8 for stereo: L0 R0 L1 R1 ...)
    card: int = 2048                 # codebook size; id `card` is the special (BOS / pad) token
    audio_channels: int = 1
    text_dim: int = 768              # width of the text encoder's hidden states (T5-base)
    cross_attention: bool = True     # False for MusicGen Melody, which prepends its conditioning instead
    max_positions: int = 2048        # rows of the sinusoid table made up front; longer sequences extend it
    norm_eps: float = 1e-5
    # derived
    head_dim: int = field(init=False)
    special: int = field(init=False)
    delays: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {self.audio_channels}")
        if self.num_codebooks % self.audio_channels:
            raise ValueError(f"{self.num_codebooks} codebooks cannot be split over {self.audio_channels} channels")
        self.head_dim = self.dim // self.num_heads
        self.special = self.card
        # Stereo rows interleave the channels (L0, R0, L1, R1, ...) and both rows of a pair share a delay.
        self.delays = tuple(k // self.audio_channels for k in range(self.num_codebooks))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


PRESETS: dict[str, MusicGenConfig] = {
    "small": MusicGenConfig(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "medium": MusicGenConfig(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144),
    "large": MusicGenConfig(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192),
    "stereo-small": MusicGenConfig(dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, num_codebooks=8,
                                   audio_channels=2),
    "stereo-medium": MusicGenConfig(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144, num_codebooks=8,
                                    audio_channels=2),
    "stereo-large": MusicGenConfig(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192, num_codebooks=8,
                                   audio_channels=2),
    "tiny": MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=32, max_positions=512),
}


def sinusoids(num_positions: int, dim: int) -> Tensor:
    """(num_positions, dim) table: [cos(p * w_j), sin(p * w_j)] with w_j = 10000^(-j / (dim/2 - 1)).

    Computed exactly as transformers does (fp32, exp of a scaled arange, cos half first): audiocraft's
    `pos / 10000^(j / (h-1))` differs in the last bits, and the difference grows with the position (G1).
    """
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    table = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


class Attention(nn.Module):
    """Bias-free q/k/v/out projections; subclasses say where the keys and values come from."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, D/H)

    def merge(self, x: Tensor) -> Tensor:
        B, H, T, Dh = x.shape
        return self.out(x.transpose(1, 2).reshape(B, T, H * Dh))  # (B, T, D)


class SelfAttention(Attention):
    def forward(self, x: Tensor, *, index: int, positions: Tensor, offset: int | Tensor,
                cache: KVCache | None) -> Tensor:
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))  # (B, H, T, Dh) each
        if cache is None:
            return self.merge(attention(q, k, v, causal=True))
        k, v = cache.update(index, positions, k, v)  # (B, H, max_len, Dh): slots past the query are masked
        return self.merge(attention(q, k, v, causal=True, q_offset=offset))


class CrossAttention(Attention):
    def forward(self, x: Tensor, *, index: int, memory: CrossMemory) -> Tensor:
        q = self.heads(self.q(x))  # (B, H, T, Dh)
        return self.merge(attention(q, memory.k[index], memory.v[index], key_mask=memory.mask))


class DecoderLayer(nn.Module):
    def __init__(self, config: MusicGenConfig, index: int):
        super().__init__()
        self.index = index  # which layer of the caches this one reads and writes
        D = config.dim
        self.self_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.self_attn = SelfAttention(D, config.num_heads)
        if config.cross_attention:
            self.cross_norm = nn.LayerNorm(D, eps=config.norm_eps)
            self.cross_attn = CrossAttention(D, config.num_heads)
        self.ffn_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.ffn_in = nn.Linear(D, config.ffn_dim, bias=False)
        self.ffn_out = nn.Linear(config.ffn_dim, D, bias=False)

    def forward(self, x: Tensor, *, positions: Tensor, offset: int | Tensor, memory: CrossMemory | None,
                cache: KVCache | None) -> Tensor:
        x = x + self.self_attn(self.self_norm(x), index=self.index, positions=positions, offset=offset,
                               cache=cache)
        if memory is not None:
            x = x + self.cross_attn(self.cross_norm(x), index=self.index, memory=memory)
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))  # exact (erf) GELU


class MusicGenLM(nn.Module):
    """The MusicGen decoder with its K embeddings and heads, and the text projection."""

    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.config = config
        D, K = config.dim, config.num_codebooks
        self.embeddings = nn.ModuleList([nn.Embedding(config.card + 1, D) for _ in range(K)])  # + special id
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.heads = nn.ModuleList([nn.Linear(D, config.card, bias=False) for _ in range(K)])
        self.text_proj = nn.Linear(config.text_dim, D)  # with bias: hence the mask after it (G7)
        self.register_buffer("sinusoids", sinusoids(config.max_positions, D), persistent=False)

    def reset_buffers(self, num_positions: int | None = None) -> None:
        """(Re)make the sinusoid table, e.g. after loading on the meta device or for longer sequences."""
        device = self.sinusoids.device if not self.sinusoids.is_meta else None
        dtype = self.sinusoids.dtype
        table = sinusoids(num_positions or self.config.max_positions, self.config.dim)
        self.sinusoids = table.to(device=device, dtype=dtype)

    def ensure_positions(self, num_positions: int) -> None:
        """Make sure positions 0 .. num_positions - 1 have sinusoids (before capturing a decode step)."""
        if num_positions > self.sinusoids.shape[0]:
            self.reset_buffers(num_positions)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention cache for `batch_size` rows (2B under CFG) and `max_len` positions."""
        c = self.config
        return KVCache(c.num_layers, batch_size, c.num_heads, max_len, c.head_dim, dtype=self.dtype,
                       device=self.device)

    def cross_memory(self, text: Tensor, mask: Tensor) -> CrossMemory:
        """Cross-attention keys/values of every layer for text states (B, Lt, text_dim) and mask (B, Lt).

        The mask multiplies the projected states (G7: the projection's bias would otherwise leak into padded and
        null rows) and also hides padded keys, as transformers does (audiocraft attends to them, G8).
        """
        if not self.config.cross_attention:
            raise ValueError("this MusicGen LM has no cross-attention (melody variant): it takes its "
                             "conditioning as a prefix")
        if text.dim() != 3 or text.shape[-1] != self.config.text_dim:
            raise ValueError(f"text states must be (B, Lt, {self.config.text_dim}), got {tuple(text.shape)}")
        B, Lt, _ = text.shape
        if tuple(mask.shape) != (B, Lt):
            raise ValueError(f"text mask must be (B, Lt) = {(B, Lt)}, got {tuple(mask.shape)}")
        h = self.text_proj(text.to(self.dtype)) * mask[..., None].to(self.dtype)  # (B, Lt, D)
        keys = [layer.cross_attn.heads(layer.cross_attn.k(h)) for layer in self.layers]  # L x (B, H, Lt, Dh)
        values = [layer.cross_attn.heads(layer.cross_attn.v(h)) for layer in self.layers]
        return CrossMemory(torch.stack(keys), torch.stack(values), mask.to(torch.bool))

    def embed(self, codes: Tensor) -> Tensor:
        """(B, K, T) codes (special id = `card`) -> (B, T, D) summed codebook embeddings, without positions."""
        if codes.dim() != 3 or codes.shape[1] != self.config.num_codebooks:
            raise ValueError(f"codes must be (B, K={self.config.num_codebooks}, T), got {tuple(codes.shape)}")
        return sum(emb(codes[:, k]) for k, emb in enumerate(self.embeddings))

    def forward(self, codes: Tensor, *, memory: CrossMemory | None = None, cache: KVCache | None = None,
                offset: int | Tensor = 0) -> Tensor:
        """Logits (B, K, T, card) for codes (B, K, T) at positions offset .. offset + T - 1.

        `memory`: the text's cross-attention memory (None = no text, the same as an all-masked memory).
        `cache`: the self-attention cache; with it, this chunk attends to the positions written before it and
        writes its own. `offset` may be a 0-dim tensor so that a decode step keeps static inputs.
        """
        return self.forward_embeds(self.embed(codes), memory=memory, cache=cache, offset=offset)

    def forward_embeds(self, x: Tensor, *, memory: CrossMemory | None = None, cache: KVCache | None = None,
                       offset: int | Tensor = 0) -> Tensor:
        """`forward` from input embeddings (B, T, D) (a conditioning prefix may be prepended to them)."""
        B, T, _ = x.shape
        if memory is not None and memory.batch_size != B:
            raise ValueError(f"memory has {memory.batch_size} rows, the input {B}")
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows, the input {B}")
            if isinstance(offset, int) and offset + T > cache.max_len:
                raise ValueError(f"positions {offset}..{offset + T - 1} do not fit a cache of {cache.max_len}")
        if isinstance(offset, int):
            self.ensure_positions(offset + T)
        positions = torch.arange(T, device=x.device) + offset  # (T,)
        x = x + self.sinusoids.index_select(0, positions).to(x.dtype)
        for layer in self.layers:
            x = layer(x, positions=positions, offset=offset, memory=memory, cache=cache)
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads], dim=1)  # (B, K, T, card)

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, variant: str | None = None) -> "MusicGenLM":
        """A native folder, a transformers MusicGen folder (its decoder part) or an audiocraft folder."""
        from musiclm_core.convert import keys, musicgen as convert

        folder = hub.resolve(name_or_path, revision=revision)
        layout = hub.detect_layout(folder)
        if layout == "native":
            config, state = hub.load_native(folder, "musicgen_lm")
            return keys.build(lambda: cls(MusicGenConfig(**config)), state, source=str(folder), dtype=dtype)
        if layout == "transformers":
            config = hub.read_json(folder / "config.json")
            state = hub.load_state_dict(folder, variant=variant)
            return convert.load_transformers(config, convert.lm_part(state), source=str(folder), dtype=dtype)
        if layout == "audiocraft":
            return convert.load_audiocraft_file(folder / "state_dict.bin", dtype=dtype)
        raise hub.CheckpointError(f"{folder} holds a {layout} checkpoint, not a MusicGen LM")

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        hub.save_native(folder, "musicgen_lm", self.config.to_dict(), self.state_dict(), overwrite=overwrite)
