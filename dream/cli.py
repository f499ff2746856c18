"""The `dream` command: train, sample, eval, export, info, memory, profile.

Errors in what the user gave (paths, flags, data) are printed as one line and exit with status 2;
set DREAM_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from dream.errors import DreamError, Stopped


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="seed", help="model preset: seed (54.85M parameters) or tiny (3.44M)")
    p.add_argument("--image-size", type=int, help="override the preset's image size")
    p.add_argument("--base-channels", type=int, help="override the preset's base channel count")
    p.add_argument("--dropout", type=float, help="override the preset's dropout")


def add_autotune_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autotune-kernels", action="store_true",
                   help="triton backend on a GPU: time each kernel problem's launch configurations on first use "
                        "and keep the fastest (cached in $DREAM_CACHE/kernel-autotune.json; the same as "
                        "DREAM_KERNEL_AUTOTUNE=1)")


def model_overrides(args) -> dict:
    return {k: v for k, v in {"image_size": args.image_size, "base_channels": args.base_channels,
                              "dropout": args.dropout}.items() if v is not None}


def memory_size(text: str) -> int:
    """argparse type of a memory budget: parse_bytes, refusing a negative size and a bare number below 1 MiB
    (bytes: surely a unit left out, as in 6.8 for 6.8GB)."""
    from dream.memory import parse_bytes

    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"memory size {text!r} must be positive, e.g. '6.8GB'")
    try:
        size = parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if text.strip()[-1:].isdigit() and size < 2**20:  # no unit: a parsed size ends in a digit only without one
        raise argparse.ArgumentTypeError(f"memory size {text!r} has no unit, so it means {size} bytes; "
                                         f"give one, e.g. '{text.strip()}GB'")
    return size


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each flag's default, unless the flag has none (None, False) or its help names it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineErrors(argparse.ArgumentParser):
    """An argparse parser whose errors (an unknown choice, a value of the wrong type) are one line, pointing
    at --help, instead of the whole usage block; its sub-command parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@contextmanager
