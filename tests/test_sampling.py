"""The sampler engine (dream/sampling.py) and resumable PNG sampling (dream/sample.py).

On CPU: the step function the CUDA-graph path replays is compared with the reference sampler
(dream.diffusion.GaussianDiffusion.p_sample / ddim_step and their loops) for the same noise, in float64
(to rounding) and float32; DDIM with eta = 1 over all T steps is checked against DDPM, both as tables
(from independently computed float64 schedule tables) and as whole loops. On a GPU: graphed and plain
loops give the same images for the same seed (eager, triton and compiled models, fp32 and bf16, 1 and k
steps per graph), captures are reused, noise is fresh at every replay, and a loop makes no host sync.
"""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import ON_GPU, make_tiny_checkpoint
from dream.diffusion import GaussianDiffusion, cosine_betas, linear_betas
from dream.errors import DreamError
from dream.model import build_unet
from dream.sample import image_path, sample_from_checkpoint, sample_images
from dream.sampling import (SamplingEngine, build_plan, denoise_step, normalize_sampler, time_sampling)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# max |engine - reference| for the same noise; the reference tables are float32, folded into float64 rows,
# so float32 differs by rounding of the fold and of the step arithmetic.
TOLERANCES = {
    # state dtype: (one step, whole loop)
    torch.float64: (1e-12, 1e-11),
    torch.float32: (2e-6, 5e-5),
}
AUTOCAST_TOLERANCE = {torch.bfloat16: 1e-3}  # engine vs reference, both under the same CPU autocast
ETA1_VS_DDPM_PLAN_RTOL = 1e-9  # float64 tables computed here, independently of GaussianDiffusion
ETA1_VS_DDPM_LOOP_ATOL = 2e-5  # GaussianDiffusion's float32 tables: 1 - abar_t/abar_prev loses ~3 digits
# graphed vs plain and vs the reference loops, same seed, TF32 off. The first step from t = T-1 scales the
# noise prediction by sqrt(1/abar_{T-1} - 1) = 1285 (cosine, T = 20), so ~1e-6 kernel-level differences
# (another cuDNN algorithm, the folded coefficients) reach ~3e-4 (measured on an H200).
GPU_GRAPH_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}

gpu = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
CONFIGS = [("ddpm", None, 1.0), ("ddim", 4, 0.0), ("ddim", 4, 0.8)]
CONFIG_IDS = ["ddpm", "ddim4-eta0", "ddim4-eta0.8"]


