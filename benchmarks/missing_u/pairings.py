"""The three pairings of the continuous U-Net against the U-Net ("The Missing U", issue 17), their
cost side by side, and the sweep specs that train both sides at equal training compute.

Pairings (each a U-Net config and a continuous U-Net config):

- ``paper``: the authors' pairing rebuilt from their code defaults. Counts at their setting
  (64x64 RGB, :func:`paper_pairing_64`) are compared with their claimed ratios; the trained
  version (:func:`pairings`) keeps the layout at Fashion-MNIST's 28x28 (three levels: 28, 14, 7).
  Authors' code (``Sergio20f/cDDPM``): ``ConvSODEUNet(num_filters=16)``, state widths 32, 64, 128,
  256 on four levels and 512 at a 4x4 bottleneck (nine ODE blocks), torchdiffeq rk4 over [0, 1]
  in one step, attention on the 256-channel state at 8x8 (encoder and decoder), no learned
  variance (3 output channels); baseline lucidrains ``Unet(dim=64, dim_mults=(1, 2, 4, 8))``,
  two ResNet blocks per level. What differs here (our configs cannot express theirs):
  * ODE function: ours is a second-order ODE proper (dx/ds = v, dv/ds = f with f: 2c -> c -> c
    channels, 27 c^2 weights per block) conditioned on the diffusion time; theirs maps the whole
    2c-channel state through two 2c -> 2c convolutions plus a residual (72 c^2 weights) and its
    time embedding never reaches the blocks. So at their widths ours has about 3x fewer weights.
  * Bottleneck: ours runs the middle block at the last level (8x8, 256 state channels at 64 px);
    theirs halves once more to 4x4 with 512 channels. Both have nine ODE blocks (36 evaluations).
  * GroupNorm and SiLU instead of InstanceNorm and Softplus.
  * Baseline: improved-diffusion's U-Net (ours) instead of lucidrains': three ResNet blocks per
    level on the way up (two in lucidrains'), channel changes inside the first block of a level,
    no linear attention at the outer levels (lucidrains' has it; ours has none there), full
    attention in the middle block in both.
- ``params``: equal parameters: the U-Net is the suite's 28x28 reference (32 base channels,
  multipliers 1-2-2, one block per level, attention at 14); the continuous U-Net keeps that
  layout and its width is searched (:func:`iddpm_core.models.pairing.match_width`) for the U-Net's
  parameter count.
- ``flops``: equal forward FLOPs (ODE evaluations included): the same U-Net, the continuous
  U-Net's width searched for the U-Net's forward FLOPs.

Training (:func:`write_specs`): one experiment spec per pairing (``benchmarks/missing_u/<pairing>.toml``,
kind ``missing-u``, rows ``unet`` and ``cunet``; run by ``python -m benchmarks.missing_u PAIRING``):
Fashion-MNIST 28x28, Improved DDPM's L_hybrid recipe (cosine, learned variances) for both sides, the
same batch, learning rate and EMA (not tuned for either); each side gets
``steps = budget / (3 x forward FLOPs x batch)``, the pairing checked with the measured forward +
backward FLOPs (within 5%), and is evaluated at a quarter, half and all of it. :data:`NOTES` (copied
into each spec and its results README) lists the protocol's choices.
Usage: ``python -m benchmarks.missing_u.pairings [--budget 2e13] [--no-specs]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import replace
from pathlib import Path

from iddpm_core.io import write_text
from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import count_parameters, forward_flops, function_evaluations, training_flops_per_image
from iddpm_core.models.pairing import compute_gap, match_width, steps_for_budget

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = ROOT / "benchmarks" / "missing_u"
RESULTS = ROOT / "results" / "missing_u"

# The authors' counts (REFERENCE.md, their notebook): parameters and GFLOP per forward at 64x64 RGB.
PAPER_COUNTS = {"cunet_params": 8_811_875, "unet_params": 35_710_339, "cunet_gflops": 5.65, "unet_gflops": 14.59}
# The paper's headline claims: "about a quarter of the parameters", "about 30% of the FLOPs".
PAPER_CLAIMS = {"params_ratio": 0.25, "flops_ratio": 0.30}

# Training settings shared by both sides of every pairing (T = 200: see NOTES).
BATCH = 64
STEPS_T = 200
TRAIN = {"data": "fashion-mnist:train", "batch_size": BATCH, "lr": 2e-4, "ema_rates": [0.999], "ema_warmup": True,
         "save_interval": 50, "sample_interval": 0, "log_interval": 25, "seed": 0, "sample_num": 16,
         "sample_steps": "25"}
EVAL = {"hook": "iddpm_eval.missing_u_eval:evaluate_checkpoint", "fid_num": 1000, "fid_steps": 10,
        "fid_sampler": "ddim", "fid_ref": "fashion-mnist:test", "fid_ref_num": 1000, "fid_bootstrap": 200,
        "nll_num": 256, "nll_estimate": 8, "nll_data": "fashion-mnist:test", "mu_steps_num": 0,
        "mu_denoise_num": 500}
# The sampling-steps and solver FID study runs on the pairing that makes latency comparable.
STEPS_STUDY = {"flops": 200}
FRACTIONS = (0.25, 0.5, 1.0)
DEFAULT_BUDGET = 2e13  # training FLOPs per side (about 1 to 2 minutes of a 2-core CPU at ~200 GFLOP/s)
NOTES = [
    "Both sides: Fashion-MNIST 28x28, Improved DDPM's L_hybrid (cosine schedule, learned-range variances), batch 64, "
    "AdamW lr 2e-4, EMA 0.999 with warm-up, seed 0; nothing tuned for either side.",
    "Equal training compute: each side trains for budget / (3 x forward FLOPs x batch) steps, checkpoints at a "
    "quarter, half and all of it; the table shows the measured training FLOPs (the checkpoint's own count).",
    "T = 200 diffusion steps (not 1000): 'all steps' in the sampling-steps study then costs 200 network evaluations "
    "per image instead of 1000, which is what makes the study fit the 2-hour budget; 25, 50, 100 and 200 steps "
    "are respacings of the same chain.",
    "FID along training: 1,000 DDIM samples with 10 steps (eta 0) against 1,000 Fashion-MNIST test images, "
    "legacy-tf Inception, 200-round bootstrap; bits/dim: the unbiased 8-timestep estimate on 256 test images "
    "(standard error over images). The same for both sides, so the curves compare with each other; DDIM-10 FID "
    "is higher than many-step FID, which the sampling-steps study measures.",
    "At the last checkpoint of each side: latency per image (batch 1 and 64, median of 15 passes, 2 threads, "
    "order-statistic interval), the solver study of the continuous U-Net (NFE, FLOPs, latency), one-step "
    "denoising of 500 held-out test images at sigma 0.03 to 0.3 (PSNR / SSIM by scikit-image, t-intervals).",
    "The sampling-steps study (FID of 200 samples at 25, 50, 100 and all 200 steps, ancestral and DDIM) and the "
    "FID of every solver (DDIM 25) run on the equal-FLOPs pairing only, where the two sides cost the same per "
    "step; on the others they would cost hours (the paper pairing's U-Net is 3.1 GFLOP per forward).",
    "The experiment's jobs run one at a time on both cores (max_parallel 1), so the latency measurements and the "
    "wall-time curves of the two sides are taken under the same conditions.",
]


def paper_pairing_64() -> dict[str, ModelConfig]:
    """The authors' pairing at their setting (64x64 RGB, epsilon only), in our model family."""
    common = dict(image_size=64, in_channels=3, channel_mult=(1, 2, 4, 8), learn_sigma=False, num_heads=4)
    return {"unet": ModelConfig(kind="unet", base_channels=64, num_res_blocks=2, attention_resolutions=(), **common),
            "cunet": ModelConfig(kind="cunet", base_channels=16, num_res_blocks=1, attention_resolutions=(8,),
                                 solver="rk4", solver_steps=1, **common)}


