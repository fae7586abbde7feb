"""Exponential moving averages of a model's weights, one copy per rate.

After each optimiser step ``p_ema <- rate * p_ema + (1 - rate) * p`` for every floating-point
parameter; buffers (if any) are copied as they are. With ``warmup`` the rate at update k (0-based)
is ``min(rate, (1 + k) / (10 + k))`` (as TensorFlow's ExponentialMovingAverage with num_updates),
which lets short runs sample from the average early; Improved DDPM uses no warm-up.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def rate_key(rate: float) -> str:
    """The key an EMA rate is stored under in checkpoints: ``repr(float(rate))``, e.g. '0.9999'."""
    return repr(float(rate))


class EMA:
    """EMA copies of ``model``'s parameters for each rate in ``rates``."""

    def __init__(self, model: nn.Module, rates, warmup: bool = False):
        self.rates = tuple(float(r) for r in rates)
        for r in self.rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rate must lie in [0, 1), got {r}")
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadows = {rate_key(r): {k: v.detach().clone() for k, v in model.state_dict().items()}
                        for r in self.rates}

    def effective_rate(self, rate: float) -> float:
        if self.warmup:
            return min(rate, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return rate

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [k for k, v in current.items() if v.is_floating_point()]
        values = [current[k].detach() for k in floats]
        for r in self.rates:
            shadow = self.shadows[rate_key(r)]
            eff = self.effective_rate(r)
            # the same two roundings per element as s.mul_(eff).add_(v, alpha=1 - eff), one call per list
            targets = [shadow[k] for k in floats]
            torch._foreach_mul_(targets, eff)
            torch._foreach_add_(targets, values, alpha=1.0 - eff)
            for k, v in current.items():
                if not v.is_floating_point():
                    shadow[k].copy_(v)
        self.num_updates += 1

    def state_dict_for(self, rate) -> dict:
        """The EMA weights for ``rate`` as a model state dict."""
        key = rate_key(rate)
        if key not in self.shadows:
            raise KeyError(f"no EMA with rate {rate}; rates are {list(self.shadows)}")
        return self.shadows[key]

    def copy_model(self, model: nn.Module, rate) -> nn.Module:
        """A deep copy of ``model`` carrying the EMA weights for ``rate``."""
        m = copy.deepcopy(model)
        m.load_state_dict(self.state_dict_for(rate))
        return m

    def state_dict(self) -> dict:
        return {"rates": list(self.rates), "warmup": self.warmup, "num_updates": self.num_updates,
                "shadows": {k: {n: t.clone() for n, t in v.items()} for k, v in self.shadows.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self.shadows if k not in state["shadows"]]
        if missing:
            raise ValueError(f"EMA state lacks rate(s) {missing}; it holds {list(state['shadows'])}")
        for k in self.shadows:
            src = state["shadows"][k]
            if set(src) != set(self.shadows[k]):
                raise ValueError(f"EMA state for rate {k} does not match the model's parameters")
            for n, t in self.shadows[k].items():
                t.copy_(src[n])
        self.num_updates = int(state["num_updates"])
