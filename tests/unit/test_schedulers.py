"""Samplers on their own: the timestep rules, the last DDIM step, trajectory state, config reading and errors.
(Trajectories against diffusers: tests/parity/test_scheduler_parity.py.)"""

import json

import numpy as np
import pytest
import torch

from musiclm_core.hub import CheckpointError
from musiclm_core.schedulers import (DDIM, LMS, NAMES, DPMSolver, Euler, NoiseSchedule, PNDM, from_config,
                                     lms_coefficients, load_scheduler)

# The checkpoints' DDIMScheduler config (specs/ldm.md §3.1)
CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.21.0", "num_train_timesteps": 1000,
          "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
          "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": False, "steps_offset": 1,
          "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
          "rescale_betas_zero_snr": False, "timestep_spacing": "leading", "trained_betas": None}
SCHEDULE = NoiseSchedule(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", steps_offset=1)


def fake_eps(x, t):
    return torch.tanh(x + float(t) / 300.0)


def trajectory(sampler, n, seed=0):
    sampler.set_timesteps(n)
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed)) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        x = sampler.step(fake_eps(sampler.scale_model_input(x, t), t), t, x)
    return x


# ---- timestep rules ----------------------------------------------------------------------------------------

def test_leading_spacing_with_offset():
    ddim = DDIM(SCHEDULE)
    ddim.set_timesteps(25)
    assert ddim.timesteps.tolist() == list(range(961, 0, -40))
    ddim.set_timesteps(200)
    assert ddim.timesteps.tolist() == list(range(996, 0, -5))
    assert ddim.timesteps.dtype == torch.int64


def test_leading_offset_past_the_last_timestep_is_an_error():
    # 1000 steps of 1 plus offset 1 would ask for ᾱ at t = 1000
    with pytest.raises(ValueError, match="timestep 1000, past the last training timestep 999"):
        DDIM(SCHEDULE).set_timesteps(1000)
    DDIM(NoiseSchedule(steps_offset=0)).set_timesteps(1000)


def test_trailing_spacing():
    ddim = DDIM(NoiseSchedule(timestep_spacing="trailing"))
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == list(range(999, 0, -100))
    # diffusers' float arange yields 62 timesteps here, the last -1; we keep the 61 asked for
    ddim.set_timesteps(61)
    assert len(ddim.timesteps) == 61 and ddim.timesteps.min() >= 0 and ddim.timesteps[0] == 999


def test_linspace_spacing_is_fractional_for_sigma_samplers_only():
    schedule = NoiseSchedule(timestep_spacing="linspace")
    euler, ddim = Euler(schedule), DDIM(schedule)
    euler.set_timesteps(7)
    ddim.set_timesteps(7)
    np.testing.assert_allclose(euler.timesteps.numpy(), np.linspace(999, 0, 7), rtol=1e-7)
    assert euler.timesteps[1].item() == pytest.approx(832.5) and euler.timesteps.dtype == torch.float32
    assert ddim.timesteps.tolist() == [999, 832, 666, 500, 333, 166, 0]  # numpy rounds halves to even
    # σ between two table entries is interpolated linearly
    table = schedule.sigma_table
    assert euler.sigmas[1] == pytest.approx((table[832] + table[833]) / 2, rel=1e-6)


def test_dpm_takes_one_more_point_and_drops_the_last():
    dpm = DPMSolver(SCHEDULE)
    dpm.set_timesteps(25)
    assert dpm.timesteps.tolist() == [i * 38 + 1 for i in range(25, 0, -1)]  # 1000 // 26 = 38
    assert len(dpm.sigmas) == 26 and dpm.sigmas[-1] == 0.0


def test_pndm_runge_kutta_warm_up_calls():
    pndm = PNDM(SCHEDULE)
    pndm.set_timesteps(25)
    assert len(pndm.timesteps) == 25 + 9
    assert pndm.timesteps[:13].tolist() == [961, 941, 941, 921, 921, 901, 901, 881, 881, 861, 861, 841, 841]
    assert pndm.timesteps[13:].tolist() == list(range(801, 0, -40))
    skip = PNDM(SCHEDULE, skip_prk_steps=True)
    skip.set_timesteps(25)
    assert skip.timesteps.tolist() == [961, 921] + list(range(921, 0, -40))
    with pytest.raises(ValueError, match="needs num_inference_steps >= 4"):
        PNDM(SCHEDULE).set_timesteps(3)


def test_sigma_samplers_start_from_scaled_noise():
    lms = LMS(SCHEDULE)
    lms.set_timesteps(25)
    assert lms.init_noise_sigma == pytest.approx((float(lms.sigmas[0]) ** 2 + 1) ** 0.5)  # leading spacing
    x = torch.ones(3)
    torch.testing.assert_close(lms.scale_model_input(x, lms.timesteps[0]), x / lms.init_noise_sigma)
    trailing = LMS(NoiseSchedule(timestep_spacing="trailing"))
    trailing.set_timesteps(10)
    assert trailing.init_noise_sigma == pytest.approx(float(trailing.sigmas[0]))