def _warnings_as_lines(command: str):
    """Inside, the project's own warnings (a damaged checkpoint skipped, unreadable images) print as one
    `dream <command>: warning:` line, each text once (Python's filter shows a text once per place that warns;
    two places can warn of the same thing, as two scans of one folder); other libraries' keep Python's format."""
    package = Path(__file__).resolve().parent
    default_format, default_show = warnings.formatwarning, warnings.showwarning
    shown = set()

    def ours(filename) -> bool:
        return Path(filename).resolve().is_relative_to(package)

    def formatwarning(message, category, filename, lineno, line=None):
        if ours(filename):
            return f"dream {command}: warning: {message}\n"
        return default_format(message, category, filename, lineno, line)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if ours(filename):
            if str(message) in shown:
                return
            shown.add(str(message))
        default_show(message, category, filename, lineno, file, line)

    warnings.formatwarning, warnings.showwarning = formatwarning, showwarning
    try:
        yield
    finally:
        warnings.formatwarning, warnings.showwarning = default_format, default_show


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="dream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model (resumes when rerun with the same --run-dir)")
    add_model_flags(p)
    p.add_argument("--run-dir", default="runs/default", help="checkpoints, metrics.jsonl and sample grids go here")
    p.add_argument("--resume", help="resume from this checkpoint file instead of the newest in --run-dir")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "sdpa", "triton"],
                   help="UNet kernels: our Triton GroupNorm and attention, SDPA attention, or eager PyTorch; "
                        "auto: triton on CUDA, eager on CPU")
    p.add_argument("--checkpointing", "--checkpoint", default="none",
                   choices=["none", "norms", "attention", "resblocks", "all", "auto"],
                   help="activation (gradient) checkpointing policy: trades recomputation for memory (norms, "
                        "triton backend: recompute the fused norms feeding convolutions, one kernel each); auto: "
                        "with a memory budget, the least recomputation whose whole batch fits")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each step's device work (forward, backward, clipping, AdamW, EMA) as one CUDA "
                        "graph and replay it: no per-kernel launch cost on the host. CUDA, bf16 or fp32, one "
                        "process; 2 plain warm-up steps, then the capture, and again where the objective "
                        "changes with the epoch (seed: DREAM's start and each epoch of its ramp)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model (default: on CUDA, where cuDNN runs NHWC)")
    p.add_argument("--objective", default="seed", choices=["standard", "seed", "paper"],
                   help="standard: MSE on eps; seed: the seed's conservative DREAM; paper: DREAM as published")
    p.add_argument("--dream-start-epoch", type=int, default=10, help="seed objective: first epoch of the DREAM term")
    p.add_argument("--lambda-max", type=float, default=0.5, help="seed objective: the largest lambda_t")
    p.add_argument("--alpha", type=float, default=0.7,
                   help="seed objective: weight of the standard term (1 - alpha on the rectified one)")
    p.add_argument("--ramp-epochs", type=float, default=20.0, help="seed objective: epochs lambda_t takes to ramp up")
    p.add_argument("--seed-separate-eps-forward", action="store_true",
                   help="seed objective: spend a separate no-grad forward on eps_hat, as the seed does")
    p.add_argument("--paper-power", type=float, default=1.0, help="paper objective: lambda_t = sqrt(1-abar_t)^p")
    p.add_argument("--paper-loss", default="mse", choices=["mse", "l1"], help="paper objective: the loss")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "linear"],
                   help="noise schedule (linear: Ho et al.'s 1e-4 to 0.02 at T = 1000, scaled by 1000/T)")
    p.add_argument("--timesteps", type=int, default=1000, help="diffusion steps T")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "celeba", "folder"],
                   help="synthetic: built-in generated faces (no download); celeba or folder: need --data-root")
    p.add_argument("--data-root", help="CelebA root (the folder holding 'celeba') or an image folder")
    p.add_argument("--data-split", default="train", help="CelebA split: train, valid, test or all")
    p.add_argument("--data-count", type=int, default=4096, help="number of synthetic images")
    p.add_argument("--data-on", default="auto", choices=["auto", "device", "host"],
                   help="where the decoded images are kept: on the device (batches sliced there) or in host memory "
                        "(each batch copied over); auto: the device, unless the memory manager would then pick a "
                        "smaller micro-batch or more recomputation")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimizer step (over all ranks)")
    p.add_argument("--micro-batch", type=int, help="gradient accumulation: micro-batch size dividing --batch-size")
    p.add_argument("--memory-budget", type=memory_size,
                   help="bytes per device, e.g. 6.8GB (the seed's target) or 7GiB: use the largest micro-batch "
                        "whose estimated step fits, and cap the CUDA allocator there (a step past it halves the "
                        "micro-batch) (default on CUDA: the device's free memory, no cap)")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="non-finite steps in a row before restoring the last good checkpoint and stopping")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the data")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the weights used for sampling")
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(decay, (1 + step) / (10 + step)), for short runs")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision; auto: bf16 on CUDA where supported, else fp32")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto: cuda when present")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the noise")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between metrics.jsonl records (each holds the means over its steps)")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (0: only at the end and on a stop)")
    p.add_argument("--checkpoint-keep", type=int, default=3, help="checkpoints kept (the newest)")
    p.add_argument("--sample-every", type=int, default=1, help="epochs between sample grids (0: none)")
    p.add_argument("--sample-count", type=int, default=16, help="images in each sample grid (fixed noise, EMA)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the sample grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_autotune_flag(p)

    p = commands.add_parser("sample", help="generate images from a checkpoint",
                            description="Generate images from a checkpoint as numbered PNGs; rerunning goes on where "
                                        "it stopped. On several GPUs: torchrun --nproc-per-node N -m dream sample ... "
                                        "(the processes share the batches out; the images are the same).")
    from dream.sample import add_sampling_arguments

    add_sampling_arguments(p, count=64, batch_size=64, backend="auto", backends=["auto", "eager", "sdpa", "triton"],
                           count_help="number of images")
    p.add_argument("--out", default="samples", help="output folder for PNGs and grid.png")
    add_autotune_flag(p)

    p = commands.add_parser("eval", help="sample N images and compute FID, IS and KID (torch-fidelity)",
                            description="Sample N images with the EMA weights and score them with torch-fidelity "
                                        "against the real set. On several GPUs: torchrun --nproc-per-node N -m dream "
                                        "eval ... (the processes share the sampling; rank 0 scores the set).")
    from dream.evaluate import add_eval_arguments

    add_eval_arguments(p)
    add_autotune_flag(p)

    p = commands.add_parser("export", help="write a checkpoint's EMA (or raw) UNet weights as safetensors")
    p.add_argument("checkpoint", help="checkpoint file or run folder (its newest valid checkpoint)")
    p.add_argument("--out", required=True, help="the .safetensors file to write (sample and eval read it)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="ema: the EMA shadow that sampling uses (default); model: the raw training weights")

    p = commands.add_parser("info", help="parameters and FLOPs of a model preset")
    add_model_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("profile", help="torch.profiler over a training step and a sampling step")
    from dream.profile import add_profile_arguments

    add_profile_arguments(p)
    add_autotune_flag(p)

    p = commands.add_parser("memory", help="peak memory of one training step, estimated without a GPU")
    add_model_flags(p)
    p.add_argument("--batch-size", "--batch", type=int, default=128, help="images per optimizer step")
    p.add_argument("--micro-batch", type=int, help="gradient accumulation: micro-batch size dividing the batch")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--objective", default="seed", choices=["standard", "seed", "paper"], help="training objective")
    p.add_argument("--seed-separate-eps-forward", action="store_true",
                   help="seed objective: a separate no-grad forward for eps_hat, as the seed does")
    p.add_argument("--single-graph", action="store_true",
                   help="backpropagate the objective's loss once at the end instead of term by term")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "sdpa", "triton"],
                   help="UNet kernels; auto: triton for the CUDA target (what dream train runs there; eager if "
                        "Triton is not installed), eager for the CPU target")
    p.add_argument("--checkpointing", "--checkpoint", default=None,
                   choices=["none", "norms", "attention", "resblocks", "all", "auto"],
                   help="activation (gradient) checkpointing policy (norms: triton backend only; default none); "
                        "auto (with --budget): the policy and micro-batch dream train --checkpointing auto picks")
    p.add_argument("--sweep", action="store_true", help="every checkpointing policy, in one table")
    p.add_argument("--data-images", type=int, default=0,
                   help="count a uint8 training set of this many images (64x64: 12,288 bytes each) where --data-on "
                        "keeps it")
    p.add_argument("--data-on", default="auto", choices=["auto", "device", "host"],
                   help="where dream train keeps those images: on the device (counted), in host memory (not "
                        "counted); auto, as dream train: the device, unless with --budget and the CUDA target "
                        "the host leaves a larger micro-batch or less recomputation")
    p.add_argument("--target", default="cuda", choices=["cuda", "cpu"],
                   help="whose autocast and dropout rules the estimate follows (default: CUDA's)")
    p.add_argument("--budget", type=memory_size,
                   help="memory budget, e.g. 6.8GB: also report the largest micro-batch that fits")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="the model's memory format (default: channels_last for the CUDA target, as dream train)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the step as dream train --cuda-graphs takes it (its graph's input buffers beside the batch)")
    p.add_argument("--cuda", action="store_true", help="also measure the step on CUDA (max_memory_allocated)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (with peak_bytes; with --sweep, {\"sweep\": [one such per policy]})")
    for command in commands.choices.values():  # every subcommand's --help shows the defaults
        command.formatter_class = HelpFormatter
    return parser


