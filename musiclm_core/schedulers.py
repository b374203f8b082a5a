"""Diffusion samplers for the latent-diffusion pipelines (MusicLDM, AudioLDM 2), with diffusers' arithmetic.

    NoiseSchedule   betas -> ᾱ_t, σ_t = √((1 − ᾱ_t)/ᾱ_t), the inference timestep rules, what the model predicts
    DDIM            Song et al. 2021, eq. 12 (η = 0: deterministic; η > 0 adds noise)        the checkpoints' own
    PNDM            Liu et al. 2022: Runge-Kutta warm-up, then the 4-step linear multistep (PLMS)
    DPMSolver       Lu et al. 2022, DPM-Solver++(2M), Algorithm 2
    LMS, Euler      Karras et al. 2022 sigma-space ODE, linear multistep of order 4 / 1 (k-diffusion's samplers)

A pipeline drives every sampler the same way:

    sampler.set_timesteps(200)
    x = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:                   # one UNet call each (PNDM's warm-up calls included)
        eps = unet(sampler.scale_model_input(x, t), t)
        x = sampler.step(eps, t, x, generator=g)  # only DDIM with eta > 0 draws noise

`from_config(scheduler_config)` builds the checkpoint's sampler (`scheduler/scheduler_config.json`, a diffusers
`DDIMScheduler` for every checkpoint here), or another one with the checkpoint's noise schedule when given a name,
as diffusers' `OtherScheduler.from_config(config)` does. Training uses `add_noise` and `get_velocity`.

Every coefficient is computed in float64 from diffusers' float32 tables (ᾱ_t, σ_t), and the samples are updated in
float32 and returned in their own dtype; against diffusers the trajectories agree to ~1e-6 relative (the tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from musiclm_core import hub

NAMES = ("ddim", "pndm", "dpm", "euler", "lms")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
FINAL_SIGMAS = ("zero", "sigma_min")  # the σ after the last timestep: 0 (the last step lands on x̂₀) or σ₀


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported (expected one of {choices})")


@dataclass
class NoiseSchedule:
    """The forward process the model was trained with (Ho et al. 2020): x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,
    ᾱ_t = ∏_{s ≤ t} (1 − β_s), t = 0 … T − 1; and the rules every sampler shares to pick its timesteps.

    The MusicLDM and AudioLDM 2 checkpoints: scaled_linear betas from 0.0015 to 0.0195, leading spacing, offset 1.
    """

    num_train_timesteps: int = 1000      # T
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"        # "linear": β linear in t; "scaled_linear": √β linear in t
    trained_betas: list[float] | None = None   # explicit betas instead of the three fields above
    prediction_type: str = "epsilon"     # the model predicts ε, or v = √ᾱ ε − √(1 − ᾱ) x₀ (Salimans & Ho 2022)
    timestep_spacing: str = "leading"    # see `spaced_timesteps`
    steps_offset: int = 0                # added to leading timesteps (the checkpoints: 1, so that t = 1 … 996)
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)   # (T,) ᾱ_t, float32 as diffusers
    sigma_table: np.ndarray = field(init=False, repr=False, compare=False)  # (T,) σ_t, float32 as diffusers

    def __post_init__(self):
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            if len(self.trained_betas) != T:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values, num_train_timesteps is {T}")
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported (expected 'linear' or "
                             f"'scaled_linear', or trained_betas)")
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        # float32 products and square roots, exactly as diffusers builds its tables
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigma_table = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def alpha_bar(self, t: int, *, set_alpha_to_one: bool = False) -> float:
        """ᾱ_t; before the first training step (t < 0) 1.0, or ᾱ₀ when set_alpha_to_one is false (the checkpoints)."""
        if t >= self.num_train_timesteps:
            raise ValueError(f"timestep {t} is past the last training timestep {self.num_train_timesteps - 1}")
        if t >= 0:
            return float(self.alphas_cumprod[t])
        return 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def sigmas_at(self, timesteps: np.ndarray) -> np.ndarray:
        """σ at (possibly fractional) timesteps, linearly interpolated in the float32 table (float32, as diffusers)."""
        return np.interp(timesteps, np.arange(self.num_train_timesteps), self.sigma_table).astype(np.float32)

    def trajectory_sigmas(self, timesteps: np.ndarray, final_sigmas_type: str) -> np.ndarray:
        """(len(timesteps) + 1,) float32: σ at each timestep, then the final σ (FINAL_SIGMAS)."""
        final = 0.0 if final_sigmas_type == "zero" else self.sigma_table[0]
        return np.append(self.sigmas_at(timesteps), np.float32(final))

    def spaced_timesteps(self, num_steps: int) -> np.ndarray:
        """`num_steps` descending timesteps, float64 (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
        Steps are Flawed", Table 2). With T = num_train_timesteps:

        * leading: 0, k, 2k, … with k = T // num_steps, plus steps_offset (T = 1000, 25 steps: 961, 921, …, 1);
        * trailing: round(T − i·T/num_steps) − 1 (999, 959, …, 39);
        * linspace: num_steps points from 0 to T − 1, fractional (DDIM, PNDM and DPM-Solver round them).
        """
        T, n = self.num_train_timesteps, num_steps
        if self.timestep_spacing == "leading":
            timesteps = np.arange(n) * (T // n) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            # diffusers' np.arange(T, 0, -T / n) has n + 1 elements for some n (61, 103, ...: float rounding), the
            # last one a timestep of -1; we keep the n it means.
            return (np.round(np.arange(T, 0, -T / n))[:n] - 1).astype(np.float64)
        else:
            timesteps = np.linspace(0, T - 1, n)
        return timesteps[::-1].astype(np.float64)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε: the noisy input a UNet is trained on. t: int or (B,) integer timesteps."""
        sqrt_ab, sqrt_1mab = self._coefficients(t, x0)
        return sqrt_ab * x0 + sqrt_1mab * noise

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The v-prediction target v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (Salimans & Ho 2022, section 4)."""
        sqrt_ab, sqrt_1mab = self._coefficients(t, x0)
        return sqrt_ab * noise - sqrt_1mab * x0

    def _coefficients(self, t: Tensor | int, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.check_timesteps(t)
        if not torch.equal(t, t.round()):
            raise ValueError(f"training timesteps must be whole numbers, got {t.tolist()}")
        alpha_bar = _per_row(self.alphas_cumprod[t.long()], x)
        return alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5

    def check_timesteps(self, t: Tensor | float) -> Tensor:
        """t (one number, or one per batch row) as a flat float64 CPU tensor, checked to lie in [0, T − 1]."""
        t = torch.as_tensor(t).detach().cpu().double().flatten()
        if t.numel() and (t.min() < 0 or t.max() > self.num_train_timesteps - 1):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        return t

    def denoise(self, model_output: Tensor, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from the model output at a point x = alpha·x₀ + sigma·ε of the variance-preserving path
        (alpha = √ᾱ, sigma = √(1 − ᾱ)): ε-prediction x̂₀ = (x − sigma ε)/alpha; v-prediction x̂₀ = alpha x − sigma v,
        ε̂ = alpha v + sigma x."""
        if self.prediction_type == "epsilon":
            return (x - sigma * model_output) / alpha, model_output
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x


def _per_row(values: Tensor, x: Tensor) -> Tensor:
    """One value for the whole batch, or one per batch row, shaped to broadcast against x (B, ...)."""
    values = values.to(device=x.device, dtype=x.dtype)
    return values.view(-1, *[1] * (x.dim() - 1)) if values.numel() > 1 else values.reshape(())


def _randn(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn as diffusers' `randn_tensor` does: on the generator's device (a CPU generator for
    a CUDA tensor draws on the CPU), then moved; with the same seed both draw the same numbers."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class Sampler:
    """What every sampler shares: its NoiseSchedule, the timesteps of one trajectory and the call count within it."""

    init_noise_sigma: float = 1.0  # the initial latents are noise * init_noise_sigma

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps: Tensor | None = None     # the UNet calls of one trajectory, in order
        self.num_inference_steps: int | None = None
        self.step_index = 0                      # step() calls since set_timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Start a new trajectory of `num_inference_steps` steps: new timesteps, the history of the last one gone."""
        T = self.schedule.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, num_train_timesteps={T}], "
                             f"got {num_inference_steps!r}")
        timesteps = self._timesteps(int(num_inference_steps))
        if timesteps.max() > T - 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} with steps_offset="
                             f"{self.schedule.steps_offset} gives timestep {timesteps.max():g}, past the last "
                             f"training timestep {T - 1}")
        self.timesteps = torch.from_numpy(timesteps)
        self.num_inference_steps = int(num_inference_steps)
        self.step_index = 0
        self._reset()

    def _timesteps(self, num_steps: int) -> np.ndarray:
        return self.schedule.spaced_timesteps(num_steps).round().astype(np.int64)

    def _reset(self) -> None:
        """Forget the history of the previous trajectory (multistep samplers)."""

    def _check(self, t: Tensor | float) -> int:
        """The index of this step in the trajectory; t must be the timestep the trajectory is at."""
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")
        i = self.step_index
        if i >= len(self.timesteps):
            raise ValueError(f"{type(self).__name__}: the {len(self.timesteps)} timesteps are all stepped; call "
                             f"set_timesteps again to start a new trajectory")
        if float(t) != float(self.timesteps[i]):
            raise ValueError(f"{type(self).__name__}: step {i} is at timestep {self.timesteps[i].item():g}, got "
                             f"{float(t):g} (step through sampler.timesteps in order)")
        return i

    def scale_model_input(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The UNet input at timestep t (the identity for the variance-preserving samplers)."""
        return x

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (training, and starting a trajectory from a noised x₀)."""
        return self.schedule.add_noise(x0, noise, t)

    def get_velocity(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """The v-prediction training target √ᾱ_t ε − √(1 − ᾱ_t) x₀."""
        return self.schedule.get_velocity(x0, noise, t)


class DDIM(Sampler):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with σ_t of eq. 16),
    from t to t' = t − T // N:

        x̂₀ = (x_t − √(1 − ᾱ_t) ε)/√ᾱ_t          (clipped to ±clip_sample_range if clip_sample)
        σ_t = η √((1 − ᾱ_t')/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_t')
        x_t' = √ᾱ_t' x̂₀ + √(1 − ᾱ_t' − σ_t²) ε + σ_t z,    z ~ N(0, I) only when η > 0

    For the last step t' < 0 and ᾱ_t' is ᾱ₀ (set_alpha_to_one false, the checkpoints) or 1. `eta` is an attribute
    (the pipelines' `eta` argument sets it). t' uses T // N whatever the spacing (diffusers does the same).
    """

    def __init__(self, schedule: NoiseSchedule, *, set_alpha_to_one: bool = True, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, eta: float = 0.0):
        super().__init__(schedule)
        self.set_alpha_to_one = set_alpha_to_one
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.eta = eta

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, *, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> Tensor:
        """x_t -> x_t'. With eta > 0 the noise z is `noise` if given, else drawn from `generator` (model-output
        shape, as diffusers draws it)."""
        if self.num_inference_steps is None:
            raise ValueError("DDIM: call set_timesteps(num_inference_steps) before stepping")
        if noise is not None and generator is not None:
            raise ValueError("DDIM.step: pass either noise or generator, not both")
        t = int(t)
        t_prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(t_prev, set_alpha_to_one=self.set_alpha_to_one)
        x0, eps = self.schedule.denoise(model_output.float(), x.float(), ab_t ** 0.5, (1 - ab_t) ** 0.5)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        std = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        x_prev = ab_prev ** 0.5 * x0 + (1 - ab_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            z = noise if noise is not None else _randn(model_output.shape, generator, model_output)
            x_prev = x_prev + std * z.float()
        return x_prev.to(x.dtype)


class PNDM(Sampler):
    """Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

    Every update moves x from t to t' along the DDIM transfer φ (their eq. 9) with a combined noise estimate ε':

        φ(x, ε', t, t') = √(ᾱ_t'/ᾱ_t) x − (ᾱ_t' − ᾱ_t) ε' / (ᾱ_t √(1 − ᾱ_t') + √(ᾱ_t (1 − ᾱ_t) ᾱ_t'))

    Warm-up (unless skip_prk_steps): three pseudo Runge-Kutta steps (PRK) of four UNet calls each, at t, t − δ/2,
    t − δ/2, t − δ (δ = T // N), ε' = ε₁/6 + ε₂/3 + ε₃/3 + ε₄/6; so N steps take N + 9 UNet calls. Then pseudo
    linear multistep (PLMS) on the stored ε: (55ε₀ − 59ε₋₁ + 37ε₋₂ − 9ε₋₃)/24, lower orders while fewer are stored.
    Without warm-up the second call re-does the first step with (ε₀ + ε₁)/2 (a Heun step, as diffusers does).
    For v-prediction the combined output is converted to ε' at the step's start (diffusers' `_get_prev_sample`).
    """

    def __init__(self, schedule: NoiseSchedule, *, skip_prk_steps: bool = False, set_alpha_to_one: bool = False):
        super().__init__(schedule)
        self.skip_prk_steps = skip_prk_steps
        self.set_alpha_to_one = set_alpha_to_one
        self._reset()

    def _timesteps(self, num_steps: int) -> np.ndarray:
        ts = super()._timesteps(num_steps)  # descending
        if self.skip_prk_steps:  # the second timestep twice: the Heun step re-does the first step
            return np.concatenate([ts[:1], ts[1:2], ts[1:]])
        if num_steps < 4:
            raise ValueError(f"PNDM's Runge-Kutta warm-up needs num_inference_steps >= 4, got {num_steps} "
                             f"(or build it with skip_prk_steps=True)")
        # Runge-Kutta over the first three intervals [ts[g], ts[g + 1]], calls at the start, twice at the midpoint
        # (ts[g + 1] + δ//2, as diffusers rounds it), and at the end; then PLMS from ts[3] on.
        half = self.schedule.num_train_timesteps // num_steps // 2
        prk = [s for g in range(3) for s in (ts[g], ts[g + 1] + half, ts[g + 1] + half, ts[g + 1])]
        return np.concatenate([prk, ts[3:]]).astype(np.int64)

    def _reset(self) -> None:
        self._eps: list[Tensor] = []         # one stored ε per completed step, newest last
        self._x_start: Tensor | None = None  # x at the start of the current Runge-Kutta (or Heun) step
        self._eps_sum: Tensor | None = None  # running Runge-Kutta combination

    def _transfer(self, x: Tensor, eps: Tensor, t: int, t_prev: int) -> Tensor:
        ab_t = self.schedule.alpha_bar(t)
        ab_prev = self.schedule.alpha_bar(t_prev, set_alpha_to_one=self.set_alpha_to_one)
        if self.schedule.prediction_type == "v_prediction":
            eps = self.schedule.denoise(eps, x, ab_t ** 0.5, (1 - ab_t) ** 0.5)[1]
        denom = ab_t * (1 - ab_prev) ** 0.5 + (ab_t * (1 - ab_t) * ab_prev) ** 0.5
        return (ab_prev / ab_t) ** 0.5 * x - (ab_prev - ab_t) / denom * eps

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, *, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One UNet call's update (deterministic: generator and noise are not used)."""
        i = self._check(t)
        self.step_index += 1
        e, x32 = model_output.float(), x.float()
        delta = self.schedule.num_train_timesteps // self.num_inference_steps
        n_prk = 0 if self.skip_prk_steps else 12
        if i < n_prk:
            sub = i % 4                               # which of the four Runge-Kutta calls
            t_start = int(self.timesteps[i - sub])
            if sub == 0:
                self._x_start, self._eps_sum = x32, e / 6
                self._eps.append(e)
            elif sub < 3:
                self._eps_sum = self._eps_sum + e / 3
            else:
                e = self._eps_sum + e / 6
            # diffusers' targets: calls 0 and 2 move to their own t − δ//2, calls 1 and 3 to their own t (with an
            # odd δ the first half-step ends one timestep above the midpoint call)
            t_to = int(t) - (delta // 2 if sub in (0, 2) else 0)
            return self._transfer(self._x_start, e, t_start, t_to).to(x.dtype)
        j = i - n_prk                                 # PLMS call
        t_from, t_to = int(t), int(t) - delta
        if self.skip_prk_steps and j == 1:            # Heun: redo the first step with the mean of both estimates
            t_from, t_to = int(t) + delta, int(t)
            e_comb, x32 = (e + self._eps[-1]) / 2, self._x_start
        else:
            self._eps = self._eps[-3:] + [e]
            if j == 0 and self.skip_prk_steps:
                self._x_start = x32
            e_comb = _adams_bashforth(self._eps)
        return self._transfer(x32, e_comb, t_from, t_to).to(x.dtype)


def _adams_bashforth(eps: list[Tensor]) -> Tensor:
    """The linear multistep combination of the last 1 to 4 estimates (newest last), Adams-Bashforth weights."""
    if len(eps) == 1:
        return eps[-1]
    if len(eps) == 2:
        return (3 * eps[-1] - eps[-2]) / 2
    if len(eps) == 3:
        return (23 * eps[-1] - 16 * eps[-2] + 5 * eps[-3]) / 12
    return (55 * eps[-1] - 59 * eps[-2] + 37 * eps[-3] - 9 * eps[-4]) / 24


class DPMSolver(Sampler):
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 "DPM-Solver++(2M)"), data prediction.

    With σ the noise-to-signal ratio √((1 − ᾱ)/ᾱ), α = 1/√(σ² + 1), s = σα, λ = −log σ, h = λ_next − λ_i:

        x̂₀_i = (x_i − s_i ε)/α_i
        order 1 (DDIM):  x_next = (s_next/s_i) x_i − α_next (e^{−h} − 1) x̂₀_i,    e^{−h} = σ_next/σ_i
        order 2:         the same with D = x̂₀_i + (x̂₀_i − x̂₀_{i−1}) / (2r) for x̂₀_i,  r = (λ_i − λ_{i−1})/h

    The first step is of order 1 (one x̂₀ known), and so is the last when `final_sigmas_type` is "zero" (the final
    σ is 0: the last step returns x̂₀), when `euler_at_final`, or when lower_order_final and N < 15.
    Timesteps: leading and linspace spacing take N + 1 points and drop the last (1000 // 26 = 38 apart for N = 25).
    """

    def __init__(self, schedule: NoiseSchedule, *, solver_order: int = 2, lower_order_final: bool = True,
                 euler_at_final: bool = False, final_sigmas_type: str = "zero"):
        super().__init__(schedule)
        _check_choice("solver_order", solver_order, (1, 2))
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.euler_at_final = euler_at_final
        self.final_sigmas_type = final_sigmas_type
        self.sigmas: np.ndarray | None = None  # (len(timesteps) + 1,) float32: σ at each timestep, then the final σ
        self._reset()

    def _timesteps(self, num_steps: int) -> np.ndarray:
        """The timesteps, and σ at each of them plus the final σ (self.sigmas)."""
        if self.schedule.timestep_spacing == "trailing":
            timesteps = self.schedule.spaced_timesteps(num_steps)
        else:
            timesteps = self.schedule.spaced_timesteps(num_steps + 1)[:-1]
        timesteps = timesteps.round().astype(np.int64)
        self.sigmas = self.schedule.trajectory_sigmas(timesteps, self.final_sigmas_type)
        return timesteps

    def _reset(self) -> None:
        self._x0_prev: Tensor | None = None

    def step(self, model_output: Tensor, t: Tensor | int, x: Tensor, *, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> Tensor:
        """x_i -> x_{i+1} (deterministic: generator and noise are not used)."""
        i = self._check(t)
        self.step_index += 1
        n = len(self.timesteps)
        last = i == n - 1
        first_order = (self.solver_order == 1 or self._x0_prev is None
                       or (last and (self.euler_at_final or self.final_sigmas_type == "zero"
                                     or (self.lower_order_final and n < 15))))
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha, alpha_next = (sigma ** 2 + 1) ** -0.5, (sigma_next ** 2 + 1) ** -0.5
        x32 = x.float()
        x0 = self.schedule.denoise(model_output.float(), x32, alpha, sigma * alpha)[0]
        d = x0
        if not first_order:
            sigma_prev = float(self.sigmas[i - 1])
            r = math.log(sigma_prev / sigma) / math.log(sigma / sigma_next)  # (λ_i − λ_{i−1}) / h
            d = x0 + (x0 - self._x0_prev) / (2 * r)
        self._x0_prev = x0
        x_next = (sigma_next * alpha_next) / (sigma * alpha) * x32 - alpha_next * (sigma_next / sigma - 1) * d
        return x_next.to(x.dtype)


class LMS(Sampler):
    """Linear multistep in sigma space on the probability-flow ODE dx/dσ = (x − x̂₀)/σ (Karras et al. 2022;
    k-diffusion `sample_lms`). The latents live at scale x = x₀ + σε (the variance-preserving x_t times √(σ² + 1)):

        d_i = (x_i − x̂₀_i)/σ_i,    x_{i+1} = x_i + Σ_k c_k d_{i−k},    k < order_i = min(i + 1, order)
        c_k = ∫_{σ_i}^{σ_{i+1}} ∏_{j ≠ k} (τ − σ_{i−j})/(σ_{i−k} − σ_{i−j}) dτ

    (the Adams-Bashforth weights for uneven steps). diffusers integrates c_k with scipy's `quad`; the integrand is a
    polynomial of degree order_i − 1 ≤ 3, which 4-point Gauss-Legendre integrates exactly (without scipy).
    The UNet sees x/√(σ² + 1); the trajectory starts from noise · √(σ_max² + 1) (leading spacing) or σ_max.
    """

    def __init__(self, schedule: NoiseSchedule, *, order: int = 4, final_sigmas_type: str = "zero"):
        super().__init__(schedule)
        _check_choice("order", order, (1, 2, 3, 4))
        _check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)
        self.order = order
        self.final_sigmas_type = final_sigmas_type
        self.sigmas: np.ndarray | None = None  # (len(timesteps) + 1,) float32
        self._reset()

    def _timesteps(self, num_steps: int) -> np.ndarray:
        """The timesteps (float32: linspace spacing leaves them fractional), and σ at each plus the final σ."""
        timesteps = self.schedule.spaced_timesteps(num_steps).astype(np.float32)
        self.sigmas = self.schedule.trajectory_sigmas(timesteps, self.final_sigmas_type)
        return timesteps

    def _reset(self) -> None:
        self._derivatives: list[Tensor] = []  # d_i, newest last

    @property
    def init_noise_sigma(self) -> float:
        if self.sigmas is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")
        sigma_max = float(self.sigmas.max())
        return (sigma_max ** 2 + 1) ** 0.5 if self.schedule.timestep_spacing == "leading" else sigma_max

    def scale_model_input(self, x: Tensor, t: Tensor | float) -> Tensor:
        """x/√(σ² + 1): the variance-preserving point the UNet was trained on."""
        sigma = float(self.sigmas[self._check(t)])
        return x / (sigma ** 2 + 1) ** 0.5

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x₀ + σ_t ε (this sampler's scale; σ interpolated at t). Training targets use `schedule.add_noise`."""
        t = self.schedule.check_timesteps(t)
        sigma = _per_row(torch.from_numpy(self.schedule.sigmas_at(t.numpy())), x0)
        return x0 + sigma * noise

    def step(self, model_output: Tensor, t: Tensor | float, x: Tensor, *, generator: torch.Generator | None = None,
             noise: Tensor | None = None) -> Tensor:
        """x_i -> x_{i+1} (deterministic: generator and noise are not used)."""
        i = self._check(t)
        self.step_index += 1
        sigma = float(self.sigmas[i])
        x32 = x.float()
        # x̂₀ from the variance-preserving point x/√(σ² + 1) = αx₀ + sε, α = 1/√(σ² + 1), s = σα
        scale = (sigma ** 2 + 1) ** -0.5
        x0 = self.schedule.denoise(model_output.float(), x32 * scale, scale, sigma * scale)[0]
        self._derivatives = (self._derivatives + [(x32 - x0) / sigma])[-self.order:]
        coefficients = lms_coefficients(self.sigmas, i, len(self._derivatives))
        x_next = x32
        for c, d in zip(coefficients, reversed(self._derivatives)):
            x_next = x_next + c * d
        return x_next.to(x.dtype)


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """c_k for k < order: the integral over [σ_i, σ_{i+1}] of the Lagrange basis polynomial through σ_i, σ_{i−1}, …,
    σ_{i−order+1} that is 1 at σ_{i−k}, by 4-point Gauss-Legendre quadrature (exact up to degree 7)."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    s = sigmas.astype(np.float64)
    a, b = s[i], s[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    coefficients = []
    for k in range(order):
        basis = np.ones_like(tau)
        for j in range(order):
            if j != k:
                basis *= (tau - s[i - j]) / (s[i - k] - s[i - j])
        coefficients.append(float((b - a) / 2 * np.dot(weights, basis)))
    return coefficients


class Euler(LMS):
    """Euler's method in sigma space (Karras et al. 2022, Algorithm 2 with S_churn = 0 and without its second-order
    correction; k-diffusion `sample_euler`):
    x_{i+1} = x_i + (σ_{i+1} − σ_i)(x_i − x̂₀_i)/σ_i, which is LMS of order 1."""

    def __init__(self, schedule: NoiseSchedule, *, final_sigmas_type: str = "zero"):
        super().__init__(schedule, order=1, final_sigmas_type=final_sigmas_type)


# ---- diffusers' scheduler_config.json -> a sampler -------------------------------------------------------------

_CLASS_NAMES = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpm",
                "EulerDiscreteScheduler": "euler", "LMSDiscreteScheduler": "lms"}
# The NoiseSchedule's fields, with the defaults of every diffusers scheduler here (timestep_spacing's differs).
_SCHEDULE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          trained_betas=None, prediction_type="epsilon", steps_offset=0)
# The fields each diffusers class takes (besides the schedule's) that we read, with that class's defaults.
_READ = {
    "ddim": dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True, clip_sample_range=1.0),
    "pndm": dict(timestep_spacing="leading", set_alpha_to_one=False, skip_prk_steps=False),
    "dpm": dict(timestep_spacing="linspace", solver_order=2, lower_order_final=True, euler_at_final=False,
                final_sigmas_type="zero"),
    "euler": dict(timestep_spacing="linspace", final_sigmas_type="zero"),
    "lms": dict(timestep_spacing="linspace"),
}
# Fields a class takes whose other values would change the arithmetic in ways not written here: held at one value.
_SIGMA_SPACING = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_FIXED = {
    "ddim": dict(thresholding=False, rescale_betas_zero_snr=False),
    "pndm": {},
    "dpm": dict(_SIGMA_SPACING, algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=False,
                use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-math.inf, variance_type=None,
                rescale_betas_zero_snr=False, use_dynamic_shifting=False),
    "euler": dict(_SIGMA_SPACING, interpolation_type="linear", timestep_type="discrete", rescale_betas_zero_snr=False),
    "lms": dict(_SIGMA_SPACING),
}
# Fields a class takes that change nothing at the fixed values above (they tune thresholding, Karras/flow sigmas or
# dynamic shifting, all off): ignored on purpose.
IGNORED = {
    "ddim": ("dynamic_thresholding_ratio", "sample_max_value"),
    "pndm": (),
    "dpm": ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"),
    "euler": ("sigma_min", "sigma_max"),
    "lms": (),
}
_KNOWN = set(_SCHEDULE_DEFAULTS) | {key for table in (_READ, _FIXED, IGNORED) for fields in table.values()
                                    for key in fields}


def from_config(config: dict, name: str | None = None) -> Sampler:
    """The sampler a diffusers `scheduler_config.json` describes, or with `name` ("ddim", "pndm", "dpm", "euler",
    "lms") that sampler on the config's noise schedule, as diffusers' `OtherScheduler.from_config(config)` builds it:
    fields the named class does not take are dropped (a DDIM config's clip_sample means nothing to Euler), fields
    it takes but the config lacks get that class's defaults (DPM-Solver's solver_order=2, final_sigmas_type="zero").
    Fields no diffusers scheduler here takes are errors, as are values we do not implement."""
    class_name = config.get("_class_name")
    if class_name not in _CLASS_NAMES:
        raise hub.CheckpointError(f"scheduler config: _class_name={class_name!r} is not one of "
                                  f"{sorted(_CLASS_NAMES)}")
    if name is None:
        name = _CLASS_NAMES[class_name]
    if name not in NAMES:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(NAMES)}")
    values = dict(_SCHEDULE_DEFAULTS, **_READ[name], **_FIXED[name])
    takes = set(values) | set(IGNORED[name])
    for key, value in config.items():
        if key.startswith("_"):  # _class_name, _diffusers_version, _use_default_values: bookkeeping
            continue
        if key not in _KNOWN:
            raise hub.CheckpointError(f"scheduler config ({class_name}): unknown field {key!r}={value!r}")
        if key in takes:
            values[key] = value
    for key, expected in _FIXED[name].items():
        if values[key] != expected:
            raise hub.CheckpointError(f"scheduler config ({class_name}): {key}={values[key]!r} is not supported "
                                      f"(only {expected!r})")
    try:
        schedule = NoiseSchedule(**{key: values[key] for key in (*_SCHEDULE_DEFAULTS, "timestep_spacing")})
        if name == "ddim":
            return DDIM(schedule, set_alpha_to_one=values["set_alpha_to_one"], clip_sample=values["clip_sample"],
                        clip_sample_range=values["clip_sample_range"])
        if name == "pndm":
            return PNDM(schedule, skip_prk_steps=values["skip_prk_steps"],
                        set_alpha_to_one=values["set_alpha_to_one"])
        if name == "dpm":
            return DPMSolver(schedule, solver_order=values["solver_order"],
                             lower_order_final=values["lower_order_final"], euler_at_final=values["euler_at_final"],
                             final_sigmas_type=values["final_sigmas_type"])
        if name == "euler":
            return Euler(schedule, final_sigmas_type=values["final_sigmas_type"])
        return LMS(schedule)
    except (TypeError, ValueError) as err:  # a field of the wrong type or an unsupported value
        raise hub.CheckpointError(f"scheduler config ({class_name}): {err}") from err


def load_scheduler(name_or_path: str | os.PathLike, name: str | None = None) -> Sampler:
    """`from_config` on `scheduler/scheduler_config.json` of a diffusers pipeline folder (or hub id), or on
    `scheduler_config.json` of the scheduler folder itself."""
    folder = hub.resolve(name_or_path, allow_patterns=["scheduler/scheduler_config.json", "scheduler_config.json"])
    path = folder / "scheduler_config.json"
    if not path.is_file():
        path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise hub.CheckpointError(f"{folder} holds neither scheduler/scheduler_config.json nor "
                                  f"scheduler_config.json")
    try:
        return from_config(hub.read_json(path), name)
    except hub.CheckpointError as err:
        raise hub.CheckpointError(f"{path}: {err}") from err
