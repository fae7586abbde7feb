"""Evaluation pieces of the paper experiments: precision/recall in the sweep hook (``fid_pr``),
FID against sampling steps, and the gradient-noise hook."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iddpm_core import sweep as sw
from test_sweep import FakeTrainer, tiny_base


def test_sweep_hook_precision_recall_equals_prdc_on_the_fid_features(tmp_path):
    from iddpm_eval import sources, sweep_eval
    from iddpm_eval.prdc import compute_prdc

    runs = sw.make_grid(tiny_base(), [8], [1], [2])
    settings = {"fid_num": 12, "fid_ref_num": 14, "fid_steps": 3, "fid_bootstrap": 0, "fid_pr": 1, "nll_num": 0,
                "seed": 3}
    sw.run_sweep(tmp_path, runs, sweep_eval.evaluate_checkpoint, eval_settings=settings, train_fn=FakeTrainer(),
                 progress=False)
    row = pd.read_csv(tmp_path / sw.TABLE).iloc[0]
    samples = tmp_path / "runs" / "w8_d1" / "eval" / "step_000002" / "samples.npz"
    fx = sources.make_extractor()
    gen, ref = [sources.measure(sources.resolve(spec), lambda: fx, mode="legacy-tf", need_features=True, num=num,
                                seed=3, progress=False).pool for spec, num in ((str(samples), None), ("digits", 14))]
    want = compute_prdc(ref, gen, k=3)
    for k in ("precision", "recall", "density", "coverage"):
        assert row[k] == pytest.approx(want[k], abs=1e-12), k
    assert row["pr_k"] == 3
    with pytest.raises(ValueError, match="fid_pr"):
        sweep_eval.check_settings({"fid_pr": "yes"})
