"""`dream profile` as a user meets it: flags checked one by one, the output folder checked before any
work, report names that carry the settings and never overwrite an earlier report, CPU figures readable."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dream import profile
from dream.errors import DreamError

REPO = Path(__file__).resolve().parent.parent


def parse(*argv):
    parser = argparse.ArgumentParser()
    profile.add_profile_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv,message", [
    (("--batch", "-2"), "--batch must be at least 1, got -2"),
    (("--steps", "0"), "--steps must be at least 1, got 0"),
    (("--top", "0"), "--top must be at least 1, got 0"),
    (("--warmup", "-1"), "--warmup must be at least 0, got -1"),
    (("--sample-steps", "0"), "--sample-steps must be at least 1, got 0"),
    (("--out", ""), "--out is empty; give a folder"),
])
def test_each_bad_value_is_named_with_its_flag(tmp_path, argv, message):
    args = parse("--device", "cpu", "--out", str(tmp_path), *argv)
    with pytest.raises(DreamError) as error:
        profile.run_profile(args)
    assert str(error.value) == message


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work(*args):
        raise AssertionError("a workload was built before the output folder was checked")

    monkeypatch.setattr(profile, "training_workload", no_work)
    monkeypatch.setattr(profile, "sampling_workload", no_work)
    (tmp_path / "AFILE").write_text("")
    args = parse("--device", "cpu", "--out", str(tmp_path / "AFILE"))
    with pytest.raises(DreamError, match="exists and is not a folder; choose another --out$"):
        profile.run_profile(args)


@pytest.mark.parametrize("what", ["train", "sample"])
def test_out_of_memory_in_a_workload_is_one_line_naming_the_batch(tmp_path, monkeypatch, what):
    def out_of_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1228800000000000 bytes")

    monkeypatch.setattr(profile, f"{'training' if what == 'train' else 'sampling'}_workload", out_of_memory)
    args = parse("--device", "cpu", "--out", str(tmp_path), "--what", what, "--batch", "100000000000")
    with pytest.raises(DreamError, match=rf"^out of memory in the {what} workload at --batch 100000000000 on cpu: "
                                         r"pass a smaller --batch$"):
        profile.run_profile(args)
    monkeypatch.setattr(profile, f"{'training' if what == 'train' else 'sampling'}_workload",
                        lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):  # other errors are not dressed up as out of memory
        profile.run_profile(args)


def test_report_names_carry_the_settings_that_differ_from_the_defaults():
    cpu = torch.device("cpu")

    def name(what, *argv, **config):
        args = parse(*argv)
        args.preset = args.preset or "tiny"
        args.batch = args.batch or 2
        config = {"channels_last": False, "backend": "eager", "precision": "fp32", "compile": False,
                  "objective": args.objective, **config}
        return profile.profile_name(what, args, config, cpu)

    assert name("train") == "profile-train"
    assert name("sample") == "profile-sample"
    assert name("sample", "--sampler", "graphs") == "profile-sample-graphs"
    assert name("sample", "--sampler", "graphs", "--sample-steps", "50") == "profile-sample-graphs-ddim50"
    assert name("sample", "--sample-steps", "50") == "profile-sample"  # one step: --sample-steps plays no part
    assert name("train", "--backend", "triton", backend="triton") == "profile-train-triton"
    assert name("train", "--precision", "bf16", precision="bf16") == "profile-train-bf16"
    assert name("train", "--compile", compile=True) == "profile-train-compile"
    assert name("train", "--cuda-graphs", cuda_graphs=True) == "profile-train-graphs"
    assert name("train", "--batch", "8") == "profile-train-batch8"
    assert name("train", "--objective", "paper") == "profile-train-paper"
    assert name("train", "--preset", "seed") == "profile-train-seed"
    assert (name("train", "--checkpointing", "norms", "--backend", "triton", backend="triton")
            == "profile-train-checkpointing-norms-triton")


def test_unique_stem_never_reuses_a_taken_name(tmp_path):
    stem = tmp_path / "2026-01-01-profile-train"
    assert profile.unique_stem(stem, (".md", ".json")) == stem
    (tmp_path / "2026-01-01-profile-train.json").write_text("{}")
    assert profile.unique_stem(stem, (".md", ".json")).name == "2026-01-01-profile-train-2"
    (tmp_path / "2026-01-01-profile-train-2.md").write_text("")
    assert profile.unique_stem(stem, (".md", ".json")).name == "2026-01-01-profile-train-3"


def test_small_figures_keep_three_significant_digits():
    assert [profile.significant(v) for v in (0.000354, 0.0345, 0.157, 1.0, 12.34, 123.4, 5678.9)] == [
        "0.000354", "0.0345", "0.157", "1.00", "12.3", "123", "5,679"]


def test_cpu_report_shows_triton_interpret_and_readable_images_per_second(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = profile.environment_info("cpu")
    assert info["triton_interpret"] == "1"
    summary = {"step_ms": 6370.0, "wall_ms": [6370.0], "steps": 1, "images_per_s": 0.000314, "top_ops": []}
    text = profile.format_report("sample", info, {"sampler": "one ddpm ancestral step"}, summary, "t.json.gz", 5)
    assert "| triton_interpret | 1 |" in text
    assert "| images/s of a 1000-step DDPM run at this step time | 0.000314 |" in text


def test_a_second_profile_with_other_settings_or_the_same_does_not_overwrite_the_first(tmp_path):
    def run(*argv):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-m", "dream", "profile", "--what", "train", "--preset", "tiny",
                                 "--image-size", "8", "--base-channels", "16", "--steps", "1", "--warmup", "0",
                                 "--device", "cpu", "--out", str(tmp_path), *argv],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    run()
    [first] = (tmp_path / "cpu").glob("*-profile-train.md")
    before = first.read_text()
    out = run()
    second = first.with_name(first.name.replace("-profile-train.md", "-profile-train-2.md"))
    assert second.exists() and str(second) in out
    out = run("--batch", "3")
    assert "-profile-train-batch3.md" in out
    assert first.read_text() == before


def test_a_custom_ops_forward_is_not_labelled_backward():
    """torch.library times a custom op's forward inside its autograd node, GeneratedBackwardFor_...: the
    report names the op and says it is the forward."""
    from types import SimpleNamespace

    from dream.profile import top_cpu_ops

    events = [SimpleNamespace(key="GeneratedBackwardFor_dream_kernels_group_norm_silu_fwd_default", count=64,
                              self_cpu_time_total=300.0),
              SimpleNamespace(key="GeneratedBackwardFor_other_lib_op_default", count=1, self_cpu_time_total=100.0),
              SimpleNamespace(key="aten::convolution", count=3, self_cpu_time_total=100.0)]
    rows = top_cpu_ops(events)
    assert [row["name"] for row in rows] == ["dream_kernels::group_norm_silu_fwd (forward, in its autograd wrapper)",
                                             "GeneratedBackwardFor_other_lib_op_default", "aten::convolution"]
    assert rows[0]["calls"] == 64 and rows[0]["share"] == pytest.approx(0.6)


def test_device_folders_and_labels():
    """A GPU's reports go to its name as a folder name, CPU reports to `cpu` under the heading label CPU."""
    cuda = {"device_type": "cuda", "device_name": "NVIDIA H200 (NVL)"}
    cpu = {"device_type": "cpu", "device_name": "CPU (x86_64, 2 cores)"}
    assert profile.device_slug(cuda) == "nvidia-h200-nvl" and profile.device_slug(cpu) == "cpu"
    assert profile.device_label(cuda) == "NVIDIA H200 (NVL)" and profile.device_label(cpu) == "CPU"