def run_train(args) -> int:
    from dream.train import TrainConfig, train

    config = TrainConfig(
        run_dir=args.run_dir, preset=args.preset, model_overrides=model_overrides(args), backend=args.backend,
        checkpointing=args.checkpointing, compile=args.compile, cuda_graphs=args.cuda_graphs,
        channels_last=args.channels_last, schedule=args.schedule, num_timesteps=args.timesteps,
        objective=args.objective,
        objective_config={"dream_start_epoch": args.dream_start_epoch, "lambda_max": args.lambda_max,
                          "alpha": args.alpha, "ramp_epochs": args.ramp_epochs,
                          "seed_separate_eps_forward": args.seed_separate_eps_forward,
                          "paper_power": args.paper_power, "paper_loss": args.paper_loss},
        data=args.data, data_root=args.data_root, data_split=args.data_split, data_count=args.data_count,
        data_on=args.data_on, batch_size=args.batch_size, micro_batch=args.micro_batch, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, ema_warmup=args.ema_warmup, precision=args.precision, seed=args.seed,
        device=args.device,
        log_every=args.log_every, checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep,
        sample_every=args.sample_every, sample_count=args.sample_count, sample_steps=args.sample_steps,
        progress=not args.no_progress, memory_budget=args.memory_budget, max_bad_steps=args.max_bad_steps,
    )
    from dream.train import Interrupted, TrainingAborted

    try:
        result = train(config, resume=args.resume)
    except Interrupted as stop:  # SIGINT / SIGTERM: a checkpoint was saved; the last line says how to resume
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 saved and speaks
            say(f"dream train: {stop}")
        else:
            let_rank_0_speak()
        return 128 + int(stop.signum)
    except TrainingAborted as crash:  # the traceback of the cause (a bug's), then the line saying how to resume
        import traceback

        if crash.show_cause:
            traceback.print_exception(crash.__cause__)
        say(f"dream train{rank_label()}: error: {crash}")
        return 1
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = result["last"]
    loss = f"loss {last['loss']:.4f}" if "loss" in last else "no step left to run"
    print(f"done: step {result['step']}, epoch {result['epoch']}, {loss}; "
          f"checkpoints in {result['checkpoint_dir']}" + (f"; samples {result['grid']}" if result["grid"] else ""))
    return 0


