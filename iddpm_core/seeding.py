"""Seeds and random-number-generator states.

:func:`seed_from` mixes integers into one seed, so every random draw of training and sampling is
keyed by what it is for (seed, step, shard, ...) rather than by how many draws came before.
:func:`rng_state` / :func:`set_rng_state` save and restore a process's global generators (torch,
numpy, python, cuda) for exact resumption; :func:`seed_process` seeds them for one process.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_from(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence)."""
    vals = [int(v) for v in values]
    if any(v < 0 for v in vals):
        raise ValueError(f"seeds must be non-negative integers, got {vals}")
    state = np.random.SeedSequence(vals).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, python, cuda) as plain numpy/Python objects, which
    gather across processes by pickling (tensors in ``all_gather_object`` fail to unpickle in some
    torch versions); the trainer turns them into tensors for the checkpoint."""
    st = {"torch": torch.get_rng_state().numpy(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    """Restore the generators from a :func:`rng_state` dict (or its tensor form from a checkpoint);
    the cuda states only when this machine has as many devices as were saved."""
    torch.set_rng_state(torch.as_tensor(np.asarray(st["torch"], dtype=np.uint8)))
    np_state = st["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(np.asarray(c, dtype=np.uint8)) for c in st["cuda"]])


def seed_process(seed: int, rank: int) -> None:
    """Seed torch, numpy and python's global generators of process ``rank`` from ``seed``."""
    s = seed_from(seed, rank, 2)
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)
