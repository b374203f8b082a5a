"""VGGish (Hershey et al. 2017, "CNN Architectures for Large-Scale Audio Classification"): the AudioSet
embedding network that the original Fréchet audio distance (Kilgour et al. 2019) is computed on.

    wav (N,) at 16 kHz mono -> |STFT| (25 ms periodic Hann, 10 ms hop, 512-point FFT, no padding)
        -> 64 HTK mel bins over 125-7500 Hz -> log(mel + 0.01) -> (T, 64), T = 1 + (N - 400) // 160
        -> examples of 96 frames (0.96 s) -> (n, 96, 64)
        -> 4 VGG blocks (3x3 convs + ReLU: 64 | 128 | 256 256 | 512 512 channels, each block ending in a 2x2 max
           pool) -> (n, 512, 6, 4) -> flatten -> fc 4096 -> fc 4096 -> fc 128 -> (n, 128) pre-activation
        -> optional: PCA (with whitening), clip to [-2, 2], 8-bit quantisation (the released AudioSet features)

The front-end follows its definition in tensorflow/models `research/audioset/vggish` (README "Input: Audio
Features", vggish_params.py): written here from that definition, in float64 (the reference is numpy float64;
the network then runs in the model's dtype). The weights are the two files torchvggish (harritaylor/torchvggish)
downloads, a port of Google's TF checkpoint: `VGGish.from_pretrained()` reads them, through the key table in
`convert/vggish.py`.

How a clip becomes embeddings differs between the FAD tools; `CONVENTIONS` names the three in use, and
`VGGishEmbedding` (what `musiclm eval` calls) uses "google" unless told otherwise:

* "google": google-research `frechet_audio_distance` (the TF tool of the FAD paper), which is what audiocraft's
  `FrechetAudioDistanceMetric` runs, i.e. the FAD of the MusicGen paper and model card. audiocraft resamples to
  16 kHz mono (julius) and writes 16-bit wav files; the tool reads them as integers (scipy.io.wavfile), divides
  each clip by its largest sample value (`normalize=True`, the positive maximum, not the absolute one, and at
  most a gain of 10 in integer units: `max(0.1, max(x))`), cuts 1 s windows every 0.5 s (`--model_step_size`
  8000 samples) and embeds the first 96 frames of each window (one example per window: 98 frames fit in 1 s).
  Embedding: `vggish/embedding`, the pre-activation 128-d layer (vggish_slim.py: `activation_fn=None`); no PCA.
  Computing the log-mel once for the whole clip gives the same frames (no padding, window starts are multiples
  of the 160-sample hop), so examples start every 50 frames; one exists for each 1 s window that fits,
  (N - 16000) // 8000 + 1 of them.
* "fadtk": microsoft/fadtk `VGGishModel` and gudgud96/frechet-audio-distance (`model_name="vggish"`), both
  through torchvggish with `postprocess = False` and the last ReLU removed (their `use_activation=False`
  default): the same pre-activation embedding, no PCA, no peak normalisation, non-overlapping 0.96 s examples
  (torchvggish's `waveform_to_examples`). fadtk resamples with SoX and zero-pads clips shorter than 1 s;
  frechet-audio-distance resamples with resampy.
* "torchvggish": what `torchvggish.vggish()` returns by default: a ReLU on the 128-d layer (the port keeps
  one there, as older versions of vggish_slim.py had; the current one, which audiocraft's instructions clone,
  has none) and the PCA postprocessing applied (8-bit values 0..255, as the AudioSet release). Not a FAD
  convention; there for comparison with code that used the package as it comes.

The conventions differ by more than round-off (overlap, normalisation), so FAD values computed under one are
not comparable with another's; `VGGishEmbedding` puts a non-default convention into its name, which keeps
cached reference statistics apart.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musiclm_core.audio import _as_float_tensor, _check_sample_rate

KIND = "vggish"
CONVS_PER_BLOCK = (1, 1, 2, 2)  # VGG configuration A without its last block (the VGGish README)


@dataclass
class VGGishConfig:
    # The front-end (vggish_params.py). The checkpoint was trained on exactly these; tiny keeps them too.
    sample_rate: int = 16_000
    win_length: int = 400           # 25 ms, periodic Hann
    hop_length: int = 160           # 10 ms
    n_fft: int = 512                # the next power of two above win_length, as mel_features.py takes it
    n_mels: int = 64                # F
    f_min: float = 125.0
    f_max: float = 7500.0
    log_offset: float = 0.01        # log(mel + 0.01): a floor of log(0.01) = -4.6 for silence
    example_frames: int = 96        # 0.96 s per example
    # The network.
    channels: tuple[int, ...] = (64, 128, 256, 512)   # one width per block; blocks hold CONVS_PER_BLOCK convs
    fc_dims: tuple[int, int] = (4096, 4096)
    embedding_dim: int = 128        # D

    def __post_init__(self):
        self.channels, self.fc_dims = tuple(self.channels), tuple(self.fc_dims)
        if len(self.channels) != len(CONVS_PER_BLOCK):
            raise ValueError(f"channels must give {len(CONVS_PER_BLOCK)} widths (one per VGG block), "
                             f"got {self.channels}")
        if len(self.fc_dims) != 2:
            raise ValueError(f"fc_dims must give the widths of the two hidden fc layers, got {self.fc_dims}")
        if min(self.channels + self.fc_dims + (self.embedding_dim,)) <= 0:
            raise ValueError(f"widths must be positive: channels {self.channels}, fc_dims {self.fc_dims}, "
                             f"embedding_dim {self.embedding_dim}")
        shrink = 2 ** len(self.channels)  # each block halves time and frequency
        if self.example_frames % shrink or self.n_mels % shrink:
            raise ValueError(f"example_frames ({self.example_frames}) and n_mels ({self.n_mels}) must be multiples "
                             f"of {shrink}: each of the {len(self.channels)} blocks halves them")
        if not 0 < self.win_length <= self.n_fft or self.hop_length <= 0:
            raise ValueError(f"need 0 < win_length <= n_fft and hop_length > 0, got win_length {self.win_length}, "
                             f"n_fft {self.n_fft}, hop_length {self.hop_length}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {self.sample_rate / 2}, "
                             f"got f_min {self.f_min}, f_max {self.f_max}")

    @property
    def example_samples(self) -> int:
        """The fewest samples that make one example: example_frames windows, hop_length apart (15600: 0.975 s)."""
        return (self.example_frames - 1) * self.hop_length + self.win_length


PRESETS: dict[str, VGGishConfig] = {
    # Google's VGGish, as torchvggish's vggish-10086976.pth holds it (72.1 M parameters).
    "official": VGGishConfig(),
    # For tests: the official front-end, block structure and 128-d output at small widths (the PCA stays 128x128).
    "tiny": VGGishConfig(channels=(4, 8, 8, 16), fc_dims=(32, 32)),
}


@dataclass(frozen=True)
class Convention:
    """How a FAD tool turns a 16 kHz mono clip into VGGish embeddings (see the module docstring)."""

    hop_frames: int                 # between the first frames of consecutive examples
    window_samples: int | None      # an example is made only where this many samples from its start fit (Google:
    #                                 the 1 s window it is cut from); None: where its own frames fit
    peak_normalize: bool            # divide the clip by max(max(x), 0.1 / 32768), as Google's tool does
    activation: bool                # ReLU on the 128-d layer
    postprocess: bool               # PCA, clip, 8-bit quantisation


CONVENTIONS: dict[str, Convention] = {
    "google": Convention(hop_frames=50, window_samples=16_000, peak_normalize=True, activation=False,
                         postprocess=False),
    "fadtk": Convention(hop_frames=96, window_samples=None, peak_normalize=False, activation=False,
                        postprocess=False),
    "torchvggish": Convention(hop_frames=96, window_samples=None, peak_normalize=False, activation=True,
                              postprocess=True),
}

# Google's tool reads 16-bit wav files as integers and divides by max(0.1, max(x)): 0.1 of one integer step.
_PEAK_FLOOR = 0.1 / 32768


def _convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown VGGish convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[convention]


# ---------------------------------------------------------------------------------------------------------------
# The front-end


def hz_to_mel(hz: Tensor) -> Tensor:
    """The HTK mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(hz / 700.0)


