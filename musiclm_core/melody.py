"""MusicGen Melody: the MusicGen LM conditioned on a melody's chroma and on text, both as a prefix.

The melody model has no cross-attention. Its conditioning is prepended to the code embeddings, once, before the
first code (specs/musicgen.md §4.2):

    chroma (B, F, 12) --chroma_proj--> (B, F, D) --tile / cut--> (B, 235, D) -.
    text   (B, Lt, 768) --text_proj--> x mask --> (B, Lt, D) ---------------+--> prefix (B, 235 + Lt, D)
    codes  (B, K, T) --sum_k embedding_k--> (B, T, D) ---------------------------------------------.
                                                                                                   v
    [prefix ; code embeddings] + sinusoid(0 .. 235 + Lt + T - 1) --> MusicGen decoder --> logits of the codes

Positions start at 0 on the first chroma frame; the whole sequence is plainly causal, and nothing in the prefix
is masked (padded text rows are zero vectors but are still attended: transformers does not pass the text mask
to the decoder and audiocraft's `prepend` fuser does the same). "No melody" is one-hot chroma on bin 0 (the
chroma of silence, what audiocraft computes for its null wav), not zeros. The classifier-free-guidance null row
has zero text states (after the projection) and that same null chroma.

The decoder is `MusicGenLM` itself (built with `cross_attention=False`): `MusicGenMelodyLM` adds the chroma
projection and the prefix, and its generation loop is `generate.decode_pattern` with a `step` that prepends the
prefix in the first step and shifts every later position by its length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from musiclm_core import hub, musicgen
from musiclm_core.cache import KVCache
from musiclm_core.chroma import MAX_FRAMES, N_CHROMA, chroma_features, null_chroma
from musiclm_core.encodec import EnCodec
from musiclm_core.kernels import linear
from musiclm_core.musicgen import MAX_DURATION, MusicGen, MusicGenConfig, MusicGenLM, progress_printer
from musiclm_core.t5 import T5Encoder

LM_KIND = "musicgen_melody_lm"  # model names in native config.json files
PIPELINE_KIND = "musicgen_melody"
TRANSFORMERS_MODEL_TYPE = "musicgen_melody"


@dataclass
class MusicGenMelodyConfig:
    lm: MusicGenConfig               # the decoder, with cross_attention=False
    num_chroma: int = N_CHROMA       # pitch classes per chroma frame
    chroma_length: int = MAX_FRAMES  # chroma frames in the prefix: 235 = the STFT frames of 30 s at 32 kHz

    def __post_init__(self):
        if self.lm.cross_attention:
            raise ValueError("a MusicGen Melody LM takes its conditioning as a prefix: its MusicGenConfig must have "
                             "cross_attention=False")
        for name in ("num_chroma", "chroma_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"lm": self.lm.to_dict(), "num_chroma": self.num_chroma, "chroma_length": self.chroma_length}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "MusicGenMelodyConfig":
        """From `to_dict`'s layout; a missing field or a value of the wrong type is a CheckpointError."""
        missing = sorted({"lm", "num_chroma", "chroma_length"} - set(data))
        if missing or not isinstance(data["lm"], dict):
            raise hub.CheckpointError(f"{source}: a MusicGen Melody config needs 'lm' (an object), 'num_chroma' "
                                      f"and 'chroma_length'; missing {missing}")
        hub.check_config(MusicGenConfig, data["lm"], source=f"{source} (lm)")
        for name in ("num_chroma", "chroma_length"):
            hub.check_value(data[name], int, field=name, source=source)
        return cls(MusicGenConfig(**data["lm"]), data["num_chroma"], data["chroma_length"])


PRESETS: dict[str, MusicGenMelodyConfig] = {
    "melody": MusicGenMelodyConfig(MusicGenConfig(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144,
                                                  cross_attention=False)),
    "melody-large": MusicGenMelodyConfig(MusicGenConfig(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192,
                                                        cross_attention=False)),
    "stereo-melody": MusicGenMelodyConfig(MusicGenConfig(dim=1536, num_layers=48, num_heads=24, ffn_dim=6144,
                                                         num_codebooks=8, audio_channels=2, cross_attention=False)),
    "stereo-melody-large": MusicGenMelodyConfig(MusicGenConfig(dim=2048, num_layers=48, num_heads=32, ffn_dim=8192,
                                                               num_codebooks=8, audio_channels=2,
                                                               cross_attention=False)),
    "tiny": MusicGenMelodyConfig(MusicGenConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=256, text_dim=32,
                                                max_positions=512, cross_attention=False)),
}


