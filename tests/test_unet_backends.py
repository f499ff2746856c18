"""The UNet with the Triton kernels (backend="triton") against the eager model, end to end.

Both run in float32 and are compared with the eager model in float64: the triton backend's error
must stay within a small factor of eager float32's own error, for the output and every parameter
gradient. On a GPU the fp32 tests run with TF32 off (the exact_fp32 fixture): cuDNN's TF32 convolutions
(its default) would put ~1e-3 relative noise under every comparison. On a CPU the kernels run through
the Triton interpreter (tests/conftest.py).
"""
import pytest
import torch

from conftest import DEVICE, ON_GPU
from dream.model import Attention, ResBlock, build_unet

SIZE = 32 if ON_GPU else 16
BATCH = 4 if ON_GPU else 2


def random_model(size=SIZE, dropout=0.0, **overrides):
    torch.manual_seed(0)
    model = build_unet("tiny", image_size=size, dropout=dropout, **overrides)
    with torch.no_grad():
        for p in model.parameters():  # random norms, scales and a non-zero head: every path matters
            p.add_(0.2 * torch.randn_like(p))
    return model


def run(model, x, t, grad_out):
    model.zero_grad(set_to_none=True)
    y = model(x, t)
    y.backward(grad_out)
    return y.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_backend_matches_eager_forward_and_every_gradient(backend, exact_fp32):
    model = random_model().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE)
    t = torch.tensor([3, 998, 500, 10][:BATCH], device=DEVICE)
    grad_out = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE)

    reference = run(model.double().set_backend("eager"), x.double(), t, grad_out.double())
    eager32 = run(model.float().set_backend("eager"), x, t, grad_out)
    fast = run(model.set_backend(backend), x, t, grad_out)

    assert torch.isfinite(fast[0]).all()
    # fp32 eager's own error against float64 sets the scale; the fast path may not be much worse
    for name in ["output"] + list(reference[1]):
        ref = reference[0] if name == "output" else reference[1][name]
        ours = fast[0] if name == "output" else fast[1][name]
        eager = eager32[0] if name == "output" else eager32[1][name]
        err, base = max_rel(ours, ref), max_rel(eager, ref)
        assert err <= 4 * base + 2e-5, f"{name}: {backend} error {err:.2e}, eager fp32 error {base:.2e}"


def test_triton_backend_fuses_skips_and_residual_sums(monkeypatch, exact_fp32):
    """Each decoder stage's skip goes through kernels.upsample2x_concat with its transposed convolution's
    bias, each ResBlock's and attention block's residual sum through kernels.add_bias_residual with the
    convolutions' biases (channels_last here, the trainer's layout on CUDA), the ResBlocks' time projections
    are one matmul (no block runs its own time MLP), and the model's output and gradients stay those of the
    eager model."""
    import kernels
    from dream.model import to_channels_last

    calls, sums = [], []
    fused, fused_sum = kernels.upsample2x_concat, kernels.add_bias_residual

    def concat(h, skip, h_bias=None):
        calls.append(tuple(skip.shape) + (h_bias is not None,))
        return fused(h, skip, h_bias)

    monkeypatch.setattr(kernels, "upsample2x_concat", concat)
    monkeypatch.setattr(kernels, "add_bias_residual",
                        lambda a, b, bias: sums.append(a.shape[1]) or fused_sum(a, b, bias))
    model = to_channels_last(random_model().to(DEVICE))
    time_mlps = []
    for block in model.resblocks():
        block.time_mlp.register_forward_hook(lambda module, args, out: time_mlps.append(module))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE, memory_format=torch.channels_last)
    t = torch.tensor([5, 900, 450, 20][:BATCH], device=DEVICE)
    grad_out = torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(DEVICE)
    eager = run(model.set_backend("eager"), x, t, grad_out)
    assert not calls and not sums
    assert len(time_mlps) == 14
    time_mlps.clear()
    fast = run(model.set_backend("triton"), x, t, grad_out)
    assert not time_mlps
    widths = [model.config.base_channels * m for m in model.config.channel_mults]
    assert calls == [(BATCH, widths[level], SIZE >> (level + 1), SIZE >> (level + 1), True)
                     for level in reversed(range(len(widths)))]
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, Attention))]
    assert len(sums) == len(blocks) == 17
    assert max_rel(fast[0], eager[0]) <= 1e-5
    for name, grad in eager[1].items():
        assert max_rel(fast[1][name], grad) <= 1e-4, name


