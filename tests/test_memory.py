"""dream.memory: the step-memory estimator (fake CPU tensors + MemTracker), the micro-batch chooser,
parse_bytes, the CUDA-rules policy and `dream memory`.

Fake tensors allocate nothing, so an estimate costs the same at any size (a few seconds: one pass of
fake operators); estimates are memoised across tests. Most tests use a small UNet (two levels, one
ResBlock each) at 16x16 so that activations dominate the peak and every policy shows.

Tolerances
    quantity                                   check
    parameters / gradients / EMA bytes         exact: 4 bytes x parameter count (fp32)
    AdamW state bytes                          exact: 8 bytes x parameter count + 4 per parameter tensor (step)
    peak vs breakdown                          exact: peak_bytes == sum of the categories
    CudaAutocastPolicy values (fp32 results)   abs 1e-5 against float64 references of the same inputs
    estimate vs torch.cuda.max_memory_allocated (GPU only)   within 15 % (the estimate misses cuDNN/cuBLAS
                                               workspaces and allocator rounding)
"""
import contextlib
import io
import json
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU
from dream.cli import main
from dream.errors import DreamError
from dream.memory import (CATEGORIES, CudaAutocastPolicy, StepSpec, choose_micro_batch, cuda_memory_cap,
                          divisors_descending, estimate_step_memory, format_estimate, format_size, format_sweep,
                          measure_cuda_peak, parse_bytes,
                          sweep_checkpointing)
from dream.model import build_unet, count_parameters
from dream.objectives import ObjectiveConfig

SMALL_MODEL = {"image_size": 16, "channel_mults": (1, 2), "attention_levels": (1,), "num_res_blocks": 1}
SMALL = StepSpec(preset="tiny", model_overrides=SMALL_MODEL, batch_size=8)
GPU_RELATIVE_TOLERANCE = 0.15

_ESTIMATES: dict = {}


def estimate(spec: StepSpec):
    """estimate_step_memory, memoised (it is deterministic: shapes only)."""
    key = spec.normalized()
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate_step_memory(key)
    return _ESTIMATES[key]


def parameter_facts(spec: StepSpec):
    """(parameter count, parameter tensors) of the spec's model, counted on the meta device."""
    with torch.device("meta"):
        model = build_unet(spec.preset, **dict(spec.model_overrides))
    return count_parameters(model), sum(1 for _ in model.parameters())


# ----------------------------------------------------------------------------------------------
# Exact parts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parameter_gradient_optimizer_and_ema_bytes_are_exact(precision):
    spec = replace(SMALL, precision=precision)
    result = estimate(spec)
    count, tensors = parameter_facts(spec)
    start, before, end = (result.snapshots[k] for k in ("start", "before_optimizer", "end"))
    # the state alive across steps, before anything of this step exists
    assert start["parameters"] == 4 * count
    assert start["gradients"] == 0
    assert start["optimizer"] == 8 * count + 4 * tensors  # exp_avg, exp_avg_sq (fp32) and a step scalar each
    assert start["other"] == 4 * count + 8 == result.extras["ema_bytes"]  # fp32 EMA weights, fp64 update count
    assert start["activations"] == start["temporaries"] == 0
    # every gradient is allocated (fp32, like the parameters) when the optimizer steps
    assert before["gradients"] == 4 * count
    assert before["parameters"] == start["parameters"] and before["optimizer"] == start["optimizer"]
    # nothing of the step outlives it but the gradients (set to None at the start of the next step)
    assert end["activations"] == end["temporaries"] == 0
    assert end["total"] == start["total"] + 4 * count
    # the peak is the sum of its parts and above every snapshot
    assert result.peak_bytes == sum(result.breakdown[c] for c in CATEGORIES)
    assert result.peak_bytes >= max(start["total"], before["total"], end["total"])
    assert result.breakdown["activations"] > 0


def test_resident_dataset_is_counted_as_other():
    result = estimate(replace(SMALL, data_images=100))
    count, _ = parameter_facts(SMALL)
    size = SMALL_MODEL["image_size"]
    assert result.extras["data_bytes"] == 100 * 3 * size * size  # uint8
    assert result.snapshots["start"]["other"] == 4 * count + 8 + 100 * 3 * size * size
    assert result.peak_bytes == estimate(SMALL).peak_bytes + 100 * 3 * size * size


def test_a_step_graph_adds_its_input_buffers_to_the_peak():
    """--cuda-graphs: x0, noise (fp32) and t (int64) copied into the graph's static buffers, beside the batch."""
    size, batch = SMALL_MODEL["image_size"], SMALL.batch_size
    result = estimate(replace(SMALL, cuda_graphs=True))
    assert result.peak_bytes == estimate(SMALL).peak_bytes + 2 * batch * 3 * size * size * 4 + batch * 8
    assert "CUDA graph" in format_estimate(result)


def test_the_precision_changes_the_activations_not_the_state():
    """The step runs under the spec's autocast: bf16 saves 2-byte copies for the convolutions and matmuls beside the
    fp32 norms and softmax of the CUDA rules (for this small UNet more bytes than fp32, whose saved tensors are the
    ones it computes: 13.3 vs 11.9 MB); the state alive across steps is fp32 either way."""
    fp32, bf16 = estimate(replace(SMALL, precision="fp32")), estimate(replace(SMALL, precision="bf16"))
    assert bf16.breakdown["activations"] != fp32.breakdown["activations"]
    assert bf16.snapshots["start"] == fp32.snapshots["start"]

# ----------------------------------------------------------------------------------------------
# Mechanics
# ----------------------------------------------------------------------------------------------
def test_peak_grows_with_batch_size():
    peaks = [estimate(replace(SMALL, batch_size=b)) for b in (2, 4, 8)]
    assert peaks[0].peak_bytes < peaks[1].peak_bytes < peaks[2].peak_bytes
    activations = [p.breakdown["activations"] for p in peaks]
    assert activations[0] < activations[1] < activations[2]


def test_each_checkpointing_policy_shrinks_the_peak():
    peak = {policy: estimate(replace(SMALL, checkpointing=policy)).peak_bytes
            for policy in ("none", "attention", "resblocks", "all")}
    assert peak["all"] < peak["resblocks"] < peak["none"]
    assert peak["all"] < peak["attention"] < peak["none"]
    table = format_sweep([estimate(replace(SMALL, checkpointing=p)) for p in peak])
    assert all(policy in table for policy in peak) and "not a GPU measurement" in table