class MusicGenMelodyLM(MusicGenLM):
    """`MusicGenLM` without cross-attention plus the chroma projection; conditioning goes in as a prefix.

    `self.config` is the decoder's `MusicGenConfig` (what the generation code reads); `self.melody_config` the
    whole `MusicGenMelodyConfig`.
    """

    def __init__(self, config: MusicGenMelodyConfig):
        super().__init__(config.lm)
        self.melody_config = config
        self.chroma_proj = nn.Linear(config.num_chroma, config.lm.dim)  # with bias, like the text projection

    def prefix(self, chroma: Tensor, text_states: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """The conditioning prefix (B, chroma_length + Lt, D): projected chroma tiled or cut to chroma_length
        frames, then the projected text states times their mask (Lt = 0 without text).

        chroma: (B, F, num_chroma) one-hot frames (`chroma.chroma_features`, or `chroma.null_chroma` for none).
        text_states: (B, Lt, text_dim) text encoder states; text_mask (B, Lt), 1 = token (default: all ones).
        """
        c = self.melody_config
        if not isinstance(chroma, Tensor) or chroma.dim() != 3 or chroma.shape[-1] != c.num_chroma \
                or 0 in chroma.shape:
            raise ValueError(f"chroma must be a (B, F >= 1, {c.num_chroma}) tensor, got "
                             f"{tuple(chroma.shape) if isinstance(chroma, Tensor) else type(chroma).__name__}")
        B, F, _ = chroma.shape
        # Tiling after the projection gives the same numbers as before it (the projection is per frame) and is
        # what transformers does (G17); frames past chroma_length are cut.
        h = self.chroma_proj(chroma.to(device=self.device, dtype=self.dtype))  # (B, F, D)
        h = h.repeat(1, math.ceil(c.chroma_length / F), 1)[:, : c.chroma_length]  # (B, chroma_length, D)
        if text_states is None:
            if text_mask is not None:
                raise ValueError("text_mask given without text_states")
            return h
        if text_states.dim() != 3 or text_states.shape[0] != B or text_states.shape[-1] != self.config.text_dim:
            raise ValueError(f"text_states must be (B={B}, Lt, {self.config.text_dim}) to go with chroma "
                             f"{tuple(chroma.shape)}, got {tuple(text_states.shape)}")
        Lt = text_states.shape[1]
        if text_mask is None:
            text_mask = torch.ones(B, Lt, dtype=torch.long)
        if tuple(text_mask.shape) != (B, Lt):
            raise ValueError(f"text_mask must be (B, Lt) = {(B, Lt)}, got {tuple(text_mask.shape)}")
        mask = text_mask.to(device=self.device, dtype=self.dtype)[..., None]  # (B, Lt, 1)
        # The mask multiplies after the projection, whose bias would otherwise leak into padded rows (G7).
        text = self.text_proj(text_states.to(device=self.device, dtype=self.dtype)) * mask  # (B, Lt, D)
        return torch.cat([h, text], dim=1)  # (B, chroma_length + Lt, D)

    def forward(self, codes: Tensor, *, prefix: Tensor | None = None, cache: KVCache | None = None,
                offset: int | Tensor = 0) -> Tensor:
        """Logits (B, K, T, card) of codes (B, K, T).

        prefix (B, P, D), from `prefix`: prepended, at positions offset .. offset + P - 1, and the codes follow
        it; only the codes' logits are returned. Give it once: with a cache, later calls pass the codes alone
        at offset P + (their column).
        """
        x = self.embed(codes)  # (B, T, D)
        if prefix is None:
            return self.forward_embeds(x, cache=cache, offset=offset)
        if prefix.dim() != 3 or prefix.shape[0] != x.shape[0] or prefix.shape[-1] != x.shape[-1]:
            raise ValueError(f"prefix must be (B={x.shape[0]}, P, {x.shape[-1]}), got {tuple(prefix.shape)}")
        P = prefix.shape[1]
        logits = self.forward_embeds(torch.cat([prefix.to(x.dtype), x], dim=1), cache=cache, offset=offset)
        return logits[:, :, P:]  # (B, K, T, card)

    # -----------------------------------------------------------------------------------------------------------
    # Checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, variant: str | None = None,
                        layout: str | None = None) -> "MusicGenMelodyLM":
        """A native folder, a transformers MusicGen Melody folder (its LM part) or an audiocraft folder. The fp32
        linears get the layout this CPU multiplies fastest, as `MusicGenLM.from_pretrained` (`linear.relayout`)."""
        from musiclm_core.convert import keys, musicgen_melody as convert

        folder, found = resolve_checkpoint(name_or_path, revision=revision, variant=variant, layout=layout)
        blocked = linear.route() == "blocked"  # relayout copies weights into blocks: read them, do not map them
        if found == "native":
            config, state = hub.load_native(folder, LM_KIND, mmap=not blocked)
            config = MusicGenMelodyConfig.from_dict(config, source=str(folder / "config.json"))
            lm = keys.build(lambda: cls(config), state, source=str(folder), dtype=dtype)
        elif found == "transformers":
            state = convert.read_state(folder, variant=variant, lm_in_memory=blocked)
            lm = convert.load_transformers(hub.read_json(folder / "config.json"), convert.lm_part(state),
                                           source=str(folder), dtype=dtype)
            del state
        else:
            lm = convert.load_audiocraft_file(folder / "state_dict.bin", dtype=dtype)
        return linear.relayout(lm)

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> None:
        musicgen.refuse_quantized(self)
        hub.save_native(folder, LM_KIND, self.melody_config.to_dict(), self.state_dict(), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Generation: the MusicGen delay-pattern loop with a prefix-conditioned step.


def generate_codes(lm: MusicGenMelodyLM, chroma: Tensor, text_states: Tensor | None = None,
                   text_mask: Tensor | None = None, *, num_frames: int | None = None,
                   max_new_tokens: int | None = None, guidance_scale: float | None = 3.0, temperature: float = 1.0,
                   top_k: int = 250, top_p: float = 0.0, do_sample: bool = True,
                   generator: torch.Generator | None = None, progress: Callable[[int, int], None] | None = None,
                   cuda_graph: bool = False) -> Tensor:
    """Codes (B, K, T), delay undone, for B rows of chroma (B, F, 12) and optional text; see `iter_frames`."""
    frames = iter_frames(lm, chroma, text_states, text_mask, num_frames=num_frames, max_new_tokens=max_new_tokens,
                         guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         do_sample=do_sample, generator=generator, progress=progress, cuda_graph=cuda_graph)
    return torch.cat(list(frames), dim=-1)


def iter_frames(lm: MusicGenMelodyLM, chroma: Tensor, text_states: Tensor | None = None,
                text_mask: Tensor | None = None, *, num_frames: int | None = None, max_new_tokens: int | None = None,
                guidance_scale: float | None = 3.0, temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0,
                do_sample: bool = True, generator: torch.Generator | None = None,
                progress: Callable[[int, int], None] | None = None, cuda_graph: bool = False) -> Iterator[Tensor]:
    """Frames (B, K, n), delay undone, yielded as soon as final, for B rows of chroma (B, F, 12) and optional
    text (see `prefix`).

    The length is `num_frames` or `max_new_tokens` (`generate.plan_frames`). Under CFG (guidance_scale > 1) the
    null rows get zero text states and the no-melody chroma (one-hot bin 0, as many frames), as transformers
    builds them. Sampling arguments as `generate.logits_to_next`; `cuda_graph` as `generate.decode_pattern`.
    """
    from musiclm_core import generate as gen

    gen.check_sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                       do_sample=do_sample)
    if not isinstance(chroma, Tensor) or chroma.dim() != 3:
        raise ValueError(f"chroma must be a (B, F, 12) tensor, got "
                         f"{tuple(chroma.shape) if isinstance(chroma, Tensor) else type(chroma).__name__}")
    config = lm.config
    B, F, _ = chroma.shape
    delays, T = gen.plan_frames(config.delays, 0, num_frames=num_frames, max_new_tokens=max_new_tokens)
    rows = 2 * B if gen.uses_cfg(guidance_scale) else B
    # the prefix (chroma tiled or cut to chroma_length frames, then the text) + the pattern
    steps = lm.melody_config.chroma_length + (0 if text_states is None else text_states.shape[1]) + T + max(delays) + 1
    gen.check_memory(lm, rows, steps, what=f"max_new_tokens={max_new_tokens}" if num_frames is None else
                     f"{num_frames} frames")
    pattern = gen.build_pattern(None, B, config.num_codebooks, T, delays, config.special, lm.device)  # (B, K, S)
    S = pattern.shape[-1]
    cfg = gen.uses_cfg(guidance_scale)
    with torch.no_grad():
        if cfg:  # rows [cond; null]
            null = null_chroma(B, F, device=chroma.device, dtype=chroma.dtype)
            chroma = torch.cat([chroma, null])
            if text_states is not None:
                if text_mask is None:
                    text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
                text_states = torch.cat([text_states, torch.zeros_like(text_states)])
                text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])
        prefix = lm.prefix(chroma, text_states, text_mask)  # (B', P, D)
        P = prefix.shape[1]
        lm.ensure_positions(P + S)  # decode steps pass their offset as a tensor: make the table up front
        cache = lm.new_cache(prefix.shape[0], P + S - 1)  # the last column is never fed

    def step(tokens: Tensor, position: int | Tensor) -> Tensor:
        if isinstance(position, int):  # the first call: the prefix, then every column before the first free one
            return lm(tokens, prefix=prefix, cache=cache, offset=0)[:, :, -1]
        return lm(tokens, cache=cache, offset=position + P)[:, :, -1]  # one column, after the prefix

    yield from gen.decode_pattern(step, pattern, delays, guidance_scale=guidance_scale if cfg else None,
                                  temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                                  generator=generator, progress=progress, cuda_graph=cuda_graph)