def reference_unet_28(**over) -> ModelConfig:
    """The suite's 28x28 reference U-Net (README: 1,191,522 parameters, 0.423 GFLOP with learned sigma)."""
    base = dict(kind="unet", image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(14,), learn_sigma=True)
    return ModelConfig(**{**base, **over})


def pairings(unet_28: ModelConfig | None = None, search_hi: int = 256) -> dict[str, dict]:
    """The three pairings at 28x28: {name: {"unet", "cunet", "search"}} ("search": the width search's
    record for the searched pairings). ``unet_28`` replaces the reference U-Net (tests pass tiny ones)."""
    u = unet_28 or reference_unet_28()
    paper64 = paper_pairing_64()
    paper = {"unet": replace(paper64["unet"], image_size=28, in_channels=1, channel_mult=(1, 2, 4), learn_sigma=True),
             "cunet": replace(paper64["cunet"], image_size=28, in_channels=1, channel_mult=(1, 2, 4),
                              attention_resolutions=(7,), learn_sigma=True), "search": None}
    cu = replace(u, kind="cunet", dropout=0.0, solver="rk4", solver_steps=1)
    out = {"paper": paper} if unet_28 is None else {}
    for name, what in (("params", "parameters"), ("flops", "forward_flops")):
        model = build_model(u)
        target = count_parameters(model) if what == "parameters" else forward_flops(model)
        found = match_width(cu, target, what, lo=2, hi=search_hi)
        out[name] = {"unet": u, "cunet": replace(cu, base_channels=found["width"]), "search": {**found, "what": what}}
    return out