# ----------------------------------------------------------------------------------------------
# models
class ToyEps(nn.Module):
    """eps(x, t) = tanh(conv3x3(x)) (1 + sin(f t)/2) + x/10: depends on every pixel, the channel and t,
    and runs on any image shape."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.4)
            self.conv.bias.copy_(torch.randn(channels, generator=g) * 0.3)
        self.freq = nn.Parameter(torch.rand(channels, generator=g) * 0.05 + 0.01)

    def forward(self, x, t):
        scale = 1 + 0.5 * torch.sin(t.to(x.dtype)[:, None] * self.freq.to(x.dtype))
        return torch.tanh(self.conv(x)) * scale[:, :, None, None] + 0.1 * x


def tiny_unet(seed: int = 0, image_size: int = 16, base_channels: int = 16, **overrides):
    """A small UNet with every weight perturbed (the output conv starts at zero)."""
    model = build_unet("tiny", image_size=image_size, base_channels=base_channels, **overrides).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def exact_diffusion(schedule: str, timesteps: int) -> SimpleNamespace:
    """The schedule tables in float64, written from the DDPM formulas (not through GaussianDiffusion)."""
    betas = cosine_betas(timesteps) if schedule == "cosine" else linear_betas(timesteps)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar)
    return SimpleNamespace(
        num_timesteps=timesteps, ddim_timesteps=GaussianDiffusion.ddim_timesteps,
        alphas_cumprod=abar, sqrt_recip_alphas_cumprod=(1 / abar).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1 / abar - 1).sqrt(),
        posterior_mean_coef_x0=betas * abar_prev.sqrt() / (1 - abar),
        posterior_mean_coef_xt=(1 - abar_prev) * alphas.sqrt() / (1 - abar),
        posterior_log_variance_clipped=torch.log(torch.cat([var[1:2], var[1:]])))


def reference_step(diffusion, model, plan, i, x, noise):
    t = plan.timesteps[i].repeat(x.shape[0])
    if plan.sampler == "ddpm":
        return diffusion.p_sample(model, x, t, noise=noise)
    t_prev = plan.timesteps[i + 1] if i + 1 < plan.steps else torch.tensor(-1)
    return diffusion.ddim_step(model, x, t, t_prev.repeat(x.shape[0]), eta=plan.eta, noise=noise)


# ----------------------------------------------------------------------------------------------
# tables
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("timesteps", [7, 40, 1000])  # 1000: the seed's T
def test_ddim_eta1_all_steps_plan_equals_ddpm(schedule, timesteps):
    exact = exact_diffusion(schedule, timesteps)
    ddpm = build_plan(exact, "ddpm", dtype=torch.float64)
    ddim = build_plan(exact, "ddim", timesteps, 1.0, dtype=torch.float64)
    assert torch.equal(ddpm.timesteps, torch.arange(timesteps - 1, -1, -1))
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    assert ddpm.coefficients[-1, 4] == 0 and ddim.coefficients[-1, 4] == 0  # no noise into x_0
    torch.testing.assert_close(ddim.coefficients, ddpm.coefficients, rtol=ETA1_VS_DDPM_PLAN_RTOL, atol=1e-300)


def test_ddim_eta0_plan_is_deterministic_and_ends_at_x0():
    plan = build_plan(GaussianDiffusion("cosine", 50), "ddim", 7, 0.0)
    assert not plan.stochastic and torch.all(plan.coefficients[:, 4] == 0)
    assert plan.timesteps.tolist() == GaussianDiffusion.ddim_timesteps(50, 7)
    c, d = plan.coefficients[-1, 2], plan.coefficients[-1, 3]
    assert c == 1 and d == 0  # the last step returns the clamped x0 prediction


@pytest.mark.parametrize("args, message", [
    (("gan", None, 0.0), "unknown sampler"),
    (("ddpm", 10, 0.0), "runs all"),
    (("ddim", 0, 0.0), "DDIM steps"),
    (("ddim", 21, 0.0), "DDIM steps"),
    (("ddim", 2.5, 0.0), "DDIM steps"),
    (("ddim", 5, -0.1), "eta"),
    (("ddim", 5, float("nan")), "eta"),
    (("ddim", 5, 1.2), r"eta must be in \[0, 1\]"),
    (("ddpm", None, 0.5), "takes no eta"),
])
def test_bad_sampler_settings(args, message):
    with pytest.raises(ValueError, match=message):
        normalize_sampler(GaussianDiffusion("cosine", 20), *args)


@pytest.mark.parametrize("timesteps, default_steps", [(20, 20), (50, 50), (1000, 50)])
def test_default_ddim_steps_are_50_or_all_of_a_shorter_schedule(timesteps, default_steps):
    diffusion = GaussianDiffusion("cosine", timesteps)
    assert normalize_sampler(diffusion, "ddim", None, 1.0) == ("ddim", default_steps, 1.0)
    assert normalize_sampler(diffusion, "ddpm", None, 0.0) == ("ddpm", timesteps, 1.0)


# ----------------------------------------------------------------------------------------------
# one step against the reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (3, 4, 5, 7), (2, 3, 16, 16)])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_step_matches_reference(schedule, config, shape, dtype):
    sampler, steps, eta = config
    diffusion = GaussianDiffusion(schedule, 20).to(dtype)
    model = ToyEps(shape[1], seed=sum(shape)).to(dtype)
    plan = build_plan(diffusion, sampler, steps, eta, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    for i in sorted({0, 1, plan.steps // 2, plan.steps - 2, plan.steps - 1}):
        x = torch.randn(shape, generator=g, dtype=dtype) * 1.5
        z = torch.randn(shape, generator=g, dtype=dtype)
        counter = torch.tensor([i])
        out = denoise_step(model, x, counter, plan, noise=z)
        assert counter.tolist() == [i + 1]
        ref = reference_step(diffusion, model, plan, i, x, z)
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, ref, atol=TOLERANCES[dtype][0], rtol=0)


def test_step_matches_reference_unet():
    diffusion = GaussianDiffusion("cosine", 30).double()
    model = tiny_unet(1).double()
    for sampler, steps, eta in CONFIGS:
        plan = build_plan(diffusion, sampler, steps, eta, dtype=torch.float64)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        z = torch.randn_like(x)
        i = plan.steps // 3
        out = denoise_step(model, x, torch.tensor([i]), plan, noise=z)
        torch.testing.assert_close(out, reference_step(diffusion, model, plan, i, x, z),
                                   atol=TOLERANCES[torch.float64][0], rtol=0)


# ----------------------------------------------------------------------------------------------
# whole loops against the reference loops
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", CONFIGS + [("ddim", 10, 1.0)], ids=CONFIG_IDS + ["ddim10-eta1"])
def test_loop_matches_reference_sampler(config, dtype):
    """Noise injected in the order the reference loops draw it from their generator."""
    sampler, steps, eta = config
    diffusion = GaussianDiffusion("cosine", 10).to(dtype)
    model = tiny_unet(2).to(dtype)
    shape = (2, 3, 16, 16)
    engine = SamplingEngine(model, diffusion)
    n = engine.plan(sampler, steps, eta).steps
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(shape, generator=g).to(dtype)
    noise = [torch.randn(shape, generator=g).to(dtype) for _ in range(n)] if eta > 0 else None
    g = torch.Generator().manual_seed(11)
    torch.randn(shape, generator=g)  # x_T, given explicitly below
    if sampler == "ddpm":
        ref = diffusion.p_sample_loop(model, shape, generator=g, x_T=x_T, progress=False)
    else:
        ref = diffusion.ddim_sample_loop(model, shape, steps=steps, eta=eta, generator=g, x_T=x_T, progress=False)
    out = engine.sample(x_T, sampler, steps, eta, dtype=None, noise=noise, graphs=False)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=TOLERANCES[dtype][1], rtol=0)
    assert out.abs().max() > 0.1  # a real image came out, not a collapsed one


def test_ddim_eta1_all_steps_loop_equals_ddpm():
    diffusion = GaussianDiffusion("linear", 10).double()
    model = tiny_unet(3).double()
    engine = SamplingEngine(model, diffusion)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(10, *x_T.shape, generator=g, dtype=torch.float64)
    ddpm = engine.sample(x_T, "ddpm", noise=noise)
    ddim = engine.sample(x_T, "ddim", 10, 1.0, noise=noise)
    torch.testing.assert_close(ddim, ddpm, atol=ETA1_VS_DDPM_LOOP_ATOL, rtol=0)
    assert (engine.sample(x_T, "ddim", 10, 0.0) - ddpm).abs().max() > 1e-2  # the noise matters


def test_default_generator_seeding_reproduces_samples():
    diffusion = GaussianDiffusion("cosine", 10)
    engine = SamplingEngine(ToyEps(3, 0), diffusion)
    x_T = torch.randn(3, 3, 7, 5)
    runs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        runs.append(engine.sample(x_T, "ddim", 5, 0.5))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


@pytest.mark.parametrize("config", CONFIGS[::2] + [("ddim", 5, 1.0)], ids=["ddpm", "ddim4-eta0.8", "ddim5-eta1"])
def test_default_noise_is_the_default_generators_normal_draws_in_step_order(config):
    """Without `noise`, step i draws torch.randn_like(x) from the default generator: a seeded call gives what
    the same seed's torch.randn draws, one per step, give when injected."""
    sampler, steps, eta = config
    diffusion = GaussianDiffusion("cosine", 10)
    engine = SamplingEngine(ToyEps(3, 1), diffusion)
    x_T = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(3))
    n = engine.plan(sampler, steps, eta).steps
    torch.manual_seed(9)
    drawn = engine.sample(x_T, sampler, steps, eta, graphs=False)
    torch.manual_seed(9)
    noise = [torch.randn_like(x_T) for _ in range(n)]
    assert torch.equal(drawn, engine.sample(x_T, sampler, steps, eta, noise=noise, graphs=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_loop_matches_reference_under_autocast(dtype):
    diffusion = GaussianDiffusion("cosine", 10)
    model = tiny_unet(4)
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        ref = diffusion.ddim_sample_loop(model, x_T.shape, steps=3, x_T=x_T, progress=False)
    out = SamplingEngine(model, diffusion).sample(x_T, "ddim", 3, 0.0, dtype=dtype)
    fp32 = SamplingEngine(model, diffusion).sample(x_T, "ddim", 3, 0.0, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=AUTOCAST_TOLERANCE[dtype], rtol=0)
    assert not torch.equal(out, fp32)  # the model really ran in low precision
    with torch.autocast("cpu", dtype=dtype):  # dtype=None: the caller's autocast
        assert torch.equal(SamplingEngine(model, diffusion).sample(x_T, "ddim", 3, 0.0, dtype=None), out)


def test_one_engine_gives_each_setting_its_own_plan():
    """Plans are cached per (sampler, steps, eta, device, dtype): a setting sampled after others gives what a
    fresh engine gives."""
    diffusion, model = GaussianDiffusion("cosine", 10), ToyEps(3, 0)
    engine = SamplingEngine(model, diffusion)
    x_T = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    settings = [("ddim", 4, 1.0), ("ddim", 4, 0.0), ("ddim", 5, 0.0), ("ddpm", None, 0.0)]
    for sampler, steps, eta in settings:
        torch.manual_seed(0)
        shared = engine.sample(x_T, sampler, steps, eta)
        torch.manual_seed(0)
        assert torch.equal(shared, SamplingEngine(model, diffusion).sample(x_T, sampler, steps, eta)), sampler
    assert len(engine.plans) == len(settings)


def test_engine_rejects_bad_input():
    engine = SamplingEngine(ToyEps(3, 0), GaussianDiffusion("cosine", 10))
    x_T = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="CUDA device"):
        engine.sample(x_T, "ddim", 3, graphs=True)
    with pytest.raises(ValueError, match="one tensor per step"):
        engine.sample(x_T, "ddim", 3, 0.5, noise=[torch.zeros_like(x_T)] * 2)
    with pytest.raises(ValueError, match="shape"):
        engine.sample(x_T, "ddim", 2, 0.5, noise=[torch.zeros(1, 3, 4, 5)] * 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        engine.sample(x_T.bfloat16(), "ddim", 3)
    with pytest.raises(ValueError, match="dtype"):
        engine.sample(x_T, "ddim", 3, dtype=torch.int8)
    with pytest.raises(ValueError, match="steps_per_graph"):
        SamplingEngine(ToyEps(3, 0), GaussianDiffusion("cosine", 10), steps_per_graph=0)


def test_time_sampling_cpu():
    model = tiny_unet(5)
    result = time_sampling(model, GaussianDiffusion("cosine", 10), batch_size=2, sampler="ddim", steps=2, repeats=1)
    assert result["plain"]["images_per_s"] > 0 and len(result["plain"]["seconds"]) == 1
    assert result["steps"] == 2 and result["batch_size"] == 2
    assert "skipped" in result["graphs"]


# ----------------------------------------------------------------------------------------------
# many images: PNGs, resumable
def read_png(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def test_pixels_are_the_nearest_level_of_the_clamped_image():
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) = round((x + 1) * 127.5); values outside are clamped first,
    not wrapped round (1.5 would otherwise be level 63)."""
    from dream.sample import to_pixels

    images = torch.tensor([[[[-1.0, 1.0]], [[0.002, -0.995]], [[1.5, -1.5]]]])  # channels: (1, 3, 1, 2)
    pixels = to_pixels(images)
    assert pixels.shape == (1, 1, 2, 3) and pixels.dtype.name == "uint8"
    assert pixels[0, 0].tolist() == [[0, 128, 255], [255, 1, 0]]  # 127.755 -> 128, 0.6375 -> 1


def test_sample_images_resumable_and_batch_independent(tmp_path):
    diffusion = GaussianDiffusion("cosine", 10)
    model = tiny_unet(6)
    common = dict(sampler="ddim", steps=2, eta=0.5, batch_size=2, seed=3, progress=False)
    report = sample_images(model, diffusion, 5, tmp_path / "a", **common)
    assert report["made"] == 5 and not report["graphs"]
    first = [read_png(image_path(tmp_path / "a", i)) for i in range(5)]
    assert not torch.equal(first[0], first[1]) and first[0].float().std() > 1

    image_path(tmp_path / "a", 3).unlink()  # batch 1 (images 2, 3) is sampled again, image 3 written
    report = sample_images(model, diffusion, 5, tmp_path / "a", **common)
    assert report["made"] == 1
    assert all(torch.equal(read_png(image_path(tmp_path / "a", i)), first[i]) for i in range(5))

    png = image_path(tmp_path / "a", 1)  # cut short (a copy or a full disk): made again
    png.write_bytes(png.read_bytes()[:20])
    report = sample_images(model, diffusion, 5, tmp_path / "a", **common)
    assert report["made"] == 1
    assert all(torch.equal(read_png(image_path(tmp_path / "a", i)), first[i]) for i in range(5))

    report = sample_images(model, diffusion, 3, tmp_path / "b", **common)  # fewer images: same first three
    assert all(torch.equal(read_png(image_path(tmp_path / "b", i)), first[i]) for i in range(3))
    assert not image_path(tmp_path / "b", 3).exists()

    with pytest.raises(DreamError, match="eta"):
        sample_images(model, diffusion, 5, tmp_path / "a", **{**common, "eta": 0.0})
    with pytest.raises(DreamError, match="unknown sampler"):
        sample_images(model, diffusion, 5, tmp_path / "c", **{**common, "sampler": "euler"})
    with pytest.raises(DreamError, match="CUDA"):
        sample_images(model, diffusion, 1, tmp_path / "d", graphs=True, **common)


def test_unfinished_batches_opens_only_the_images_the_folder_holds(tmp_path, monkeypatch):
    """Batches with an image missing or cut short, with the offsets of those images; the folder is listed once and
    only the images in it are opened (a new set of a million images is planned in a fraction of a second, not
    one failed open per image)."""
    import dream.sample
    from dream.sample import PNG_END, unfinished_batches

    whole = {0, 1, 2, 4, 6, 7, 10}  # of count 11, batch 4: batch 0 lacks 3, batch 1 lacks 5, batch 2 lacks 8, 9
    for index in whole:
        image_path(tmp_path, index).write_bytes(b"\x89PNG" + PNG_END)
    image_path(tmp_path, 8).write_bytes(b"\x89PNG cut short")
    (tmp_path / "12.png").write_bytes(b"\x89PNG" + PNG_END)  # not a name of the set
    opened = []
    real = dream.sample.image_done
    monkeypatch.setattr(dream.sample, "image_done", lambda path: opened.append(path.name) or real(path))
    assert unfinished_batches(tmp_path, 11, 4) == [(0, [3]), (1, [1]), (2, [0, 1])]
    assert sorted(opened) == sorted(image_path(tmp_path, i).name for i in whole | {8})
    assert unfinished_batches(tmp_path, 3, 4) == [] and unfinished_batches(tmp_path, 12, 12) == [(0, [3, 5, 8, 9, 11])]
    opened.clear()  # batches without any image there: planned whole, nothing opened
    assert unfinished_batches(tmp_path, 22, 4) == [(0, [3]), (1, [1]), (2, [0, 1, 3]), (3, range(4)), (4, range(4)),
                                                   (5, range(2))]
    assert len(opened) == 8
    (tmp_path / "new").mkdir()
    assert unfinished_batches(tmp_path / "new", 10**8, 64)[-1] == (1562499, range(64))  # (a fraction of a second)


def test_stochastic_sets_record_the_device_of_their_step_noise(tmp_path):
    """ddpm and ddim with eta > 0 draw their step noise from the device's generator, whose CPU and CUDA
    streams differ: sampling.json records the device, and a set is not continued on another kind of device."""
    diffusion, model = GaussianDiffusion("cosine", 10), tiny_unet(6)
    common = dict(sampler="ddim", steps=2, batch_size=2, seed=3, progress=False)
    sample_images(model, diffusion, 2, tmp_path / "eta", eta=0.5, **common)
    assert json.loads((tmp_path / "eta" / "sampling.json").read_text())["noise_device"] == "cpu"
    sample_images(model, diffusion, 2, tmp_path / "eta0", eta=0.0, **common)  # deterministic: any device
    assert "noise_device" not in json.loads((tmp_path / "eta0" / "sampling.json").read_text())
    record = tmp_path / "eta" / "sampling.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "noise_device": "cuda"}))
    with pytest.raises(DreamError, match="noise_device='cuda', this run has noise_device='cpu'"):
        sample_images(model, diffusion, 4, tmp_path / "eta", eta=0.5, **common)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 123 bytes")])
@pytest.mark.parametrize("where", ["starting noise", "denoising"])
def test_out_of_memory_while_sampling_is_one_line(tmp_path, capsys, monkeypatch, error, where):
    import dream.sample
    from dream.cli import main

    def out_of_memory(*args, **kwargs):
        raise error

    if where == "denoising":
        monkeypatch.setattr(SamplingEngine, "sample", out_of_memory)
    else:  # a batch's x_T, drawn before the loop (--batch-size 1000000 on a CPU runs out there)
        monkeypatch.setattr(dream.sample, "batch_noise", out_of_memory)
    checkpoint = make_checkpoint(tmp_path)
    command = ["sample", str(checkpoint), "--out", str(tmp_path / "s"), "--count", "2", "--batch-size", "2",
               "--steps", "1", "--device", "cpu", "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "out of memory denoising a batch of 2 images on cpu: pass a smaller --batch-size" in err, err

    monkeypatch.undo()
    monkeypatch.setattr(SamplingEngine, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not dressed up as out of memory
        main(command)


def test_grid_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import torchvision

    from dream.sample import save_grid

    sample_images(tiny_unet(6), GaussianDiffusion("cosine", 10), 2, tmp_path, steps=1, batch_size=2, progress=False)
    grid = save_grid(tmp_path, 2, tmp_path / "grid.png")
    before = grid.read_bytes()
    assert read_png(grid).shape == (20, 38, 3)  # two 16×16 images side by side, 2-pixel padding

    def cut_short(tensor, fp, format=None):
        fp.write(before[:40])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torchvision.utils, "save_image", cut_short)
    with pytest.raises(OSError, match="No space"):
        save_grid(tmp_path, 2, grid)
    assert grid.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if not p.name[0].isdigit()) \
        == [".lock", "grid.png", "sampling.json"]


def damage_png(path: Path) -> None:
    """Zero the middle of a PNG's pixel data; it still ends with IEND, so it passes for a whole file."""
    data = bytearray(path.read_bytes())
    data[60:len(data) - 40] = bytes(len(data) - 100)
    path.write_bytes(data)


def test_damaged_or_wrong_size_images_in_a_set_are_one_line(tmp_path, capsys):
    """A file that passes for a whole PNG (it ends with IEND) but does not decode, or one of another size,
    stops the grid with one line naming it (torchvision's decoder killed the process on such files)."""
    import numpy as np
    from PIL import Image

    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "s"
    command = ["sample", str(checkpoint), "--out", str(out), "--count", "3", "--batch-size", "3", "--steps", "1",
               "--device", "cpu", "--no-progress"]
    assert main(command) == 0
    capsys.readouterr()
    damage_png(image_path(out, 1))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{image_path(out, 1)} cannot be read as an image" in err, err
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_path(out, 1))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{image_path(out, 1)} is 8×8 pixels, not the set's 16×16" in err, err
    image_path(out, 1).unlink()
    assert main(command) == 0 and read_png(image_path(out, 1)).shape == (16, 16, 3)


def test_sets_of_a_million_images_and_more_continue(tmp_path):
    """Index 1,000,000 is written as 1000000.png: a rerun knows it as its own."""
    diffusion, model = GaussianDiffusion("cosine", 10), tiny_unet(6)
    sample_images(model, diffusion, 2, tmp_path, steps=1, batch_size=2, progress=False)
    (tmp_path / "1000000.png").write_bytes(image_path(tmp_path, 0).read_bytes())
    assert sample_images(model, diffusion, 2, tmp_path, steps=1, batch_size=2, progress=False)["made"] == 0
    (tmp_path / "100000x.png").write_bytes(b"")
    with pytest.raises(DreamError, match="did not write"):
        sample_images(model, diffusion, 2, tmp_path, steps=1, batch_size=2, progress=False)


def test_sample_images_leaves_global_rng_alone(tmp_path):
    model = tiny_unet(7)  # (initialisation draws from the global generator)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_images(model, GaussianDiffusion("cosine", 10), 2, tmp_path, sampler="ddpm", batch_size=2, progress=False)
    assert torch.equal(torch.rand(3), expected)


def make_checkpoint(tmp_path, timesteps: int = 10) -> Path:
    return make_tiny_checkpoint(tmp_path, step=3, num_timesteps=timesteps, data_count=4)


def test_images_are_tied_to_the_weights_not_to_the_checkpoint_path(tmp_path):
    """A run retrained into the same folder writes a checkpoint of the same path and step with other
    weights: adding its images to the folder is refused. The same weights from another file (an export)
    continue the folder."""
    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "samples"
    common = dict(batch_size=2, steps=2, progress=False, grid=False)
    first = sample_from_checkpoint(str(checkpoint), str(out), count=2, **common)
    settings = json.loads((out / "sampling.json").read_text())
    assert first["made"] == 2 and len(settings["weights_sha256"]) == 64

    pytest.importorskip("safetensors")
    from dream.checkpoint import export_weights

    export = export_weights(checkpoint, tmp_path / "ema.safetensors")["out"]
    assert sample_from_checkpoint(export, str(out), count=4, **common)["made"] == 2

    retrained = make_tiny_checkpoint(tmp_path, step=3, num_timesteps=10, data_count=4, seed=1)
    assert retrained == checkpoint
    with pytest.raises(DreamError, match="weights_sha256"):
        sample_from_checkpoint(str(retrained), str(out), count=6, **common)
    assert not image_path(out, 4).exists()


def test_channels_last_sampling_gives_the_nchw_images(tmp_path):
    """channels_last (the default on CUDA) changes the model's layout only, not its images."""
    from dream.sample import load_sampler_model

    checkpoint = make_checkpoint(tmp_path)
    model = load_sampler_model(str(checkpoint), channels_last=True)[0]
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not load_sampler_model(str(checkpoint))[0].conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    common = dict(count=3, batch_size=2, sampler="ddim", steps=3, eta=0.5, progress=False, grid=False)
    for channels_last in (False, True):
        sample_from_checkpoint(str(checkpoint), str(tmp_path / str(channels_last)), channels_last=channels_last,
                               **common)
    for i in range(3):
        nchw, cl = (read_png(image_path(tmp_path / str(layout), i)) for layout in (False, True))
        assert (nchw.int() - cl.int()).abs().max() <= 1 and nchw.float().std() > 0


def test_each_call_that_adds_images_records_what_made_them(tmp_path):
    """sampling.json's "runs": one entry per call that had images to make (how many, device, backend, graphs,
    versions), appended; a call with nothing to make adds none, and the entries are not settings a rerun must
    match."""
    diffusion = GaussianDiffusion("cosine", 10)
    model = tiny_unet(6)
    common = dict(sampler="ddim", steps=2, batch_size=2, seed=3, progress=False)
    sample_images(model, diffusion, 3, tmp_path, **common)
    image_path(tmp_path, 2).unlink()
    sample_images(model, diffusion, 5, tmp_path, **common)
    sample_images(model, diffusion, 5, tmp_path, **common)
    record = json.loads((tmp_path / "sampling.json").read_text())
    runs = record["runs"]
    assert [(run["images_planned"], run["images_made"]) for run in runs] == [(3, 3), (3, 3)]  # 0-2, then 2-4
    assert runs[0].keys() == {"started", "images_planned", "device", "processes", "backend", "compiled",
                              "channels_last", "graphs", "steps_per_graph", "dream", "torch", "triton",
                              "images_made", "seconds"}
    varying = dict.fromkeys(("started", "images_planned", "images_made", "seconds"))
    assert runs[1] | varying == runs[0] | varying
    first = runs[0]
    assert (first["device"], first["backend"], first["graphs"], first["processes"]) == ("cpu", "eager", False, 1)
    assert runs[0]["torch"] == torch.__version__ and not runs[0]["compiled"] and not runs[0]["channels_last"]
    assert record["steps"] == 2 and record["seed"] == 3


@pytest.mark.parametrize("body_error, raised, message", [
    # an operation not allowed in a capture: its own error, then ending the capture's, which holds it
    (RuntimeError("operation not permitted when stream is capturing\nmore"), "CaptureFailed",
     "RuntimeError: operation not permitted when stream is capturing"),
    # an allocation that failed inside the capture: the out-of-memory error itself (sample names --batch-size)
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), "OutOfMemoryError", "CUDA out of memory"),
])
def test_a_failed_sampling_capture_names_its_cause_and_mends_the_cuda_state(monkeypatch, body_error, raised,
                                                                             message):
    """GraphedLoop's captures, with torch.cuda's capture and stream contexts replaced by stand-ins that fail as
    CUDA's do, the second of two captures (schedule 2, 2, 1) failing: the error names the operation that failed,
    the stream context is left, the CUDA state is mended before the error is raised, and no graph is kept."""
    from conftest import stand_in_cuda_capture
    from dream.sampling import GraphedLoop

    events = stand_in_cuda_capture(monkeypatch, "operation failed due to a previous error during capture")

    def body(steps):
        if steps == 2:
            raise body_error

    loop = GraphedLoop.__new__(GraphedLoop)  # (__init__ needs CUDA)
    loop.x, loop.schedule, loop.graphs, loop._body = torch.zeros(1), [2, 2, 1], {}, body
    with pytest.raises(Exception) as caught:
        loop._capture_graphs(pool=None, capture_stream=None)
    assert type(caught.value).__name__ == raised and str(caught.value) == message
    assert events == ["stream", "capture", "stream restored"] * 2 + ["recovered"]
    assert loop.graphs == {}