def run_export(args) -> int:
    from dream.checkpoint import export_weights

    report = export_weights(args.checkpoint, args.out, args.weights)
    old = report["replaced"]
    print(f"{'replaced' if old else 'wrote'} {report['out']}: {report['weights']} weights of step "
          f"{report['step']}, {report['parameters']:,} "
          f"parameters in {report['tensors']} tensors, {report['bytes'] / 2**20:.1f} MiB (from {report['source']})"
          + (f"; it held the {old['weights']} weights of step {old['step']} from {old['source']}" if old else ""))
    return 0


def run_sample(args) -> int:
    import torch

    from dream.distributed import SAMPLING_TIMEOUT, agreed_setup, session
    from dream.sample import parse_graphs, sample_from_checkpoint
    from dream.train import resolve_backend, resolve_device

    with session(args.device, SAMPLING_TIMEOUT) as dist:  # under torchrun: the batches shared out
        with agreed_setup(dist):
            device = resolve_device(args.device, dist)
            backend = resolve_backend(args.backend, device)
        report = sample_from_checkpoint(args.checkpoint, args.out, count=args.count, sampler=args.sampler,
                                        steps=args.steps, eta=args.eta, batch_size=args.batch_size, seed=args.seed,
                                        device=device, use_ema=not args.no_ema, backend=backend,
                                        dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                        progress=not args.no_progress,
                                        graphs=parse_graphs(args.graphs),
                                        steps_per_graph=args.steps_per_graph, compile=args.compile,
                                        channels_last=args.channels_last, dist=dist)
    if not dist.is_main:
        return 0
    weights = "EMA" if report["ema"] else "raw"
    images = "image 0" if report["count"] == 1 else f"images 0-{report['count'] - 1}"
    processes = f" by {report['processes']} processes" if report["processes"] > 1 else ""
    print(f"{report['out_dir']}: {images} ({report['made']} made now{processes}, "
          f"{report['count'] - report['made']} already there) from the {weights} weights of step {report['step']} "
          f"({report['checkpoint']}); grid {report['grid']}")
    return 0


