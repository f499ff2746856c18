"""The `dream` command: info output and one-line errors on bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dream.cli import main
from dream.errors import DreamError

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
ENV["PYTHONPATH"] = os.getcwd()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dream", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_info_json(capsys):
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 3_438_979
    assert info["gflops_forward_per_image"] > 0
    assert info["blocks"]


def test_every_flag_is_explained_and_shows_its_default():
    import argparse

    from dream.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        assert all(action.help for action in parser._actions), f"dream {name}: a flag without help"
    text = " ".join(commands.choices["train"].format_help().split("show this help message and exit")[1].split())
    for flag, shown in [("--batch-size BATCH_SIZE", "(default: 128)"),
                        ("--weight-decay WEIGHT_DECAY", "(default: 0.0)"), ("--lr LR", "(default: 0.0002)")]:
        assert shown in text.split(flag, 1)[1].split(" --", 1)[0], flag
    assert "(default: None)" not in text and "(default: False)" not in text


def test_train_defaults_are_the_seeds_recipe(monkeypatch, tmp_path):
    """`dream train` with no flags: the seed's recipe (batch 128, AdamW lr 2e-4, 100 epochs, clipping 1.0,
    EMA 0.9999, cosine T = 1000, the seed objective from epoch 10 with lambda_max 0.5, alpha 0.7, a 20-epoch
    ramp), the same as TrainConfig's and ObjectiveConfig's defaults (the flags repeat them)."""
    from dream.objectives import ObjectiveConfig
    from dream.train import TrainConfig

    seen = []
    monkeypatch.setattr("dream.train.train", lambda config, resume=None: seen.append(config) or {
        "last": {}, "step": 0, "epoch": 0, "checkpoint_dir": str(tmp_path), "grid": None})
    assert main(["train", "--run-dir", str(tmp_path)]) == 0
    config = seen[0]
    recipe = {"preset": "seed", "batch_size": 128, "lr": 2e-4, "weight_decay": 0.0, "epochs": 100, "grad_clip": 1.0,
              "ema_decay": 0.9999, "ema_warmup": False, "schedule": "cosine", "num_timesteps": 1000,
              "objective": "seed", "precision": "auto", "micro_batch": None, "max_steps": None}
    assert {key: getattr(config, key) for key in recipe} == recipe
    assert {key: getattr(TrainConfig(), key) for key in recipe} == recipe
    objective = ObjectiveConfig(**config.objective_config)
    assert objective == ObjectiveConfig()
    assert (objective.dream_start_epoch, objective.lambda_max, objective.alpha, objective.ramp_epochs,
            objective.seed_separate_eps_forward, objective.paper_power, objective.paper_loss) == (
            10, 0.5, 0.7, 20.0, False, 1.0, "mse")
    assert config.model_overrides == {}


def test_train_flags_reach_the_config_and_their_defaults_are_the_configs(monkeypatch, tmp_path):
    """Every `dream train` flag is handed to TrainConfig (none silently dropped), and with no flags the config
    is TrainConfig's own defaults, not only the recipe's fields (--checkpointing none, --data-on auto, ...)."""
    from dataclasses import asdict

    from dream.objectives import ObjectiveConfig
    from dream.train import TrainConfig

    seen = []
    monkeypatch.setattr("dream.train.train", lambda config, resume=None: seen.append((config, resume)) or {
        "last": {}, "step": 0, "epoch": 0, "checkpoint_dir": str(tmp_path), "grid": None})
    assert main(["train", "--run-dir", str(tmp_path)]) == 0
    default = asdict(seen[0][0])
    assert ObjectiveConfig(**default.pop("objective_config")) == ObjectiveConfig()
    expected = asdict(TrainConfig(run_dir=str(tmp_path)))
    expected.pop("objective_config")
    assert default == expected

    flags = ["--run-dir", str(tmp_path / "r"), "--resume", "x.pt", "--preset", "tiny", "--image-size", "16",
             "--base-channels", "16", "--dropout", "0.2", "--backend", "sdpa", "--checkpointing", "attention",
             "--compile", "--cuda-graphs", "--no-channels-last", "--objective", "paper", "--dream-start-epoch", "3",
             "--lambda-max", "0.25", "--alpha", "0.6", "--ramp-epochs", "7", "--seed-separate-eps-forward",
             "--paper-power", "2", "--paper-loss", "l1", "--schedule", "linear", "--timesteps", "500",
             "--data", "folder", "--data-root", "/data", "--data-split", "valid", "--data-count", "64",
             "--data-on", "host", "--batch-size", "32", "--micro-batch", "8", "--memory-budget", "7GiB",
             "--max-bad-steps", "9", "--epochs", "3", "--max-steps", "11", "--lr", "1e-3", "--weight-decay", "0.01",
             "--grad-clip", "0.5", "--ema-decay", "0.99", "--ema-warmup", "--precision", "fp16", "--device", "cpu",
             "--seed", "4", "--log-every", "2", "--checkpoint-every", "3", "--checkpoint-keep", "4",
             "--sample-every", "5", "--sample-count", "6", "--sample-steps", "7", "--no-progress"]
    assert main(["train", *flags]) == 0
    config, resume = seen[1]
    assert resume == "x.pt"
    given = {"run_dir": str(tmp_path / "r"), "preset": "tiny",
             "model_overrides": {"image_size": 16, "base_channels": 16, "dropout": 0.2}, "backend": "sdpa",
             "checkpointing": "attention", "compile": True, "cuda_graphs": True, "channels_last": False,
             "schedule": "linear", "num_timesteps": 500, "objective": "paper",
             "objective_config": {"dream_start_epoch": 3, "lambda_max": 0.25, "alpha": 0.6, "ramp_epochs": 7.0,
                                  "seed_separate_eps_forward": True, "paper_power": 2.0, "paper_loss": "l1"},
             "data": "folder", "data_root": "/data", "data_split": "valid", "data_count": 64, "data_on": "host",
             "batch_size": 32, "micro_batch": 8, "memory_budget": 7 * 2**30, "epochs": 3, "max_steps": 11,
             "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 0.5, "ema_decay": 0.99, "ema_warmup": True,
             "precision": "fp16", "max_bad_steps": 9, "seed": 4, "device": "cpu", "log_every": 2,
             "checkpoint_every": 3, "checkpoint_keep": 4, "sample_every": 5, "sample_count": 6, "sample_steps": 7,
             "progress": False}
    assert asdict(config) == given


def test_the_documented_edge_values_of_train_flags_are_accepted():
    """The ends of each range the flags' help and errors give are allowed: --grad-clip 0 (no clipping),
    --checkpoint-every 0, --sample-every 0, --max-steps 0, --weight-decay 0, --ema-decay 0 and 1, --alpha 0 and 1,
    --lambda-max 0 and 1, --dream-start-epoch 0."""
    from dream.train import TrainConfig

    TrainConfig(grad_clip=0.0, checkpoint_every=0, sample_every=0, max_steps=0, weight_decay=0.0, ema_decay=0.0,
                objective_config={"alpha": 0.0, "lambda_max": 1.0, "dream_start_epoch": 0}).check()
    TrainConfig(ema_decay=1.0, objective_config={"alpha": 1.0, "lambda_max": 0.0}).check()


@pytest.mark.parametrize("args,message", [
    (["train", "--data", "folder", "--data-root", "/nonexistent/faces"], "/nonexistent/faces does not exist"),
    (["train", "--data", "celeba", "--data-root", "/nonexistent/celeba"], "CelebA not found"),
    (["train", "--data", "folder"], "needs --data-root"),
    (["train", "--preset", "tiny", "--base-channels", "20"], "num_groups"),
    (["sample", "/nonexistent/ckpt.pt"], "does not exist"),
    (["sample", "/nonexistent/ckpt.pt", "--device", "bogus"], "unknown device 'bogus'"),
    # before the Inception weights
    (["eval", "/nonexistent/ckpt.pt"], "checkpoint /nonexistent/ckpt.pt does not exist"),
    (["info", "--preset", "huge"], "unknown model preset"),
    (["train", "--backend", "triton", "--device", "cpu"], "TRITON_INTERPRET=1"),
    (["train", "--preset", "tiny", "--log-every", "0"], "--log-every must be a positive integer, got 0"),
    (["train", "--preset", "tiny", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["train", "--preset", "tiny", "--sample-steps", "0"], "--sample-steps must be a positive integer, got 0"),
    (["train", "--preset", "tiny", "--seed", "-3"], "--seed must be an integer in [0, 4294967295], got -3"),
    (["train", "--preset", "tiny", "--run-dir", "/etc/passwd"], "--run-dir /etc/passwd is a file"),
    (["train", "--preset", "tiny", "--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    (["train", "--backend", "foo"], "invalid choice: 'foo'"),  # argparse's errors too: one line, no usage block
    (["train", "--memory-budget", "6.8"], "memory size '6.8' has no unit"),
    (["memory", "--budget", "-1"], "memory size '-1' must be positive"),
    (["profile", "--top", "0"], "--top must be at least 1"),
    (["info", "--preset", "tiny", "--image-size", "100000"],
     "image size 100000 is too large to describe: the model's tensor sizes overflow 64-bit integers"),
    (["memory", "--preset", "tiny", "--budget", "1e400"], "memory size '1e400' must be finite"),
])
def test_bad_input_is_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--timesteps", "1"], "--timesteps must be in [2, 1000000], got 1"),
    (["--timesteps", "1000000000"], "--timesteps must be in [2, 1000000], got 1000000000"),  # (14 tables of T)
    (["--data-count", "0"], "--data-count must be a positive integer, got 0"),
    (["--data-count", "1000000000"], "1000000000 synthetic images of 64×64 take 12,288.0 GB, more "
                                     "than this machine's"),
    (["--data-root", "/tmp"], "--data-root names CelebA's root or a folder of images, which --data synthetic (the "
                              "built-in faces) does not read: pass --data celeba or --data folder too"),
    (["--data", "folder", "--data-root", "/tmp", "--data-split", "valid"],
     "--data-split picks a CelebA split, which --data folder does not have: pass --data celeba, or leave "
     "--data-split out"),
    (["--image-size", "30"], "--image-size 30 must be divisible by 8"),
    (["--base-channels", "0"], "--base-channels must be a positive integer, got 0"),
])
def test_train_schedule_data_and_model_errors_name_the_flag(tmp_path, capsys, flags, message):
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dream train: error: {message}") and err.count("\n") == 1 and err.endswith("\n")


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch):
    """`--out=~/samples`: the shell leaves that ~ alone; dream reads it as the home folder, as the user means (it
    made ./~/samples). The trainer expands its run folder itself too (API callers)."""
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=1)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["sample", str(checkpoint), "--out=~/samples", "--count", "1", "--batch-size", "1", "--steps", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (home / "samples" / "000000.png").is_file() and not (cwd / "~").exists()
    assert main(["train", "--run-dir=~/run", "--preset", "tiny", "--image-size", "8", "--base-channels", "16",
                 "--data-count", "4", "--batch-size", "4", "--max-steps", "1", "--sample-every", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    assert (home / "run" / "checkpoints").is_dir() and not (cwd / "~").exists()
    assert json.loads((home / "run" / "config.json").read_text())["run_dir"] == str(home / "run")


@pytest.mark.parametrize("rank, shared, printed", [
    ("0", True, "dream train: error: --log-every must be a positive integer, got 0"),
    ("1", True, None),  # every rank raises it alike: rank 0 reports it
    ("1", False, "dream train (rank 1): error: image /data/x.png cannot be read"),
])
def test_under_torchrun_rank_0_speaks_for_errors_every_rank_shares(monkeypatch, capsys, rank, shared, printed):
    import dream.cli
    from dream.errors import DreamError, option_error

    def failing(args):
        raise option_error("log_every", "a positive integer", 0) if shared else \
            DreamError("image /data/x.png cannot be read")

    monkeypatch.setattr(dream.cli, "run_train", failing)
    monkeypatch.setenv("RANK", rank)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == (printed + "\n" if printed else "")


def test_sample_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    result = run_cli("sample", str(bad), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a dream checkpoint or export" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_path_that_cannot_be_used_is_one_line(tmp_path):
    """Filesystem errors (here --out inside a file) are one line with exit 2, like other bad input."""
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=1)
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    result = run_cli("sample", str(checkpoint), "--out", str(taken / "images"), "--count", "1", "--steps", "1")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "Not a directory" in lines[0] and str(taken) in lines[0]


@pytest.mark.parametrize("command", ["train", "sample"])
def test_triton_bf16_on_a_cpu_is_one_line(tmp_path, command):
    """The Triton interpreter gets bf16 wrong: refused before any work, not as a traceback from a kernel."""
    from conftest import make_tiny_checkpoint

    if command == "train":
        args = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                "--backend", "triton", "--precision", "bf16"]
    else:
        args = ["sample", str(make_tiny_checkpoint(tmp_path, step=1)), "--out", str(tmp_path / "out"),
                "--device", "cpu", "--backend", "triton", "--bf16"]
    result = subprocess.run([sys.executable, "-m", "dream", *args], capture_output=True, text=True,
                            env={**ENV, "TRITON_INTERPRET": "1"}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "whose bf16 is wrong" in lines[0]
    assert not (tmp_path / ("run" if command == "train" else "out")).exists()  # refused before any work


def test_triton_backend_without_an_importable_triton_is_one_line(tmp_path):
    """A triton that does not import (missing, or broken) is named in one line with what to do instead."""
    blocker = tmp_path / "shadow"
    blocker.mkdir()
    (blocker / "triton.py").write_text("raise ImportError('No module named triton (test)')\n")
    args = ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--device", "cpu",
            "--backend", "triton", "--data-count", "8", "--batch-size", "4", "--max-steps", "1"]
    env = {**ENV, "TRITON_INTERPRET": "1", "PYTHONPATH": str(blocker) + os.pathsep + ENV["PYTHONPATH"]}
    result = subprocess.run([sys.executable, "-m", "dream", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "needs the Triton kernels, which do not import: No module named triton (test)" in lines[0]
    assert "--backend eager or sdpa" in lines[0]


def test_ddpm_refuses_a_step_count(tmp_path):
    """--steps belongs to DDIM; the ddpm sampler always runs all T steps and says so instead of ignoring it."""
    from conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, step=1)
    result = run_cli("sample", str(checkpoint), "--out", str(tmp_path / "out"), "--sampler", "ddpm", "--steps", "5")
    assert result.returncode == 2 and "the ddpm sampler runs all" in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_train_then_sample_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--preset", "tiny", "--image-size", "16", "--run-dir", str(run), "--data-count", "32",
                     "--batch-size", "8", "--max-steps", "3", "--sample-count", "4", "--sample-steps", "3",
                     "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "done: step 3" in result.stdout
    assert list((run / "samples").glob("grid-*.png"))
    out = tmp_path / "samples"
    result = run_cli("sample", str(run), "--out", str(out), "--count", "3", "--steps", "2", "--batch-size", "2",
                     "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "grid.png").exists()
    assert f"{out}: images 0-2 (3 made now, 0 already there) from the EMA weights of step 3 (" in result.stdout
    written = (out / "000002.png").stat().st_mtime_ns
    result = run_cli("sample", str(run), "--out", str(out), "--count", "5", "--steps", "2", "--batch-size", "2",
                     "--device", "cpu", "--no-progress")  # batch 1 (images 2, 3) is sampled again; 3 is new
    assert result.returncode == 0, result.stderr
    assert "images 0-4 (2 made now, 3 already there)" in result.stdout
    assert (out / "000002.png").stat().st_mtime_ns == written, "an image already there is not written again"


@pytest.mark.parametrize("command", ["train", "sample", "eval", "profile"])
def test_autotune_kernels_flag_turns_kernel_autotuning_on(monkeypatch, capsys, command):
    """--autotune-kernels sets DREAM_KERNEL_AUTOTUNE=1 (kernels.autotune reads it at each launch) before the
    command runs; without it the variable is left as it was."""
    import dream.cli as cli

    seen = []
    handler = {"train": "run_train", "sample": "run_sample", "eval": "run_eval", "profile": "run_profile"}[command]
    monkeypatch.setattr(cli, handler, lambda args: seen.append(os.environ.get("DREAM_KERNEL_AUTOTUNE")) or 0)
    monkeypatch.setenv("DREAM_KERNEL_AUTOTUNE", "")  # so that undoing deletes what main sets
    monkeypatch.delenv("DREAM_KERNEL_AUTOTUNE")
    required = {"sample": ["ckpt.pt"], "eval": ["ckpt.pt"]}.get(command, [])
    assert main([command, *required]) == 0
    assert "tuned" not in capsys.readouterr().err
    assert main([command, *required, "--autotune-kernels"]) == 0
    assert seen == [None, "1"]
    notice = capsys.readouterr().err.strip()
    expected = "dream: Triton kernel launch configurations are tuned" if torch.cuda.is_available() else \
        "dream: --autotune-kernels has no effect without a GPU"
    assert notice.startswith(expected) and "\n" not in notice


def test_profile_on_cpu_writes_its_reports_and_no_profiler_noise(tmp_path):
    """`dream profile` end to end on CPU: a CPU-labelled report per step kind with its top operators and a
    trace; stderr holds only the command's own lines (libkineto's "gpuGetDeviceCount failed", STAGE and
    USDT lines are silenced where there is no GPU)."""
    import gzip

    result = run_cli("profile", "--preset", "tiny", "--image-size", "8", "--base-channels", "16", "--steps", "2",
                     "--warmup", "1", "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if line.split(":")[0] in ("ERROR", "STAGE", "USDT")], \
        result.stderr
    for what in ("train", "sample"):
        [report] = (tmp_path / "cpu").glob(f"*-profile-{what}.json")
        data = json.loads(report.read_text())
        assert data["summary"]["steps"] == 2 and data["summary"]["step_ms"] > 0
        assert data["summary"]["top_ops"] and data["summary"]["kernels"] == 0
        assert len(data["summary"]["wall_ms"]) == 2  # the recorded steps, not the warm-up one
        # batch 2 (the CPU default) per step; a sampling step stands for 1/1000 of a DDPM run
        per_image_run = 1000 if what == "sample" else 1
        assert data["summary"]["images_per_s"] == pytest.approx(2e3 / data["summary"]["step_ms"] / per_image_run)
        markdown = report.with_suffix(".md").read_text()
        assert "**CPU figures**" in markdown and "aten::" in markdown
        trace = json.loads(gzip.decompress(report.with_name(report.name.replace(".json", ".trace.json.gz"))
                                           .read_bytes()))
        assert trace["traceEvents"]


def test_the_sigterm_handler_is_put_back_after_a_command(capsys):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_warning_text_prints_once_per_command(tmp_path):
    # Python's filter shows a text once per place that warns, and forgets what it showed whenever a library
    # changes the filters (torch-fidelity does, between eval's two scans of the real folder)
    script = """