@pytest.mark.parametrize("device_type, title, cpu_note", [("cpu", "# Profile: sampling — CPU", True),
                                                          ("cuda", "# Profile: sampling — GPU-X", False)])
def test_a_report_is_titled_with_its_device_and_a_cpu_one_says_its_figures_are_cpus(device_type, title, cpu_note):
    info = {"device_type": device_type, "device_name": "GPU-X" if device_type == "cuda" else "CPU (x, 2 cores)",
            "driver": None, "torch": "2.x", "time": "t"}
    summary = {"step_ms": 2.0, "wall_ms": [2.0], "steps": 1, "images_per_s": 1000.0, "top_ops": [], "kernels": 3,
               "launches": 3, "graph_launches": 0, "busy_fraction": 0.5, "kernel_time_us": 900.0, "gpu_events": 3,
               "top_kernels": []}
    text = profile.format_report("sample", info, {"sampler": "a | b"}, summary, "t.json.gz", 5)
    assert text.splitlines()[0] == title
    assert ("**CPU figures**" in text) is cpu_note
    assert "| sampler | a \\| b |" in text  # a cell's "|" does not split the table's row
    assert "| driver |" not in text  # nothing known: no row


def test_figures_of_a_thousand_and_more_get_thousands_separators():
    assert [profile.significant(v) for v in (999.6, 1000.0, 3.2e-7)] == ["1000", "1,000", "3.2e-07"]