@functools.lru_cache(maxsize=8)
def mel_matrix(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> Tensor:
    """(n_fft // 2 + 1, n_mels) float64 on the CPU: post-multiplies |STFT| rows into mel bands.

    Band m is a triangle that is linear in mel (not in Hz), rises from edge m to 1 at edge m + 1 and falls to 0
    at edge m + 2, of n_mels + 2 edges equally spaced in mel from f_min to f_max; the weights are not
    area-normalised (peak 1). The DC bin gets no weight in any band, as in HTK.

    Cached: it depends only on the config. It is not a module buffer because the front-end runs in float64
    whatever dtype the network is cast to.
    """
    bins = hz_to_mel(torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64))  # (K,)
    edges = torch.linspace(*hz_to_mel(torch.tensor([f_min, f_max], dtype=torch.float64)).tolist(), n_mels + 2,
                           dtype=torch.float64)  # (n_mels + 2,)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising = (bins[:, None] - lower) / (centre - lower)  # (K, n_mels)
    falling = (upper - bins[:, None]) / (upper - centre)
    weights = torch.minimum(rising, falling).clamp(min=0)
    weights[0] = 0.0
    return weights


@functools.lru_cache(maxsize=8)
def _window(win_length: int) -> Tensor:
    # Periodic Hann, 0.5 - 0.5 cos(2 pi n / L): one full period over the window (not numpy's symmetric hanning).
    return torch.hann_window(win_length, periodic=True, dtype=torch.float64)


