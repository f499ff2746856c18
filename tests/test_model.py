"""The seed UNet: exact sizes, shapes, backends and checkpointing policies, bad configurations."""
import math

import pytest
import torch
import torch.nn.functional as F

from dream.info import model_info
from dream.model import UNet, build_unet, count_parameters, make_config, resize_skip, timestep_embedding


def test_parameter_counts_match_the_seed():
    assert count_parameters(build_unet("seed")) == 54_846_979
    assert count_parameters(build_unet("tiny")) == 3_438_979


def test_seed_forward_flops_per_image():
    info = model_info("seed")
    assert info["parameters"] == 54_846_979
    assert info["gflops_forward_per_image"] == pytest.approx(38.70, abs=0.005)
    assert sum(b["parameters"] for b in info["blocks"]) == info["parameters"]
    assert sum(b["gflops"] for b in info["blocks"]) == pytest.approx(info["gflops_forward_per_image"], rel=1e-9)


def test_model_facts_allocate_nothing_at_any_size():
    """`dream info` counts on the meta device: the same FLOPs as a real forward, and a 2048px model (whose
    4096-token attention at 64×64 would take gigabytes) at once."""
    import time

    from torch.utils.flop_counter import FlopCounterMode

    model = build_unet("tiny", image_size=32).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    info = model_info("tiny", image_size=32)
    assert info["gflops_forward_per_image"] * 1e9 == counter.get_total_flops()
    assert info["parameters"] == count_parameters(model)
    start = time.perf_counter()
    large = model_info("tiny", image_size=2048)
    assert time.perf_counter() - start < 30 and large["parameters"] == info["parameters"]
    assert large["gflops_forward_per_image"] > (2048 / 32) ** 2 * info["gflops_forward_per_image"]


@pytest.mark.parametrize("batch,size", [(1, 16), (3, 32)])
def test_output_shape_and_zero_initialised_head(batch, size):
    model = build_unet("tiny", image_size=size)
    x = torch.randn(batch, 3, size, size)
    y = model(x, torch.randint(0, 1000, (batch,)))
    assert y.shape == x.shape
    assert torch.count_nonzero(y) == 0  # conv_out starts at zero
    torch.nn.init.normal_(model.conv_out.weight)
    assert torch.count_nonzero(model(x, torch.zeros(batch, dtype=torch.long))) > 0


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 128)
    i = 5
    f = math.exp(-i * math.log(10000) / 63)
    assert emb[1, i].item() == pytest.approx(math.sin(7 * f), abs=1e-6)
    assert emb[2, 64 + i].item() == pytest.approx(math.cos(999 * f), abs=1e-5)


def randomised_tiny(size=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = build_unet("tiny", image_size=size, dropout=dropout).double()
    with torch.no_grad():
        for p in model.parameters():  # random affine norms and a non-zero head: every path matters
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_sdpa_backend_matches_eager_forward_and_gradients():
    model = randomised_tiny()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([3, 900])
    outputs, grads = [], []
    for backend in ("eager", "sdpa"):
        model.set_backend(backend)
        model.zero_grad()
        y = model(x, t)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy", ["attention", "resblocks", "all"])
def test_activation_checkpointing_changes_nothing_numerically(policy):
    model = randomised_tiny(dropout=0.1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([10, 500])
    results = []
    for chosen in ("none", policy):
        model.set_checkpointing(chosen)
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks: checkpoint replays the RNG state
        y = model(x, t)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_state_dict_is_the_same_for_every_backend():
    keys = {backend: list(build_unet("tiny", backend=backend).state_dict()) for backend in ("eager", "sdpa")}
    assert keys["eager"] == keys["sdpa"]


@pytest.mark.parametrize("overrides,message", [
    ({"base_channels": 20}, "num_groups"),
    ({"image_size": 50}, "divisible"),
    ({"dropout": 1.5}, "dropout"),
    ({"base_channels": 0}, "base_channels must be a positive integer, got 0"),
    ({"image_size": -8}, "image_size must be a positive integer, got -8"),
    ({"num_res_blocks": 0}, "num_res_blocks must be a positive integer"),
    ({"channel_mults": ()}, "channel_mults must be positive integers"),
    ({"channel_mults": (1, 0)}, "channel_mults must be positive integers"),
    ({"norm_eps": 0.0}, "norm_eps must be positive"),
])
def test_bad_configurations_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("tiny", **overrides)


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="backend"):
        UNet(make_config("tiny"), backend="cuda-magic")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_skip_resize_is_bilinear_in_wide_precision_and_keeps_the_layout(dtype, tolerance, channels_last):
    torch.manual_seed(1)
    skip = torch.randn(3, 12, 5, 7, dtype=torch.float64)
    like = torch.randn(3, 12, 10, 14, dtype=torch.float64).to(dtype)
    if channels_last:
        like = like.contiguous(memory_format=torch.channels_last)
    skip_in = skip.to(dtype).requires_grad_()
    out = resize_skip(skip_in, like)
    assert out.dtype == dtype and out.shape == like.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    reference_in = skip_in.detach().double().requires_grad_()
    reference = F.interpolate(reference_in, size=(10, 14), mode="bilinear", align_corners=False)
    assert (out.double() - reference).abs().max().item() <= tolerance * reference.abs().max().item()
    grad = torch.randn_like(reference)
    out.backward(grad.to(dtype))
    reference.backward(grad)
    error = (skip_in.grad.double() - reference_in.grad).abs().max().item()
    assert skip_in.grad.dtype == dtype and error <= tolerance * 4 * reference_in.grad.abs().max().item()


def test_skip_resize_of_a_very_large_batch_goes_in_parts(monkeypatch):
    """CUDA's channels_last bilinear kernel indexes with 32-bit ints: past RESIZE_MAX_ELEMENTS outputs the
    batch is resized in parts (a batch of 4096 at the seed's 64x64 stage would be 2^31 elements)."""
    torch.manual_seed(2)
    skip, like = torch.randn(5, 6, 4, 3), torch.randn(5, 6, 8, 6)
    whole = resize_skip(skip, like)
    calls = []
    original = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, **kw: calls.append(x.shape[0]) or original(x, **kw))
    monkeypatch.setattr("dream.model.RESIZE_MAX_ELEMENTS", 2 * 6 * 8 * 6)  # two images a call
    parts = resize_skip(skip, like)
    assert calls == [2, 2, 1] and torch.equal(parts, whole) and parts.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's channels_last bilinear kernel needs a GPU")
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_skip_resize_on_cuda_matches_the_nchw_kernel(dtype, tolerance):
    """On CUDA the resize runs the channels_last bilinear kernel: the values and gradients of the NCHW one
    (to fp32 rounding; the two kernels may contract multiply-adds differently)."""
    torch.manual_seed(3)
    skip = torch.randn(3, 128, 32, 32, device="cuda").to(dtype).requires_grad_()
    like = torch.empty(3, 128, 64, 64, device="cuda", dtype=dtype)
    grad = torch.randn(3, 128, 64, 64, device="cuda")
    out = resize_skip(skip, like)
    out.backward(grad.to(dtype))
    reference_in = skip.detach().float().requires_grad_()
    reference = F.interpolate(reference_in, size=(64, 64), mode="bilinear", align_corners=False)
    reference.backward(grad)
    assert out.dtype == dtype and out.is_contiguous()
    assert (out.float() - reference).abs().max().item() <= tolerance * reference.abs().max().item()
    error = (skip.grad.float() - reference_in.grad).abs().max().item()
    assert error <= 4 * tolerance * reference_in.grad.abs().max().item()