import sys, warnings
from pathlib import Path
from dream.cli import _warnings_as_lines
from dream.data import dataset_files
with _warnings_as_lines("eval"):
    for scan in range(2):
        dataset_files("folder", Path(sys.argv[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
    warnings.warn("not dream's")
    warnings.warn("not dream's either")
"""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "000000.png")
    (tmp_path / "samples" / "sampling.json").write_text(json.dumps({"sampler": "ddim", "seed": 0}))
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("dream eval: warning:")] == [
        f"dream eval: warning: left out 1 folder(s) under {tmp_path} that dream wrote images into (runs, sample "
        "sets): samples"]
    assert sum("UserWarning: not dream's" in line for line in lines) == 2


def test_the_top_level_help_names_every_command():
    from dream.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert all(name in parser.description for name in commands), parser.description


def test_a_model_override_of_zero_is_kept(monkeypatch, tmp_path):
    """`--dropout 0` overrides the preset's dropout (a zero is a value, not a flag left out)."""
    seen = []
    monkeypatch.setattr("dream.train.train", lambda config, resume=None: seen.append(config) or {
        "last": {}, "step": 0, "epoch": 0, "checkpoint_dir": str(tmp_path), "grid": None})
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path), "--dropout", "0"]) == 0
    assert seen[0].model_overrides == {"dropout": 0.0}