def test_recomputing_the_norms_frees_their_outputs():
    """"norms" (triton backend): every norm feeding a convolution saves its input, not its output. Two
    norms a ResBlock, one an attention block, one the head: the seed UNet's activations at batch 128 drop
    to 0.47 of "none"'s, this small one's (more of it outside ResBlocks) to 0.72."""
    triton = replace(SMALL, backend="triton", model_overrides={**SMALL_MODEL, "num_heads": 2})
    none, norms = estimate(triton), estimate(replace(triton, checkpointing="norms"))
    assert norms.breakdown["activations"] < 0.75 * none.breakdown["activations"]
    assert norms.peak_bytes < none.peak_bytes
    assert [e.spec.checkpointing for e in sweep_checkpointing(replace(SMALL, backend="eager"), policies=None)] \
        == ["none", "attention", "resblocks", "all"]  # the eager model has no fused norm to recompute
    with pytest.raises(ValueError, match="checkpointing 'norms' recomputes the fused Triton norm: it needs backend "
                                         "'triton', not 'eager'"):
        replace(SMALL, backend="eager", checkpointing="norms")


def test_early_backward_peaks_lower_than_one_graph():
    early = estimate(SMALL)
    single = estimate(replace(SMALL, early_backward=False))
    assert early.peak_bytes < single.peak_bytes
    # the single graph holds both forwards' activations at once
    assert single.breakdown["activations"] > 1.5 * early.breakdown["activations"]
    # and is backpropagated at the end: every gradient exists when the optimizer steps, as in the early form
    count, _ = parameter_facts(SMALL)
    for result in (early, single):
        assert result.snapshots["before_optimizer"]["gradients"] == 4 * count


def test_accumulation_lowers_the_peak():
    full = estimate(replace(SMALL, batch_size=4))
    halves = estimate(replace(SMALL, batch_size=4, micro_batch=2))
    assert halves.peak_bytes < full.peak_bytes


def test_accumulation_counts_a_later_micro_batch_with_every_gradient_allocated():
    """The standard objective's first micro-batch runs its forward before any gradient exists; the second
    runs it with all of them (fp32, 4 bytes a parameter) allocated, so the step's peak is the second's."""
    standard = replace(SMALL, objective="standard")
    count, _ = parameter_facts(standard)
    one = estimate(replace(standard, batch_size=2))
    halves = estimate(replace(standard, batch_size=4, micro_batch=2))
    assert one.breakdown["gradients"] < 4 * count  # one micro-batch: its peak comes before every gradient exists
    assert halves.breakdown["gradients"] == 4 * count
    assert halves.peak_bytes > one.peak_bytes + 0.5 * (4 * count - one.breakdown["gradients"])


def test_the_model_layout_follows_the_trainer():
    """channels_last for a CUDA target unless told (as dream train on CUDA), NCHW for a CPU target; the
    state's parameters and the batch take it, and a layout change does not change the activations' bytes."""
    from dream.memory import build_state, make_batch

    assert StepSpec().uses_channels_last and not StepSpec(target="cpu").uses_channels_last
    assert not StepSpec(channels_last=False).uses_channels_last
    assert StepSpec(target="cpu", channels_last=True).uses_channels_last
    spec = replace(SMALL, channels_last=True)
    model = build_state(spec, torch.device("cpu"))[0]
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert make_batch(spec, None, torch.device("cpu")).is_contiguous(memory_format=torch.channels_last)
    nchw = replace(SMALL, channels_last=False)
    assert "channels_last" in format_estimate(estimate(spec)) and "NCHW" in format_estimate(estimate(nchw))
    assert abs(estimate(spec).peak_bytes - estimate(nchw).peak_bytes) <= 0.01 * estimate(nchw).peak_bytes


def test_cuda_rules_cost_more_than_cpu_rules_under_bf16():
    """CUDA autocast keeps GroupNorm and softmax in fp32, and CUDA dropout a 1-byte mask: at bf16 the
    CUDA-rules step holds more activation bytes than the plain CPU-rules step."""
    cuda = estimate(SMALL)
    cpu = estimate(replace(SMALL, target="cpu"))
    assert cuda.breakdown["activations"] > cpu.breakdown["activations"]


def test_fused_dropout_stores_no_mask():
    """The triton backend fuses the ResBlock's dropout into its GroupNorm kernel and regenerates the
    mask in backward: its activations do not grow with dropout on, the eager backend's do (the
    1-byte CUDA mask)."""
    def activations(backend, dropout):
        overrides = {**SMALL_MODEL, "num_heads": 4, "dropout": dropout}  # head dim 16 for the kernel
        return estimate(replace(SMALL, backend=backend, model_overrides=overrides)).breakdown["activations"]

    from dream.model import ResBlock

    with torch.device("meta"):
        res_blocks = sum(isinstance(m, ResBlock) for m in build_unet("tiny", **SMALL_MODEL).modules())
    # all that dropout adds is each ResBlock's 8-byte seed
    assert activations("triton", 0.1) - activations("triton", 0.0) == 8 * res_blocks
    assert activations("eager", 0.1) - activations("eager", 0.0) > 1000 * res_blocks