# Runs in a process of its own: a capture that fails may leave CUDA state behind, which would break later tests.
FAILED_SAMPLING_CAPTURE = """
import json, torch
from dream.diffusion import GaussianDiffusion
from dream.sampling import SamplingEngine
from dream.step_graph import CaptureFailed

class HostRead(torch.nn.Module):  # a model that reads a value back to the host: not capturable
    def forward(self, x, t):
        return x * float(x.abs().mean())

engine = SamplingEngine(HostRead(), GaussianDiffusion("cosine", 10).cuda())
x_T = torch.randn(2, 3, 8, 8, device="cuda")
try:
    engine.sample(x_T, "ddim", 3, graphs=True)
    message = None
except CaptureFailed as error:
    message = str(error)
torch.cuda.synchronize()
plain = engine.sample(x_T, "ddim", 3, graphs=False)
print(json.dumps({"message": message, "captures": len(engine.captures),
                  "default_stream": torch.cuda.current_stream() == torch.cuda.default_stream(),
                  "random": torch.rand(3, device="cuda").tolist(), "finite": bool(plain.isfinite().all())}))
"""


@gpu
def test_a_failed_sampling_capture_says_so_in_one_line_and_cuda_goes_on():
    from conftest import run_without_interpreter

    process = run_without_interpreter(FAILED_SAMPLING_CAPTURE)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.splitlines()[-1])
    assert result["message"] is not None and "\n" not in result["message"] and result["captures"] == 0
    assert "previous error during capture" not in result["message"], result["message"]  # the cause, not its echo
    assert result["default_stream"], "the capture stream stayed current"
    assert len(result["random"]) == 3 and result["finite"]  # the default generator and the plain loop still work


