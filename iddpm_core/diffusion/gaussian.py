"""Gaussian diffusion of Improved DDPM (Nichol & Dhariwal 2021), independent of the network.

Schedule constants are float64 numpy arrays; they are indexed by the timestep tensor and cast to
the dtype of the data. The model is called as ``model(x_t, t_model, **model_kwargs)`` where
``t_model`` is the original timestep index as a float (times 1000/T_original when
``rescale_timesteps`` is on) and returns ``[N, C, ...]``, or ``[N, 2C, ...]`` for learned
variances (the second half holds the variance values).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl

MEAN_TYPES = ("epsilon", "x0", "xprev")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
# Paper names: L_simple is MSE with a fixed variance; L_hybrid is MSE plus lambda * L_vlb with
# lambda = 0.001, which is improved-diffusion's RESCALED_MSE with a learned variance; L_vlb is KL.
LOSS_ALIASES = {"simple": "mse", "hybrid": "rescaled_mse", "vlb": "kl", "rescaled_vlb": "rescaled_kl"}
LEARNED_VARS = ("learned", "learned_range")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on its own device), then moved to ``device``."""
    if generator is None:
        return torch.randn(*shape, device=device, dtype=dtype)
    x = torch.randn(*shape, generator=generator, device=generator.device, dtype=dtype)
    return x if device is None else x.to(device)


