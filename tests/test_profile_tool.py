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
