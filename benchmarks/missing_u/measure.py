"""The missing-U measurements of one trained checkpoint (either denoiser): inference latency, the
solver study (continuous U-Net only), FID against sampling steps (ancestral and DDIM, per solver)
and noise robustness. The experiment runner calls :func:`measure_checkpoint` on each side's final
checkpoint; the CLI writes the four tables as CSV.

Presets: ``full`` (latency at batch 1 and 64, median of 15 repeats on 2 threads; FID of 1,000
samples at 25, 50, 100 and all steps; the four solvers with dopri5 at tolerances 1e-3 and 1e-5;
500 held-out images at sigma 0.03 ... 0.3) and ``smoke`` (a few images and repeats, for the tests).
Usage: ``python -m benchmarks.missing_u.measure CHECKPOINT --data fashion-mnist:test --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = {
    "full": {"latency_batches": (1, 64), "latency_repeats": 15, "threads": 2,
             "fid_steps": (25, 50, 100, None), "samplers": ("ddpm", "ddim"),
             "solvers": (("euler", 1, 1e-3), ("midpoint", 1, 1e-3), ("rk4", 1, 1e-3), ("dopri5", 1, 1e-3),
                         ("dopri5", 1, 1e-5)),
             "eval": {"fid_num": 1000, "fid_bootstrap": 200, "fid_ref_num": 2000},
             "denoise_num": 500, "sigmas": (0.03, 0.05, 0.1, 0.2, 0.3)},
    "smoke": {"latency_batches": (1, 4), "latency_repeats": 2, "threads": 1,
              "fid_steps": (2, None), "samplers": ("ddpm", "ddim"),
              "solvers": (("euler", 1, 1e-3), ("rk4", 1, 1e-3), ("dopri5", 1, 1e-2)),
              "eval": {"fid_num": 8, "fid_bootstrap": 5, "fid_ref_num": 16, "sample_batch_size": 8},
              "denoise_num": 6, "sigmas": (0.1, 0.3)},
}


def measure_checkpoint(checkpoint: str, data: str, out_dir: str | Path, preset: str = "full", seed: int = 0,
                       fid: bool = True) -> dict[str, list[dict]]:
    """{"latency", "solvers", "fid_steps", "denoising"}: row lists for ``checkpoint`` with the held-out
    ``data`` as FID reference and denoising images."""
    from iddpm_core.models.latency import latency, solver_study
    from iddpm_core.checkpoint import load_model
    from iddpm_eval.denoising import denoising_of_checkpoint
    from iddpm_eval.sampling_steps import fid_by_sampling_steps

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    sm = load_model(checkpoint)
    kind, T = sm.model_config.kind, int(sm.diffusion_config.steps)
    out: dict[str, list[dict]] = {"latency": [], "solvers": [], "fid_steps": [], "denoising": []}
    for batch in p["latency_batches"]:
        r = latency(sm.model, batch=batch, repeats=p["latency_repeats"], threads=p["threads"], seed=seed)
        row = {"checkpoint": str(checkpoint), "kind": kind, **{k: v for k, v in r.items() if k != "times_s"}}
        for n in p["fid_steps"]:  # a sample costs one network evaluation per step
            row[f"sample_s_{'all' if n is None else n}_steps"] = r["per_image_s"] * (T if n is None else n)
        out["latency"].append(row)
    cunet = kind == "cunet"
    if cunet:
        solvers = [(s, n) for s, n, _ in p["solvers"] if s != "dopri5"] + [("dopri5", 1)]
        tols = tuple(tol for s, _, tol in p["solvers"] if s == "dopri5") or (1e-3,)
        for batch in p["latency_batches"]:
            for r in solver_study(sm.model, solvers, tols, batch=batch, repeats=p["latency_repeats"],
                                  threads=p["threads"], seed=seed):
                out["solvers"].append({"checkpoint": str(checkpoint), **r})
    if fid:
        out["fid_steps"] = fid_by_sampling_steps(
            checkpoint, Path(out_dir) / "fid_steps", steps=p["fid_steps"], samplers=p["samplers"],
            solvers=list(p["solvers"]) if cunet else None,
            eval_settings={**p["eval"], "fid_ref": data, "seed": seed}, data=data)
    out["denoising"] = denoising_of_checkpoint(checkpoint, data, num=p["denoise_num"], sigmas=p["sigmas"], seed=seed)
    return out


def main(argv: list[str] | None = None) -> None:
    from iddpm_core.io import write_text

    from .pairings import csv_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--data", default="fashion-mnist:test", help="held-out images (FID reference, denoising)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--no-fid", action="store_true")
    a = ap.parse_args(argv)
    if not Path(a.checkpoint).is_file():
        ap.error(f"checkpoint {a.checkpoint}: no such file")
    tables = measure_checkpoint(a.checkpoint, a.data, a.out, a.preset, fid=not a.no_fid)
    for name, rows in tables.items():
        if rows:
            write_text(a.out / f"{name}.csv", csv_text(rows))
            print(a.out / f"{name}.csv")


if __name__ == "__main__":
    main()