# ----------------------------------------------------------------------------------------------
# CudaAutocastPolicy on real CPU tensors
# ----------------------------------------------------------------------------------------------
def test_cuda_autocast_policy_values_and_scope():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 7, 5, generator=g).bfloat16()
    weight, bias = torch.randn(6, generator=g) * 0.7 + 1.1, torch.randn(6, generator=g) * 0.3
    scores = torch.randn(3, 5, 9, generator=g).bfloat16() * 3
    x64 = x.double()
    mean = x64.reshape(3, 3, -1).mean(-1, keepdim=True)
    var = x64.reshape(3, 3, -1).var(-1, unbiased=False, keepdim=True)
    gn_ref = ((x64.reshape(3, 3, -1) - mean) / torch.sqrt(var + 1e-5)).reshape_as(x64)
    gn_ref = gn_ref * weight.double()[:, None, None] + bias.double()[:, None, None]
    softmax_ref = torch.softmax(scores.double(), dim=-1)

    with CudaAutocastPolicy(), torch.autocast("cpu", dtype=torch.bfloat16):
        gn = F.group_norm(x, 3, weight, bias)
        probabilities = scores.softmax(dim=-1)
        kept = torch.randn(4, 8, generator=g, requires_grad=True)
        dropped = F.dropout(kept, 0.25, training=True)
    assert gn.dtype == torch.float32 and probabilities.dtype == torch.float32
    assert torch.allclose(gn.double(), gn_ref, atol=1e-5, rtol=0)
    assert torch.allclose(probabilities.double(), softmax_ref, atol=1e-5, rtol=0)
    assert type(dropped.grad_fn).__name__ == "NativeDropoutBackward0"
    survivors = dropped != 0
    assert torch.allclose(dropped[survivors], kept.detach()[survivors] / 0.75)

    # outside the policy CPU's own rules apply again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 3, weight, bias).dtype == torch.bfloat16
        assert scores.softmax(dim=-1).dtype == torch.bfloat16
    assert type(F.dropout(kept, 0.25, training=True).grad_fn).__name__ != "NativeDropoutBackward0"


# The dtypes the estimator sees, against CUDA autocast's (fake CUDA tensors: no GPU needed, a CUDA build is)
COMPUTE_OPS = ("aten.convolution.", "aten.native_group_norm.", "dream_kernels.", "aten.bmm.", "aten.mm.",
               "aten.addmm.", "aten._softmax.", "aten.upsample_bilinear2d.", "aten.cat.", "aten.silu.",
               "aten.native_dropout.", "aten.mul.", "aten.add.")


def unet_forward_dtypes(device_type: str, backend: str, training: bool) -> list:
    """(op, output dtypes) of each compute op of a tiny UNet's forward under bf16 autocast on fake tensors:
    CPU autocast under CudaAutocastPolicy (what the estimator runs), or CUDA autocast itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import kernels  # noqa: F401  (the triton backend's custom ops and their fake implementations)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func).startswith(COMPUTE_OPS):
                self.ops.append((str(func), tuple(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))))
            return out

    @contextlib.contextmanager
    def cuda_autocast():  # torch.autocast("cuda") turns itself off on a machine without a GPU
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            torch.autocast_decrement_nesting()
            torch.set_autocast_enabled("cuda", False)

    record = Record()
    on_cpu = device_type == "cpu"
    with FakeTensorMode(), CudaAutocastPolicy() if on_cpu else contextlib.nullcontext():
        with torch.device(device_type):
            model = build_unet("tiny", backend=backend, image_size=16).train(training)
            x, t = torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,))
        with torch.autocast("cpu", dtype=torch.bfloat16) if on_cpu else cuda_autocast(), record:
            model(x, t)
    return record.ops


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="fake CUDA tensors need a CUDA build of torch")
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_estimator_sees_the_dtypes_of_cuda_autocast(backend, training):
    cpu_rules, cuda_rules = (unet_forward_dtypes(d, backend, training) for d in ("cpu", "cuda"))
    assert len(cpu_rules) > 50 and any(torch.float32 in dtypes for _, dtypes in cuda_rules)
    assert cpu_rules == cuda_rules
    if backend == "triton":  # the UNet casts CUDA's fp32 bilinear resize back: every fused norm runs in bf16
        norms = [dtypes for op, dtypes in cuda_rules if op.startswith("dream_kernels.group_norm_silu_fwd")]
        assert norms and all(dtypes[0] == torch.bfloat16 for dtypes in norms)


# ----------------------------------------------------------------------------------------------
# choose_micro_batch
# ----------------------------------------------------------------------------------------------
class LinearPeak:
    """A stand-in estimator: peak = fixed + per_image * micro-batch; records what it was asked."""

    def __init__(self, fixed, per_image):
        self.fixed, self.per_image, self.asked = fixed, per_image, []

    def __call__(self, spec):
        self.asked.append(spec.micro_batch)
        return type("Estimate", (), {"peak_bytes": self.fixed + self.per_image * spec.micro_batch})()


@pytest.mark.parametrize("batch", [1, 7, 12, 128])
def test_choose_micro_batch_is_the_largest_fitting_divisor(batch):
    fixed, per_image = 1000, 37
    for budget in range(fixed, fixed + per_image * batch + 2 * per_image, 11):
        fitting = [d for d in divisors_descending(batch) if fixed + per_image * d <= budget]
        estimator = LinearPeak(fixed, per_image)
        if not fitting:
            with pytest.raises(DreamError, match="even a micro-batch of 1"):
                choose_micro_batch(StepSpec(batch_size=batch), budget, margin=0.0, estimate=estimator)
            continue
        assert choose_micro_batch(StepSpec(batch_size=batch), budget, margin=0.0, estimate=estimator) == fitting[0]
        assert all(batch % m == 0 for m in estimator.asked)
        assert len(set(estimator.asked)) <= 2 + len(divisors_descending(batch)).bit_length()


def test_choose_micro_batch_inputs():
    estimator = LinearPeak(0, 10**6)
    assert choose_micro_batch(StepSpec(batch_size=128), "64MB", margin=0.0, estimate=estimator) == 64
    assert choose_micro_batch(StepSpec(batch_size=128), "64MB", margin=0.5, estimate=estimator) == 32
    # by default a CUDA target keeps CUDA_ESTIMATE_MARGIN of the budget for what the estimate does not see
    assert choose_micro_batch(StepSpec(batch_size=128), "64MB", estimate=estimator) == 32
    assert choose_micro_batch(StepSpec(batch_size=128, target="cpu"), "64MB", estimate=estimator) == 64
    # the trainer's keyword form: a UNetConfig, an ObjectiveConfig, resolved precision and backend, compile
    from dream.model import make_config

    spec_seen = []
    chosen = choose_micro_batch(model_config=make_config("tiny", image_size=32), batch_size=16, budget_bytes=8 * 10**6,
                                margin=0.0,
                                precision="bf16", objective="seed", objective_config=ObjectiveConfig(alpha=0.6),
                                backend="eager", checkpointing="all", compile=False,
                                estimate=lambda s: spec_seen.append(s) or estimator(s))
    assert chosen == 8
    assert dict(spec_seen[0].model_overrides)["image_size"] == 32
    assert dict(spec_seen[0].objective_config)["alpha"] == 0.6
    assert spec_seen[0].checkpointing == "all"
    with pytest.raises(ValueError, match="margin"):
        choose_micro_batch(StepSpec(), "1GB", margin=1.0, estimate=estimator)
    with pytest.raises(ValueError, match="memory size"):
        choose_micro_batch(StepSpec(), "lots", estimate=estimator)
    if not torch.cuda.is_available():
        with pytest.raises(DreamError, match="no memory budget given"):
            choose_micro_batch(StepSpec(), None, estimate=estimator)


def test_a_cuda_target_keeps_the_measured_six_percent():
    """CUDA_ESTIMATE_MARGIN is what an H200 measured above the estimate (3-6 %): a CUDA step estimated at 93.8 %
    of the budget fits, one at 95.2 % does not (the micro-batch halves); a CPU target keeps nothing back."""
    assert choose_micro_batch(StepSpec(batch_size=2), 10**9, estimate=LinearPeak(0, 469_000_000)) == 2
    assert choose_micro_batch(StepSpec(batch_size=2), 10**9, estimate=LinearPeak(0, 476_000_000)) == 1
    assert choose_micro_batch(StepSpec(batch_size=2, target="cpu"), 10**9, estimate=LinearPeak(0, 476_000_000)) == 2


@pytest.mark.parametrize("device, cuda_available, bf16, expected", [
    ("auto", True, True, ("bf16", "triton")), ("cuda:0", True, False, ("fp32", "triton")),
    ("auto", False, False, ("fp32", "eager")), ("cpu", True, True, ("fp32", "eager"))])
def test_spec_from_a_train_config_resolves_auto_as_the_trainer(monkeypatch, device, cuda_available, bf16, expected):
    """choose_micro_batch(TrainConfig(...)): "auto" precision and backend as the trainer resolves them on the
    device the step runs on (bf16 where CUDA supports it, and triton, on CUDA; fp32 and eager elsewhere)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    config = types.SimpleNamespace(device=device, precision="auto", backend="auto", batch_size=8,
                                   epochs=100)  # epochs: not a StepSpec field
    spec = StepSpec.from_config(config)
    assert (spec.precision, spec.backend) == expected
    seen = []
    estimator = LinearPeak(0, 10)
    choose_micro_batch(config, 10**6, margin=0.0, estimate=lambda s: seen.append(s) or estimator(s))
    assert (seen[0].precision, seen[0].backend, seen[0].micro_batch) == (*expected, 8)


