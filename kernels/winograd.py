"""3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3), in plain torch ops.

    y = conv3x3(x, weight, bias)       x (B, C, H, W) -> y (B, K, H, W), weight (K, C, 3, 3)

Winograd F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks") computes each 2x2
block of outputs from the 4x4 input tile around it with 16 products per (input, output) channel pair instead of
36: the 2.25x fewer multiply-adds of a 3x3 convolution, as 16 independent matrix products:

    U[ab] = (G g G^T)[ab]        (16, K, C)  the weight, transformed once (`winograd_weight`) and cached
    V[ab] = (B^T d B)[ab]        (16, P, C)  every 4x4 input tile d, P tiles (2x2 output blocks) in all
    M[ab] = V[ab] @ U[ab]^T      (16, P, K)  16 GEMMs
    y     = A^T M A              (P, 2, 2, K) each tile's 2x2 outputs, + bias

B^T, G and A^T are the small constant matrices below; B^T and A^T hold only 0 and +-1, so the transforms are
additions of strided views (4 for the rows of every tile, 16 for its columns; 4 + 4 on the way back). The
result is written in the channels-last layout (B, H, W, K in memory) that oneDNN and our models use anyway.
The 16 GEMMs run as oneDNN matmuls (torch.ops.mkldnn._linear_pointwise, where torch has oneDNN): 86-94 GFLOPS
on one Zen 4 core at these sizes where MKL's torch.bmm ran 66-73 (MKL picks its kernels by CPU vendor, see
kernels/linear.py); torch.bmm otherwise.

Why: torch's CPU convolution (oneDNN) runs a direct 3x3 convolution near the machine's rate, so the only way to a
faster one is fewer operations. On the 2-core AMD EPYC (Zen 4) this project is measured on, 1 thread, fp32,
channels-last input, best of 5 by CPU time, load ~2 (benchmarks/RESULTS.md "UNet step (CPU)"):

    (B, C -> K, H x W)                 oneDNN   Winograd
    (2, 256 -> 256, 128 x 8)           23 ms     18 ms    1.32x  the UNet's 256-channel level
    (2, 384 -> 384, 64 x 4)            14 ms      9 ms    1.59x
    (2, 640 -> 640, 32 x 2)            17 ms      8 ms    2.32x  oneDNN is slow at this small image
    (2, 640 -> 256, 128 x 8)           56 ms     37 ms    1.51x
    (1, 512 -> 512, 256 x 16)         185 ms    114 ms    1.61x  the VAE decoder's 512-channel stage (in bands)
    (1, 256 -> 256, 512 x 32)         177 ms    120 ms    1.48x  (in bands; 0.7-1.1x as one block)
    (2, 128 -> 128, 256 x 16)          23 ms     26 ms    0.91x  (0.9-1.07x over several runs and band sizes)
    (1, 128 -> 128, 1024 x 64)        196 ms    171 ms    1.15x  (in bands; one run, not taken: see below)

The transforms move 4x the input and 4x the output through memory, which the GEMMs' savings pay for only when
both channel counts are large: the route is taken for `MIN_CHANNELS` (256) or more in and out (128 channels
gained 0.9-1.15x, within the noise of this shared machine, and a VAE decode with them on was not faster). Images
of more than 2 * `TILES` tiles are done in bands of about `TILES` tiles per batch item, so that the transformed
tiles of a band stay in the cache (their memory traffic otherwise made the large VAE images slower than oneDNN).

End to end (same machine, official configs, random weights, a 10.24 s latent; benchmarks/unet.py and
benchmarks/ldm_parts.py; the UNet figures include `unet.dense`'s oneDNN matmuls, switched together):

    UNet step, batch 2, 1 thread:    MusicLDM 2797 -> 2363 ms, AudioLDM 2 4711 -> 4110 ms (load ~1)
    UNet step, batch 2, 2 threads:   MusicLDM 1627 -> 1489 ms, AudioLDM 2 3140 -> 2696 ms (load 1.0-1.6)
    VAE decode, 1 thread:            6.71 -> 5.65 s;  2 threads: 3.54 -> 3.47 s wall, 6.67 -> 6.11 s CPU time

and the UNet's output moved by less than 1e-6 against diffusers' (max abs 6e-6 either way, outputs ~2.5).

Accuracy: the fp32 error of one convolution is as small as oneDNN's own (against an fp64 convolution: 2e-6 for
Winograd, 1e-5 for oneDNN, outputs of magnitude ~7). F(4x4, 3x3) (2.25x fewer products again) is not tried yet: its
transforms' larger constants (+-2, +-4, 1/24) raise the fp32 error (the models' parity budget is 1e-4 end to
end), though it would move less data per output (36 transformed values per 16 outputs, against 16 per 4).

Which path a call takes (`uses_winograd`) depends on the call's shapes and on one per-process choice (`route()`),
never on a timing:

    route "winograd"  (default) CPU fp32 calls without gradients, 3x3 kernel, stride 1, padding 1, dilation 1, one
                      group, zero padding, at least MIN_CHANNELS input and output channels; all others: F.conv2d
    route "conv"      always F.conv2d

MUSICLM_CONV3X3=conv|winograd overrides the default (tests, debugging, measuring the other route).
`conv3x3_reference` is F.conv2d with the same signature as `conv3x3`; `WinogradConv2d` is the nn.Conv2d whose
forward dispatches (same parameters and state_dict keys), caching the transformed weight until the weight changes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.kernels.switch import env_route

ROUTES = ("conv", "winograd")
ENV = "MUSICLM_CONV3X3"
MIN_CHANNELS = 256  # input and output channels from which the route is taken (measured: 256 gains, 128 loses)
TILES = 1024  # tiles per band for large images: (16, 1024, C) transformed tiles, 4 MB per 64 channels in fp32

ONEDNN = torch.backends.mkldnn.is_available()  # the 16 GEMMs as oneDNN matmuls (module docstring)

# The F(2x2, 3x3) matrices (Lavin & Gray, section 4.1), interpolation points 0, 1, -1.
BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))  # (4, 4) input transform B^T
G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))    # (4, 3) weight transform
AT = ((1, 1, 1, 0), (0, 1, -1, -1))                               # (2, 4) output transform A^T


@functools.cache
def route() -> str:
    """This process's route: MUSICLM_CONV3X3 if set, else "winograd" (decided once)."""
    return env_route(ENV, ROUTES) or "winograd"


