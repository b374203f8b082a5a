"""Generation pieces and the delay-pattern loop on the tiny MusicGen LM."""

import copy
import math

import pytest
import torch

from musiclm_core import generate as G
from musiclm_core.delay import apply_delay
from musiclm_core.musicgen import PRESETS, MusicGenConfig, MusicGenLM

TEXT = PRESETS["tiny"].text_dim


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MusicGenLM(PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def stereo_lm():
    torch.manual_seed(0)
    return MusicGenLM(MusicGenConfig(dim=32, num_layers=1, num_heads=2, ffn_dim=64, num_codebooks=8,
                                     audio_channels=2, text_dim=TEXT, max_positions=64)).eval()


def _text(B, L=5):
    mask = torch.ones(B, L, dtype=torch.long)
    if B > 1:
        mask[1, 2:] = 0
    return torch.randn(B, L, TEXT), mask


# --------------------------------------------------------------------------------------------------------------
# Sampling pieces


def test_cfg_combine():
    cond, uncond = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    out = G.cfg_combine(torch.cat([cond, uncond]).half(), 3.0)
    assert out.dtype == torch.float32
    assert torch.allclose(out, uncond.half().float() + 3.0 * (cond.half().float() - uncond.half().float()))


def test_top_k_keeps_ties():
    scores = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    out = G.top_k_filter(scores, 2)
    assert torch.equal(torch.isfinite(out), torch.tensor([[False, True, True, True, False]]))
    assert torch.equal(G.top_k_filter(scores, 50), scores)  # k beyond the vocabulary: nothing removed


def test_top_p_is_the_smallest_set_reaching_p():
    torch.manual_seed(3)
    scores = torch.randn(6, 40)
    for p in (0.05, 0.5, 0.9, 0.999):
        kept = torch.isfinite(G.top_p_filter(scores, p))
        probs = scores.softmax(-1)
        for row in range(6):
            order = probs[row].argsort(descending=True)
            mass = probs[row][order].cumsum(0)
            n = int((mass < p - 1e-6).sum()) + 1  # tokens needed to reach p
            assert set(order[:n].tolist()) <= set(kept[row].nonzero().flatten().tolist())
            assert int(kept[row].sum()) <= n + 1  # float rounding at the boundary may keep one more
            assert kept[row].any()


def test_logits_to_next():
    logits = torch.randn(2, 4, 50)
    greedy = G.logits_to_next(logits, do_sample=False)
    assert torch.equal(greedy, logits.argmax(-1))
    # top_k = 1 sampling is greedy; a seeded generator repeats itself
    assert torch.equal(G.logits_to_next(logits, top_k=1), greedy)
    a = G.logits_to_next(logits, generator=torch.Generator().manual_seed(5))
    b = G.logits_to_next(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 4)
    # CFG halves the batch; a huge temperature flattens, a tiny one is greedy
    cfg = G.logits_to_next(torch.cat([logits, torch.zeros_like(logits)]), guidance_scale=3.0, do_sample=False)
    assert torch.equal(cfg, logits.argmax(-1))
    assert torch.equal(G.logits_to_next(logits, temperature=1e-4), greedy)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(guidance_scale=-2.0), "guidance_scale"), (dict(do_sample="yes"), "do_sample")])
