"""The missing-U measurements of one trained checkpoint (either denoiser), outside an experiment:
latency, the solver study (continuous U-Net only), FID against sampling steps and solvers, and noise
robustness, by the experiment's own code (:func:`iddpm_eval.missing_u_eval.measure_inference`),
written as four CSV files.

Presets: ``full`` (the experiment's settings, :data:`iddpm_eval.missing_u_eval.OWN`, with FID of
200 samples per cell against 1,000 held-out images) and ``smoke`` (a few images and repeats).
Usage: ``python -m benchmarks.missing_u.measure CHECKPOINT --data fashion-mnist:test --out DIR``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESETS = {
    "full": {"eval": {"fid_bootstrap": 200, "fid_ref_num": 1000}, "mu": {"mu_steps_num": 200}},
    "smoke": {"eval": {"fid_bootstrap": 5, "fid_ref_num": 16, "sample_batch_size": 8},
              "mu": {"mu_latency_batches": [1, 4], "mu_latency_repeats": 3, "mu_threads": 1, "mu_steps": [2, 0],
                     "mu_solvers": [["euler", 1, 1e-3], ["rk4", 1, 1e-3], ["dopri5", 1, 1e-2]],
                     "mu_solver_fid_steps": 2, "mu_solver_repeats": 1, "mu_steps_num": 8, "mu_denoise_num": 6,
                     "mu_sigmas": [0.1, 0.3]}},
}


def measure_checkpoint(checkpoint: str, data: str, out_dir: str | Path, preset: str = "full", seed: int = 0,
                       fid: bool = True) -> dict[str, list[dict]]:
    """{"latency", "solvers", "fid_steps", "denoising"}: row lists for ``checkpoint`` with the held-out
    ``data`` as FID reference and denoising images (cached under ``out_dir``)."""
    from iddpm_eval import missing_u_eval, sweep_eval

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    mine = {**missing_u_eval.OWN, **p["mu"], **({} if fid else {"mu_steps_num": 0})}
    missing_u_eval.check_settings({**p["eval"], **mine})
    s = sweep_eval.settings({"eval": {**p["eval"], "fid_ref": data, "seed": seed}, "data": data})
    return missing_u_eval.measure_inference(checkpoint, s, mine, Path(out_dir))


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
            rows = [{k: v for k, v in r.items() if k != "times_s"} for r in rows]
            write_text(a.out / f"{name}.csv", csv_text(rows))
            print(a.out / f"{name}.csv")


if __name__ == "__main__":
    main()
