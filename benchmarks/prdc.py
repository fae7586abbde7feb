"""Precision/recall (+ density/coverage) speed and peak memory: this project vs torch-fidelity 0.4's
prc (full matrices) and the prdc package, on the same 10,000 x 10,000 x 2048 float32 features, in
one run. Each method runs in its own subprocess so that its peak resident memory (ru_maxrss) is its
own; "extra" memory is the peak minus the resident size right after the features were loaded.
The comparison runs with the libraries' default threads and again capped at one thread
(OMP/MKL/OpenBLAS), which is less sensitive to a busy machine.

Also measured: this project at 20,000 x 20,000 with 64-d features (same block size; --n-big 50000
for the full size, slow at low dimension), to show that
its extra memory does not grow with N; and the derived peak for 50,000 x 50,000 x 2048.

    .venv/bin/python benchmarks/prdc.py            # writes results/benchmarks/prdc.csv
    .venv/bin/python benchmarks/prdc.py --n 2000   # quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks" / "prdc.csv"
K = 3


def features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative features of Inception pool_3 scale (values ~0-10, norms ~20-30)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32) / 8.0
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 5000):
        e = min(s + 5000, n)
        z = rng.standard_normal((e - s, 64), dtype=np.float32) + shift
        x = z @ mix + 0.3 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = np.maximum(x, 0) * 1.5
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def worker(method: str, real_path: str, fake_path: str, block_size: int) -> dict:
    """Run one method on saved features; report time, peak memory and the numbers."""
    here = Path(__file__).resolve().parent  # this file is called prdc.py: keep it from shadowing the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("prdc", None)
    import torch

    real, fake = np.load(real_path), np.load(fake_path)
    if method == "iddpm":
        from iddpm_eval.prdc import compute_prdc

        compute_prdc(real[:50], fake[:50], k=K, block_size=16, device="cpu")  # warm-up (imports)
    elif method == "torch-fidelity":
        from torch_fidelity.metric_prc import prc_features_to_metric
    else:
        import prdc
    base = _rss_mb()
    t0 = time.perf_counter()
    if method == "iddpm":
        r = compute_prdc(real, fake, k=K, block_size=block_size, device="cpu")
    elif method == "torch-fidelity":
        # torch-fidelity 0.4: input1 / features_1 is GENERATED, input2 / features_2 is REAL
        tf = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=K,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        r = {"precision": tf["precision"], "recall": tf["recall"]}
    else:
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
            r = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=K)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": _peak_mb(), "base_mb": base, "threads": torch.get_num_threads(),
            **{key: float(v) for key, v in r.items() if key in ("precision", "recall", "density", "coverage")}}


def run(method: str, real_path: Path, fake_path: Path, block_size: int, threads: int = 0) -> dict:
    """One method in a fresh process; threads > 0 caps torch, OpenMP and BLAS threads (all methods)."""
    cmd = [sys.executable, __file__, "--worker", method, str(real_path), str(fake_path), str(block_size)]
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _comparison_rows(res: dict, args) -> list[dict]:
    ours, rows = res["iddpm"], []
    for method, r in res.items():
        agree = []
        if method == "torch-fidelity":
            agree = [abs(r[k] - ours[k]) * args.n < 0.5 for k in ("precision", "recall")]
        if method == "prdc":
            agree = [abs(r[k] - ours[k]) < 1e-9 for k in ("precision", "recall", "density", "coverage")]
        rows.append({"method": method, "n_real": args.n, "n_fake": args.n, "dim": args.dim, "k": K,
                     "block_size": args.block_size if method == "iddpm" else "",
                     "seconds": round(r["seconds"], 3),
                     "time_vs_iddpm": round(r["seconds"] / ours["seconds"], 3),
                     "peak_rss_mb": round(r["peak_mb"], 1),
                     "extra_peak_mb": round(r["peak_mb"] - r["base_mb"], 1),
                     "precision": r.get("precision", ""), "recall": r.get("recall", ""),
                     "density": r.get("density", ""), "coverage": r.get("coverage", ""),
                     "agrees_with_iddpm": all(agree) if agree else "", "how": "measured",
                     "threads": r["threads"]})
    return rows


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="points per set for the three-way comparison")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--n-big", type=int, default=20000, help="points per set for the memory-bound run (0: skip)")
    ap.add_argument("--dim-big", type=int, default=64, help="feature dimension of the memory-bound run")
    ap.add_argument("--threads", default="0,1",
                    help="comma list of thread caps for the comparison; 0 = library defaults (all cores)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    return ap.parse_args()


def _measured_rows(args, tmp: Path) -> tuple[list[dict], dict]:
    """The three-way comparison at each thread cap, then the memory-bound run of this project;
    also returns this project's default-threads result (for the derived rows)."""
    rows = []
    rp, fp = tmp / "real.npy", tmp / "fake.npy"
    np.save(rp, features(args.n, args.dim, seed=1))
    np.save(fp, features(args.n, args.dim, seed=2, shift=0.1))
    ours = None  # our default-threads run, for the derived memory row
    for threads in [int(t) for t in args.threads.split(",")]:
        res = {}
        for method in ("iddpm", "torch-fidelity", "prdc"):
            res[method] = run(method, rp, fp, args.block_size, threads)
            print(method, threads, res[method], flush=True)
        rows += _comparison_rows(res, args)
        if ours is None or threads == 0:
            ours = res["iddpm"]
    if args.n_big:
        for p in (rp, fp):
            p.unlink()
        np.save(rp, features(args.n_big, args.dim_big, seed=3))
        np.save(fp, features(args.n_big, args.dim_big, seed=4, shift=0.1))
        r = run("iddpm", rp, fp, args.block_size)
        print("iddpm big", r, flush=True)
        rows.append({"method": "iddpm", "n_real": args.n_big, "n_fake": args.n_big, "dim": args.dim_big, "k": K,
                     "block_size": args.block_size, "seconds": round(r["seconds"], 3), "time_vs_iddpm": "",
                     "peak_rss_mb": round(r["peak_mb"], 1), "extra_peak_mb": round(r["peak_mb"] - r["base_mb"], 1),
                     "precision": r["precision"], "recall": r["recall"], "density": r["density"],
                     "coverage": r["coverage"], "agrees_with_iddpm": "", "how": "measured",
                     "threads": r["threads"]})
    return rows, ours


