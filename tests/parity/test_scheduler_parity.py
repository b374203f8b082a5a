"""The samplers against diffusers' schedulers built from the checkpoints' scheduler config (specs/ldm.md §3).

Each case runs one whole trajectory on both sides: the same initial noise, the same deterministic fake UNet (a
nonlinear function of its input and t, so every step depends on all the steps before it), our sampler from
`from_config(OFFICIAL, name)` against diffusers' `Scheduler.from_config(OFFICIAL)`. Compared: the timesteps
(equal), `init_noise_sigma`, every UNet input (`scale_model_input`) and every intermediate x.

Tolerance: max abs error <= 1e-5 * max(1, max |x_ref|) at every step. The variance-preserving samplers keep x of
order 1; the sigma-space ones (Euler, LMS) start at noise * sqrt(sigma_max^2 + 1) ~ 58 * noise, hence the relative
form. Observed: ~1e-6 relative (diffusers computes its coefficients in float32, we in float64).
"""

import math

import numpy as np
import pytest
import torch

from musiclm_core.schedulers import NAMES, from_config, load_scheduler

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       LMSDiscreteScheduler, PNDMScheduler)

RTOL = 1e-5

# scheduler/scheduler_config.json of ucsd-reach/musicldm and cvssp/audioldm2(-large, -music), specs/ldm.md §3.1.
OFFICIAL = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "rescale_betas_zero_snr": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
REFERENCE = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "dpm": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler, "lms": LMSDiscreteScheduler}
ALPHAS_CUMPROD = DDIMScheduler.from_config(OFFICIAL).alphas_cumprod.double()
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # diffusers' np.array(tensor) on numpy 2
              pytest.mark.usefixtures("one_thread")]


def fake_unet(x: torch.Tensor, t, prediction_type: str, shift: float = 0.0) -> torch.Tensor:
    """A stand-in UNet that behaves like a trained one: it "denoises" its (variance-preserving) input x to a bounded
    nonlinear x0 = f(x, t) and returns the epsilon or v that x0 implies, so trajectories stay of order one."""
    t = float(t)
    alpha_bar = ALPHAS_CUMPROD[min(max(round(t), 0), 999)].item()
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    x0 = 0.8 * torch.tanh(1.3 * x + math.sin(t / 150.0)) + 0.2 * torch.sin(2.0 * x) * math.cos(t / 90.0) + shift
    if prediction_type == "epsilon":
        return (x - a * x0) / s
    return (a * x - x0) / s  # v = a * eps - s * x0