def eligible(x: Tensor, weight: Tensor, *, stride=1, padding=1, dilation=1, groups: int = 1,
             padding_mode: str = "zeros") -> bool:
    """Whether conv2d(x, weight, ...) is a call `conv3x3` computes and is faster for (module docstring)."""
    K, C, kh, kw = weight.shape
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.dim() == 4 and (kh, kw) == (3, 3) and groups == 1 and padding_mode == "zeros"
            and _pair(stride) == (1, 1) and _pair(padding) == (1, 1) and _pair(dilation) == (1, 1)
            and min(C, K) >= MIN_CHANNELS)


def uses_winograd(x: Tensor, weight: Tensor, **conv_args) -> bool:
    """The path a call takes: Winograd when the route is "winograd" and the call is `eligible`."""
    return route() == "winograd" and eligible(x, weight, **conv_args)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ---------------------------------------------------------------------------------------------------------------
# The kernel


def winograd_weight(weight: Tensor) -> Tensor:
    """(K, C, 3, 3) -> U (16, K, C) = G g G^T for every channel pair, the 16 positions (a, b) row-major (each
    U[ab] a (K, C) matrix, laid out as a linear layer's weight). Computed in float64, rounded once to the
    weight's dtype."""
    g = torch.tensor(G, dtype=torch.float64, device=weight.device)
    U = torch.einsum("ar,kcrs,bs->abkc", g, weight.detach().double(), g)  # (4, 4, K, C)
    K, C = weight.shape[:2]
    return U.reshape(16, K, C).to(weight.dtype).contiguous()


