"""The shared latent-diffusion pipeline code (musiclm_core/ldm.py): length bookkeeping, inputs, initial latents,
samplers, and the errors `generate` and `from_pretrained` give, on the tiny MusicLDM folder of the parity tests.
Parity with the reference pipelines is in tests/parity/test_{musicldm,audioldm2}_parity.py."""

import json
import shutil

import pytest
import torch

from musiclm_core import hub, schedulers
from musiclm_core.ldm import audio_frames, check_prompts, initial_latents, make_sampler

SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "beta_start": 0.0015, "beta_end": 0.0195,
                    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1, "num_train_timesteps": 1000}
OFFICIAL = dict(default_frames=1024, hop_s=0.01, factor=4, sample_rate=16000)


@pytest.mark.parametrize("seconds, expected", [
    (None, (1024, 163840)),   # unet sample_size 256 · 4 frames: 10.24 s
    (10.24, (1024, 163840)),
    (10.0, (1000, 160000)),
    (2.5, (252, 40000)),      # 250 frames rounded up to a multiple of 4
    (12.3, (1232, 196800)),   # 1230 (int(12.3 / 0.01) = 1230) -> 1232
    (0.29, (28, 4640)),       # int(0.29 / 0.01) = 28: the float division truncates, 28 is a multiple of 4
    (0.3, (32, 4800)),        # int(0.3 / 0.01) = 29 -> 32
    (0.04, (4, 640)),         # the shortest: one latent frame
    (3, (300, 48000)),        # an int
])
def test_audio_frames(seconds, expected):
    assert audio_frames(seconds, **OFFICIAL) == expected


@pytest.mark.parametrize("seconds, message", [
    (0, "at least 0.04 s"), (-1.0, "at least 0.04 s"), (0.039, "at least 0.04 s"),
    (float("nan"), "finite number"), (float("inf"), "finite number"), ("5", "finite number"), (True, "finite"),
])
def test_audio_frames_errors(seconds, message):
    with pytest.raises(ValueError, match=message):
        audio_frames(seconds, **OFFICIAL)


def test_audio_frames_without_default():
    with pytest.raises(ValueError, match="no sample_size"):
        audio_frames(None, **dict(OFFICIAL, default_frames=None))


def test_check_prompts():
    assert check_prompts("rock", None) == (["rock"], None)
    assert check_prompts(["a", "b"], "noise") == (["a", "b"], ["noise", "noise"])
    assert check_prompts(("a", "b"), ["x", ""]) == (["a", "b"], ["x", ""])  # an empty negative is fine


@pytest.mark.parametrize("prompts, negative, error, message", [
    ([], None, ValueError, "non-empty list"),
    ("", None, ValueError, r"prompt\(s\) \[0\] are empty"),
    (["a", "  "], None, ValueError, r"\[1\] are empty"),
    (["a", 3], None, TypeError, "must be strings"),
    (["a", "b"], ["x"], ValueError, "1 entries for 2 prompt"),
    (["a"], [None], TypeError, "negative_prompt must be"),
])
def test_check_prompts_errors(prompts, negative, error, message):
    with pytest.raises(error, match=message):
        check_prompts(prompts, negative)


def test_initial_latents():
    ddim = make_sampler(SCHEDULER_CONFIG, None, 0.0)
    shape = (2, 8, 4, 16)
    drawn = initial_latents(shape, ddim, latents=None, generator=torch.Generator().manual_seed(5),
                            dtype=torch.float32, device=torch.device("cpu"))
    assert torch.equal(drawn, torch.randn(shape, generator=torch.Generator().manual_seed(5)))  # same draw
    euler = make_sampler(SCHEDULER_CONFIG, "euler", 0.0)
    euler.set_timesteps(10)
    given = torch.ones(shape)
    scaled = initial_latents(shape, euler, latents=given, generator=None, dtype=torch.float32,
                             device=torch.device("cpu"))
    assert euler.init_noise_sigma > 10 and torch.allclose(scaled, given * euler.init_noise_sigma)
    for bad in (torch.ones(2, 8, 5, 16), torch.ones(8, 4, 16), torch.ones(shape, dtype=torch.long), [1.0]):
        with pytest.raises(ValueError, match=r"latents must be a float tensor of shape \(2, 8, 4, 16\)"):
            initial_latents(shape, ddim, latents=bad, generator=None, dtype=torch.float32, device=torch.device("cpu"))


