"""T5 encoder (t5 and flan-t5) and its sentencepiece tokenizer.

The encoder (specs/musicgen.md §3.1, specs/ldm.md §7), for token ids of shape (B, L):

    x = embed[ids]                                   no sqrt(D) scaling
    bias = relative_bias[bucket(key - query)]        (1, H, L, L), computed once, shared by every layer
    each layer:  x += o(attention(q, k, v) + bias)   q = RMSNorm(x) @ Wq ...; scores are NOT scaled by 1/sqrt(D)
                 x += ffn(RMSNorm(x))                relu (t5) or gated tanh-GELU (t5 v1.1, flan-t5)
    out = RMSNorm(x)

T5 needs no 1/sqrt(D): the Mesh TensorFlow initialisation folds it into the query weights, so checkpoints expect
unscaled scores. Padded keys are masked; padded *queries* still get values (as in transformers): users of the
hidden states mask them (MusicGen multiplies by the mask, AudioLDM 2 passes the mask to its cross-attention).

`T5Tokenizer` reproduces transformers' `T5Tokenizer.from_pretrained(folder)` (v5: a tokenizers-library Unigram
model built from `spiece.model`) on top of the `sentencepiece` package; see its docstring for the pipeline.
"""

from __future__ import annotations

import math
import os
import re
import struct
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core import hub
from musiclm_core.kernels import attention

NATIVE_KIND = "t5_encoder"
SPIECE = "spiece.model"
FEED_FORWARDS = ("relu", "gated-gelu")


