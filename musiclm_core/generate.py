"""Generation with the MusicGen LM: small pure pieces, then the delay-pattern loop that chains them.

    logits (2B, K, V) --cfg_combine--> (B, K, V) --temperature, top_k, top_p--> softmax --> multinomial
                                                                   (greedy: argmax of the guided logits)

The loop (`decode_pattern`, driven by `iter_frames` / `generate_codes`) follows transformers'
`MusicgenForConditionalGeneration.generate` step for step, so that greedy decoding is token-identical and seeded sampling draws the same random numbers:

1. The frames to produce (audio prompt frames first, then unknown ones) are laid out with the delay pattern
   (`delay.apply_delay`); slots holding -1 are generated, every other slot (BOS, pads, prompt) is forced.
2. Classifier-free guidance runs the conditional rows and the null-text rows as one batch [cond; null].
3. The first step feeds every column before the first free one (BOS and prompt) at once (`prefill`); each
   later step feeds one column (`decode_one_step`) against a static `KVCache`.
4. Every column is sampled for all K rows (forced slots are then overwritten), as transformers does.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import Tensor

from musiclm_core.cache import CrossMemory, KVCache
from musiclm_core.delay import apply_delay

if TYPE_CHECKING:
    from musiclm_core.musicgen import MusicGenLM

FREE = -1  # marks a slot of the pattern that is to be generated

# ---------------------------------------------------------------------------------------------------------------
# Sampling pieces (transformers' logits processors, in its order)


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits (negative seeds wrap around: refused here)


def check_sampling(*, guidance_scale: float | None, temperature: float, top_k: int, top_p: float,
                   do_sample: bool, seed: int | None = None) -> None:
    """Raise ValueError for sampling settings that cannot be used.

    Conventions: CFG is on when guidance_scale > 1 (transformers); top_k = 0 is off; top_p = 1.0 is off
    (transformers) and top_p = 0.0 is off too (audiocraft's default), anything in (0, 1) keeps the smallest set
    of tokens whose probability reaches top_p; temperature must be > 0 when sampling; seed is None or in
    [0, SEED_MAX].
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1 = {SEED_MAX}], got {seed!r}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not math.isfinite(guidance_scale)
                                       or guidance_scale < 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (CFG is on above 1), got {guidance_scale!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0 and 1 = off), got {top_p!r}")
    if do_sample and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                      or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling (use do_sample=False for "
                         f"greedy decoding), got {temperature!r}")


def uses_cfg(guidance_scale: float | None) -> bool:
    return guidance_scale is not None and guidance_scale > 1


