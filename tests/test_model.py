"""The seed UNet: exact sizes, shapes, backends and checkpointing policies, bad configurations."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.info import model_info
from dream.model import (Attention, ResBlock, UNet, autocast_for, build_unet, check_backend_device, concat_skip,
                         count_parameters, make_config, resize_skip, timestep_embedding)


def test_parameter_counts_match_the_seed():
    assert count_parameters(build_unet("seed")) == 54_846_979
    assert count_parameters(build_unet("tiny")) == 3_438_979


def test_seed_preset_has_the_seeds_numbers():
    """Base 128, 128 -> 256 -> 512 (-> 512 middle), 2 ResBlocks a level, GroupNorm(8) (PyTorch's eps), dropout
    0.1, attention with 8 heads of 64 dims at 16x16 and in the middle, a 512-d time embedding. (The parameter
    count does not pin the groups, heads, dropout or eps.)"""
    model = build_unet("seed")
    config = model.config
    assert (config.base_channels, config.channel_mults, config.num_res_blocks) == (128, (1, 2, 4), 2)
    assert (config.num_groups, config.num_heads, config.dropout, config.norm_eps) == (8, 8, 0.1, 1e-5)
    assert config.time_embed_dim == 512 and config.image_size // 2 ** config.attention_levels[0] == 16
    assert all(m.num_groups == 8 and m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))
    heads = [(m.norm.num_channels, m.num_heads) for m in model.modules() if isinstance(m, Attention)]
    assert heads == [(512, 8)] * 3  # down 16x16, middle 8x8, up 16x16


def seed_resblock(p, name, x, temb):
    """The seed's MemoryOptimizedResBlock.forward, line by line (GroupNorm(8), dropout 0.1)."""
    h = F.conv2d(F.silu(F.group_norm(x, 8, p[name + "norm1.weight"], p[name + "norm1.bias"])),
                 p[name + "conv1.weight"], p[name + "conv1.bias"], padding=1)
    time_emb = F.linear(F.silu(temb), p[name + "time_mlp.1.weight"], p[name + "time_mlp.1.bias"])
    scale, shift = time_emb.view(time_emb.shape[0], -1, 1, 1).chunk(2, dim=1)
    h = h * (1 + scale) + shift
    h = F.dropout(F.silu(F.group_norm(h, 8, p[name + "norm2.weight"], p[name + "norm2.bias"])), 0.1, training=True)
    h = F.conv2d(h, p[name + "conv2.weight"], p[name + "conv2.bias"], padding=1)
    skip = F.conv2d(x, p[name + "skip.weight"], p[name + "skip.bias"]) if name + "skip.weight" in p else x
    return h + skip


def seed_attention(p, name, x, num_heads=8):
    """The seed's MemoryEfficientAttention.forward, line by line."""
    b, c, height, width = x.shape
    qkv = F.conv2d(F.group_norm(x, 8, p[name + "norm.weight"], p[name + "norm.bias"]), p[name + "qkv.weight"],
                   p[name + "qkv.bias"])
    q, k, v = (u.reshape(b, num_heads, c // num_heads, height * width) for u in qkv.chunk(3, dim=1))
    attn = F.softmax(torch.einsum("bhcn,bhcm->bhnm", q, k) * (c // num_heads) ** -0.5, dim=-1)
    out = torch.einsum("bhnm,bhcm->bhcn", attn, v).reshape(b, c, height, width)
    return x + F.conv2d(out, p[name + "proj_out.weight"], p[name + "proj_out.bias"])


def seed_unet(p, x, t, levels=3, attention_level=2, res_blocks=2):
    """The seed's UNet as shared/notes/seed-model.md states it, from the seed's blocks above: sinusoidal
    embedding of the base width, Linear-SiLU-Linear; per level ResBlocks (+ attention), a stride-2 conv whose
    output is the skip; middle Res-Attn-Res; per level a transposed conv, cat[h, bilinear(skip)], ResBlocks
    (+ attention); GroupNorm, SiLU, conv."""
    temb = timestep_embedding(t, p["time_mlp.0.weight"].shape[1]).to(x.dtype)
    temb = F.linear(F.silu(F.linear(temb, p["time_mlp.0.weight"], p["time_mlp.0.bias"])),
                    p["time_mlp.2.weight"], p["time_mlp.2.bias"])
    h = F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    skips = []
    for level in range(levels):
        for i in range(res_blocks):
            h = seed_resblock(p, f"down.{level}.blocks.{i}.", h, temb)
        if level == attention_level:
            h = seed_attention(p, f"down.{level}.blocks.{res_blocks}.", h)
        h = F.conv2d(h, p[f"down.{level}.downsample.weight"], p[f"down.{level}.downsample.bias"], stride=2, padding=1)
        skips.append(h)
    h = seed_attention(p, "mid.1.", seed_resblock(p, "mid.0.", h, temb))
    h = seed_resblock(p, "mid.2.", h, temb)
    for stage, level in enumerate(reversed(range(levels))):
        h = F.conv_transpose2d(h, p[f"up.{stage}.upsample.weight"], p[f"up.{stage}.upsample.bias"], stride=2,
                               padding=1)
        skip = F.interpolate(skips.pop(), size=h.shape[-2:], mode="bilinear", align_corners=False)
        h = torch.cat([h, skip], dim=1)
        for i in range(res_blocks):
            h = seed_resblock(p, f"up.{stage}.blocks.{i}.", h, temb)
        if level == attention_level:
            h = seed_attention(p, f"up.{stage}.blocks.{res_blocks}.", h)
    h = F.silu(F.group_norm(h, 8, p["norm_out.weight"], p["norm_out.bias"]))
    return F.conv2d(h, p["conv_out.weight"], p["conv_out.bias"], padding=1)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_unet_is_the_seeds_model_written_independently(backend):
    """The UNet in training mode (dropout on) against seed_unet in float64, same dropout masks (dropout is
    the only random draw, in the same order): pins the ResBlock's order (scale before shift, both before
    the second norm; dropout between SiLU and conv2), the time MLPs, where skips are taken and the head."""
    model = build_unet("tiny", image_size=16, backend=backend).double().train()  # the seed's numbers, base 32
    with torch.no_grad():
        for param in model.parameters():  # random norms and a non-zero head: every path matters
            param.add_(0.1 * torch.randn_like(param))
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([7, 901])
    torch.manual_seed(4)
    ours = model(x, t)
    torch.manual_seed(4)
    reference = seed_unet(params, x, t)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(ours)
    # autograd.grad also fails if the reference left a parameter unused
    for a, b in zip(torch.autograd.grad((ours * weights).sum(), list(params.values())),
                    torch.autograd.grad((reference * weights).sum(), list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    model.eval()
    assert not torch.allclose(model(x, t), ours)  # the dropout masks were in play


def test_time_projections_are_each_resblocks_time_mlp_in_call_order():
    """UNet.time_projections (the triton backend's one matmul for every ResBlock's time MLP) gives each block
    its own time_mlp(temb) and the same gradients, listed in the order forward calls the blocks."""
    model = build_unet("tiny", image_size=16).double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    called = []
    for block in model.resblocks():
        block.register_forward_pre_hook(lambda module, args: called.append(module))
    t = torch.tensor([7, 901])
    model(torch.randn(2, 3, 16, 16, dtype=torch.float64), t)
    assert len(called) == 14 and all(a is b for a, b in zip(called, model.resblocks()))
    temb = model.time_mlp(timestep_embedding(t, model.config.sinusoidal_dim).double())
    projections = model.time_projections(temb)
    separate = [block.time_mlp(temb) for block in called]
    weights = [torch.randn_like(p) for p in separate]
    params = [p for block in called for p in block.time_mlp.parameters()] + list(model.time_mlp.parameters())
    for a, b in zip(projections, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(sum((p * w).sum() for p, w in zip(projections, weights)), params,
                                        retain_graph=True),
                    torch.autograd.grad(sum((p * w).sum() for p, w in zip(separate, weights)), params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


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


@pytest.mark.parametrize("policy, checkpointed", [("none", set()), ("attention", {"Attention"}),
                                                  ("resblocks", {"ResBlock"}), ("all", {"ResBlock", "Attention"})])
def test_each_checkpointing_policy_checkpoints_its_blocks_and_only_in_training_with_gradients(monkeypatch, policy,
                                                                                              checkpointed):
    """Which blocks each policy runs through torch.utils.checkpoint: every block of its kinds (the tiny UNet:
    14 ResBlocks, 3 attention blocks), while training with gradients enabled; evaluation and no_grad
    run every block plainly (nothing would be freed there)."""
    import dream.model

    seen = []
    plain_checkpoint = dream.model.activation_checkpoint
    monkeypatch.setattr(dream.model, "activation_checkpoint",
                        lambda block, *args, **kwargs: seen.append(type(block).__name__)
                        or plain_checkpoint(block, *args, **kwargs))
    model = build_unet("tiny", image_size=8, checkpointing=policy)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([7])
    model(x, t)
    expected = {"ResBlock": 14, "Attention": 3}
    assert sorted(seen) == sorted(kind for kind in checkpointed for _ in range(expected[kind]))
    seen.clear()
    with torch.no_grad():
        model(x, t)
    model.eval()
    model(x, t)
    assert seen == []


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
    ({"num_res_blocks": True}, "num_res_blocks must be a positive integer, got True"),  # a bool is no count
    ({"num_heads": 5}, "channel width 32 is not divisible by num_heads=5"),
    ({"image_size": 36}, "image_size 36 must be divisible by 8"),  # 3 levels: 8, not 4
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"attention_levels": (-1,)}, "attention level -1 out of range for 3 levels"),
    ({"attention_levels": (3,)}, "attention level 3 out of range for 3 levels"),
])
def test_bad_configurations_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("tiny", **overrides)


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="backend"):
        UNet(make_config("tiny"), backend="cuda-magic")


def test_unknown_checkpoint_policy_is_named_as_such():
    """A policy that does not exist is named with the list to choose from, not mistaken for one that needs the
    triton backend."""
    with pytest.raises(ValueError, match=r"^unknown checkpoint policy 'everything'; choose one of \('none', "):
        build_unet("tiny", image_size=8, checkpointing="everything")


def test_make_config_leaves_unset_overrides_to_the_preset_and_stores_tuples():
    """Overrides given as None (options the user did not set) keep the preset's values, and list-valued
    overrides (from JSON or the command line) are stored as tuples: the config stays hashable and equal to
    one made with tuples."""
    config = make_config("tiny", dropout=None, num_heads=None, channel_mults=[1, 2], attention_levels=[1])
    preset = make_config("tiny")
    assert (config.dropout, config.num_heads) == (preset.dropout, preset.num_heads)
    assert config.channel_mults == (1, 2) and config.attention_levels == (1,)
    assert config == make_config("tiny", channel_mults=(1, 2), attention_levels=(1,))
    hash(config)


def test_set_backend_reaches_every_block():
    """set_backend switches every ResBlock and attention block (the attention core is where sdpa differs)."""
    model = build_unet("tiny", image_size=8)
    for backend in ("sdpa", "eager"):
        model.set_backend(backend)
        blocks = [m for m in model.modules() if isinstance(m, (ResBlock, Attention))]
        assert len(blocks) == 17 and {m.backend for m in blocks} == {backend}


def test_autocast_for_each_precision():
    """fp32 runs without autocast; bf16 and fp16 autocast to their own dtype."""
    a = torch.randn(4, 4)
    with autocast_for("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu") and torch.mm(a, a).dtype == torch.float32
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast_for(precision, "cpu"):
            assert torch.mm(a, a).dtype == dtype, precision


def test_backend_device_check_refuses_only_the_triton_backend_on_a_cpu(monkeypatch):
    """The triton backend on a CPU needs the interpreter and refuses bf16 there; on CUDA, and for the other
    backends anywhere, every precision passes."""
    import kernels.device

    for interpreting in (True, False):
        monkeypatch.setattr(kernels.device, "interpreting", lambda: interpreting)
        for dtype in (None, torch.float16, torch.bfloat16):
            check_backend_device("triton", "cuda", dtype)
            check_backend_device("eager", "cpu", dtype)
            check_backend_device("sdpa", "cpu", dtype)
    monkeypatch.setattr(kernels.device, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="^backend 'triton' runs its kernels on a CUDA GPU; on a CPU set "
                                         "TRITON_INTERPRET=1"):
        check_backend_device("triton", "cpu")
    monkeypatch.setattr(kernels.device, "interpreting", lambda: True)
    check_backend_device("triton", "cpu", torch.float16)
    with pytest.raises(ValueError, match="whose bf16 is wrong"):
        check_backend_device("triton", "cpu", torch.bfloat16)


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


def test_skip_resize_takes_at_most_resize_max_parts_parts(monkeypatch):
    """A batch that needs exactly RESIZE_MAX_PARTS parts is resized; one image more is refused in one line."""
    skip, like = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 6, 6)
    monkeypatch.setattr("dream.model.RESIZE_MAX_ELEMENTS", 2 * 6 * 6)  # one image a part
    monkeypatch.setattr("dream.model.RESIZE_MAX_PARTS", 3)
    torch.testing.assert_close(resize_skip(skip[:3], like[:3]), F.interpolate(skip[:3], size=(6, 6), mode="bilinear"))
    with pytest.raises(ValueError, match="^resize_skip: 4 images of 72 elements take more than 3 parts"):
        resize_skip(skip, like)


def test_half_precision_skip_resize_is_the_fp32_resize_rounded_once():
    """A bf16 skip is resized in fp32 and rounded to bf16 once (not interpolated in bf16, which rounds the
    weighted sums on the way): bitwise the fp32 resize of the same values, cast. A scale that is not 2 makes
    the interpolation weights inexact in bf16."""
    torch.manual_seed(5)
    skip = torch.randn(2, 8, 16, 16).to(torch.bfloat16)
    like = torch.empty(2, 8, 33, 35, dtype=torch.bfloat16)
    wide = F.interpolate(skip.float().contiguous(memory_format=torch.channels_last), size=(33, 35), mode="bilinear",
                         align_corners=False)
    assert torch.equal(resize_skip(skip, like), wide.to(torch.bfloat16))


@pytest.mark.parametrize("skip_size", [(3, 4), (4, 3), (2, 2), (3, 3)])
def test_triton_skip_concatenation_matches_eager_at_any_skip_size(skip_size):
    """concat_skip on the triton backend (the transposed convolution without its bias, then the fused
    upsample-and-concatenate kernel where the skip is exactly half of h in both dimensions, else the bias
    added, resize_skip and torch.cat) gives eager's cat([upsample(x), resize(skip)]): a skip half of h in
    one dimension only, in neither, and in both."""
    torch.manual_seed(6)
    upsample = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)
    with torch.no_grad():
        upsample.bias.add_(1.0)  # a bias that shows where it is left out
    x, skip = torch.randn(2, 4, 3, 3), torch.randn(2, 5, *skip_size)  # h: 6x6
    expected = concat_skip(x, skip, upsample, "eager")
    assert expected.shape == (2, 8, 6, 6)
    torch.testing.assert_close(concat_skip(x, skip, upsample, "triton"), expected, rtol=1e-5, atol=1e-5)


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


def test_model_info_block_shapes_are_those_of_one_image():
    """Each block's output shape is C x H x W (no batch dimension): the input convolution keeps the image size,
    the middle runs at the deepest width after one halving per level."""
    size = 16
    info = model_info("tiny", image_size=size)
    config = info["config"]
    shapes = {block["block"]: block["shape"] for block in info["blocks"]}
    deepest = size // 2 ** len(config["channel_mults"])
    assert shapes["conv_in"] == f"{config['base_channels']}x{size}x{size}"
    assert shapes["mid.0"] == f"{config['base_channels'] * config['channel_mults'][-1]}x{deepest}x{deepest}"
    assert shapes["conv_out"] == f"{config['in_channels']}x{size}x{size}"


def math_switches():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
            torch.get_float32_matmul_precision())


def test_math_flags_restore_every_switch_and_let_errors_through():
    from dream.math_flags import MathFlags, exact_fp32, use_fast_math

    before = math_switches()
    with pytest.raises(RuntimeError, match="inside"), MathFlags():
        use_fast_math()
        torch.set_float32_matmul_precision("medium")
        assert math_switches()[:3] == (True, True, True)
        raise RuntimeError("inside")
    assert math_switches() == before
    with MathFlags():
        use_fast_math()
        torch.set_float32_matmul_precision("high")
        with exact_fp32():
            assert math_switches() == (False, False, True, "highest")  # autotuning is left as it was
        assert math_switches() == (True, True, True, "high")
    assert math_switches() == before