def test_sample_images_says_in_one_line_that_the_capture_failed(tmp_path):
    """A capture that fails stops `dream sample` in one line naming its cause and --graphs off."""
    from dream.step_graph import CaptureFailed

    class CaptureFails(SamplingEngine):
        def use_graphs(self, device, graphs=None):
            return True

        def sample(self, *args, **kwargs):
            raise CaptureFailed("RuntimeError: operation not permitted when stream is capturing")

    diffusion = GaussianDiffusion("cosine", 10)
    model = tiny_unet(6)
    with pytest.raises(DreamError) as caught:
        sample_images(model, diffusion, 2, tmp_path, steps=2, batch_size=2, progress=False,
                      engine=CaptureFails(model, diffusion))
    assert str(caught.value) == ("the sampling loop could not be captured as a CUDA graph (RuntimeError: operation "
                                 "not permitted when stream is capturing); rerun with --graphs off (the plain loop: "
                                 "the same images up to rounding)")
    assert not image_path(tmp_path, 0).exists()
    runs = json.loads((tmp_path / "sampling.json").read_text())["runs"]  # a call that stopped early: no images_made
    assert len(runs) == 1 and runs[0]["graphs"] and "images_made" not in runs[0]


def test_a_full_disk_names_the_image_it_could_not_write(tmp_path, monkeypatch):
    """A write that fails (a full disk) is one line naming the file; the images before it stay, whole."""
    import errno

    import dream.files
    from dream.sample import image_done

    real = dream.files.os.replace

    def full_from_image_3(source, target):
        if str(target).endswith("000003.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(dream.files.os, "replace", full_from_image_3)
    with pytest.raises(DreamError) as caught:
        sample_images(tiny_unet(6), GaussianDiffusion("cosine", 10), 5, tmp_path, steps=2, batch_size=2,
                      progress=False)
    assert str(caught.value) == (f"cannot write {image_path(tmp_path, 3)} (No space left on device); the images "
                                 f"written before it are kept: rerun the same command to go on")
    assert [image_done(image_path(tmp_path, i)) for i in range(5)] == [True, True, True, False, False]


def test_a_folder_without_images_takes_new_settings(tmp_path):
    """A run stopped before its first batch was written leaves sampling.json alone: the folder holds no
    image, so other settings are accepted; once it holds one, they are refused."""
    from dream.sample import check_settings

    check_settings(tmp_path, {"steps": 20, "seed": 0})
    check_settings(tmp_path, {"steps": 2, "seed": 0})
    assert json.loads((tmp_path / "sampling.json").read_text())["steps"] == 2
    image_path(tmp_path, 0).write_bytes(b"an image")
    with pytest.raises(DreamError, match="holds images made with steps=2, this run has steps=3"):
        check_settings(tmp_path, {"steps": 3, "seed": 0})


def test_a_folder_another_process_samples_into_is_refused(tmp_path):
    """Two processes sampling into one folder with different settings would mix their images under one
    sampling.json: while one holds the folder, another is refused and writes nothing."""
    import os

    from dream.files import folder_lock

    model, diffusion = tiny_unet(6), GaussianDiffusion("cosine", 10)
    # the other process, here a training run in that folder (flock: another open file conflicts as one would)
    with folder_lock(tmp_path, command="dream train") as holder:
        assert holder is None
        with pytest.raises(DreamError, match=rf"{tmp_path} is in use by another process "
                                             rf"\(dream train, pid {os.getpid()} on .*\); let it finish"):
            sample_images(model, diffusion, 2, tmp_path, steps=1, batch_size=2, progress=False)
        assert not (tmp_path / "sampling.json").exists() and not image_path(tmp_path, 0).exists()
    report = sample_images(model, diffusion, 2, tmp_path, steps=1, batch_size=2, progress=False)
    assert report["made"] == 2 and json.loads((tmp_path / "sampling.json").read_text())["steps"] == 1


def test_a_damaged_image_in_the_grid_is_one_line(tmp_path):
    from dream.sample import save_grid, write_pngs

    write_pngs(torch.zeros(2, 4, 4, 3, dtype=torch.uint8).numpy(), tmp_path, [0, 1])
    data = bytearray(image_path(tmp_path, 1).read_bytes())
    data[40] ^= 0xFF  # inside the image data chunk: its CRC fails; the file still ends with IEND
    image_path(tmp_path, 1).write_bytes(bytes(data))
    with pytest.raises(DreamError, match="000001.png cannot be read as an image"):
        save_grid(tmp_path, 2, tmp_path / "grid.png")


def test_sample_cli(tmp_path):
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    out = tmp_path / "samples"
    args = ["sample", str(checkpoint), "--out", str(out), "--count", "3", "--batch-size", "2", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    assert main(args + ["--graphs", "off", "--channels-last"]) == 0
    assert all(image_path(out, i).exists() for i in range(3)) and (out / "grid.png").exists()
    report = sample_from_checkpoint(str(checkpoint), str(out), count=3, batch_size=2, steps=2, progress=False)
    assert report["made"] == 0 and report["step"] == 3 and report["ema"]
    assert main(args + ["--graphs", "on"]) == 2  # one-line error: no CUDA here


def test_sample_cli_bad_out_seed_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    import dream.cli
    from dream.cli import main

    checkpoint = make_checkpoint(tmp_path)
    a_file = tmp_path / "a_file.png"
    a_file.write_bytes(b"not a folder")
    common = ["sample", str(checkpoint), "--count", "2", "--steps", "1", "--device", "cpu", "--no-progress"]
    for extra, message in [(["--out", str(a_file)], f"--out {a_file} is a file; it must be a folder"),
                           (["--out", str(tmp_path / "s"), "--seed", "-1"], "--seed must be an integer in [0, "),
                           (["--out", str(tmp_path / "s"), "--seed", str(2**40)], f"got {2**40}")]:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "s").exists()

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dream.cli, "run_sample", interrupted)
    assert main(common + ["--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert err == "dream sample: interrupted; rerun the same command to go on (finished images are kept)\n"


def test_sigterm_stops_sampling_in_one_line_and_the_rerun_finishes(tmp_path):
    """SIGTERM (a batch system's stop) is Ctrl-C's one line, exit 128 + 15; the rerun completes the set."""
    import os
    import signal
    import subprocess
    import sys
    import time

    checkpoint = make_checkpoint(tmp_path, timesteps=100)  # a batch takes seconds: time to stop mid-set
    out = tmp_path / "s"
    args = [sys.executable, "-m", "dream", "sample", str(checkpoint), "--out", str(out), "--count", "4",
            "--batch-size", "1", "--sampler", "ddpm", "--device", "cpu", "--no-progress"]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not image_path(out, 0).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"sampling ended before it could be stopped: {process.communicate()}"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert err == "dream sample: SIGTERM; rerun the same command to go on (finished images are kept)\n"
    assert not image_path(out, 3).exists()
    assert subprocess.run(args, capture_output=True, env=env, timeout=600).returncode == 0
    assert all(image_path(out, i).exists() for i in range(4))


def test_a_folder_with_pngs_but_no_record_is_refused_untouched(tmp_path):
    """A user's own PNGs, or a set whose sampling.json is lost or broken: neither overwritten nor continued
    under settings nobody knows."""
    checkpoint = make_checkpoint(tmp_path)
    common = dict(count=2, batch_size=2, steps=2, progress=False)
    for case, record in [("photos", None), ("lost", None), ("broken", "{broken")]:
        out = tmp_path / case
        out.mkdir()
        image_path(out, 0).write_bytes(b"someone's picture")
        (out / "grid.png").write_bytes(b"someone's grid")
        if record is not None:
            (out / "sampling.json").write_text(record)
        message = "no sampling.json" if record is None else "an unreadable sampling.json"
        with pytest.raises(DreamError, match=f"holds PNG files \\(000000.png, ...\\) and {message}"):
            sample_from_checkpoint(str(checkpoint), str(out), **common)
        assert image_path(out, 0).read_bytes() == b"someone's picture"
        assert (out / "grid.png").read_bytes() == b"someone's grid" and not image_path(out, 1).exists()
    fresh = sample_from_checkpoint(str(checkpoint), str(tmp_path / "fresh"), **common)
    assert fresh["made"] == 2  # and a folder this command filled continues, with its record
    assert sample_from_checkpoint(str(checkpoint), str(tmp_path / "fresh"), **common)["made"] == 0
    (tmp_path / "fresh" / "holiday.png").write_bytes(b"someone's picture")  # beside a readable record
    with pytest.raises(DreamError, match=r"holds PNG files this command did not write \(holiday.png\)"):
        sample_from_checkpoint(str(checkpoint), str(tmp_path / "fresh"), **{**common, "count": 4})


def test_a_set_whose_record_lacks_a_setting_is_refused_untouched(tmp_path):
    """A record without weights_sha256 (older releases did not write it) cannot tell whether its images came
    from these weights: the set is not continued, whatever the other settings say."""
    checkpoint = make_checkpoint(tmp_path)
    common = dict(count=2, batch_size=1, steps=2, progress=False)
    out = tmp_path / "old"
    sample_from_checkpoint(str(checkpoint), str(out), **{**common, "count": 1})
    record = json.loads((out / "sampling.json").read_text())
    del record["weights_sha256"]
    (out / "sampling.json").write_text(json.dumps(record))
    first = image_path(out, 0).read_bytes()
    with pytest.raises(DreamError, match=f"^{re.escape(str(out))} holds images whose sampling.json does not record "
                                         r"weights_sha256 \(written by an older dream"):
        sample_from_checkpoint(str(checkpoint), str(out), **common)
    assert image_path(out, 0).read_bytes() == first and not image_path(out, 1).exists()


def test_bad_output_folders_are_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import dream.sample

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setattr(dream.sample, "load_sampler_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for out, count, message in [("", 2, "--out is empty"), (" \t", 2, "--out is empty"),  # blank too
                                (str(a_file / "sub"), 2, f"cannot be made (Not a directory: {a_file} is a file)"),
                                (str(tmp_path / "s"), 0, "--count must be a positive integer, got 0")]:
        with pytest.raises(DreamError, match=message.replace("(", "\\(").replace(")", "\\)")):
            sample_from_checkpoint("anything.pt", out, count=count, batch_size=2)
    monkeypatch.setattr(dream.sample.os, "access", lambda path, mode: False)
    with pytest.raises(DreamError, match="is not writable"):
        sample_from_checkpoint("anything.pt", str(tmp_path / "ro"), count=2, batch_size=2)


def test_files_that_are_not_checkpoints_say_so(tmp_path):
    from dream.checkpoint import load_model_for_sampling

    checkpoint = make_checkpoint(tmp_path)
    picture, text, foreign = tmp_path / "picture.png", tmp_path / "notes.txt", tmp_path / "foreign.pt"
    from PIL import Image

    Image.new("RGB", (4, 4)).save(picture)
    text.write_text("{not a checkpoint")
    torch.save({"model": SimpleNamespace(), "config": {}}, foreign)  # an object the weights-only loader refuses
    for path, message in [(picture, "is not a dream checkpoint or export"),
                          (text, "is not a dream checkpoint or export"),
                          (foreign, "holds Python objects other than tensors")]:
        with pytest.raises(DreamError, match=message) as error:
            load_model_for_sampling(path)
        assert "weights_only" not in str(error.value)
    damaged = bytearray(checkpoint.read_bytes())  # a copy outside its manifest: only torch.load can notice
    damaged[damaged.find(b"\x80\x02")] ^= 0x55  # the pickle stream's first opcode
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.raises(DreamError, match=r"damaged.pt cannot be read \(damaged: Unsupported operand"):
        load_model_for_sampling(tmp_path / "damaged.pt")

    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["base_channels"] = 32  # weights of one model under another's config
    torch.save(state, tmp_path / "mismatch.pt")
    with pytest.raises(DreamError, match=r"mismatch.pt do not fit the model its config describes \(size mismatch for "):
        load_model_for_sampling(tmp_path / "mismatch.pt")


def test_other_projects_checkpoints_and_newer_configs_are_one_line(tmp_path, capsys):
    """Another project's file with "model" and "config" entries is not a dream checkpoint, for sample and export
    alike; a config naming a model setting this version lacks (a newer dream's) says so, also through an export."""
    from dream.cli import main

    other = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": {"lr": 1e-3, "epochs": 3}}, other)
    worded = tmp_path / "worded.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": "resnet50"}, worded)
    state = torch.load(make_checkpoint(tmp_path), weights_only=True)
    state["config"]["model"]["future_knob"] = 3
    newer = tmp_path / "newer.pt"
    torch.save(state, newer)
    not_ours = "is not a dream checkpoint (no UNet weights and config in it)"
    runs = [(["sample", str(other)], f"{other} {not_ours}"), (["sample", str(worded)], f"{worded} {not_ours}"),
            (["export", str(other), "--weights", "model"], f"{other} {not_ours}"),
            (["sample", str(newer)], f"the model config in {newer} is not one this version of dream can build "
                                     f"(UNetConfig.__init__() got an unexpected keyword argument 'future_knob')")]
    for args, message in runs:
        out = ["--out", str(tmp_path / "out.safetensors")] if args[0] == "export" else \
            ["--out", str(tmp_path / "samples"), "--count", "1", "--batch-size", "1", "--steps", "1", "--no-progress"]
        assert main([*args, *out]) == 2
        err = capsys.readouterr().err
        assert err == f"dream {args[0]}: error: {message}\n"
    assert main(["export", str(newer), "--out", str(tmp_path / "newer.safetensors")]) == 0
    assert main(["sample", str(tmp_path / "newer.safetensors"), "--out", str(tmp_path / "samples"), "--count", "1",
                 "--batch-size", "1", "--steps", "1", "--no-progress"]) == 2
    assert "newer.safetensors is not one this version of dream can build" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists() and not list((tmp_path / "samples").glob("*.png"))