# ---- the arithmetic of single steps -------------------------------------------------------------------------

@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_last_step_uses_alpha_bar_zero_or_one(set_alpha_to_one):
    """The last step (t = 1 -> t' = -39) goes to ᾱ₀ = 0.9985 (the checkpoints), or to 1 (a clean x̂₀)."""
    ddim = DDIM(SCHEDULE, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    ddim.set_timesteps(25)
    x, eps = torch.randn(4), torch.randn(4)
    ab = float(SCHEDULE.alphas_cumprod[1])
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
    ab_prev = 1.0 if set_alpha_to_one else 0.99849999
    expected = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps
    torch.testing.assert_close(ddim.step(eps, 1, x), expected, rtol=0, atol=1e-5)


def test_ddim_clips_x0():
    ddim = DDIM(SCHEDULE, clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True)
    ddim.set_timesteps(25)
    x = torch.tensor([-5.0, 0.1, 5.0])
    assert ddim.step(torch.zeros(3), 1, x).abs().max() <= 0.5 + 1e-6


def test_velocity_and_add_noise_invert_each_other():
    """x_t from add_noise and the v target give back x₀ through a v-prediction denoise."""
    schedule = NoiseSchedule(prediction_type="v_prediction")
    x0, eps, t = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.tensor([0, 500, 999])
    xt, v = schedule.add_noise(x0, eps, t), schedule.get_velocity(x0, eps, t)
    for b in range(3):
        ab = float(schedule.alphas_cumprod[t[b]])
        x0_hat, eps_hat = schedule.denoise(v[b], xt[b], ab ** 0.5, (1 - ab) ** 0.5)
        torch.testing.assert_close(x0_hat, x0[b], rtol=0, atol=1e-5)
        torch.testing.assert_close(eps_hat, eps[b], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="whole numbers"):
        schedule.add_noise(x0, eps, torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.get_velocity(x0, eps, torch.tensor([0, 1, 1000]))


def test_lms_coefficients_integrate_exactly():
    """Gauss-Legendre against scipy's quad (what diffusers uses) on the Lagrange basis; order 1 is Euler's step."""
    integrate = pytest.importorskip("scipy.integrate")
    sigmas = np.array([14.6, 9.1, 5.3, 2.2, 0.9, 0.0], dtype=np.float32)
    s = sigmas.astype(np.float64)
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        ours = lms_coefficients(sigmas, i, order)
        for k in range(order):
            def basis(tau):
                return np.prod([(tau - s[i - j]) / (s[i - k] - s[i - j]) for j in range(order) if j != k])
            expected = integrate.quad(basis, s[i], s[i + 1], epsabs=1e-13, epsrel=1e-13)[0]
            assert ours[k] == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert sum(ours) == pytest.approx(s[i + 1] - s[i], rel=1e-10)  # the weights of a constant derivative
    assert lms_coefficients(sigmas, 2, 1) == [pytest.approx(s[3] - s[2], rel=1e-12)]


@pytest.mark.parametrize("name", NAMES)
def test_steps_keep_the_sample_dtype(name):
    """Updates run in float32 and come back in the sample's dtype (bfloat16 latents stay bfloat16)."""
    exact, low = from_config(CONFIG, name), from_config(CONFIG, name)
    exact.set_timesteps(10)
    low.set_timesteps(10)
    x = torch.randn(2, 3)
    t = exact.timesteps[0]
    out = low.step(fake_eps(x, t).bfloat16(), t, x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), exact.step(fake_eps(x, t), t, x), rtol=2e-2, atol=2e-2)


# ---- state ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_set_timesteps_starts_a_fresh_trajectory(name):
    """History from an earlier (or abandoned) trajectory does not leak into the next one."""
    fresh = trajectory(from_config(CONFIG, name), 10)
    sampler = from_config(CONFIG, name)
    trajectory(sampler, 25, seed=1)
    sampler.set_timesteps(7)  # abandoned after two steps
    x = torch.randn(1, 2, 4, 4)
    for t in sampler.timesteps[:2]:
        x = sampler.step(fake_eps(sampler.scale_model_input(x, t), t), t, x)
    torch.testing.assert_close(trajectory(sampler, 10), fresh, rtol=0, atol=1e-6)
    assert (trajectory(sampler, 10, seed=1) - fresh).abs().max() > 1e-2  # the comparison can fail


@pytest.mark.parametrize("name", ["pndm", "dpm", "euler", "lms"])
def test_stepping_out_of_order_is_an_error(name):
    sampler = from_config(CONFIG, name)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="call set_timesteps"):
        sampler.step(x, 1, x)
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match=r"step 0 is at timestep \d+, got 5"):
        sampler.step(x, 5, x)
    for t in sampler.timesteps:
        x = sampler.step(torch.ones(2), t, x)
    with pytest.raises(ValueError, match="all stepped"):
        sampler.step(x, sampler.timesteps[-1], x)


# ---- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, True, None])
def test_bad_num_inference_steps(n):
    for name in NAMES:
        with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, "
                                             r"num_train_timesteps=1000\]"):
            from_config(CONFIG, name).set_timesteps(n)


