"""Results of an experiment: ``table.csv`` (one row per measured number set, with its provenance:
commit, command, config hash and config, seed, n), figures and a README.md written from the
table, in ``results/<suite>/<name>/``. One function per kind; every number in the README comes
from the table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from iddpm_core.io import write_text
from iddpm_core.provenance import json_clean

PROVENANCE = ("git_commit", "command", "config_hash", "config", "seed", "checkpoint", "job_id", "time")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _fmt(v, nd: int = 3) -> str:
    v = _num(v)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{nd}g}" if abs(v) >= 1000 else f"{v:.{nd}f}"


def _ci(lo, hi, nd: int = 3) -> str:
    return f"[{_fmt(lo, nd)}, {_fmt(hi, nd)}]"


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    from iddpm_core.io import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    return path


def _with_nll_ci(df: pd.DataFrame) -> pd.DataFrame:
    """The bits/dim interval of each row: the one the nll run's summary gave (columns nll_ci_low /
    nll_ci_high of the sweep rows), or the summary's own rule (nll +- Z stderr, Z of
    :mod:`iddpm_eval.nll.run`) for rows written before they carried it."""
    df = df.copy()
    if "nll" in df:
        from iddpm_eval.nll.run import Z

        v = pd.to_numeric(df["nll"], errors="coerce")
        se = pd.to_numeric(df.get("nll_stderr"), errors="coerce")
        for col, sign in (("nll_ci_low", -1.0), ("nll_ci_high", 1.0)):
            given = pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)
            df[col] = given.fillna(v + sign * Z * se)
    return df


def _provenance(df: pd.DataFrame) -> list[str]:
    return [c for c in PROVENANCE if c in df]


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _timing(df: pd.DataFrame) -> str:
    tr = pd.to_numeric(df.get("train_seconds"), errors="coerce").sum() if "train_seconds" in df else 0.0
    ev = pd.to_numeric(df.get("eval_seconds"), errors="coerce").sum() if "eval_seconds" in df else 0.0
    return (f"{(tr + ev) / 60:.1f} minutes of job time ({tr / 60:.1f} training, {ev / 60:.1f} evaluation; "
            "summed over the runs, which the launcher may run in parallel)")


def _header(exp, df: pd.DataFrame, info: dict) -> list[str]:
    commits = sorted(set(str(c) for c in df.get("git_commit", [])))
    cmds = sorted(set(str(c) for c in df.get("command", [])))
    out = [f"# {exp.name} (preset `{exp.preset}`)", "", exp.description.strip(), "",
           f"Spec: `{os.path.relpath(exp.path)}`. Rows: {len(df)}, from {len(exp.runs)} training runs. "
           f"Commit(s): {', '.join(f'`{c}`' for c in commits) or '-'}.", "",
           "Command: " + ("; ".join(f"`{c}`" for c in cmds) if cmds else "-"), "",
           f"Time: {_timing(df)}. Wall time of the last invocation: {info.get('wall_seconds', 0) / 60:.1f} minutes "
           f"(load average {info.get('load_avg', '-')} on {os.cpu_count()} cores at its start).", ""]
    if exp.notes:
        out += ["Choices (where the paper is silent or the CPU scale forces one):", ""]
        out += [f"- {n}" for n in exp.notes] + [""]
    return out


# ----------------------------------------------------------------------------- judging claims

def interval(row: pd.Series, metric: str) -> tuple[float, float, float]:
    if metric == "nll":
        return _num(row.get("nll")), _num(row.get("nll_ci_low")), _num(row.get("nll_ci_high"))
    return _num(row.get("fid")), _num(row.get("fid_ci_low")), _num(row.get("fid_ci_high"))


def judge(better: tuple, worse: tuple) -> str:
    """Lower is better. ``holds`` when the better row's interval lies below the worse row's,
    ``reversed`` when above, ``inconclusive`` when they overlap (or a number is missing)."""
    if any(math.isnan(x) for x in (*better, *worse)):
        return "not measured"
    if better[2] < worse[1]:
        return "holds"
    if worse[2] < better[1]:
        return "reversed"
    return "inconclusive (intervals overlap)"


def _names(v) -> list[str]:
    return list(v) if isinstance(v, list) else [v]


def _judge_orderings(exp, last: pd.DataFrame) -> list[dict]:
    """Each ordering of the spec, in the paper's numbers and here (by the intervals)."""
    by = {r["run"]: r for _, r in last.iterrows()}
    paper = {r["name"]: r.get("paper", {}) for r in exp.rows}
    out = []
    for o in exp.orderings:
        m = o["metric"]
        pairs = [(b, w) for b in _names(o["better"]) for w in _names(o["worse"])]
        verdicts, paper_ok = [], True
        for b, w in pairs:
            pb, pw = paper.get(b, {}).get(m), paper.get(w, {}).get(m)
            paper_ok &= pb is not None and pw is not None and pb < pw
            verdicts.append(judge(interval(by[b], m), interval(by[w], m)) if b in by and w in by else "not measured")
        here = verdicts[0] if len(set(verdicts)) == 1 else "mixed: " + ", ".join(
            f"{b} vs {w} {v}" for (b, w), v in zip(pairs, verdicts))
        out.append({"claim": o["claim"], "metric": m, "better": ",".join(_names(o["better"])),
                    "worse": ",".join(_names(o["worse"])), "in_paper": "yes" if paper_ok else "no", "here": here})
    return out