def test_an_export_is_found_by_its_contents_whatever_its_name(tmp_path):
    pytest.importorskip("safetensors")
    from dream.checkpoint import export_weights, load_model_for_sampling

    checkpoint = make_checkpoint(tmp_path)
    export = Path(export_weights(checkpoint, tmp_path / "ema.safetensors")["out"])
    renamed = tmp_path / "EMA.WEIGHTS"
    renamed.write_bytes(export.read_bytes())
    assert load_model_for_sampling(renamed)[2]["sampled_weights"] == "ema"
    with pytest.raises(DreamError, match="is an export already"):
        export_weights(renamed, tmp_path / "again.safetensors")
    with pytest.raises(DreamError, match="is a safetensors export, not a training checkpoint"):
        from dream.checkpoint import load_checkpoint

        load_checkpoint(renamed)
    with pytest.raises(DreamError, match=r"ending in .safetensors \(such as ema.safetensors\), got .*/\.safetensors$"):
        export_weights(checkpoint, tmp_path / ".safetensors")


def test_the_plain_loop_reports_each_step():
    model = tiny_unet(3)
    engine = SamplingEngine(model, GaussianDiffusion("cosine", 20), graphs=False)
    calls = []
    engine.sample(torch.randn(1, 3, 16, 16), "ddim", 7, 0.0, on_step=lambda: calls.append(1))
    assert len(calls) == 7


