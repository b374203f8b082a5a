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

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.cache import CrossMemory, KVCache, LayerCache, LayerMemory
from musiclm_core.encodec import EnCodec
from musiclm_core.kernels import attention, linear, quant
from musiclm_core.t5 import T5Encoder, T5Tokenizer

LM_KIND = "musicgen_lm"  # model names in native config.json files
PIPELINE_KIND = "musicgen"


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
    """Bias-free projections in, `out` projection back; subclasses say where the keys and values come from."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.out = nn.Linear(dim, dim, bias=False)

    def heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, T, D/H)

    def merge(self, x: Tensor) -> Tensor:
        B, H, T, Dh = x.shape
        return self.out(x.transpose(1, 2).reshape(B, T, H * Dh))  # (B, T, D)


class SelfAttention(Attention):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        # q, k and v in one matmul, rows [q; k; v] (audiocraft's in_proj_weight; the converters concatenate
        # transformers' three): a CPU decode step is ~2,000 small calls, and this saves 300 of them.
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: Tensor, *, positions: Tensor, offset: int | Tensor, cache: LayerCache | None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        if cache is None:
            return self.merge(attention(q, k, v, causal=True))
        k, v = cache.update(positions, k, v)  # (B, H, max_len + 1, Dh): slots past the query are masked
        return self.merge(attention(q, k, v, causal=True, q_offset=offset))


class CrossAttention(Attention):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)  # k and v run once per generation, on the text (cross_memory)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, *, memory: LayerMemory) -> Tensor:
        q = self.heads(self.q(x))  # (B, H, T, Dh)
        # The mask as precomputed scores, and rows without text (CFG's null rows) zeroed: what key_mask=
        # does, without rebuilding both from the mask at every step.
        out = attention(q, memory.k, memory.v, bias=memory.scores) * memory.attends
        return self.merge(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: MusicGenConfig):
        super().__init__()
        D = config.dim
        self.self_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.self_attn = SelfAttention(D, config.num_heads)
        if config.cross_attention:
            self.cross_norm = nn.LayerNorm(D, eps=config.norm_eps)
            self.cross_attn = CrossAttention(D, config.num_heads)
        self.ffn_norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.ffn_in = nn.Linear(D, config.ffn_dim, bias=False)
        self.ffn_out = nn.Linear(config.ffn_dim, D, bias=False)

    def forward(self, x: Tensor, *, positions: Tensor, offset: int | Tensor, memory: LayerMemory | None,
                cache: LayerCache | None) -> Tensor:
        x = x + self.self_attn(self.self_norm(x), positions=positions, offset=offset, cache=cache)
        if memory is not None:
            x = x + self.cross_attn(self.cross_norm(x), memory=memory)
        return x + self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x))))  # exact (erf) GELU


class MusicGenLM(nn.Module):
    """The MusicGen decoder with its K embeddings and heads, and the text projection."""

    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.config = config
        D, K = config.dim, config.num_codebooks
        self.embeddings = nn.ModuleList([nn.Embedding(config.card + 1, D) for _ in range(K)])  # + special id
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)
        self.heads = nn.ModuleList([nn.Linear(D, config.card, bias=False) for _ in range(K)])
        self.text_proj = nn.Linear(config.text_dim, D)  # with bias: hence the mask after it (G7)
        self.register_buffer("sinusoids", sinusoids(config.max_positions, D), persistent=False)
        self.compiled_layer: Callable[..., Tensor] | None = None  # `compile_decode`

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

    def compile_decode(self) -> "MusicGenLM":
        """Run the one-column steps (T = 1) through a `torch.compile`d decoder layer, on the CPU; returns self.

        A CPU decode step is ~2,000 small eager calls, and on a slow core their Python and dispatch overhead
        costs as much as the matmuls (RESULTS.md: where a step goes). Inductor fuses the norms, casts, GELU and
        residual adds around the matmuls and calls them from generated code: MusicGen small int4 went from ~61 to
        ~50 ms a step here. All layers share one compiled function (a layer's weights and its part of the caches
        are inputs, the position is dynamic), compiled at the first one-column step: ~30 s on a 2-core machine
        the first time, ~12 s from inductor's on-disk cache after that. Other batch sizes, text lengths and
        generation lengths reuse it; a size of 1 (one prompt without CFG) gets a graph of its own. Chunks of
        several columns (the prefill) stay eager. Environment switches (MUSICLM_ATTENTION, MUSICLM_QUANT) are
        read when it compiles. On CUDA, use `cuda_graph=True` instead.
        """
        if self.device.type != "cpu":
            raise ValueError(f"compile_decode is for CPU decoding, the LM is on {self.device} (on CUDA, generate "
                             "with cuda_graph=True)")
        self.compiled_layer = torch.compile(DecoderLayer.forward, dynamic=True)
        return self

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
        run_layer, offset, sizes = self._layer_runner(x, offset)
        no_parts = [None] * len(self.layers)
        caches = no_parts if cache is None else cache.layers  # each layer reads and writes its own part
        memories = no_parts if memory is None else memory.layers
        with sizes:
            for layer, layer_cache, layer_memory in zip(self.layers, caches, memories):
                x = run_layer(layer, x, positions=positions, offset=offset, memory=layer_memory, cache=layer_cache)
        x = self.norm(x)
        return torch.stack([head(x) for head in self.heads], dim=1)  # (B, K, T, card)

    def _layer_runner(self, x: Tensor, offset: int | Tensor
                      ) -> tuple[Callable[..., Tensor], int | Tensor, contextlib.AbstractContextManager]:
        """How `forward_embeds` runs its layers on x (B, T, D): (layer call, offset, context around the loop).

        Eager, unless `compile_decode` was called and x is one column past position 1: then the compiled layer
        with the offset as an int (a 0-dim tensor would be read inside the compiled code: a graph break; 0 and 1
        stay eager because the compiler would give each of those two ints a graph of its own).
        """
        if x.shape[1] != 1 or self.compiled_layer is None:
            return DecoderLayer.__call__, offset, contextlib.nullcontext()
        if not x.is_cpu:
            raise ValueError(f"compile_decode is for CPU decoding, the input is on {x.device}")
        if int(offset) < 2:
            return DecoderLayer.__call__, offset, contextlib.nullcontext()
        import torch.fx.experimental._config as fx_config  # private: imported only by those who compile

        # Sizes that happen to be equal (16 text tokens and 16 heads, 16 rows) would share one symbol in the
        # graph, which then holds only while they stay equal: the next text length or batch would compile again.
        # Switching that off around the loop costs 0.08 ms a step.
        return self.compiled_layer, int(offset), fx_config.patch(use_duck_shape=False)

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, variant: str | None = None,
                        layout: str | None = None) -> "MusicGenLM":
        """A native folder, a transformers MusicGen folder (its decoder part) or an audiocraft folder; a hub id
        is downloaded first (only the files that layout needs). `variant`, `layout`: as `MusicGen.from_pretrained`.
        The fp32 linears get the layout this CPU multiplies fastest (`kernels/linear.py`: `linear.relayout`).
        """
        from musiclm_core.convert import keys, musicgen as convert

        folder, found = resolve_checkpoint(name_or_path, revision=revision, variant=variant, layout=layout)
        if found == "native":
            # Read, not mapped, where relayout copies weights into blocks (its docstring says why).
            config, state = hub.load_native(folder, LM_KIND, mmap=linear.route() != "blocked")
            hub.check_config(MusicGenConfig, config, source=str(folder / "config.json"))
            lm = keys.build(lambda: cls(MusicGenConfig(**config)), state, source=str(folder), dtype=dtype)
        elif found == "transformers":
            config = hub.read_json(folder / "config.json")
            # Read, not mapped, where relayout copies weights into blocks (its docstring says why).
            state = convert.read_state(folder, variant=variant, lm_in_memory=linear.route() == "blocked")
            lm = convert.load_transformers(config, convert.lm_part(state), source=str(folder), dtype=dtype)
            del state
        else:
            lm = convert.load_audiocraft_file(folder / "state_dict.bin", dtype=dtype)
        return linear.relayout(lm)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        refuse_quantized(self)
        hub.save_native(folder, LM_KIND, self.config.to_dict(), self.state_dict(), overwrite=overwrite)


def refuse_quantized(lm: nn.Module) -> None:
    """ValueError when `lm` holds weight-only quantised layers (`kernels/quant.py`): a native folder keeps the
    weights in the layout its loader builds, and quantising again from the loaded weights is cheap."""
    names = [name for name, module in lm.named_modules() if isinstance(module, quant.LAYERS)]
    if names:
        raise ValueError(f"cannot save an LM with quantised layers ({len(names)}, e.g. {names[0]}): save the "
                         f"unquantised model and pass quantize= when loading it")


# ---------------------------------------------------------------------------------------------------------------
# The pipeline: text (and optionally audio) in, waveform out.

MAX_DURATION = 30.0  # seconds: the training segment of every released MusicGen, the longest one window holds
# Frames held back while streaming: the codec's decoder is not causal, so the last samples of a chunk change
# once the next frames are known: its first conv (kernel 7) sees 3 latent frames ahead, each transposed conv
# stage up to one of its input steps more, and the signal's end is reflect-padded. 6 frames cover all that.
STREAM_LOOKAHEAD = 6


class MusicGen:
    """Text-to-music: T5 encoder -> MusicGen LM (CFG, delay pattern, KV cache) -> EnCodec decoder.

    >>> mg = MusicGen.from_pretrained("facebook/musicgen-small")
    >>> wav = mg.generate(["80s pop track with bassy drums and synth"], duration=8.0, seed=0)  # (B, C, N)

    `generate` counts length as audiocraft does (duration * frame rate frames, audio prompt included) and
    extends past `max_duration` by windows (audiocraft's `extend_stride`); `max_new_tokens` counts decoder steps
    as transformers does. Sampling defaults are audiocraft's (top_k=250, top_p=0 i.e. off, CFG 3.0).
    """

    kind = PIPELINE_KIND  # the model name of a native folder's config.json
    lm_class = MusicGenLM  # what a native folder's lm/ holds
    transformers_model_type = "musicgen"  # the model_type a transformers checkpoint must have (resolve_checkpoint)

    def __init__(self, lm: MusicGenLM, codec: EnCodec, text_encoder: T5Encoder, *,
                 max_duration: float = MAX_DURATION):
        c = lm.config
        if codec.channels != 1:
            raise ValueError(f"MusicGen runs a mono codec once per channel; this codec has {codec.channels} channels")
        if codec.num_codebooks * c.audio_channels != c.num_codebooks:
            raise ValueError(f"the LM models {c.num_codebooks} codebooks for {c.audio_channels} channel(s), the "
                             f"codec has {codec.num_codebooks} per channel")
        if codec.codebook_size != c.card:
            raise ValueError(f"the LM's codebooks have {c.card} entries, the codec's {codec.codebook_size}")
        if text_encoder.config.dim != c.text_dim:
            raise ValueError(f"the LM expects {c.text_dim}-wide text states, the text encoder gives "
                             f"{text_encoder.config.dim}")
        self.lm, self.codec, self.text_encoder = lm.eval(), codec.eval(), text_encoder.eval()
        self.max_duration = max_duration

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.codec.frame_rate

    @property
    def channels(self) -> int:
        return self.lm.config.audio_channels

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def to(self, *args, **kwargs) -> "MusicGen":
        """Move (and cast) the three models, with the arguments of `nn.Module.to`; returns self."""
        for model in (self.lm, self.codec, self.text_encoder):
            model.to(*args, **kwargs)
        return self

    # -- audio <-> codes --------------------------------------------------------------------------------------

    def encode_audio(self, wav: Tensor, sample_rate: int | None = None) -> Tensor:
        """(B, C, N) audio -> (B, K, T) codes; stereo channels are coded separately and interleaved L0 R0 L1 R1."""
        if not isinstance(wav, Tensor) or wav.dim() != 3:
            raise ValueError(f"prompt audio must be a (B, C, N) tensor, got "
                             f"{tuple(wav.shape) if isinstance(wav, Tensor) else type(wav).__name__}")
        if wav.shape[1] != self.channels:
            raise ValueError(f"this is a {'stereo' if self.channels == 2 else 'mono'} MusicGen: prompt audio must "
                             f"have {self.channels} channel(s), got {wav.shape[1]} (shape {tuple(wav.shape)})")
        codes = [self.codec.encode(wav[:, c: c + 1], sample_rate=sample_rate) for c in range(self.channels)]
        return torch.stack(codes, dim=2).flatten(1, 2)  # (B, K/C, C, T) -> (B, K, T)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, K, T) codes -> (B, C, T * hop) audio; rows ::2 are the left channel, 1::2 the right (stereo)."""
        C = self.channels
        return torch.cat([self.codec.decode(codes[:, c::C]) for c in range(C)], dim=1)

    # -- generation -------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str] | None, num_samples: int | None,
                       prompt_audio: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, int]:
        """(text states (B, L, text_dim), mask (B, L), B) of the prompts; (None, None, num_samples) for
        prompts=None, where num_samples defaults to the batch of a (B, C, N) prompt_audio."""
        if prompts is None:
            if num_samples is None and isinstance(prompt_audio, Tensor) and prompt_audio.dim() == 3:
                num_samples = prompt_audio.shape[0]  # continue each prompt audio without text
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
                raise ValueError(f"unconditional generation (prompts=None) needs num_samples > 0, got "
                                 f"{num_samples!r}")
            return None, None, num_samples
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings (wrap a single prompt in a list)")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt, or prompts=None for unconditional "
                             "generation")
        if num_samples is not None and num_samples != len(prompts):
            raise ValueError(f"num_samples {num_samples} does not match the {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):  # as the CLI: an empty text is a mistake, not a request for silence
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is {'empty' if isinstance(prompt, str) else type(prompt).__name__}"
                                 f" ({prompt!r}): describe the music, or pass prompts=None for unconditional "
                                 f"generation")
        with torch.no_grad():
            states, mask = self.text_encoder.encode_text(prompts)
        return states, mask, len(prompts)

    def frame_count(self, duration: float | None, max_new_tokens: int | None) -> int | None:
        """Total frames for a duration (audiocraft: int(duration * frame rate)); None with max_new_tokens."""
        if duration is None and max_new_tokens is None:
            raise ValueError("give duration (seconds) or max_new_tokens")
        if duration is not None and max_new_tokens is not None:
            raise ValueError("give either duration or max_new_tokens, not both")
        if duration is None:
            return None
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
                or duration <= 0:
            raise ValueError(f"duration must be a finite number of seconds > 0, got {duration!r}")
        frames = int(duration * self.frame_rate)
        if frames < 1:
            raise ValueError(f"duration {duration} s is shorter than one frame ({1 / self.frame_rate:.4f} s)")
        return frames

    def generate_codes(self, prompts: Sequence[str] | None, *, duration: float | None = None,
                       max_new_tokens: int | None = None, guidance_scale: float = 3.0, top_k: int = 250,
                       top_p: float = 0.0, temperature: float = 1.0, do_sample: bool = True,
                       seed: int | None = None, prompt_audio: Tensor | None = None,
                       prompt_sample_rate: int | None = None, num_samples: int | None = None,
                       extend_stride: float = 18.0, progress: bool | Callable[[int, int], None] = False,
                       cuda_graph: bool = False) -> Tensor:
        """Codes (B, K, T), delay undone, audio prompt included. See `generate` for the arguments."""
        from musiclm_core import generate as gen

        gen.check_sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                           do_sample=do_sample, seed=seed)
        total = self.frame_count(duration, max_new_tokens)
        states, mask, B = self.encode_prompts(prompts, num_samples, prompt_audio)
        prompt_codes = None
        if prompt_audio is not None:
            prompt_codes = self.encode_audio(prompt_audio, prompt_sample_rate)
            if prompt_codes.shape[0] != B:
                raise ValueError(f"{prompt_codes.shape[0]} prompt audio(s) for {B} text prompt(s)")
            if total is not None and prompt_codes.shape[-1] >= total:
                raise ValueError(f"the audio prompt ({prompt_codes.shape[-1]} frames, "
                                 f"{prompt_audio.shape[-1] / (prompt_sample_rate or self.sample_rate):.2f} s) is "
                                 f"not shorter than the duration asked for ({duration} s = {total} frames)")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        callback = progress_printer() if progress is True else (progress or None)
        settings = dict(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                        do_sample=do_sample, generator=generator, cuda_graph=cuda_graph)
        if total is None:  # transformers' reckoning, one window
            return gen.generate_codes(self.lm, states, mask, batch_size=B, max_new_tokens=max_new_tokens,
                                      prompt_codes=prompt_codes, progress=callback, **settings)
        window = int(self.max_duration * self.frame_rate)
        stride = int(extend_stride * self.frame_rate)
        if total > window and not 0 < stride < window:
            raise ValueError(f"extend_stride must be in (0, {self.max_duration}) s to go past {self.max_duration} s, "
                             f"got {extend_stride!r}")
        if prompt_codes is not None and prompt_codes.shape[-1] >= window:
            raise ValueError(f"the audio prompt ({prompt_codes.shape[-1]} frames) must be shorter than one window "
                             f"of max_duration = {self.max_duration} s ({window} frames)")
        return self._windows(states, mask, B, total, window, stride, prompt_codes, callback, settings)

    def _windows(self, states, mask, B, total, window, stride, prompt_codes, callback, settings) -> Tensor:
        """audiocraft's long-form scheme: windows of at most `window` frames, each continuing the last
        `window - stride` frames of the previous one, until `total` frames exist."""
        from musiclm_core import generate as gen

        pieces = [] if prompt_codes is None else [prompt_codes]
        prompt = prompt_codes
        offset = 0  # frames before the current window
        while offset + (0 if prompt is None else prompt.shape[-1]) < total:
            frames = min(total - offset, window)
            done = offset + (0 if prompt is None else prompt.shape[-1])  # frames that exist before this window
            new = offset + frames - done  # frames this window adds

            def report(step, steps, done=done, new=new):
                # a window takes new + max(delays) steps: report frames, not steps, and each count once (the
                # last max(delays) steps add no frame: reporting them drew a finished bar several times)
                if callback is not None and step <= new:
                    callback(done + step, total)

            codes = gen.generate_codes(self.lm, states, mask, batch_size=B, num_frames=frames, prompt_codes=prompt,
                                       progress=report, **settings)
            pieces.append(codes if prompt is None else codes[:, :, prompt.shape[-1]:])
            prompt = codes[:, :, stride:]
            offset += stride
        return torch.cat(pieces, dim=-1)

    def generate(self, prompts: Sequence[str] | None, *, duration: float | None = None,
                 max_new_tokens: int | None = None, guidance_scale: float = 3.0, top_k: int = 250,
                 top_p: float = 0.0, temperature: float = 1.0, do_sample: bool = True, seed: int | None = None,
                 prompt_audio: Tensor | None = None, prompt_sample_rate: int | None = None,
                 num_samples: int | None = None, extend_stride: float = 18.0,
                 progress: bool | Callable[[int, int], None] = False, cuda_graph: bool = False) -> Tensor:
        """Audio (B, C, N) at `sample_rate`, the audio prompt included.

        prompts: B texts, or None for unconditional generation of `num_samples` pieces (default: one per
            prompt audio).
        duration: seconds in all, prompt included (int(duration * frame_rate) frames); past `max_duration` the
            music is extended by windows that each continue the last `max_duration - extend_stride` seconds.
            max_new_tokens instead: transformers' count of decoder steps (one window).
        guidance_scale: classifier-free guidance, on above 1. top_k: 0 = off. top_p: 0 or 1 = off.
        seed: seeds a generator of its own; None draws from torch's global generator (as transformers).
        prompt_audio (B, C, N) at prompt_sample_rate (default: the model's): music to continue.
        progress: True prints the frame count; a callable gets (frames done, frames in all), or with
            max_new_tokens (decoder steps done, steps in all).
        cuda_graph: on a CUDA device, replay every decode step from a CUDA graph (`generate.GraphedStep`): the
            same computation with one launch per step instead of one per op.
        """
        codes = self.generate_codes(prompts, duration=duration, max_new_tokens=max_new_tokens,
                                    guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                    temperature=temperature, do_sample=do_sample, seed=seed,
                                    prompt_audio=prompt_audio, prompt_sample_rate=prompt_sample_rate,
                                    num_samples=num_samples, extend_stride=extend_stride, progress=progress,
                                    cuda_graph=cuda_graph)
        return self.decode_codes(codes)

    def stream(self, prompts: Sequence[str] | None, *, duration: float = 10.0, chunk_duration: float = 1.0,
               context_duration: float = 2.0, guidance_scale: float = 3.0, top_k: int = 250, top_p: float = 0.0,
               temperature: float = 1.0, do_sample: bool = True, seed: int | None = None,
               prompt_audio: Tensor | None = None, prompt_sample_rate: int | None = None,
               num_samples: int | None = None, cuda_graph: bool = False) -> Iterator[Tensor]:
        """Yield audio chunks (B, C, n) while generating one window (duration <= max_duration).

        Every `chunk_duration` seconds of final frames are decoded together with the `context_duration`
        seconds before them (the codec's LSTM needs a run-up) and all but the last few frames, whose samples
        still depend on frames to come, are yielded. The chunks join into what one `decode_codes` of the whole
        gives when the context covers everything; with a shorter context they differ slightly near the joins.
        """
        from musiclm_core import generate as gen

        gen.check_sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                           do_sample=do_sample, seed=seed)
        total = self.frame_count(duration, None)
        if total > int(self.max_duration * self.frame_rate):
            raise ValueError(f"stream generates one window: duration must be <= {self.max_duration} s, "
                             f"got {duration}")
        chunk, context = self._stream_sizes(chunk_duration, context_duration)
        states, mask, B = self.encode_prompts(prompts, num_samples, prompt_audio)
        prompt_codes = None
        if prompt_audio is not None:
            prompt_codes = self.encode_audio(prompt_audio, prompt_sample_rate)
            if prompt_codes.shape[0] != B or prompt_codes.shape[-1] >= total:
                raise ValueError(f"prompt audio must be {B} piece(s) shorter than {duration} s, got codes "
                                 f"{tuple(prompt_codes.shape)}")
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        frames = gen.iter_frames(self.lm, states, mask, batch_size=B, num_frames=total, prompt_codes=prompt_codes,
                                 guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                                 do_sample=do_sample, generator=generator, cuda_graph=cuda_graph)
        yield from self._decode_stream(frames, total, chunk, context)

    def _stream_sizes(self, chunk_duration: float, context_duration: float) -> tuple[int, int]:
        """(chunk, context) in frames for `stream`, after checking the durations."""
        for name, value in (("chunk_duration", chunk_duration), ("context_duration", context_duration)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "chunk_duration" and value <= 0):
                raise ValueError(f"{name} must be a finite number of seconds "
                                 f"{'> 0' if name == 'chunk_duration' else '>= 0'}, got {value!r}")
        return max(1, int(chunk_duration * self.frame_rate)), int(context_duration * self.frame_rate)

    def _decode_stream(self, frames: Iterator[Tensor], total: int, chunk: int, context: int) -> Iterator[Tensor]:
        """Audio chunks (B, C, n) of the frames (B, K, n') an `iter_frames` yields, `total` frames in all."""
        hop = self.codec.hop_length
        codes = None
        emitted = 0  # frames whose samples have been yielded
        for block in frames:
            codes = block if codes is None else torch.cat([codes, block], dim=-1)
            final = codes.shape[-1]
            if final == total or final - STREAM_LOOKAHEAD - emitted >= chunk:
                upto = final if final == total else final - STREAM_LOOKAHEAD
                start = max(0, emitted - context)
                wav = self.decode_codes(codes[:, :, start:final])  # (B, C, (final - start) * hop)
                yield wav[..., (emitted - start) * hop: (upto - start) * hop]
                emitted = upto

    # -- checkpoints ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, variant: str | None = None, layout: str | None = None,
                        text_encoder: str | os.PathLike | None = None, quantize: str | None = None) -> "MusicGen":
        """A transformers MusicGen repo or folder (`facebook/musicgen-*`), an audiocraft folder (`state_dict.bin`
        + `compression_state_dict.bin`) or a native folder.

        variant: transformers weight files variant, e.g. "fp32" for the stereo repos (whose default files are
            fp16). The models are cast to `dtype` either way.
        layout: "audiocraft" to read the audiocraft files of a repo that holds both layouts.
        text_encoder: for the audiocraft layout, where to get T5 (default: the hub id its config names, e.g.
            "t5-base", as audiocraft does).
        quantize: "int8", "int4" or "bf16" stores the LM's linear weights in that format (`kernels/quant.py`:
            weight-only, for the memory-bound decode step on a CPU; int4 runs on the CPU only; parity in
            benchmarks/RESULTS.md); the loaded `dtype` weights are freed. T5 and EnCodec stay in `dtype`.
            Without it, the LM's fp32 linears get the layout this CPU multiplies fastest (`linear.relayout`).
        """
        if quantize is not None and quantize not in quant.MODES:  # before the long part
            raise ValueError(f"quantize must be None or one of {quant.MODES}, got {quantize!r}")
        in_memory = quantize is not None or linear.route() == "blocked"  # both replace weights: read, not mapped
        pipeline = cls._load(name_or_path, dtype=dtype, revision=revision, variant=variant, layout=layout,
                             text_encoder=text_encoder, lm_in_memory=in_memory)
        if quantize is not None:
            quant.quantize_weights(pipeline.lm, quantize)
        else:
            linear.relayout(pipeline.lm)
        return pipeline

    @classmethod
    def _load(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype, revision: str | None,
              variant: str | None, layout: str | None, text_encoder: str | os.PathLike | None,
              lm_in_memory: bool = False) -> "MusicGen":
        """The pipeline from any layout; `lm_in_memory` as `convert.musicgen.read_state` (for a quantised load)."""
        from musiclm_core.convert import encodec as convert_encodec, keys, musicgen as convert, t5 as convert_t5

        folder, found = resolve_checkpoint(name_or_path, revision=revision, variant=variant, layout=layout,
                                           model_type=cls.transformers_model_type)
        if found == "native":
            meta = hub.read_json(folder / "config.json")
            if meta[hub.NATIVE_FORMAT].get("model") != cls.kind:
                raise hub.CheckpointError(f"{folder} holds a native {meta[hub.NATIVE_FORMAT].get('model')!r}, "
                                          f"not a {cls.kind!r} pipeline")
            return cls(cls.lm_class.from_pretrained(folder / "lm", dtype=dtype),
                       EnCodec.from_pretrained(folder / "codec", dtype=dtype),
                       T5Encoder.from_pretrained(folder / "text_encoder", dtype=dtype),
                       max_duration=meta["config"].get("max_duration", MAX_DURATION))
        if found == "transformers":
            config = hub.read_json(folder / "config.json")
            state = convert.read_state(folder, variant=variant, lm_in_memory=lm_in_memory)
            lm = cls.lm_converter().load_transformers(config, convert.lm_part(state), source=str(folder),
                                                     dtype=dtype)
            codec = convert_encodec.load_transformers(config["audio_encoder"],
                                                      keys.strip_prefix(state, "audio_encoder."),
                                                      source=f"{folder} (audio_encoder)", dtype=dtype)
            t5 = convert_t5.load_transformers(config["text_encoder"], keys.strip_prefix(state, "text_encoder."),
                                              source=f"{folder} (text_encoder)", dtype=dtype)
            t5.tokenizer = T5Tokenizer.from_folder(folder, max_length=t5.config.max_length)
            return cls(lm, codec, t5)
        package = hub.load_tensors(folder / "state_dict.bin")  # audiocraft
        lm = cls.lm_converter().load_audiocraft(package, source=str(folder / "state_dict.bin"), dtype=dtype)
        codec = convert_encodec.load_audiocraft_folder(folder, dtype=dtype)
        xp = convert.parse_xp_cfg(package["xp.cfg"])
        t5 = T5Encoder.from_pretrained(text_encoder or convert.get_field(xp, "conditioners.description.t5.name"),
                                       dtype=dtype)
        return cls(lm, codec, t5, max_duration=float(convert.get_field(xp, "dataset.segment_duration",
                                                                  MAX_DURATION)))

    @classmethod
    def lm_converter(cls) -> ModuleType:
        """The convert/ module that reads this pipeline's LM from transformers and audiocraft checkpoints (its
        `load_transformers` and `load_audiocraft`); MusicGenMelody returns convert/musicgen_melody."""
        from musiclm_core.convert import musicgen as convert  # convert/ imports this module: import at call time

        return convert

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Native folder: config.json + lm/, codec/, text_encoder/ (each a native folder), written atomically."""
        folder = Path(folder)
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.lm.save_pretrained(tmp / "lm")
            self.codec.save_pretrained(tmp / "codec")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            meta = {hub.NATIVE_FORMAT: {"model": self.kind, "version": 1},
                    "config": {"max_duration": self.max_duration}}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# transformers' model_type of each pipeline: (the model's name, the class that loads it), for resolve_checkpoint
# to say which class a checkpoint of the other type needs.
TRANSFORMERS_MODEL_TYPES = {"musicgen": ("MusicGen", "MusicGen"),
                            "musicgen_melody": ("MusicGen Melody", "MusicGenMelody")}


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       variant: str | None = None, layout: str | None = None,
                       model_type: str = "musicgen") -> tuple[Path, str]:
    """(folder, layout) of a MusicGen checkpoint: "native", "transformers" or "audiocraft".

    For a hub id only what that layout needs is downloaded: a repo such as facebook/musicgen-small holds the
    transformers weights twice (.safetensors and .bin) and audiocraft's files besides. layout="audiocraft"
    picks the audiocraft files of a repo or folder that holds both. model_type: the transformers config's
    (a key of TRANSFORMERS_MODEL_TYPES), "musicgen_melody" for MusicGen Melody.
    """
    if layout not in (None, "audiocraft"):
        raise ValueError(f"layout must be None (detect) or 'audiocraft', got {layout!r}")
    local = Path(name_or_path).expanduser().is_dir()
    if layout is None:
        folder = hub.resolve(name_or_path, revision=revision, allow_patterns=["*.json", "spiece.model"])
        if (folder / "config.json").is_file():
            found = hub.detect_layout(folder)
            if found == "native" and not local:
                folder = hub.resolve(name_or_path, revision=revision)
            elif found == "transformers":
                # Checked before the weights are downloaded: a melody repo's are as large as the model.
                theirs = hub.read_json(folder / "config.json").get("model_type")
                if theirs != model_type:
                    hint = (f"; for {theirs!r} use {TRANSFORMERS_MODEL_TYPES[theirs][1]}"
                            if theirs in TRANSFORMERS_MODEL_TYPES else "")
                    raise hub.CheckpointError(f"{folder}: model_type {theirs!r} is not a "
                                              f"{TRANSFORMERS_MODEL_TYPES[model_type][0]} ({model_type!r}){hint}")
                if not local:
                    folder = _fetch_transformers_weights(name_or_path, folder, revision=revision, variant=variant)
            if found in ("native", "transformers"):
                return folder, found
            raise hub.CheckpointError(f"{folder} holds a {found} checkpoint, not a MusicGen")
    folder = hub.resolve(name_or_path, revision=revision,
                         allow_patterns=["state_dict.bin", "compression_state_dict.bin"])
    if not (folder / "state_dict.bin").is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise hub.CheckpointError(f"{folder} holds no MusicGen checkpoint: expected config.json (transformers or "
                                  f"native) or state_dict.bin (audiocraft); found {present}")
    return folder, "audiocraft"


def _fetch_transformers_weights(name_or_path: str | os.PathLike, folder: Path, *, revision: str | None,
                                variant: str | None) -> Path:
    """Download the weight files of one variant only: an index's shards, else one single file."""
    v = f".{variant}" if variant else ""
    for index in (f"model.safetensors.index{v}.json", f"pytorch_model.bin.index{v}.json"):
        if (folder / index).is_file():
            shards = sorted(set(hub.read_json(folder / index)["weight_map"].values()))
            return hub.resolve(name_or_path, revision=revision, allow_patterns=["*.json", "spiece.model", *shards])
    for single in (f"model{v}.safetensors", f"pytorch_model{v}.bin"):
        folder = hub.resolve(name_or_path, revision=revision, allow_patterns=["*.json", "spiece.model", single])
        if (folder / single).is_file():
            return folder
    return folder  # hub.load_state_dict then says which files are missing


def progress_printer() -> Callable[[int, int], None]:
    """The `progress=True` callback of the pipelines: "  done /  total frames" on one stderr line."""

    def show(done: int, total: int) -> None:
        print(f"\r{done:6d} / {total:6d} frames", end="\n" if done >= total else "", file=sys.stderr, flush=True)
    return show
