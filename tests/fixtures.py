"""Builders that several test files share: a sentencepiece model, the tiny MusicGen pipeline, and the tiny
transformers MusicGen checkpoints of the parity tests.

Plain functions; each test file keeps its own pytest fixtures (scope, folder name) as thin wrappers around them.
Importable as `fixtures`: tests/ has no __init__.py, so pytest puts it on sys.path for tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import torch

from musiclm_core import hub
from musiclm_core.musicgen import MAX_DURATION

WORDS = ("the a of and with music song track drums bass guitar synth piano violin beat tempo loud soft calm "
         "happy sad pop rock jazz electronic melody rhythm vocals ambient dark bright warm 80s 90s funk").split()


def train_spm(folder: Path, *, lines: int, vocab_size: int, words: list[str] = WORDS, max_words: int = 10) -> Path:
    """Train a small unigram sentencepiece model (T5's ids: pad 0, eos 1, unk 2, no bos) on `lines` random
    phrases of 2..`max_words` music words, in a blink; writes folder/spiece.model and returns `folder`."""
    import sentencepiece as spm

    rng = random.Random(0)
    phrases = [" ".join(rng.choice(words) for _ in range(rng.randint(2, max_words))) for _ in range(lines)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(phrases), model_prefix=str(folder / "spiece"),
                                   model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Our tiny pipeline: T5 (tiny preset) + an EnCodec at 3200 Hz with 4 codebooks of 2048 entries + a 2-layer LM


def tiny_t5_and_codec(tokenizer, *, ratios: tuple[int, int] = (2, 2), bandwidth: float = 35.2):
    """(T5Encoder, EnCodec), seeded. ratios (2, 2): hop 4, 800 frames/s, and 35.2 kbps = 4 codebooks x 11 bits
    x 800; ratios (8, 8) with 2.2 kbps: hop 64, 50 frames/s (as the official 32 kHz codec)."""
    from musiclm_core.encodec import EnCodec, EnCodecConfig
    from musiclm_core.t5 import PRESETS, T5Encoder

    torch.manual_seed(0)
    t5 = T5Encoder(PRESETS["tiny"]).eval()
    t5.tokenizer = tokenizer
    codec = EnCodec(EnCodecConfig(sample_rate=3200, num_filters=4, ratios=ratios, dimension=16, codebook_size=2048,
                                  target_bandwidths=(bandwidth,), lstm_layers=1)).eval()
    return t5, codec


def tiny_musicgen(tokenizer, *, channels: int = 1, ratios: tuple[int, int] = (2, 2), bandwidth: float = 35.2,
                  max_duration: float = MAX_DURATION):
    """A random MusicGen (T5 and EnCodec of `tiny_t5_and_codec`, a 2-layer LM with 4 codebooks per channel)."""
    from musiclm_core.musicgen import MusicGen, MusicGenConfig, MusicGenLM

    t5, codec = tiny_t5_and_codec(tokenizer, ratios=ratios, bandwidth=bandwidth)
    lm = MusicGenLM(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, num_codebooks=4 * channels,
                                   audio_channels=channels, text_dim=32, max_positions=256)).eval()
    return MusicGen(lm, codec, t5, max_duration=max_duration)


# ---------------------------------------------------------------------------------------------------------------
# transformers' tiny MusicGen / MusicGen Melody checkpoints (the parity tests)


def tiny_reference_config(config_class, decoder_class, channels: int):
    """transformers' composite config (MusicgenConfig or MusicgenMelodyConfig, with its decoder config class) at
    a tiny size: T5 of width 32, an EnCodec at 3200 Hz (hop 4) and a 2-layer decoder with 4 codebooks a channel."""
    from transformers import EncodecConfig, T5Config

    t5 = T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, feed_forward_proj="relu")
    # 2048-entry codebooks as the official codec; 35.2 kbps at 800 frames/s = 4 codebooks of 11 bits.
    codec = EncodecConfig(sampling_rate=3200, audio_channels=1, hidden_size=16, num_filters=4,
                          upsampling_ratios=[2, 2], codebook_size=2048, target_bandwidths=[35.2],
                          num_lstm_layers=1, use_causal_conv=False, use_conv_shortcut=False, normalize=False)
    decoder = decoder_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                            num_codebooks=4 * channels, audio_channels=channels, vocab_size=2048,
                            max_position_embeddings=512)
    return config_class(text_encoder=t5.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict())


def save_reference(model, folder: Path, spm_model: Path, *, max_shard_size: str = "50GB") -> Path:
    """Write transformers' `model` as the hub repos hold it: the official generation_config.json
    (specs/musicgen.md 1.6), and the T5 tokenizer at the root of the repo. The default max_shard_size is
    transformers' own (one file)."""
    model.generation_config.update(decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048,
                                   do_sample=True, guidance_scale=3.0, max_length=1500)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    shutil.copy(spm_model, folder / "spiece.model")
    return folder


@contextlib.contextmanager
def decoded_codes(hf):
    """Within the block, every codes tensor transformers' `hf.generate` hands to its audio decoder is appended
    to the list this yields (stereo: one call for the left rows, one for the right)."""
    captured = []
    decode = hf.audio_encoder.decode

    def capture(codes, *args, **kw):
        captured.append(codes.clone())
        return decode(codes, *args, **kw)

    hf.audio_encoder.decode = capture
    try:
        yield captured
    finally:
        del hf.audio_encoder.decode


@torch.no_grad()
def hf_generated_codes(hf, K: int, **kwargs) -> torch.Tensor:
    """Run transformers' `hf.generate` and return the codes (B, K, T) it hands to the audio decoder (the delay
    pattern already undone)."""
    with decoded_codes(hf) as captured:
        hf.generate(**kwargs)
    if K == 4:
        return captured[0][0]
    left, right = captured  # stereo: rows ::2 decoded as the left channel, 1::2 as the right
    out = torch.empty(left.shape[1], K, left.shape[-1], dtype=torch.long)
    out[:, ::2], out[:, 1::2] = left[0], right[0]
    return out


class ReferencePair:
    """transformers' model (`hf_class`) and our LM (through `convert`), read from the same checkpoint folder."""

    def __init__(self, folder: Path, hf_class, convert):
        self.folder = folder
        self.hf = hf_class.from_pretrained(folder).eval()
        self.lm = convert.load_transformers(hub.read_json(folder / "config.json"),
                                            convert.lm_part(hub.load_state_dict(folder)), source=str(folder))
        self.K = self.lm.config.num_codebooks

    @torch.no_grad()
    def text(self, ids, mask):
        return self.hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    def hf_codes(self, **kwargs):
        return hf_generated_codes(self.hf, self.K, **kwargs)


def padded_prompts(seed: int, B: int = 2, L: int = 7):
    """Random text ids (B, L) and their mask; the last text is shorter (right padding, as the tokenizer does)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 99, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, 4:] = 0
    ids[-1, 4:] = 0
    return ids, mask
