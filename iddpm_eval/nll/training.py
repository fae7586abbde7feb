"""The K-step bits/dim estimate as a training callback."""

from __future__ import annotations

import math

import numpy as np
import torch

from iddpm_eval.nll.bound import NLLError
from iddpm_eval.nll.estimate import estimate_bound, proposal


class TrainingNLL:
    """A ``callback`` for :func:`iddpm_core.train.train`: every ``every`` steps, the K-step estimate of
    the bound on the first ``num`` images of ``data`` (same images and noise each time, so the curve
    shows the model's change, not resampling). Returns ``{"bpd_estK": ..., "bpd_estK_mc_stderr": ...}``,
    which the trainer logs to TensorBoard and ``callback_metrics.csv``. ``ema_rate`` None = the raw
    weights; runs on rank 0 only."""

    def __init__(self, data: str = "digits", num: int = 16, k: int = 8, every: int = 100, seed: int = 0,
                 ema_rate: float | None = None, batch_size: int = 64, profile: np.ndarray | None = None):
        from iddpm_core.data import load_source, to_model_range

        if every < 1 or num < 1:
            raise NLLError(f"every and num must be >= 1, got {every}, {num}")
        src = load_source(data)
        if num > len(src):
            raise NLLError(f"data {data!r} holds {len(src)} images, asked for {num}")
        images, labels = src.batch(np.arange(num))
        self.x0, self.labels = to_model_range(images), torch.as_tensor(labels)
        self.k, self.every, self.seed, self.ema_rate = int(k), int(every), int(seed), ema_rate
        self.batch_size, self.profile = int(batch_size), profile

    def __call__(self, step: int, model, ema, info: dict) -> dict | None:
        if step % self.every or info.get("rank", 0) != 0:
            return None
        diffusion = info["diffusion"]
        net = ema.copy_model(model, self.ema_rate) if self.ema_rate is not None else model
        was_training = net.training
        net.eval()
        try:
            dev = next(net.parameters()).device
            p = proposal(diffusion.num_timesteps, self.profile) if self.profile is not None else None
            labels = self.labels if getattr(getattr(net, "config", None), "num_classes", None) else None
            res = estimate_bound(diffusion, net, self.x0.to(dev), self.k, p=p, seed=self.seed,
                                 batch_size=self.batch_size, labels=labels)
        finally:
            net.train(was_training)
        n = len(res["total_bpd"])
        return {f"bpd_est{self.k}": float(res["total_bpd"].mean()),
                f"bpd_est{self.k}_mc_stderr": float(math.sqrt(res["kl_var"].sum()) / n)}
