"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(4x4, 3x3) and F(2x2, 3x3), in plain
torch ops; and the 3x3 convolution after a nearest x2 upsampling by F(2x2, 3x3) on the upsampled image.

    y = conv3x3(x, U, bias)            x (B, C, H, W) -> y (B, K, H, W), U = winograd_weight(weight (K, C, 3, 3), m)
    y = upsample_conv3x3(x, U, bias)   x (B, C, H, W) -> y (B, K, 2H, 2W), U = upsample_weight(weight)

Winograd F(m x m, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes each m x m
block of outputs from the n x n input tile around it (n = m + 2) with n^2 products per (input, output) channel pair
instead of 9 m^2: 16 for 4 outputs with F(2x2) (2.25x fewer multiply-adds than direct), 36 for 16 outputs with
F(4x4) (4x fewer), as n^2 independent matrix products:

    U[ab] = (G g G^T)[ab]        (n^2, K, C)  the weight, transformed once (`winograd_weight`) and cached
    V[ab] = (B^T d B)[ab]        (n^2, P, C)  every n x n input tile d, P tiles (m x m output blocks) in all
    M[ab] = V[ab] @ U[ab]^T      (n^2, P, K)  n^2 GEMMs
    y     = A^T M A              (P, m, m, K) each tile's m x m outputs, + bias

B^T, G and A^T are the small constant matrices below. The transforms are sums of strided views, run per axis (rows
of every tile, then its columns) with the common terms shared, the second axis for all rows of the first at once:
F(2x2) 4 + 4 passes in, 16 + 4 out; F(4x4) 12 + 12 in, 60 + 10 out (`_bt4`, `_bt6`, `_at6`). F(4x4) moves less data
per output (36 transformed values per 16 outputs against 16 per 4), which is why it also gains at 128 channels,
where F(2x2) does not. The result is written in the channels-last layout (B, H, W, K in memory) that oneDNN and our
models use anyway. The GEMMs run as oneDNN matmuls (torch.ops.mkldnn._linear_pointwise, where torch has oneDNN):
86-94 GFLOPS on one Zen 4 core at these sizes where MKL's torch.bmm ran 66-73 (MKL picks its kernels by CPU vendor,
see kernels/linear.py); torch.matmul otherwise. Their weights are packed once into oneDNN's layout
(kernels/packed.py): at the UNet's low resolutions, 16-64 tiles against 384-1280 channels, reordering the weight on
every call cost as much as the product.

Why: torch's CPU convolution (oneDNN) runs a direct 3x3 convolution near the machine's rate, so the only way to a
faster one is fewer operations. On the 2-core AMD EPYC (Zen 4) this project is measured on, 1 thread, fp32,
channels-last input, best of 5 by CPU time, load 1.2 (2026-12-04, /tmp scripts under the heavy-work lock):

    (B, C -> K, H x W)                 oneDNN   F(2x2)          F(4x4)
    (2, 256 -> 256, 128 x 8)           21 ms     15 ms  1.39x    12 ms  1.74x   the UNet's 256-channel level
    (2, 384 -> 384, 64 x 4)            12 ms      8.5   1.42x     9.4   1.29x   (F(4x4) 1.85x in another run)
    (2, 640 -> 640, 32 x 2)            14 ms      7.2   1.94x    11.6   1.19x   half of F(4x4)'s tile is cut off
    (2, 640 -> 256, 128 x 8)           53 ms     34     1.57x    24     2.21x
    (1, 512 -> 512, 256 x 16)         172 ms    113     1.53x    61     2.85x   the VAE decoder's 512-channel stage
    (1, 256 -> 256, 512 x 32)         167 ms    115     1.45x    92     1.81x
    (2, 128 -> 128, 256 x 16)          21 ms     22     0.98x    15     1.39x   the UNet's 128-channel level
    (1, 128 -> 128, 1024 x 64)        170 ms    162     1.05x   113-138 1.24-1.57x  the VAE's last stage