def test_ddim_step_errors():
    ddim = from_config(CONFIG)
    with pytest.raises(ValueError, match="call set_timesteps"):
        ddim.step(torch.zeros(2), 1, torch.zeros(2))
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="either noise or generator"):
        ddim.step(torch.zeros(2), 1, torch.zeros(2), noise=torch.zeros(2), generator=torch.Generator())


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="solver_order=3"):
        DPMSolver(SCHEDULE, solver_order=3)
    with pytest.raises(ValueError, match="final_sigmas_type='max'"):
        Euler(SCHEDULE, final_sigmas_type="max")
    with pytest.raises(ValueError, match="order=5"):
        LMS(SCHEDULE, order=5)
    with pytest.raises(ValueError, match="trained_betas has 3 values, num_train_timesteps is 1000"):
        NoiseSchedule(trained_betas=[0.1, 0.2, 0.3])


# ---- from_config / load_scheduler ---------------------------------------------------------------------------

def test_from_config_builds_the_checkpoint_sampler_and_named_ones():
    ddim = from_config(CONFIG)
    assert type(ddim) is DDIM and not ddim.clip_sample and not ddim.set_alpha_to_one
    assert ddim.schedule == SCHEDULE
    types = {"ddim": DDIM, "pndm": PNDM, "dpm": DPMSolver, "euler": Euler, "lms": LMS}
    for name in NAMES:
        sampler = from_config(CONFIG, name)
        assert type(sampler) is types[name] and sampler.schedule == SCHEDULE
    # the defaults of the named class where the DDIM config says nothing (diffusers' from_config does the same)
    dpm = from_config(CONFIG, "dpm")
    assert (dpm.solver_order, dpm.lower_order_final, dpm.final_sigmas_type) == (2, True, "zero")
    assert from_config(CONFIG, "pndm").skip_prk_steps is False
    # a DDIM class's own defaults when its config omits a field: clip_sample=True, set_alpha_to_one=True
    bare = from_config({"_class_name": "DDIMScheduler"})
    assert bare.clip_sample and bare.set_alpha_to_one and bare.schedule == NoiseSchedule()
    assert from_config({"_class_name": "EulerDiscreteScheduler"}).schedule.timestep_spacing == "linspace"


def test_from_config_drops_fields_the_named_class_does_not_take():
    """clip_sample is DDIM's: an Euler built from a clipping DDIM config does not clip (as in diffusers)."""
    clipping = dict(CONFIG, clip_sample=True, clip_sample_range=0.01)
    euler = from_config(clipping, "euler")
    torch.testing.assert_close(trajectory(euler, 10), trajectory(from_config(CONFIG, "euler"), 10))
    assert (trajectory(from_config(clipping), 10) - trajectory(from_config(CONFIG), 10)).abs().max() > 0.1
    # the thresholding parameters do nothing with thresholding off: ignored
    from_config(dict(CONFIG, dynamic_thresholding_ratio=0.5, sample_max_value=3.0))


def test_from_config_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'; expected one of ddim, pndm, dpm, euler, lms"):
        from_config(CONFIG, "heun")
    with pytest.raises(CheckpointError, match="_class_name='KarrasVeScheduler' is not one of"):
        from_config(dict(CONFIG, _class_name="KarrasVeScheduler"))
    with pytest.raises(CheckpointError, match="_class_name=None"):
        from_config({k: v for k, v in CONFIG.items() if k != "_class_name"})
    with pytest.raises(CheckpointError, match="unknown field 'shift'=3"):
        from_config(dict(CONFIG, shift=3))
    with pytest.raises(CheckpointError, match="thresholding=True is not supported"):
        from_config(dict(CONFIG, thresholding=True))
    with pytest.raises(CheckpointError, match="use_karras_sigmas=True is not supported"):
        from_config(dict(CONFIG, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True))
    with pytest.raises(CheckpointError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        from_config(dict(CONFIG, algorithm_type="sde-dpmsolver++"), "dpm")
    with pytest.raises(CheckpointError, match="beta_schedule='squaredcos_cap_v2' is not supported"):
        from_config(dict(CONFIG, beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(CheckpointError, match="prediction_type='sample' is not supported"):
        from_config(dict(CONFIG, prediction_type="sample"))
    with pytest.raises(CheckpointError, match="timestep_spacing='karras' is not supported"):
        from_config(dict(CONFIG, timestep_spacing="karras"))


def test_load_scheduler_from_pipeline_or_scheduler_folder(tmp_path):
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIG))
    assert type(load_scheduler(tmp_path / "pipe")) is DDIM
    assert type(load_scheduler(tmp_path / "pipe" / "scheduler", "dpm")) is DPMSolver
    with pytest.raises(CheckpointError, match="holds neither scheduler/scheduler_config.json"):
        load_scheduler(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scheduler_config.json").write_text(json.dumps(dict(CONFIG, thresholding=True)))
    with pytest.raises(CheckpointError, match=r"bad/scheduler_config.json: .*thresholding=True"):
        load_scheduler(bad)