def _derived_rows(args, ours: dict) -> list[dict]:
    """Peak memory at 50,000 x 50,000 x 2048, derived rather than measured."""
    # Derived for 50k x 50k x 2048 float32: the features themselves (2 x N x D x 4 bytes) plus the
    # working set, which depends on the block size only (distance block b^2 float32, centred row
    # blocks b x D, index lists of one row chunk) except for per-point arrays: k + 8 float32
    # candidates with int64 indices, their merge copies, norms, radii and flags, < 320 bytes per point.
    # So: extra(50k) = extra measured above at N = args.n (full blocks when N >= block size) + 320 B
    # per additional point.
    rows = []
    b, n, d = args.block_size, 50000, 2048
    if args.n >= b and args.dim == d:
        working = ours["peak_mb"] - ours["base_mb"] + 320 * 2 * (n - args.n) / 2**20
        rows.append({"method": "iddpm", "n_real": n, "n_fake": n, "dim": d, "k": K, "block_size": b, "seconds": "",
                     "time_vs_iddpm": "", "peak_rss_mb": round(2 * n * d * 4 / 2**20 + working, 1),
                     "extra_peak_mb": round(working, 1), "precision": "", "recall": "", "density": "",
                     "coverage": "", "agrees_with_iddpm": "",
                     "how": f"derived: extra measured at {args.n} + 320 B per added point", "threads": ""})
    # Peers keep full matrices: torch-fidelity N^2 + M^2 + N M float32; prdc the same via scikit-learn.
    full = 4 * 3 * n * n / 2**20
    for method in ("torch-fidelity", "prdc"):
        rows.append({"method": method, "n_real": n, "n_fake": n, "dim": d, "k": K, "block_size": "",
                     "seconds": "", "time_vs_iddpm": "", "peak_rss_mb": round(2 * n * d * 4 / 2**20 + full, 1),
                     "extra_peak_mb": round(full, 1), "precision": "", "recall": "", "density": "",
                     "coverage": "", "agrees_with_iddpm": "", "how": "derived (lower bound: full matrices)",
                     "threads": ""})
    return rows


def main() -> None:
    args = _args()
    if args.worker:
        method, rp, fp, bs = args.worker
        print(json.dumps(worker(method, rp, fp, int(bs))))
        return

    sys.path.insert(0, str(ROOT))
    from iddpm_core.io import write_text

    with tempfile.TemporaryDirectory() as tmp:
        rows, ours = _measured_rows(args, Path(tmp))
    rows += _derived_rows(args, ours)
    stamp = {"cpus": os.cpu_count(), "machine": platform.machine(),
             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    rows = [{**r, **stamp} for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(args.out, buf.getvalue())
    print(buf.getvalue())


if __name__ == "__main__":
    main()
