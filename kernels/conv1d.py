"""Length-keeping ("same") fp32 1-D convolutions for the HiFi-GAN vocoder: torch's, or FFT overlap-save.

The vocoder spends ~90 % of its time in the convolutions of its residual blocks: C -> C channels, odd kernels 3, 7
and 11 with dilations 1, 3 and 5, at C = 512 / 256 / 128 / 64 / 32 channels on 5 k / 20 k / 41 k / 82 k / 164 k
samples for 10 s of audio. torch runs them through oneDNN at close to the CPU's fp32 peak (96 GFLOP/s on one
Zen 4 core), so the only way to go faster is to do fewer multiplications: in the frequency domain a K-tap filter
costs one complex multiply-add per bin instead of K real ones per sample.

`fft_conv1d` (overlap-save): cut the padded input into frames of N = `N_FFT` samples that overlap by K - 1, rfft
each frame, multiply by the filter's spectrum (one complex matrix product per frequency bin, channels in, channels
out, frames as columns: MKL's cgemm), irfft, keep the M = N - K + 1 valid outputs of each frame. Per output sample
and pair of channels that is (N / 2 + 1) * 8 / M real flops, 4.9 for K = 11 and 4.6 for K = 7 at N = 64, against
2 K = 22 and 14 for the direct convolution. The transforms cost O(C L log N) and memory passes, which is why the
route pays only at many channels and long kernels (`choose_route`).

    dilation d: a dilation-d convolution of x equals an undilated one on each of the d interleaved sequences
    x[r::d], so a frame is N samples d apart (a strided view of x: no copy) and all d phases become columns of
    the same products. The frame length, and so the cost per output, does not grow with the dilation.

    filter spectra: computed on every call from the K taps (a (N/2+1, K) DFT matrix times the weights), a block
    of `BLOCK` output channels at a time so that the block's spectra (N/2+1 complex numbers per weight: 6x the
    weight) stay in the cache between being made and being used. Precomputed they would take ~350 MB for the
    official vocoder; made per call they cost ~10 % of the route's time at 512 channels.

    pointwise steps: HiFi-GAN wraps every convolution in a leaky ReLU before and after it, or a residual add after
    it (`conv1d`'s slope_in / slope_out / residual). The route copies its input into a zero-padded buffer and the
    valid outputs out of the irfft's frames anyway, so the leaky ReLUs and the add ride on those two copies
    (aten's leaky_relu.out, torch.add(out=)), and the bias goes onto the DC bin (a constant c on every output of a
    frame is N c on bin 0 before the 1/N of the irfft). A pair of convolutions then makes 4 passes over the
    activations besides its transforms instead of 7 (leaky ReLU, pad, copy + bias, leaky ReLU, pad, copy + bias,
    add).

    blocks and threads: each block of output channels is finished (spectra, products, bias, irfft, written out)
    before the next one starts, so its products are read back from the cache. torch's FFTs and the spectra's thin
    products barely use a second thread (measured in the vocoder from 1 to 2 threads: rfft 1.26x, irfft 0.76x,
    spectra 0.9x), so on 2+ threads the route splits by channels instead: each thread of kernels/streams.py
    (one intra-op thread each) pads, transforms and lays out its share of the input channels, then makes its share
    of the output blocks; the products lose nothing (one thread per block runs them at the same rate).

Measured (AMD EPYC Zen 4, 2 cores shared with other jobs, fp32, official vocoder shapes). Per convolution, one
thread, best of 5 by CPU time, load 1-1.5 (2026-12-04): the FFT route against torch's is 1.5-2.6x at 512 and 256
channels (kernel 11: 105-165 ms against 265-295 ms; kernel 7 ~1.55x), 1.3-1.6x for kernel 7 and 1.75-1.9x for kernel
11 at 128 channels; at 64 channels kernel 11 gains 1.15-1.35x on one thread but loses on two (0.83-1.04x by CPU
time), kernel 7 loses (0.86-0.98x), and at 32 channels both lose (0.57-0.87x): hence `choose_route`. The whole
vocoder against transformers' (benchmarks/ldm_parts.py --part vocoder, alternated, median of 3): 1.33-1.48x on one
thread and 1.16-1.38x on two (loads 1.4-3), short of the 1.5x target. On two threads it is fragile under load (one
run at load 1.5 gave 0.62x, the reference alternated with it unharmed), probably because its many short parallel
regions wait for a core another process holds. After this route the one-thread time (~7.0 s on a quiet machine) is
~35 % the products (complex matmuls), ~35 % torch's convolutions (kernel 3 at all widths, everything at 64 and 32
channels), ~8 % the transposed convolutions, the rest transforms and copies. With the pointwise steps folded in and
the channels split over the threads (fifth session, benchmarks/RESULTS.md): 1.067-1.086x the previous route's
vocoder in paired runs on two threads (0.99x on one), and 1.23-1.46x transformers' on two threads, 1.31-1.48x on
one, from run to run.

Tried and dropped (2026-12-04, each against this route or torch's convolution, one thread unless said): the complex
products in real arithmetic, as one interleaved real-block GEMM (MKL: 0.91x the complex matmul) or Gauss's three
real products on oneDNN (1.07-1.35x on the products alone with all output channels at once, 0.95-1.1x in 64-channel
blocks; the planar copies, the stacking and the 100 MB of spectra at 512 channels ate the gain); the whole
convolution in real GEMMs (DFTs as matrix products, overlap-add, Gauss folded into the inverse DFT matrix):
0.7-0.9x, its thin DFT products ran far below peak; rfft along the first axis to skip the transposes (torch puts the
transformed axis last anyway): 0.75x; splitting the FFTs over two Python threads: no gain, torch's FFTs were not the
two-thread bottleneck (5 ms either way for a (256, 380, 64) batch); spectra in 128/256-channel blocks: 0.99x / 0.97x
for the whole vocoder; 1-D Winograd F(4, 3) for the kernel-3 convolutions: 1.44x at 512 channels but 5x the fp32
error (1.1e-5), 0.7-1.0x at 256 and below (about 2 % of the vocoder: not taken); the transposed convolutions as
polyphase convolutions: 0.98-1.4x per layer, within the noise, about 1 % of the vocoder.
Eighth session (benchmarks/RESULTS.md): the route's temporaries kept in buffers that every convolution of a vocoder
call reuses (no fresh pages): 1.0-1.6x per convolution, 1.014x for the whole vocoder (median of 10 pairs, two
threads); torch's convolutions by the 2-parallel fast FIR algorithm (three half-length convolutions of the even/odd
phases, 17 taps' work for 11; same sums to 3e-6): 0.61-0.95x, its phase copies cost more than the 17-23 % of
multiplications it saves; the input transform (leaky ReLU, pad, 64-point FFT, bin-major layout) as plain C compiled
with gcc -O3 -march=native, radix-2 across 16 frames in vector lanes: 0.6-0.67x torch's three calls (beating MKL's
FFT and copies needs hand-written SIMD transposes, a native kernel the runtime dependencies leave out).

Accuracy: the fp32 FFTs round differently from the direct sum; measured 2-3e-6 max abs on unit-scale signals
(unit-gain weights), the same order as oneDNN against a float64 reference.

Which route runs: `route()` is "auto" unless MUSICLM_CONV1D=direct|fft overrides it (tests, debugging, measuring
the other route); "auto" takes `choose_route(channels, kernel)` for fp32 tensors on the CPU and outside autograd
(the route writes into its buffers in place), and torch's convolution everywhere else.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from musiclm_core.kernels import streams
from musiclm_core.kernels.switch import env_route

ROUTES = ("auto", "direct", "fft")
ENV = "MUSICLM_CONV1D"
N_FFT = 64  # frame length: M = 54 outputs per frame for K = 11; 128 was no faster (fewer, less efficient columns)
BLOCK = 64  # output channels whose filter spectra are made and used together (64 x 512 x 33 x 8 B = 8.7 MB)

# Where the FFT route wins (measured, module docstring): kernels of at least 7 taps on at least 128 channels. Below
# that the transforms and the extra memory passes cost more than the saved multiplications. (Kernel 11 at 64
# channels gained 1.15-1.35x per convolution on one thread but lost 0.83-1.04x by CPU time on two: left direct.)
FFT_MIN_KERNEL = 7
FFT_MIN_CHANNELS = 128


def conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int = 1) -> Tensor:
    """torch's convolution with "same" zero padding (K - 1) * dilation / 2: (B, C_in, L) -> (B, C_out, L)."""
    return F.conv1d(x, weight, bias, padding=(weight.shape[-1] - 1) * dilation // 2, dilation=dilation)


@functools.cache
def _dft_rows(kernel: int, n_fft: int) -> Tensor:
    """(n_fft / 2 + 1, kernel) complex64 cos + i sin: the conjugate spectrum of a filter w is this @ w.
    Conjugate because the convolution layers correlate (y[t] = sum_k w[k] x[t + k]): no flip needed."""
    f = torch.arange(n_fft // 2 + 1, dtype=torch.float64)[:, None]
    k = torch.arange(kernel, dtype=torch.float64)[None]
    angle = 2 * math.pi * f * k / n_fft
    return torch.complex(torch.cos(angle).float(), torch.sin(angle).float())


def fft_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int = 1, *,
               slope_in: float | None = None, slope_out: float | None = None, residual: Tensor | None = None,
               n_fft: int = N_FFT, block: int = BLOCK) -> Tensor:
    """`conv1d`'s arithmetic by FFT overlap-save (module docstring); fp32, inference only (no autograd)."""
    B, C_in, L = x.shape
    C_out, _, K = weight.shape
    d = dilation
    if K % 2 == 0 or K >= n_fft:
        raise ValueError(f"fft_conv1d needs an odd kernel shorter than n_fft = {n_fft}, got {K}")
    N, Fb, M = n_fft, n_fft // 2 + 1, n_fft - K + 1
    frames = -(-L // (M * d))  # per phase; each covers M * d consecutive outputs (M per phase)
    padded = frames * M * d + (K - 1) * d
    left = (K - 1) * d // 2
    cols = B * frames * d
    whole = L // (M * d)  # frames that fit entirely; the last one is cut to L
    rest = L - whole * M * d
    xp = x.new_empty(B, C_in, padded)
    X = x.new_empty(Fb, C_in, cols, dtype=torch.complex64)  # one (C_in, cols) matrix per bin
    out = x.new_empty(B, C_out, L)
    dft = _dft_rows(K, N).to(x.device)

    def transform(channels: range) -> None:
        """The input channels' frames into X: the leaky ReLU written into the zero-padded copy, rfft, bin-major."""
        i, j = channels.start, channels.stop
        xs = xp[:, i:j]
        xs[..., :left].zero_()
        xs[..., left + L:].zero_()
        if slope_in is None:
            xs[..., left:left + L].copy_(x[:, i:j])
        else:
            torch.ops.aten.leaky_relu.out(x[:, i:j], slope_in, out=xs[..., left:left + L])
        # frame[b, i, f, r, n] = xp[b, i, f M d + r + n d]: N samples of phase r, d apart, a view.
        framed = xs.as_strided((B, j - i, frames, d, N), (C_in * padded, padded, M * d, 1, d))
        X[:, i:j].view(Fb, j - i, B, frames, d).copy_(torch.fft.rfft(framed, dim=-1).permute(4, 1, 0, 2, 3))

    def multiply(blocks: list[range]) -> None:
        """Output channels, a block at a time: filter spectra, products, irfft, and the block written into out."""
        for o in blocks:
            i, j, ob = o.start, o.stop, len(o)
            taps = weight[i:j].reshape(ob * C_in, K).t()  # (K, ob C_in), a view
            # One complex product with the taps as complex numbers: the same sums as cos @ taps and sin @ taps (the
            # zero imaginary parts add exact zeros), written once, interleaved; two real products and
            # torch.complex took 1.1-6x as long, MKL's sgemm with 7 or 11 inner terms being slow on the EPYC.
            spectra = (dft @ taps.to(torch.complex64)).view(Fb, ob, C_in)
            Y = torch.matmul(spectra, X)  # (Fb, ob, cols)
            if bias is not None:
                Y[0] += N * bias[i:j, None]  # a constant on every output sample is N times it on the DC bin
            Y = Y.view(Fb, ob, B, frames, d).permute(2, 1, 3, 4, 0).contiguous()  # (B, ob, frames, d, Fb)
            y = torch.fft.irfft(Y, n=N, dim=-1)[..., :M]  # (B, ob, frames, d, M): the valid outputs of each frame
            y = y.transpose(-1, -2)  # (B, ob, frames, M, d): phases interleaved back, a view
            # Written straight into the contiguous out (a strided result made the next layers slower: oneDNN's
            # convolution copies such an input first, +5-30 %), the whole frames and the cut last one.
            pieces = [(y[:, :, :whole], (slice(i, j), slice(0, whole * M * d)), (B, ob, whole, M, d))]
            if rest:
                pieces.append((y[:, :, whole].reshape(B, ob, M * d)[..., :rest], (slice(i, j), slice(whole * M * d, L)),
                               (B, ob, rest)))
            for src, (rows, span), shape in pieces:
                dst = out[:, rows, span].view(shape)
                if slope_out is not None:
                    torch.ops.aten.leaky_relu.out(src, slope_out, out=dst)
                    if residual is not None:
                        dst += residual[:, rows, span].reshape(shape)
                elif residual is not None:
                    torch.add(src, residual[:, rows, span].reshape(shape), out=dst)
                else:
                    dst.copy_(src)

    ob = block if C_out % block == 0 else C_out
    blocks = [range(o, o + ob) for o in range(0, C_out, ob)]
    parts = streams.streams(len(blocks), x)
    if parts == 1:
        transform(range(C_in))
        multiply(blocks)
    else:  # each thread its share of the channels (module docstring: "threads")
        streams.split(transform, [range(C_in * p // parts, C_in * (p + 1) // parts) for p in range(parts)])
        streams.split(multiply, [blocks[p::parts] for p in range(parts)])
    return out


def choose_route(channels: int, kernel: int) -> str:
    """"fft" for the shapes where it measured faster than torch's convolution, else "direct"."""
    return "fft" if FFT_MIN_KERNEL <= kernel < N_FFT and channels >= FFT_MIN_CHANNELS else "direct"


@functools.cache
def route() -> str:
    """MUSICLM_CONV1D if set ("auto", "direct", "fft"), else "auto" (read once per process)."""
    return env_route(ENV, ROUTES) or "auto"


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int = 1, *, slope_in: float | None = None,
           slope_out: float | None = None, residual: Tensor | None = None) -> Tensor:
    """Same-length convolution (B, C_in, L) -> (B, C_out, L) by the route chosen for its shape (module
    docstring); odd kernels only. With the optional pointwise steps around it:

        y = conv(leaky_relu(x, slope_in)); y = leaky_relu(y, slope_out); y = y + residual     (each when given)

    which the FFT route folds into the copies it makes anyway (HiFi-GAN's residual blocks are exactly this)."""
    chosen = route()
    if chosen == "auto":
        chosen = choose_route(weight.shape[1], weight.shape[-1])
    fft = (chosen == "fft" and x.dtype == torch.float32 and x.device.type == "cpu" and weight.shape[-1] < N_FFT
           and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
    if fft:
        return fft_conv1d(x, weight, bias, dilation, slope_in=slope_in, slope_out=slope_out, residual=residual)
    y = conv1d_reference(x if slope_in is None else F.leaky_relu(x, slope_in), weight, bias, dilation)
    if slope_out is not None:
        y = F.leaky_relu_(y, slope_out)
    return y if residual is None else y.add_(residual)