def test_triton_backend_resizes_skips_that_are_not_half_size_like_eager(exact_fp32):
    """An input size the levels do not divide (20 for 3 levels: skips of 10, 5, 3 against decoder sizes of
    6, 12, 24): the 2x stage takes the fused kernel, the others resize_skip and torch.cat with the
    transposed convolution's bias added, as eager does."""
    model = random_model().to(DEVICE)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 20, 20, generator=g).to(DEVICE)
    t = torch.tensor([321], device=DEVICE)
    grad_out = torch.randn(1, 3, 24, 24, generator=g).to(DEVICE)
    eager = run(model.set_backend("eager"), x, t, grad_out)
    fast = run(model.set_backend("triton"), x, t, grad_out)
    assert max_rel(fast[0], eager[0]) <= 1e-5
    for name, grad in eager[1].items():  # the transposed convolutions' bias gradients among them
        assert max_rel(fast[1][name], grad) <= 1e-4, name


def test_state_dict_is_shared_between_backends():
    eager = random_model()
    triton = build_unet("tiny", image_size=SIZE, backend="triton", dropout=0.0)
    triton.load_state_dict(eager.state_dict())
    assert list(triton.state_dict()) == list(eager.state_dict())


def test_resblock_compiles_fullgraph_with_the_fused_op(exact_fp32):
    torch.manual_seed(0)
    block = ResBlock(24, 48, time_dim=32, num_groups=8, dropout=0.0, eps=1e-5).to(DEVICE)  # 3 and 6 channels a group
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    block.backend = "triton"
    x = torch.randn(3, 24, 7, 5, device=DEVICE, requires_grad=True)
    temb = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    y = compiled(x, temb)
    grads = torch.autograd.grad(y.square().sum(), [x, temb, *block.parameters()])
    block.backend = "eager"
    y_ref = block(x, temb)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, temb, *block.parameters()])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_whole_unet_compiles_fullgraph_on_the_triton_backend(exact_fp32):
    """torch.compile(fullgraph=True) of the whole triton UNet (the kernels' ops, the batched time projections,
    the fused skips and residual sums): one graph, no break, and the compiled forward and every parameter
    gradient match the uncompiled triton model's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = random_model(size=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                         num_groups=2).to(DEVICE).set_backend("triton")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE)
    t = torch.tensor([3, 700], device=DEVICE)
    grad_out = torch.randn(2, 3, 8, 8, generator=g).to(DEVICE)
    counter = CompileCounterWithBackend("inductor" if ON_GPU else "aot_eager")
    model.zero_grad(set_to_none=True)
    y = torch.compile(model, fullgraph=True, backend=counter)(x, t)
    y.backward(grad_out)
    compiled = y.detach().double(), {name: p.grad.double() for name, p in model.named_parameters()}
    plain = run(model, x, t, grad_out)
    assert counter.frame_count == 1
    assert max_rel(compiled[0], plain[0]) <= 1e-5
    for name, grad in plain[1].items():
        assert max_rel(compiled[1][name], grad) <= 1e-4, name


class FixedMaskDropout(torch.nn.Module):
    """Dropout with a given keep mask: the eager stand-in for the kernel's fused dropout."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def test_resblock_fused_dropout_matches_float64_eager_with_the_same_mask(exact_fp32):
    """Training mode: the triton ResBlock fuses dropout into its second norm, the seed drawn from
    torch's generator inside forward; the float64 eager block with that mask as its dropout gives
    the same output and gradients. Eval mode: no dropout on either side."""
    from kernels import dropout_keep_mask, new_dropout_seed

    p = 0.3
    torch.manual_seed(0)
    block = ResBlock(24, 48, time_dim=32, num_groups=8, dropout=p, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        for param in block.parameters():
            param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(3, 24, 7, 5, device=DEVICE, requires_grad=True)
    temb = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(3, 48, 7, 5, device=DEVICE)
    block.backend = "triton"
    torch.manual_seed(4)
    y = block(x, temb)
    grads = torch.autograd.grad(y, [x, temb, *block.parameters()], grad_out)

    torch.manual_seed(4)
    keep = dropout_keep_mask(new_dropout_seed(DEVICE), y.shape, p).to(DEVICE)
    assert 0 < keep.sum() < keep.numel()
    reference = ResBlock(24, 48, time_dim=32, num_groups=8, dropout=p, eps=1e-5).to(DEVICE).double()
    reference.load_state_dict(block.state_dict())
    reference.dropout = FixedMaskDropout(keep, p)
    leaves64 = [x.detach().double().requires_grad_(), temb.detach().double().requires_grad_()]
    y64 = reference(*leaves64)
    grads64 = torch.autograd.grad(y64, [*leaves64, *reference.parameters()], grad_out.double())
    assert max_rel(y.double(), y64) <= 1e-5
    for (name, _), grad, grad64 in zip([("x", 0), ("temb", 0), *block.named_parameters()], grads, grads64):
        assert max_rel(grad.double(), grad64) <= 1e-5, name

    block.eval()
    eager = ResBlock(24, 48, time_dim=32, num_groups=8, dropout=p, eps=1e-5).to(DEVICE).eval()
    eager.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x, temb), eager(x, temb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["none", "norms"])
