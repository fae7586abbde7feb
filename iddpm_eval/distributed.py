"""Evaluation across processes: ``torchrun --nproc_per_node N iddpm-eval fid|stats|nll ...``.

Each rank takes a contiguous shard of the images (aligned to the batch size, so its batches are
the batches one process would form: the features are the same numbers), extracts its features,
and the shards are combined:

* feature statistics as float64 sums (:func:`reduce_stats`): every rank's sum of (x - c) and of
  (x - c)(x - c)^T about a common shift c (rank 0's shard mean, for accuracy), all-reduced, then
  mean and covariance (ddof = 1) from the totals: never a mean of means;
* features, where KID, precision/recall or a bootstrap need them, gathered in rank order
  (:func:`gather_rows`): every rank then holds the same features and computes the same numbers;
* the fingerprint (sha256 of all image bytes in order, as one process computes it): rank 0
  receives the other shards' bytes (:func:`ordered_digest`).

A trainer checkpoint as a source is sampled shard by shard (shard k seeded from (seed, k)), so
each rank samples only its own shards and no image is written. Only rank 0 writes files or
appends to results tables; the command line prints from rank 0 only.

The process group uses gloo whatever the device: the collectives move float64 sums and numpy
arrays held on the CPU; each rank runs the networks on its own device (``cuda:LOCAL_RANK`` when
CUDA exists). Reuses :mod:`iddpm_core.distributed`.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch

from iddpm_core import distributed as D

__all__ = ["init", "active", "rank", "world", "is_main", "device", "shard", "reduce_stats", "gather_rows",
           "ordered_digest", "broadcast"]


def init() -> bool:
    """Join torchrun's process group (gloo) when ``WORLD_SIZE`` > 1; True when this call made it."""
    return D.init_from_env(None)


def active() -> bool:
    return D.get_world_size() > 1


def rank() -> int:
    return D.get_rank()


def world() -> int:
    return D.get_world_size()


def is_main() -> bool:
    return D.is_main()


def device(spec: str | None) -> str | None:
    """``spec`` unchanged when given; else, under torchrun, this rank's device (``cuda:LOCAL_RANK``
    or the CPU); else None (the caller's default)."""
    if spec is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return spec
    return str(D.pick_device("auto"))


def shard(n: int, align: int = 1) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of ``n`` items, cut at multiples of ``align`` (blocks
    of ``align`` items are dealt out as evenly as possible, in rank order)."""
    blocks = math.ceil(n / max(1, align)) if n else 0
    r, w = rank(), world()
    lo_b, hi_b = blocks * r // w, blocks * (r + 1) // w
    return min(n, lo_b * align), min(n, hi_b * align)


def broadcast(obj, src: int = 0):
    return D.broadcast_object(obj, src)


def reduce_stats(n: int, mean: np.ndarray | None, m2: np.ndarray | None) -> tuple[int, np.ndarray, np.ndarray]:
    """Combine every rank's (count, mean, centred co-moment) into the global ones through float64
    sums about a common shift (see the module docstring). Ranks without rows pass n = 0."""
    dims = [d for d in D.all_gather_object(None if mean is None else int(mean.shape[0])) if d is not None]
    if not dims:
        return 0, np.zeros(0), np.zeros((0, 0))
    dim = dims[0]
    if mean is None:
        mean, m2 = np.zeros(dim), np.zeros((dim, dim))
    shift = np.asarray(broadcast(mean if rank() == 0 else None), np.float64)
    d = mean - shift
    buf = np.empty(1 + dim + dim * dim, np.float64)
    buf[0] = n
    buf[1:1 + dim] = n * d                                   # sum of (x - c)
    buf[1 + dim:] = (m2 + n * np.outer(d, d)).ravel()        # sum of (x - c)(x - c)^T
    total = D.all_reduce_sum(torch.from_numpy(buf)).numpy()
    big_n = int(round(total[0]))
    if big_n == 0:
        return 0, np.zeros(dim), np.zeros((dim, dim))
    dm = total[1:1 + dim] / big_n
    m2_all = total[1 + dim:].reshape(dim, dim) - big_n * np.outer(dm, dm)
    return big_n, shift + dm, m2_all


def gather_rows(local: np.ndarray | None) -> np.ndarray | None:
    """Every rank's rows concatenated in rank order (on every rank); None when no rank has any."""
    parts = [p for p in D.all_gather_object(local) if p is not None and len(p)]
    return np.concatenate(parts) if parts else None


def ordered_digest(head: bytes, local: bytes) -> str:
    """sha256 of ``head`` then every rank's ``local`` bytes in rank order, computed on rank 0 and
    sent to all (``head`` is rank 0's)."""
    import torch.distributed as dist

    parts = [None] * world() if rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    hexd = None
    if rank() == 0:
        h = hashlib.sha256(head)
        for p in parts:
            h.update(p)
        hexd = h.hexdigest()
    return broadcast(hexd)