def run_eval(args) -> int:
    from dream.evaluate import run_eval_command

    return run_eval_command(args)


def run_info(args) -> int:
    from dream.info import format_info, model_info

    info = model_info(args.preset, **model_overrides(args))
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


def run_profile(args) -> int:
    from dream.profile import run_profile_command

    return run_profile_command(args)


def memory_backend(name: str, target: str) -> str:
    """`dream memory --backend auto`: what `dream train --backend auto` runs on the target."""
    if name != "auto":
        return name
    if target != "cuda":
        return "eager"
    from importlib.util import find_spec

    return "triton" if find_spec("triton") is not None else "eager"


def run_memory(args) -> int:
    from dataclasses import replace

    from dream.memory import (CUDA_ESTIMATE_MARGIN, StepSpec, choose_micro_batch, estimate_step_memory,
                              format_estimate, format_size, format_sweep, measure_cuda_peak, plan_step,
                              require_cuda)
    from dream.model import policies_for_backend

    auto = args.checkpointing == "auto"
    if args.sweep and args.checkpointing:
        raise DreamError(f"--sweep estimates every checkpointing policy; leave out --checkpointing "
                         f"{args.checkpointing} (or leave out --sweep)")
    if auto and args.budget is None:
        raise DreamError("--checkpointing auto picks the policy whose step fits a memory budget: add --budget "
                         "(e.g. 6.8GB), or use --sweep to see every policy")
    if auto and args.micro_batch is not None:
        raise DreamError(f"--checkpointing auto picks the micro-batch too; leave out --micro-batch "
                         f"{args.micro_batch}")
    if args.data_images < 0:
        raise DreamError(f"--data-images must be 0 or more, got {args.data_images}")
    spec = StepSpec(preset=args.preset, model_overrides=model_overrides(args), batch_size=args.batch_size,
                    micro_batch=args.micro_batch, precision=args.precision, objective=args.objective,
                    objective_config={"seed_separate_eps_forward": args.seed_separate_eps_forward},
                    early_backward=not args.single_graph, backend=memory_backend(args.backend, args.target),
                    checkpointing="none" if auto else args.checkpointing or "none",
                    data_images=0 if args.data_on == "host" else args.data_images, target=args.target,
                    channels_last=args.channels_last, cuda_graphs=args.cuda_graphs)
    policies = policies_for_backend(spec.backend) if args.sweep or auto else (spec.checkpointing,)
    if spec.cuda_graphs:  # what dream train --cuda-graphs runs: no fp16, no dropout recomputed under a capture
        from dream.train import check_graph_policy, check_graph_precision, graph_safe_policies

        check_graph_precision(spec.precision)
        dropout = spec.model_config().dropout
        if not (args.sweep or auto):
            check_graph_policy(spec.checkpointing, dropout)
        policies = graph_safe_policies(policies, True, dropout)
    if args.cuda:
        require_cuda()  # before the estimates, which take seconds
    budget = args.budget
    known = {}  # estimates by normalized spec: the table's whole-batch steps start every micro-batch search

    def estimated(step: StepSpec):
        key = step.normalized()
        if key not in known:
            known[key] = estimate_step_memory(step)
        return known[key]

    table = [estimated(replace(spec, checkpointing=policy)) for policy in policies] if args.sweep else []
    plan = None  # (micro-batch, policy, images on the host): what dream train --memory-budget does
    if budget is not None:
        def micro_batch_for(policy, images_on_host):
            return choose_micro_batch(replace(spec, checkpointing=policy, data_images=0 if images_on_host
                                              else spec.data_images), budget, estimate=estimated)

        place = args.data_on == "auto" and spec.target == "cuda" and spec.data_images > 0
        try:
            plan = plan_step(policies, spec.batch_size, micro_batch_for, images_on_host=args.data_on == "host",
                             place_images=place)
        except DreamError:
            if auto:
                raise
    if auto:
        micro, policy, on_host = plan
        spec = replace(spec, checkpointing=policy, micro_batch=None if micro == spec.batch_size else micro,
                       data_images=0 if on_host else spec.data_images)
    estimates = table or [estimated(spec)]
    if args.cuda:
        for estimate in estimates:
            estimate.cuda_peak_bytes = measure_cuda_peak(estimate.spec)
    reports = [estimate.to_dict() for estimate in estimates]
    lines = []
    if budget is not None:
        for estimate, report in zip(estimates, reports):
            try:
                micro = choose_micro_batch(estimate.spec, budget, estimate=estimated)
                note = f"largest micro-batch within {format_size(budget)}: {micro}"
                if estimate.spec.target == "cuda":
                    note += f" (estimates kept under {1 - CUDA_ESTIMATE_MARGIN:.0%} of it)"
                if micro != estimate.spec.batch_size:
                    note += f" ({estimate.spec.batch_size // micro} accumulated micro-batches)"
            except DreamError as error:
                micro, note = None, str(error)
            limit = int(budget * (1 - (CUDA_ESTIMATE_MARGIN if estimate.spec.target == "cuda" else 0.0)))
            report.update(budget_bytes=budget, budget_limit_bytes=limit, fits_budget=estimate.peak_bytes <= limit,
                          micro_batch_for_budget=micro)
            if not auto:
                lines.append(f"{estimate.spec.checkpointing:<10} {note}" if args.sweep else note)
        if plan is not None:
            micro, policy, on_host = plan
            where = ("" if not args.data_images else f", the {args.data_images} images in host memory" if on_host
                     else f", the {args.data_images} images on the device")
            if on_host and spec.data_images and not auto:
                where += " (on the device: a smaller micro-batch, more recomputation, or no fit)"
            flags = " --checkpointing auto" if len(policies) > 1 else f" --checkpointing {policy}"
            lines.append(f"dream train --memory-budget {format_size(budget)}{flags} --data-on {args.data_on} "
                         f"would take: micro-batch {micro} of {spec.batch_size}, checkpointing {policy}{where}")
            plan_report = {"micro_batch": micro, "checkpointing": policy, "data_on": "host" if on_host else "device"}
            for report in reports:
                report["plan"] = plan_report
    if args.json:
        print(json.dumps({"sweep": reports} if args.sweep else reports[0], indent=1))
    else:
        print(format_sweep(estimates) if args.sweep else format_estimate(estimates[0]))
        if lines:
            print("\n" + "\n".join(lines))
    return 0


