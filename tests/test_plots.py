"""Figures: each plot writes the PNG it was asked for, laid out as drawn (one or two panels); the
scaling plots are the fits of iddpm_eval.scaling on a known law."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.image import imread

from iddpm_eval import plots, scaling
from iddpm_eval.nll import breakdown


def _image(path):
    img = imread(path)
    assert img.ndim == 3 and img[..., :3].std() > 0.05  # drawn, not blank
    return img.shape[0], img.shape[1]


def _sweep():
    """Three model sizes, five checkpoints each, on y = 2 + 300 N^-0.3 + 500 D^-0.25."""
    return pd.DataFrame([dict(run=i, params=n, images_seen=d, train_flops=6.0 * n * d, step=j,
                              fid=2 + 300 * n ** -0.3 + 500 * d ** -0.25)
                         for i, n in enumerate((2e5, 2e6, 2e7)) for j, d in enumerate(np.geomspace(3e4, 3e6, 5))])


def test_scaling_and_joint_plots(tmp_path):
    t = _sweep()
    for form in ("saturating", "fixed-E"):
        res = scaling.scaling_fit(t, "train_flops", "fid", form=form, fixed_E=1.0 if form == "fixed-E" else None,
                                  n_boot=5, progress=False)
        out = plots.plot_scaling(res, tmp_path / f"{form}.png")
        h, w = _image(out)
        assert out == tmp_path / f"{form}.png" and 1.1 < w / h < 1.6  # one 6.4 x 4.8 panel
    res = scaling.joint_fit(t, "fid", n_boot=5, progress=False)
    h, w = _image(plots.plot_joint(res, tmp_path / "joint.png"))
    assert 1.1 < w / h < 1.6


def test_isoflop_plot(tmp_path):
    from iddpm_eval.scaling.checks import isoflop_profiles

    rows = [dict(run=f"r{i}_{c:g}", params=n, train_flops=c, fid=1 + (np.log10(n) - np.log10(c) / 3) ** 2)
            for c in (1e12, 1e15) for i, n in enumerate(np.logspace(np.log10(c) / 3 - 1, np.log10(c) / 3 + 1, 6))]
    res = isoflop_profiles(pd.DataFrame(rows), [1e12, 1e15], draws=0)
    h, w = _image(plots.plot_isoflop(res, tmp_path / "iso.png"))
    assert w / h > 2.0  # two 5.5 x 4.4 panels side by side


def test_breakdown_plot(tmp_path):
    vb = np.abs(np.random.default_rng(0).standard_normal((4, 20)))
    vb[:, 5] = 0.0  # zero terms and MSEs on log axes
    table = breakdown(vb, vb ** 2, np.zeros_like(vb))
    out = plots.plot_breakdown(tmp_path / "terms.png", table, "title")
    h, w = _image(out)
    assert out == tmp_path / "terms.png" and w / h > 2.0  # two panels of 4.5 x 3.6