def test_batch_noise_streams_are_unrelated():
    """Every batch's starting noise and step noise, over batches and seeds, is a stream of its own (the seeds
    are hashed, not seed·K + b, where batch b's step noise would be batch b + 1's starting noise)."""
    from dream.sample import batch_noise, batch_step_seed

    shape = (2, 3, 4, 4)
    draws = {}
    with torch.random.fork_rng(devices=[]):
        for seed in (0, 1, 1_000_003):
            for b in range(3):
                draws[("start", seed, b)] = batch_noise(seed, b, shape, "cpu")
                torch.manual_seed(batch_step_seed(seed, b))
                draws[("step", seed, b)] = torch.randn(shape)
    values = list(draws.values())
    for i, first in enumerate(values):
        assert not any(torch.equal(first, other) for other in values[i + 1:])
    assert torch.equal(batch_noise(1, 2, shape, "cpu"), draws[("start", 1, 2)])  # and reproducible


@pytest.mark.parametrize("change", [{"seed": 4}, {"batch_size": 3}, {"steps": 3}, {"sampler": "ddpm", "steps": None},
                                    {"eta": 0.5}])
def test_a_set_is_not_continued_with_other_settings(tmp_path, change):
    """The seed, batch size, step count, sampler and DDIM eta each change the images: a folder holding images made
    with other values is refused before anything is written."""
    diffusion, model = GaussianDiffusion("cosine", 10), tiny_unet(6)
    common = dict(sampler="ddim", steps=2, batch_size=2, seed=3, progress=False)
    sample_images(model, diffusion, 2, tmp_path, **common)
    key = next(iter(change))
    with pytest.raises(DreamError, match=f"holds images made with {key}="):
        sample_images(model, diffusion, 4, tmp_path, **{**common, **change})
    assert not image_path(tmp_path, 2).exists()


