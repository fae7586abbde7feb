"""Timestep samplers for training: uniform and Improved DDPM's loss-second-moment importance sampler.

``sample`` returns (t, weights) with E_t[weights * L_t] equal to the uniform mean of L_t.
"""

from __future__ import annotations

import numpy as np
import torch


class ScheduleSampler:
    """Base class: subclasses define ``weights()`` (unnormalised sampling probabilities, [T])."""

    def __init__(self, num_timesteps: int):
        if int(num_timesteps) < 1:
            raise ValueError(f"number of timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self) -> np.ndarray:
        w = np.asarray(self.weights(), dtype=np.float64)
        return w / w.sum()

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device=None):
        """Draw ``batch_size`` timesteps; return (t long [B], loss weights float32 [B] = 1/(T p_t))."""
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), w.float().to(device)

    def update_with_local_losses(self, ts: torch.Tensor, losses: torch.Tensor) -> None:
        """Update from this process's losses, all-gathered across processes when torch.distributed
        is initialised (every process must call this with the same batch size)."""
        import torch.distributed as dist

        ts, losses = ts.detach().long().reshape(-1), losses.detach().double().reshape(-1)
        if ts.shape != losses.shape:
            raise ValueError(f"got {ts.numel()} timesteps but {losses.numel()} losses")
        if dist.is_available() and dist.is_initialized():
            dev = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                   else torch.device("cpu"))
            ts, losses = ts.to(dev), losses.to(dev)
            world = dist.get_world_size()
            # batch sizes may differ between processes: gather the sizes, pad to the largest
            sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([ts.numel()], dtype=torch.long, device=dev))
            sizes = [int(s.item()) for s in sizes]
            pad = max(sizes)
            gathered_t = [torch.zeros(pad, dtype=ts.dtype, device=dev) for _ in range(world)]
            gathered_l = [torch.zeros(pad, dtype=losses.dtype, device=dev) for _ in range(world)]
            dist.all_gather(gathered_t, torch.nn.functional.pad(ts, (0, pad - ts.numel())))
            dist.all_gather(gathered_l, torch.nn.functional.pad(losses, (0, pad - losses.numel())))
            ts = torch.cat([g[:n] for g, n in zip(gathered_t, sizes)])
            losses = torch.cat([g[:n] for g, n in zip(gathered_l, sizes)])
        self.update_with_all_losses(ts.cpu().tolist(), losses.cpu().tolist())

    def update_with_all_losses(self, ts, losses) -> None:
        """Record per-example losses (no-op for samplers that do not learn)."""

    def state_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_timesteps"]) != self.num_timesteps:
            raise ValueError(f"sampler state is for {state['num_timesteps']} timesteps, "
                             f"this sampler has {self.num_timesteps}")


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely; all weights 1."""

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)


class LossSecondMomentSampler(ScheduleSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses at t, mixed with
    ``uniform_prob`` of the uniform distribution; uniform until every t has ``history`` losses."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history < 1 or not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"need history >= 1 and 0 <= uniform_prob <= 1, got {history}, {uniform_prob}")
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = np.zeros((self.num_timesteps, self.history), dtype=np.float64)
        self.loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum()
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts, losses) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps})")
            if self.loss_counts[t] == self.history:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = float(loss)
            else:
                self.loss_history[t, self.loss_counts[t]] = float(loss)
                self.loss_counts[t] += 1

    def state_dict(self) -> dict:
        """Plain numbers and torch tensors (loadable with ``torch.load(..., weights_only=True)``)."""
        return {"num_timesteps": self.num_timesteps, "history": self.history,
                "uniform_prob": self.uniform_prob, "loss_history": torch.from_numpy(self.loss_history.copy()),
                "loss_counts": torch.from_numpy(self.loss_counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        hist = torch.as_tensor(state["loss_history"]).cpu().numpy().astype(np.float64)
        if hist.shape != (self.num_timesteps, self.history):
            raise ValueError(f"loss_history has shape {hist.shape}, expected {(self.num_timesteps, self.history)}")
        self.uniform_prob = float(state["uniform_prob"])
        self.loss_history = hist.copy()
        counts = torch.as_tensor(state["loss_counts"]).cpu().numpy().astype(np.int64)
        if counts.shape != (self.num_timesteps,) or counts.min() < 0 or counts.max() > self.history:
            raise ValueError(f"loss_counts must be {self.num_timesteps} counts in [0, {self.history}]")
        self.loss_counts = counts


SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentSampler}


def create_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    """Sampler by name: "uniform" or "loss-second-moment"."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; expected one of {tuple(SAMPLERS)}")
    return SAMPLERS[name](num_timesteps)
