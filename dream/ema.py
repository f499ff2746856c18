"""Exponential moving average of a model's weights.

shadow <- shadow + (1 - d) (param - shadow), with d = decay, or with warm-up
d_k = min(decay, (1 + k) / (10 + k)) at update k (k = number of previous updates).
An update may be made conditional on a flag the device computes (the trainer's "this step was finite"): it is
then decided there, w = (1 - d) * flag, and the count of updates is kept on the device too, so that the training
step needs no host sync.
Only parameters are averaged; model_state_dict takes any buffers from the model as they are (the UNet has none).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[name].detach().clone().float() for name in self.names]
        device = self.shadow[0].device if self.shadow else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.float64, device=device)  # k, exact up to 2^53
        self.in_use = False  # True while `applied` has a model holding other weights than its own

    @property
    def num_updates(self) -> int:
        return int(self.updates)  # a host sync

    def current_decay(self) -> float:
        return float(self.decay_tensor()) if self.warmup else self.decay

    def decay_tensor(self) -> torch.Tensor:
        """d_k with warm-up, computed on the device from k."""
        k = self.updates
        return torch.clamp((1 + k) / (10 + k), max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, applied: torch.Tensor | None = None) -> None:
        """shadow <- shadow + w (param - shadow) with w = 1 - d, or w = (1 - d) * applied where `applied` (a 0-dim
        bool tensor on the device) says whether this update happens: no host sync either way."""
        params = dict(model.named_parameters())
        current = [params[name].detach().float() for name in self.names]
        if applied is None and not self.warmup:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)
            self.updates += 1
            return
        weight = (1 - self.decay_tensor()) if self.warmup else torch.full_like(self.updates, 1.0 - self.decay)
        if applied is not None:
            weight = weight * applied
        # lerp with a 0-dim weight: s + 0 * (p - s) is s exactly, and no temporary the size of the model
        weight = weight.to(self.shadow[0].dtype)
        torch._foreach_lerp_(self.shadow, current, [weight] * len(self.shadow))
        self.updates += 1 if applied is None else applied

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in zip(self.names, self.shadow):
            params[name].copy_(value)

    @contextmanager
    def applied(self, model: nn.Module):
        """Evaluate with the EMA weights; the training weights are restored on exit, even on error."""
        params = dict(model.named_parameters())
        backup = [params[name].detach().clone() for name in self.names]
        self.in_use = True  # until the training weights are all back (an interrupted restore leaves it set)
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for name, value in zip(self.names, backup):
                    params[name].copy_(value)
            self.in_use = False

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        self.decay = state["decay"]
        self.warmup = state["warmup"]
        self.updates.fill_(state["num_updates"])
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state["shadow"][name])

    def model_state_dict(self, model: nn.Module) -> dict:
        """A full model state_dict holding the EMA weights (for sampling and export)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, value in zip(self.names, self.shadow):
            state[name] = value.to(state[name].dtype).clone()
        return state

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        self.updates = self.updates.to(device)
        return self


def conditional_step(optimizer: torch.optim.Optimizer, ema: EMA, model: nn.Module, applied: torch.Tensor) -> None:
    """optimizer.step(), then ema.update(model), both left undone on the device where `applied` (a 0-dim bool
    tensor on the parameters' device) is False: no host sync. The optimizer must honour found_inf as the fused
    torch.optim ones do (the step undone, its step counts put back)."""
    optimizer.found_inf = (~applied).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    ema.update(model, applied=applied)