def test_the_progress_bar_of_a_continued_set_counts_the_images_already_there(tmp_path, capsys):
    """Continuing a set of 2 images to 4, the bar starts at the 2 already written and ends at 4 of 4 (not at 2 of
    4, as if the set were left unfinished)."""
    diffusion, model = GaussianDiffusion("cosine", 10), tiny_unet(6)
    common = dict(sampler="ddim", steps=1, batch_size=2, seed=3)
    sample_images(model, diffusion, 2, tmp_path, progress=False, **common)
    capsys.readouterr()
    sample_images(model, diffusion, 4, tmp_path, progress=True, **common)
    shown = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("sampling (ddim)")]
    assert shown and "2/4" in shown[0] and "4/4" in shown[-1], shown


def test_a_folder_whose_images_are_gone_takes_new_settings_despite_its_grid(tmp_path):
    """grid.png is no image of the set: a folder left with its grid and record only takes new settings."""
    from dream.sample import check_settings

    check_settings(tmp_path, {"steps": 20, "seed": 0})
    (tmp_path / "grid.png").write_bytes(b"a grid")
    check_settings(tmp_path, {"steps": 2, "seed": 0})
    assert json.loads((tmp_path / "sampling.json").read_text()) == {"steps": 2, "seed": 0}


def test_a_record_without_a_setting_is_not_continued(tmp_path):
    """A setting the record does not hold (one an earlier version did not record) stops the set, after the
    settings it does hold are compared (a changed one is named first)."""
    from dream.sample import check_settings

    check_settings(tmp_path, {"steps": 2})
    image_path(tmp_path, 0).write_bytes(b"an image")
    check_settings(tmp_path, {"steps": 2})
    with pytest.raises(DreamError, match="holds images made with steps=2, this run has steps=3"):
        check_settings(tmp_path, {"steps": 3, "noise_device": "cpu"})
    with pytest.raises(DreamError, match="holds images whose sampling.json does not record noise_device "):
        check_settings(tmp_path, {"steps": 2, "noise_device": "cpu"})


def test_an_unwritable_out_says_whether_it_or_its_parent_is_the_problem(tmp_path, monkeypatch):
    import dream.sample
    from dream.sample import check_out_dir

    existing = tmp_path / "existing"
    existing.mkdir()
    monkeypatch.setattr(dream.sample.os, "access", lambda path, mode: False)
    with pytest.raises(DreamError, match=f"^--out {existing} is not writable$"):
        check_out_dir(existing)
    with pytest.raises(DreamError, match=rf"^--out {existing / 'new'} cannot be made \({existing} is not writable\)$"):
        check_out_dir(existing / "new")


def test_the_grid_is_square_and_shows_the_first_64_images(tmp_path):
    """sample writes grid.png of min(count, 64) images, ceil(sqrt(n)) to a row: 65 images make an 8 × 8 grid."""
    checkpoint = make_checkpoint(tmp_path)
    report = sample_from_checkpoint(str(checkpoint), str(tmp_path / "s"), count=65, batch_size=65, steps=1,
                                    progress=False)
    cell = 16 + 2  # torchvision's make_grid pads 2 pixels around each 16 × 16 image
    assert read_png(report["grid"]).shape == (8 * cell + 2, 8 * cell + 2, 3)
    from dream.sample import save_grid

    assert read_png(save_grid(tmp_path / "s", 5, tmp_path / "five.png")).shape == (2 * cell + 2, 3 * cell + 2, 3)


def test_a_grid_image_of_another_size_is_one_line(tmp_path):
    """Without a given size the grid takes the first image's: another size later in the set is named."""
    import numpy as np
    from PIL import Image

    from dream.sample import save_grid, write_pngs

    write_pngs(torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8).numpy(), tmp_path, [0, 1])
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(image_path(tmp_path, 2))
    with pytest.raises(DreamError, match=r"000002.png is 6×6 pixels, not the set's 8×8"):
        save_grid(tmp_path, 3, tmp_path / "grid.png")


def test_a_set_of_the_raw_weights_says_so(tmp_path):
    """--no-ema: the report and the folder's record name the raw weights, and a set of them is not continued
    with the EMA weights."""
    checkpoint = make_checkpoint(tmp_path)
    common = dict(count=2, batch_size=2, steps=1, progress=False, grid=False)
    report = sample_from_checkpoint(str(checkpoint), str(tmp_path / "raw"), use_ema=False, **common)
    assert report["ema"] is False and json.loads((tmp_path / "raw" / "sampling.json").read_text())["ema"] is False
    with pytest.raises(DreamError, match="holds images made with ema=False, this run has ema=True"):
        sample_from_checkpoint(str(checkpoint), str(tmp_path / "raw"), **{**common, "count": 4})


def test_a_checkpoints_folder_is_reported_as_the_file_it_sampled(tmp_path):
    """Given a folder of checkpoints, the report names the checkpoint file whose weights made the images (the
    folder's latest), not the folder: a later checkpoint saved there would otherwise seem to be the one."""
    checkpoint = make_checkpoint(tmp_path)
    report = sample_from_checkpoint(str(checkpoint.parent), str(tmp_path / "samples"), count=2, batch_size=2,
                                    steps=1, progress=False, grid=False)
    assert report["checkpoint"] == str(checkpoint.resolve()) != str(checkpoint.parent.resolve())


def test_a_rank_with_other_weights_is_told_their_step_before_their_hash(tmp_path):
    """Weights of another checkpoint differ in hash and step both: the refusal names the step, which a user can
    tell apart, whatever the order of the settings; the hash when it alone differs."""
    from dream.sample import check_same_job

    main = {"ema": True, "weights_sha256": "a" * 64, "checkpoint_step": 3}
    both, hash_only = {**main, "weights_sha256": "b" * 64, "checkpoint_step": 5}, {**main, "weights_sha256": "b" * 64}
    for other, said in [(both, "(checkpoint_step 5, rank 0's 3)"),
                        (hash_only, f"(weights_sha256 '{'b' * 64}', rank 0's '{'a' * 64}')")]:
        with pytest.raises(DreamError, match=f"^this process loaded other weights than rank 0 {re.escape(said)}"):
            check_same_job(tmp_path, None, other, main)


def test_an_export_of_the_raw_weights_says_so_without_no_ema(tmp_path):
    """The record names the weights a file holds, not the flag: an export made with --weights model, sampled
    without --no-ema, is a set of the raw weights, and is not continued with the checkpoint's EMA weights."""
    from dream.checkpoint import export_weights

    checkpoint = make_checkpoint(tmp_path)
    export = export_weights(checkpoint, tmp_path / "raw.safetensors", weights="model")["out"]
    common = dict(count=2, batch_size=2, steps=1, progress=False, grid=False)
    report = sample_from_checkpoint(str(export), str(tmp_path / "raw"), **common)
    assert report["ema"] is False and json.loads((tmp_path / "raw" / "sampling.json").read_text())["ema"] is False
    with pytest.raises(DreamError, match="holds images made with ema=False, this run has ema=True"):
        sample_from_checkpoint(str(checkpoint), str(tmp_path / "raw"), **{**common, "count": 4})


# ----------------------------------------------------------------------------------------------
# GPU: graphs
def gpu_model(backend: str):
    """The tiny model on CUDA: eager, triton, triton_channels_last (the default layout on CUDA) or compile."""
    model = tiny_unet(8, image_size=32, base_channels=32).cuda()
    if backend.startswith("triton"):
        pytest.importorskip("kernels")
        model.set_backend("triton")
    if backend == "triton_channels_last":  # NCHW static buffers in the graph, a channels_last model inside
        model = model.to(memory_format=torch.channels_last)
    if backend == "compile":
        return torch.compile(model)
    return model


GPU_CASES = (
    [("eager", c, d, k) for c in CONFIGS for d in (torch.float32, torch.bfloat16) for k in (1, 3)]
    + [(b, ("ddim", 6, 0.7), d, 1) for b in ("triton", "triton_channels_last") for d in (torch.float32, torch.bfloat16)]
    + [("compile", ("ddim", 6, 0.7), d, 4) for d in (torch.float32, torch.bfloat16)]
)