(F(2x2) and F(4x4) in bands of 1024 and 512 tiles.) Which tile a call takes (`tile`) follows from its shapes:
F(4x4) unless its tiles, cut off at the image's edge, need more products than F(2x2)'s (images 2 wide), from
MIN_CHANNELS[4] (128) input and output channels; else F(2x2) from MIN_CHANNELS[2] (256); else oneDNN. F(4x4) at
128 channels is taken on one thread only: with two threads its transforms, many short memory-bound passes that
are each a parallel region, ran no faster than on one ((1, 128 -> 128, 1024 x 64): 120-155 ms wall on two threads,
oneDNN 85 ms), so from two threads on it starts at MIN_CHANNELS_THREADED (256), where it still gained ((1, 512 ->
512, 256 x 16) 43 ms wall, oneDNN 84 ms; (1, 256 -> 256, 512 x 32) 64 ms, oneDNN 84 ms; load 1.3). Images of more
than 2 * `TILES` tiles are done in bands of about `TILES` tiles per batch item, so that the transformed tiles of a
band stay in the cache (their memory traffic otherwise made the large VAE images slower than oneDNN).

The convolution after a nearest x2 upsampling (the decoders' and the UNet's up-sampling) is F(2x2, 3x3) on the
upsampled image with its tiles aligned to the 2 x 2 copies of each input pixel: one transformed row and column are
zero, and the rest are differences of the input that neighbouring tiles share (see the section above
`upsample_weight`): 9 GEMM products per input pixel and channel pair where the folded sub-pixel convolution
(vae.upsample_conv, four 2x2 kernels through oneDNN) needs 16, and the plain conv on the upsampled image 36. Same
machine, 1 thread, CPU time, (B, C, H, W) before upsampling, folded -> here: (1, 512, 256, 16) 393 -> 240 ms 1.64x,
(1, 256, 512, 32) 397 -> 262 ms 1.51x, (2, 640, 32, 2) 33 -> 15 ms 2.24x, (2, 384, 64, 4) 32 -> 18 ms 1.76x,
(2, 256, 128, 8) 50 -> 31 ms 1.62x (load 1.5). Taken from MIN_CHANNELS[2] channels in and out.

End to end (same machine, official configs, random weights, a 10.24 s latent, ours and diffusers alternated,
medians of 3; "F(2x2)" is MUSICLM_CONV3X3=winograd2, the upsampling convs then also by upsample_conv3x3):

    VAE decode, 1 thread (CPU time):   diffusers 7.4-7.5 s; F(2x2) 5.0-5.1 s 1.44-1.51x (before the upsampling
                                       route: 5.1 s 1.44x); default 4.0 s 1.87x (load 1.1-1.2)
    VAE decode, 2 threads (wall):      diffusers 4.52 s; F(2x2) 3.44 s 1.31x; default 2.93 s 1.54x (CPU time 1.68x;
                                       load 1.6; the 128-channel stage on oneDNN, see MIN_CHANNELS_THREADED)
    UNet step, MusicLDM, 1 thread:     diffusers 2289 ms; F(2x2) 1888 ms 1.21x; default 1739 ms 1.32x (load 1.5-2.2,
                                       with unet.py's own routes); its upsampling convs through upsample_conv3x3
                                       too (not in unet.py yet): 1708 ms 1.34x
    UNet step, MusicLDM, 2 threads:    diffusers 1641 ms wall; F(2x2) 1362 ms 1.20x; default 1356 ms 1.21x; with
                                       upsample_conv3x3 1254 ms 1.31x (CPU time 1.39x; load 1.7)

Accuracy: against an fp64 convolution, one F(2x2) convolution's fp32 error is as small as oneDNN's (max abs 2-4e-6
on outputs ~5, 256-512 channels), F(4x4)'s 10-20x larger (5e-5 to 1.1e-4 on outputs ~5-6 at 128-512 channels,
8e-6 relative to the output's max). Nearly all of it is the fp32 GEMMs' rounding, which F(4x4)'s constants (up
to 8 in A^T, 4 and 5 in B^T) enlarge; the interpolation points matter less than that (0, +-1, 2, -1/2 measured
2-3x lower in a plain einsum, at more transform passes; +-1/2 higher). The models' parity with diffusers (budget
1e-4) holds with margin: VAE 10.24 s decode 3.3-3.8e-5 (F(2x2) only: 1.3e-5, oneDNN: 1.6e-5; from an fp64 run of
the same model 3.2-3.8e-5), UNet step at the official sizes 1.1-1.5e-5 (F(2x2): 5-6e-6, oneDNN 6-7e-6, outputs
~2.1-2.5).
The upsampling route's error is below the folded convolution's (5e-6 against 1e-5 from fp64).