def test_make_sampler():
    assert isinstance(make_sampler(SCHEDULER_CONFIG, None, 0.3), schedulers.DDIM)
    assert make_sampler(SCHEDULER_CONFIG, None, 0.3).eta == 0.3
    assert isinstance(make_sampler(SCHEDULER_CONFIG, "dpm", 0.0), schedulers.DPMSolver)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_sampler(SCHEDULER_CONFIG, "heun", 0.0)
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's"):
        make_sampler(SCHEDULER_CONFIG, "dpm", 0.5)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        make_sampler(SCHEDULER_CONFIG, None, -0.1)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    import ldm_fixtures

    return ldm_fixtures.write_musicldm(tmp_path_factory.mktemp("musicldm"))


@pytest.fixture(scope="module")
def pipe(folder):
    from musiclm_core.musicldm import MusicLDM

    return MusicLDM.from_pretrained(folder)


RUN = dict(audio_length_in_s=0.2, num_inference_steps=2)


def test_output_seed_and_progress(pipe):
    calls = []
    wav = pipe.generate(["rock", "jazz"], num_waveforms_per_prompt=2, seed=3, progress=lambda *a: calls.append(a),
                        **RUN)
    assert wav.shape == (4, 1, 3200) and wav.dtype == torch.float32 and pipe.sample_rate == 16000
    assert calls == [(1, 2), (2, 2)]
    again = pipe.generate(["rock", "jazz"], num_waveforms_per_prompt=2, seed=3, **RUN)
    other = pipe.generate(["rock", "jazz"], num_waveforms_per_prompt=2, seed=4, **RUN)
    assert (again - wav).abs().max() <= 1e-6
    assert (other - wav).abs().max() > 1e-2
    unguided = pipe.generate("rock", guidance_scale=1.0, seed=3, **RUN)
    assert unguided.shape == (1, 1, 3200) and (unguided[0] - wav[:2]).abs().amax() > 1e-2