def test_choose_micro_batch_ignores_the_micro_batch_of_its_config():
    """A config's micro_batch (a TrainConfig's --micro-batch, a StepSpec's) is not the chooser's business,
    even one that does not divide the batch size given beside it."""
    estimator = LinearPeak(0, 10)
    config = types.SimpleNamespace(device="cpu", precision="fp32", backend="eager", batch_size=8, micro_batch=3)
    assert choose_micro_batch(config, 10**6, estimate=estimator) == 8
    spec = StepSpec(batch_size=8, micro_batch=4, target="cpu")
    assert choose_micro_batch(spec, 10**6, batch_size=6, estimate=estimator) == 6
    assert choose_micro_batch(spec, 45, estimate=estimator) == 4


def test_choose_micro_batch_with_the_estimator():
    spec = replace(SMALL, batch_size=4)
    full, half = estimate(spec), estimate(replace(spec, micro_batch=2))
    budget = (full.peak_bytes + half.peak_bytes) // 2  # between: 2 fits, 4 does not
    assert choose_micro_batch(spec, budget, margin=0.0, estimate=estimate) == 2
    assert choose_micro_batch(spec, full.peak_bytes, margin=0.0, estimate=estimate) == 4


def test_default_budget_is_free_memory_plus_what_the_allocator_holds(monkeypatch):
    """Without a budget: cudaMemGetInfo's free bytes plus what this process's caching allocator already
    reserves (the estimate counts the model, optimizer and EMA that may already sit there), on the device asked."""
    from dream.memory import default_budget_bytes

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (5 * 10**9, 8 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: asked.append(device) or 10**9)
    assert default_budget_bytes("cuda:1") == 6 * 10**9
    assert asked == [torch.device("cuda:1")] * 2
    assert choose_micro_batch(StepSpec(batch_size=8, target="cpu"), None, estimate=LinearPeak(0, 10**9)) == 4

# ----------------------------------------------------------------------------------------------
# the budget held on the device: the caching allocator's per-process fraction
# ----------------------------------------------------------------------------------------------
class FakeAllocatorLimit:
    """torch.cuda's per-process fraction, device properties as given."""

    def __init__(self, monkeypatch, total_memory: int, fraction: float):
        self.total_memory, self.fraction, self.calls = total_memory, fraction, []
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: types.SimpleNamespace(total_memory=self.total_memory))
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: self.fraction)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self.set)

    def set(self, fraction, device):
        self.calls.append((fraction, torch.device(device)))
        self.fraction = fraction


def test_cuda_memory_cap_holds_the_allocator_to_the_budget_and_restores_it(monkeypatch):
    limit = FakeAllocatorLimit(monkeypatch, total_memory=143_771_369_472, fraction=0.9)
    with cuda_memory_cap(6_800_000_000, "cuda:1") as fraction:
        assert fraction == pytest.approx(6_800_000_000 / 143_771_369_472)
        assert limit.calls == [(fraction, torch.device("cuda:1"))]
    assert limit.fraction == 0.9 and len(limit.calls) == 2, "the previous fraction comes back"

    with pytest.raises(RuntimeError, match="inside"), cuda_memory_cap(1 << 30, "cuda:0"):
        raise RuntimeError("inside")
    assert limit.fraction == 0.9, "restored after an exception too"

    with cuda_memory_cap(10**15, "cuda:0") as fraction:  # more than the device has
        assert fraction == 1.0

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    with cuda_memory_cap(1 << 30, "cuda"):  # no index: the current device (torch's fraction functions need one)
        assert limit.calls[-1][1] == torch.device("cuda:3")