def conv3x3(x: Tensor, U: Tensor, bias: Tensor | None = None, *, tiles: int = TILES) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for x (B, C, H, W) with U = winograd_weight(weight) (16, K, C)
    -> (B, K, H, W) with channels-last strides. Any H, W >= 1 (odd sizes: the last tile row / column is cut)."""
    B, C, H, W = x.shape
    if U.dim() != 3 or U.shape[0] != 16 or U.shape[2] != C:
        raise ValueError(f"conv3x3: input of {C} channels for transformed weight {tuple(U.shape)} (16, K, C)")
    K = U.shape[1]
    nH, nW = (H + 1) // 2, (W + 1) // 2  # tiles down and across: 2x2 outputs each
    # Zero padding of 1 on every side (the conv's own), and one more row / column when H / W are odd.
    padded = x.new_zeros(B, 2 * nH + 2, 2 * nW + 2, C)  # (B, Hp, Wp, C)
    padded[:, 1:H + 1, 1:W + 1] = x.permute(0, 2, 3, 1)
    out = x.new_empty(B, nH, 2, nW, 2, K)  # (B, tile row, a, tile column, b, K): (B, 2 nH, 2 nW, K) row-major
    if B * nH * nW <= 2 * tiles:
        _tiles(padded, U, out)
    else:
        rows = max(1, tiles // nW)  # tile rows per band
        for b in range(B):
            for i in range(0, nH, rows):
                n = min(rows, nH - i)
                _tiles(padded[b:b + 1, 2 * i:2 * (i + n) + 2], U, out[b:b + 1, i:i + n])
    y = out.view(B, 2 * nH, 2 * nW, K)[:, :H, :W]  # (B, H, W, K)
    if H % 2 or W % 2:
        y = y.contiguous()  # the cut-off row / column would leave strides the next layers read slowly
    if bias is not None:
        y += bias
    return y.permute(0, 3, 1, 2)  # (B, K, H, W), channels-last strides


def _tiles(padded: Tensor, U: Tensor, out: Tensor) -> None:
    """Every tile of `padded` (B, 2n + 2, 2m + 2, C) through V -> M -> A^T M A, written into out (B, n, 2, m, 2, K)."""
    B, n, _, m, _, K = out.shape
    C = padded.shape[-1]
    # B^T d: rows 2i + r of the padded image, r = 0..3, combined per BT's rows (each (B, n, Wp, C))
    R = [padded[:, r:r + 2 * n:2] for r in range(4)]
    rows = (R[0] - R[2], R[1] + R[2], R[2] - R[1], R[1] - R[3])
    # (B^T d) B: the same on columns 2j + s, written straight into V[4a + b]
    V = padded.new_empty(16, B, n, m, C)
    for a, t in enumerate(rows):
        c = [t[:, :, s:s + 2 * m:2] for s in range(4)]  # (B, n, m, C) each
        torch.sub(c[0], c[2], out=V[4 * a])
        torch.add(c[1], c[2], out=V[4 * a + 1])
        torch.sub(c[2], c[1], out=V[4 * a + 2])
        torch.sub(c[1], c[3], out=V[4 * a + 3])
    V = V.view(16, B * n * m, C)  # (16, P, C)
    if ONEDNN:
        M = [torch.ops.mkldnn._linear_pointwise(V[i], U[i], None, "none", [], "").view(B, n, m, K)
             for i in range(16)]  # 16 x (B, n, m, K), index 4a + b
    else:
        M = list(torch.bmm(V, U.transpose(1, 2)).view(16, B, n, m, K))
    # A^T M A: rows of A^T over a (S[0], S[1], each 4 x (B, n, m, K) over b), then over b into the four phases
    S = [[M[b] + M[4 + b] + M[8 + b] for b in range(4)], [M[4 + b] - M[8 + b] - M[12 + b] for b in range(4)]]
    for a, s in enumerate(S):
        torch.add(s[0] + s[1], s[2], out=out[:, :, a, :, 0])
        torch.sub(s[1] - s[2], s[3], out=out[:, :, a, :, 1])


def conv3x3_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """What `conv3x3` computes, from the untransformed weight (K, C, 3, 3): torch's own convolution."""
    return F.conv2d(x, weight, bias, padding=1)


# ---------------------------------------------------------------------------------------------------------------
# The layer


class WinogradConv2d(nn.Conv2d):
    """nn.Conv2d whose eligible calls (`uses_winograd`) run `conv3x3`; the others, and all calls under the route
    "conv", run nn.Conv2d's own forward. Same parameters and state_dict as nn.Conv2d.

    The transformed weight (16/9 of the weight's size) is made on the first eligible call and kept until the
    weight changes (another tensor, an in-place update, another device or dtype). It is a plain attribute, not a
    buffer: it is never saved.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._winograd: tuple[tuple, Tensor] | None = None

    def winograd_weight(self) -> Tensor:
        """U = winograd_weight(self.weight) (16, K, C), cached."""
        w = self.weight
        # An inference tensor (made under torch.inference_mode) has no version counter, and cannot be changed
        # in place outside inference mode: its address is the key.
        version = -1 if w.is_inference() else w._version
        key = (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))
        if self._winograd is None or self._winograd[0] != key:
            self._winograd = (key, winograd_weight(w))
        return self._winograd[1]

    def forward(self, x: Tensor) -> Tensor:
        if uses_winograd(x, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation,
                         groups=self.groups, padding_mode=self.padding_mode):
            return conv3x3(x, self.winograd_weight(), self.bias)
        return super().forward(x)