@dataclass
class T5Config:
    vocab_size: int = 32128          # embedding rows: 32000 pieces + 100 <extra_id_N> sentinels, padded to 128s
    dim: int = 768                   # d_model
    head_dim: int = 64               # d_kv: not dim // num_heads in general (t5-3b: 1024 wide, 32 heads of 128)
    ffn_dim: int = 3072              # d_ff
    num_layers: int = 12
    num_heads: int = 12
    relative_buckets: int = 32       # relative_attention_num_buckets (both directions together)
    relative_max_distance: int = 128  # distances from here on share the last bucket
    norm_eps: float = 1e-6
    feed_forward: str = "relu"       # "relu" (t5) or "gated-gelu" (t5 v1.1, flan-t5: GELU tanh approximation)
    max_length: int = 512            # the tokenizer truncates prompts to this many tokens, </s> included

    def __post_init__(self) -> None:
        if self.feed_forward not in FEED_FORWARDS:
            raise ValueError(f"T5Config.feed_forward must be one of {FEED_FORWARDS}, got {self.feed_forward!r}")
        for name in ("vocab_size", "dim", "head_dim", "ffn_dim", "num_layers", "num_heads", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.relative_buckets < 4 or self.relative_buckets % 2:
            raise ValueError(f"T5Config.relative_buckets must be even and >= 4, got {self.relative_buckets}")
        if self.relative_max_distance <= self.relative_buckets // 4:
            raise ValueError(f"T5Config.relative_max_distance ({self.relative_max_distance}) must exceed "
                             f"relative_buckets // 4 ({self.relative_buckets // 4}), where the log-spaced buckets "
                             f"start")


PRESETS: dict[str, T5Config] = {
    "t5-small": T5Config(dim=512, head_dim=64, ffn_dim=2048, num_layers=6, num_heads=8),
    "t5-base": T5Config(dim=768, head_dim=64, ffn_dim=3072, num_layers=12, num_heads=12),
    "t5-large": T5Config(dim=1024, head_dim=64, ffn_dim=4096, num_layers=24, num_heads=16),
    "flan-t5-base": T5Config(dim=768, head_dim=64, ffn_dim=2048, num_layers=12, num_heads=12,
                             feed_forward="gated-gelu"),
    "flan-t5-large": T5Config(dim=1024, head_dim=64, ffn_dim=2816, num_layers=24, num_heads=16,
                              feed_forward="gated-gelu"),
    "tiny": T5Config(dim=32, head_dim=8, ffn_dim=64, num_layers=2, num_heads=4),
}


# ---------------------------------------------------------------------------------------------------------------
# Encoder


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucket of each `key_position - query_position`.

    Half the buckets for keys after the query, half for the others. In each half, the first half of the buckets
    are the exact distances 0 .. max_exact-1; the rest are log-spaced up to `max_distance`, and every distance
    beyond shares the last bucket. E.g. 32 buckets, 128: distances 0..7 exact, 8..11 -> 8, ..., >= 91 -> 15.
    """
    half = num_buckets // 2
    max_exact = half // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    # Float log, then truncation toward zero, in this order of operations (as Mesh TensorFlow and transformers):
    # any other rounding moves some distances across bucket borders. The clamp only keeps log(0) out of the
    # branch that torch.where discards.
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; the mean square is taken in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q = nn.Linear(config.dim, inner, bias=False)
        self.k = nn.Linear(config.dim, inner, bias=False)
        self.v = nn.Linear(config.dim, inner, bias=False)
        self.o = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor, key_mask: Tensor | None) -> Tensor:
        B, L, _ = x.shape
        H, Dh = self.num_heads, self.head_dim
        q = self.q(x).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k(x).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
        v = self.v(x).view(B, L, H, Dh).transpose(1, 2)  # (B, H, L, Dh)
        out = attention(q, k, v, key_mask=key_mask, bias=bias, scale=1.0)  # unscaled scores: see module doc
        return self.o(out.transpose(1, 2).reshape(B, L, H * Dh))  # (B, L, H*Dh) -> (B, L, D)


class FeedForward(nn.Module):
    """relu: down(relu(up x)). gated-gelu: down(gelu_tanh(gate x) * up x) (checkpoint names wi_0 = gate, wi_1 = up)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.gated = config.feed_forward == "gated-gelu"
        if self.gated:
            self.gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            # transformers maps "gated-gelu" to "gelu_new": the tanh approximation, not the exact erf GELU.
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        return self.down(F.relu(self.up(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x: Tensor, bias: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), bias, key_mask)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """The T5 encoder stack. `tokenizer` is attached by `from_pretrained` (or by hand) for `encode_text`."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        # One table for the whole stack: transformers keeps it in layer 0 and passes the bias on to the others.
        self.relative_bias = nn.Embedding(config.relative_buckets, config.num_heads)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.tokenizer: T5Tokenizer | None = None

    def position_bias(self, length: int) -> Tensor:
        """(1, H, L, L) additive attention scores from the relative position of each key to each query."""
        pos = torch.arange(length, device=self.relative_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_buckets,
                                           self.config.relative_max_distance)  # (L, L): key minus query
        return self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (L, L, H) -> (1, H, L, L)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L) int, attention_mask (B, L) (1/True = token, 0/False = padding) -> hidden (B, L, D).

        Every position gets a value, padded ones included (transformers' `last_hidden_state`). In a row whose
        mask is all zeros the attention outputs are zeros (the attention kernel's rule: never NaN) where
        transformers averages over all keys; the tokenizer never makes such rows.
        """
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be a (B, L) integer tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the embedding rows), "
                             f"got min {int(input_ids.min())}, max {int(input_ids.max())}")
        key_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)  # (B, L)
        x = self.embed(input_ids)  # (B, L, D); T5 does not scale its embeddings
        bias = self.position_bias(L).to(x.dtype)  # (1, H, L, L), shared by every layer
        for layer in self.layers:
            x = layer(x, bias, key_mask)
        return self.norm(x)

    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize and encode: -> hidden (B, L, D) float, mask (B, L) int64 (1 = token, 0 = padding).

        L is the longest prompt in tokens (</s> included, at most `config.max_length`; longer prompts are
        truncated with a warning). The mask is int64, as transformers' tokenizer returns it: cast it to the
        hidden dtype to multiply, or `.bool()` for attention masks. Runs under the caller's grad mode.
        """
        if self.tokenizer is None:
            raise ValueError("this T5Encoder has no tokenizer: load it with T5Encoder.from_pretrained, or set "
                             "`encoder.tokenizer = T5Tokenizer.from_folder(folder_with_spiece_model)`")
        input_ids, mask = self.tokenizer(prompts, max_length=self.config.max_length)
        device = self.embed.weight.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        return self(input_ids, mask), mask

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None,
                        tokenizer_folder: str | os.PathLike | None = None) -> "T5Encoder":
        """A hub id ("t5-base", "google/flan-t5-large"), a transformers folder or a native folder.

        The folder must hold `spiece.model` (transformers T5 repos keep it at their root), unless
        `tokenizer_folder` names the local folder that does: a diffusers AudioLDM 2 pipeline keeps the encoder in
        text_encoder_2/ and its tokenizer in tokenizer_2/.
        """
        from musiclm_core.convert import t5 as convert_t5  # convert/ imports this module: import at call time

        folder = hub.resolve(name_or_path, revision=revision,
                             allow_patterns=["*.json", "*.safetensors", SPIECE])
        layout = hub.detect_layout(folder)
        if layout == "native":
            fields, state = hub.load_native(folder, NATIVE_KIND)
            config = T5Config(**hub.check_config(T5Config, fields, source=str(folder / "config.json")))
            model = convert_t5.build_native(config, state, source=str(folder), dtype=dtype)
        elif layout == "transformers":
            model = convert_t5.load_transformers(hub.read_json(folder / "config.json"), hub.load_state_dict(folder),
                                                 source=str(folder), dtype=dtype)
        else:
            raise hub.CheckpointError(f"{folder} holds a {layout} checkpoint; T5Encoder.from_pretrained reads "
                                      f"native and transformers folders")
        model.tokenizer = T5Tokenizer.from_folder(folder if tokenizer_folder is None else tokenizer_folder,
                                                  max_length=model.config.max_length)
        return model

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Native folder: config.json + model.safetensors + the tokenizer's spiece.model, written atomically."""
        if self.tokenizer is None:
            raise ValueError("this T5Encoder has no tokenizer to save with it (set `encoder.tokenizer` first)")
        hub.save_native(folder, NATIVE_KIND, asdict(self.config), self.state_dict(), overwrite=overwrite,
                        extra_files={SPIECE: self.tokenizer.model_bytes})


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
#
# transformers 5's T5Tokenizer, given a folder with spiece.model, builds a tokenizers-library pipeline:
#   1. split the raw text at special tokens (<pad>, </s>, <unk>, the sentencepiece control pieces and the
#      <extra_id_N> sentinels): they become their ids as they are;
#   2. normalise every other part with the model's precompiled character map (NFKC-like), applied per grapheme
#      (see `_Charsmap`), and nothing else: none of sentencepiece's own whitespace rules;
#   3. split on whitespace (Rust's char::is_whitespace), put "▁" in front of each word unless it starts with
#      one, and split each word again before every "▁" inside it;
#   4. Unigram Viterbi on each of those pieces separately, over a vocabulary that also holds the special
#      tokens with score 0 (so "</s>" that normalisation produces, e.g. from "＜/s＞", is still id 1), with
#      runs of unknown characters fused into one <unk>;
#   5. append </s>; truncation keeps </s> as the last token; padding with <pad> = 0 on the right.
# Step 4 is sentencepiece's own Unigram encoder, run on a copy of the model whose normaliser is switched off
# (our steps 2-3 have done that work, and sentencepiece's normaliser differs from the one transformers uses).

