"""The FFT overlap-save convolution (kernels/conv1d.py) against torch's convolution, and the route switch.

Small shapes (a few ms each): every case cuts the input into several frames (n_fft 16 or 32 where the default 64
would leave one), with dilations, batches, channel counts that differ in and out, lengths shorter than a frame,
and output-channel blocks that do not divide the channels. Tolerance 1e-5 max abs on unit-scale outputs: the two
paths round differently (measured 2-3e-6 at 512 channels).
"""

import math

import pytest
import torch

from musiclm_core.kernels import conv1d as conv

ATOL = 1e-5


def case(B, C_in, C_out, L, K, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_in, L, generator=g)
    w = torch.randn(C_out, C_in, K, generator=g) / math.sqrt(C_in * K)  # unit gain: outputs of order 1
    b = torch.randn(C_out, generator=g) if bias else None
    return x, w, b


@pytest.fixture
def use_route(monkeypatch):
    """Set MUSICLM_CONV1D for one test; route() reads it once per process, so its cache is cleared around."""
    def set_route(name):
        monkeypatch.setenv(conv.ENV, name)
        conv.route.cache_clear()
    yield set_route
    conv.route.cache_clear()


@pytest.mark.parametrize("B,C_in,C_out,L,K,d,n_fft,block", [
    (1, 8, 8, 200, 3, 1, 16, 4),
    (2, 8, 8, 200, 3, 3, 16, 8),
    (1, 6, 10, 301, 7, 1, 16, 5),
    (2, 5, 4, 157, 7, 5, 32, 64),    # block larger than C_out: one block
    (1, 16, 16, 500, 11, 1, 32, 16),
    (3, 4, 12, 333, 11, 3, 32, 5),   # 5 does not divide 12: one block
    (1, 8, 8, 5, 11, 5, 32, 4),      # shorter than a frame and than the kernel's span
    (1, 4, 4, 1, 3, 1, 16, 2),       # one sample
    (2, 32, 32, 1000, 11, 5, 64, 8),  # the default frame length
])
def test_fft_matches_torch(B, C_in, C_out, L, K, d, n_fft, block):
    x, w, b = case(B, C_in, C_out, L, K)
    expected = conv.conv1d_reference(x, w, b, d)
    got = conv.fft_conv1d(x, w, b, d, n_fft=n_fft, block=block)
    assert got.shape == expected.shape == (B, C_out, L)
    assert expected.std() > 0.3  # a real signal
    assert (got - expected).abs().max() <= ATOL
    # ... and it follows the input: change one sample, and the outputs within the kernel's reach change alike.
    x2 = x.clone()
    x2[..., L // 2] += 1.0
    moved = conv.fft_conv1d(x2, w, b, d, n_fft=n_fft, block=block) - got
    assert moved.abs().max() > 0.05
    assert (moved - (conv.conv1d_reference(x2, w, b, d) - expected)).abs().max() <= ATOL


def test_fft_without_bias_and_against_float64():
    x, w, _ = case(1, 64, 64, 3000, 11, seed=3, bias=False)
    exact = conv.conv1d_reference(x.double(), w.double(), None, 3)
    direct = (conv.conv1d_reference(x, w, None, 3) - exact).abs().max().item()
    fft = (conv.fft_conv1d(x, w, None, 3) - exact).abs().max().item()
    assert fft <= max(10 * direct, 2e-6)  # the same order as torch's own fp32 convolution


@pytest.mark.parametrize("K,n_fft", [(4, 64), (65, 64), (33, 32)])
def test_fft_rejects_kernels_it_cannot_take(K, n_fft):
    x, w, b = case(1, 2, 2, 100, K)
    with pytest.raises(ValueError, match="odd kernel shorter than n_fft"):
        conv.fft_conv1d(x, w, b, n_fft=n_fft)


def test_choose_route_table():
    assert conv.choose_route(512, 11) == conv.choose_route(128, 7) == "fft"
    assert conv.choose_route(512, 3) == conv.choose_route(64, 11) == conv.choose_route(32, 7) == "direct"
    assert conv.choose_route(512, 65) == "direct"  # longer than a frame


def test_fft_output_is_contiguous():
    """The route returns a contiguous (B, C_out, L) whether or not L fills its last frame (a strided result slows
    the next layers down), with or without bias."""
    for L, bias in ((540, True), (541, True), (77, False)):  # 540 = 10 frames of M = 54 at n_fft 64, K = 11
        x, w, b = case(1, 4, 4, L, 11, bias=bias)
        for d in (1, 3):
            y = conv.fft_conv1d(x, w, b, d)
            assert y.is_contiguous() and y.shape == (1, 4, L)
            assert (y - conv.conv1d_reference(x, w, b, d)).abs().max() <= ATOL


def test_route_env(use_route):
    use_route("direct")
    assert conv.route() == "direct"
    use_route("bogus")
    with pytest.raises(ValueError, match="MUSICLM_CONV1D='bogus'"):
        conv.route()


def test_conv1d_dispatch(use_route, monkeypatch):
    """auto takes the FFT for a large shape only; autograd and non-fp32 inputs always go to torch's."""
    calls = []
    real = conv.fft_conv1d
    monkeypatch.setattr(conv, "fft_conv1d", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    use_route("auto")
    small, big = case(1, 8, 8, 50, 11), case(1, 128, 128, 300, 11)
    with torch.no_grad():
        conv.conv1d(*small, 1)
        y = conv.conv1d(*big, 3)
    assert calls == [big[1].shape]
    assert (y - conv.conv1d_reference(*big, 3)).abs().max() <= ATOL
    x, w, b = big
    w = w.clone().requires_grad_()
    conv.conv1d(x, w, b, 1).sum().backward()  # autograd: torch's convolution
    assert w.grad is not None and calls == [big[1].shape]
    with torch.no_grad():
        conv.conv1d(x.double(), w.double(), b.double(), 1)
    assert calls == [big[1].shape]
    use_route("fft")
    with torch.no_grad():
        conv.conv1d(*small, 1)
    assert calls == [big[1].shape, small[1].shape]
    use_route("direct")
    with torch.no_grad():
        conv.conv1d(*big, 1)
    assert len(calls) == 2


@pytest.mark.parametrize("slope_in,slope_out,with_residual", [
    (0.1, 0.1, False),   # HiFi-GAN's first convolution of a pair
    (None, None, True),  # its second, with the residual
    (0.2, 0.01, True),   # all three at once
])
@pytest.mark.parametrize("route", ["direct", "fft"])
def test_pointwise_steps_around_the_convolution(use_route, route, slope_in, slope_out, with_residual):
    """conv1d(x, ..., slope_in, slope_out, residual) = leaky_relu(conv(leaky_relu(x))) + residual on both routes;
    the FFT route folds the steps into its copies and the bias into its DC bin."""
    use_route(route)
    x, w, b = case(2, 16, 16, 700, 11, seed=5)
    residual = torch.randn(2, 16, 1400)[..., ::2] if with_residual else None  # strided: any layout is taken
    a = x if slope_in is None else torch.nn.functional.leaky_relu(x, slope_in)
    expected = conv.conv1d_reference(a, w, b, 3)
    if slope_out is not None:
        expected = torch.nn.functional.leaky_relu(expected, slope_out)
    if residual is not None:
        expected = expected + residual
    with torch.no_grad():
        got = conv.conv1d(x, w, b, 3, slope_in=slope_in, slope_out=slope_out, residual=residual)
    assert got.shape == expected.shape and got.is_contiguous()
    assert (got - expected).abs().max() <= ATOL
    assert (x - case(2, 16, 16, 700, 11, seed=5)[0]).abs().max() == 0  # the input is not written to


@pytest.mark.parametrize("threads", [1, 2])
def test_fft_threads_split_the_channels(threads, monkeypatch):
    """On 2+ threads the route runs each thread's share of the input channels' transforms, then of the output
    blocks' products (kernels/streams.py); on one, all in the caller. Both give torch's result."""
    monkeypatch.setenv(conv.streams.ENV, "on")  # whatever the environment says (MUSICLM_STREAMS, OMP_WAIT_POLICY)
    conv.streams.route.cache_clear()
    shares = []
    real = conv.streams.split
    monkeypatch.setattr(conv.streams, "split", lambda fn, parts: shares.append(list(parts)) or real(fn, parts))
    x, w, b = case(1, 24, 40, 900, 7, seed=6)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = conv.fft_conv1d(x, w, b, 5, block=8)  # 5 blocks of 8 output channels over the threads
    finally:
        torch.set_num_threads(before)
        conv.streams.route.cache_clear()  # read again, from the restored environment, by the next caller
    assert (got - conv.conv1d_reference(x, w, b, 5)).abs().max() <= ATOL
    if threads == 1:
        assert shares == []
    else:  # input channels 0-11 / 12-23, output blocks 0, 2, 4 / 1, 3 (of 8 channels each)
        assert shares[0] == [range(12), range(12, 24)]
        assert [[o.start for o in part] for part in shares[1]] == [[0, 16, 32], [8, 24]]