def test_an_argparse_error_is_one_line_that_points_at_the_commands_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sample", "ckpt.pt", "--sampler", "euler"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dream sample: error: argument --sampler: invalid choice: 'euler'")
    assert err.endswith(" (see dream sample --help)\n")


@pytest.mark.parametrize("flag", ["--memory-budget", "--budget"])
def test_a_negative_size_after_either_budget_flag_is_refused_for_its_sign(capsys, flag):
    """`--memory-budget -1GB` is read as the flag's value and refused for its sign, as `--budget -1GB` is (not
    "expected one argument"); an option after the flag stays an option."""
    from dream.cli import _attach_negative_sizes

    command = "train" if flag == "--memory-budget" else "memory"
    with pytest.raises(SystemExit) as stop:
        main([command, flag, "-1GB"])
    assert stop.value.code == 2 and "memory size '-1GB' must be positive" in capsys.readouterr().err
    assert _attach_negative_sizes([command, flag, "--json"]) == [command, flag, "--json"]


def test_sample_passes_its_flags_on_and_names_the_weights_it_used(monkeypatch, capsys, tmp_path):
    """`dream sample` hands --no-ema, --bf16, --graphs, --channels-last and the counts to the sampler, and its
    last line says which images were made now, which were there, and from which weights."""
    import dream.sample

    calls = []

    def sampled(checkpoint, out_dir, **kwargs):
        calls.append(kwargs)
        count = kwargs["count"]
        return {"out_dir": out_dir, "count": count, "made": count - 1, "ema": kwargs["use_ema"], "step": 7,
                "checkpoint": str(tmp_path / "ckpt.pt"), "grid": str(tmp_path / "out" / "grid.png"),
                "processes": 1 if count < 4 else 2}

    monkeypatch.setattr(dream.sample, "sample_from_checkpoint", sampled)
    common = ["sample", "ckpt.pt", "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "3"]
    assert main([*common, "--count", "1", "--no-ema", "--bf16", "--graphs", "off", "--channels-last"]) == 0
    out = tmp_path / "out"
    assert capsys.readouterr().out == (f"{out}: image 0 (0 made now, 1 already there) from the raw weights of step 7 "
                                       f"({tmp_path / 'ckpt.pt'}); grid {out / 'grid.png'}\n")
    assert main([*common, "--count", "4", "--no-channels-last"]) == 0
    assert (f"{tmp_path / 'out'}: images 0-3 (3 made now by 2 processes, 1 already there) from the EMA weights of "
            f"step 7") in capsys.readouterr().out
    first, second = calls
    assert (first["use_ema"], first["dtype"], first["graphs"], first["channels_last"]) == (
        False, torch.bfloat16, False, True)
    assert (second["use_ema"], second["dtype"], second["graphs"], second["channels_last"]) == (
        True, torch.float32, None, False)
    assert (second["count"], second["batch_size"], second["backend"]) == (4, 3, "eager")


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("kind", ["interrupt", "error"])
def test_a_stop_on_a_worker_rank_is_said_once(monkeypatch, capsys, shared, kind):
    """Under torchrun, a stop every rank sees (a signal to the job, a bad flag) is said by rank 0 alone, the other
    ranks leaving silently a moment later (torchrun stops the job as soon as one process exits: rank 0 must have
    said it by then); one that only this rank sees carries its rank, at once."""
    import dream.cli
    from dream.errors import DreamError

    def stopped(args):
        stop = KeyboardInterrupt() if kind == "interrupt" else DreamError("a bad flag")
        stop.same_on_every_rank = shared
        raise stop

    waits = []
    monkeypatch.setattr(dream.cli, "run_sample", stopped)
    monkeypatch.setattr(dream.cli, "let_rank_0_speak", lambda: waits.append(1))
    monkeypatch.setenv("RANK", "1")
    assert main(["sample", "ckpt.pt"]) == (130 if kind == "interrupt" else 2)
    line = ("dream sample (rank 1): interrupted; rerun the same command to go on (finished images are kept)\n"
            if kind == "interrupt" else "dream sample (rank 1): error: a bad flag\n")
    assert capsys.readouterr().err == ("" if shared else line)
    assert waits == ([1] if shared else [])
    assert dream.cli.RANK_0_GRACE_S >= 0.5  # several polls of torchrun's (every 0.1 s)


def test_a_silent_rank_stopped_while_it_lets_rank_0_speak_leaves_quietly(monkeypatch):
    """torchrun sends SIGTERM to the other ranks once rank 0 has exited: the wait ends there, without a traceback."""
    import time

    import dream.cli

    def stopped(seconds):
        assert seconds == dream.cli.RANK_0_GRACE_S
        raise dream.cli.Terminated

    monkeypatch.setattr(time, "sleep", stopped)
    dream.cli.let_rank_0_speak()


def test_dream_debug_shows_the_traceback_instead_of_the_line(monkeypatch):
    import dream.cli
    from dream.errors import DreamError

    def failing(args):
        raise DreamError("a bad flag")

    monkeypatch.setattr(dream.cli, "run_train", failing)
    monkeypatch.setenv("DREAM_DEBUG", "1")
    with pytest.raises(DreamError, match="a bad flag"):
        main(["train"])


def test_the_callers_own_sigterm_handler_is_put_back(capsys):
    import signal

    def own_handler(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own_handler)
    try:
        assert main(["info", "--preset", "tiny", "--json"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_command_run_from_another_thread_leaves_signals_alone(capsys):
    """Only the main thread may install signal handlers: main() called from a worker thread still runs."""
    import threading

    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(["info", "--preset", "tiny", "--json"])))
    worker.start()
    worker.join()
    assert codes == [0] and json.loads(capsys.readouterr().out)["parameters"] > 0


def test_info_without_json_is_a_table(capsys):
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    parameters = json.loads(capsys.readouterr().out)["parameters"]
    assert main(["info", "--preset", "tiny"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"preset tiny: {parameters:,} parameters") and "conv_in" in text


@pytest.mark.parametrize("name, message", [
    ("cuda:2", "device 'cuda:2' was asked for, but this machine has 2 CUDA devices (cuda:0 to cuda:1)"),
    ("cuda:0", None), ("cuda", None), ("cuda:1", None),
])
def test_a_cuda_device_index_beyond_the_machines_is_one_line(monkeypatch, name, message):
    """Checked where the device is resolved (every command), not left to the first tensor moved there. CUDA is
    faked: 2 devices."""
    from dream.errors import DreamError
    from dream.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    if message is None:
        assert resolve_device(name) == torch.device(name)
    else:
        with pytest.raises(DreamError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
            resolve_device(name)


def test_info_table_rows_are_the_blocks_of_the_json(capsys):
    """`dream info` without --json: a head line naming the preset, its parameters, its forward GFLOP and the image
    size asked for, then one row per block with the JSON's name, type, output shape, parameters and GFLOP."""
    assert main(["info", "--preset", "tiny", "--image-size", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["info", "--preset", "tiny", "--image-size", "16"]) == 0
    head, _, table = capsys.readouterr().out.partition("\n\n")
    assert head == (f"preset tiny: {info['parameters']:,} parameters, {info['gflops_forward_per_image']:.2f} GFLOP "
                    f"forward per 16px image")
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [(row[0], row[1], row[2], int(row[3].replace(",", "")), float(row[4])) for row in rows] == [
        (b["block"], b["type"], b["shape"], b["parameters"], pytest.approx(b["gflops"], abs=5e-4))
        for b in info["blocks"]]


def test_info_counts_a_convolution_as_two_flops_per_multiply_add_of_one_image():
    """A k×k convolution from C_in to C_out channels with H×W outputs costs 2·k²·C_in·C_out·H·W FLOPs per image (a
    multiply and an add each): the input convolution and the first downsampling (stride 2), counted per block, and
    the blocks add up to the model's total."""
    from dream.info import model_info

    size = 16
    info = model_info("tiny", image_size=size)
    assert info["config"]["image_size"] == size
    blocks = {block["block"]: block for block in info["blocks"]}
    c_in, base = info["config"]["in_channels"], info["config"]["base_channels"]
    assert blocks["conv_in"]["gflops"] * 1e9 == pytest.approx(2 * 9 * c_in * base * size * size, rel=1e-12)
    assert blocks["down.0.downsample"]["gflops"] * 1e9 == pytest.approx(2 * 9 * base * base * (size // 2) ** 2,
                                                                          rel=1e-12)
    assert sum(block["gflops"] for block in info["blocks"]) == pytest.approx(info["gflops_forward_per_image"],
                                                                           rel=1e-9)


def test_a_flag_whose_help_names_its_default_does_not_repeat_it():
    """--help adds "(default: X)" to a flag's text unless the text already says what the default is (export
    --weights: "(default)", memory --target: "default: CUDA's")."""
    import argparse

    from dream.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in commands.choices.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            shown = formatter._get_help_string(action) or ""  # (argparse fills %(default)s in later)
            said = "default" in (action.help or "")
            assert not (said and "%(default)s" in shown), f"dream {name} {action.option_strings}: {shown}"
    export = " ".join(commands.choices["export"].format_help().split())
    assert "raw training weights" in export and "(default: ema)" not in export


@pytest.mark.parametrize("argv, name, under_home", [
    (["train", "--run-dir=~/run"], "run_dir", "run"),
    (["train", "--resume=~/run/ckpt.pt"], "resume", "run/ckpt.pt"),
    (["train", "--data", "folder", "--data-root=~/faces"], "data_root", "faces"),
    (["sample", "~/run", "--out", "out"], "checkpoint", "run"),
    (["sample", "ckpt.pt", "--out=~/samples"], "out", "samples"),
    (["eval", "ckpt.pt", "--real-root=~/faces"], "real_root", "faces"),
    (["eval", "ckpt.pt", "--inception-weights=~/inception.pth"], "inception_weights", "inception.pth"),
    (["eval", "ckpt.pt", "--cache-dir=~/cache"], "cache_dir", "cache"),
    (["export", "~/run", "--out=~/ema.safetensors"], "out", "ema.safetensors"),
])
def test_every_path_flag_reads_a_leading_tilde_as_the_home_folder(monkeypatch, tmp_path, argv, name, under_home):
    """The shell leaves a ~ after "=" (or quoted) alone; every flag naming a path reads it as the home folder."""
    import dream.cli

    seen = []
    handler = {"train": "run_train", "sample": "run_sample", "eval": "run_eval", "export": "run_export"}[argv[0]]
    monkeypatch.setattr(dream.cli, handler, lambda args: seen.append(args) or 0)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(argv) == 0
    assert getattr(seen[0], name) == str(tmp_path / under_home)


def test_a_negative_size_without_a_leading_zero_is_refused_for_its_sign(capsys):
    """'.5GB' is a size parse_bytes reads, so '-.5GB' after --budget is refused for its sign as '-0.5GB' is."""
    with pytest.raises(SystemExit) as stop:
        main(["memory", "--budget", "-.5GB"])
    assert stop.value.code == 2 and "memory size '-.5GB' must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("error", [DreamError("no such run"), ValueError("a bad value"),
                                   PermissionError(13, "Permission denied", "/runs/x")],
                         ids=["DreamError", "ValueError", "OSError"])
def test_an_error_in_what_the_user_gave_is_one_line_with_status_2(monkeypatch, capsys, error):
    """Errors of the input, values and the file system (a path that is a file, permissions, a full disk) are one
    line naming the command, not a traceback."""
    import dream.cli

    def failing(args):
        raise error

    monkeypatch.setattr(dream.cli, "run_export", failing)
    assert main(["export", "run", "--out", "x.safetensors"]) == 2
    assert capsys.readouterr().err == f"dream export: error: {error}\n"


@pytest.mark.parametrize("command, argv, kept", [
    ("train", [], "checkpoints already written are kept"),
    ("sample", ["ckpt.pt"], "finished images are kept"),
    ("eval", ["ckpt.pt"], "finished images and cached statistics are kept"),
    ("export", ["ckpt.pt", "--out", "x.safetensors"], None),
])
def test_an_interrupt_says_how_to_go_on_and_what_is_kept(monkeypatch, capsys, command, argv, kept):
    """Ctrl-C outside training's own handler: exit 130 and one line; a command that goes on where it stopped says
    so, and what it keeps."""
    import dream.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dream.cli, f"run_{command}", interrupted)
    assert main([command, *argv]) == 130
    rest = f"; rerun the same command to go on ({kept})" if kept else ""
    assert capsys.readouterr().err == f"dream {command}: interrupted{rest}\n"


@pytest.mark.parametrize("count, images", [(1, "image 0"), (2, "images 0-1"), (3, "images 0-2")])
def test_sample_names_the_range_of_images_it_holds(monkeypatch, capsys, tmp_path, count, images):
    import dream.sample

    def sampled(checkpoint, out_dir, **kwargs):
        return {"out_dir": out_dir, "count": kwargs["count"], "made": kwargs["count"], "ema": True, "step": 7,
                "checkpoint": "ckpt.pt", "grid": "grid.png", "processes": 1}

    monkeypatch.setattr(dream.sample, "sample_from_checkpoint", sampled)
    assert main(["sample", "ckpt.pt", "--out", str(tmp_path), "--device", "cpu", "--count", str(count)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}: {images} ({count} made now, 0 already there)")


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, capsys, tmp_path):
    """`dream info | head -1`, the reader gone: exit 1, nothing on stderr, and stdout sent to /dev/null (Python's
    flush of it at exit would fail again)."""
    import dream.cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(dream.cli, "run_info", broken)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["info"]) == 1
        assert os.path.samestat(os.fstat(stdout.fileno()), os.stat(os.devnull))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("last, grid, said", [
    ({"loss": 0.123456}, "/r/samples/grid-1.png", "done: step 5, epoch 1, loss 0.1235; checkpoints in /r/checkpoints; "
                                                   "samples /r/samples/grid-1.png"),
    ({}, None, "done: step 5, epoch 1, no step left to run; checkpoints in /r/checkpoints"),
])
def test_train_ends_with_a_line_of_its_last_step(monkeypatch, capsys, last, grid, said):
    """The last line: the step and epoch reached, the last record's loss (or that no step was left to run, a run
    already at --max-steps), where the checkpoints and the last sample grid are."""
    monkeypatch.setattr("dream.train.train", lambda config, resume=None: {
        "last": last, "step": 5, "epoch": 1, "checkpoint_dir": "/r/checkpoints", "grid": grid})
    assert main(["train", "--run-dir", "/r"]) == 0
    assert capsys.readouterr().out == said + "\n"


@pytest.mark.parametrize("rank, err", [("0", "dream train: stopped by SIGTERM at step 4; checkpoint saved\n"),
                                       ("1", "")])
def test_a_stopped_training_exits_with_its_signals_status(monkeypatch, capsys, rank, err):
    """Training stopped by a signal (its checkpoint saved) exits 128 + the signal's number; under torchrun rank 0
    says so, the other ranks leave silently after letting it speak."""
    import signal

    import dream.cli
    from dream.train import Interrupted

    def stopped(config, resume=None):
        raise Interrupted("stopped by SIGTERM at step 4; checkpoint saved", signal.SIGTERM)

    waits = []
    monkeypatch.setattr("dream.train.train", stopped)
    monkeypatch.setattr(dream.cli, "let_rank_0_speak", lambda: waits.append(1))
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "--run-dir", "/r"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == err and waits == ([] if rank == "0" else [1])


def test_the_autotune_notice_is_rank_0s_alone(monkeypatch, capsys):
    """Under torchrun every rank reads --autotune-kernels; one line is enough."""
    import dream.cli

    monkeypatch.setattr(dream.cli, "run_train", lambda args: 0)
    monkeypatch.setenv("DREAM_KERNEL_AUTOTUNE", "")  # so that undoing deletes what main sets
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--autotune-kernels"]) == 0
    assert capsys.readouterr().err == "" and os.environ["DREAM_KERNEL_AUTOTUNE"] == "1"


@pytest.mark.parametrize("outcome", ["returns", "raises"])
def test_warnings_print_as_pythons_again_after_a_command(monkeypatch, outcome):
    """Inside a command the project's warnings are `dream <command>: warning:` lines; a caller of main() gets
    Python's own warning functions back, however the command ended."""
    import warnings

    import dream.cli

    def command(args):
        if outcome == "raises":
            raise DreamError("a bad flag")
        return 0

    monkeypatch.setattr(dream.cli, "run_info", command)
    before = (warnings.formatwarning, warnings.showwarning)
    main(["info"])
    assert (warnings.formatwarning, warnings.showwarning) == before