@pytest.mark.parametrize("options, message", [
    (dict(audio_length_in_s=0), "audio_length_in_s must be at least 0.04 s"),
    (dict(audio_length_in_s=-2.0), "audio_length_in_s must be at least 0.04 s"),
    (dict(audio_length_in_s=0.03), "one latent frame"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
    (dict(num_inference_steps=-5), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=1001), r"num_inference_steps must be an integer in \[1, num_train_timesteps=1000\]"),
    (dict(num_waveforms_per_prompt=0), "num_waveforms_per_prompt must be a positive integer"),
    (dict(negative_prompt=["a", "b", "c"]), "negative_prompt has 3 entries for 2 prompt"),
    (dict(latents=torch.zeros(2, 8, 3, 16)), r"latents must be a float tensor of shape \(2, 8, 8, 16\)"),
    (dict(latents=torch.zeros(1, 8, 8, 16)), r"shape \(2, 8, 8, 16\)"),
    (dict(scheduler="ddpm"), "unknown scheduler 'ddpm'"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(scheduler="dpm", eta=0.5), "DDIM's stochasticity"),
])
def test_generate_errors(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(["rock", "jazz"], **{**RUN, "audio_length_in_s": 0.3, **options})


def test_generate_empty_prompt(pipe):
    with pytest.raises(ValueError, match="are empty: describe the audio"):
        pipe.generate(["rock", ""], **RUN)
    with pytest.raises(ValueError, match="non-empty list"):
        pipe.generate([], **RUN)


def test_from_pretrained_errors(folder, tmp_path):
    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.musicldm import MusicLDM

    with pytest.raises(hub.CheckpointError, match="_class_name is 'MusicLDMPipeline'; AudioLDM2 loads "
                                                  "AudioLDM2Pipeline folders"):
        AudioLDM2.from_pretrained(folder)
    with pytest.raises(hub.CheckpointError, match="no model_index.json"):
        MusicLDM.from_pretrained(folder / "unet")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(hub.CheckpointError, match="has no scheduler/scheduler_config.json"):
        MusicLDM.from_pretrained(copy)
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    config = json.loads((copy / "unet" / "config.json").read_text())
    del config["sample_size"]
    (copy / "unet" / "config.json").write_text(json.dumps(config))
    model = MusicLDM.from_pretrained(copy)
    assert model.sample_size is None
    with pytest.raises(ValueError, match="no sample_size, so there is no default length: pass audio_length_in_s"):
        model.generate("rock", num_inference_steps=1)
    assert model.generate("rock", audio_length_in_s=0.1, num_inference_steps=1).shape == (1, 1, 1600)


# ---------------------------------------------------------------------------------------------------------------
# musiclm generate with a diffusion pipeline folder


def test_cli_generate(folder, pipe, tmp_path, capsys):
    from musiclm_core.audio import load_audio
    from musiclm_core.cli import main

    args = ["generate", "rock piano", "--model", str(folder), "--steps", "2", "--scheduler", "dpm", "-n", "2",
            "--duration", "0.5", "--seed", "3", "--normalize", "none"]
    assert main([*args, "-o", str(tmp_path / "a.wav")]) == 0
    err = capsys.readouterr().err
    assert "prompt 1/1: 2/2 steps" in err
    assert main([*args, "-o", str(tmp_path / "b.wav")]) == 0
    expected = pipe.generate("rock piano", audio_length_in_s=0.5, num_inference_steps=2, scheduler="dpm",
                             num_waveforms_per_prompt=2, seed=3)
    for i in range(2):
        a, sr = load_audio(tmp_path / f"a_{i}.wav")
        b, _ = load_audio(tmp_path / f"b_{i}.wav")
        assert sr == 16000 and a.shape == (1, 8000)
        assert torch.equal(a, b)  # the same file contents for the same seed (one path, one machine)
        assert (a - expected[i].clamp(-1, 1)).abs().max() <= 1 / 32768 + 1e-4  # 16-bit files


@pytest.mark.parametrize("flags, message", [
    (["-n", "0"], "-n must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--melody", "x.wav"], "--melody is for MusicGen checkpoints"),
    (["--greedy"], "--greedy is for MusicGen checkpoints"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA device, the model would run on cpu"),
])
def test_cli_generate_usage_errors(folder, tmp_path, capsys, flags, message):
    from musiclm_core.cli import main

    assert main(["generate", "rock", "--model", str(folder), "-o", str(tmp_path / "x.wav"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_pipeline_errors(folder, tmp_path, capsys):
    from musiclm_core.cli import main

    assert main(["generate", "rock", "--model", str(folder), "-o", str(tmp_path / "x.wav"), "--duration", "0.03",
                 "--normalize", "none"]) == 1
    assert "--duration must be at least 0.04 s" in capsys.readouterr().err


def test_cuda_graph_needs_cuda(pipe):
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device, it is on cpu"):
        pipe.generate("rock", cuda_graph=True, **RUN)
    with pytest.raises(ValueError, match="cuda_graph must be True or False, got 1"):
        pipe.generate("rock", cuda_graph=1, **RUN)


def test_graph_kept_for_the_next_generation(folder):
    """cuda_graph=True keeps one capture per pipeline (`_graphed_noise`): the same shapes reuse it, the new
    conditioning copied into its buffers; other shapes, replaced UNet parameters or .to() make a new one, and a copy
    of the pipeline leaves it behind. (The capture itself needs CUDA: test_cuda_graph_equals_eager.)"""
    import copy

    from musiclm_core.musicldm import MusicLDM

    pipe = MusicLDM.from_pretrained(folder)  # its own: the module's shared one stays without a graph
    x = torch.zeros(1, pipe.unet.config.in_channels, 4, 16)
    rock, jazz = pipe._encode(["rock"], [""], 1), pipe._encode(["jazz"], [""], 1)  # (2, D): unguided, guided
    assert (rock - jazz).abs().max() > 1e-3
    step = pipe._graphed_noise(x, rock, True)
    held = pipe._graph[2][0]
    assert pipe._graphed_noise(x, jazz, True) is step and pipe._graph[2][0] is held
    assert torch.equal(held, jazz) and held.data_ptr() != jazz.data_ptr()  # a copy in the graph's own buffer
    assert pipe._graphed_noise(x[..., :2, :], jazz, True) is not step  # other latent shapes
    step = pipe._graphed_noise(x, jazz, True)
    assert pipe._graphed_noise(x, jazz, False) is not step  # guidance off: other batch rows in the UNet call
    step = pipe._graphed_noise(x, jazz, True)
    assert copy.deepcopy(pipe)._graph is None and pipe._graph is not None
    weight = pipe.unet.conv_in.weight
    pipe.unet.conv_in.weight = torch.nn.Parameter(weight.detach().clone())  # same values, new storage
    assert pipe._graphed_noise(x, jazz, True) is not step
    pipe.to(torch.float32)
    assert pipe._graph is None


def test_audioldm2_graph_pads_the_t5_states(tmp_path):
    """AudioLDM 2 holds its Flan-T5 states padded to a multiple of GRAPH_T5_TOKENS in a kept graph, so that
    prompts of other token lengths share one capture; the masked padding leaves the UNet's output as it was."""
    pytest.importorskip("diffusers")
    import ldm_fixtures

    from musiclm_core.audioldm2 import GRAPH_T5_TOKENS, AudioLDM2

    pipe = AudioLDM2.from_pretrained(ldm_fixtures.write_audioldm2(tmp_path))
    short, longer = pipe._encode(["rock", "jazz"], None, 1), pipe._encode(["blues and more", "pop"], None, 1)
    assert short.t5.shape[1] != longer.t5.shape[1]  # the tokens of the longest prompt of each
    x = ldm_fixtures.latents_for(pipe, 2, 0.3)
    t = torch.tensor(500)
    padded = pipe._graph_conditioning(longer)
    assert padded.t5.shape[1] % GRAPH_T5_TOKENS == 0 and padded.t5_mask[:, longer.t5.shape[1]:].eq(0).all()
    with torch.no_grad():
        want, got = pipe._noise(x, t, longer), pipe._noise(x, t, padded)
    assert (got - want).abs().max() <= 1e-5 and want.abs().max() > 1e-2
    step = pipe._graphed_noise(x, short, False)
    assert pipe._graphed_noise(x, longer, False) is step  # one capture for both prompt lengths
    assert torch.equal(pipe._graph[2][1], padded.t5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with -m cuda on a GPU)")
@pytest.mark.parametrize("kind", ["musicldm", "audioldm2"])
def test_cuda_graph_equals_eager(kind, tmp_path):
    """On the GPU, the UNet replayed from a CUDA graph gives the eager GPU waveform (1e-5), and both give the CPU
    one (1e-4, TF32 off), for DPM-Solver++ and for PNDM (which keeps past UNet outputs: the graph's output buffer
    must be copied), with guidance and without; the next generation's other prompts replay the kept capture."""
    import ldm_fixtures

    from musiclm_core.audioldm2 import AudioLDM2
    from musiclm_core.musicldm import MusicLDM

    write, cls = {"musicldm": (ldm_fixtures.write_musicldm, MusicLDM),
                  "audioldm2": (ldm_fixtures.write_audioldm2, AudioLDM2)}[kind]
    folder = write(tmp_path)
    cpu, gpu = cls.from_pretrained(folder), cls.from_pretrained(folder).to("cuda")
    latents = ldm_fixtures.latents_for(cpu, 2, 0.3)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for scheduler, guidance in (("dpm", None), ("pndm", None), ("pndm", 1.0)):
            run = dict(audio_length_in_s=0.3, num_inference_steps=4, scheduler=scheduler, guidance_scale=guidance)
            want = cpu.generate(["rock", "jazz"], latents=latents, **run)
            eager = gpu.generate(["rock", "jazz"], latents=latents.cuda(), **run)
            graphed = gpu.generate(["rock", "jazz"], latents=latents.cuda(), cuda_graph=True, **run)
            assert (graphed - eager).abs().max().item() <= 1e-5, (scheduler, guidance)
            assert (eager.cpu() - want).abs().max().item() <= 1e-4, (scheduler, guidance)
            assert want.abs().max() > 1e-2
        # The prompts swapped (the same shapes, AudioLDM 2's Flan-T5 states included): the kept capture replays
        # with their conditioning copied in.
        step = gpu._graph[1]
        run = dict(audio_length_in_s=0.3, num_inference_steps=4, scheduler="pndm", guidance_scale=1.0)
        eager = gpu.generate(["jazz", "rock"], latents=latents.cuda(), **run)
        graphed = gpu.generate(["jazz", "rock"], latents=latents.cuda(), cuda_graph=True, **run)
        assert gpu._graph[1] is step
        assert (graphed - eager).abs().max().item() <= 1e-5
        assert (eager.cpu() - cpu.generate(["rock", "jazz"], latents=latents, **run)).abs().max().item() > 1e-3
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