def test_report_names_carry_a_layout_other_than_the_devices_and_leave_out_what_does_not_apply():
    cpu = torch.device("cpu")
    args = parse("--checkpointing", "attention", "--objective", "paper")
    args.preset, args.batch = "tiny", 2
    config = {"channels_last": True, "backend": "eager", "precision": "fp32", "compile": False, "objective": "paper"}
    assert (profile.profile_name("train", args, config, cpu)
            == "profile-train-channels-last-checkpointing-attention-paper")
    # checkpointing and the objective are the training step's: a sampling profile is not named after them
    assert profile.profile_name("sample", args, config, cpu) == "profile-sample-channels-last"


def test_cpu_defaults_are_a_small_run(tmp_path, monkeypatch):
    """Without a GPU: the tiny preset at 32 × 32, batch 2, one warm-up and one recorded step."""
    seen = []

    class Stop(Exception):
        pass

    def workload(args, device):
        seen.append((args.preset, args.image_size, args.batch, args.warmup, args.steps))
        raise Stop

    monkeypatch.setattr(profile, "training_workload", workload)
    with pytest.raises(Stop):
        profile.run_profile(parse("--device", "cpu", "--what", "train", "--out", str(tmp_path)))
    assert seen == [("tiny", 32, 2, 1, 1)]


def test_the_profiler_step_rows_are_not_operators():
    from types import SimpleNamespace

    events = [SimpleNamespace(key="ProfilerStep#3", count=1, self_cpu_time_total=500.0),
              SimpleNamespace(key="aten::mm", count=2, self_cpu_time_total=300.0),
              SimpleNamespace(key="aten::add", count=4, self_cpu_time_total=100.0)]
    rows = profile.top_cpu_ops(events)
    assert [row["name"] for row in rows] == ["aten::mm", "aten::add"] and rows[0]["share"] == pytest.approx(0.75)