def cost(config: ModelConfig) -> dict:
    """Parameters, forward / training FLOPs per image and ODE evaluations per forward."""
    m = build_model(config)
    return {"params": count_parameters(m), "forward_flops": forward_flops(m),
            "train_flops": training_flops_per_image(m), "nfe": function_evaluations(m)}


def _layout(c: ModelConfig) -> str:
    s = (f"{c.kind} {c.image_size}px base {c.base_channels} mult {'-'.join(map(str, c.resolved_channel_mult()))} "
         f"blocks {c.num_res_blocks} attn {'-'.join(map(str, c.attention_resolutions)) or 'middle only'}")
    return s + (f" {c.solver}x{c.solver_steps}" if c.kind == "cunet" else "")


def pairing_row(name: str, pair: dict, budget: float | None, batch: int = BATCH, paper: bool = False) -> dict:
    """One table row: both sides' cost, the ratios cunet / unet and, with a budget, the training steps
    and the measured training compute of each side and their gap."""
    cu, un = cost(pair["cunet"]), cost(pair["unet"])
    row = {"pairing": name, "unet_config": _layout(pair["unet"]), "cunet_config": _layout(pair["cunet"]),
           "unet_params": un["params"], "cunet_params": cu["params"],
           "params_ratio": round(cu["params"] / un["params"], 4),
           "unet_gflops": round(un["forward_flops"] / 1e9, 4), "cunet_gflops": round(cu["forward_flops"] / 1e9, 4),
           "flops_ratio": round(cu["forward_flops"] / un["forward_flops"], 4), "cunet_nfe": cu["nfe"],
           "unet_train_over_forward": round(un["train_flops"] / un["forward_flops"], 3),
           "cunet_train_over_forward": round(cu["train_flops"] / cu["forward_flops"], 3)}
    if paper:
        p = PAPER_COUNTS
        row.update(paper_params_ratio=round(p["cunet_params"] / p["unet_params"], 4),
                   paper_flops_ratio=round(p["cunet_gflops"] / p["unet_gflops"], 4))
    if budget:
        steps = {k: steps_for_budget(budget, c["forward_flops"], batch) for k, c in (("unet", un), ("cunet", cu))}
        total = {k: c["train_flops"] * batch * steps[k] for k, c in (("unet", un), ("cunet", cu))}
        row.update(batch=batch, budget_flops=f"{budget:.4g}", unet_steps=steps["unet"], cunet_steps=steps["cunet"],
                   unet_train_flops_total=f"{total['unet']:.4g}", cunet_train_flops_total=f"{total['cunet']:.4g}",
                   compute_gap=round(compute_gap(total["unet"], total["cunet"]), 4))
    return row


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


# Model fields written per side: the layout; image size and channels come from the data.
LAYOUT = ("kind", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "dropout",
          "learn_sigma", "use_scale_shift_norm")
ODE = ("solver", "solver_steps", "rtol", "atol", "adjoint", "max_num_steps")
# The smoke preset: tiny models on the 8x8 digits, a few steps, a handful of images (the test suite).
SMOKE_MODEL = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
               "num_heads": 1}
SMOKE_EVAL = {"fid_num": 8, "fid_steps": 2, "fid_ref": "digits", "fid_ref_num": 16, "fid_bootstrap": 5,
              "nll_num": 4, "nll_estimate": 2, "nll_data": "digits", "sample_batch_size": 8,
              "mu_latency_batches": [1, 4], "mu_latency_repeats": 3, "mu_threads": 1, "mu_steps": [2, 0],
              "mu_solvers": [["euler", 1, 1e-3], ["rk4", 1, 1e-3], ["dopri5", 1, 1e-2]], "mu_solver_fid_steps": 2,
              "mu_solver_repeats": 1, "mu_denoise_num": 6, "mu_sigmas": [0.1, 0.3]}