@gpu
@pytest.mark.parametrize("backend, config, dtype, steps_per_graph", GPU_CASES)
def test_graphed_loop_matches_plain_loop(backend, config, dtype, steps_per_graph, exact_fp32):
    sampler, steps, eta = config
    diffusion = GaussianDiffusion("cosine", 20).cuda()
    engine = SamplingEngine(gpu_model(backend), diffusion, steps_per_graph=steps_per_graph)
    x_T = torch.randn(4, 3, 32, 32, device="cuda")

    def run(seed, graphs):
        if seed is not None:
            torch.manual_seed(seed)
        return engine.sample(x_T, sampler, steps, eta, dtype=dtype, graphs=graphs)

    plain = run(123, False)
    graphed = run(123, True)
    torch.testing.assert_close(graphed, plain, atol=GPU_GRAPH_TOLERANCE[dtype], rtol=0)
    again = run(123, True)  # the cached capture, same seed: same images
    assert len(engine.captures) == 1
    torch.testing.assert_close(again, graphed, atol=GPU_GRAPH_TOLERANCE[dtype], rtol=0)
    fresh = run(None, True)  # no reseed: the graph draws fresh noise
    if eta > 0:
        assert (fresh - again).abs().max() > 10 * GPU_GRAPH_TOLERANCE[dtype]
    else:
        torch.testing.assert_close(fresh, again, atol=GPU_GRAPH_TOLERANCE[dtype], rtol=0)


@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_graphed_loop_matches_reference_sampler_on_gpu(config, exact_fp32):
    """The reference loops draw their noise from the default CUDA generator in the same order. TF32 off:
    the two fold the schedule's coefficients differently (~1e-6 per step), which TF32 convolutions would
    amplify through the large sqrt(1/alpha_bar - 1) of the early steps."""
    sampler, steps, eta = config
    diffusion = GaussianDiffusion("cosine", 20).cuda()
    model = gpu_model("eager")
    x_T = torch.randn(4, 3, 32, 32, device="cuda")
    torch.manual_seed(9)
    if sampler == "ddpm":
        ref = diffusion.p_sample_loop(model, x_T.shape, x_T=x_T, progress=False)
    else:
        ref = diffusion.ddim_sample_loop(model, x_T.shape, steps=steps, eta=eta, x_T=x_T, progress=False)
    torch.manual_seed(9)
    graphed = SamplingEngine(model, diffusion).sample(x_T, sampler, steps, eta, graphs=True)
    torch.testing.assert_close(graphed, ref, atol=GPU_GRAPH_TOLERANCE[torch.float32], rtol=0)


@gpu
def test_capture_is_per_backend_and_mode(exact_fp32):
    """A capture replays the kernels of the model as it was captured: switching the backend or the
    train/eval mode makes a new capture."""
    pytest.importorskip("kernels")
    diffusion = GaussianDiffusion("cosine", 20).cuda()
    model = gpu_model("eager").eval()
    engine = SamplingEngine(model, diffusion)
    x_T = torch.randn(2, 3, 32, 32, device="cuda")
    torch.manual_seed(5)
    eager = engine.sample(x_T, "ddim", 4, 0.0, graphs=True)
    model.set_backend("triton")
    torch.manual_seed(5)
    triton = engine.sample(x_T, "ddim", 4, 0.0, graphs=True)
    assert len(engine.captures) == 2
    torch.testing.assert_close(triton, eager, atol=1e-2, rtol=0)
    model.train()
    engine.sample(x_T, "ddim", 4, 0.0, graphs=True)
    assert len(engine.captures) == 3


def test_captures_are_dropped_when_the_weights_move(monkeypatch):
    """A capture reads the weights at the addresses they had when it was made: weights copied in place keep
    it, weights re-allocated (load_state_dict(assign=True), .to()) drop every capture. The bookkeeping is
    checked on the CPU with the capture itself stubbed out; the GPU test below replays real graphs."""
    import dream.sampling as sampling_module

    made = []
    monkeypatch.setattr(sampling_module, "GraphedLoop", lambda *args: made.append(object()) or made[-1])
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    model = tiny_unet(3).eval()
    engine = SamplingEngine(model, GaussianDiffusion("cosine", 20))
    plan = engine.plan("ddim", 4, 0.0)
    x_T = torch.randn(2, 3, 16, 16)
    first = engine._graphed(plan, x_T, torch.float32, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # in place: the capture still reads them
    assert engine._graphed(plan, x_T, torch.float32, 1) is first and len(made) == 1
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    second = engine._graphed(plan, x_T, torch.float32, 1)
    assert second is not first and list(engine.captures.values()) == [second] and len(made) == 2


@gpu
def test_capture_follows_reallocated_weights(exact_fp32):
    diffusion = GaussianDiffusion("cosine", 20).cuda()
    model = gpu_model("eager").eval()
    engine = SamplingEngine(model, diffusion)
    x_T = torch.randn(2, 3, 32, 32, device="cuda")
    before = engine.sample(x_T, "ddim", 4, 0.0, graphs=True)
    model.load_state_dict({k: v * 1.05 if v.is_floating_point() else v.clone()
                           for k, v in model.state_dict().items()}, assign=True)
    after = engine.sample(x_T, "ddim", 4, 0.0, graphs=True)
    plain = engine.sample(x_T, "ddim", 4, 0.0, graphs=False)
    assert len(engine.captures) == 1
    torch.testing.assert_close(after, plain, atol=GPU_GRAPH_TOLERANCE[torch.float32], rtol=0)
    assert (after - before).abs().max() > 10 * GPU_GRAPH_TOLERANCE[torch.float32]


@gpu
def test_sampling_on_a_device_that_is_not_current():
    """Graphs captured for cuda:1 while cuda:0 is current replay the real loop (not an empty graph)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    diffusion = GaussianDiffusion("cosine", 20).to("cuda:1")
    model = tiny_unet(8, image_size=32, base_channels=32).to("cuda:1").eval()
    x_T = torch.randn(2, 3, 32, 32, device="cuda:1")
    plain = SamplingEngine(model, diffusion).sample(x_T, "ddim", 4, 0.0, graphs=False)
    graphed = SamplingEngine(model, diffusion).sample(x_T, "ddim", 4, 0.0, graphs=True)
    torch.testing.assert_close(graphed, plain, atol=GPU_GRAPH_TOLERANCE[torch.float32], rtol=0)
    assert not torch.equal(graphed, x_T)


@gpu
def test_loop_makes_no_host_sync():
    diffusion = GaussianDiffusion("cosine", 20).cuda()
    engine = SamplingEngine(gpu_model("eager"), diffusion)
    x_T = torch.randn(2, 3, 32, 32, device="cuda")
    engine.plan("ddim", 5, 0.5, device=x_T.device)
    engine.sample(x_T, "ddim", 5, 0.5, graphs=True)  # capture (synchronises) outside the checked region
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.sample(x_T, "ddim", 5, 0.5, graphs=False)
        engine.sample(x_T, "ddim", 5, 0.5, graphs=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@gpu
def test_time_sampling_gpu():
    result = time_sampling(gpu_model("eager"), GaussianDiffusion("cosine", 20).cuda(), batch_size=4, steps=5,
                           repeats=2, steps_per_graph=2)
    assert result["plain"]["images_per_s"] > 0 and result["graphs"]["images_per_s"] > 0


def test_a_batch_whose_images_are_all_missing_is_planned_whole_when_the_next_batch_has_begun(tmp_path):
    """The first image the folder holds past a batch is the next batch's first: the batch has none there and is
    planned whole (a range), as a batch past every image is."""
    from dream.sample import PNG_END, unfinished_batches

    image_path(tmp_path, 4).write_bytes(b"\x89PNG" + PNG_END)  # batch 1's first image, of count 8, batch 4
    assert unfinished_batches(tmp_path, 8, 4) == [(0, range(4)), (1, [1, 2, 3])]


def test_a_set_is_not_continued_by_a_model_of_another_image_size(tmp_path):
    """sampling.json records the image size: a model of another size (no weights hash given to compare) adds no
    images of its size to the set."""
    diffusion = GaussianDiffusion("cosine", 10)
    common = dict(sampler="ddim", steps=1, batch_size=2, seed=3, progress=False)
    sample_images(tiny_unet(6, image_size=16), diffusion, 2, tmp_path, **common)
    with pytest.raises(DreamError, match="image_size=16, this run has image_size=8"):
        sample_images(tiny_unet(6, image_size=8), diffusion, 4, tmp_path, **common)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [image_path(tmp_path, i).name for i in range(2)]
