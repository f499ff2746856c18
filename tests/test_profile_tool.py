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
