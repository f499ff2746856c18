"""Every Triton kernel the seed UNet launches compiles for sm_90 (H100/H200) without spilling.

The interpreter runs the kernels' math on CPU but never compiles them, so it misses what only the
compiler sees (layouts, dot shapes and dtypes, register pressure). Here `bench.compile_report`
records the seed UNet's kernel-op calls at batch 128 (the trainer) and 2 (the split path), NCHW and
channels_last, replays them in bf16 (tensor-core dots) and fp32 (FMA dots) with the GPU launch
heuristics, and has Triton + ptxas compile each configuration offline. It needs Triton's NVIDIA
backend (ptxas ships inside CUDA builds of triton), not a GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {
    "gn_fwd_moments_kernel", "gn_fwd_kernel", "gn_bwd_sums_kernel", "gn_bwd_kernel", "gn_param_grads_kernel",
    "attention_forward_kernel", "attention_backward_delta_kernel", "attention_backward_kernel",
    "attention_backward_single_tile_kernel", "upsample2x_concat_kernel", "upsample2x_backward_kernel",
    "bias_residual_kernel",
}


def _ptxas_available() -> bool:
    code = "import sys; from bench.compile_report import ptxas_available; sys.exit(0 if ptxas_available() else 1)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env).returncode == 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels are compiled and run by the other kernel tests")
    if not _ptxas_available():
        pytest.skip("this Triton has no NVIDIA backend with ptxas")
    out = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "bench.compile_report", "--arch", "90", "--batches", "128,2",
         "--layouts", "nchw,channels_last", "--precisions", "bf16,fp32", "--out", str(out), "--json-only"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (path,) = out.glob("*.json")
    return run, json.loads(path.read_text())


def test_every_kernel_compiles_for_sm90(report):
    run, data = report
    assert data["failures"] == [], "\n".join(data["failures"])
    assert run.returncode == 0, run.stdout + run.stderr
    launched = {row["kernel"] for row in data["kernels"]}
    assert launched == KERNELS, f"not compiled: {sorted(KERNELS - launched)}; unexpected: {sorted(launched - KERNELS)}"
    # per recording: 35 GroupNorm and attention calls, 3 skip concatenations and 17 residual sums (14
    # ResBlocks, 3 attention blocks) in the training forward and in the eval-mode forward (sampling); the
    # backward has a kernel for the first 38 (the residual sum's is dout itself and a torch.sum)
    assert data["op_calls"] == 4 * (2 * (35 + 3 + 17) + 35 + 3)
    for precision in ("bf16", "fp32"):
        assert any(precision in row["precisions"] for row in data["kernels"]
                   if row["kernel"] == "attention_forward_kernel")


def test_no_kernel_spills_or_overflows_an_sm(report):
    _, data = report
    assert data["problems"] == [], "\n".join(data["problems"])
    for row in data["kernels"]:
        assert 0 < row["registers"] <= 255, row
        assert row["local_bytes"] + row["stack_bytes"] < 64, row
        assert row["programs_per_sm"] >= 1, row


def test_heuristics_pick_the_split_path_only_for_small_batches(report):
    _, data = report
    for row in data["kernels"]:
        recordings = {" ".join(site.split(" ")[1:3]) for site in row["sites"]}
        if row["kernel"] in ("gn_fwd_moments_kernel", "gn_bwd_sums_kernel"):
            assert all(label.startswith("B=2 ") for label in recordings), row
        if row["kernel"] == "attention_backward_single_tile_kernel":  # 8x8 attention (N=64), tensor-core dots
            assert row["precisions"] == ["bf16"], row


def test_half_precision_attention_dots_use_hopper_wgmma(report):
    """At the UNet's sites (N = 256 and 64, 64-row tiles) every bf16 attention kernel's dots compile to
    Hopper's warpgroup wgmma (HGMMA in SASS), none to the warp-level mma.sync (HMMA) of older GPUs;
    fp32 takes exact FMA dots (no tensor cores at all)."""
    _, data = report
    dot_kernels = [row for row in data["kernels"]
                   if row["kernel"].startswith("attention") and "delta" not in row["kernel"]]
    assert {row["kernel"] for row in dot_kernels} == {
        "attention_forward_kernel", "attention_backward_kernel", "attention_backward_single_tile_kernel"}
    for row in dot_kernels:
        if row["precisions"] == ["bf16"]:
            assert row["hgmma"] > 0 and row["hmma"] == 0, row
        else:
            assert row["precisions"] == ["fp32"] and row["hgmma"] == row["hmma"] == 0, row
    assert data["warp_mma"] == []


def test_recorded_resblock_shift_stays_fp32_in_half_precision():
    """Under autocast the ResBlock's shift is fp32 (conv1's fp32 bias is folded into it), so the offline
    compile replays those GroupNorm calls with an fp32 shift beside a half x, as the model launches them."""
    from bench.compile_report import _as_precision, record_model_calls

    calls = [c for c in record_model_calls("tiny", 2, channels_last=False) if "group_norm" in c.op]
    with_shift = [c for c in calls if c.fp32_args]
    assert with_shift and all(c.args[c.fp32_args[0]] is not None for c in with_shift)
    assert any(not c.fp32_args for c in calls)  # the norms without scale/shift
    fwd = next(c for c in with_shift if c.op.endswith("_fwd"))
    x, _, _, scale, shift = _as_precision(fwd, torch.bfloat16)[:5]
    assert (x.dtype, scale.dtype, shift.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_fused_dropout_compiles_in_every_octet_mode():
    """The fused dropout over the contract's shapes (odd channels per group, 7x5 and 1x1 images, the split
    path) in NCHW and channels_last compiles for sm_90 in all three of its mask modes: octets of
    positions, whole octets of channels, and octets of channels drawn element by element. The interpreter
    runs Python's control flow, so it cannot see code that only Triton's compiler rejects."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernels are compiled and run by the other kernel tests")
    if not _ptxas_available():
        pytest.skip("this Triton has no NVIDIA backend with ptxas")
    code = ("import json; from bench import compile_report as cr; "
            "calls = [c for c in cr.contract_calls() if 'dropout' in c.site]; "
            "compiled, failures = cr.compile_calls(calls, ['bf16'], 90); "
            "rows = cr.summarize(compiled, 90); "
            "print(json.dumps({'failures': failures, 'problems': cr.problems(rows, 90), "
            "'modes': sorted({r['config']['DROPOUT'] for r in rows if r['config'].get('DROPOUT')})}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], "\n".join(result["failures"])
    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["modes"] == [1, 2, 3]
