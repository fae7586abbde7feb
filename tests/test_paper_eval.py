"""Evaluation pieces of the paper experiments: precision/recall in the sweep hook (``fid_pr``),
FID against sampling steps, and the gradient-noise hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from iddpm_core import sweep as sw
from iddpm_core import sweep_grid as sg
from test_sweep import FakeTrainer, tiny_base


def test_sweep_hook_precision_recall_equals_prdc_on_the_fid_features(tmp_path):
    from iddpm_eval import sources, sweep_eval
    from iddpm_eval.prdc import compute_prdc

    runs = sg.make_grid(tiny_base(), [8], [1], [2])
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


def test_sampling_steps_cells_sample_with_the_named_variance_and_resume(tmp_path):
    import dataclasses

    from iddpm_core.checkpoint import load_model
    from iddpm_core.sample import sample_images
    from iddpm_eval import paper_eval

    runs = sg.make_grid(tiny_base(), [8], [1], [2], objectives=["simple"])
    settings = {"ss_steps": [3], "ss_variants": {"simple": ["ddpm-fixed_large", "ddpm-fixed_small", "ddim"]},
                "fid_num": 6, "fid_ref_num": 8, "fid_bootstrap": 0, "nll_num": 0, "seed": 2}
    paper_eval.check_settings(settings)
    sw.run_sweep(tmp_path, runs, paper_eval.evaluate_sampling_steps, eval_settings=settings, train_fn=FakeTrainer(),
                 progress=False)
    row = pd.read_csv(tmp_path / sw.TABLE).iloc[0]
    ckpt = str(tmp_path / row["checkpoint"])
    cells = tmp_path / "runs" / runs[0].name / "eval" / "step_000002" / "sampling"

    def samples(name):
        with np.load(cells / name / "samples.npz") as z:
            return z["arr_0"]

    sm = load_model(ckpt)
    assert sm.diffusion_config.var_type == "fixed_large"
    small = dataclasses.replace(sm.diffusion_config, var_type="fixed_small")
    sm2 = load_model(ckpt)
    sm2.diffusion_config = small
    np.testing.assert_array_equal(samples("ddpm-fixed_small_3"),
                                  sample_images(sm2, 6, 3, "ddpm", seed=2, batch_size=256, progress=False))
    np.testing.assert_array_equal(samples("ddpm-fixed_large_3"),
                                  sample_images(ckpt, 6, 3, "ddpm", seed=2, batch_size=256, progress=False))
    np.testing.assert_array_equal(samples("ddim_3"), sample_images(ckpt, 6, 3, "ddim", seed=2, batch_size=256,
                                                                   progress=False))
    assert not np.array_equal(samples("ddpm-fixed_small_3"), samples("ddpm-fixed_large_3"))
    for v in ("ddpm-fixed_large", "ddpm-fixed_small", "ddim"):
        assert np.isfinite(row[f"fid_{v}_3"]) and row[f"fid_{v}_3_n"] == 6
    # a second evaluation reads the cells instead of sampling again
    (cells / "ddim_3" / "samples.npz").unlink()
    info = {"run_dir": str(tmp_path / "runs" / runs[0].name), "out_dir": str(tmp_path), "step": 2,
            "objective": "simple", "data": "digits", "eval": settings}
    again = paper_eval.evaluate_sampling_steps(ckpt, info)
    assert again["fid_ddim_3"] == row["fid_ddim_3"] and not (cells / "ddim_3" / "samples.npz").exists()
    with pytest.raises(ValueError, match="ss_variants"):
        paper_eval.check_settings({"ss_variants": {"simple": ["ddpm-bogus"]}})


def test_experiment_spec_refuses_bad_input_with_the_key(tmp_path):
    from iddpm_core.sweep import SweepError
    from iddpm_eval.experiment.spec import load_experiment

    base = """name = "x"\nkind = "ablation"\n[base.model]\nchannel_mult = [1, 2]\nnum_heads = 1\n
