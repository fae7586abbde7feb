"""Inference measurements: latency structure, the solver study's evaluation counts, FID by sampling steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import forward_flops
from iddpm_core.models.latency import EVALS_PER_STEP, latency, solver_study

CUNET = ModelConfig(kind="cunet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                    attention_resolutions=(4,), num_heads=2, learn_sigma=False)
UNET = ModelConfig(kind="unet", image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                   attention_resolutions=(4,), num_heads=2, learn_sigma=False)


def _perturbed(cfg):
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():  # non-zero output layers, so the adaptive solver has dynamics to follow
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def test_latency_structure_and_threads_restored():
    m = build_model(UNET)
    before = torch.get_num_threads()
    r = latency(m, batch=3, repeats=4, threads=1)
    assert torch.get_num_threads() == before
    assert r["threads"] == 1 and r["batch"] == 3 and r["repeats"] == 4 and len(r["times_s"]) == 4
    assert all(t > 0 for t in r["times_s"])
    assert r["median_batch_s"] == pytest.approx(np.median(r["times_s"]))
    assert r["per_image_s"] == pytest.approx(r["median_batch_s"] / 3)
    assert r["nfe"] == 0
    with pytest.raises(ValueError):
        latency(m, batch=0)


def test_solver_study_counts_evaluations_per_step():
    m = _perturbed(CUNET)
    blocks = len(m.ode_blocks())  # 2 levels: 2 down + middle + 2 up
    assert blocks == 5
    solvers = [("euler", 1), ("euler", 3), ("midpoint", 2), ("rk4", 1), ("rk4", 2), ("dopri5", 1)]
    rows = solver_study(m, solvers, tolerances=(1e-2, 1e-5), batch=2, repeats=1, threads=1)
    assert [r["solver"] for r in rows] == ["euler", "euler", "midpoint", "rk4", "rk4", "dopri5", "dopri5"]
    for r in rows[:5]:
        # torchdiffeq's fixed-grid tableaus: euler 1, midpoint 2, rk4 4 evaluations per step
        assert r["nfe"] == blocks * EVALS_PER_STEP[r["solver"]] * r["solver_steps"]
        assert r["nfe_per_block"] == EVALS_PER_STEP[r["solver"]] * r["solver_steps"]
    loose, tight = rows[5], rows[6]
    for r in (loose, tight):
        # dopri5 per block: 2 evaluations to choose the first step, then 6 per attempted step (FSAL)
        assert (r["nfe"] - 2 * blocks) % 6 == 0 and r["nfe"] >= 8 * blocks
    assert tight["nfe"] > loose["nfe"]  # a tighter tolerance takes more steps
    # FLOPs scale with the evaluations: the ODE part of rk4 x1 is 4 times euler x1's
    e1, r1, e3 = rows[0]["forward_flops"], rows[3]["forward_flops"], rows[1]["forward_flops"]
    assert (r1 - e1) == pytest.approx(3 * (e3 - e1) / 2)
    assert (m.config.solver, m.config.solver_steps) == ("rk4", 1)  # restored
    assert all(b.solver == "rk4" and b.steps == 1 for b in m.ode_blocks())


def test_solver_study_refuses_a_unet():
    with pytest.raises(ValueError, match="continuous U-Net"):
        solver_study(build_model(UNET))


class _FakeExtractor:
    """Cheap stand-in for Inception: 8 block means of the pixels (float64)."""

    mode = "fake"
    weights_sha256 = "0" * 64

    def __call__(self, images):
        x = np.asarray(images, dtype=np.float64).reshape(len(images), 8, -1)
        return {"pool": x.mean(axis=2) + 1e-3 * x.std(axis=2)}


def test_fid_by_sampling_steps_rows(tmp_path, monkeypatch):
    from iddpm_core.checkpoint import save_checkpoint
    from iddpm_core.diffusion import DiffusionConfig
    from iddpm_eval import measure
    from iddpm_eval.fid import fid_from_features
    from iddpm_eval.sampling_steps import fid_by_sampling_steps

    fake = _FakeExtractor()
    ref = fake(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8))["pool"]
    monkeypatch.setattr(measure, "cached_extractor", lambda *a, **k: fake)
    monkeypatch.setattr(measure, "reference_features", lambda *a, **k: ref)
    cfg = ModelConfig(**{**CUNET.to_dict(), "learn_sigma": True})
    path = tmp_path / "c.pt"
    save_checkpoint(path, _perturbed(cfg), cfg, diffusion_config=DiffusionConfig(steps=12).to_dict())
    rows = fid_by_sampling_steps(str(path), tmp_path / "out", steps=(3, None), samplers=("ddpm", "ddim"),
                                 solvers=[("euler", 1, 1e-3), ("rk4", 1, 1e-3)],
                                 eval_settings={"fid_num": 10, "fid_bootstrap": 0, "sample_batch_size": 5},
                                 data="digits")
    assert len(rows) == 2 * 2 * 2
    assert [(r["solver"], r["sampler"], r["steps_label"]) for r in rows[:4]] == [
        ("euler", "ddpm", 3), ("euler", "ddpm", "all"), ("euler", "ddim", 3), ("euler", "ddim", "all")]
    m = build_model(cfg)
    for r in rows:
        assert r["steps"] == (12 if r["steps_label"] == "all" else 3)
        m.set_solver(r["solver"], 1)
        assert r["forward_flops"] == forward_flops(m)
        assert r["sampling_flops"] == r["steps"] * r["forward_flops"]
        assert r["nfe_per_forward"] == 5 * EVALS_PER_STEP[r["solver"]]
        # independent path: the FID of the saved samples under the same features
        tag = f"{r['solver']}x1_tol0.001"
        saved = np.load(tmp_path / "out" / tag / f"{r['sampler']}_{r['steps']}" / "samples.npz")["arr_0"]
        assert saved.shape == (10, 8, 8, 1)
        assert r["fid"] == pytest.approx(fid_from_features(fake(saved)["pool"], ref), rel=1e-9)
    with pytest.raises(ValueError, match="set by this function"):
        fid_by_sampling_steps(str(path), tmp_path / "o2", eval_settings={"fid_steps": 5})


def test_set_solver_refuses_bad_choices_and_keeps_the_model():
    m = _perturbed(CUNET)  # non-zero output layer: the outputs below are not trivially equal
    for bad in (("bogus", 1), ("rk4", 0)):
        with pytest.raises(ValueError, match="solver"):
            m.set_solver(*bad)
        assert (m.config.solver, m.config.solver_steps) == ("rk4", 1)
        assert all((b.solver, b.steps) == ("rk4", 1) for b in m.ode_blocks())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 900.0])
    with torch.no_grad():
        ref = m(x, t)
        m.set_solver("euler", 4)
        other = m(x, t)
        assert m.nfe == 5 * 4 and not torch.equal(other, ref)
        m.set_solver("rk4", 1)
        torch.testing.assert_close(m(x, t), ref, rtol=0, atol=0)  # same weights, same operations
