"""Sampler engine: DDPM ancestral and DDIM steps driven by device-side tables, replayable as CUDA graphs.

Every reverse step, DDPM or DDIM, has one form (x = x_t, eps = model(x_t, t), z ~ N(0, I)):

    x0     = clamp(A_i x - B_i eps, -1, 1)          A = sqrt(1/abar_t),  B = sqrt(1/abar_t - 1)
    x_next = C_i x0 + D_i x + S_i z

  DDPM (t -> t - 1):   C, D = the posterior-mean coefficients of x0 and x_t,
                       S = sqrt(betatilde_t) = exp(log_variance_clipped_t / 2) for t > 0, S = 0 at t = 0;
  DDIM (t -> t_prev, eta; abar_{-1} = 1):
                       sigma = eta sqrt((1 - abar_prev)/(1 - abar_t) (1 - abar_t/abar_prev)),
                       dir = sqrt(1 - abar_prev - sigma^2); with eps' = (A x - x0)/B,
                       x_prev = sqrt(abar_prev) x0 + dir eps' + sigma z, so
                       C = sqrt(abar_prev) - dir/B,  D = dir A/B,  S = sigma.
  |C|, |D| <= 1 (abar_prev >= abar_t), so folding eps' into C, D loses no precision.

Row i of a (steps, 5) table holds (A, B, C, D, S)_i, computed in float64 from the diffusion's tables.
A one-element long tensor `counter` on the model's device selects the row (and the timestep) and
is incremented in place by the step, so a loop of steps never reads a value back to the host, and
a CUDA graph of one step (or of k steps) is replayed for the whole loop.

CUDA graphs: static input/output buffer x and counter; warm-up (Triton autotuning, torch.compile,
cuDNN benchmarking) on a side stream before capture; noise drawn inside the graph from the default
CUDA generator, whose offset advances at every replay exactly as the same eager draws would, so
seeding (torch.manual_seed) before a call makes graphed and plain loops give the same images. The
RNG state is restored after warm-up and capture, so capturing consumes no random numbers. One
capture per (shape, state dtype, autocast dtype, sampler, steps, eta, steps per graph), cached on
the engine and reused by later calls; a graph reads the model's parameters in place, so weights
copied into the model later (e.g. EMA) are used by the next replay. Use a model compiled with the
default torch.compile mode, not mode="reduce-overhead" (that one records its own graphs).
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from dream.step_graph import raise_failed_capture

SAMPLERS = ("ddpm", "ddim")


# ----------------------------------------------------------------------------------------------
# step tables
@dataclass(frozen=True)
class StepPlan:
    """The tables one sampler run reads: `timesteps` (S,) long and `coefficients` (S, 5) rows (A, B, C, D, S)."""

    sampler: str
    steps: int
    eta: float
    timesteps: torch.Tensor
    coefficients: torch.Tensor
    stochastic: bool  # any S_i > 0: the step draws noise

    def to(self, device=None, dtype=None) -> "StepPlan":
        return StepPlan(self.sampler, self.steps, self.eta, self.timesteps.to(device),
                        self.coefficients.to(device=device, dtype=dtype), self.stochastic)


def normalize_sampler(diffusion, sampler: str, steps: int | None, eta: float) -> tuple[str, int, float]:
    """(sampler, steps, eta) checked. DDPM always runs all T steps with eta 1 (eta 0, the callers' default,
    is taken to mean "not given"). DDIM: steps default to min(50, T); eta in [0, 1], where the step's noise
    variance sigma^2 = eta^2 (1 - abar_prev)/(1 - abar) (1 - abar/abar_prev) stays within 1 - abar_prev
    (past eta 1 it can exceed it and the step is no longer DDIM's)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    total = diffusion.num_timesteps
    if sampler == "ddpm":
        if steps not in (None, total):
            raise ValueError(f"the ddpm sampler runs all {total} steps, got steps={steps}; "
                             f"use the ddim sampler with eta 1 (--sampler ddim --eta 1) for fewer ancestral steps")
        if eta not in (0, 1):
            raise ValueError(f"the ddpm sampler takes no eta (it is ancestral, eta 1), got eta={eta}; "
                             f"use the ddim sampler (--sampler ddim) for other values")
        return "ddpm", total, 1.0
    steps = min(50, total) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ValueError(f"DDIM steps must be an integer in [1, {total}], got {steps!r}")
    eta = float(eta)
    if not 0 <= eta <= 1:  # NaN fails too
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    return "ddim", steps, eta


def build_plan(diffusion, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
               device=None, dtype: torch.dtype = torch.float32) -> StepPlan:
    """The step tables of `sampler`, computed in float64 from `diffusion`'s tables, stored as `dtype`."""
    sampler, steps, eta = normalize_sampler(diffusion, sampler, steps, eta)
    table = {name: getattr(diffusion, name).detach().to("cpu", torch.float64)
             for name in ("alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                          "posterior_mean_coef_x0", "posterior_mean_coef_xt", "posterior_log_variance_clipped")}
    if sampler == "ddpm":
        t = torch.arange(diffusion.num_timesteps - 1, -1, -1)
        a, b = table["sqrt_recip_alphas_cumprod"][t], table["sqrt_recipm1_alphas_cumprod"][t]
        c, d = table["posterior_mean_coef_x0"][t], table["posterior_mean_coef_xt"][t]
        s = torch.exp(0.5 * table["posterior_log_variance_clipped"][t]) * (t > 0)
    else:
        t = torch.tensor(diffusion.ddim_timesteps(diffusion.num_timesteps, steps))
        t_prev = torch.cat([t[1:], t.new_tensor([-1])])
        a, b = table["sqrt_recip_alphas_cumprod"][t], table["sqrt_recipm1_alphas_cumprod"][t]
        abar = table["alphas_cumprod"][t]
        abar_prev = torch.where(t_prev >= 0, table["alphas_cumprod"][t_prev.clamp(min=0)], torch.ones_like(abar))
        s = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        direction = (1 - abar_prev - s ** 2).clamp(min=0).sqrt()
        c = abar_prev.sqrt() - direction / b
        d = direction * a / b
    coefficients = torch.stack([a, b, c, d, s], dim=1)
    return StepPlan(sampler, steps, eta, t.long().to(device), coefficients.to(device=device, dtype=dtype),
                    stochastic=bool((s > 0).any()))


# ----------------------------------------------------------------------------------------------
# the step
def autocast_context(device_type: str, dtype: torch.dtype | None):
    """None: inherit the caller's autocast; float32/float64: autocast off; bf16/fp16: autocast on (no weight
    cache, so the region can sit inside a CUDA graph capture)."""
    if dtype is None:
        return nullcontext()
    if dtype in (torch.float32, torch.float64):
        return torch.autocast(device_type, enabled=False)
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"sampling dtype must be float32, bfloat16 or float16, got {dtype}")
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def denoise_step(model, x: torch.Tensor, counter: torch.Tensor, plan: StepPlan, noise: torch.Tensor | None = None,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_{t_i} -> x_{t_{i+1}} for i = counter (a 1-element long tensor on x's device), incremented in place.

    x0 = clamp(A x - B model(x, t), -1, 1); x_next = C x0 + D x + S z, with z = `noise` or, when None and
    the plan is stochastic, torch.randn_like(x) from the default generator. No host synchronisation."""
    row = plan.coefficients.index_select(0, counter).reshape(5, *([1] * x.ndim))
    a, b, c, d, s = row.unbind(0)
    t = plan.timesteps.index_select(0, counter).repeat(x.shape[0])
    with autocast_context(x.device.type, autocast_dtype):
        eps = model(x, t)
    x0 = (a * x - b * eps.to(x.dtype)).clamp_(-1, 1)
    x_next = c * x0 + d * x
    if plan.stochastic:
        x_next = x_next + s * (torch.randn_like(x) if noise is None else noise)
    counter.add_(1)
    return x_next


# ----------------------------------------------------------------------------------------------
# CUDA graph runner
class GraphedLoop:
    """A whole sampling loop as replays of captured graphs of `steps_per_graph` steps (plus one graph
    for the remainder), over the static buffers `x` (input and output) and `counter`."""

    def __init__(self, model, plan: StepPlan, shape, state_dtype: torch.dtype, autocast_dtype: torch.dtype | None,
                 steps_per_graph: int = 1, warmup_steps: int = 3, pool=None, capture_stream=None):
        device = plan.coefficients.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the tables are on {device}")
        self.model, self.plan, self.autocast_dtype = model, plan, autocast_dtype
        self.x = torch.zeros(shape, dtype=state_dtype, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        k = min(steps_per_graph, plan.steps)
        self.schedule = [k] * (plan.steps // k) + ([plan.steps % k] if plan.steps % k else [])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self._capture(warmup_steps, pool, capture_stream)

    def _body(self, steps: int) -> None:
        for _ in range(steps):
            self.x.copy_(denoise_step(self.model, self.x, self.counter, self.plan, None, self.autocast_dtype))

    @torch.no_grad()
    def _capture(self, warmup_steps: int, pool, capture_stream) -> None:
        start = time.perf_counter()
        device = self.x.device
        rng = torch.cuda.get_rng_state(device)
        # The tensors' device made current, and a capture stream of that device: torch.cuda.graph's default
        # capture stream belongs to whichever device was current at its first use.
        with torch.cuda.device(device):
            try:
                self._warm_up_and_capture(device, warmup_steps, pool, capture_stream)
            finally:
                torch.cuda.set_rng_state(rng, device)
            torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - start

    def _warm_up_and_capture(self, device: torch.device, warmup_steps: int, pool, capture_stream) -> None:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: autotuning, compilation, cuDNN algorithm choice
            self.x.normal_()
            self.counter.zero_()
            for _ in range(max(1, min(warmup_steps, self.plan.steps))):
                self._body(1)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        # captures sharing a memory pool share their capture stream too (torch.cuda.graph's advice)
        self._capture_graphs(pool, capture_stream or torch.cuda.Stream(device))

    def _capture_graphs(self, pool, capture_stream) -> None:
        """One graph per distinct length in the schedule. A capture that fails raises a one-line CaptureFailed
        (or the out-of-memory error itself) with the CUDA state mended (raise_failed_capture)."""
        for steps in sorted(set(self.schedule)):
            graph = torch.cuda.CUDAGraph()
            try:
                # (the outer stream context puts the current stream back where ending the capture fails)
                with torch.cuda.stream(capture_stream), torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                    self._body(steps)
            except Exception as error:
                graph = None
                self.graphs.clear()
                raise_failed_capture(error, capture_stream, self.x.device)
            self.graphs[steps] = graph

    @torch.no_grad()
    def run(self, x_T: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.x.device):  # replays go to the current stream of the graphs' device
            self.x.copy_(x_T)
            self.counter.zero_()
            for steps in self.schedule:
                self.graphs[steps].replay()
            return self.x.clone()


# ----------------------------------------------------------------------------------------------
# the engine
class SamplingEngine:
    """Samples from `model` with `diffusion`'s schedule; holds the step tables and graph captures.

    engine.sample(x_T, sampler="ddim", steps=50, eta=0.0, dtype=torch.float32) -> x_0 (same shape as x_T).
    graphs: None (default) = on for CUDA tensors, off otherwise; True needs CUDA."""

    def __init__(self, model, diffusion, graphs: bool | None = None, steps_per_graph: int = 1,
                 warmup_steps: int = 3):
        if not isinstance(steps_per_graph, int) or steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be a positive integer, got {steps_per_graph!r}")
        self.model, self.diffusion = model, diffusion
        self.graphs, self.steps_per_graph, self.warmup_steps = graphs, steps_per_graph, warmup_steps
        self.plans: dict[tuple, StepPlan] = {}
        self.captures: dict[tuple, GraphedLoop] = {}
        self._pool = None
        self._capture_streams: dict[str, torch.cuda.Stream] = {}
        self._captured_weights: tuple[int, ...] = ()

    def plan(self, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0, device=None,
             dtype: torch.dtype = torch.float32) -> StepPlan:
        sampler, steps, eta = normalize_sampler(self.diffusion, sampler, steps, eta)
        key = (sampler, steps, eta, str(torch.device(device or "cpu")), dtype)
        if key not in self.plans:
            self.plans[key] = build_plan(self.diffusion, sampler, steps, eta, device=device, dtype=dtype)
        return self.plans[key]

    def use_graphs(self, device: torch.device, graphs: bool | None = None) -> bool:
        graphs = self.graphs if graphs is None else graphs
        if graphs is None:
            return device.type == "cuda"
        if graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; sampling runs on {device}")
        return bool(graphs)

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
               dtype: torch.dtype | None = torch.float32, noise=None, graphs: bool | None = None,
               steps_per_graph: int | None = None, on_step=None) -> torch.Tensor:
        """Run the sampler from x_T. `dtype`: autocast dtype of the model call (None: the caller's autocast).
        `noise`: optional per-step noise (a sequence of `steps` tensors shaped like x_T, or one tensor of
        shape (steps, *x_T.shape)); only with the plain loop. Without it, noise comes from the default
        generator of x_T's device: seed it (torch.manual_seed) for a reproducible run.
        `on_step()`: called after each step of the plain loop (for progress; not with graphs)."""
        if not torch.is_floating_point(x_T) or x_T.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"x_T must be a float32 or float64 tensor, got {x_T.dtype}")
        plan = self.plan(sampler, steps, eta, device=x_T.device, dtype=x_T.dtype)
        if dtype is None:  # resolve the caller's autocast now, so a capture records it explicitly
            kind = x_T.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32
        if noise is not None:
            if graphs:
                raise ValueError("injected noise works with the plain loop only (graphs=False)")
            if len(noise) != plan.steps:
                raise ValueError(f"noise must hold one tensor per step ({plan.steps}), got {len(noise)}")
        elif self.use_graphs(x_T.device, graphs):
            return self._graphed(plan, x_T, dtype, steps_per_graph or self.steps_per_graph).run(x_T)
        x = x_T
        counter = torch.zeros(1, dtype=torch.long, device=x_T.device)
        for i in range(plan.steps):
            step_noise = None if noise is None else noise[i]
            if step_noise is not None and step_noise.shape != x_T.shape:
                raise ValueError(f"noise[{i}] has shape {tuple(step_noise.shape)}, expected {tuple(x_T.shape)}")
            x = denoise_step(self.model, x, counter, plan, step_noise, dtype)
            if on_step is not None:
                on_step()
        return x

    def _graphed(self, plan: StepPlan, x_T: torch.Tensor, dtype, steps_per_graph: int) -> GraphedLoop:
        if not isinstance(steps_per_graph, int) or steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be a positive integer, got {steps_per_graph!r}")
        # a capture holds the kernels of the model as it was: its backend and train/eval mode belong to the
        # key (those of the module itself: a torch.compile wrapper copies `training` once, when made)
        module = getattr(self.model, "_orig_mod", self.model)
        key = (tuple(x_T.shape), x_T.dtype, dtype, plan.sampler, plan.steps, plan.eta, steps_per_graph,
               str(x_T.device), getattr(module, "backend", None), module.training)
        # a capture reads the weights at the addresses they had: weights copied in place (an EMA swap) are
        # seen, weights moved or re-allocated (.to(), load_state_dict(assign=True)) invalidate every capture
        weights = tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
        if weights != self._captured_weights:
            self.clear()
            self._captured_weights = weights
        if key not in self.captures:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            device = str(x_T.device)
            if device not in self._capture_streams:
                self._capture_streams[device] = torch.cuda.Stream(x_T.device)
            self.captures[key] = GraphedLoop(self.model, plan, x_T.shape, x_T.dtype, dtype, steps_per_graph,
                                             self.warmup_steps, self._pool, self._capture_streams[device])
        return self.captures[key]

    def clear(self) -> None:
        """Drop every capture (and its memory pool)."""
        self.captures.clear()
        self._pool = None
        self._capture_streams.clear()


def sample(model, diffusion, x_T: torch.Tensor, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
           dtype: torch.dtype | None = torch.float32, graphs: bool | None = None, steps_per_graph: int = 1,
           noise=None) -> torch.Tensor:
    """One-shot sampling (a fresh engine: use SamplingEngine to reuse captures across calls)."""
    engine = SamplingEngine(model, diffusion, graphs=graphs, steps_per_graph=steps_per_graph)
    return engine.sample(x_T, sampler, steps, eta, dtype, noise=noise)


# ----------------------------------------------------------------------------------------------
# timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_sampling(model, diffusion, batch_size: int = 256, sampler: str = "ddim", steps: int | None = None,
                  eta: float = 0.0, dtype: torch.dtype | None = torch.float32, graphs=(False, True),
                  steps_per_graph: int = 1, repeats: int = 3, image_shape: tuple[int, int, int] | None = None,
                  seed: int = 0) -> dict:
    """Images/s of sampling `batch_size` images with `model` (eager, triton-backend or torch.compile'd),
    with and without CUDA graphs. The first call of each mode (compilation, autotuning, capture) is timed
    apart as `first_call_s`; then `repeats` timed calls (synchronised). Returns

        {"plain" | "graphs": {"images_per_s", "seconds_per_batch" (median), "seconds" (all repeats),
                              "first_call_s", "steps_per_s", "model_calls_per_s"}
                             or {"skipped": reason},
         "batch_size", "sampler", "steps", "eta", "dtype", "steps_per_graph", "device"}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = parameter.device if parameter is not None else diffusion.betas.device
    if image_shape is None:
        config = model.config
        image_shape = (config.in_channels, config.image_size, config.image_size)
    sampler, steps, eta = normalize_sampler(diffusion, sampler, steps, eta)
    engine = SamplingEngine(model, diffusion, steps_per_graph=steps_per_graph)
    x_T = torch.randn((batch_size, *image_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    result = {"batch_size": batch_size, "sampler": sampler, "steps": steps, "eta": eta, "dtype": str(dtype),
              "steps_per_graph": steps_per_graph, "device": str(device)}
    for use_graphs in graphs:
        name = "graphs" if use_graphs else "plain"
        if use_graphs and device.type != "cuda":
            result[name] = {"skipped": f"CUDA graphs need a CUDA device, the model is on {device}"}
            continue
        torch.manual_seed(seed)
        start = time.perf_counter()
        engine.sample(x_T, sampler, steps, eta, dtype, graphs=use_graphs)
        _synchronize(device)
        first = time.perf_counter() - start
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.sample(x_T, sampler, steps, eta, dtype, graphs=use_graphs)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        result[name] = {"images_per_s": batch_size / median, "seconds_per_batch": median, "seconds": seconds,
                        "first_call_s": first, "steps_per_s": steps / median,
                        "model_calls_per_s": steps * batch_size / median}
    return result