# Rust's char::is_whitespace (Unicode White_Space), which transformers' WhitespaceSplit uses. Not Python's
# str.split(): that also splits at \x1c-\x1f.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_SPACE_MARK = "\u2581"  # "▁", sentencepiece's visible space


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field number, value, raw bytes of the field) for each field of a serialized protobuf message.

    A few lines of the wire format instead of the protobuf package: we read three fields of the model and
    replace one, and the package would be a run-time dependency for that alone.
    """
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire_type == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value, buf[start:pos]


# sentencepiece's ModelProto / TrainerSpec / NormalizerSpec / SentencePiece field numbers (sentencepiece_model.proto)
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER, _MODEL_SELF_TEST = 1, 2, 3, 4
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_NORMALIZER_CHARSMAP = 2
_PIECE_TEXT, _PIECE_TYPE = 1, 3
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL = 1, 2, 3
_UNIGRAM = 1
# name "identity", add_dummy_prefix / remove_extra_whitespaces / escape_whitespaces false, no character map.
_IDENTITY_NORMALIZER = b"\x0a\x08identity\x18\x00\x20\x00\x28\x00"


class _Charsmap:
    """sentencepiece's precompiled character map as transformers applies it (tokenizers' `Precompiled`).

    The map is a double-array trie (darts-clone) from UTF-8 byte strings to offsets in a table of
    NUL-terminated replacements. transformers walks the text by grapheme cluster: a cluster shorter than 6 bytes
    that starts with a key is replaced *whole* by the replacement of the shortest such key (so in "ﬁ" + U+0303
    the combining tilde disappears with the ligature); any other cluster is mapped character by character.
    sentencepiece's own normaliser takes the longest match instead, which is why we do not call it.
    """

    def __init__(self, blob: bytes):
        (trie_bytes,) = struct.unpack_from("<I", blob, 0)
        self.units = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
        self.replacements = blob[4 + trie_bytes:]
        # Characters that never join a cluster -> their replacement (themselves when unmapped), filled lazily.
        self._simple: dict[str, str] = {}

    def first_match(self, key: bytes) -> str | None:
        """The replacement for the shortest prefix of `key` that the trie holds, or None."""
        units = self.units

        def offset(unit: int) -> int:
            return (unit >> 10) << ((unit & (1 << 9)) >> 6)

        node = offset(units[0])
        for byte in key:
            if byte == 0:
                return None
            node ^= byte
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != byte:  # the label of this slot is not our byte: no such path
                return None
            node ^= offset(unit)
            if unit & (1 << 8):  # a key ends here: its value sits in the leaf unit
                start = units[node] & ((1 << 31) - 1)
                return self.replacements[start:self.replacements.index(b"\0", start)].decode("utf-8")
        return None

    def normalize(self, text: str) -> str:
        simple = self._simple
        if "\r\n" not in text:
            for char in set(text) - simple.keys():
                if _extends(char):
                    break
                found = self.first_match(char.encode("utf-8"))
                simple[char] = char if found is None else found
            else:  # no marks, no CR LF: every grapheme cluster is a single character
                return "".join([simple[char] for char in text])
        out = []
        for cluster in _graphemes(text):
            encoded = cluster.encode("utf-8")
            if len(encoded) < 6:
                whole = self.first_match(encoded)
                if whole is not None:
                    out.append(whole)
                    continue
            for char in cluster:
                found = self.first_match(char.encode("utf-8"))
                out.append(char if found is None else found)
        return "".join(out)


def _extends(char: str) -> bool:
    """Grapheme_Cluster_Break Extend / ZWJ / SpacingMark, from what unicodedata offers."""
    code = ord(char)
    return (unicodedata.category(char) in ("Mn", "Me", "Mc")
            or code in (0x200C, 0x200D, 0xFF9E, 0xFF9F, 0x0E33, 0x0EB3)
            or 0x1F3FB <= code <= 0x1F3FF  # emoji skin-tone modifiers
            or 0xE0020 <= code <= 0xE007F)  # tag characters


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Zl", "Zp", "Cf") and not _extends(char)


def _graphemes(text: str) -> list[str]:
    """Extended grapheme clusters, close enough for `_Charsmap`: only clusters under 6 bytes behave differently
    from single characters there, and those are CR LF or a character followed by marks (Extend, ZWJ,
    SpacingMark). Longer clusters (emoji sequences, Hangul jamo, regional-indicator flags) are mapped character
    by character either way, so they need no rules here. Prepend characters are not joined (rare, and only
    matter before a mapped character)."""
    clusters: list[str] = []
    for char in text:
        if clusters and clusters[-1] == "\r" and char == "\n":
            clusters[-1] += char
        elif clusters and _extends(char) and not _is_control(clusters[-1][-1]):
            clusters[-1] += char
        else:
            clusters.append(char)
    return clusters


class T5Tokenizer:
    """T5's tokenizer on the `sentencepiece` package, id for id what transformers 5's `T5Tokenizer` gives.

    Ids: the sentencepiece pieces (<pad> = 0, </s> = 1, <unk> = 2, then the vocabulary), then `extra_ids`
    sentinels counted backwards: <extra_id_0> is the last id (32099 for T5), <extra_id_99> the first (32000).
    """

    pad_id, eos_id, unk_id = 0, 1, 2

    def __init__(self, model_file: str | os.PathLike, *, max_length: int = 512, extra_ids: int = 100):
        import sentencepiece

        path = Path(model_file)
        if not path.is_file():
            raise hub.CheckpointError(f"missing tokenizer model {path}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model_bytes = path.read_bytes()
        self.max_length = max_length
        try:
            model, charsmap = self._without_normalizer(self.model_bytes, path)
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        except hub.CheckpointError:
            raise
        except (ValueError, IndexError, RuntimeError, struct.error, UnicodeDecodeError) as err:
            raise hub.CheckpointError(f"{path} is not a readable sentencepiece model: {err}") from err
        self._charsmap = _Charsmap(charsmap) if charsmap else None
        n = self._sp.get_piece_size()
        expected = {0: "<pad>", 1: "</s>", 2: "<unk>"}
        found = {i: self._sp.id_to_piece(i) for i in expected if i < n}
        if found != expected or not (self._sp.is_control(0) and self._sp.is_control(1) and self._sp.is_unknown(2)):
            raise hub.CheckpointError(f"{path}: T5 expects pieces 0, 1, 2 = <pad> (control), </s> (control), "
                                      f"<unk> (unknown); found {found}")
        # Special tokens, matched in the raw text before anything else, longest first.
        self.special: dict[str, int] = {self._sp.id_to_piece(i): i for i in range(n)
                                         if self._sp.is_control(i) or self._sp.is_unknown(i)}
        for i in range(extra_ids):
            self.special[f"<extra_id_{i}>"] = n + extra_ids - 1 - i
        self.vocab_size = n + extra_ids
        self._special_starts = {token[0] for token in self.special}
        self._joinable = (self._sp.piece_to_id(_SPACE_MARK) != self.unk_id
                          and not any(_SPACE_MARK in self._sp.id_to_piece(i)[1:] for i in range(n)))
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len,
                                                                                     reverse=True)) + ")")

    @staticmethod
    def _without_normalizer(model: bytes, path: Path) -> tuple[bytes, bytes]:
        """(the model with sentencepiece's normaliser switched off, the precompiled character map).

        Also refuses what transformers would tokenize differently from sentencepiece: non-Unigram models,
        byte fallback, user-defined and unused pieces.
        """
        kept, charsmap = [], b""
        for field, value, raw in _proto_fields(model):
            if field == _MODEL_NORMALIZER:
                for sub, sub_value, _ in _proto_fields(value):
                    if sub == _NORMALIZER_CHARSMAP:
                        charsmap = sub_value
                continue
            if field == _MODEL_SELF_TEST:  # sentencepiece checks these samples on load, with the normaliser on
                continue
            if field == _MODEL_TRAINER:
                for sub, sub_value, _ in _proto_fields(value):
                    if sub == _TRAINER_MODEL_TYPE and sub_value != _UNIGRAM:
                        raise hub.CheckpointError(f"{path}: model type {sub_value}, T5 needs a Unigram model (1)")
                    if sub == _TRAINER_BYTE_FALLBACK and sub_value:
                        raise hub.CheckpointError(f"{path}: byte fallback is not supported (transformers' T5 "
                                                  f"tokenizer turns it off)")
            # A piece's type is its last field and is written only when not NORMAL: read the few others fully.
            if field == _MODEL_PIECES and len(value) > 1 and value[-2] == _PIECE_TYPE << 3:
                piece = {sub: sub_value for sub, sub_value, _ in _proto_fields(value)}
                kind, text = piece.get(_PIECE_TYPE, _PIECE_NORMAL), piece.get(_PIECE_TEXT, b"")
                if kind not in (_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL):
                    raise hub.CheckpointError(f"{path}: piece {text.decode('utf-8', 'replace')!r} has type {kind}; "
                                              f"only normal, unknown and control pieces are supported")
            kept.append(raw)
        kept.append(bytes([(_MODEL_NORMALIZER << 3) | 2, len(_IDENTITY_NORMALIZER)]) + _IDENTITY_NORMALIZER)
        return b"".join(kept), charsmap

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, max_length: int = 512) -> "T5Tokenizer":
        path = Path(folder) / SPIECE
        if not path.is_file():
            raise hub.CheckpointError(f"no {SPIECE} in {folder}: the T5 tokenizer needs the sentencepiece model "
                                      f"that transformers T5 folders keep at their root")
        return cls(path, max_length=max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, </s> appended, not truncated."""
        ids: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:  # the special tokens sit at the odd places of re.split's output
                ids.append(self.special[part])
            else:
                ids.extend(self._encode_text(part))
        return ids + [self.eos_id]

    def _encode_text(self, text: str) -> list[int]:
        """Steps 2-4 of the pipeline (see above) on text without special tokens."""
        if self._charsmap is not None:
            text = self._charsmap.normalize(text)
        segments = []  # "▁"-led segments: transformers runs its Unigram model on each one separately
        for word in _WHITESPACE.split(text):
            if word:
                word = word if word.startswith(_SPACE_MARK) else _SPACE_MARK + word
                segments.extend(_SPACE_MARK + segment for segment in word[1:].split(_SPACE_MARK))
        # When "▁" is a piece and no piece holds "▁" past its start, every segmentation breaks before each "▁",
        # so one sentencepiece call on the joined segments gives the same ids (and is several times faster).
        chunks = ["".join(segments)] if self._joinable else segments
        ids = []
        for chunk in chunks:
            # Special tokens that the normalisation made (e.g. "＜/s＞" -> "</s>") are vocabulary entries with the
            # best possible score, 0, in transformers' Unigram model: they always win.
            parts = self._special_re.split(chunk) if self._special_starts & set(chunk) else [chunk]
            chunk_ids: list[int] = []
            for j, part in enumerate(parts):
                for i in ([self.special[part]] if j % 2 else self._sp.encode(part) if part else []):
                    # transformers fuses a run of unknowns into one <unk> (the <unk> token included);
                    # sentencepiece does so within each call.
                    if not (i == self.unk_id and chunk_ids and chunk_ids[-1] == self.unk_id):
                        chunk_ids.append(i)
            ids.extend(chunk_ids)
        return ids

    def __call__(self, prompts: Sequence[str], *, max_length: int | None = None,
                 padding: str = "longest") -> tuple[Tensor, Tensor]:
        """-> input_ids (B, L) int64, attention_mask (B, L) int64 (1 = token, 0 = padding).

        Prompts longer than `max_length` (default `self.max_length`) tokens are truncated, with a warning, to
        their first max_length - 1 tokens + </s>. `padding="longest"` pads to the longest prompt,
        `"max_length"` to `max_length`; padding is <pad> = 0 on the right.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}"
                            + (" (wrap a single prompt in a list)" if isinstance(prompts, str) else ""))
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt (an empty string is a valid prompt)")
        bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a str; got (index, type) {bad[:5]}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        limit = self.max_length if max_length is None else max_length
        if limit < 1:
            raise ValueError(f"max_length must be >= 1, got {limit}")
        rows = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > limit:
                warnings.warn(f"prompt {i} is {len(ids)} tokens long, more than max_length={limit}: truncated to "
                              f"its first {limit - 1} tokens + </s>", stacklevel=2)
                ids = ids[:limit - 1] + [self.eos_id]
            rows.append(ids)
        width = limit if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=torch.int64)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
        return input_ids, attention_mask