# ---------------------------------------------------------------------------------------------------------------
# Stem separation (optional): audiocraft runs Demucs before the chroma so that drums and bass, which dominate a
# mixture's chroma without carrying the melody, are left out.

DEMUCS_MODEL = "htdemucs"  # audiocraft's ChromaStemConditioner
MELODY_STEMS = ("vocals", "other")  # what is kept; "drums" and "bass" are dropped


def load_separator(name: str = DEMUCS_MODEL) -> nn.Module:
    """A pretrained Demucs model (downloaded by demucs on first use)."""
    try:
        from demucs.pretrained import get_model
    except ImportError as err:
        raise ImportError(f"separate_stems=True needs Demucs, which is not installed: `pip install demucs` (it "
                          f"downloads the {name!r} model on first use), or pass separate_stems=False") from err
    return get_model(name).eval()


def extract_melody_stems(wav: Tensor, sample_rate: int, separator: nn.Module) -> tuple[Tensor, int]:
    """Mixture (C, N) or (N,) at `sample_rate` -> its melodic stems (vocals + other) summed and averaged to mono,
    (1, N') at the separator's rate, and that rate."""
    from demucs.apply import apply_model

    from musiclm_core.audio import convert_channels, resample

    x = wav[None] if wav.dim() == 1 else wav  # (C, N)
    x = convert_channels(x.float(), separator.audio_channels)
    x = resample(x, sample_rate, separator.samplerate)
    with torch.no_grad():
        stems = apply_model(separator, x[None], device=x.device)[0]  # (stems, C, N')
    keep = [separator.sources.index(name) for name in MELODY_STEMS]
    return stems[keep].sum(dim=0).mean(dim=0, keepdim=True), separator.samplerate  # (1, N')