@pytest.mark.parametrize("budget, device", [(None, "cuda:0"), (6_800_000_000, "cpu")])
def test_cuda_memory_cap_without_a_budget_or_a_cuda_device_changes_nothing(monkeypatch, budget, device):
    limit = FakeAllocatorLimit(monkeypatch, total_memory=10**11, fraction=0.7)
    with cuda_memory_cap(budget, device) as fraction:
        assert fraction is None
    assert limit.calls == []


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: the caching allocator's limit")
def test_cuda_memory_cap_makes_an_allocation_past_the_budget_run_out_of_memory():
    device = torch.device("cuda")
    torch.cuda.empty_cache()
    budget = torch.cuda.memory_reserved(device) + 256 * 2**20
    with cuda_memory_cap(budget, device):
        small = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # fits
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
        del small
    large = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)  # the cap is gone
    assert large.numel() == 512 * 2**20


# ----------------------------------------------------------------------------------------------
# parse_bytes and bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("6.8GB", 6_800_000_000), ("6.8 gb", 6_800_000_000), ("7GiB", 7 * 2**30), ("512MB", 512 * 10**6),
    ("1.5kb", 1500), ("100", 100), (" 3 MiB ", 3 * 2**20), ("2TB", 2 * 10**12), ("1e3", 1000), (4096, 4096),
    ("2KiB", 2048), ("1TiB", 2**40), ("3k", 3000), ("5m", 5 * 10**6), ("6.8g", 6_800_000_000), ("1t", 10**12),
    ("8.2GB", 8_200_000_000),  # (8.2 * 10^9 is 8199999999.999999 in floating point: rounded, not cut)
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("size, text", [(10**8, "0.100 GB"), (99_999_999, "100.000 MB"), (1_234_567, "1.235 MB"),
                                        (6_800_000_000, "6.800 GB")])
def test_format_size_in_gb_from_a_tenth_of_one(size, text):
    assert format_size(size) == text


@pytest.mark.parametrize("text, error", [
    ("", ValueError), ("lots", ValueError), ("6.8XB", ValueError), ("-1GB", ValueError), ("0", ValueError),
    ("GB", ValueError), ("6.8 G B", ValueError), ("0.1B", ValueError), (None, TypeError), ([1], TypeError),
    (True, TypeError),
])
def test_parse_bytes_errors_are_one_line(text, error):
    with pytest.raises(error) as raised:
        parse_bytes(text)
    message = str(raised.value)
    assert "\n" not in message and ("memory size" in message)


@pytest.mark.parametrize("fields, match", [
    ({"batch_size": 0}, "batch size"), ({"batch_size": 8, "micro_batch": 3}, "must divide"),
    ({"precision": "fp8"}, "precision"), ({"backend": "cuda"}, "backend"), ({"checkpointing": "some"}, "checkpoint"),
    ({"objective": "dream"}, "objective"), ({"data_images": -1}, "data_images"), ({"target": "tpu"}, "target"),
    ({"batch_size": True}, "batch size"), ({"micro_batch": 2.0}, "micro batch"),
    ({"channels_last": "yes"}, "channels_last"),
])
def test_bad_spec_is_one_line(fields, match):
    with pytest.raises(ValueError, match=match) as raised:
        StepSpec(**fields)
    assert "\n" not in str(raised.value)


def test_the_tables_give_each_figure_in_bytes_gb_and_gib():
    """format_estimate: each category and the peak in bytes, GB (10^9) and GiB (2^30), the measured CUDA peak with
    the ratio estimate/measured, and the images kept on the device in the step's line; format_sweep: a row per
    policy whose state column is the peak less the activations and the temporaries."""
    from dream.memory import MemoryEstimate

    breakdown = {**dict.fromkeys(CATEGORIES, 0), "activations": 2**30, "temporaries": 10**9, "parameters": 2 * 10**9}
    result = MemoryEstimate(peak_bytes=sum(breakdown.values()), breakdown=breakdown, snapshots={},
                            spec=replace(SMALL, data_images=20), cuda_peak_bytes=2 * sum(breakdown.values()))
    text = format_estimate(result)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:]}
    assert rows["activations"] == ["1,073,741,824", "1.074", "1.000"]
    assert rows["temporaries"] == ["1,000,000,000", "1.000", "0.931"]
    assert rows["gradients"] == ["0", "0.000", "0.000"]
    assert rows["peak"] == ["4,073,741,824", "4.074", "3.794"]
    assert "estimate/measured = 0.500)" in text and ", 20 images on the device" in text.splitlines()[1]
    #                      checkpointing peak GB  peak GiB activ. GB temp. GB state GB cuda GB
    assert format_sweep([result]).splitlines()[-2].split() == ["none", "4.074", "3.794", "1.074", "1.000", "2.000",
                                                               "8.147"]


@pytest.mark.parametrize("start, ramp, expected", [(10, 20.0, 20), (30, 20.0, 30), (0, 2.5, 3), (3, 2.5, 3)])
def test_the_step_is_estimated_at_the_first_epoch_of_the_full_dream_weight(start, ramp, expected):
    """The seed objective's lambda_t ramps up as min(epoch / ramp_epochs, 1) from dream_start_epoch on: with no
    epoch given, the step is the one at the first whole epoch past both (the largest DREAM step)."""
    config = {"dream_start_epoch": start, "ramp_epochs": ramp}
    assert StepSpec(objective_config=config).dream_epoch() == expected
    assert StepSpec(objective_config=config, epoch=1).dream_epoch() == 1


# ----------------------------------------------------------------------------------------------
# dream memory
# ----------------------------------------------------------------------------------------------
def run_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["memory", *argv])
    return code, out.getvalue()