def spec_text(pairing: str, pair: dict, row: dict, steps_study: int = 0) -> str:
    """The experiment spec (:mod:`iddpm_eval.experiment.spec`, kind ``missing-u``) that trains both
    sides of a pairing at equal compute, checkpoints at :data:`FRACTIONS` of each side's steps."""
    lines = ["# Generated by benchmarks/missing_u/pairings.py: do not edit (rerun it).",
             f'name = "{pairing}"', 'kind = "missing-u"',
             f'description = """\nThe Missing U, pairing {pairing!r}: {row["unet_config"]} ({row["unet_params"]:,} '
             f'parameters, {row["unet_gflops"]} GFLOP per forward) against {row["cunet_config"]} '
             f'({row["cunet_params"]:,} parameters, {row["cunet_gflops"]} GFLOP, NFE {row["cunet_nfe"]}), each trained '
             f'for {row["budget_flops"]} FLOPs (batch {row["batch"]}: {row["unet_steps"]} and {row["cunet_steps"]} '
             f'steps; measured gap {row["compute_gap"]:.2%}).\n"""',
             "notes = [", *[f"  {_toml_value(n)}," for n in NOTES], "]", "",
             "[base.diffusion]", f"steps = {STEPS_T}", 'schedule = "cosine"', "", "[base.train]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in {**TRAIN, "batch_size": int(row["batch"])}.items()]
    for side in ("unet", "cunet"):
        c = pair[side]
        n = int(row[f"{side}_steps"])
        model = {k: getattr(c, k) for k in LAYOUT + (ODE if side == "cunet" else ())}
        model = {k: list(v) if isinstance(v, tuple) else v for k, v in model.items() if v is not None}
        lines += ["", "[[rows]]", f'name = "{side}"', 'objective = "hybrid"',
                  f"steps = {_toml_value(sorted({max(1, round(f * n)) for f in FRACTIONS}))}",
                  f"model = {_toml_value(model)}"]
    ev = {**EVAL, "mu_steps_num": int(steps_study)}
    lines += ["", "[eval]"] + [f"{k} = {_toml_value(v)}" for k, v in ev.items()]
    lines += ["", "[launcher]", 'name = "local"', "max_parallel = 1", "",
              "[presets.smoke.base.diffusion]", "steps = 20", "[presets.smoke.base.train]",
              'data = "digits"', "batch_size = 8", "save_interval = 0", "log_interval = 1", "sample_num = 4",
              'sample_steps = "4"',
              "[presets.smoke.eval]"] + [f"{k} = {_toml_value(v)}" for k, v in
                                         {**SMOKE_EVAL, "mu_steps_num": 8 if steps_study else 0}.items()]
    # smoke steps at about equal compute: the tiny continuous U-Net costs 2.4x the U-Net per step
    for side, steps in (("unet", [2, 5]), ("cunet", [1, 2])):
        lines += [f"[presets.smoke.rows.{side}]", f"steps = {steps}", f"model = {_toml_value(SMOKE_MODEL)}"]
    return "\n".join(lines) + "\n"


def write_specs(pairs: dict, rows: dict, out_dir: Path = SPEC_DIR) -> list[Path]:
    """One experiment spec per pairing (``benchmarks/missing_u/<pairing>.toml``); returns the paths."""
    paths = []
    for name, pair in pairs.items():
        path = Path(out_dir) / f"{name}.toml"
        write_text(path, spec_text(name, pair, rows[name], STEPS_STUDY.get(name, 0)))
        paths.append(path)
    return paths


def csv_text(rows: list[dict]) -> str:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="training FLOPs per side")
    p.add_argument("--no-specs", action="store_true", help="only the cost table")
    p.add_argument("--out", type=Path, default=RESULTS / "pairings.csv")
    a = p.parse_args(argv)
    if a.budget <= 0:
        p.error("--budget must be positive")
    rows = [pairing_row("paper-64px", {**paper_pairing_64()}, None, paper=True)]
    pairs = pairings()
    by_name = {name: pairing_row(name, pair, a.budget, paper=name == "paper") for name, pair in pairs.items()}
    rows += list(by_name.values())
    for name, pair in pairs.items():
        if pair["search"]:
            s = pair["search"]
            by_name[name]["search"] = f"{s['what']}: " + " ".join(f"{w}:{v}" for w, v in s["searched"].items())
    write_text(a.out, csv_text(rows))
    sys.stdout.write(csv_text(rows))
    if not a.no_specs:
        for path in write_specs(pairs, by_name):
            print(path)


if __name__ == "__main__":
    main()