def test_whole_unet_traces_without_graph_breaks(policy):
    import torch._dynamo

    model = random_model(dropout=0.1).set_backend("triton").to(DEVICE).train()  # fused dropout: seeds drawn inside
    model.set_checkpointing(policy)
    x = torch.randn(1, 3, SIZE, SIZE, device=DEVICE)
    t = torch.tensor([7], device=DEVICE)
    explanation = torch._dynamo.explain(model)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert isinstance(model.down[2].blocks[2], Attention)


def test_triton_backend_refuses_unsupported_head_dims_at_build():
    with pytest.raises(ValueError, match=r"attention head dim 8 \(64 channels / 8 heads\) is not one the attention "
                                         r"kernel supports \(16, 32, 64, 128\)"):
        build_unet("tiny", base_channels=16, backend="triton")
    build_unet("tiny", base_channels=16, backend="sdpa")  # any head dim works there


def test_recomputed_norms_give_the_same_output_and_gradients(exact_fp32):
    """Checkpointing "norms": every norm feeding a convolution (both of each ResBlock's, the attention
    blocks', the head's) saves x instead of its output and recomputes the output in backward. Same
    values and gradients as "none", bitwise (the fused dropout's masks included: the seeds are drawn
    alike); eval mode and no_grad take the plain path."""
    size = SIZE if ON_GPU else 8  # a small UNet on CPU (interpreted kernels): every site kind, once
    model = random_model(size, dropout=0.1, channel_mults=(1, 2), attention_levels=(1,), num_res_blocks=1, num_heads=2,
                         num_groups=2)
    model = model.set_backend("triton").to(DEVICE).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, size, size, generator=g).to(DEVICE)
    t = torch.tensor([3, 998, 500, 10][:BATCH], device=DEVICE)
    grad_out = torch.randn(BATCH, 3, size, size, generator=g).to(DEVICE)
    results = {}
    for policy in ("none", "norms"):
        model.set_checkpointing(policy)
        torch.manual_seed(5)
        results[policy] = run(model, x, t, grad_out)
    assert torch.equal(results["none"][0], results["norms"][0])
    for name, grad in results["none"][1].items():
        assert torch.equal(grad, results["norms"][1][name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model.set_checkpointing("none")(x, t))


def test_recomputed_norms_cover_every_norm_site_and_only_in_training_with_gradients(monkeypatch):
    """Checkpointing "norms" runs every norm that feeds a convolution through kernels.group_norm_silu_conv2d
    (two a ResBlock, one an attention block, one the head: 6 * 2 + 3 + 1 = 16 in this small UNet) while
    training with gradients enabled; evaluation, no_grad and the other policies take the plain fused norm."""
    import kernels

    calls = []
    fused = kernels.group_norm_silu_conv2d
    monkeypatch.setattr(kernels, "group_norm_silu_conv2d", lambda *args, **kwargs: calls.append(args[0].shape[1])
                        or fused(*args, **kwargs))
    model = random_model(4, channel_mults=(1, 2), attention_levels=(1,), num_res_blocks=1, num_heads=2, num_groups=2)
    model = model.set_backend("triton").set_checkpointing("norms").to(DEVICE).train()
    x, t = torch.randn(1, 3, 4, 4, device=DEVICE), torch.tensor([7], device=DEVICE)
    model(x, t)
    assert len(calls) == 16
    assert calls[-1] == model.config.base_channels  # the head's norm, the last site
    calls.clear()
    with torch.no_grad():
        model(x, t)
    model.eval()
    model(x, t)
    model.train().set_checkpointing("all")  # whole blocks recomputed: their norms take the plain path
    model(x, t)
    assert calls == []


def test_recomputed_norms_need_the_triton_backend():
    model = build_unet("tiny", base_channels=32, backend="triton", checkpointing="norms")
    with pytest.raises(ValueError, match="checkpointing 'norms' recomputes the fused Triton norm: it needs backend "
                                         "'triton', not 'sdpa'"):
        model.set_backend("sdpa")
    with pytest.raises(ValueError, match="needs backend 'triton', not 'eager'"):
        build_unet("tiny", base_channels=32, checkpointing="norms")


def image_tensors_not_channels_last(model, x, t) -> dict:
    """{(op, shape): count} of the image-shaped tensors (4-D, several channels, several positions) that the
    operators of a forward and backward return in another layout than channels_last. Views (a slice of
    channels, a split of qkv) are left out: they copy nothing."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    found = collections.Counter()

    class LayoutSpy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[1] > 1 \
                            and tensor.shape[2] * tensor.shape[3] > 1 \
                            and not tensor.is_contiguous(memory_format=torch.channels_last):
                        found[(func.overloadpacket.__name__, tuple(tensor.shape))] += 1
            return out

    with LayoutSpy():
        out = model(x, t)
        out.backward(torch.ones_like(out))
    return dict(found)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_unet_in_channels_last_makes_every_activation_channels_last(dropout):
    """The trainer's layout on CUDA: in channels_last the triton backend's forward and backward write every
    activation and gradient in channels_last, so cuDNN's convolutions get no layout conversion to make (on
    the H200 such conversions were 15 % of an NCHW training step). The check sees a model left in NCHW."""
    from dream.model import to_channels_last

    model = to_channels_last(random_model(dropout=dropout).to(DEVICE)).set_backend("triton")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, SIZE, SIZE, generator=g).to(DEVICE, memory_format=torch.channels_last)
    t = torch.tensor([700], device=DEVICE)
    assert image_tensors_not_channels_last(model, x, t) == {}
    if dropout == 0.0:
        nchw = random_model().to(DEVICE)  # (eager: the check's own test need not run the kernels)
        assert ("convolution", (1, 3, SIZE, SIZE)) in image_tensors_not_channels_last(nchw, x.contiguous(), t)
