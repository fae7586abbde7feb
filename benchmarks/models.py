"""U-Net vs continuous U-Net at matched configurations: parameters, FLOPs, evaluations, CPU latency.

Writes results/benchmarks/models.csv, one row per image size with both denoisers side by side and the
ratios cunet / unet. Latencies are medians over repeats that alternate between the two models in the
same run, so machine load affects both alike. Usage: python benchmarks/models.py [--repeats 15] [--batch 8]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from iddpm_core.io import write_text
from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import count_parameters, forward_flops, function_evaluations, training_flops_per_image

ROOT = Path(__file__).resolve().parents[1]

# Matched settings: same base width, levels (default channel_mult per size), attention levels, heads, output.
MATCHED = [
    ModelConfig(image_size=28, in_channels=1, base_channels=32, attention_resolutions=(14,)),
    ModelConfig(image_size=32, in_channels=3, base_channels=32, attention_resolutions=(16,)),
]


def latency_ms(models: dict, config: ModelConfig, batch: int, repeats: int, progress: bool) -> dict:
    """Median milliseconds per no-grad forward of a batch, repeats interleaved across the models."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(x, t)
        for _ in tqdm(range(repeats), desc=f"{config.image_size}px latency", disable=not progress):
            for name, m in models.items():
                start = time.perf_counter()
                m(x, t)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def run(batch: int, repeats: int, progress: bool = True) -> list[dict]:
    rows = []
    for unet_cfg in MATCHED:
        cunet_cfg = replace(unet_cfg, kind="cunet", solver="rk4", solver_steps=1)
        torch.manual_seed(0)
        models = {"unet": build_model(unet_cfg).eval(), "cunet": build_model(cunet_cfg).eval()}
        cost = {}
        for name, m in models.items():
            cost[name] = {"params": count_parameters(m), "gflops": forward_flops(m) / 1e9,
                          "train_gflops": training_flops_per_image(m) / 1e9}
            m.eval()
        load = os.getloadavg()[0]
        lat = latency_ms(models, unet_cfg, batch, repeats, progress)
        u, c = cost["unet"], cost["cunet"]
        rows.append({
            "image_size": unet_cfg.image_size,
            "in_channels": unet_cfg.in_channels,
            "base_channels": unet_cfg.base_channels,
            "channel_mult": "-".join(map(str, unet_cfg.resolved_channel_mult())),
            "attention_resolutions": "-".join(map(str, unet_cfg.attention_resolutions)),
            "learn_sigma": unet_cfg.learn_sigma,
            "cunet_solver": f"{cunet_cfg.solver}x{cunet_cfg.solver_steps}",
            "unet_params": u["params"],
            "cunet_params": c["params"],
            "params_ratio": round(c["params"] / u["params"], 4),
            "unet_gflops_forward": round(u["gflops"], 4),
            "cunet_gflops_forward": round(c["gflops"], 4),
            "gflops_ratio": round(c["gflops"] / u["gflops"], 4),
            "unet_gflops_train": round(u["train_gflops"], 4),
            "cunet_gflops_train": round(c["train_gflops"], 4),
            "cunet_function_evals": function_evaluations(models["cunet"]),
            "batch": batch,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": round(load, 2),  # other processes on the machine: high values mean noisy times
            "torch_version": torch.__version__,
            "unet_latency_ms": round(lat["unet"], 2),
            "cunet_latency_ms": round(lat["cunet"], 2),
            "latency_ratio": round(lat["cunet"] / lat["unet"], 4),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "models.csv")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch < 1 or a.repeats < 1:
        p.error("--batch and --repeats must be >= 1")
    rows = run(a.batch, a.repeats, progress=not a.no_progress)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(a.out, buf.getvalue())
    sys.stdout.write(buf.getvalue())


if __name__ == "__main__":
    main()
