"""Which rows of a sweep table a fit uses: the compute frontier, the last checkpoint of each run, or all."""

from __future__ import annotations

import numpy as np
import pandas as pd

POINTS = ("frontier", "all", "last")


def frontier_mask(x, y) -> np.ndarray:
    """Rows not dominated by another row with smaller-or-equal x and strictly smaller y."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ux, inv = np.unique(x, return_inverse=True)
    group_min = np.full(len(ux), np.inf)
    np.minimum.at(group_min, inv, y)
    envelope = np.minimum.accumulate(group_min)  # min y over rows with x' <= x
    return y <= envelope[inv]


def last_mask(groups, step) -> np.ndarray:
    """The last checkpoint (largest step) of each run."""
    df = pd.DataFrame({"g": np.asarray(groups), "s": np.asarray(step, dtype=float)})
    return (df["s"] == df.groupby("g")["s"].transform("max")).to_numpy()


def select_points(points: str, x, y, groups, step, present: np.ndarray) -> np.ndarray:
    """Mask of rows used for the fit, among the ``present`` ones (a bootstrap resample recomputes it)."""
    if points == "all":
        return present.copy()
    idx = np.flatnonzero(present)
    m = np.zeros(len(present), dtype=bool)
    if points == "frontier":
        m[idx] = frontier_mask(x[idx], y[idx])
    elif points == "last":
        m[idx] = last_mask(groups[idx], step[idx])
    else:
        raise ValueError(f"unknown point selection {points!r}; choose one of {POINTS}")
    return m