def test_cli_json_and_table():
    argv = ["--preset", "tiny", "--image-size", "16", "--batch", "2", "--precision", "fp16",
            "--objective", "paper", "--checkpoint", "attention", "--budget", "1GB"]
    code, text = run_cli(*argv, "--json")
    assert code == 0
    report = json.loads(text)
    assert {"peak_bytes", "breakdown", "snapshots", "inputs", "method", "budget_bytes", "fits_budget",
            "micro_batch_for_budget"} <= set(report)
    assert set(report["breakdown"]) == set(CATEGORIES)
    assert report["peak_bytes"] == sum(report["breakdown"].values())
    assert report["inputs"]["backend"] == "triton"  # auto for the CUDA target: what dream train runs there
    assert report["inputs"]["batch_size"] == 2 and report["inputs"]["precision"] == "fp16"
    assert report["inputs"]["objective"] == "paper" and report["inputs"]["checkpointing"] == "attention"
    assert report["inputs"]["model_overrides"] == {"image_size": 16}
    assert report["inputs"]["channels_last"] is True  # resolved as the text says: the CUDA target's layout
    assert report["budget_bytes"] == 10**9 and report["fits_budget"] and report["micro_batch_for_budget"] == 2
    spec = StepSpec(preset="tiny", model_overrides={"image_size": 16}, batch_size=2, precision="fp16",
                    objective="paper", checkpointing="attention", backend="triton")
    assert report["peak_bytes"] == estimate(spec).peak_bytes  # deterministic: the CLI runs the same estimate
    table = format_estimate(estimate(spec))
    assert "peak" in table and "not a GPU measurement" in table

    tight = str(int(report["peak_bytes"] / 0.97))  # above the peak, under it once the CUDA margin is kept
    report = json.loads(run_cli(*argv[:-1], tight + "B", "--json")[1])
    assert report["budget_limit_bytes"] < report["peak_bytes"] < report["budget_bytes"]
    assert not report["fits_budget"] and report["micro_batch_for_budget"] in (None, 1), "one rule for both answers"


def test_cli_memory_sizes_below_zero_and_small_are_explained(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["memory", "--preset", "tiny", "--budget", "-1GB"])  # not "expected one argument"
    assert stop.value.code == 2 and "memory size '-1GB' must be positive" in capsys.readouterr().err
    code, text = run_cli("--preset", "tiny", "--image-size", "16", "--batch", "2", "--budget", "1KB")
    assert code == 0 and "over the memory budget of 0.001 MB" in text


@pytest.mark.parametrize("text", ["6.8", "6.8e0", "68e-1", "5e5", " 12 ", "1e6", "1048575"])
def test_cli_memory_size_without_a_unit_below_a_mebibyte_is_refused_in_any_notation(text):
    import argparse

    from dream.cli import memory_size

    with pytest.raises(argparse.ArgumentTypeError, match=f"memory size '{text}' has no unit"):
        memory_size(text)
    assert memory_size("7e9") == 7 * 10**9 and memory_size("1KB") == 1000 and memory_size("2e6") == 2 * 10**6
    assert memory_size("1048576") == 2**20  # a mebibyte and more: bytes, as given


@pytest.mark.parametrize("argv, backend", [((), "triton"), (("--target", "cpu"), "eager"),
                                            (("--backend", "eager"), "eager"), (("--backend", "sdpa"), "sdpa")])
def test_cli_backend_auto_follows_the_trainer_on_the_target(argv, backend):
    code, text = run_cli("--preset", "tiny", "--image-size", "16", "--batch", "2", *argv, "--json")
    assert code == 0 and json.loads(text)["inputs"]["backend"] == backend


def test_cli_hands_every_step_flag_to_the_estimate(monkeypatch):
    """`dream memory`'s flags reach the StepSpec it estimates (none silently dropped), and its defaults are the
    seed's step: batch 128, bf16, the seed objective with early backward, no checkpointing, the CUDA target."""
    import dream.memory
    from dream.memory import MemoryEstimate

    seen = []

    def fake_estimate(spec):
        seen.append(spec)
        return MemoryEstimate(peak_bytes=1, breakdown=dict.fromkeys(CATEGORIES, 0), snapshots={}, spec=spec)

    monkeypatch.setattr(dream.memory, "estimate_step_memory", fake_estimate)
    assert run_cli("--json")[0] == 0
    assert seen[-1] == StepSpec(backend=seen[-1].backend, objective_config={"seed_separate_eps_forward": False})
    assert (seen[-1].batch_size, seen[-1].precision, seen[-1].checkpointing) == (128, "bf16", "none")
    code, text = run_cli("--preset", "tiny", "--image-size", "16", "--base-channels", "16", "--dropout", "0.2",
                         "--batch", "8", "--micro-batch", "4", "--precision", "fp32", "--objective", "seed",
                         "--seed-separate-eps-forward", "--single-graph", "--backend", "sdpa", "--checkpointing",
                         "attention", "--data-images", "10", "--data-on", "device", "--target", "cpu",
                         "--channels-last", "--cuda-graphs", "--json")
    assert code == 0
    assert seen[-1] == StepSpec(preset="tiny", model_overrides={"image_size": 16, "base_channels": 16, "dropout": 0.2},
                                batch_size=8, micro_batch=4, precision="fp32", objective="seed",
                                objective_config={"seed_separate_eps_forward": True}, early_backward=False,
                                backend="sdpa", checkpointing="attention", data_images=10, target="cpu",
                                channels_last=True, cuda_graphs=True)
    assert json.loads(text)["inputs"]["early_backward"] is False
    run_cli("--preset", "tiny", "--batch", "8", "--data-images", "10", "--data-on", "host", "--no-channels-last",
            "--json")
    assert seen[-1].data_images == 0 and seen[-1].channels_last is False  # host memory is not the device's