def _check_choice(kind: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {tuple(allowed)}")
    return value


class GaussianDiffusion:
    """Forward process q, reverse process p, losses and bits/dim of a discrete Gaussian diffusion.

    ``betas``: float64 array [T] in (0, 1). ``timestep_map`` (used by respacing) gives, for each of
    the T steps here, the index the model was trained on; ``original_num_steps`` is the length of
    that original chain (both default to this chain). ``alphas_cumprod`` may be given to keep exact
    values (respacing); it must agree with the cumulative product of ``1 - betas``.
    """

    def __init__(self, betas, mean_type: str = "epsilon", var_type: str = "fixed_small",
                 loss_type: str = "mse", rescale_timesteps: bool = True,
                 timestep_map=None, original_num_steps: int | None = None, alphas_cumprod=None):
        self.mean_type = _check_choice("mean type", mean_type, MEAN_TYPES)
        self.var_type = _check_choice("variance type", var_type, VAR_TYPES)
        _check_choice("loss type", loss_type, LOSS_TYPES + tuple(LOSS_ALIASES))
        if loss_type == "hybrid" and var_type not in LEARNED_VARS:
            raise ValueError(f"loss 'hybrid' needs a learned variance type {LEARNED_VARS}, got {var_type!r}")
        self.loss_type = LOSS_ALIASES.get(loss_type, loss_type)
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in (0, 1) (a beta of 1 leaves no signal: alpha-bar 0)")
        self.betas = betas
        self.num_timesteps = T = int(betas.shape[0])
        self.timestep_map = (np.arange(T, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got shape {self.timestep_map.shape}")
        self.original_num_steps = T if original_num_steps is None else int(original_num_steps)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        if alphas_cumprod is not None:
            given = np.asarray(alphas_cumprod, dtype=np.float64)
            # compare in beta space: 1 - beta loses relative precision when beta is close to 1
            if given.shape != (T,) or not np.allclose(1.0 - given / np.append(1.0, given[:-1]), betas,
                                                      rtol=1e-10, atol=0):
                raise ValueError("alphas_cumprod does not match the cumulative product of 1 - betas")
            self.alphas_cumprod = given.copy()
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] is 0: replace it by the next entry before taking the log
        # (a one-step chain has no next entry; beta_0 stands in).
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # fixed_large: betas, with the first entry from the posterior to help the decoder
        self.large_variance = np.append(first, betas[1:])
        self.log_large_variance = np.log(self.large_variance)
        self.log_betas = np.log(betas)

    # ------------------------------------------------------------------ helpers
    @property
    def learns_sigma(self) -> bool:
        return self.var_type in LEARNED_VARS

    def _table(self, arr: np.ndarray, device: torch.device) -> torch.Tensor:
        """``arr`` as a float64 tensor on ``device``, copied there once: the sampling loops then index
        it on the device every step without a host-to-device copy (a synchronisation on accelerators)."""
        tables = self.__dict__.setdefault("_tables", {})
        key = (id(arr), str(device))
        hit = tables.get(key)
        if hit is None or hit[0] is not arr:  # the array is held, so its id cannot be reused meanwhile
            hit = tables[key] = (arr, torch.from_numpy(arr).to(device))
        return hit[1]

    def _extract(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as ``like``'s dtype and device, shaped [N, 1, 1, ...] to broadcast against ``like``."""
        vals = self._table(arr, t.device)[t].to(dtype=like.dtype, device=like.device)
        return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))

    def _check_t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be a 1-D tensor with one timestep per example ({x.shape[0]}), "
                             f"got {getattr(t, 'shape', t)}")
        t = t.long()
        # value check on the CPU only: on an accelerator it would force a sync every step
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps}), got range "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The float timestep the model sees: original index (times 1000/T_original if rescaled)."""
        mapped = self._table(self.timestep_map, t.device)[t.long()].float()
        if self.rescale_timesteps:
            mapped = mapped * (1000.0 / self.original_num_steps)
        return mapped

    def _run_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x.shape[1] * (2 if self.learns_sigma else 1)
        if out.shape != (x.shape[0], channels) + tuple(x.shape[2:]):
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected "
                             f"{(x.shape[0], channels) + tuple(x.shape[2:])} for variance type {self.var_type!r}")
        return out

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check_t(t, x_start)
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        t = self._check_t(t, x_start)
        if noise is None:
            noise = randn(x_start.shape, generator, x_start.device, x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._check_t(t, x_t)
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ conversions
    def predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_xstart_from_xprev(self, x_t, t, xprev):
        # invert mean = coef1 x_0 + coef2 x_t
        return ((xprev - self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
                / self._extract(self.posterior_mean_coef1, t, x_t))

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                                    clip_denoised: bool = True,
                                    denoised_fn: Callable | None = None) -> dict:
        """Mean, variance, log-variance and predicted x_0 of p(x_{t-1} | x_t) from a model output."""
        t = self._check_t(t, x)
        C = x.shape[1]
        if self.learns_sigma:
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            if self.var_type == "learned":
                log_variance = var_values
            else:
                min_log = self._extract(self.posterior_log_variance_clipped, t, x)
                max_log = self._extract(self.log_betas, t, x)
                frac = (var_values + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            var_arr = self.posterior_variance if self.var_type == "fixed_small" else self.large_variance
            logvar_arr = (self.posterior_log_variance_clipped if self.var_type == "fixed_small"
                          else self.log_large_variance)
            variance = self._extract(var_arr, t, x).expand_as(x)
            log_variance = self._extract(logvar_arr, t, x).expand_as(x)

        def process(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.mean_type == "xprev":
            pred_xstart = process(self.predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            raw = model_output if self.mean_type == "x0" else self.predict_xstart_from_eps(x, t, model_output)
            pred_xstart = process(raw)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_kwargs: dict | None = None, denoised_fn: Callable | None = None) -> dict:
        """Run the model and return p(x_{t-1} | x_t)'s mean, variance, log_variance, pred_xstart
        and the raw model_output."""
        t = self._check_t(t, x)
        out = self._run_model(model, x, t, model_kwargs)
        res = self.p_mean_variance_from_output(out, x, t, clip_denoised, denoised_fn)
        res["model_output"] = out
        return res

    # ------------------------------------------------------------------ likelihood terms
    def vb_terms_from_output(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                             t: torch.Tensor, clip_denoised: bool = True, exact_cdf: bool = False) -> dict:
        """Per-example VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
        the discretized Gaussian decoder NLL of x_0 at t = 0. Returns "output" [N] and "pred_xstart"."""
        t = self._check_t(t, x_t)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"],
                                                   exact_cdf=exact_cdf)
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": p["pred_xstart"]}

    def vb_terms_bpd(self, model: Callable, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = True, model_kwargs: dict | None = None,
                     exact_cdf: bool = False) -> dict:
        """Run the model at (x_t, t) and return the per-example VLB term (bits/dim, [N]) as "output",
        with "pred_xstart" and "model_output". ``t`` may differ between examples."""
        t = self._check_t(t, x_t)
        out = self._run_model(model, x_t, t, model_kwargs)
        res = self.vb_terms_from_output(out, x_start, x_t, t, clip_denoised, exact_cdf)
        res["model_output"] = out
        return res

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example [N]."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, model_kwargs: dict | None = None,
                        generator: torch.Generator | None = None) -> dict:
        """Per-example training loss terms [N]: "loss" always; "mse" for the MSE losses; "vb" when the
        variance is learned (MSE losses) or the loss is the VLB.

        mse: L_simple (plus the unscaled vb term, lambda = 1/T, if the variance is learned);
        rescaled_mse ("hybrid"): vb multiplied by T/1000, i.e. L_simple + 0.001 L_vlb;
        kl ("vlb"): the single-t VLB term; rescaled_kl: that term times T (an estimate of L_vlb).
        The vb term of the MSE losses sees the predicted mean through a stop-gradient.
        """
        t = self._check_t(t, x_start)
        if noise is None:
            noise = randn(x_start.shape, generator, x_start.device, x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise)
        T = self.num_timesteps
        terms = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            terms["vb"] = vb
            terms["loss"] = vb * T if self.loss_type == "rescaled_kl" else vb
            return terms

        out = self._run_model(model, x_t, t, model_kwargs)
        C = x_start.shape[1]
        if self.learns_sigma:
            mean_out, var_out = out[:, :C], out[:, C:]
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb = self.vb_terms_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == "rescaled_mse":
                vb = vb * (T / 1000.0)
            terms["vb"] = vb
        else:
            mean_out = out
        if self.mean_type == "epsilon":
            target = noise
        elif self.mean_type == "x0":
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        terms["mse"] = mean_flat((target - mean_out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