def rank_label() -> str:
    """" (rank N)" in a line of a torchrun worker other than rank 0; "" otherwise."""
    rank = os.environ.get("RANK", "0")
    return f" (rank {rank})" if rank != "0" else ""


def say(line: str) -> None:
    """One line on stderr in one write: under torchrun several processes share it (print writes the text and
    its newline apart when Python runs unbuffered, and the lines of two ranks could run together)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C is: the same cleanup and one line."""


def _terminated(signum, frame):
    raise Terminated


MEMORY_SIZE_FLAGS = ("--budget", "--memory-budget")


def _attach_negative_sizes(argv: list[str]) -> list[str]:
    """`--budget -1GB` (or `-.5GB`) as `--budget=-1GB`: argparse would take -1GB for an option (it knows only plain
    negative numbers), and say "expected one argument" instead of why the size is refused."""
    out = []
    for token in argv:
        if out and out[-1] in MEMORY_SIZE_FLAGS and token[:1] == "-" and (token[1:2].isdigit() or token[1:2] == "."):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


RANK_0_GRACE_S = 1.0


def let_rank_0_speak() -> None:
    """A rank leaving silently, since rank 0 reports the error they share, waits a moment first: torchrun stops
    every process of the job as soon as one exits (polling every 0.1 s), which could cut rank 0 off before its
    line, leaving the user a SIGTERM line and no error. Stopped meanwhile (torchrun, once rank 0 has exited), it
    leaves as it would have."""
    try:
        time.sleep(RANK_0_GRACE_S)
    except KeyboardInterrupt:  # (SIGTERM too: Terminated)
        pass