def test_profile_steps_runs_the_step_once_unprofiled_then_warmup_and_recorded_steps(tmp_path):
    """The step runs once outside the profiler, then --warmup + --steps times; only the recorded steps are timed
    (in ms; the step time is their median), the gzipped Chrome trace goes into a folder made for it, and a CPU
    summary lists operators without the profiler's own step rows."""
    import gzip
    import json
    import statistics
    import time

    sleeps = iter([0.0, 0.0, 0.002, 0.002, 0.03])  # unprofiled, warm-up, then three recorded steps

    def step():
        time.sleep(next(sleeps))
        return torch.ones(8, 8) @ torch.ones(8, 8)

    trace_path = tmp_path / "cpu" / "t.trace.json.gz"
    summary = profile.profile_steps(step, torch.device("cpu"), warmup=1, active=3, trace_path=trace_path, top=4)
    assert next(sleeps, "all used") == "all used"
    assert len(summary["wall_ms"]) == 3 and min(summary["wall_ms"]) >= 2.0 and max(summary["wall_ms"]) >= 30.0
    assert summary["step_ms"] == pytest.approx(statistics.median(summary["wall_ms"]))
    assert summary["step_ms"] < 30.0  # the median, not the mean: one slow step does not set it
    with gzip.open(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    # the trace is that of the recorded steps (numbered from 0 with the warm-up step), not of the warm-up
    assert {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")} == {
        "ProfilerStep#1", "ProfilerStep#2", "ProfilerStep#3"}
    assert 0 < len(summary["top_ops"]) <= 4
    assert not any(row["name"].startswith("ProfilerStep") for row in summary["top_ops"])


def test_a_profile_run_writes_its_reports_with_images_per_second(tmp_path, monkeypatch, capsys):
    """--what both: a report (.md, .json) and a trace per workload under <out>/cpu/<date>-profile-<what>...; images/s
    is the batch over the step time, and for the one-step sampler that of a 1000-step run; a trace alone already
    there takes the name too (-2). Each workload starts from --seed, is profiled with --warmup, --steps and --top, and
    its report names its trace and holds its settings; a CPU run warns of no missing GPU events."""
    import json

    drawn, profiled = [], []

    def workload(args, device):
        drawn.append(torch.rand(1).item())  # (random weights and inputs are drawn from torch's generator)
        return (lambda: None), {"preset": args.preset, "batch": args.batch, "backend": "eager", "precision": "fp32",
                                "compile": False, "channels_last": False, "objective": "seed",
                                "sampler": "one ddpm ancestral step" if args.sampler == "step" else "DDIM loop"}, None

    def profile_steps(step, device, *, warmup, active, trace_path, top):
        profiled.append((warmup, active, top))
        trace_path.write_bytes(b"")
        return {"steps": active, "wall_ms": [250.0] * active, "step_ms": 250.0, "top_ops": []}

    monkeypatch.setattr(profile, "training_workload", workload)
    monkeypatch.setattr(profile, "sampling_workload", workload)
    monkeypatch.setattr(profile, "profile_steps", profile_steps)
    info = profile.environment_info("cpu")
    stem = tmp_path / "cpu" / f"{info['date']}-profile"
    (tmp_path / "cpu").mkdir()
    stem.with_name(stem.name + "-train-batch4.trace.json.gz").write_bytes(b"")  # an earlier run's trace
    written = profile.run_profile(parse("--device", "cpu", "--out", str(tmp_path), "--batch", "4", "--seed", "5",
                                        "--warmup", "0", "--steps", "3", "--top", "7"))
    assert [path.name for path in written] == [
        f"{stem.name}-train-batch4-2{suffix}" for suffix in profile.PROFILE_SUFFIXES] + [
        f"{stem.name}-sample-batch4{suffix}" for suffix in profile.PROFILE_SUFFIXES]
    assert all(path.parent == tmp_path / "cpu" and path.exists() for path in written)
    reports = [json.loads(path.read_text()) for path in written if path.suffix == ".json"]
    assert [(r["what"], r["summary"]["images_per_s"]) for r in reports] == [("train", 16.0), ("sample", 0.016)]
    assert [r["config"]["sampler"] for r in reports] == ["one ddpm ancestral step"] * 2
    assert profiled == [(0, 3, 7)] * 2
    md, trace = written[0].read_text(), written[2].name
    assert f"Chrome trace: `{trace}`" in md and "## Top 7 operators by self CPU time" in md
    assert capsys.readouterr().err == ""
    engine = profile.run_profile(parse("--device", "cpu", "--out", str(tmp_path), "--batch", "4", "--what", "sample",
                                       "--sampler", "engine"))
    assert json.loads(engine[1].read_text())["summary"]["images_per_s"] == 16.0  # the whole loop is one step
    assert "| images/s (under the profiler) | 16.0 |" in engine[0].read_text()

    def first_draw(seed):
        torch.manual_seed(seed)
        return torch.rand(1).item()

    assert drawn == [first_draw(5), first_draw(5), first_draw(0)]  # train, sample (--seed 5), engine (the default 0)


def test_the_cpu_default_image_size_is_the_tiny_presets_alone(tmp_path, monkeypatch):
    seen = []

    def workload(args, device):
        seen.append((args.preset, args.image_size))
        raise KeyError("stop here")

    monkeypatch.setattr(profile, "training_workload", workload)
    for preset in ("seed", "tiny"):
        with pytest.raises(KeyError):
            profile.run_profile(parse("--device", "cpu", "--what", "train", "--preset", preset, "--out", str(tmp_path)))
    assert seen == [("seed", None), ("tiny", 32)]


def test_random_parameters_replace_the_constant_ones_deterministically():
    """GroupNorm weights 1 + 0.1 z and biases 0.1 z, the zero-initialised conv_out uniform within PyTorch's default
    bound 1/sqrt(fan_in); the same for a seed, other values for another seed."""
    from dream.model import build_unet

    def randomized(seed):
        return profile.randomize_parameters(build_unet("tiny", image_size=8, base_channels=16), seed)

    model = randomized(3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms
    for norm in norms:
        assert (norm.weight - 1).abs().max() < 0.6 and (norm.weight - 1).abs().max() > 0
        assert norm.bias.abs().max() < 0.6 and norm.bias.abs().max() > 0
    weight = model.conv_out.weight
    bound = weight[0].numel() ** -0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound  # (hundreds of uniform draws)
    assert model.conv_out.bias.abs().max() <= bound and model.conv_out.bias.abs().max() > 0

    def filled(model):  # (the other parameters keep build_unet's own random initialisation)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        return [*(m.weight for m in norms), *(m.bias for m in norms), model.conv_out.weight, model.conv_out.bias]

    again, other = randomized(3), randomized(4)
    assert all(torch.equal(a, b) for a, b in zip(filled(model), filled(again)))
    assert not torch.equal(other.conv_out.weight, weight)


def test_a_benchmark_trainer_is_one_batch_in_the_dream_phase_in_a_folder_that_goes_with_it():
    """build_trainer: one batch of synthetic data in one micro-batch, the epoch where the DREAM objective is fully on,
    settings this TrainConfig lacks dropped, and its scratch run folder removed with the trainer; sample_batch:
    images in [-1, 1] that depend on the seed."""
    import gc

    trainer = profile.build_trainer(preset="tiny", batch=2, device="cpu", model_overrides={"image_size": 8,
                                    "base_channels": 16}, not_a_train_setting=1)
    assert trainer.epoch == 30 and trainer.config.micro_batch == 2 and trainer.config.data_count == 2
    x0 = profile.sample_batch(trainer)
    assert x0.shape == (2, 3, 8, 8) and x0.min() >= -1 and x0.max() <= 1 and x0.min() < -0.5
    assert torch.equal(x0, profile.sample_batch(trainer)) and not torch.equal(x0, profile.sample_batch(trainer, 1))
    run_dir = Path(trainer.config.run_dir)
    assert run_dir.is_dir()
    del trainer
    gc.collect()
    assert not run_dir.exists()


def test_the_sampling_workload_is_one_eval_mode_step_at_half_the_timesteps(monkeypatch):
    from dream.diffusion import GaussianDiffusion

    calls = []
    p_sample = GaussianDiffusion.p_sample

    def recorded(self, model, x_t, t, noise=None, **kwargs):
        calls.append((model.training, t.tolist(), self.num_timesteps))
        return p_sample(self, model, x_t, t, noise=noise, **kwargs)

    monkeypatch.setattr(GaussianDiffusion, "p_sample", recorded)
    args = parse("--preset", "tiny", "--image-size", "8", "--base-channels", "16", "--batch", "2")
    step, config, _ = profile.sampling_workload(args, torch.device("cpu"))
    out = step()
    assert out.shape == (2, 3, 8, 8)
    assert calls == [(False, [500, 500], 1000)]
    assert torch.equal(step(), out)  # fixed x_t and noise: each profiled step is the same work on the same inputs
    with pytest.raises(DreamError, match="^--sampler graphs needs a CUDA device"):
        profile.sampling_workload(parse("--preset", "tiny", "--batch", "2", "--sampler", "graphs"),
                                  torch.device("cpu"))


def test_a_gpu_report_gives_counts_and_times_per_step():
    """Kernels, launches, graph launches, kernel time and each top kernel's calls and time are per profiled step;
    launch gaps are the rest of the busy fraction. A CPU report's operator shares are percentages."""
    info = {"device_type": "cuda", "device_name": "GPU-X", "time": "t"}
    summary = {"step_ms": 2.0, "wall_ms": [2.0, 2.0], "steps": 2, "kernels": 10, "launches": 12, "graph_launches": 2,
               "busy_fraction": 0.25, "kernel_time_us": 4000.0, "gpu_events": 10,
               "top_kernels": [{"name": "gemm", "calls": 4, "total_us": 3000.0, "share": 0.75},
                               {"name": "k" * 130, "calls": 2, "total_us": 1000.0, "share": 0.25}]}
    lines = profile.format_report("train", info, {}, summary, "t.json.gz", 5).splitlines()
    for row in ("| GPU kernels per step | 5 |", "| kernel launches per step (runtime + driver API) | 6 |",
                "| CUDA graph launches per step | 1 |",
                "| GPU busy fraction (kernels, copies, memsets / window) | 25.0 % |",
                "| launch gaps (1 - busy) | 75.0 % |", "| GPU kernel time per step | 2.000 ms |",
                "| 1 | gemm | 2 | 1.500 | 75.0 % |", f"| 2 | {'k' * 120} | 1 | 0.500 | 25.0 % |"):  # (names cut at 120)
        assert row in lines, row
    copies_only = {**summary, "kernels": 0, "kernel_time_us": 0.0, "top_kernels": []}  # GPU events, but no kernel
    assert profile.NO_GPU_EVENTS not in profile.format_report("train", info, {}, copies_only, "t.json.gz", 5)
    instant = {**summary, "kernel_time_us": 0.0, "top_kernels": [{"name": "fill", "calls": 2, "total_us": 0.0,
                                                                  "share": None}]}  # no kernel time to share out
    instant_lines = profile.format_report("train", info, {}, instant, "t.json.gz", 5).splitlines()
    assert "| 1 | fill | 1 | 0.000 |  |" in instant_lines
    cpu = {"step_ms": 2.0, "wall_ms": [2.0], "steps": 1,
           "top_ops": [{"name": "aten::mm", "calls": 3, "total_us": 1500.0, "share": 0.6}]}
    assert "| 1 | aten::mm | 3 | 1.500 | 60.0 % |" in profile.format_report(
        "train", {"device_type": "cpu", "device_name": "CPU"}, {}, cpu, "t.json.gz", 5).splitlines()


def test_a_table_cell_keeps_its_row_and_empty_settings_are_left_out():
    table = profile.markdown_table(["key", "value"], [["command", "a\nb | c"]])
    assert table.splitlines()[2] == "| command | a b \\| c |"
    text = profile.environment_markdown({"torch": "2.x", "triton_interpret": "", "driver": None, "time": "t"})
    assert "triton_interpret" not in text and "driver" not in text and "| torch | 2.x |" in text


def test_a_training_profile_is_not_named_after_sampling_settings():
    args = parse("--sample-steps", "50")
    args.preset, args.batch = "tiny", 2
    config = {"channels_last": False, "backend": "eager", "precision": "fp32", "compile": False, "objective": "seed"}
    assert profile.profile_name("train", args, config, torch.device("cpu")) == "profile-train"


def test_only_a_cuda_device_gets_a_gpu_folder():
    """Anything but CUDA (an Apple GPU, say) is profiled as CPU figures: the cpu folder and the CPU label."""
    other = {"device_type": "mps", "device_name": "Apple M2"}
    assert profile.device_slug(other) == "cpu" and profile.device_label(other) == "CPU"


def test_a_blank_out_or_a_file_in_the_device_folders_place_is_refused_before_any_work(tmp_path, monkeypatch):
    def no_work(*args):
        raise AssertionError("a workload was built before the output folder was checked")

    monkeypatch.setattr(profile, "training_workload", no_work)
    monkeypatch.setattr(profile, "sampling_workload", no_work)
    with pytest.raises(DreamError, match="^--out is empty; give a folder$"):
        profile.run_profile(parse("--device", "cpu", "--out", "  "))
    (tmp_path / "cpu").write_text("")  # where the CPU reports would go
    with pytest.raises(DreamError, match=rf"^--out {tmp_path}: {tmp_path / 'cpu'} exists and is not a folder; "
                                         r"choose another --out$"):
        profile.run_profile(parse("--device", "cpu", "--out", str(tmp_path)))


def test_a_report_name_is_the_date_and_the_label_as_one_file_name(tmp_path):
    info = {"device_type": "cpu", "date": "2026-01-02"}
    folder = tmp_path / "cpu"
    assert profile.report_stem(tmp_path, info, "bench unet/fp16 (b=8)") == folder / "2026-01-02-bench-unet-fp16-b-8"
    assert profile.report_stem(tmp_path, info, "//") == folder / "2026-01-02-report"
    assert folder.is_dir()


def test_figures_down_to_a_millionth_are_written_without_an_exponent():
    assert [profile.significant(v) for v in (3.54e-5, 1.5e-6, -0.0123)] == ["0.0000354", "0.00000150", "-0.0123"]


def test_gpu_defaults_are_the_seed_preset_at_batch_128(tmp_path, monkeypatch):
    """On a GPU (faked here: no work is done): the seed preset at its own size, batch 128, two warm-up and three
    recorded steps."""
    import dream.train

    seen = []

    class Stop(Exception):
        pass

    def workload(args, device):
        seen.append((device.type, args.preset, args.image_size, args.batch, args.warmup, args.steps))
        raise Stop

    monkeypatch.setattr(dream.train, "resolve_device", lambda name, *rest: torch.device("cuda"))
    monkeypatch.setattr(profile, "environment_info", lambda device: {"device_type": "cuda", "device_name": "GPU-X",
                                                                     "date": "2026-01-02"})
    monkeypatch.setattr(profile, "training_workload", workload)
    with pytest.raises(Stop):
        profile.run_profile(parse("--what", "train", "--out", str(tmp_path)))
    assert seen == [("cuda", "seed", None, 128, 2, 3)]
    assert (tmp_path / "gpu-x").is_dir()


def test_gpu_report_names_carry_an_nchw_layout_and_a_batch_other_than_128(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda = torch.device("cuda")
    args = parse()
    args.preset, args.batch = "seed", 128
    config = {"channels_last": True, "backend": "triton", "precision": "bf16", "compile": False, "objective": "seed"}
    assert profile.profile_name("train", args, config, cuda) == "profile-train"
    args.batch = 2
    assert profile.profile_name("train", args, {**config, "channels_last": False}, cuda) == "profile-train-nchw-batch2"


def test_the_engine_sampling_workload_is_a_ddim_loop_of_sample_steps_model_calls():
    args = parse("--preset", "tiny", "--image-size", "8", "--base-channels", "16", "--batch", "2", "--sampler",
                 "engine", "--sample-steps", "3")
    loop, config, (model, _) = profile.sampling_workload(args, torch.device("cpu"))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    assert loop().shape == (2, 3, 8, 8)
    assert len(calls) == 3 and config["sampler"].startswith("DDIM-3 loop")


def test_model_size_flags_override_the_preset_and_the_layout_defaults_to_the_devices():
    args = parse("--image-size", "16", "--base-channels", "32", "--num-heads", "2")
    assert profile.model_overrides_from(args) == {"image_size": 16, "base_channels": 32, "num_heads": 2}
    assert profile.model_overrides_from(parse()) == {}  # each absent flag leaves the preset's value
    from dream.model import resolve_channels_last

    # without --channels-last / --no-channels-last the device decides: channels_last on CUDA, NCHW elsewhere
    default = parse().channels_last
    assert resolve_channels_last(default, "cuda") and not resolve_channels_last(default, "cpu")
    assert not resolve_channels_last(parse("--no-channels-last").channels_last, "cuda")


def test_the_training_workloads_batch_depends_on_the_seed():
    """--seed sets the profiled training step's input images as well as its weights."""
    def batch(seed):
        args = parse("--preset", "tiny", "--image-size", "8", "--base-channels", "16", "--batch", "2", "--seed", seed)
        step, _, trainer = profile.training_workload(args, torch.device("cpu"))
        trainer.train_step = lambda x0: x0  # (the step's input, not a step)
        return step()

    assert not torch.equal(batch("1"), batch("2"))


def test_the_command_prints_every_file_it_wrote(tmp_path, monkeypatch, capsys):
    written = [tmp_path / "a.md", tmp_path / "a.json", tmp_path / "a.trace.json.gz"]
    monkeypatch.setattr(profile, "run_profile", lambda args: written)
    assert profile.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(path) for path in written]