[base.diffusion]\nsteps = 30\n[base.train]\ndata = "digits"\n[budget]\nshort = 2\n
[[rows]]\nname = "a"\nobjective = "simple"\n[[rows]]\nname = "b"\nobjective = "hybrid"\n"""
    p = tmp_path / "x.toml"
    p.write_text(base)
    exp = load_experiment(p)
    assert [r.name for r in exp.runs] == ["a", "b"] and exp.runs[1].config.model.learn_sigma
    assert exp.runs[0].config.diffusion.var_type == "fixed_large" and exp.runs[0].steps == (2,)
    for extra, match in (("", "no preset 'smoke'"),
                         ('[[orderings]]\nclaim = "c"\nmetric = "nll"\nbetter = "a"\nworse = "zz"\n', "unknown: \\['zz'\\]"),
                         ('[presets.smoke.rows.zz]\nsteps = 3\n', "rows that do not exist: \\['zz'\\]")):
        p.write_text(base + extra)
        with pytest.raises(SweepError, match=match):
            load_experiment(p, "smoke" if "presets" in extra or not extra else "full")
    p.write_text(base.replace('objective = "simple"', 'objective = "simple"\nstep = 3'))
    with pytest.raises(SweepError, match=r"rows\[0\] \(a\): unknown key\(s\) \['step'\]"):
        load_experiment(p)
    p.write_text(base.replace('objective = "simple"', 'objective = "simple"\nsteps = "huge"'))
    with pytest.raises(SweepError, match="budget 'huge' is not in"):
        load_experiment(p)


def test_orderings_judged_by_the_intervals():
    from iddpm_eval.experiment.report import judge

    assert judge((1.0, 0.9, 1.1), (2.0, 1.9, 2.1)) == "holds"
    assert judge((2.0, 1.9, 2.1), (1.0, 0.9, 1.1)) == "reversed"
    assert judge((1.0, 0.5, 1.95), (2.0, 1.9, 2.1)).startswith("inconclusive")
    assert judge((1.0, float("nan"), 1.1), (2.0, 1.9, 2.1)) == "not measured"


def test_estimate_scales_measured_costs_by_the_preset_counts():
    from iddpm_eval.experiment.estimate import estimate
    from iddpm_eval.experiment.spec import load_experiment

    exp = load_experiment(Path(__file__).resolve().parent.parent / "benchmarks" / "paper" / "scaling.toml", "smoke")
    costs = {"train_step": {8: 2.0}, "sample_step_per_image": {8: 0.01}, "per_example_grad": {8: 0.1},
             "inception_per_image": {0: 0.5}}
    e = estimate(exp, costs)
    # widths 8, 12, 16, 20 scale the 8-channel cost by (w/8)^2; batch 8 of 64; 4 steps each
    assert e["train_s"] == pytest.approx(2.0 * (1 + 2.25 + 4 + 6.25) * 8 / 64 * 4)
    # per checkpoint: 8 samples x (4 steps x fwd + Inception) + 4 images x 2 timesteps x fwd x 1.5; 2 checkpoints
    per = lambda f: 8 * (4 * f + 0.5) + 4 * 2 * f * 1.5  # noqa: E731
    want = sum(2 * per(0.01 * (w / 8) ** 2) for w in (8, 12, 16, 20)) + 16 * 0.5  # + the reference images
    assert e["eval_s"] == pytest.approx(want)


def test_measured_costs_load_and_give_an_estimate(tmp_path):
    from iddpm_eval.experiment.estimate import estimate, load_costs
    from iddpm_eval.experiment.spec import load_experiment

    p = tmp_path / "timing.csv"
    p.write_text("what,width,seconds\ntrain_step,8,2.0\ntrain_step,16,6.5\ninception_per_image,,0.5\n")
    assert load_costs(p) == {"train_step": {8: 2.0, 16: 6.5}, "inception_per_image": {0: 0.5}}
    # the committed timing file holds every cost the estimate of a paper spec asks for
    spec = Path(__file__).resolve().parent.parent / "benchmarks" / "paper" / "importance_sampling.toml"
    e = estimate(load_experiment(spec, "smoke"), load_costs(Path(__file__).resolve().parent.parent / "results"
                                                             / "paper" / "timing.csv"))
    assert e["train_s"] > 0 and e["eval_s"] > 0 and e["total_s"] == pytest.approx(e["train_s"] + e["eval_s"])


def test_importance_sampling_spec_names_the_gradient_noise_hook():
    from iddpm_eval import paper_eval
    from iddpm_eval.experiment.spec import load_experiment

    spec = Path(__file__).resolve().parent.parent / "benchmarks" / "paper" / "importance_sampling.toml"
    assert sw.load_hook(load_experiment(spec, "smoke").eval_hook) is paper_eval.evaluate_gradient_noise


def test_report_takes_the_rows_nll_interval_and_derives_it_for_older_rows():
    from iddpm_eval.experiment.report import _with_nll_ci
    from iddpm_eval.nll.run import Z

    df = pd.DataFrame({"nll": [3.0, 4.0], "nll_stderr": [0.1, 0.2], "nll_ci_low": [2.5, np.nan],
                       "nll_ci_high": [3.25, np.nan]})
    out = _with_nll_ci(df)
    assert list(out["nll_ci_low"]) == [2.5, 4.0 - Z * 0.2]  # given: kept as the run wrote it
    assert list(out["nll_ci_high"]) == [3.25, 4.0 + Z * 0.2]  # missing: the summary's rule
    old = _with_nll_ci(df.drop(columns=["nll_ci_low", "nll_ci_high"]))  # a table from before the columns
    assert np.allclose(old["nll_ci_low"], [3.0 - Z * 0.1, 4.0 - Z * 0.2], rtol=0, atol=0)