# ---------------------------------------------------------------------------------------------------------------
# The pipeline

Melody = Tensor | Sequence[Tensor | None]


class MusicGenMelody(MusicGen):
    """Text + melody to music: chroma and T5 states as a prefix -> MusicGen LM -> EnCodec decoder.

    >>> mel = MusicGenMelody.from_pretrained("facebook/musicgen-melody")
    >>> wav = mel.generate(["80s pop with synths"], melody=tune, melody_sample_rate=44100, duration=8.0)

    The MusicGen pipeline with the melody LM: `decode_codes`, `sample_rate` etc. are MusicGen's. One window only
    (duration <= max_duration, 30 s), no audio prompt.
    """

    kind = PIPELINE_KIND  # MusicGen's from_pretrained / save_pretrained read these three
    lm_class = MusicGenMelodyLM
    transformers_model_type = TRANSFORMERS_MODEL_TYPE

    def __init__(self, lm: MusicGenMelodyLM, codec: EnCodec, text_encoder: T5Encoder, *,
                 max_duration: float = MAX_DURATION):
        if not isinstance(lm, MusicGenMelodyLM):
            raise ValueError(f"MusicGenMelody needs a MusicGenMelodyLM, got {type(lm).__name__}")
        super().__init__(lm, codec, text_encoder, max_duration=max_duration)
        self._separator: nn.Module | None = None  # Demucs, loaded on the first separate_stems=True

    # -- melody -> chroma -------------------------------------------------------------------------------------

    def melody_chroma(self, melody: Melody | None, melody_sample_rate: int | None, batch_size: int, *,
                      separate_stems: bool = False) -> Tensor:
        """One-hot chroma (batch_size, F, 12) of one melody per prompt; rows without a melody get bin 0.

        melody: (B, C, N) tensor, one (C, N) / (N,) melody (B must be 1), or a list of B such tensors or None
            (no melody for that prompt); different lengths are right-padded (their tail frames are bin 0).
        melody_sample_rate: its rate in Hz (default: the model's); the chroma is computed at 32 kHz.
        """
        if not isinstance(separate_stems, bool):
            raise ValueError(f"separate_stems must be True or False, got {separate_stems!r}")
        if melody is None:
            return null_chroma(batch_size, 1, device=self.device)
        if isinstance(melody, Tensor):
            if melody.dim() not in (1, 2, 3):
                raise ValueError(f"melody must be (B, C, N), (C, N) or (N,), got shape {tuple(melody.shape)}")
            items = list(melody) if melody.dim() == 3 else [melody]
        elif isinstance(melody, Sequence) and not isinstance(melody, (str, bytes)):
            items = list(melody)
        else:
            raise ValueError(f"melody must be a tensor or a list of tensors (or None), got {type(melody).__name__}")
        if len(items) != batch_size:
            raise ValueError(f"{len(items)} melodies for {batch_size} prompt(s): give one melody per prompt (a "
                             f"(B, C, N) tensor or a list of B tensors, None for no melody)")
        rate = self.sample_rate if melody_sample_rate is None else melody_sample_rate
        present = [i for i, item in enumerate(items) if item is not None]
        if not present:
            return null_chroma(batch_size, 1, device=self.device)
        wavs = [items[i] for i in present]
        if separate_stems:
            if self._separator is None:
                self._separator = load_separator()
            separated = [extract_melody_stems(w, rate, self._separator) for w in wavs]
            wavs, rate = [w for w, _ in separated], separated[0][1]
        chroma = chroma_features(wavs, rate).to(self.device)  # (len(present), F, 12)
        out = null_chroma(batch_size, chroma.shape[1], device=self.device)
        out[present] = chroma
        return out

    # -- generation -------------------------------------------------------------------------------------------

    def generate_codes(self, prompts: Sequence[str] | None, *, melody: Melody | None = None,
                       melody_sample_rate: int | None = None, duration: float | None = None,
                       max_new_tokens: int | None = None, guidance_scale: float = 3.0, top_k: int = 250,
                       top_p: float = 0.0, temperature: float = 1.0, do_sample: bool = True,
                       seed: int | None = None, num_samples: int | None = None, separate_stems: bool = False,
                       progress: bool | Callable[[int, int], None] = False, cuda_graph: bool = False) -> Tensor:
        """Codes (B, K, T), delay undone. See `generate` for the arguments."""
        frames = self._frames(prompts, melody=melody, melody_sample_rate=melody_sample_rate, duration=duration,
                              max_new_tokens=max_new_tokens, guidance_scale=guidance_scale, top_k=top_k,
                              top_p=top_p, temperature=temperature, do_sample=do_sample, seed=seed,
                              num_samples=num_samples, separate_stems=separate_stems, progress=progress,
                              cuda_graph=cuda_graph)
        return torch.cat(list(frames), dim=-1)

    def _frames(self, prompts: Sequence[str] | None, *, melody: Melody | None, melody_sample_rate: int | None,
                duration: float | None, max_new_tokens: int | None, guidance_scale: float, top_k: int,
                top_p: float, temperature: float, do_sample: bool, seed: int | None, num_samples: int | None,
                separate_stems: bool, progress: bool | Callable[[int, int], None],
                cuda_graph: bool) -> Iterator[Tensor]:
        """`iter_frames` for the arguments of `generate_codes`, after checking them and making the chroma."""
        from musiclm_core import generate as gen

        gen.check_sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                           do_sample=do_sample, seed=seed)
        total = self.frame_count(duration, max_new_tokens)
        if total is not None and total > int(self.max_duration * self.frame_rate):
            raise ValueError(f"MusicGenMelody generates one window: duration must be <= {self.max_duration} s, "
                             f"got {duration}")
        if prompts is None and num_samples is None and melody is not None:
            num_samples = melody.shape[0] if isinstance(melody, Tensor) and melody.dim() == 3 else \
                (len(melody) if isinstance(melody, Sequence) else 1)
        states, mask, B = self.encode_prompts(prompts, num_samples)
        chroma = self.melody_chroma(melody, melody_sample_rate, B, separate_stems=separate_stems)
        if states is None:
            # No text: transformers' unconditional input, the empty prompt ("" -> "</s>") masked out, which is
            # one zero vector after the projection and mask (audiocraft's null description is the same).
            states = torch.zeros(B, 1, self.lm.config.text_dim, device=self.device)
            mask = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            if not chroma[..., 1:].any():  # no melody either (or silence): the condition is the null one, and
                guidance_scale = None       # CFG would compare it with itself
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        callback = progress_printer() if progress is True else (progress or None)
        return iter_frames(self.lm, chroma, states, mask, num_frames=total, max_new_tokens=max_new_tokens,
                           guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                           do_sample=do_sample, generator=generator, progress=callback, cuda_graph=cuda_graph)

    def generate(self, prompts: Sequence[str] | None, *, melody: Melody | None = None,
                 melody_sample_rate: int | None = None, duration: float | None = None,
                 max_new_tokens: int | None = None, guidance_scale: float = 3.0, top_k: int = 250,
                 top_p: float = 0.0, temperature: float = 1.0, do_sample: bool = True, seed: int | None = None,
                 num_samples: int | None = None, separate_stems: bool = False,
                 progress: bool | Callable[[int, int], None] = False, cuda_graph: bool = False) -> Tensor:
        """Audio (B, C, N) at `sample_rate` following the melody (if any) and the text prompts.

        prompts: B texts, or None for no text (`num_samples` pieces, default one per melody).
        melody: one per prompt (see `melody_chroma`); None = no melody (one-hot chroma bin 0). Any channels
            (averaged), any rate (`melody_sample_rate`, default the model's), at most 30 s are used.
        separate_stems: drop drums and bass with Demucs before the chroma, as audiocraft does (needs
            `pip install demucs`).
        duration: seconds (int(duration * frame_rate) frames, at most max_duration); or max_new_tokens
            (transformers' count of decoder steps). Sampling arguments, seed and cuda_graph as
            `MusicGen.generate`.
        """
        codes = self.generate_codes(prompts, melody=melody, melody_sample_rate=melody_sample_rate,
                                    duration=duration, max_new_tokens=max_new_tokens,
                                    guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                                    temperature=temperature, do_sample=do_sample, seed=seed,
                                    num_samples=num_samples, separate_stems=separate_stems, progress=progress,
                                    cuda_graph=cuda_graph)
        return self.decode_codes(codes)

    def stream(self, prompts: Sequence[str] | None, *, melody: Melody | None = None,
               melody_sample_rate: int | None = None, duration: float = 10.0, chunk_duration: float = 1.0,
               context_duration: float = 2.0, guidance_scale: float = 3.0, top_k: int = 250, top_p: float = 0.0,
               temperature: float = 1.0, do_sample: bool = True, seed: int | None = None,
               num_samples: int | None = None, separate_stems: bool = False,
               cuda_graph: bool = False) -> Iterator[Tensor]:
        """Yield audio chunks (B, C, n) while generating; chunks as `MusicGen.stream`, the rest as `generate`."""
        chunk, context = self._stream_sizes(chunk_duration, context_duration)
        frames = self._frames(prompts, melody=melody, melody_sample_rate=melody_sample_rate, duration=duration,
                              max_new_tokens=None, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                              temperature=temperature, do_sample=do_sample, seed=seed, num_samples=num_samples,
                              separate_stems=separate_stems, progress=False, cuda_graph=cuda_graph)
        yield from self._decode_stream(frames, self.frame_count(duration, None), chunk, context)

    # -- checkpoints ------------------------------------------------------------------------------------------
    # `MusicGen.from_pretrained` reads a transformers MusicGen Melody repo or folder (`facebook/musicgen-melody`,
    # `-melody-large`, `musicgen-stereo-melody*`), an audiocraft folder or a native folder with this converter.

    @classmethod
    def lm_converter(cls) -> ModuleType:
        from musiclm_core.convert import musicgen_melody as convert

        return convert


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       variant: str | None = None, layout: str | None = None) -> tuple[Path, str]:
    """(folder, layout) of a MusicGen Melody checkpoint: `musicgen.resolve_checkpoint` for transformers'
    model_type "musicgen_melody"."""
    return musicgen.resolve_checkpoint(name_or_path, revision=revision, variant=variant, layout=layout,
                                       model_type=TRANSFORMERS_MODEL_TYPE)
