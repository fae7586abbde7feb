"""Improved precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020).

Conventions (those of torch-fidelity 0.4 and the ADM evaluator):

- the radius of a point is the Euclidean distance to its k-th nearest neighbour in its own set,
  the point itself excluded (k = 3 by default);
- a point is inside a ball when its distance to the centre is ``<=`` the radius;
- precision = share of generated points inside at least one real ball;
  recall = share of real points inside at least one generated ball;
  density = (1 / (k M)) * sum over the M generated points of the number of real balls holding it;
  coverage = share of real points whose ball holds at least one generated point.
  (The ``prdc`` package compares with ``<``; on continuous features the two agree.)

Distances are computed block by block (``block_size`` x ``block_size``); no full distance matrix
is kept. Each block is a float32 matrix product on features centred on the mean of both sets.
Every decision that float32 rounding could flip is settled again in float64 from the features
themselves (|x - y|^2 summed directly): the result is the one of an exact float64 computation,
whatever the block size or device.

How: with centred float32 rows a, b and their squared norms n_a, n_b (float64), the float32 value
of n_a + n_b - 2 a.b is within ``tau * (n_a + n_b)`` of the true squared distance, with
``tau = gamma_{D+16} = (D+16) u / (1 - (D+16) u)``, u = 2^-24: the worst-case bound of a D-term
float32 dot product (any summation order) plus the rounding of the centred inputs and of the
assembly. Pairs within that band of a radius are recomputed exactly. For the radii, the k + 8
smallest float32 values per point are kept; only candidates whose interval may contain the k-th
value are recomputed exactly, and a point whose candidate list cannot be proved complete is
rescanned. With continuous features a few exact distances per point suffice.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

_EXTRA_CANDIDATES = 8  # float32 candidates kept beyond k for each point
_U32 = 2.0 ** -24  # unit roundoff of float32


def _tau(dim: int) -> float:
    """Relative error bound of a float32 squared distance, in units of n_a + n_b."""
    n = (dim + 16) * _U32
    if n >= 0.5:
        raise ValueError(f"feature dimension {dim} too large for a float32 error bound")
    return n / (1.0 - n) + 1e-12  # + float64 slack


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_features(x, name: str, device: torch.device) -> torch.Tensor:
    """Check a (N, D) real array and put it on ``device`` without copying when possible."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_complex():
            raise ValueError(f"{name}: features must be real, got dtype {t.dtype}")
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{name}: features must be a real numeric array, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        with warnings.catch_warnings():  # read-only arrays (np.load mmap): never written to
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
    if t.dim() != 2:
        raise ValueError(f"{name}: features must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):  # half floats fit float32; integers float64
        t = t.to(torch.float32 if t.is_floating_point() else torch.float64)
    return t.to(device)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class _Centring:
    """Rows of a feature set centred on a fixed point, as float32 blocks, with the float64
    squared norms of those float32 rows (computed once, in blocks; they also check finiteness)."""

    def __init__(self, x: torch.Tensor, mu: torch.Tensor, block_size: int, name: str):
        self.x = x
        # float32 input: centre on a float32 point, one float32 subtraction per element
        self.mu = mu.to(torch.float32) if x.dtype == torch.float32 else mu
        self.n2 = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
        for a, b in _blocks(x.shape[0], block_size):
            self.n2[a:b] = torch.linalg.vector_norm(self.rows(slice(a, b)), dim=1, dtype=torch.float64).square()
        if not bool(torch.isfinite(self.n2).all()):
            raise ValueError(f"{name}: features contain NaN or infinite values (or values too large for "
                             f"float32), shape {tuple(x.shape)}")

    def rows(self, sel) -> torch.Tensor:
        if self.x.dtype == torch.float32:
            return self.x[sel] - self.mu
        return (self.x[sel] - self.mu).to(torch.float32)


def _mean(x: torch.Tensor, block_size: int, name: str) -> torch.Tensor:
    """float64 column means; a NaN or infinity anywhere in x makes them non-finite."""
    s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for a, b in _blocks(x.shape[0], block_size):
        s += x[a:b].sum(0, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"{name}: features contain NaN or infinite values, shape {tuple(x.shape)}")
    return s / x.shape[0]


def _sq32(a2: torch.Tensor, na: torch.Tensor, b: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """float32 squared distances na + nb - 2 a b^T of a row block against a column block, given
    a2 = -2 a (exact in float32). The product starts from zero (plain mm: the dot-product error
    bound holds)."""
    d2 = torch.mm(a2, b.T)
    return d2.add_(nb.to(torch.float32).unsqueeze(0)).add_(na.to(torch.float32).unsqueeze(1))


def _exact_sq(x: torch.Tensor, i: torch.Tensor, y: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Squared distances |x[i] - y[j]|^2 computed directly in float64, in chunks of pairs."""
    out = torch.empty(i.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for s in range(0, i.shape[0], step):
        d = x[i[s:s + step]].to(torch.float64)
        d -= y[j[s:s + step]]
        out[s:s + step] = d.square_().sum(1)
    return out


def _down32(v: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded towards -inf."""
    f = v.to(torch.float32)
    return torch.where(f.to(torch.float64) > v, torch.nextafter(f, torch.full_like(f, -math.inf)), f)


def _up32(v: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded towards +inf."""
    f = v.to(torch.float32)
    return torch.where(f.to(torch.float64) < v, torch.nextafter(f, torch.full_like(f, math.inf)), f)


class _Highest:
    """Force IEEE float32 matrix products (no TF32 / bf16 shortcuts) inside the block."""

    def __enter__(self):
        self.old = torch.get_float32_matmul_precision()
        if self.old != "highest":
            torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        if self.old != "highest":
            torch.set_float32_matmul_precision(self.old)


def _merge(vals, idx, rows, d2, dim, offset, m):
    """Keep the m smallest float32 values per row of ``vals``/``idx`` (rows slice) after adding
    the block ``d2`` read along ``dim`` (1: rows of d2 are points; 0: columns are)."""
    kk = min(m, d2.shape[dim])
    v, j = torch.topk(d2, kk, dim=dim, largest=False, sorted=False)
    if dim == 0:
        v, j = v.T, j.T
    allv = torch.cat([vals[rows], v], 1)
    alli = torch.cat([idx[rows], j + offset], 1)
    v2, p = torch.topk(allv, m, dim=1, largest=False, sorted=False)
    vals[rows] = v2
    idx[rows] = torch.gather(alli, 1, p)


def _knn_sq(cen: "_Centring", k: int, block_size: int, bar) -> torch.Tensor:
    """Exact squared k-NN radii (float64) of every row of the set, self excluded."""
    x, n2 = cen.x, cen.n2
    n, dim = x.shape
    dev = x.device
    tau = _tau(dim)
    m = min(k + _EXTRA_CANDIDATES, n - 1)
    blocks = _self_blocks(n, block_size)
    vals = torch.full((n, m), math.inf, dtype=torch.float32, device=dev)
    idx = torch.zeros((n, m), dtype=torch.int64, device=dev)
    for bi, (a0, a1) in enumerate(blocks):  # upper triangle of tiles; each tile serves both sides
        xa, na = cen.rows(slice(a0, a1)), n2[a0:a1]
        xa2 = xa * -2.0
        for b0, b1 in blocks[bi:]:
            xb, nb = (xa, na) if b0 == a0 else (cen.rows(slice(b0, b1)), n2[b0:b1])
            d2 = _sq32(xa2, na, xb, nb)
            if b0 == a0:
                d2.fill_diagonal_(math.inf)
            _merge(vals, idx, slice(a0, a1), d2, 1, b0, m)
            if b0 != a0:
                _merge(vals, idx, slice(b0, b1), d2, 0, a0, m)
            bar.update(1)
            del d2
    # The exact value of candidate j of row i lies in [v_ij - t_ij, v_ij + t_ij], t_ij =
    # tau (n2_i + n2_j); so the exact k-th value R_i lies in [lo_i, hi_i], the k-th smallest lower
    # and upper ends. Candidates with v + t < lo are surely below R, those with v - t > hi surely
    # above; R is the (k - #below)-th smallest exact value of the band in between.
    v = vals.to(torch.float64)
    t = tau * (n2.unsqueeze(1) + n2[idx])
    lo = torch.kthvalue(v - t, k, dim=1).values.unsqueeze(1)
    hi = torch.kthvalue(v + t, k, dim=1).values.unsqueeze(1)
    below = v + t < lo
    band = ~below & ~(v - t > hi)
    i, j = torch.nonzero(band, as_tuple=True)
    exact = torch.full((n, m), math.inf, dtype=torch.float64, device=dev)
    exact[i, j] = _exact_sq(x, i, x, idx[i, j])
    exact = torch.sort(exact, 1).values
    rad2 = torch.gather(exact, 1, (k - 1 - below.sum(1)).unsqueeze(1)).squeeze(1)
    if m < n - 1:  # points never kept as candidates lie above v_max; they must lie above hi too
        floor = v.max(1).values - tau * (n2 + n2.max())
        failed = torch.nonzero(floor <= hi.squeeze(1)).flatten()
        if failed.numel():
            _rescan(cen, failed, rad2, k, tau, block_size)
    return rad2


def _self_blocks(n: int, block_size: int) -> list[tuple[int, int]]:
    """Tiles for a set against itself: half the block size, so that the wasted lower half of the
    diagonal tiles stays small; memory stays below one block_size^2 block."""
    return _blocks(n, max(1, block_size // 2))


def _rescan(cen: _Centring, rows, rad2, k, tau, block_size):
    """Exact k-NN radii for ``rows`` whose float32 candidate list was not provably complete:
    every point that may lie within the upper bound rad2[row] is recomputed in float64."""
    x, n2 = cen.x, cen.n2
    n = x.shape[0]
    for r0 in range(0, rows.numel(), block_size):
        rr = rows[r0:r0 + block_size]
        xa2, na = cen.rows(rr).mul_(-2.0), n2[rr]
        upper = rad2[rr]
        pi, pj = [], []
        for b0, b1 in _blocks(n, block_size):
            d2 = _sq32(xa2, na, cen.rows(slice(b0, b1)), n2[b0:b1]).to(torch.float64)
            keep = d2 - tau * (na.unsqueeze(1) + n2[b0:b1].unsqueeze(0)) <= upper.unsqueeze(1)
            i, j = torch.nonzero(keep, as_tuple=True)
            j = j + b0
            own = rr[i] != j
            pi.append(i[own])
            pj.append(j[own])
        i, j = torch.cat(pi), torch.cat(pj)
        ex = _exact_sq(x, rr[i], x, j)
        for t in range(rr.numel()):
            rad2[rr[t]] = torch.kthvalue(ex[i == t], k).values


def knn_radii(x, k: int = 3, block_size: int = 4096, device=None, progress: bool = False) -> np.ndarray:
    """Distance from each row of ``x`` (N, D) to its k-th nearest neighbour in ``x``, itself
    excluded (float64, exact up to float64 rounding). Memory: O(block_size^2 + N k)."""
    _check_k_block(k, block_size)
    dev = _resolve_device(device)
    t = _as_features(x, "x", dev)
    if t.shape[0] <= k:
        raise ValueError(f"x: need more than k={k} points for k-NN radii, got shape {tuple(t.shape)}")
    nb = len(_self_blocks(t.shape[0], block_size))
    with _Highest(), torch.no_grad(), tqdm(total=nb * (nb + 1) // 2, desc="k-NN radii", disable=not progress) as bar:
        rad2 = _knn_sq(_Centring(t, _mean(t, block_size, "x"), block_size, "x"), k, block_size, bar)
    # numpy's sqrt is correctly rounded; torch's vectorised float64 sqrt is not always (sqrt(2) comes
    # out 1 ulp low with torch 2.14 on x86-64)
    return np.sqrt(rad2.cpu().numpy())


def _check_k_block(k, block_size):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _members(d2, lo, hi, thresh, xr, ri, xf, fi):
    """(row, column) positions in the block ``d2`` whose exact squared distance is <= the
    threshold. ``lo``/``hi`` are float32 thresholds below/above which the float32 value decides
    (broadcast against d2); ``thresh(i, j)`` gives the float64 threshold of pairs in between."""
    i, j = torch.nonzero(d2 <= hi, as_tuple=True)
    if i.numel() == 0:
        return i, j
    sure = d2[i, j] <= (lo.expand_as(d2)[i, j])
    b = torch.nonzero(~sure).flatten()
    if b.numel():
        sure[b] = _exact_sq(xr, ri[i[b]], xf, fi[j[b]]) <= thresh(i[b], j[b])
    return i[sure], j[sure]


def compute_prdc(real, fake, k: int = 3, block_size: int = 4096, device=None, progress: bool = False,
                 f_score: bool = False, beta: float | None = None) -> dict:
    """Precision, recall, density and coverage of ``fake`` (M, D) against the reference ``real``
    (N, D) with k-NN balls; N and M may differ. Returns a dict with ``precision``, ``recall``,
    ``density``, ``coverage``, ``k``, ``n_real``, ``n_fake``; with ``f_score`` also
    ``f1`` = 2PR/(P+R) and, when ``beta`` is given, ``f_beta`` = (1+b^2)PR/(b^2 P + R) and ``beta``.

    ``block_size`` bounds memory: about 4 * block_size^2 float32-sized temporaries plus O((N+M) k),
    beside the features themselves. ``device`` None picks CUDA when available; the result is the
    same on any device and for any block size.
    """
    _check_k_block(k, block_size)
    if beta is not None and not (isinstance(beta, (int, float, np.number)) and 0 < float(beta) < math.inf):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    dev = _resolve_device(device)
    xr = _as_features(real, "real", dev)
    xf = _as_features(fake, "fake", dev)
    if xr.shape[1] != xf.shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {tuple(xr.shape)} vs {tuple(xf.shape)}")
    n, m = xr.shape[0], xf.shape[0]
    for name, t in (("real", xr), ("fake", xf)):
        if t.shape[0] <= k:
            raise ValueError(f"{name}: need more than k={k} points, got shape {tuple(t.shape)}")
    _tau(xr.shape[1])  # a dimension too large for the float32 error bound is refused before any work
    sr, sf = len(_self_blocks(n, block_size)), len(_self_blocks(m, block_size))
    total = sr * (sr + 1) // 2 + sf * (sf + 1) // 2 + len(_blocks(n, block_size)) * len(_blocks(m, block_size))
    with _Highest(), torch.no_grad(), tqdm(total=total, desc="prdc", disable=not progress) as bar:
        # one centring point (the mean of both sets) serves the three passes
        mu = (_mean(xr, block_size, "real") * n + _mean(xf, block_size, "fake") * m) / (n + m)
        cr, cf = _Centring(xr, mu, block_size, "real"), _Centring(xf, mu, block_size, "fake")
        rr2 = _knn_sq(cr, k, block_size, bar)  # real radii^2
        rf2 = _knn_sq(cf, k, block_size, bar)  # fake radii^2
        counts, covered, recalled = _cross(cr, cf, rr2, rf2, block_size, bar)
    return _scores(counts, covered, recalled, k, n, m, f_score, beta)


def _cross(cr: _Centring, cf: _Centring, rr2, rf2, block_size: int, bar):
    """Real against fake, block by block: for each fake point the number of real balls holding it,
    for each real point whether its ball holds a fake point and whether it lies in a fake ball."""
    xr, xf = cr.x, cf.x
    n, m, dev = xr.shape[0], xf.shape[0], xr.device
    tau = _tau(xr.shape[1])
    counts = torch.zeros(m, dtype=torch.int64, device=dev)  # real balls holding each fake
    covered = torch.zeros(n, dtype=torch.bool, device=dev)  # real ball holds some fake
    recalled = torch.zeros(n, dtype=torch.bool, device=dev)  # real point in some fake ball
    bf = _blocks(m, block_size)
    fake_blocks = [float(cf.n2[f0:f1].max()) for f0, f1 in bf]  # for per-block tolerances
    chunk = max(1, (1 << 23) // block_size)  # rows per chunk: index lists stay O(block^2)
    for a0, a1 in _blocks(n, block_size):
        xa2, na = cr.rows(slice(a0, a1)).mul_(-2.0), cr.n2[a0:a1]
        na_max = float(na.max())
        for (f0, f1), nf_max in zip(bf, fake_blocks):
            xb, nb = cf.rows(slice(f0, f1)), cf.n2[f0:f1]
            d2 = _sq32(xa2, na, xb, nb)
            t2 = rf2[f0:f1]  # real inside fake ball: d2 <= rf2[column]
            w2 = tau * (nb + na_max)
            lo2, hi2 = _down32(t2 - w2).unsqueeze(0), _up32(t2 + w2).unsqueeze(0)
            for c0 in range(0, a1 - a0, chunk):  # row chunks keep the index lists small
                c1 = min(c0 + chunk, a1 - a0)
                dc, ri = d2[c0:c1], torch.arange(a0 + c0, a0 + c1, device=dev)
                fi = torch.arange(f0, f1, device=dev)
                t1 = rr2[a0 + c0:a0 + c1]  # fake inside real ball: d2 <= rr2[row]
                w1 = tau * (na[c0:c1] + nf_max)
                lo1, hi1 = _down32(t1 - w1).unsqueeze(1), _up32(t1 + w1).unsqueeze(1)
                i, j = _members(dc, lo1, hi1, lambda i, j: rr2[ri[i]], xr, ri, xf, fi)
                counts.index_add_(0, j + f0, torch.ones_like(j))
                covered[ri[i]] = True
                i, j = _members(dc, lo2, hi2, lambda i, j: rf2[fi[j]], xr, ri, xf, fi)
                recalled[ri[i]] = True
            del d2
            bar.update(1)
    return counts, covered, recalled


def _scores(counts, covered, recalled, k: int, n: int, m: int, f_score: bool, beta) -> dict:
    precision = float((counts > 0).double().mean())
    recall = float(recalled.double().mean())
    out = {
        "precision": precision,
        "recall": recall,
        "density": float(counts.double().sum()) / (k * m),
        "coverage": float(covered.double().mean()),
        "k": int(k),
        "n_real": n,
        "n_fake": m,
    }
    if f_score:
        s = precision + recall
        out["f1"] = 2 * precision * recall / s if s > 0 else 0.0
        if beta is not None:
            b2 = float(beta) ** 2
            den = b2 * precision + recall
            out["f_beta"] = (1 + b2) * precision * recall / den if den > 0 else 0.0
            out["beta"] = float(beta)
    return out
