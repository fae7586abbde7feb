"""How long an experiment's preset takes on this machine, from measured per-unit costs
(``results/paper/timing.csv``, written by ``python -m benchmarks.paper.timing``): training steps,
sampling steps per image, Inception features per image and per-example gradients, times the
counts the spec asks for. Costs of a width that was not timed scale from the nearest timed width
by (width ratio)^2 (convolution cost grows with channels squared)."""

from __future__ import annotations

import csv
from pathlib import Path

from iddpm_eval import sweep_eval

DEFAULT_TIMING = Path("results/paper/timing.csv")


def load_costs(path=DEFAULT_TIMING) -> dict:
    """{what: {width: seconds}} (Inception under width 0)."""
    costs: dict = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            costs.setdefault(r["what"], {})[int(r["width"] or 0)] = float(r["seconds"])
    return costs


def _cost(costs: dict, what: str, width: int) -> float:
    table = costs[what]
    w0 = min(table, key=lambda w: abs(w - width))
    return table[w0] * (width / w0) ** 2 if w0 else table[w0]


def estimate(exp, costs: dict) -> dict:
    """Seconds of training and of evaluation per run and in all (serial, on the timed threads)."""
    from iddpm_eval.paper_eval import OWN

    ev = {**sweep_eval.DEFAULTS, **OWN, **exp.eval_settings}
    inc = costs["inception_per_image"][0]
    per_run, total_train, total_eval = [], 0.0, 0.0
    for run in exp.runs:
        w, T = run.width, run.config.diffusion.steps
        step = _cost(costs, "train_step", w) * run.config.train.batch_size / 64
        fwd = _cost(costs, "sample_step_per_image", w)
        train = step * max(run.steps)
        evals = 0.0
        for _ in run.steps:
            if exp.kind == "sampling-steps":
                variants = ev["ss_variants"].get(run.objective, [])
                evals += sum(int(ev["fid_num"]) * ((k or T) * fwd + inc) for k in ev["ss_steps"]) * len(variants)
            elif int(ev["fid_num"]):
                evals += int(ev["fid_num"]) * ((int(ev["fid_steps"]) or T) * fwd + inc)
            if int(ev["nll_num"]):
                k = int(ev["nll_estimate"]) or T
                evals += int(ev["nll_num"]) * k * fwd * 1.5  # the decoder and KL terms on top of the forward
            if exp.kind == "importance-sampling" and int(ev["gn_groups"]):
                evals += int(ev["gn_groups"]) * int(ev["gn_group_size"]) * step / 64 \
                    + int(ev["gn_examples"]) * _cost(costs, "per_example_grad", w)
        per_run.append({"run": run.name, "train_s": train, "eval_s": evals})
        total_train += train
        total_eval += evals
    ref = int(ev.get("fid_ref_num") or 0) * inc
    return {"runs": per_run, "train_s": total_train, "eval_s": total_eval + ref,
            "total_s": total_train + total_eval + ref}
