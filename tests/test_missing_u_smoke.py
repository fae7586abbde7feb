"""The Missing-U comparison (benchmarks/missing_u/): the measurements of one checkpoint on tiny models
(latency, solver study, FID against sampling steps with real Inception, denoising), the experiment's
smoke preset end to end (every part; a rerun skips and keeps the numbers), the order-statistic interval of a median, and the claims' verdicts."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from iddpm_core.checkpoint import save_checkpoint
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
BASE = dict(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
            num_heads=2, learn_sigma=True)


def _checkpoint(path, cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, m, cfg, diffusion_config=DiffusionConfig(steps=10).to_dict(), step=3)
    return str(path)


def test_measurements_of_one_checkpoint(tmp_path, one_thread):
    from benchmarks.missing_u.measure import measure_checkpoint
    from benchmarks.missing_u.pairings import pairing_row

    unet, cunet = ModelConfig(kind="unet", **BASE), ModelConfig(kind="cunet", **BASE)
    row = pairing_row("tiny", {"unet": unet, "cunet": cunet}, budget=2e9, batch=8)
    assert row["compute_gap"] <= 0.05 and row["cunet_nfe"] == 5 * 4  # 5 ODE blocks x rk4
    assert row["params_ratio"] == pytest.approx(row["cunet_params"] / row["unet_params"], abs=1e-4)

    blocks = 5
    for kind, cfg in (("unet", unet), ("cunet", cunet)):
        ckpt = _checkpoint(tmp_path / f"{kind}.pt", cfg)
        out = measure_checkpoint(ckpt, "digits", tmp_path / kind, preset="smoke")
        lat = out["latency"]
        assert [r["batch"] for r in lat] == [1, 4] and all(r["per_image_s"] > 0 for r in lat)
        assert all(len(r["times_s"]) == 3 and r["per_image_s"] == pytest.approx(np.median(r["times_s"]) / r["batch"])
                   for r in lat)
        fid = out["fid_steps"]
        trained = [r for r in fid if r["trained_solver"]]
        assert {(r["sampler"], r["steps"]) for r in trained} == {("ddpm", 2), ("ddpm", 10), ("ddim", 2), ("ddim", 10)}
        assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 and r["fid_n"] == 8 for r in fid)
        if kind == "cunet":
            solvers = out["solvers"]
            assert [r["solver"] for r in solvers] == ["euler", "rk4", "dopri5"] * 2
            assert [r["nfe"] for r in solvers if r["solver"] != "dopri5"] == [blocks, 4 * blocks] * 2
            # the other solvers' FID at DDIM 2 steps; rk4 (the trained solver) is already in the grid
            others = [(r["solver"], r["sampler"], r["steps"]) for r in fid if not r["trained_solver"]]
            assert others == [("euler", "ddim", 2), ("dopri5", "ddim", 2)]
            assert all(r["solver"] == "rk4" for r in trained)
        else:
            assert out["solvers"] == [] and len(fid) == 4
        den = out["denoising"]
        assert [r["sigma"] for r in den] == [0.1, 0.3] and den[0]["t"] < den[1]["t"]
        for r in den:
            assert r["n"] == 6
            for m in ("denoised_psnr", "noisy_psnr", "denoised_ssim"):
                assert r[f"{m}_low"] <= r[m] <= r[f"{m}_high"] and np.isfinite(r[m])
        # cached: a second call reads every measurement back instead of recomputing it
        again = measure_checkpoint(ckpt, "digits", tmp_path / kind, preset="smoke")
        assert again["latency"] == out["latency"] and again["fid_steps"] == out["fid_steps"]


def test_settings_are_checked_by_name():
    from iddpm_eval.missing_u_eval import check_settings

    check_settings({"fid_num": 8, "mu_steps": [25, 0], "mu_solvers": [["dopri5", 1, 1e-5]]})
    for bad, key in (({"mu_stepz": [1]}, "mu_stepz"), ({"mu_steps": []}, "mu_steps"),
                     ({"mu_samplers": ["euler"]}, "mu_samplers"), ({"mu_solvers": [["rk5", 1, 1e-3]]}, "mu_solvers"),
                     ({"mu_steps_num": 1}, "mu_steps_num"), ({"mu_final_only": 1}, "mu_final_only"),
                     ({"mu_sigmas": [0.1, -1]}, "mu_sigmas"), ({"fid_nun": 3}, "fid_nun")):
        with pytest.raises(ValueError, match=key):
            check_settings(bad)


def test_median_interval_is_the_order_statistic_interval():
    from scipy.stats import binom

    from iddpm_eval.experiment.report_missing_u import median_interval

    x = np.arange(15, 0, -1, dtype=float)  # 15 .. 1: sorted ascending inside
    ci = median_interval(x)
    # n = 15: j = 4 is the largest j with P(j <= B <= 11) >= 0.95 for B ~ Bin(15, 1/2)
    assert ci["median"] == 8 and (ci["low"], ci["high"]) == (4.0, 12.0)
    assert ci["coverage"] == pytest.approx(binom.cdf(11, 15, 0.5) - binom.cdf(3, 15, 0.5))
    assert binom.cdf(10, 15, 0.5) - binom.cdf(4, 15, 0.5) < 0.95 <= ci["coverage"]
    small = median_interval([3.0, 1.0, 2.0])  # too few for 95%: the range, with its own coverage 1 - 2/8
    assert (small["low"], small["high"], small["coverage"]) == (1.0, 3.0, 0.75)


def _train_rows(fid_u, fid_c, wall_u=60.0, wall_c=30.0):
    rows = []
    for side, fids, wall in (("unet", fid_u, wall_u), ("cunet", fid_c, wall_c)):
        for k, (v, h) in enumerate(fids, 1):
            rows.append({"run": side, "side": side, "step": k, "point": k, "fraction": k / len(fids),
                         "params": 100 if side == "unet" else 30, "forward_flops": 1e9 if side == "unet" else 3e8,
                         "nfe": 0 if side == "unet" else 28, "train_flops": 1e12 * k,
                         "wall_seconds": wall * k / len(fids), "fid": v, "fid_ci_low": v - h, "fid_ci_high": v + h,
                         "nll": 5.0, "nll_ci_low": 4.0, "nll_ci_high": 6.0})
    return pd.DataFrame(rows)


def test_claims_are_judged_with_the_intervals():
    from iddpm_eval.experiment.report_missing_u import claims

    empty = pd.DataFrame()
    got = {c["claim"].split(" (")[0]: c for c in claims(_train_rows([(50, 2), (40, 2)], [(45, 2), (30, 2)]),
                                                        empty, empty, empty)}
    assert got["fewer parameters"]["holds"] == "yes" and "0.300" in got["fewer parameters"]["measured"]
    assert got["equal training compute"]["holds"] == "yes"
    fid = got["converges faster: FID at equal training compute"]
    assert got["converges faster: bits/dim at equal training compute"]["holds"] == "inconclusive"  # equal
    assert fid["holds"] == "holds" and fid["measured"] == "0.50: holds; 1.00: holds"
    assert got["converges faster against wall time"]["holds"] == "holds"  # lower FID in half the time
    # overlapping intervals are inconclusive; an interval entirely above is reversed
    got = claims(_train_rows([(50, 2), (40, 5)], [(45, 2), (44, 5)]), empty, empty, empty)
    assert [c["holds"] for c in got if c["claim"].startswith("converges faster: FID")] == ["inconclusive"]
    got = claims(_train_rows([(50, 2), (40, 1)], [(55, 2), (48, 1)], wall_c=90), empty, empty, empty)
    assert [c["holds"] for c in got if c["claim"].startswith("converges faster")][::2] == ["reversed", "reversed"]


def test_speed_up_claim_compares_the_fid_lost_with_fewer_steps():
    from iddpm_eval.experiment.report_missing_u import _speedup_claims

    def cells(side, fids):
        return [{"side": side, "sampler": "ddim", "trained_solver": True, "steps": k, "fid": v, "fid_ci_low": v - 1,
                 "fid_ci_high": v + 1} for k, v in fids.items()]

    # U-Net loses 20 going from 200 to 25 steps; the continuous U-Net 2: holds. Half-widths 1 and 1 give
    # an interval of +-sqrt(2) on each loss.
    fs = pd.DataFrame(cells("unet", {25: 60, 200: 40}) + cells("cunet", {25: 42, 200: 40}))
    (c,) = _speedup_claims(fs)
    assert c["holds"] == "holds" and c["cunet"] == f"2.00 [{2 - math.sqrt(2):.2f}, {2 + math.sqrt(2):.2f}]"
    fs = pd.DataFrame(cells("unet", {25: 42, 200: 40}) + cells("cunet", {25: 60, 200: 40}))
    assert _speedup_claims(fs)[0]["holds"] == "reversed"
    fs = pd.DataFrame(cells("unet", {25: 41, 200: 40}) + cells("cunet", {25: 42, 200: 40}))
    assert _speedup_claims(fs)[0]["holds"].startswith("consistent")


def _run_smoke(work: Path, out: Path) -> str:
    from iddpm_eval.cli import main

    res = CliRunner().invoke(main, ["experiment", "flops", "--suite", "missing_u", "--preset", "smoke",
                                    "--work", str(work), "--out", str(out), "--no-progress",
                                    "--launcher", "inline"])  # in this process: no job start-up
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


NUMBERS = ["params", "forward_flops", "train_flops", "fid", "fid_ci_low", "fid_ci_high", "nll", "nll_stderr"]


def test_smoke_preset_end_to_end(tmp_path, one_thread):
    work, out = tmp_path / "work", tmp_path / "out"
    _run_smoke(work, out)
    table = pd.read_csv(out / "table.csv")
    assert sorted(set(table["side"])) == ["cunet", "unet"] and len(table) == 4
    assert table[NUMBERS + ["git_commit", "config", "seed", "checkpoint"]].notna().all().all()
    last = table.sort_values("step").groupby("side").tail(1).set_index("side")
    gap = abs(last.loc["unet", "train_flops"] - last.loc["cunet", "train_flops"]) / last["train_flops"].max()
    assert gap <= 0.05  # the smoke preset keeps the equal-compute premise too
    for name in ("latency", "solvers", "fid_steps", "denoising", "claims"):
        assert len(pd.read_csv(out / f"{name}.csv")) > 0, name
    lat = pd.read_csv(out / "latency.csv")
    assert ((lat["per_image_s_low"] <= lat["per_image_s"]) & (lat["per_image_s"] <= lat["per_image_s_high"])).all()
    claims = pd.read_csv(out / "claims.csv")
    equal = claims[claims["claim"].str.startswith("equal training compute")]
    assert list(equal["holds"]) == ["yes"], claims
    assert claims["claim"].str.contains("composes with fewer sampling steps").sum() == 2
    readme = (out / "README.md").read_text()
    assert readme.startswith("# flops (preset `smoke`)") and "## Claims" in readme
    for fig in re.findall(r"\]\(([^)]+\.png)\)", readme):
        assert (out / fig).stat().st_size > 0, fig
    assert {"fid_vs_compute.png", "fid_vs_wall.png", "fid_vs_latency.png"} <= {p.name for p in out.glob("*.png")}
    # a rerun skips every finished checkpoint and keeps the numbers
    before = (out / "table.csv").read_text()
    msg = _run_smoke(work, out)
    assert "skipped 2 finished run(s)" in msg
    assert pd.read_csv(out / "table.csv")[NUMBERS].equals(pd.read_csv(io.StringIO(before))[NUMBERS])


def test_other_pairings_load_at_both_presets():
    from iddpm_eval.experiment.spec import load_experiment

    for name in ("paper", "params", "flops"):
        for preset in ("full", "smoke"):
            exp = load_experiment(REPO / "benchmarks" / "missing_u" / f"{name}.toml", preset)
            assert [r.name for r in exp.runs] == ["unet", "cunet"] and exp.kind == "missing-u"
            assert exp.launcher["max_parallel"] == 1


def test_claims_gathered_into_the_readme_section(tmp_path):
    from benchmarks.missing_u import claims

    for name, holds in (("paper", "yes"), ("flops", "reversed")):
        (tmp_path / name).mkdir()
        pd.DataFrame([{"claim": "c, with a comma", "unet": "1", "cunet": "2", "measured": "m", "holds": holds}]).to_csv(
            tmp_path / name / "claims.csv", index=False)
    (tmp_path / "README.md").write_text("# t\n\nbefore\n<!-- claims:begin -->\nSTALE\n<!-- claims:end -->\nafter\n")
    claims.main(["--results", str(tmp_path)])
    text = (tmp_path / "README.md").read_text()
    assert "STALE" not in text and text.startswith("# t\n\nbefore\n") and text.endswith("<!-- claims:end -->\nafter\n")
    assert "| paper | c, with a comma | 1 | 2 | m | yes |" in text and "| flops | c, with a comma" in text
    got = pd.read_csv(tmp_path / "claims.csv")
    assert list(got["pairing"]) == ["paper", "flops"] and list(got["holds"]) == ["yes", "reversed"]
    (tmp_path / "README.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="claims:begin"):
        claims.main(["--results", str(tmp_path)])


def test_estimate_is_refused_for_the_missing_u_kind():
    from iddpm_eval.cli import main

    res = CliRunner().invoke(main, ["experiment", "flops", "--suite", "missing_u", "--estimate"])
    assert res.exit_code == 2 and "no cost model for the missing-u kind" in res.output