def test_cli_cuda_without_a_device_stops_before_estimating(monkeypatch, capsys):
    import dream.memory

    def estimate(*args, **kwargs):
        raise AssertionError("estimated before finding that --cuda cannot run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dream.memory, "estimate_step_memory", estimate)
    monkeypatch.setattr(dream.memory, "sweep_checkpointing", estimate)
    for extra in ((), ("--sweep",)):
        assert main(["memory", "--preset", "tiny", "--batch", "2", "--cuda", *extra]) == 2
        assert capsys.readouterr().err == ("dream memory: error: measuring the allocator's peak (--cuda) needs a "
                                           "CUDA device, and none is available\n")


def test_cli_bad_input_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:  # an argparse type error: exit 2 from parse_args, one line
        main(["memory", "--budget", "lots", "--batch", "8"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err
    assert err.startswith("dream memory: error: argument --budget: memory size 'lots' not understood")
    assert main(["memory", "--batch", "8", "--micro-batch", "3"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert main(["memory", "--batch", "8", "--sweep", "--checkpointing", "all"]) == 2  # not silently ignored
    assert capsys.readouterr().err == ("dream memory: error: --sweep estimates every checkpointing policy; leave "
                                       "out --checkpointing all (or leave out --sweep)\n")


def test_cli_checkpointing_auto_reports_what_the_trainer_would_pick():
    """--checkpointing auto --budget: dream train's choice (plan_step, tested with the trainer), on the same
    estimates. At this budget only `norms` fits the whole batch without the images (none: 82.7 MB, norms:
    76.5 MB, under 94 % of 84 MB = 79.0 MB) and nothing does with them (3.8 MB more), so they go to the host."""
    argv = ["--preset", "tiny", "--image-size", "8", "--batch", "4", "--checkpointing", "auto", "--budget", "84MB",
            "--data-images", "20000", "--json"]
    code, text = run_cli(*argv)
    report = json.loads(text)
    assert code == 0 and report["plan"] == {"micro_batch": 4, "checkpointing": "norms", "data_on": "host"}
    assert report["inputs"]["checkpointing"] == "norms" and report["inputs"]["data_images"] == 0  # the step taken
    assert report["fits_budget"] and report["micro_batch_for_budget"] == 4
    code, text = run_cli(*argv[:-1], "--data-on", "host")  # kept there by the flag: the same plan, said so
    assert code == 0 and text.rstrip().endswith("would take: micro-batch 4 of 4, checkpointing norms, the 20000 "
                                                 "images in host memory")


@pytest.mark.parametrize("argv, error", [
    (("--checkpointing", "auto"), "--checkpointing auto picks the policy whose step fits a memory budget: add "
                                  "--budget (e.g. 6.8GB), or use --sweep to see every policy"),
    (("--checkpointing", "auto", "--budget", "1GB", "--micro-batch", "2"),
     "--checkpointing auto picks the micro-batch too; leave out --micro-batch 2"),
    (("--data-images", "-5"), "--data-images must be 0 or more, got -5"),
])
def test_cli_checkpointing_auto_and_data_images_misuse_is_one_line(capsys, monkeypatch, argv, error):
    import dream.memory

    def estimate(*args, **kwargs):
        raise AssertionError("estimated before refusing the flags")

    monkeypatch.setattr(dream.memory, "estimate_step_memory", estimate)
    assert main(["memory", "--preset", "tiny", "--batch", "4", *argv]) == 2
    assert capsys.readouterr().err == f"dream memory: error: {error}\n"


@pytest.mark.parametrize("batch, backend, error", [
    ("100000000000000000000", "triton",
     "is too large to estimate: the step's tensor sizes overflow 64-bit integers"),
    ("1000000000000000", "triton", "is too large for the triton backend (group_norm_silu: x has N*C = "
     "32000000000000000 (sample, channel) pairs, more than the kernels' 32-bit offsets address (2^31 - 1))"),
    # (the eager decoder resizes its skips in parts within 32-bit offsets: a list of 10^8 parts filled the host)
    ("1000000000000000", "eager", "is too large for the eager backend (resize_skip: 1000000000000000 images of "
     "512 elements take more than 65536 parts within 32-bit offsets)"),
])
def test_a_batch_too_large_to_count_is_one_line(capsys, batch, backend, error):
    """Tensor sizes past 2^63 bytes (torch's own overflow errors, one in a fake tensor's shape computation,
    which also logs its traceback), or a batch past the kernels' 32-bit offsets, are one line."""
    assert main(["memory", "--preset", "tiny", "--image-size", "8", "--objective", "standard", "--batch", batch,
                 "--backend", backend]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"dream memory: error: batch size {batch} of 8×8 images {error}\n", captured.err


def linear_estimates(monkeypatch, per_image: dict, per_data_image: int = 0):
    """dream memory's estimator replaced by a linear one: per_image[policy] bytes per image of the micro-batch, plus
    per_data_image bytes per image kept on the device."""
    import dream.memory
    from dream.memory import MemoryEstimate

    def fake_estimate(spec):
        peak = per_image[spec.checkpointing] * spec.micro + per_data_image * spec.data_images
        return MemoryEstimate(peak_bytes=peak, breakdown={**dict.fromkeys(CATEGORIES, 0), "activations": peak},
                              snapshots={}, spec=spec)

    monkeypatch.setattr(dream.memory, "estimate_step_memory", fake_estimate)


def test_cli_budget_lines_say_the_micro_batch_and_what_dream_train_would_take(monkeypatch):
    """With --budget: the largest micro-batch within the budget (for the CUDA target, estimates kept under 94 % of
    it), how many are accumulated, and the line of what dream train would take; with --sweep, one such line per
    policy and the plan of --checkpointing auto. Here 1e8 bytes an image (none) or 5e7 (attention and the others):
    940 MB holds 9.4 or 18.8 images."""
    linear_estimates(monkeypatch, {"none": 10**8, "attention": 5 * 10**7, "resblocks": 5 * 10**7, "all": 5 * 10**7})
    common = ("--preset", "tiny", "--batch", "16", "--budget", "1GB", "--backend", "eager")
    code, text = run_cli(*common)
    assert code == 0 and text.splitlines()[-2:] == [
        "largest micro-batch within 1.000 GB: 8 (estimates kept under 94% of it) (2 accumulated micro-batches)",
        "dream train --memory-budget 1.000 GB --checkpointing none --data-on auto would take: micro-batch 8 of 16, "
        "checkpointing none"]
    code, text = run_cli(*common, "--sweep")
    assert code == 0 and text.splitlines()[-5:] == [
        "none       largest micro-batch within 1.000 GB: 8 (estimates kept under 94% of it) (2 accumulated "
        "micro-batches)",
        "attention  largest micro-batch within 1.000 GB: 16 (estimates kept under 94% of it)",
        "resblocks  largest micro-batch within 1.000 GB: 16 (estimates kept under 94% of it)",
        "all        largest micro-batch within 1.000 GB: 16 (estimates kept under 94% of it)",
        "dream train --memory-budget 1.000 GB --checkpointing auto --data-on auto would take: micro-batch 16 of 16, "
        "checkpointing attention"]


@pytest.mark.parametrize("target, limit, fits", [("cuda", 940_000_000, False), ("cpu", 10**9, True)])
def test_cli_keeps_the_cuda_margin_of_the_budget_for_the_cuda_target_only(monkeypatch, target, limit, fits):
    """A step estimated at 97 % of the budget fits it on the CPU target, not on the CUDA one, which keeps 6 % for
    what the estimate does not see: the JSON's budget limit, its fit and its micro-batch agree."""
    linear_estimates(monkeypatch, {"none": 97 * 10**6})
    code, text = run_cli("--preset", "tiny", "--batch", "10", "--budget", "1GB", "--target", target, "--json")
    report = json.loads(text)
    assert code == 0 and (report["budget_limit_bytes"], report["fits_budget"]) == (limit, fits)
    assert (report["peak_bytes"], report["peak_gb"], report["peak_gib"]) == (
        970_000_000, pytest.approx(0.97), pytest.approx(0.97e9 / 2**30))
    assert report["micro_batch_for_budget"] == (10 if fits else 5)


@pytest.mark.parametrize("target, plan", [("cuda", {"micro_batch": 8, "checkpointing": "none", "data_on": "host"}),
                                          ("cpu", {"micro_batch": 4, "checkpointing": "none", "data_on": "device"})])
def test_cli_data_on_auto_moves_the_images_to_the_host_for_the_cuda_target_only(monkeypatch, target, plan):
    """As dream train --data-on auto: the images go to host memory where that leaves a larger micro-batch, on a CUDA
    device; on the CPU the host is the device, and they stay. Here 1e8 bytes an image of the micro-batch and 1e6 an
    image of the data: with the 300 images a micro-batch of 8 needs 1.1 GB, without them 0.8 GB."""
    linear_estimates(monkeypatch, {"none": 10**8}, per_data_image=10**6)
    code, text = run_cli("--preset", "tiny", "--batch", "8", "--budget", "1GB", "--data-images", "300", "--target",
                         target, "--json")
    assert code == 0 and json.loads(text)["plan"] == plan


def test_cli_checkpointing_auto_where_nothing_fits_is_one_line(monkeypatch, capsys):
    linear_estimates(monkeypatch, {"none": 10**9, "attention": 10**9, "resblocks": 10**9, "all": 10**9})
    assert main(["memory", "--preset", "tiny", "--batch", "4", "--budget", "1MB", "--backend", "eager",
                 "--checkpointing", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dream memory: error: even a micro-batch of 1 needs an estimated 1.000 GB, over the memory "
                          "budget of 1.000 MB") and err.count("\n") == 1
    assert "with --checkpointing all, the last that auto tries" in err


# ----------------------------------------------------------------------------------------------
# The seed preset at the seed's batch
# ----------------------------------------------------------------------------------------------
def test_seed_preset_at_batch_128():
    spec = StepSpec(preset="seed", batch_size=128, precision="bf16", objective="seed", checkpointing="all")
    result = estimate(spec)
    count, tensors = parameter_facts(spec)
    before = result.snapshots["before_optimizer"]
    assert before["parameters"] == before["gradients"] == result.extras["ema_bytes"] - 8 == 4 * count
    assert before["optimizer"] == 8 * count + 4 * tensors
    assert result.peak_bytes == sum(result.breakdown.values())
    # at this size the activations, not the 16 bytes per parameter of state, make most of the peak
    assert result.breakdown["activations"] + result.breakdown["temporaries"] > 16 * count


# ----------------------------------------------------------------------------------------------
# GPU: the estimate against the allocator
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: compares with torch.cuda.max_memory_allocated")
@pytest.mark.parametrize("spec", [
    StepSpec(preset="tiny", model_overrides={"image_size": 64}, batch_size=32, precision="bf16"),
    StepSpec(preset="seed", batch_size=128, precision="bf16", checkpointing="all"),
    StepSpec(preset="seed", batch_size=64, precision="fp32", checkpointing="resblocks", backend="sdpa"),
], ids=["tiny-bf16", "seed-bf16-all", "seed-fp32-resblocks-sdpa"])
def test_estimate_matches_cuda_measurement(spec):
    estimated = estimate(spec).peak_bytes
    measured = measure_cuda_peak(spec)
    print(f"{spec.preset} {spec.precision} {spec.checkpointing}: estimated {estimated / 1e9:.3f} GB, "
          f"measured {measured / 1e9:.3f} GB")
    assert abs(estimated - measured) <= GPU_RELATIVE_TOLERANCE * measured


def test_cli_cuda_graphs_plans_and_refuses_as_dream_train_does(monkeypatch, capsys):
    """With --cuda-graphs and dropout, dream train never runs the policies that recompute dropout (resblocks, all)
    nor fp16: dream memory's plan leaves them out of --checkpointing auto and its sweep, and refuses them when
    named, in the trainer's line; with --dropout 0 they are allowed."""
    import dream.memory
    from dream.memory import MemoryEstimate

    peaks = {"none": 2e9, "norms": 1.8e9, "attention": 1.5e9, "resblocks": 5e8, "all": 4e8}  # bytes at the batch

    def fake_estimate(spec):
        return MemoryEstimate(peak_bytes=int(peaks[spec.checkpointing] * spec.micro / spec.batch_size),
                              breakdown=dict.fromkeys(CATEGORIES, 0), snapshots={}, spec=spec)

    monkeypatch.setattr(dream.memory, "estimate_step_memory", fake_estimate)
    common = ("--preset", "tiny", "--batch", "8", "--budget", "1GB", "--backend", "eager", "--json")
    code, text = run_cli(*common, "--checkpointing", "auto")
    assert code == 0 and json.loads(text)["plan"] == {"micro_batch": 8, "checkpointing": "resblocks",
                                                      "data_on": "device"}
    code, text = run_cli(*common, "--checkpointing", "auto", "--cuda-graphs")
    assert code == 0 and json.loads(text)["plan"] == {"micro_batch": 4, "checkpointing": "attention",
                                                      "data_on": "device"}
    code, text = run_cli(*common, "--sweep", "--cuda-graphs")
    assert code == 0 and [r["inputs"]["checkpointing"] for r in json.loads(text)["sweep"]] == ["none", "attention"]
    code, text = run_cli(*common, "--checkpointing", "auto", "--cuda-graphs", "--dropout", "0")
    assert code == 0 and json.loads(text)["plan"]["checkpointing"] == "resblocks"
    capsys.readouterr()
    for refused, line in ((("--checkpointing", "resblocks"), "--cuda-graphs with --checkpointing resblocks and "
                                                              "dropout 0.1: backward recomputes"),
                          (("--precision", "fp16"), "--cuda-graphs does not work with --precision fp16")):
        code, text = run_cli(*common, "--cuda-graphs", *refused)
        err = capsys.readouterr().err
        assert code != 0 and text == "" and line in err and len(err.strip().splitlines()) == 1
