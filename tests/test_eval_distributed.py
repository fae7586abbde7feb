"""`iddpm-eval fid | stats | nll` under torchrun: 2 gloo processes give the numbers of 1 process.

The 1-process side runs in this process with one torch thread; the 2-process side is
`torchrun --nproc_per_node 2 -m iddpm_eval.cli ...` (one thread per rank, torchrun's default).
Each rank's shard starts at a batch boundary, so both sides push the same batches through the
same networks: features, samples and per-image bits/dim are the same numbers, and KID and the
precision/recall counts come out equal. Mean and covariance differ only by the order of float64
additions (sums about a shift instead of Chan's pairwise merge): relative differences about 1e-13,
which the FID's square root can raise to about 1e-8 with fewer images than dimensions; the
acceptance bound is 1e-6 relative.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from iddpm_core.checkpoint import save_checkpoint
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig, build_model
from iddpm_eval.cli import main

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(path: Path) -> Path:
    cfg = ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
                      num_heads=2)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # zero-initialised output layers would make the samples trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(path, model, cfg, diffusion_config=DiffusionConfig(steps=12).to_dict())
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs several iddpm-eval commands in one torchrun launch (imports and the process group once):
# the commands go through the same `main` as `torchrun -m iddpm_eval.cli -- ...`.
DRIVER = """
import json, sys
from iddpm_eval import distributed as dist
from iddpm_eval.cli import main

dist.init()
for args in json.loads(sys.argv[1]):
    main(args, standalone_mode=False)
dist.D.cleanup()
"""


def _torchrun(args: list[str], nproc: int = 2, driver: Path | None = None) -> str:
    """``torchrun --nproc_per_node 2 -m iddpm_eval.cli -- ARGS`` (or the driver with a list of
    commands); stdout (rank 0's)."""
    target = ["-m", "iddpm_eval.cli", "--", *args] if driver is None else [str(driver), json.dumps(args)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *target]
    # "--": torchrun's parser would otherwise take --num for its --numa-binding and --pr for its
    # --print-completion (argparse abbreviations); the command sees the arguments after it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO),
                                                                                  os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _one(args: list[str]) -> str:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow
def test_fid_kid_pr_stats_and_nll_two_processes_equal_one(tmp_path):
    ck = _checkpoint(tmp_path / "m.pt")
    # FID, KID and precision/recall of 20 digits against 20 images sampled on the fly from the
    # checkpoint; batches of 8: the 2 ranks take 8 and 12 images of each side
    fid = ["fid", "digits", str(ck), "--num", "20", "--batch-size", "8", "--sample-steps", "3", "--sampler", "ddim",
           "--kid", "--kid-subsets", "5", "--kid-subset-size", "10", "--pr", "--k", "3", "--json", "--no-progress"]
    one = json.loads(_one(fid + ["--results", str(tmp_path / "one.csv")]))
    out2 = _torchrun(fid + ["--results", str(tmp_path / "two.csv")])
    assert len(out2.strip().splitlines()) == 1  # rank 0 prints
    two = json.loads(out2)
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6) and one["fid"] > 0
    for key in ("n_a", "n_b", "a_fingerprint", "b_fingerprint", "weights_sha256", "precision", "recall",
                "density", "coverage", "n_real", "n_fake"):
        assert two[key] == one[key], key
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-9, abs=1e-12)
    assert two["kid_std"] == pytest.approx(one["kid_std"], rel=1e-9, abs=1e-12)
    rows1, rows2 = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert list(rows2["metric"]) == list(rows1["metric"])  # written once, by rank 0

    # stats with features, and bits/dim (exact bound and the K-step estimate): one launch
    stats = ["stats", "digits", "--num", "21", "--batch-size", "8", "--features", "--no-progress"]
    nll = [["nll", "--checkpoint", str(ck), "--data", "digits", "--num", "7", "--batch-size", "10", "--json",
            "--no-progress", *extra] for extra in ([], ["--estimate", "3"])]
    _one(stats + ["-o", str(tmp_path / "s1.npz")])
    n1 = [json.loads(_one(args + ["--out", str(tmp_path / f"n1_{i}")])) for i, args in enumerate(nll)]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    printed = _torchrun([stats + ["-o", str(tmp_path / "s2.npz")]]
                        + [args + ["--out", str(tmp_path / f"n2_{i}")] for i, args in enumerate(nll)], driver=driver)
    n2 = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]

    with np.load(tmp_path / "s1.npz") as a, np.load(tmp_path / "s2.npz") as b:
        np.testing.assert_array_equal(a["pool"], b["pool"])
        assert str(a["fingerprint"]) == str(b["fingerprint"]) and int(a["count"]) == int(b["count"]) == 21
        np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-12, atol=1e-15)
        scale = np.abs(a["sigma"]).max()  # covariance entries near 0: error relative to the matrix
        np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=0, atol=1e-12 * scale)

    assert len(n2) == 2
    for i in range(2):  # the ranks run the groups of images one process runs: the same numbers
        assert n2[i]["processes"] == 2 and n1[i]["processes"] == 1 and n2[i]["n"] == n1[i]["n"] == 7
        assert n2[i]["bpd"] == n1[i]["bpd"] and n2[i]["bpd_stderr"] == n1[i]["bpd_stderr"]
        per1 = pd.read_csv(tmp_path / f"n1_{i}" / "nll_images.csv")
        per2 = pd.read_csv(tmp_path / f"n2_{i}" / "nll_images.csv")
        pd.testing.assert_frame_equal(per1, per2, check_exact=True)


def test_non_distributed_command_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(main, ["report", "--help"])
    assert r.exit_code == 2 and "does not run under torchrun" in r.output