def cfg_combine(logits: Tensor, guidance_scale: float) -> Tensor:
    """(2B, ...) logits of rows [cond; null] -> (B, ...) fp32 `uncond + s * (cond - uncond)` (G9)."""
    cond, uncond = logits.float().chunk(2, dim=0)
    return uncond + (cond - uncond) * guidance_scale


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Scores below the k-th largest of each row -> -inf. Ties with the k-th are kept (transformers' TopK)."""
    kth = torch.topk(scores, min(k, scores.shape[-1]), dim=-1).values[..., -1:]  # (..., 1)
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability sum reaches p (transformers' TopP).

    Tokens are sorted in ascending order; those whose cumulative probability stays <= 1 - p are removed, and the
    most likely token is always kept.
    """
    ordered, order = torch.sort(scores, dim=-1, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def logits_to_next(logits: Tensor, *, guidance_scale: float | None = None, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """Last-position logits (B or 2B under CFG, K, V) -> next tokens (B, K).

    Order and arithmetic as transformers: fp32, CFG, then (sampling only) temperature, top-k, top-p, softmax and
    one `torch.multinomial` draw over the (B * K, V) rows; greedy takes the argmax of the guided logits.
    """
    scores = cfg_combine(logits, guidance_scale) if uses_cfg(guidance_scale) else logits.float()
    B, K, V = scores.shape
    scores = scores.reshape(B * K, V)  # rows batch-major, codebook-minor: transformers' order (and RNG draws)
    if not do_sample:
        return scores.argmax(dim=-1).view(B, K)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        scores = top_k_filter(scores, top_k)
    if 0.0 < top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(B, K)


# ---------------------------------------------------------------------------------------------------------------
# Model steps


def prefill(lm: MusicGenLM, steps: Tensor, *, memory: CrossMemory | None, cache: KVCache) -> Tensor:
    """Feed columns 0 .. T0-1 (B', K, T0) into an empty cache; logits (B', K, V) of the last one."""
    return lm(steps, memory=memory, cache=cache, offset=0)[:, :, -1]


def decode_one_step(lm: MusicGenLM, column: Tensor, offset: Tensor, *, memory: CrossMemory | None,
                    cache: KVCache) -> Tensor:
    """Feed one column (B', K, 1) at position `offset` (0-dim tensor: static inputs); logits (B', K, V)."""
    return lm(column, memory=memory, cache=cache, offset=offset)[:, :, -1]


class GraphedStep:
    """A `step(tokens, position)` whose one-column calls replay a CUDA graph (DESIGN.md: static decode step).

    At batch 1 every op of a decode step is a small kernel whose launch costs about as much CPU time as the
    kernel takes on the GPU; a graph launches them all at once (H200, bf16: a MusicGen small step 12-26 ms
    eager, 2.0 ms replayed; large 27 / 4.8 ms; benchmarks/RESULTS.md, seventh session). The static `KVCache`
    and `CrossMemory` and the position passed as a 0-dim tensor (read on the device by the attention kernels) are
    what make one capture valid for every later step. The prefill (an int position, a chunk of columns) runs
    eagerly. The first decode call runs the step twice on a side stream (Triton compiles, cuBLAS picks its
    kernels; both runs write the same cache slot with the values the real step writes), then captures it; later
    calls copy their column and position into the graph's inputs and replay. The logits returned live in the
    graph's output buffer: use them before the next call (decode_pattern samples from them at once).

    One instance per generation: the graph holds that generation's cache and memory. The diffusion pipelines use
    it for their UNet call in the same way (ldm.LatentDiffusion.denoise: the latents as `tokens`, the timestep as
    `position`, the conditioning held by the step in buffers of its own), and keep it for their next generation of
    the same shapes (`_graphed_noise`).
    """

    def __init__(self, step: Callable[[Tensor, int | Tensor], Tensor]):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens = self.position = self.logits = None  # the graph's static input and output buffers

    def __call__(self, tokens: Tensor, position: int | Tensor) -> Tensor:
        if isinstance(position, int):
            return self.step(tokens, position)
        if self.graph is None:
            if not tokens.is_cuda:
                raise ValueError(f"CUDA graphs need the model on a CUDA device, the tokens are on {tokens.device}")
            self.tokens, self.position = tokens.clone(), position.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(self.tokens, self.position)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tokens, self.position)
        self.tokens.copy_(tokens)
        self.position.copy_(position)
        self.graph.replay()
        return self.logits


# ---------------------------------------------------------------------------------------------------------------
# Lengths and the pattern


def plan_frames(delays: Sequence[int], prompt_frames: int, *, num_frames: int | None = None,
                max_new_tokens: int | None = None) -> tuple[tuple[int, ...], int]:
    """(delays to use, total frames T incl. the prompt) for a request in frames or in transformers' tokens.

    `num_frames`: T itself (audiocraft's reckoning: duration * frame rate).
    `max_new_tokens`: transformers' reckoning. It counts decoder steps: the pattern is `1 + prompt_frames +
    max_new_tokens` steps long including the BOS step, which holds T = steps - max(delays) - 1 frames. Below
    2 * (max(delays) + 1) - 1 steps transformers applies no delay at all (T = steps - 1); this is kept for parity.
    """
    if (num_frames is None) == (max_new_tokens is None):
        raise ValueError("give exactly one of num_frames and max_new_tokens")
    delays = tuple(delays)
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        frames = num_frames
    else:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        length = 1 + prompt_frames + max_new_tokens
        channel_codebooks = max(delays) + 1
        if length < 2 * channel_codebooks - 1:
            delays = (0,) * len(delays)
        frames = length - max(delays) - 1
    if frames <= prompt_frames:
        raise ValueError(f"{frames} frames in all leave nothing to generate after a prompt of {prompt_frames} "
                         f"frames (with max_new_tokens, ask for at least max(delays) + 1 = {max(delays) + 1})")
    return delays, frames


def check_memory(lm: MusicGenLM, rows: int, steps: int, *, what: str) -> None:
    """ValueError when a generation of `steps` pattern columns for `rows` model rows (2B under CFG) would not fit
    in the memory of the LM's device: checked before anything is allocated, so that a mistyped length (e.g.
    max_new_tokens=10**9) gets a sentence instead of an allocator failure. Counts the KV cache (K and V of every
    layer, every row, every position, in the LM's dtype), the sinusoid table and the int64 pattern and sequence.
    """
    c = lm.config
    itemsize = torch.empty((), dtype=lm.dtype).element_size()
    cache = 2 * c.num_layers * rows * c.dim * (steps + 1) * itemsize  # KVCache: K and V, one spare slot
    need = cache + steps * c.dim * 4 + 2 * rows * c.num_codebooks * steps * 8  # + sinusoids, pattern and seq
    have = device_memory(lm.device)
    if have is not None and need > have:
        raise ValueError(f"{what} needs about {_size(need)} for the decoding state ({steps} steps x {rows} rows: "
                         f"KV cache of {c.num_layers} layers x {c.dim} wide), more than the {_size(have)} of "
                         f"memory on {lm.device}: ask for less")


def device_memory(device: torch.device) -> int | None:
    """Total bytes of memory of `device` (physical RAM for the CPU), or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # not a POSIX system
            return None
    return None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def build_pattern(prompt: Tensor | None, batch_size: int, num_codebooks: int, num_frames: int,
                  delays: Sequence[int], special: int, device: torch.device | None = None) -> Tensor:
    """(B, K, S) pattern: prompt frames and special ids where forced, FREE (-1) where to be generated."""
    frames = torch.full((batch_size, num_codebooks, num_frames), FREE, dtype=torch.long, device=device)
    if prompt is not None:
        frames[:, :, : prompt.shape[-1]] = prompt
    return apply_delay(frames, delays, special)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def iter_frames(lm: MusicGenLM, text_states: Tensor | None = None, text_mask: Tensor | None = None, *,
                batch_size: int | None = None, num_frames: int | None = None, max_new_tokens: int | None = None,
                prompt_codes: Tensor | None = None, guidance_scale: float | None = 3.0, temperature: float = 1.0,
                top_k: int = 250, top_p: float = 0.0, do_sample: bool = True,
                generator: torch.Generator | None = None,
                progress: Callable[[int, int], None] | None = None, cuda_graph: bool = False) -> Iterator[Tensor]:
    """Generate codes, yielding frames (B, K, n) as soon as all their codebooks are final.

    text_states (B, Lt, text_dim) and text_mask (B, Lt) are the text encoder's output for B prompts (padded
    prompts have mask 0 at their padding). Without them the generation is unconditional (the null text of
    transformers' `get_unconditional_inputs`) for `batch_size` rows, and CFG, which would compare the null text
    with itself, is skipped. prompt_codes (B, K, P) are audio-prompt frames to continue; they are yielded
    first. The length is `num_frames` (total, prompt included) or `max_new_tokens` (see `plan_frames`).
    `progress(step, total)` is called after each decoding step. `cuda_graph`: replay each decode step from a
    CUDA graph (the model must be on a CUDA device; see `GraphedStep`).
    """
    check_sampling(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                   do_sample=do_sample)
    config = lm.config
    K = config.num_codebooks
    if text_states is None:
        if text_mask is not None:
            raise ValueError("text_mask given without text_states")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"unconditional generation needs batch_size > 0, got {batch_size!r}")
        B = batch_size
    else:
        if text_states.dim() != 3:
            raise ValueError(f"text_states must be (B, Lt, D), got {tuple(text_states.shape)}")
        B = text_states.shape[0]
        if B == 0:
            raise ValueError("text_states hold no prompt (batch of 0)")
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch_size {batch_size} does not match the {B} rows of text_states")
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
    P = 0
    if prompt_codes is not None:
        if prompt_codes.dim() != 3 or tuple(prompt_codes.shape[:2]) != (B, K):
            raise ValueError(f"prompt_codes must be (B={B}, K={K}, P), got {tuple(prompt_codes.shape)}")
        if prompt_codes.is_floating_point() or prompt_codes.dtype == torch.bool:
            raise ValueError(f"prompt_codes must be integer codes, got {prompt_codes.dtype}")
        if prompt_codes.numel() and (int(prompt_codes.min()) < 0 or int(prompt_codes.max()) >= config.card):
            raise ValueError(f"prompt_codes must lie in [0, {config.card}), got values in "
                             f"[{int(prompt_codes.min())}, {int(prompt_codes.max())}]")
        P = prompt_codes.shape[-1]
    delays, T = plan_frames(config.delays, P, num_frames=num_frames, max_new_tokens=max_new_tokens)
    cfg = uses_cfg(guidance_scale) and text_states is not None
    check_memory(lm, 2 * B if cfg else B, T + max(delays) + 1,
                 what=f"max_new_tokens={max_new_tokens}" if num_frames is None else f"{num_frames} frames")

    device = lm.device
    prompt = None if prompt_codes is None else prompt_codes.to(device=device, dtype=torch.long)
    pattern = build_pattern(prompt, B, K, T, delays, config.special, device)  # (B, K, S)
    S = pattern.shape[-1]

    with torch.no_grad():
        memory = None
        if text_states is not None:
            states, mask = text_states.to(device), text_mask.to(device)
            if cfg:  # the null condition: zero states, all masked (transformers' CFG batch)
                states = torch.cat([states, torch.zeros_like(states)], dim=0)
                mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
            memory = lm.cross_memory(states, mask)
        lm.ensure_positions(S)
        cache = lm.new_cache(2 * B if cfg else B, S - 1)  # the last column is never fed

    def step(tokens: Tensor, position: int | Tensor) -> Tensor:
        if isinstance(position, int):  # the first call: every column before the first free one
            return prefill(lm, tokens, memory=memory, cache=cache)
        return decode_one_step(lm, tokens, position, memory=memory, cache=cache)

    yield from decode_pattern(step, pattern, delays, guidance_scale=guidance_scale if cfg else None,
                              temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                              generator=generator, progress=progress, cuda_graph=cuda_graph)


def decode_pattern(step: Callable[[Tensor, int | Tensor], Tensor], pattern: Tensor, delays: Sequence[int], *,
                   guidance_scale: float | None, temperature: float, top_k: int, top_p: float, do_sample: bool,
                   generator: torch.Generator | None = None, progress: Callable[[int, int], None] | None = None,
                   cuda_graph: bool = False) -> Iterator[Tensor]:
    """Fill the FREE slots of a (B, K, S) pattern column by column; yield frames (B, K, n) once final.

    `step(tokens, position)` runs the model and returns the logits (B', K, V) of its last input column. It is
    called first with every column before the first free one (position 0, an int: the prefill), then with one
    column at a time (position a 0-dim tensor). Under CFG (guidance_scale > 1) the tokens are given twice,
    [cond; null] (B' = 2B), and the logits must come in that order. A model with a conditioning prefix (e.g.
    MusicGen Melody) prepends it in its first step and shifts its positions. `cuda_graph`: the one-column steps
    replay a CUDA graph (`GraphedStep`); the step must then keep static shapes and buffers, as the KV-cache
    steps of this module do.
    """
    if not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
    if cuda_graph:
        if not pattern.is_cuda:
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {pattern.device}")
        step = GraphedStep(step)
    B, K, S = pattern.shape
    T = S - max(delays) - 1
    cfg = uses_cfg(guidance_scale)
    free = (pattern == FREE).any(dim=1).any(dim=0).nonzero()
    if not len(free):
        raise ValueError("the pattern has nothing to generate")
    start = int(free[0])  # 1 + prompt frames
    seq = pattern.clone()
    sent = 0  # frames yielded so far

    def final_frames(filled: int) -> Tensor | None:
        # frame t is final once its most delayed slot, column 1 + t + max(delays), is filled
        nonlocal sent
        final = min(T, max(0, filled - 1 - max(delays)))
        if final <= sent:
            return None
        block = torch.stack([seq[:, k, 1 + d + sent: 1 + d + final] for k, d in enumerate(delays)], dim=1)
        sent = final
        return block  # (B, K, n)

    block = final_frames(start)
    if block is not None:
        yield block
    for s in range(start, S):
        # inference_mode rather than no_grad: no version counters or view tracking, ~10 % less per-call overhead
        # in a CPU decode step of ~5,000 small calls. The cache and `seq` are normal tensors written in place.
        with torch.inference_mode():
            if s == start:
                tokens, position = seq[:, :, :start], 0
            else:
                tokens, position = seq[:, :, s - 1: s], torch.tensor(s - 1, device=seq.device)
            logits = step(torch.cat([tokens, tokens]) if cfg else tokens, position)
            next_tokens = logits_to_next(logits, guidance_scale=guidance_scale, temperature=temperature,
                                         top_k=top_k, top_p=top_p, do_sample=do_sample,
                                         generator=generator)  # (B, K)
            forced = pattern[:, :, s]
            seq[:, :, s] = torch.where(forced == FREE, next_tokens, forced)
        if progress is not None:
            progress(s - start + 1, S - start)
        block = final_frames(s + 1)
        if block is not None:
            yield block


def generate_codes(lm: MusicGenLM, text_states: Tensor | None = None, text_mask: Tensor | None = None, *,
                   batch_size: int | None = None, num_frames: int | None = None,
                   max_new_tokens: int | None = None, prompt_codes: Tensor | None = None,
                   guidance_scale: float | None = 3.0, temperature: float = 1.0, top_k: int = 250,
                   top_p: float = 0.0, do_sample: bool = True, generator: torch.Generator | None = None,
                   progress: Callable[[int, int], None] | None = None, cuda_graph: bool = False) -> Tensor:
    """Codes (B, K, T) with the delay undone and the prompt frames included; arguments as `iter_frames`."""
    frames = iter_frames(lm, text_states, text_mask, batch_size=batch_size, num_frames=num_frames,
                         max_new_tokens=max_new_tokens, prompt_codes=prompt_codes, guidance_scale=guidance_scale,
                         temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                         generator=generator, progress=progress, cuda_graph=cuda_graph)
    return torch.cat(list(frames), dim=-1)
