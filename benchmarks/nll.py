"""Bits/dim speed: the bound with the timesteps of an image sharing forward passes against the
same bound one timestep per pass (improved-diffusion's ``calc_bpd_loop`` order, ``by_timestep``),
and the cost and error of the K-step estimate, on 28x28 Fashion-MNIST at T = 1000.

Writes results/benchmarks/nll.csv. A small U-Net is first trained for ``--train-steps`` steps so
the per-t profile is realistic. Rows:

* ``exact``: images/s of the batched method (``--batch-size`` pairs per pass), of the loop with one
  image per pass (improved-diffusion's script default) and of the loop with all benchmark images in
  one pass per t; the ratios batched / loop; the largest bits/dim difference between the methods.
  Batched is timed against loop(1) image by image and against loop(N) on all images, alternating,
  so machine load hits both sides alike.
* ``estimate``: for each K and proposal (uniform; importance from the exact run's per-t RMS), over
  ``--seeds`` timestep draws: forward passes per image, images/s, RMS error against the exact bound
  of the same images and noise, mean reported Monte Carlo standard error, and the share of runs
  whose error lies within 2 reported standard errors.

Usage: python benchmarks/nll.py [--images 4] [--steps 1000] [--batch-size 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iddpm_core.io import write_text
from iddpm_eval.nll import bound_terms, breakdown, estimate_bound, load, proposal

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("section", "method", "proposal", "K", "T", "image_size", "model_params", "batch_size", "images",
           "seeds", "forwards_per_image", "images_per_sec", "ratio_vs_loop1", "ratio_vs_loopN", "max_abs_diff_bpd",
           "bpd", "rmse_bpd", "mean_mc_stderr", "within_2se", "torch_threads", "load_avg_1min", "torch_version",
           "machine")


def train_model(out: Path, steps: int, T: int, progress: bool) -> Path:
    from iddpm_core.config import RunConfig, TrainConfig
    from iddpm_core.diffusion import DiffusionConfig
    from iddpm_core.models import ModelConfig
    from iddpm_core.train import train

    model = ModelConfig(image_size=28, in_channels=1, base_channels=16, channel_mult=(1, 2, 2),
                        attention_resolutions=(14,), num_heads=4)
    rc = RunConfig(model=model, diffusion=DiffusionConfig(steps=T),
                   train=TrainConfig(data="fashion-mnist:train", batch_size=16, steps=steps, lr=1e-3,
                                     log_interval=max(1, steps), sample_interval=0, save_interval=0,
                                     sample_num=4, sample_steps="10", ema_rates=(0.9,), device="cpu"))
    return Path(train(rc, out, progress=progress)["checkpoint"])


def row(**kw) -> dict:
    base = {"torch_threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "torch_version": torch.__version__, "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    base.update(kw)
    return base


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def exact_rows(diff, model, x0, idx, args, progress: bool, common: dict) -> tuple[list, np.ndarray, dict]:
    """Round 1, image by image: batched against the loop with one image per pass. Round 2, all
    images at once: batched against the loop with every image in one pass per t. Each pair
    alternates its order, so machine load affects both sides alike. Returns the rows, the exact
    bound per image and the per-t breakdown (the pilot of the estimates)."""
    T = diff.num_timesteps
    secs = {"batched": 0.0, "loop1": 0.0, "loopN": 0.0}
    counted = {"batched": 0, "loop1": 0, "loopN": 0}
    tot = {"batched": [], "loop1": []}
    parts = []

    def timed(name, sl, **kw):
        start = time.perf_counter()
        r = bound_terms(diff, model, x0[sl], idx[sl], progress=progress, **kw)
        secs[name] += time.perf_counter() - start
        counted[name] += len(idx[sl])
        return r

    for i in range(args.images):
        sl = slice(i, i + 1)
        for name in ("batched", "loop1") if i % 2 == 0 else ("loop1", "batched"):
            if name == "batched":
                r = timed(name, sl, batch_size=args.batch_size)
                parts.append(r)
            else:
                r = timed(name, sl, batch_size=1, by_timestep=True)
            tot[name].append(r["total_bpd"][0])
    loopn = timed("loopN", slice(None), batch_size=args.images, by_timestep=True)
    again = timed("batched", slice(None), batch_size=args.batch_size)
    ips = {k: counted[k] / secs[k] for k in secs}
    exact = np.array(tot["batched"])
    diffs = max(np.abs(exact - np.array(tot["loop1"])).max(), np.abs(exact - loopn["total_bpd"]).max(),
                np.abs(exact - again["total_bpd"]).max())
    rows = [row(section="exact", method=name, batch_size=bs, forwards_per_image=T, images_per_sec=ips[name],
                ratio_vs_loop1=ips[name] / ips["loop1"], ratio_vs_loopN=ips[name] / ips["loopN"],
                max_abs_diff_bpd=float(diffs), bpd=float(exact.mean()), **common)
            for name, bs in (("batched", args.batch_size), ("loop1", 1), ("loopN", args.images))]
    pilot = breakdown(*(np.concatenate([p[k] for p in parts]) for k in ("vb", "xstart_mse", "mse")))
    return rows, exact, pilot


def estimate_rows(diff, model, x0, idx, args, exact: np.ndarray, pilot: dict, common: dict) -> list:
    """For each K and proposal, over ``args.seeds`` timestep draws: speed, RMS error against the
    exact bound of the same images and noise, mean reported standard error, share within 2 of them."""
    T, target, rows = diff.num_timesteps, exact.mean(), []
    for k in [int(s) for s in args.ks.split(",") if s]:
        for pname, p in (("uniform", proposal(T)), ("importance", proposal(T, pilot["vb_rms"], 0.05))):
            errs, ses, spent = [], [], 0.0
            for s in range(args.seeds):
                start = time.perf_counter()
                r = estimate_bound(diff, model, x0, k, idx, p=p, sample_seed=1000 + s, batch_size=args.batch_size)
                spent += time.perf_counter() - start
                errs.append(r["total_bpd"].mean() - target)
                ses.append(math.sqrt(r["kl_var"].sum()) / args.images)
            errs, ses = np.array(errs), np.array(ses)
            rows.append(row(section="estimate", method="batched", proposal=pname, K=k, batch_size=args.batch_size,
                            seeds=args.seeds, forwards_per_image=k + 1,
                            images_per_sec=args.images * args.seeds / spent, bpd=float(target + errs.mean()),
                            rmse_bpd=float(np.sqrt((errs ** 2).mean())), mean_mc_stderr=float(ses.mean()),
                            within_2se=float((np.abs(errs) <= 2 * ses).mean()), **common))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000, help="diffusion steps T")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="pairs per forward pass of the batched method (16 is the fastest on the 2-core CPU)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--ks", default="4,16,64")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "nll.csv"))
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    from iddpm_core.data import load_source, to_model_range
    from iddpm_core.models.cost import count_parameters

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train_model(Path(tmp) / "run", args.train_steps, args.steps, progress)
        lm = load(ckpt, device="cpu")
    diff, model, T = lm.diffusion, lm.model, lm.diffusion.num_timesteps
    images, _ = load_source("fashion-mnist:test").batch(np.arange(args.images))
    x0, idx = to_model_range(images), np.arange(args.images)
    common = dict(T=T, image_size=28, model_params=count_parameters(model), images=args.images)
    rows, exact, pilot = exact_rows(diff, model, x0, idx, args, progress, common)
    rows += estimate_rows(diff, model, x0, idx, args, exact, pilot, common)
    lines = [",".join(COLUMNS)] + [",".join(fmt(r.get(c)) for c in COLUMNS) for r in rows]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
