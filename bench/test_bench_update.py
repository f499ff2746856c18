"""The optimizer and EMA part of a training step (what follows the gradient clipping), at the seed UNet's
parameter shapes (190 tensors, 54.85M parameters; on CPU too: no forward runs here).

Variants:
  `device_decided` (ours, the trainer's): fused AdamW whose step is undone on the device where found_inf is
      set, and the EMA's lerp by a device weight (1 - d) * finite; nothing is read on the host.
  `host_decided`: the update it replaced: the loss's and gradient norm's finiteness read on the host, then
      AdamW as the trainer chose it by device (fused on CUDA, PyTorch's default on CPU) and the EMA's lerp by
      a host number.
Checked on one update from the same state against float64: AdamW's first step (m_hat = g, v_hat = g^2),
p1 = p0 (1 - lr wd) - lr g / (|g| + eps), then s1 = s0 + (1 - d)(p1 - s0); random p0, g and s0 != p0. The
changes p1 - p0 and s1 - s0 are compared, not p1 and s1: those are mostly p0 and s0, so an update wrong by
10 % would move them by only ~2e-3 (within the GPU's fp32 tolerance), while the changes move by 10 %.
Bytes: the fewest one update moves, fp32: AdamW reads p, g, m, v and writes p, m, v; the EMA reads s and p
and writes s (40 bytes a parameter).
"""
import pytest
import torch

from bench.harness import DEVICE, ON_GPU, Case, CaseState, Runner, Variant, run_variant

LR, WEIGHT_DECAY, EPS, DECAY = 1e-3, 0.01, 1e-8, 0.9


def seed_shapes():
    from dream.model import UNet, make_config

    with torch.device("meta"):
        model = UNet(make_config("seed"))
    return [tuple(p.shape) for p in model.parameters()]


def setup():
    shapes = seed_shapes()
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(shape, generator=g) * 0.05 for shape in shapes]
    grads = [torch.randn(shape, generator=g) * 1e-3 for shape in shapes]
    shadow = [p + torch.randn(shape, generator=g) * 0.01 for p, shape in zip(params, shapes)]
    p1 = [p.double() * (1 - LR * WEIGHT_DECAY) - LR * d.double() / (d.double().abs() + EPS)
          for p, d in zip(params, grads)]
    s1 = [s.double() + (1 - DECAY) * (p - s.double()) for s, p in zip(shadow, p1)]
    reference = (torch.cat([(p - p0.double()).flatten() for p, p0 in zip(p1, params)]),
                 torch.cat([(s - s0.double()).flatten() for s, s0 in zip(s1, shadow)]))
    count = sum(p.numel() for p in params)
    inputs = {"loss": torch.tensor(0.5, device=DEVICE), "grad_norm": torch.tensor(1.5, device=DEVICE)}
    return CaseState(input_sets=[inputs], reference=reference, outputs=("params_change", "shadow_change"),
                     bytes=lambda dtype: 40.0 * count,
                     info={"parameters": count, "tensors": len(shapes)},
                     extra={"params": params, "grads": grads, "shadow": shadow})


class UpdateState:
    """Parameters with gradients, a fresh AdamW and an EMA whose shadow is set apart from the weights."""

    def __init__(self, state: CaseState, fused):
        from dream.ema import EMA

        # copies: on CPU .to(DEVICE) would return the case's own tensors, which the update changes in place
        self.model = torch.nn.ParameterList([torch.nn.Parameter(p.to(DEVICE, copy=True))
                                             for p in state.extra["params"]])
        for p, grad in zip(self.model, state.extra["grads"]):
            p.grad = grad.to(DEVICE, copy=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS,
                                           fused=fused)
        self.ema = EMA(self.model, decay=DECAY)
        for s, s0 in zip(self.ema.shadow, state.extra["shadow"]):
            s.copy_(s0)
        self.start = self.flat()

    def flat(self):
        return (torch.cat([p.detach().flatten() for p in self.model]),
                torch.cat([s.flatten() for s in self.ema.shadow]))

    def outputs(self):
        """(p1 - p0, s1 - s0) in fp32: the subtraction adds at most one rounding to p1's (none where p1 and p0
        are within a factor 2: Sterbenz). Once: the copies of p0 and s0 go, so the timed updates' peak memory
        does not hold them."""
        start, self.start = self.start, None
        return tuple(now - before for now, before in zip(self.flat(), start))


def device_decided(update: UpdateState, inputs):
    from dream.ema import conditional_step

    finite = torch.stack([inputs["loss"].isfinite(), inputs["grad_norm"].isfinite()]).all()
    conditional_step(update.optimizer, update.ema, update.model, finite)


def host_decided(update: UpdateState, inputs):
    loss_ok, grads_ok = torch.stack([inputs["loss"].isfinite(), inputs["grad_norm"].isfinite()]).tolist()
    if loss_ok and grads_ok:
        update.optimizer.step()
        update.ema.update(update.model)


def variant(name, step, fused, role, note):
    def build(state):
        kept = {}

        def check(inputs):
            update = UpdateState(state, fused)
            step(update, inputs)
            kept["update"] = update  # timed from here on: its state goes on updating
            return update.outputs()

        def run(inputs):
            if "update" not in kept:
                kept["update"] = UpdateState(state, fused)
            step(kept["update"], inputs)

        return Runner(run=run, check=check)

    return Variant(name, build, role=role, dtype=torch.float32, graph=False, note=note)


VARIANTS = [variant("device_decided", device_decided, True, "ours",
                    "fused AdamW with found_inf, EMA lerp by a device weight: no host read"),
            variant("host_decided", host_decided, True if ON_GPU else None, "anchor",
                    "the finiteness read on the host, then AdamW (fused on CUDA, the default on CPU) and the EMA")]
CASES = [Case("update", "seed", "step", setup, VARIANTS, level="kernel",
              describe="AdamW and EMA over the seed UNet's parameters, after clipping")]


@pytest.mark.parametrize("case,variant", [pytest.param(case, v, id=f"{case.name}-{v.name}")
                                          for case in CASES for v in case.variants])
def test_update(benchmark, case, variant):
    run_variant(benchmark, case, variant)
