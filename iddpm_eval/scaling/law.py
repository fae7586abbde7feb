"""The fitted law in log space and its loss: log y = logsumexp(e, a_j - alpha_j z_j), Huber in log y."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("saturating", "power", "fixed-E")
DELTA = 1e-3
BOUND = 60.0  # box on centred log-amplitudes and exponents; keeps exp() finite


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(r, -delta, delta)


@dataclass(frozen=True)
class Law:
    """log y = logsumexp(e, a_1 - alpha_1 z_1, ..., a_J - alpha_J z_J).

    ``e_mode`` is "free" (e fitted), "fixed" (e = ``e_fixed``) or "none" (no constant term).
    Parameters are [e?, a_1, alpha_1, ..., a_J, alpha_J]; z are (centred) log inputs, shape (n, J).
    Every method takes a batch of parameter vectors, shape (G, P).
    """

    n_terms: int
    e_mode: str
    e_fixed: float = 0.0

    @property
    def n_params(self) -> int:
        return (self.e_mode == "free") + 2 * self.n_terms

    def split(self, theta: np.ndarray):
        """theta (G, P) -> e (G,) or None, a (G, J), alpha (G, J)."""
        off = 1 if self.e_mode == "free" else 0
        e = theta[:, 0] if off else (np.full(theta.shape[0], self.e_fixed) if self.e_mode == "fixed" else None)
        return e, theta[:, off::2], theta[:, off + 1::2]

    def log_terms(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Per-term log values, shape (G, n, K) with K = J (+1 when there is a constant)."""
        e, a, alpha = self.split(theta)
        terms = a[:, None, :] - alpha[:, None, :] * z[None, :, :]
        if e is not None:
            terms = np.concatenate([np.broadcast_to(e[:, None, None], terms.shape[:2] + (1,)), terms], axis=2)
        return terms

    def log_pred(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        t = self.log_terms(theta, z)
        m = t.max(axis=2, keepdims=True)
        return (m + np.log(np.exp(t - m).sum(axis=2, keepdims=True)))[..., 0]

    def loss(self, theta: np.ndarray, z, ly, w, delta) -> np.ndarray:
        """Weighted Huber loss for a batch of parameter vectors, shape (G,); ``w`` is (n,) or (G, n)."""
        return (huber(ly[None, :] - self.log_pred(theta, z), delta) * np.atleast_2d(w)).sum(axis=1)

    def loss_and_grad(self, theta: np.ndarray, z, ly, w, delta):
        """Loss (G,) and analytic gradient (G, P) for a batch; ``w`` is (n,) or (G, n)."""
        t = self.log_terms(theta, z)  # (G, n, K)
        m = t.max(axis=2, keepdims=True)
        ex = np.exp(t - m)
        s = ex.sum(axis=2, keepdims=True)
        lp = (m + np.log(s))[..., 0]
        soft = ex / s  # d log_pred / d term
        r = ly[None, :] - lp
        w = np.broadcast_to(w, r.shape)
        f = (huber(r, delta) * w).sum(axis=1)
        psi = -_huber_grad(r, delta) * w  # d loss / d log_pred, (G, n)
        g = np.empty_like(theta)
        k = 0
        col = 0 if self.e_mode == "none" else 1
        if self.e_mode == "free":
            g[:, 0] = (psi * soft[:, :, 0]).sum(axis=1)
            k = 1
        for j in range(self.n_terms):
            wj = psi * soft[:, :, col + j]
            g[:, k + 2 * j] = wj.sum(axis=1)
            g[:, k + 2 * j + 1] = -(wj @ z[:, j])
        return f, g

    def params(self, theta: np.ndarray, center: np.ndarray) -> dict[str, float]:
        """One centred parameter vector (P,) in the original units: E, A, alpha[, B, beta]."""
        e, a, alpha = self.split(theta[None, :])
        out: dict[str, float] = {}
        if e is not None:
            out["E"] = float(np.exp(e[0]))
        names = [("A", "alpha"), ("B", "beta")]
        for j in range(self.n_terms):
            # undo the centring: a' - alpha (log x - c) = (a' + alpha c) - alpha log x
            out[names[j][0]] = float(np.exp(a[0, j] + alpha[0, j] * center[j]))
            out[names[j][1]] = float(alpha[0, j])
        return out


def model_for(form: str, fixed_E: float | None) -> Law:
    """The law of a form: saturating, power, fixed-E (constant ``fixed_E``) or joint."""
    if form == "saturating":
        return Law(1, "free")
    if form == "power":
        return Law(1, "none")
    if form == "fixed-E":
        if fixed_E is None or not np.isfinite(fixed_E) or fixed_E <= 0:
            raise ValueError(f"form 'fixed-E' needs a positive fixed_E (the known constant), got {fixed_E!r}")
        return Law(1, "fixed", float(np.log(fixed_E)))
    if form == "joint":
        return Law(2, "free")
    raise ValueError(f"unknown form {form!r}; choose one of {FORMS + ('joint',)}")


def box_bounds(model: Law, ly: np.ndarray) -> list[tuple[float, float]]:
    """The box the optimisers keep the centred parameters in: e near the data, the rest within BOUND."""
    b = []
    if model.e_mode == "free":
        b.append((ly.min() - 40.0, ly.max() + 1.0))
    for _ in range(model.n_terms):
        b += [(-BOUND, BOUND), (-BOUND / 4, BOUND / 4)]
    return b
