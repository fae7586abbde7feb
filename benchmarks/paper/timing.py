"""Per-unit costs on this machine, from which the paper experiments' full presets are sized.

Times, for the Fashion-MNIST 28x28 U-Nets of the experiments (channel multipliers 1,2,2, one
residual block, attention at 14 px, learned sigma): one training step at the experiments' batch
size, one sampling step per image (batch 250, no gradients), the Inception features per image
(legacy-tf, batch 64) and one per-example gradient. Writes ``results/paper/timing.csv`` (one row
per measurement with the threads and the load average at the time) and prints it. The budget of
each experiment is these costs times the counts of its preset (``python -m benchmarks.paper NAME
--estimate``).

    OMP_NUM_THREADS=2 python -m benchmarks.paper.timing [--widths 8,16,24,32] [--out results/paper/timing.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def measure(widths, batch: int = 64, sample_batch: int = 250, repeats: int = 3) -> list[dict]:
    from iddpm_core.diffusion import build_diffusion
    from iddpm_core.diffusion.config import DiffusionConfig
    from iddpm_core.models import ModelConfig, build_model
    from iddpm_core.models.cost import count_parameters

    rows = []
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    diffusion = build_diffusion(DiffusionConfig(steps=1000, schedule="cosine", loss="hybrid"))
    for w in widths:
        cfg = ModelConfig(image_size=28, in_channels=1, base_channels=w, channel_mult=(1, 2, 2), num_res_blocks=1,
                          attention_resolutions=(14,), learn_sigma=True)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, 28, 28)
        t = torch.randint(0, 1000, (batch,))

        def train_step():
            opt.zero_grad()
            diffusion.training_losses(model, x, t)["loss"].mean().backward()
            opt.step()

        def sample_step():
            with torch.no_grad():
                model(torch.randn(sample_batch, 1, 28, 28), torch.full((sample_batch,), 500.0))

        def one_grad():
            model.zero_grad()
            diffusion.training_losses(model, x[:1], t[:1])["loss"].sum().backward()

        common = {"width": w, "params": count_parameters(model), "threads": threads, "load_avg": round(load, 2)}
        rows.append({**common, "what": "train_step", "batch": batch, "seconds": _median_time(train_step, repeats)})
        s = _median_time(sample_step, repeats)
        rows.append({**common, "what": "sample_step_per_image", "batch": sample_batch, "seconds": s / sample_batch})
        rows.append({**common, "what": "per_example_grad", "batch": 1, "seconds": _median_time(one_grad, repeats * 3)})
    from iddpm_eval.sources import make_extractor

    fx = make_extractor("legacy-tf", None, 64)
    imgs = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    s = _median_time(lambda: fx(imgs), repeats)
    rows.append({"width": "", "params": "", "threads": threads, "load_avg": round(os.getloadavg()[0], 2),
                 "what": "inception_per_image", "batch": 64, "seconds": s / 64})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="8,16,24,32")
    ap.add_argument("--out", default="results/paper/timing.csv")
    a = ap.parse_args(argv)
    rows = measure([int(w) for w in a.widths.split(",")])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    cols = ["what", "width", "params", "batch", "seconds", "threads", "load_avg"]
    with open(a.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in cols})
    for r in rows:
        print(", ".join(f"{c}={r[c]}" for c in cols))


if __name__ == "__main__":
    main()