# ----------------------------------------------------------------------------- kinds

def _last_rows(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["step"] = pd.to_numeric(df["step"])
    return df.sort_values("step").groupby("run", sort=False).tail(1).sort_values("run_index")


def _report_ablation(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    df = _with_nll_ci(df)
    paper = {r["name"]: r.get("paper", {}) for r in exp.rows}
    for key in ("iters", "nll", "fid"):
        df[f"paper_{key}"] = [paper.get(r, {}).get(key) for r in df["run"]]
    df["T"] = [json.loads(c)["diffusion"]["steps"] if isinstance(c, str) else None for c in df["config"]]
    df["timestep_sampler"] = [json.loads(c)["train"]["timestep_sampler"] if isinstance(c, str) else None
                              for c in df["config"]]
    cols = ["run", "paper_iters", "step", "T", "schedule", "objective", "timestep_sampler", "nll", "nll_stderr",
            "nll_ci_low", "nll_ci_high", "nll_n", "nll_method", "fid", "fid_ci_low", "fid_ci_high", "fid_n",
            "fid_ref_n", "precision", "recall", "paper_nll", "paper_fid", "params", "train_flops"]
    table = df[[c for c in cols if c in df] + _provenance(df)]
    _write_csv(table, out / "table.csv")
    last = _last_rows(df)
    orders = _judge_orderings(exp, last)
    _write_csv(pd.DataFrame(orders), out / "orderings.csv")
    fig = _plot_ablation(last, out / "ablation.png")
    rows = [[r["run"], r.get("paper_iters") or "-", int(r["step"]), r["T"], r["schedule"], r["objective"],
             f"{_fmt(r.get('nll'))} {_ci(r.get('nll_ci_low'), r.get('nll_ci_high'))}",
             f"{_fmt(r.get('fid'), 2)} {_ci(r.get('fid_ci_low'), r.get('fid_ci_high'), 2)}",
             _fmt(r.get("precision")), _fmt(r.get("recall")), _fmt(r.get("paper_nll"), 2), _fmt(r.get("paper_fid"), 1)]
            for _, r in last.iterrows()]
    text = _header(exp, df, info) + [
        "## Rows (last checkpoint of each run; 95% intervals)", "",
        _md_table(["row", "paper iters", "steps here", "T", "schedule", "objective", "bits/dim", "FID",
                   "precision", "recall", "paper NLL", "paper FID"], rows), "",
        "## The paper's orderings, judged with the intervals", "",
        _md_table(["claim", "metric", "better", "worse", "in the paper", "here"],
                  [[o["claim"], o["metric"], o["better"], o["worse"], o["in_paper"], o["here"]] for o in orders]),
        "", f"![ablation]({fig.name})", ""]
    write_text(out / "README.md", "\n".join(text))
    return {"orderings": orders}


def _plot_ablation(last: pd.DataFrame, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(last) + 1.5), sharey=True)
    y = np.arange(len(last))
    for ax, m, label in ((axes[0], "nll", "bits/dim"), (axes[1], "fid", "FID")):
        v = np.array([interval(r, m) for _, r in last.iterrows()], dtype=float)
        ax.errorbar(v[:, 0], y, xerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], fmt="o", capsize=3)
        ax.set_xlabel(f"{label} (95% interval)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y, list(last["run"]))
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _report_sampling_steps(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    import re

    long = []
    last = _last_rows(df)
    for _, r in last.iterrows():
        for c in r.index:
            m = re.fullmatch(r"fid_(ddpm|ddpm-fixed_large|ddpm-fixed_small|ddim)_(\d+|all)", c)
            if m and not pd.isna(r[c]):
                v, k = m.group(1), m.group(2)
                T = json.loads(r["config"])["diffusion"]["steps"]
                long.append({"run": r["run"], "objective": r["objective"], "variant": v,
                             "steps": T if k == "all" else int(k), "fid": r[c],
                             "fid_ci_low": r.get(f"fid_{v}_{k}_ci_low"), "fid_ci_high": r.get(f"fid_{v}_{k}_ci_high"),
                             "fid_n": r.get(f"fid_{v}_{k}_n"), "train_step": int(r["step"]),
                             **{p: r.get(p) for p in _provenance(df)}})
    table = pd.DataFrame(long)
    _write_csv(table, out / "table.csv")
    fig = _plot_curves(table, "steps", "fid", "fid_ci_low", "fid_ci_high", out / "fid_vs_steps.png",
                       "sampling steps", "FID (95% interval)", logy=False)
    rows = [[r["run"], r["variant"], int(r["steps"]), f"{_fmt(r['fid'], 2)} {_ci(r['fid_ci_low'], r['fid_ci_high'], 2)}",
             int(_num(r["fid_n"])) if not math.isnan(_num(r["fid_n"])) else "-"] for _, r in table.iterrows()]
    text = _header(exp, df, info) + ["## FID against sampling steps", "",
                                     _md_table(["model", "sampler", "steps", "FID [95%]", "n"], rows), "",
                                     f"![FID vs steps]({fig.name})", ""]
    write_text(out / "README.md", "\n".join(text))
    return {}


def _plot_curves(table: pd.DataFrame, x: str, y: str, lo: str, hi: str, path: Path, xlabel: str, ylabel: str,
                 logy: bool, group=("run", "variant")) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if len(table):
        for key, g in table.groupby(list(group), sort=False):
            g = g.sort_values(x)
            v = pd.to_numeric(g[y], errors="coerce").to_numpy(float)
            a = pd.to_numeric(g[lo], errors="coerce").to_numpy(float)
            b = pd.to_numeric(g[hi], errors="coerce").to_numpy(float)
            ax.errorbar(g[x].astype(float), v, yerr=[np.abs(v - a), np.abs(b - v)], marker="o", capsize=3,
                        label=" / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,))))
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _report_importance_sampling(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    df = _with_nll_ci(df)
    df["timestep_sampler"] = [json.loads(c)["train"]["timestep_sampler"] for c in df["config"]]
    df["label"] = df["objective"].astype(str) + " / " + df["timestep_sampler"]
    cols = ["run", "label", "objective", "timestep_sampler", "step", "nll", "nll_stderr", "nll_ci_low", "nll_ci_high",
            "nll_n", "nll_method", "b_simple", "b_simple_low", "b_simple_high", "trace_cov", "trace_cov_se", "grad_sq",
            "grad_sq_se", "gn_groups", "gn_group_size", "gn_examples", "gn_sampler_warmed_up", "images_seen"]
    table = df[[c for c in cols if c in df] + _provenance(df)]
    _write_csv(table, out / "table.csv")
    f1 = _plot_curves(table, "step", "b_simple", "b_simple_low", "b_simple_high", out / "gradient_noise.png",
                      "training step", "gradient noise scale B_simple (95%)", logy=True, group=("label",))
    f2 = _plot_curves(table, "step", "nll", "nll_ci_low", "nll_ci_high", out / "nll_curves.png",
                      "training step", "bits/dim (95%)", logy=False, group=("label",))
    rows = [[r["label"], int(r["step"]), f"{_fmt(r.get('nll'))} {_ci(r.get('nll_ci_low'), r.get('nll_ci_high'))}",
             f"{_fmt(r.get('b_simple'), 3)} {_ci(r.get('b_simple_low'), r.get('b_simple_high'), 3)}",
             r.get("gn_sampler_warmed_up", "-")] for _, r in table.iterrows()]
    text = _header(exp, df, info) + ["## Bits/dim and gradient noise scale along training", "",
                                     _md_table(["objective / timestep sampler", "step", "bits/dim [95%]",
                                                "B_simple [95%]", "sampler warmed up"], rows), "",
                                     f"![gradient noise]({f1.name})", "", f"![NLL learning curves]({f2.name})", ""]
    write_text(out / "README.md", "\n".join(text))
    return {}


def _report_scaling(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    from iddpm_eval import plots, scaling

    df = _with_nll_ci(df)
    _write_csv(df, out / "table.csv")
    n_boot, seed = int(exp.report.get("n_boot", 1000)), int(exp.report.get("seed", 0))
    fits, lines = {}, []
    for y in exp.report.get("metrics", ["fid", "nll"]):
        try:
            res = scaling.scaling_fit(scaling.read_table(out / "table.csv"), "compute", y, n_boot=n_boot, seed=seed,
                                      progress=False)
        except ValueError as exc:
            lines.append(f"- {y} against compute: no fit ({exc})")
            continue
        stem = f"fit_{y}_vs_compute"
        scaling.write_csv(res.table, out / f"{stem}.csv")
        plots.plot_scaling(res, out / f"{stem}.png")
        doc = json_clean(res.to_json())
        fits[y] = doc
        a = doc.get("alpha"), doc.get("alpha_ci", [None, None])
        lines.append(f"- {y} = E + A C^-alpha on the compute frontier ({doc['n_points']} points): alpha = "
                     f"{_fmt(a[0])} {_ci(*a[1])}, E = {_fmt(doc.get('E'))} {_ci(*doc.get('E_ci', [None, None]))}"
                     f" ({n_boot} bootstrap resamples over runs)")
        lines.append(f"  ![{y} vs compute]({stem}.png)")
    last = _last_rows(df)
    rows = [[r["run"], int(_num(r["params"])), int(r["step"]), f"{_num(r['train_flops']):.3g}",
             f"{_fmt(r.get('fid'), 2)} {_ci(r.get('fid_ci_low'), r.get('fid_ci_high'), 2)}",
             f"{_fmt(r.get('nll'))} {_ci(r.get('nll_ci_low'), r.get('nll_ci_high'))}"] for _, r in last.iterrows()]
    text = _header(exp, df, info) + ["## Fits against training compute", ""] + lines + [
        "", "## Last checkpoint of each model size", "",
        _md_table(["run", "parameters", "steps", "training FLOPs", "FID [95%]", "bits/dim [95%]"], rows), ""]
    write_text(out / "README.md", "\n".join(text))
    return {"fits": fits}


def _report_sweep(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    _write_csv(_with_nll_ci(df), out / "table.csv")
    write_text(out / "README.md", "\n".join(_header(exp, df, info)))
    return {}


def _report_missing_u(exp, df: pd.DataFrame, out: Path, info: dict) -> dict:
    from iddpm_eval.experiment.report_missing_u import report_missing_u

    return report_missing_u(exp, df, out, info)


REPORTS = {"missing-u": _report_missing_u, "ablation": _report_ablation, "sampling-steps": _report_sampling_steps,
           "importance-sampling": _report_importance_sampling, "scaling": _report_scaling, "sweep": _report_sweep}


def write_report(exp, table_path: Path, out: Path, info: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    df = pd.read_csv(table_path)
    return REPORTS[exp.kind](exp, df, out, info)