Which path a call takes depends on the call's shapes, the thread count and one per-process choice (`route()`),
never on a timing:

    route "winograd"   (default) CPU fp32 calls without gradients, 3x3 kernel, stride 1, padding 1, dilation 1,
                       one group, zero padding (`eligible`): F(4x4) or F(2x2) by `tile`; others F.conv2d
    route "winograd2"  the same calls with F(2x2) only (from MIN_CHANNELS[2])
    route "winograd4"  the same calls with F(4x4) only (from MIN_CHANNELS[4], whatever the image or threads)
    route "conv"       always F.conv2d; the upsampling convs stay folded (vae.upsample_conv)

MUSICLM_CONV3X3=conv|winograd|winograd2|winograd4 overrides the default (tests, debugging, measuring the other
routes). `conv3x3_reference` is F.conv2d with the same signature as `conv3x3`; `WinogradConv2d` is the nn.Conv2d
whose forward dispatches (same parameters and state_dict keys), caching each transformed weight until the weight
changes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.kernels import packed
from musiclm_core.kernels.switch import env_route

ROUTES = ("conv", "winograd", "winograd2", "winograd4")
ENV = "MUSICLM_CONV3X3"
# Input and output channels from which each tile size is taken (measured: F(2x2) gains from 256, F(4x4) from 128).
MIN_CHANNELS = {2: 256, 4: 128}
# F(4x4) with more than one thread: from 256 channels. At 128 its many small memory-bound transform passes are
# most of its time, and each is a parallel region that did not run faster on two threads (PASSIVE OpenMP waits
# on a shared machine), where oneDNN's direct convolution halves its time.
MIN_CHANNELS_THREADED = 256
# Tiles per band for large images: the transformed tiles of a band, (16, 1024, C) or (36, 512, C), stay in the
# L3 cache (4.5-9 MB per 128 channels in fp32).
TILES = {2: 1024, 4: 512}
TRANSFORM_BLOCK = 32768  # channel pairs per float64 block of the weight transforms (9.4 MB for F(4x4))

# The F(2x2, 3x3) matrices (Lavin & Gray, section 4.1), interpolation points 0, 1, -1 (and infinity).
BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # (4, 4) input transform B^T
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))    # (4, 3) weight transform
AT = ((1, 1, 1, 0), (0, 1, -1, -1))                               # (2, 4) output transform A^T

# The F(4x4, 3x3) matrices (Lavin & Gray, section 4.2), interpolation points 0, 1, -1, 2, -2 (and infinity).
# `_bt6` and `_at6` apply BT4 and AT4 with their common terms shared; the tests hold them to these tables.
BT4 = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
       (0, 4, 0, -5, 0, 1))                                                         # (6, 6)
G4 = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))                                          # (6, 3)
AT4 = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))  # (4, 6)


@functools.cache
def route() -> str:
    """This process's route: MUSICLM_CONV3X3 if set, else "winograd" (decided once)."""
    return env_route(ENV, ROUTES) or "winograd"


def eligible(x: Tensor, weight: Tensor, *, stride=1, padding=1, dilation=1, groups: int = 1,
             padding_mode: str = "zeros") -> bool:
    """Whether conv2d(x, weight, ...) is a call `conv3x3` computes: CPU fp32 without gradients, 3x3 kernel,
    stride 1, padding 1, dilation 1, one group, zero padding (channel counts are `tile`'s business)."""
    K, C, kh, kw = weight.shape
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.dim() == 4 and (kh, kw) == (3, 3) and groups == 1 and padding_mode == "zeros"
            and _pair(stride) == (1, 1) and _pair(padding) == (1, 1) and _pair(dilation) == (1, 1))