def test_check_sampling_errors(kwargs, match):
    args = dict(guidance_scale=3.0, temperature=1.0, top_k=250, top_p=0.0, do_sample=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        G.check_sampling(**args)


def test_check_sampling_accepts():
    G.check_sampling(guidance_scale=None, temperature=0.0, top_k=0, top_p=1.0, do_sample=False)  # greedy
    G.check_sampling(guidance_scale=1.0, temperature=0.7, top_k=0, top_p=0.0, do_sample=True)


# --------------------------------------------------------------------------------------------------------------
# Lengths


def test_plan_frames():
    d = (0, 1, 2, 3)
    assert G.plan_frames(d, 0, num_frames=50) == (d, 50)
    # transformers' bookkeeping (specs/musicgen.md 3.5): 10 new tokens -> 11 steps -> 7 frames
    assert G.plan_frames(d, 0, max_new_tokens=10) == (d, 7)
    assert G.plan_frames(d, 5, max_new_tokens=10) == (d, 12)  # 5 prompt frames: 16 steps -> 12 frames
    assert G.plan_frames(d, 0, max_new_tokens=5) == ((0, 0, 0, 0), 5)  # 6 steps < 7: no delay (transformers)
    stereo = (0, 0, 1, 1, 2, 2, 3, 3)
    assert G.plan_frames(stereo, 0, max_new_tokens=10) == (stereo, 7)
    for kwargs in (dict(num_frames=0), dict(max_new_tokens=0), dict(num_frames=-3), dict(num_frames=2.5)):
        with pytest.raises(ValueError, match="positive integer"):
            G.plan_frames(d, 0, **kwargs)
    with pytest.raises(ValueError, match="exactly one"):
        G.plan_frames(d, 0, num_frames=4, max_new_tokens=4)
    with pytest.raises(ValueError, match="nothing to generate"):
        G.plan_frames(d, 8, num_frames=8)
    with pytest.raises(ValueError, match="nothing to generate"):
        G.plan_frames(d, 8, max_new_tokens=3)


# --------------------------------------------------------------------------------------------------------------
# The loop


def _reference_greedy(lm, text, mask, prompt, T, guidance_scale):
    """Greedy generation the slow, obvious way: full forward without cache on the whole prefix each step."""
    B, K = text.shape[0], lm.config.num_codebooks
    pattern = G.build_pattern(prompt, B, K, T, lm.config.delays, lm.config.special)
    seq = pattern.clone()
    cfg = guidance_scale > 1
    states, m = (torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)])) if cfg \
        else (text, mask)
    memory = lm.cross_memory(states, m)
    start = 1 + (0 if prompt is None else prompt.shape[-1])
    with torch.no_grad():
        for s in range(start, seq.shape[-1]):
            x = seq[:, :, :s]
            logits = lm(torch.cat([x, x]) if cfg else x, memory=memory)[:, :, -1].float()
            if cfg:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cond - uncond) * guidance_scale
            seq[:, :, s] = torch.where(pattern[:, :, s] == -1, logits.argmax(-1), pattern[:, :, s])
    return torch.stack([seq[:, k, 1 + d: 1 + d + T] for k, d in enumerate(lm.config.delays)], dim=1)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_equals_reference_loop(lm, guidance_scale):
    text, mask = _text(2)
    prompt = torch.randint(0, 2048, (2, 4, 3))
    out = G.generate_codes(lm, text, mask, num_frames=12, prompt_codes=prompt, guidance_scale=guidance_scale,
                           do_sample=False)
    assert out.shape == (2, 4, 12)
    assert torch.equal(out[:, :, :3], prompt)  # the prompt is continued, and returned
    assert torch.equal(out, _reference_greedy(lm, text, mask, prompt, 12, guidance_scale))
    assert out[:, :, 3:].unique().numel() > 10  # not a constant stream


def test_batch_rows_are_independent(lm):
    # A batch of different (differently padded) prompts gives what each prompt gives alone.
    text, mask = _text(2)
    both = G.generate_codes(lm, text, mask, num_frames=10, do_sample=False)
    alone = G.generate_codes(lm, text[1:, :2], mask[1:, :2], num_frames=10, do_sample=False)
    assert torch.equal(both[1:], alone)
    assert not torch.equal(both[0], both[1])


def test_sampling_seeded(lm):
    text, mask = _text(1)

    def run(seed, **kwargs):
        return G.generate_codes(lm, text, mask, num_frames=8, generator=torch.Generator().manual_seed(seed),
                                **kwargs)
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    assert torch.equal(run(0, top_k=1), G.generate_codes(lm, text, mask, num_frames=8, do_sample=False))
    run(2, top_k=0, top_p=0.9, temperature=0.8)  # every warper on


def test_unconditional(lm):
    out = G.generate_codes(lm, batch_size=3, max_new_tokens=12, do_sample=False)
    assert out.shape == (3, 4, 9)
    # null text = zero states, all masked (transformers' get_unconditional_inputs)
    null = G.generate_codes(lm, torch.zeros(3, 1, TEXT), torch.zeros(3, 1, dtype=torch.long), max_new_tokens=12,
                            guidance_scale=1.0, do_sample=False)
    assert torch.equal(out, null)
    assert torch.equal(out[0], out[2])  # same (null) condition, greedy


def test_iter_frames_streams(lm):
    text, mask = _text(2)
    prompt = torch.randint(0, 2048, (2, 4, 5))
    calls = []
    blocks = list(G.iter_frames(lm, text, mask, num_frames=11, prompt_codes=prompt, do_sample=False,
                                progress=lambda step, total: calls.append((step, total))))
    assert sum(b.shape[-1] for b in blocks) == 11
    assert blocks[0].shape[-1] == 2  # prompt frames 0, 1 are final before any step (max delay 3)
    assert all(b.shape[-1] == 1 for b in blocks[1:])
    full = G.generate_codes(lm, text, mask, num_frames=11, prompt_codes=prompt, do_sample=False)
    assert torch.equal(torch.cat(blocks, -1), full)
    total = 11 + 4 - (1 + 5)  # S - start
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_stereo_pattern(stereo_lm):
    text, mask = _text(1)
    prompt = torch.randint(0, 2048, (1, 8, 2))
    out = G.generate_codes(stereo_lm, text, mask, max_new_tokens=10, prompt_codes=prompt, do_sample=False)
    assert out.shape == (1, 8, 2 + 10 + 1 - 4)
    assert torch.equal(out[:, :, :2], prompt)
    assert torch.equal(out, _reference_greedy(stereo_lm, text, mask, prompt, out.shape[-1], 3.0))