PATH_ARGUMENTS = ("run_dir", "resume", "data_root", "out", "checkpoint", "real_root", "inception_weights", "cache_dir")


def main(argv=None) -> int:
    args = build_parser().parse_args(_attach_negative_sizes(list(sys.argv[1:] if argv is None else argv)))
    for name in PATH_ARGUMENTS:  # "--out=~/x": the shell leaves a ~ after "=" alone, and the user means home
        if isinstance(getattr(args, name, None), str) and getattr(args, name).startswith("~"):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    with _warnings_as_lines(args.command):
        return _run(args)


def _run(args) -> int:
    if getattr(args, "autotune_kernels", False):
        import torch

        os.environ["DREAM_KERNEL_AUTOTUNE"] = "1"  # kernels.autotune reads it at each launch
        if os.environ.get("RANK", "0") == "0":
            print("dream: Triton kernel launch configurations are tuned at the first use of each problem and "
                  "cached (kernels/autotune.py)" if torch.cuda.is_available() else
                  "dream: --autotune-kernels has no effect without a GPU (kernels are timed on CUDA only)",
                  file=sys.stderr)
    handlers = {"train": run_train, "sample": run_sample, "info": run_info, "profile": run_profile,
                "memory": run_memory, "eval": run_eval, "export": run_export}
    # (training's loop installs its own handler, which saves a checkpoint; this one covers its setup)
    handle_sigterm = threading.current_thread() is threading.main_thread()
    if handle_sigterm:
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM outside training's own handler: one line
        if isinstance(stop, Stopped):  # the ranks of a sampling job stopped together
            signum, name = (signal.SIGTERM if stop.signum > signal.NSIG else stop.signum), stop.why
        else:
            signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
            name = "SIGTERM" if isinstance(stop, Terminated) else "interrupted"
        rank = os.environ.get("RANK", "0")
        if rank != "0" and getattr(stop, "same_on_every_rank", False):  # every rank got it: rank 0 says it
            let_rank_0_speak()
            return 128 + signum
        kept = {"train": "checkpoints already written are kept", "sample": "finished images are kept",
                "eval": "finished images and cached statistics are kept"}.get(args.command)
        say(f"dream {args.command}{rank_label()}: {name}"
            + (f"; rerun the same command to go on ({kept})" if kept else ""))
        return 128 + signum
    except RuntimeError as error:  # under torchrun: a collective failed because another process stopped
        from dream.distributed import peer_lost, peer_lost_summary

        if os.environ.get("WORLD_SIZE", "1") in ("", "1") or not peer_lost(error) or os.environ.get("DREAM_DEBUG"):
            raise
        say(f"dream {args.command}{rank_label()}: error: another process of this job "
            f"stopped ({peer_lost_summary(error)}); its own line says why")
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DreamError, ValueError, OSError) as error:  # OSError: a path that is a file, full disk, permissions
        if os.environ.get("DREAM_DEBUG"):
            raise
        rank = os.environ.get("RANK", "0")  # under torchrun: rank 0 speaks for errors every rank shares
        if rank != "0" and getattr(error, "same_on_every_rank", False):
            let_rank_0_speak()
            return 2
        say(f"dream {args.command}{rank_label()}: error: {error}")
        return 2
    finally:
        if handle_sigterm:  # (None: a handler not installed from Python; the default is the nearest to it)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