def noise(seed=0, shape=(2, 4, 8, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def run_ours(sampler, n, prediction_type, x_init, step_kwargs=lambda i: {}, shift_at=None):
    sampler.set_timesteps(n)
    x = x_init * sampler.init_noise_sigma
    inputs, xs = [], []
    for i, t in enumerate(sampler.timesteps):
        unet_in = sampler.scale_model_input(x, t)
        out = fake_unet(unet_in, t, prediction_type, shift=0.01 if i == shift_at else 0.0)
        x = sampler.step(out, t, x, **step_kwargs(i))
        inputs.append(unet_in)
        xs.append(x)
    return inputs, xs


def run_diffusers(scheduler, n, prediction_type, x_init, step_kwargs=lambda i: {}):
    scheduler.set_timesteps(n)
    x = x_init * scheduler.init_noise_sigma
    inputs, xs = [], []
    for i, t in enumerate(scheduler.timesteps):
        unet_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_unet(unet_in, t, prediction_type), t, x, **step_kwargs(i)).prev_sample
        inputs.append(unet_in)
        xs.append(x)
    return inputs, xs


def assert_trajectories_match(ref, ours):
    assert len(ref) == len(ours)
    for i, (a, b) in enumerate(zip(ref, ours)):
        scale = max(1.0, a.abs().max().item())
        err = (a - b).abs().max().item()
        assert err <= RTOL * scale, f"step {i}: max abs error {err:.3g} > {RTOL} * {scale:.3g}"


def check_case(name, config, n, step_ours=lambda i: {}, step_ref=lambda i: {}):
    ref, ours = REFERENCE[name].from_config(config), from_config(config, name)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    prediction_type = config["prediction_type"]
    x_init = noise()
    ref_inputs, ref_xs = run_diffusers(ref, n, prediction_type, x_init, step_ref)
    our_inputs, our_xs = run_ours(ours, n, prediction_type, x_init, step_ours)
    assert_trajectories_match(ref_inputs, our_inputs)
    assert_trajectories_match(ref_xs, our_xs)
    return ours, our_xs


def test_official_config_is_the_spec():
    """The dict above against the facts specs/ldm.md §3 states about it, computed by diffusers and by us."""
    ref = DDIMScheduler.from_config(OFFICIAL)
    ours = from_config(OFFICIAL)
    for alphas_cumprod in (ref.alphas_cumprod, ours.schedule.alphas_cumprod):
        assert alphas_cumprod[0].item() == pytest.approx(0.99849999, abs=1e-8)
        assert alphas_cumprod[999].item() == pytest.approx(1.4230386e-4, rel=1e-6)
    ours.set_timesteps(200)
    assert ours.timesteps[:3].tolist() == [996, 991, 986] and ours.timesteps[-1].item() == 1
    ours.set_timesteps(25)
    assert ours.timesteps[:2].tolist() == [961, 921] and ours.timesteps[-1].item() == 1
    dpm = from_config(OFFICIAL, "dpm")
    dpm.set_timesteps(20)
    assert dpm.timesteps[:2].tolist() == [941, 894] and dpm.timesteps[-2:].tolist() == [95, 48]
    np.testing.assert_allclose(dpm.sigmas[[0, 1, 2, -3, -2, -1]],
                               [48.46839, 32.1664, 21.97586, 0.447881, 0.294476, 0.0], rtol=1e-5)
    dpm.set_timesteps(25)
    assert dpm.timesteps[:2].tolist() == [951, 913] and dpm.timesteps[-2:].tolist() == [77, 39]
    pndm = from_config(OFFICIAL, "pndm")
    pndm.set_timesteps(25)
    assert len(pndm.timesteps) == 34
    assert pndm.timesteps[:14].tolist() == [961, 941, 941, 921, 921, 901, 901, 881, 881, 861, 861, 841, 841, 801]
    euler = from_config(OFFICIAL, "euler")
    euler.set_timesteps(25)
    assert euler.init_noise_sigma == pytest.approx(58.2434, abs=1e-4)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", NAMES)
def test_timesteps_and_sigmas_for_every_step_count(name, spacing):
    """Timesteps (and the sigma-space samplers' sigmas) equal diffusers' for every N from 1 to T, except:
    * N where we raise: leading + offset past T − 1 (N = 1000; DPM-Solver, which spaces N + 1 points: N = 999),
      PNDM's warm-up with N < 4;
    * trailing N where diffusers' float arange yields an (N + 1)th timestep of -1: we keep the first N."""
    config = dict(OFFICIAL, timestep_spacing=spacing)
    ref, ours = REFERENCE[name].from_config(config), from_config(config, name)
    checked = 0
    for n in range(1, 1001):
        try:
            ours.set_timesteps(n)
        except ValueError:
            assert (spacing == "leading" and n >= 999) or (name == "pndm" and n < 4)  # DPM: N + 1 points
            continue
        ref.set_timesteps(n)
        k = len(ours.timesteps)
        if len(ref.timesteps) == k + 1:
            assert spacing == "trailing" and ref.timesteps[-1] == -1
        else:
            assert len(ref.timesteps) == k
        assert torch.equal(ref.timesteps[:k], ours.timesteps), n
        if name in ("dpm", "euler", "lms"):
            np.testing.assert_array_equal(ref.sigmas.numpy()[:k], ours.sigmas[:k], err_msg=str(n))
            assert ref.sigmas[-1].item() == ours.sigmas[-1]
        checked += 1
    assert checked >= 995


@pytest.mark.parametrize("n", [10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_trajectory(name, prediction_type, n):
    check_case(name, dict(OFFICIAL, prediction_type=prediction_type), n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["ddim"] + [pytest.param(name, marks=pytest.mark.slow) for name in NAMES[1:]])
def test_200_steps(name, prediction_type):
    """The pipelines' default: 200 steps (DDIM's in the default run; the others, seconds each, with -m slow)."""
    check_case(name, dict(OFFICIAL, prediction_type=prediction_type), 200)


# Settings the checkpoints do not use but the samplers implement: other spacings, beta schedule, flags.
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0)
VARIANTS = [
    ("ddim", dict(timestep_spacing="trailing")),
    ("ddim", dict(timestep_spacing="linspace", prediction_type="v_prediction")),
    ("ddim", dict(set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.5)),
    ("ddim", LINEAR),
    ("pndm", dict(skip_prk_steps=True)),
    ("pndm", dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("pndm", dict(timestep_spacing="linspace", set_alpha_to_one=True)),
    ("pndm", dict(LINEAR, prediction_type="v_prediction")),
    ("dpm", dict(solver_order=1)),
    ("dpm", dict(final_sigmas_type="sigma_min")),
    ("dpm", dict(final_sigmas_type="sigma_min", euler_at_final=True, prediction_type="v_prediction")),
    ("dpm", dict(timestep_spacing="trailing")),
    ("dpm", dict(timestep_spacing="linspace")),
    ("euler", dict(timestep_spacing="linspace")),  # fractional timesteps, sigma interpolated between table entries
    ("euler", dict(timestep_spacing="trailing", final_sigmas_type="sigma_min", prediction_type="v_prediction")),
    ("lms", dict(timestep_spacing="linspace", prediction_type="v_prediction")),
    ("lms", dict(LINEAR, timestep_spacing="trailing")),
]


@pytest.mark.parametrize("n", [9, 25])  # 9: an odd 1000 // 9 (PNDM's half steps), fractional linspace
@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                        for n, o in VARIANTS])
def test_variant_trajectory(name, overrides, n):
    check_case(name, dict(OFFICIAL, **overrides), n)


def test_dpm_lower_order_final_below_15_steps():
    """With a nonzero final sigma the last step is second order from 15 steps on, first order below."""
    for n in (10, 16):
        check_case("dpm", dict(OFFICIAL, final_sigmas_type="sigma_min"), n)
        check_case("dpm", dict(OFFICIAL, final_sigmas_type="sigma_min", lower_order_final=False), n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_with_generator(prediction_type):
    """eta > 0: both draw the step noise from equally seeded generators (diffusers' randn_tensor: model-output shape
    and dtype, on the generator's device)."""
    config = dict(OFFICIAL, prediction_type=prediction_type)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ours = from_config(config)
    ours.eta = 0.8
    ref = DDIMScheduler.from_config(config)
    x_init = noise()
    _, ref_xs = run_diffusers(ref, 25, prediction_type, x_init, lambda i: dict(eta=0.8, generator=g_ref))
    _, our_xs = run_ours(ours, 25, prediction_type, x_init, lambda i: dict(generator=g_ours))
    assert_trajectories_match(ref_xs, our_xs)
    # the noise matters: another seed moves the result far beyond the tolerance
    ours.set_timesteps(25)
    g_other = torch.Generator().manual_seed(8)
    _, other_xs = run_ours(ours, 25, prediction_type, x_init, lambda i: dict(generator=g_other))
    assert (other_xs[-1] - our_xs[-1]).abs().max() > 1e-2


def test_ddim_eta_with_explicit_noise():
    zs = [noise(100 + i) for i in range(10)]
    ours = from_config(OFFICIAL)
    ours.eta = 1.0
    x_init = noise()
    _, ref_xs = run_diffusers(DDIMScheduler.from_config(OFFICIAL), 10, "epsilon", x_init,
                              lambda i: dict(eta=1.0, variance_noise=zs[i]))
    _, our_xs = run_ours(ours, 10, "epsilon", x_init, lambda i: dict(noise=zs[i]))
    assert_trajectories_match(ref_xs, our_xs)


@pytest.mark.parametrize("name", NAMES)
def test_trajectory_listens_to_every_step(name):
    """The fixture can fail: a 0.01 change of the model output at one middle call moves the end of the trajectory
    by far more than the tolerance, for every sampler (multistep history included)."""
    sampler = from_config(OFFICIAL, name)
    _, xs = run_ours(sampler, 25, "epsilon", noise())
    middle = len(sampler.timesteps) // 2
    _, shifted = run_ours(sampler, 25, "epsilon", noise(), shift_at=middle)
    assert torch.allclose(xs[middle - 1], shifted[middle - 1])
    assert (xs[-1] - shifted[-1]).abs().max() > 100 * RTOL


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_and_velocity(name):
    """add_noise against diffusers (at timesteps of the sampler's schedule, which the sigma-space ones require);
    get_velocity against DDIMScheduler's (the only correct reference: diffusers' Euler indexes ᾱ by step)."""
    ref, ours = REFERENCE[name].from_config(OFFICIAL), from_config(OFFICIAL, name)
    ref.set_timesteps(25)
    ours.set_timesteps(25)
    x0, eps = noise(1), noise(2)
    t = ref.timesteps[[3, 11]]  # (B,) = (2,)
    expected = ref.add_noise(x0, eps, t)
    got = ours.add_noise(x0, eps, t)
    assert (got - expected).abs().max() <= RTOL * max(1.0, expected.abs().max().item())
    one = ours.add_noise(x0, eps, t[1])  # a single timestep for the whole batch
    assert (one - ref.add_noise(x0, eps, t[1:].expand(2))).abs().max() <= RTOL * max(1.0, one.abs().max().item())
    t_train = torch.tensor([0, 999])
    ddim = DDIMScheduler.from_config(OFFICIAL)
    torch.testing.assert_close(ours.get_velocity(x0, eps, t_train), ddim.get_velocity(x0, eps, t_train),
                               rtol=0, atol=1e-6)


# Our attribute -> diffusers' config field, per sampler (besides the NoiseSchedule's fields).
OPTIONS = {"ddim": ("set_alpha_to_one", "clip_sample", "clip_sample_range"),
           "pndm": ("skip_prk_steps", "set_alpha_to_one"),
           "dpm": ("solver_order", "lower_order_final", "euler_at_final", "final_sigmas_type"),
           "euler": ("final_sigmas_type",), "lms": ()}


@pytest.mark.parametrize("source", ["official", "bare", "written"])
@pytest.mark.parametrize("name", NAMES)
def test_config_reading_matches_diffusers(name, source, tmp_path):
    """from_config takes what diffusers takes:
    * official: `from_config(OFFICIAL, name)` as `X.from_config(OFFICIAL)` (DPM-Solver: solver_order 2, dpmsolver++,
      lower_order_final, final_sigmas_type "zero", leading spacing and offset 1 from the DDIM config);
    * bare: a config with only `_class_name`, every field at the class's defaults (DDIM: clip_sample, and
      set_alpha_to_one true);
    * written: the complete config diffusers writes for X built from OFFICIAL (every field, hidden ones too), read
      with `load_scheduler`; a field a new diffusers adds fails here."""
    class_name = REFERENCE[name].__name__
    if source == "official":
        ref, ours = REFERENCE[name].from_config(OFFICIAL), from_config(OFFICIAL, name)
    elif source == "bare":
        ref, ours = REFERENCE[name].from_config({"_class_name": class_name}), from_config({"_class_name": class_name})
    else:
        REFERENCE[name].from_config(OFFICIAL).save_config(tmp_path)
        ref, ours = REFERENCE[name].from_pretrained(tmp_path), load_scheduler(tmp_path)
    assert type(ours) is type(from_config(OFFICIAL, name))
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "timestep_spacing", "steps_offset"):
        assert getattr(ours.schedule, key) == ref.config[key], key
    for key in OPTIONS[name]:
        assert getattr(ours, key) == ref.config[key], key
    if name == "dpm":
        assert (ref.config.algorithm_type, ref.config.solver_type) == ("dpmsolver++", "midpoint")