def test_forced_slots_hold_prompt_and_pads(lm):
    prompt = torch.randint(0, 2048, (1, 4, 3))
    pattern = G.build_pattern(prompt, 1, 4, 7, (0, 1, 2, 3), 2048)
    frames = torch.full((1, 4, 7), -1)
    frames[:, :, :3] = prompt
    assert torch.equal(pattern, apply_delay(frames, (0, 1, 2, 3), 2048))
    assert int((pattern == -1).sum()) == 4 * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_frames=0), "positive integer"), (dict(max_new_tokens=-1), "positive integer"),
    (dict(num_frames=4, prompt_codes=torch.zeros(2, 4, 4, dtype=torch.long)), "nothing to generate"),
    (dict(num_frames=8, prompt_codes=torch.zeros(2, 3, 4, dtype=torch.long)), "prompt_codes must be"),
    (dict(num_frames=8, prompt_codes=torch.full((2, 4, 2), 2048)), r"\[0, 2048\)"),
    (dict(num_frames=8, prompt_codes=torch.zeros(2, 4, 2)), "integer codes"),
    (dict(num_frames=8, top_k=-5), "top_k"), (dict(num_frames=8, top_p=2.0), "top_p"),
    (dict(num_frames=8, temperature=0.0), "temperature"), (dict(num_frames=8, batch_size=3), "batch_size 3")])
def test_generate_errors(lm, kwargs, match):
    text, mask = _text(2)
    with pytest.raises(ValueError, match=match):
        G.generate_codes(lm, text, mask, **kwargs)


def test_generate_errors_unconditional(lm):
    with pytest.raises(ValueError, match="batch_size > 0"):
        G.generate_codes(lm, num_frames=4)
    with pytest.raises(ValueError, match="text_mask given without"):
        G.generate_codes(lm, None, torch.ones(1, 2), batch_size=1, num_frames=4)
    with pytest.raises(ValueError, match="no prompt"):
        G.generate_codes(lm, torch.zeros(0, 3, TEXT), torch.zeros(0, 3), num_frames=4)


def test_decode_pattern_with_a_prefix():
    # How a prefix-conditioned LM (MusicGen Melody: no cross-attention) reuses the loop: its step prepends the
    # prefix on the first call and shifts the positions of later ones.
    torch.manual_seed(4)
    lm = MusicGenLM(MusicGenConfig(dim=32, num_layers=2, num_heads=2, ffn_dim=64, text_dim=8,
                                   cross_attention=False, max_positions=64)).eval()
    B, P = 2, 5
    prefix = torch.randn(B, P, 32)  # [cond; null] prefixes would go here under CFG
    pattern = G.build_pattern(None, B, 4, 9, lm.config.delays, 2048)
    cache = lm.new_cache(B, P + pattern.shape[-1])

    def step(tokens, position):
        if isinstance(position, int):
            x = torch.cat([prefix, lm.embed(tokens)], dim=1)
            return lm.forward_embeds(x, cache=cache, offset=0)[:, :, -1]
        return lm(tokens, cache=cache, offset=position + P)[:, :, -1]

    out = torch.cat(list(G.decode_pattern(step, pattern, lm.config.delays, guidance_scale=None, temperature=1.0,
                                          top_k=0, top_p=1.0, do_sample=False)), dim=-1)
    seq = pattern.clone()  # the obvious way: the whole prefix + sequence every step
    with torch.no_grad():
        for s in range(1, seq.shape[-1]):
            x = torch.cat([prefix, lm.embed(seq[:, :, :s])], dim=1)
            best = lm.forward_embeds(x)[:, :, -1].argmax(-1)
            seq[:, :, s] = torch.where(pattern[:, :, s] == -1, best, pattern[:, :, s])
    assert torch.equal(out, torch.stack([seq[:, k, 1 + k: 10 + k] for k in range(4)], dim=1))
    with pytest.raises(ValueError, match="nothing to generate"):
        next(G.decode_pattern(step, torch.full((1, 4, 5), 2048), (0, 1, 2, 3), guidance_scale=None,
                              temperature=1.0, top_k=0, top_p=1.0, do_sample=False))


def test_cuda_graph_needs_cuda(lm):
    text, mask = _text(1)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, it is on cpu"):
        G.generate_codes(lm, text, mask, max_new_tokens=8, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be True or False, got 'yes'"):
        G.generate_codes(lm, text, mask, max_new_tokens=8, cuda_graph="yes")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m cuda on a GPU)")
@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_cuda_graph_equals_eager(lm, guidance_scale):
    """fp32, greedy: the graph replays the eager step, so the tokens are identical (issue: same tokens as eager)."""
    gpu = copy.deepcopy(lm).cuda()
    text, mask = _text(2)
    kwargs = dict(max_new_tokens=40, guidance_scale=guidance_scale, do_sample=False)
    eager = G.generate_codes(gpu, text.cuda(), mask.cuda(), **kwargs)
    graphed = G.generate_codes(gpu, text.cuda(), mask.cuda(), cuda_graph=True, **kwargs)
    assert torch.equal(graphed, eager)