def log_mel(wav: Tensor, config: VGGishConfig) -> Tensor:
    """(N,) samples at config.sample_rate -> (T, n_mels) float64, T = 1 + (N - win_length) // hop_length.

    Frames start every hop_length samples with no padding (a partial frame at the end is dropped); each is
    windowed, zero-padded to n_fft, and its magnitude spectrum is mapped to mel bands; then log(mel + offset).
    """
    (N,) = wav.shape
    if N < config.win_length:
        raise ValueError(f"{N} samples are fewer than one {config.win_length}-sample STFT window")
    x = wav.to(torch.float64)
    frames = x.unfold(0, config.win_length, config.hop_length)  # (T, win_length)
    spectrum = torch.fft.rfft(frames * _window(config.win_length).to(x.device), n=config.n_fft).abs()  # (T, K)
    mel = spectrum @ mel_matrix(config.sample_rate, config.n_fft, config.n_mels, float(config.f_min),
                                float(config.f_max)).to(x.device)  # (T, n_mels)
    return torch.log(mel + config.log_offset)


def example_count(num_samples: int, config: VGGishConfig, convention: Convention) -> int:
    """How many examples a clip of `num_samples` samples gives under `convention` (0 when it is too short)."""
    if convention.window_samples is not None:
        # Google: a window every hop_frames * hop_length samples, kept where window_samples fit.
        step = convention.hop_frames * config.hop_length
        return max(0, (num_samples - convention.window_samples) // step + 1)
    if num_samples < config.example_samples:
        return 0
    frames = 1 + (num_samples - config.win_length) // config.hop_length
    return (frames - config.example_frames) // convention.hop_frames + 1


def min_samples(config: VGGishConfig, convention: Convention) -> int:
    """The shortest clip that gives one example under `convention` (15600 samples, or Google's 1 s window)."""
    return max(config.example_samples, convention.window_samples or 0)


def waveform_to_examples(wav: Tensor, config: VGGishConfig, convention: str | Convention = "google") -> Tensor:
    """(N,) float samples at config.sample_rate -> (n, example_frames, n_mels) float64 log-mel examples.

    Raises ValueError for a clip too short for one example. Peak normalisation, if the convention asks for it,
    is applied to the whole clip first (as Google's tool does before it cuts windows).
    """
    convention = _convention(convention)
    (N,) = wav.shape
    n = example_count(N, config, convention)
    if n == 0:
        need = min_samples(config, convention)
        raise ValueError(f"the clip is too short for VGGish: {N} samples ({N / config.sample_rate:.3f} s at "
                         f"{config.sample_rate} Hz), shorter than one {config.example_frames / 100:.2f} s example "
                         f"({need} samples, {need / config.sample_rate:.3f} s, are needed)")
    x = wav.to(torch.float64)
    if convention.peak_normalize:
        x = x / x.max().clamp(min=_PEAK_FLOOR)
    frames = (n - 1) * convention.hop_frames + config.example_frames
    x = x[: (frames - 1) * config.hop_length + config.win_length]  # only the samples the examples read
    mel = log_mel(x, config)  # (frames, n_mels)
    return mel.unfold(0, config.example_frames, convention.hop_frames).transpose(1, 2)  # (n, frames, n_mels)


# ---------------------------------------------------------------------------------------------------------------
# The network


class VGGish(nn.Module):
    """(B, example_frames, n_mels) log-mel examples -> (B, embedding_dim) pre-activation embeddings; `postprocess`
    applies the AudioSet PCA and quantisation; `embed` goes from a waveform to embeddings under a convention."""

    def __init__(self, config: VGGishConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList()
        c_in = 1
        for width, convs in zip(config.channels, CONVS_PER_BLOCK):
            block = nn.ModuleList()
            for _ in range(convs):
                block.append(nn.Conv2d(c_in, width, kernel_size=3, padding=1))
                c_in = width
            self.blocks.append(block)
        shrink = 2 ** len(config.channels)
        flat = (config.example_frames // shrink) * (config.n_mels // shrink) * c_in
        self.fc1 = nn.Linear(flat, config.fc_dims[0])
        self.fc2 = nn.Linear(config.fc_dims[0], config.fc_dims[1])
        self.embedding = nn.Linear(config.fc_dims[1], config.embedding_dim)
        # The AudioSet PCA (vggish_pca_params): rows are the output components, whitening folded in. Identity and
        # zero until a checkpoint is loaded, so a fresh model's postprocess only clips and quantises.
        D = config.embedding_dim
        self.register_buffer("pca_matrix", torch.zeros(D, D))
        self.register_buffer("pca_means", torch.zeros(D))
        if not self.pca_matrix.is_meta:  # on the meta device (keys.build) the checkpoint's values come next; and
            self.pca_matrix.fill_diagonal_(1.0)  # torch.eye there costs seconds (it goes through torch._refs)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def forward(self, examples: Tensor) -> Tensor:
        B, T, Fm = examples.shape
        if (T, Fm) != (self.config.example_frames, self.config.n_mels):
            raise ValueError(f"VGGish takes (B, {self.config.example_frames}, {self.config.n_mels}) log-mel "
                             f"examples, got {tuple(examples.shape)}")
        x = examples[:, None]  # (B, 1, T, F)
        for block in self.blocks:
            for conv in block:
                x = F.relu(conv(x), inplace=True)  # (B, C, T', F')
            x = F.max_pool2d(x, 2)  # (B, C, T' / 2, F' / 2)
        # Flatten channels last: the TF model was (B, T, F, C) and fc1's input rows keep that order.
        x = x.permute(0, 2, 3, 1).flatten(1)  # (B, T/16 * F/16 * C)
        x = F.relu(self.fc1(x), inplace=True)  # (B, fc_dims[0])
        x = F.relu(self.fc2(x), inplace=True)  # (B, fc_dims[1])
        return self.embedding(x)  # (B, D), no activation (vggish_slim.py: the `vggish/embedding` tensor)

    def postprocess(self, embeddings: Tensor) -> Tensor:
        """(B, D) -> (B, D) float: PCA with whitening, clip to [-2, 2], quantise to the integers 0..255 (stored
        as floats), as vggish_postprocess.py makes the released AudioSet features."""
        pca = (embeddings - self.pca_means) @ self.pca_matrix.T  # (B, D)
        clipped = pca.clamp(-2.0, 2.0)
        return torch.round((clipped + 2.0) * (255.0 / 4.0))

    @torch.inference_mode()
    def embed(self, wav: Tensor | np.ndarray, sample_rate: int, *, convention: str | Convention = "google",
              batch_size: int = 64) -> Tensor:
        """Mono audio (N,) or (1, N) at 16 kHz -> (n, D) embeddings in the model's dtype and device, n examples
        as `convention` cuts them (see CONVENTIONS). Errors: another sample rate (resample first), more than one
        channel, NaN or infinite samples, a clip shorter than one example."""
        convention = _convention(convention)
        sample_rate = _check_sample_rate(sample_rate)
        if sample_rate != self.config.sample_rate:
            raise ValueError(f"VGGish takes {self.config.sample_rate} Hz audio, got {sample_rate} Hz: resample it "
                             f"first (musiclm_core.audio.resample(wav, {sample_rate}, {self.config.sample_rate}))")
        wav = _as_float_tensor(wav)
        if wav.dim() == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.dim() != 1:
            raise ValueError(f"VGGish takes mono audio shaped (N,) or (1, N), got {tuple(wav.shape)}: mix the "
                             f"channels down first")
        if not torch.isfinite(wav).all():
            raise ValueError(f"the clip holds {int((~torch.isfinite(wav)).sum())} NaN or infinite sample(s)")
        param = self.fc1.weight
        examples = waveform_to_examples(wav.cpu(), self.config, convention).to(param)  # (n, T, F)
        out = torch.cat([self(examples[i: i + batch_size]) for i in range(0, examples.shape[0], batch_size)])
        if convention.activation:
            out = F.relu(out)
        if convention.postprocess:
            out = self.postprocess(out)
        return out  # (n, D)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, pca: str | os.PathLike | None = None,
                        dtype: torch.dtype = torch.float32) -> "VGGish":
        """Load the two files torchvggish downloads, vggish-10086976.pth (the network) and
        vggish_pca_params-970ea276.pth (the PCA): from torch hub's checkpoints folder
        (`torch.hub.get_dir()/checkpoints`, where torchvggish leaves them) when `path` is None, from the folder
        `path`, or from the weights file `path` and the PCA file `pca` (by default next to it). Both are read with
        `torch.load(weights_only=True)`; a missing file is an error naming where it looked and where to get it."""
        from musiclm_core.convert import vggish as convert

        weights_file, pca_file = convert.checkpoint_files(path, pca)
        return convert.load_torchvggish_files(weights_file, pca_file, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# The evaluation adapter (the protocol of metrics.ClapEmbedding / EnCodecEmbedding)


class VGGishEmbedding:
    """VGGish embeddings for FAD: (1, N) audio at 16 kHz -> (n, 128) float32 on the CPU, one row per example as
    `convention` cuts them (default "google": 1 s windows every 0.5 s, peak-normalised, pre-activation, no PCA:
    the FAD of audiocraft and the MusicGen model card; see the module docstring for the others). `model` names
    the checkpoint in cached statistics; the convention, when not the default, is part of `name` too."""

    kind = "vggish"

    def __init__(self, model: VGGish, name: str, *, convention: str = "google"):
        if not isinstance(convention, str) or convention not in CONVENTIONS:
            raise ValueError(f"unknown VGGish convention {convention!r}; known: {', '.join(CONVENTIONS)}")
        self.convention = CONVENTIONS[convention]
        self.model = model.eval()
        self.name = f"vggish:{name}" if convention == "google" else f"vggish-{convention}:{name}"
        self.dim = model.config.embedding_dim
        self.sample_rate, self.channels = model.config.sample_rate, 1

    def min_samples(self) -> int:
        """The shortest clip that gives one embedding."""
        return min_samples(self.model.config, self.convention)

    def __call__(self, wav: Tensor) -> Tensor:
        return self.model.embed(wav, self.sample_rate, convention=self.convention).float().cpu()  # (n, D)


def default_folder() -> Path:
    """Where torchvggish's downloads land: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints"