def tile(x: Tensor, weight: Tensor, **conv_args) -> int:
    """The output tile the call takes: 4 (F(4x4, 3x3)), 2 (F(2x2, 3x3)) or 0 (F.conv2d), from the route, the
    call's shapes and `eligible` (module docstring)."""
    r = route()
    if r == "conv" or not eligible(x, weight, **conv_args):
        return 0
    channels = min(weight.shape[:2])
    if r in ("winograd2", "winograd4"):
        m = int(r[-1])
        return m if channels >= MIN_CHANNELS[m] else 0
    H, W = x.shape[-2:]
    # F(4x4) unless its tiles, cut off at the image's edge, need more products than F(2x2)'s (small images)
    four = 36 * -(-H // 4) * -(-W // 4) <= 16 * -(-H // 2) * -(-W // 2)
    min_four = MIN_CHANNELS[4] if torch.get_num_threads() == 1 else max(MIN_CHANNELS[4], MIN_CHANNELS_THREADED)
    if four and channels >= min_four:
        return 4
    return 2 if channels >= MIN_CHANNELS[2] else 0


def uses_upsample_winograd(x: Tensor, weight: Tensor) -> bool:
    """Whether conv3x3(nearest x2 upsampling of x) takes `upsample_conv3x3`: a route other than "conv", an
    `eligible` call and MIN_CHANNELS[2] channels or more in and out."""
    return route() != "conv" and eligible(x, weight) and min(weight.shape[:2]) >= MIN_CHANNELS[2]


def uses_winograd(x: Tensor, weight: Tensor, **conv_args) -> bool:
    """Whether the call takes a Winograd route (`tile` > 0)."""
    return tile(x, weight, **conv_args) > 0


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _transform(weight: Tensor, rows, order) -> Tensor:
    """(K, C, 3, 3) -> (len(order), K, C): T[a n + b][k, c] = sum over r, s of g[a, r] w[k, c, r, s] g[b, s] for
    g = `rows` (n, 3) and the pairs a n + b in `order`, i.e. (g w g^T)[a, b] per channel pair: kron(g, g) (n^2, 9)
    times the taps (9, K C), in float64, rounded once to the weight's dtype, in blocks of output channels so that
    the float64 temporaries stay small. Made on a layer's first call: as one einsum over the whole weight they took
    3-18x as long (1.7 s against 0.09 s for F(4x4) at 1280 channels) and held up a pipeline's first generation."""
    g = torch.tensor(rows, dtype=torch.float64, device=weight.device)
    kron = torch.kron(g, g)[list(order)]  # (len(order), 9): row a n + b holds g[a, r] g[b, s] at column 3 r + s
    K, C = weight.shape[:2]
    taps = weight.detach().reshape(K, C * 9)
    out = weight.new_empty(len(order), K, C)
    step = max(1, TRANSFORM_BLOCK // C)
    for k in range(0, K, step):
        block = taps[k:k + step].double().view(-1, 9)  # (step C, 9)
        out[:, k:k + step] = (kron @ block.t()).view(len(order), -1, C)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The kernel


def winograd_weight(weight: Tensor, m: int = 2) -> Tensor:
    """(K, C, 3, 3) -> U (n * n, K, C) = G g G^T for every channel pair, n = m + 2 (16 positions for F(2x2, 3x3),
    36 for F(4x4, 3x3)), the positions (a, b) row-major (each U[ab] a (K, C) matrix, laid out as a linear
    layer's weight). Computed in float64, rounded once to the weight's dtype."""
    if m not in (2, 4):
        raise ValueError(f"winograd_weight: output tile {m}, expected 2 or 4")
    return _transform(weight, G if m == 2 else G4, range((m + 2) ** 2))


def conv3x3(x: Tensor, U: Tensor | packed.Packed, bias: Tensor | None = None, *,
            tiles: int | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for x (B, C, H, W) with U = winograd_weight(weight, m), (16, K, C) for
    F(2x2, 3x3) or (36, K, C) for F(4x4, 3x3), or U packed (`for_gemms`) -> (B, K, H, W) with channels-last
    strides. Any H, W >= 1 (sizes that are not a multiple of the tile: the last tile row / column is cut).
    `tiles`: band size (default TILES)."""
    B, C, H, W = x.shape
    if len(U.shape) != 3 or U.shape[0] not in (16, 36) or U.shape[2] != C:
        raise ValueError(f"conv3x3: input of {C} channels for transformed weight {tuple(U.shape)} "
                         "(16 or 36, K, C)")
    m = 2 if U.shape[0] == 16 else 4
    tiles = TILES[m] if tiles is None else tiles
    K = U.shape[1]
    nH, nW = -(-H // m), -(-W // m)  # tiles down and across: m x m outputs each
    # Zero padding of 1 on every side (the conv's own), and more at the bottom / right to whole tiles.
    padded = x.new_zeros(B, m * nH + 2, m * nW + 2, C)  # (B, Hp, Wp, C)
    padded[:, 1:H + 1, 1:W + 1] = x.permute(0, 2, 3, 1)
    out = x.new_empty(B, nH, m, nW, m, K)  # (B, tile row, a, tile column, b, K): (B, m nH, m nW, K) row-major
    run = _tiles2 if m == 2 else _tiles4
    if B * nH * nW <= 2 * tiles:
        run(padded, U, out)
    else:
        rows = max(1, tiles // nW)  # tile rows per band
        for b in range(B):
            for i in range(0, nH, rows):
                n = min(rows, nH - i)
                run(padded[b:b + 1, m * i:m * (i + n) + 2], U, out[b:b + 1, i:i + n])
    y = out.view(B, m * nH, m * nW, K)[:, :H, :W]  # (B, H, W, K)
    if H % m or W % m:
        y = y.contiguous()  # the cut-off rows / columns would leave strides the next layers read slowly
    if bias is not None:
        y += bias
    return y.permute(0, 3, 1, 2)  # (B, K, H, W), channels-last strides


def for_gemms(U: Tensor) -> Tensor | packed.Packed:
    """A transformed weight as `conv3x3` / `upsample_conv3x3` multiply by it: packed part by part into oneDNN's
    layout where the GEMMs run on oneDNN (CPU fp32; kernels/packed.py), else U itself. The packed form replaces
    the plain one in WinogradConv2d's cache (no second copy)."""
    if not packed.packable(U):
        return U
    if U.dim() == 3:  # conv3x3's stack (n, K, C): one GEMM per position
        return packed.Packed(U, list(range(U.shape[0])))
    return packed.Packed(U, _upsample_parts(U.shape[0] // 9))


def _gemm(v: Tensor, U: Tensor | packed.Packed, part: int | tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """v (P, C) @ W^T (P, K) viewed as `shape`, W = U[part] for a stack U (n, K, C), the rows a:b of U for
    part (a, b): through oneDNN against W packed once (U packed by `for_gemms`, or a plain U packed on first use
    and cached while it lives: kernels/packed.py), else torch.matmul."""
    if isinstance(U, packed.Packed) or packed.available(v, U):
        return packed.linear(v, U, part=part).view(shape)
    w = U[part] if isinstance(part, int) else U[part[0]:part[1]]
    return (v @ w.t()).view(shape)


def _products(padded: Tensor, U: Tensor | packed.Packed, out: Tensor, bt) -> list[Tensor]:
    """M[t a + b] = V[ab] @ U[ab]^T, (B, n, m, K) each, for V = B^T d B of every t x t tile d of `padded`
    (B, (t - 2) n + 2, (t - 2) m + 2, C), t = 4 or 6 with `bt` = `_bt4` or `_bt6`; out (B, n, t - 2, m, t - 2, K)
    gives the sizes.

    B^T d on rows (t - 2) i + r (each (B, n, Wp, C)) into T[a], then (B^T d) B on columns (t - 2) j + s for all t
    rows a at once into V[b][a] (b-major: each pass writes one contiguous block). One pass per term over all of T
    instead of t over a t-th: the per-op cost, not the memory traffic, is most of a pass at the UNet's low
    resolutions and one stream's row (measured 1.5-2x faster transforms, same sums)."""
    B, n, step, m, _, K = out.shape
    t, C = step + 2, padded.shape[-1]
    T = padded.new_empty(t, B, n, padded.shape[2], C)
    bt([padded[:, r:r + step * n:step] for r in range(t)], T)
    V = padded.new_empty(t, t, B, n, m, C)
    bt([T[:, :, :, s:s + step * m:step] for s in range(t)], V)
    V = V.view(t * t, B * n * m, C)
    return [_gemm(V[t * b + a], U, t * a + b, (B, n, m, K)) for a in range(t) for b in range(t)]


def _tiles2(padded: Tensor, U: Tensor | packed.Packed, out: Tensor) -> None:
    """F(2x2, 3x3) on every tile of `padded` (B, 2n + 2, 2m + 2, C) through V -> M -> A^T M A, written into
    out (B, n, 2, m, 2, K)."""
    B, n, _, m, _, K = out.shape
    M = _products(padded, U, out, _bt4)  # index 4a + b
    # A^T M A: rows of A^T over a (S[i][b]), then over b into the phases (i, j) of out, both rows i at once
    S = padded.new_empty(2, 4, B, n, m, K)
    for b in range(4):
        torch.add(M[b] + M[4 + b], M[8 + b], out=S[0, b])
        torch.sub(M[4 + b] - M[8 + b], M[12 + b], out=S[1, b])
    torch.add(S[:, 0] + S[:, 1], S[:, 2], out=out[:, :, :, :, 0].movedim(2, 0))  # (2 [i], B, n, m, K)
    torch.sub(S[:, 1] - S[:, 2], S[:, 3], out=out[:, :, :, :, 1].movedim(2, 0))


def _bt4(d: list[Tensor], out: Tensor) -> None:
    """out[r] = sum_s BT[r][s] d[s] for r = 0..3, d four views of one shape, out (4, *shape): 4 passes."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])


def _bt6(d: list[Tensor], out: Tensor) -> None:
    """out[r] = sum_s BT4[r][s] d[s] for r = 0..5, d six views of one shape, out (6, *shape): 12 passes."""
    d0, d1, d2, d3, d4, d5 = d
    p = torch.add(d4, d2, alpha=-4)
    q = torch.add(d3, d1, alpha=-4)
    torch.add(p, q, out=out[1])             # -4 d1 - 4 d2 + d3 + d4
    torch.sub(p, q, out=out[2])             #  4 d1 - 4 d2 - d3 + d4
    u = torch.sub(d4, d2, out=p)
    v = torch.sub(d3, d1, out=q)
    torch.add(u, v, alpha=2, out=out[3])    # -2 d1 - d2 + 2 d3 + d4
    torch.add(u, v, alpha=-2, out=out[4])   #  2 d1 - d2 - 2 d3 + d4
    torch.add(u, torch.sub(d0, d2), alpha=4, out=out[0])   # 4 d0 - 5 d2 + d4
    torch.add(torch.sub(d5, d3), v, alpha=-4, out=out[5])  # 4 d1 - 5 d3 + d5


def _at6(M: list[Tensor], out: list[Tensor]) -> None:
    """out[i] = sum_s AT4[i][s] M[s] for i = 0..3, M six tensors of one shape, out four tensors of it."""
    s, d = M[1] + M[2], M[1] - M[2]
    S, D = M[3] + M[4], M[3] - M[4]
    torch.add(M[0] + s, S, out=out[0])
    torch.add(d, D, alpha=2, out=out[1])
    torch.add(s, S, alpha=4, out=out[2])
    torch.add(d + M[5], D, alpha=8, out=out[3])


def _tiles4(padded: Tensor, U: Tensor | packed.Packed, out: Tensor) -> None:
    """F(4x4, 3x3) on every tile of `padded` (B, 4n + 2, 4m + 2, C) through V -> M -> A^T M A, written into
    out (B, n, 4, m, 4, K)."""
    B, n, _, m, _, K = out.shape
    M = _products(padded, U, out, _bt6)  # index 6a + b
    # A^T M A: over b for each a (Q[a][j], j = 0..3), then over a into the 16 phases (i, j) of out, all four
    # columns j at once
    Q = padded.new_empty(6, 4, B, n, m, K)
    for a in range(6):
        _at6(M[6 * a:6 * a + 6], Q[a])
    _at6([Q[a] for a in range(6)], [out[:, :, i].movedim(3, 0) for i in range(4)])  # each (4 [j], B, n, m, K)


# ---------------------------------------------------------------------------------------------------------------
# A 3x3 convolution after a nearest-neighbour x2 upsampling: F(2x2, 3x3) on the upsampled image
#
# The 4x4 tile under each 2x2 output block (2i + a, 2j + b) of the upsampled image holds input rows i - 1, i, i,
# i + 1 (and the same columns), so B^T's rows give x[i-1] - x[i], 2 x[i], 0, x[i] - x[i+1]: one transformed row
# (and column) is zero and 9 of the 16 positions remain, built from the input's differences D[i] = x[i-1] - x[i]
# and the input itself, each shared by neighbouring tiles. Per dimension, with the kernel's taps w0, w1, w2:
#
#     output row 2i     = x[i-1] w0 + x[i] (w1 + w2)   = D[i] w0     + x[i] (w0 + w1 + w2)
#     output row 2i + 1 = x[i] (w0 + w1) + x[i+1] w2   = D[i+1] (-w2) + x[i] (w0 + w1 + w2)
#
# so the four phases of the output are four GEMMs (DD, Dx, xD, xx: differences along rows / columns or not) over
# the input's pixels with 4 + 2 + 2 + 1 = 9 transformed weights: 9 products per input pixel and channel pair,
# where the folded sub-pixel convolution (vae.upsample_conv, four 2x2 kernels) needs 16 and the plain conv on the
# upsampled image 36.

# Row (and column) functionals of the three taps: w0, w0 + w1 + w2, -w2.
UPSAMPLE_TAPS = ((1, 0, 0), (1, 1, 1), (0, 0, -1))
UPSAMPLE_PIXELS = 1024  # input pixels per band (the nine GEMMs' outputs of a band stay in the cache)


def upsample_weight(weight: Tensor) -> Tensor:
    """(K, C, 3, 3) -> (9 K, C): the weights of the DD (4 K: taps (w0 | -w2) x (w0 | -w2)), Dx (2 K: (w0 | -w2)
    x sum), xD (2 K: sum x (w0 | -w2)) and xx (K: sum x sum) GEMMs, stacked. Computed in float64, rounded once."""
    # functional pairs (p, q) = 3 p + q in the GEMMs' order: DD (00, 02, 20, 22), Dx (01, 21), xD (10, 12), xx (11)
    return _transform(weight, UPSAMPLE_TAPS, (0, 2, 6, 8, 1, 7, 3, 5, 4)).flatten(0, 1)


def _upsample_parts(K: int) -> list[tuple[int, int]]:
    """The row ranges of upsample_weight's four GEMMs in its (9 K, C): DD 4 K, Dx 2 K, xD 2 K, xx K."""
    return [(0, 4 * K), (4 * K, 6 * K), (6 * K, 8 * K), (8 * K, 9 * K)]


def upsample_conv3x3(x: Tensor, U: Tensor | packed.Packed, bias: Tensor | None = None, *,
                     pixels: int = UPSAMPLE_PIXELS) -> Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for x (B, C, H, W)
    with U = upsample_weight(weight) (9 K, C), or U packed (`for_gemms`) -> (B, K, 2H, 2W) with channels-last
    strides. `pixels`: band size."""
    B, C, H, W = x.shape
    if len(U.shape) != 2 or U.shape[0] % 9 or U.shape[1] != C:
        raise ValueError(f"upsample_conv3x3: input of {C} channels for weight {tuple(U.shape)} (9 K, C)")
    K = U.shape[0] // 9
    padded = x.new_zeros(B, H + 2, W + 2, C)  # (B, H + 2, W + 2, C): the conv's zero padding, before upsampling
    padded[:, 1:H + 1, 1:W + 1] = x.permute(0, 2, 3, 1)
    out = x.new_empty(B, H, 2, W, 2, K)  # (B, i, a, j, b, K): output pixel (2i + a, 2j + b)
    if B * H * W <= 2 * pixels:
        _upsample_band(padded, U, bias, out)
    else:
        rows = max(1, pixels // W)
        for b in range(B):
            for i in range(0, H, rows):
                n = min(rows, H - i)
                _upsample_band(padded[b:b + 1, i:i + n + 2], U, bias, out[b:b + 1, i:i + n])
    return out.view(B, 2 * H, 2 * W, K).permute(0, 3, 1, 2)  # (B, K, 2H, 2W), channels-last strides


def _upsample_band(padded: Tensor, U: Tensor | packed.Packed, bias: Tensor | None, out: Tensor) -> None:
    """The rows of `out` (B, n, 2, W, 2, K) from padded input rows (B, n + 2, W + 2, C)."""
    B, n, _, W, _, K = out.shape
    C = padded.shape[-1]
    D = padded[:, :-1] - padded[:, 1:]                    # (B, n + 1, W + 2, C): D[i] = x[i-1] - x[i]
    DD = D[:, :, :-1] - D[:, :, 1:]                       # (B, n + 1, W + 1, C): and along the columns
    Dx = D[:, :, 1:W + 1].contiguous()                    # (B, n + 1, W, C)
    xD = padded[:, 1:n + 1, :-1] - padded[:, 1:n + 1, 1:]  # (B, n, W + 1, C)
    xx = padded[:, 1:n + 1, 1:W + 1].contiguous()         # (B, n, W, C)
    # the bias goes in once, with the xx term that every phase shares
    dd, dx, xd, x1 = _upsample_parts(K)
    Mdd = _gemm(DD.view(-1, C), U, dd, (B, n + 1, W + 1, 2, 2, K))  # (.., a, b, K): U's order
    Mdx = _gemm(Dx.view(-1, C), U, dx, (B, n + 1, W, 2, K))
    Mxd = _gemm(xD.view(-1, C), U, xd, (B, n, W + 1, 2, K))
    Mxx = _gemm(xx.view(-1, C), U, x1, (B, n, W, K))
    if bias is not None:
        Mxx += bias
    for a in range(2):
        rows = Mxx + Mdx[:, a:a + n, :, a]  # row phase a: D[i] w0 (a = 0) or D[i+1] (-w2) (a = 1), plus x[i] sum
        for b in range(2):
            torch.add(rows, Mxd[:, :, b:b + W, b], out=out[:, :, a, :, b])
            out[:, :, a, :, b] += Mdd[:, a:a + n, b:b + W, a, b]


def conv3x3_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """What `conv3x3` computes, from the untransformed weight (K, C, 3, 3): torch's own convolution."""
    return F.conv2d(x, weight, bias, padding=1)


# ---------------------------------------------------------------------------------------------------------------
# The layer


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d whose Winograd calls (`tile` > 0) run `conv3x3`; the others, and all calls under the route
    "conv", run nn.Conv2d's own forward. Same parameters and state_dict as nn.Conv2d.

    The transformed weight of each tile size (16/9 or 36/9 of the weight's size) is made on the first call that
    takes it and kept until the weight changes (another tensor, an in-place update, another device or dtype), in
    the packed form its GEMMs take (`for_gemms`). It is a plain attribute, not a buffer: never saved, and left out
    of pickles and deep copies (an opaque packed tensor cannot be copied; the copy makes its own on first use).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._winograd: dict[int | str, tuple[tuple, Tensor | packed.Packed]] = {}

    def winograd_weight(self, m: int = 2) -> Tensor | packed.Packed:
        """U = for_gemms(winograd_weight(self.weight, m)) (shape ((m + 2)^2, K, C)), cached."""
        return self._cached(m, lambda w: for_gemms(winograd_weight(w, m)))

    def upsample_weight(self) -> Tensor | packed.Packed:
        """for_gemms(upsample_weight(self.weight)) (shape (9 K, C)), cached: for the callers that upsample x2
        before this conv."""
        return self._cached("upsample", lambda w: for_gemms(upsample_weight(w)))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_winograd": {}}  # the cache stays behind (class docstring)

    def _cached(self, name: int | str, make) -> Tensor | packed.Packed:
        w = self.weight
        # An inference tensor (made under torch.inference_mode) has no version counter, and cannot be changed
        # in place outside inference mode: its address is the key.
        version = -1 if w.is_inference() else w._version
        key = (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))
        if name not in self._winograd or self._winograd[name][0] != key:
            self._winograd[name] = (key, make(w))
        return self._winograd[name][1]

    def forward(self, x: Tensor) -> Tensor:
        m = tile(x, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation,
                 groups=self.groups, padding_mode=self.padding_mode)
        if m:
            return conv3x3(x, self.winograd_weight(m), self.bias)
        return super().forward(x)
