"""Sweeps: a grid of training runs (model width x depth, objectives, schedules, seeds) trained to
chosen checkpoint steps and evaluated at each into one sweep table. The grid comes from a TOML spec
(:mod:`iddpm_core.sweep_spec`) or from flags; each run is one job (:mod:`iddpm_core.launch`:
submitit, local processes or Slurm). This module does the work of one run and keeps the table.

Layout of a sweep folder ``OUT``::

    OUT/sweep.json              evaluation settings (a rerun must match them; runs may be added)
    OUT/sweep.csv               the sweep table: one row per run and checkpoint (all runs merged)
    OUT/runs/<run>/run.json     the run's identity (axes, config, config hash)
    OUT/runs/<run>/rows.csv     the run's evaluated checkpoints (written only by the run's job)
    OUT/runs/<run>/log.jsonl    what happened: segments trained, checkpoints evaluated, requeues, by whom
    OUT/runs/<run>/...          the trainer's output (checkpoints/, metrics.csv, tb/, samples/)
    OUT/jobs/<run>.json         the run's latest job: launcher, job id, submitit folder, logs, state
    OUT/jobs/history.jsonl      every submission
    OUT/submitit/<job id>/      submitit's pickles and the job's stdout / stderr

A run named ``w<width>_d<depth>`` (plus ``_<objective>``, ``_<schedule>``, ``_s<seed>`` for the
axes a spec lists) trains with ``model.base_channels = width`` and ``model.num_res_blocks = depth``
to each checkpoint step in turn (the trainer resumes exactly, so checkpoints along one run equal
separate runs of those lengths with the same constant learning rate schedule) and, at each, calls
``evaluate(checkpoint_path, run_info) -> dict``; the returned numbers (``fid``, ``fid_ci_low``,
``fid_ci_high``, ``nll``, ``nll_stderr``, ...) become columns of the row. Without ``evaluate``
only the training columns are filled; a later rerun with an evaluator fills the missing
evaluations from the kept checkpoints.

Reruns and interruptions. Each row is written to ``rows.csv`` atomically as soon as its checkpoint
is evaluated, and ``sweep.csv`` is re-merged from all ``rows.csv`` under a file lock (jobs run in
parallel). A rerun skips every checkpoint that already has a row, evaluates checkpoints that were
trained but not evaluated, and resumes training from the run's ``latest.pt`` (written every
``train.save_interval`` steps and at each checkpoint step), so a killed, cancelled or preempted
job loses at most the steps since its last save and the resumed run computes what an
uninterrupted one computes.

Scheduling is submitit's (:mod:`iddpm_core.launch`). What this project once did itself, lock
files claiming runs in a shared folder and ``--worker i --workers n`` splitting the grid, is gone:
a job per run, submitted by one command, needs no claims, and Slurm (or the local launcher's
``--max-parallel``) decides what runs where. The one thing submitit does not do, keeping a second
invocation of the sweep from submitting a run whose job is still pending or running, is done from
the job records in ``OUT/jobs/``. The sweep does not run under ``torchrun`` (its ranks would
submit the same jobs); to train one large run with DDP, use ``iddpm-train run`` under torchrun.

``iddpm_core`` never imports ``iddpm_eval``: the evaluator is passed in (the CLI resolves
``--eval-hook MODULE:FUNC``, which the jobs import by name).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from iddpm_core.io import write_text
from iddpm_core.provenance import file_lock, git_commit, utc_now
from iddpm_core.sweep_grid import RunSpec, SweepError, select

# Leading columns of the sweep table, in order (iddpm_eval.scaling reads run, params, train_flops,
# images_seen, step, fid, nll and their intervals). Extra columns from the evaluator follow, then
# the provenance columns.
COLUMNS = ("run", "run_index", "width", "depth", "objective", "schedule", "seed", "step", "params", "train_flops", "images_seen", "flops_per_image",
           "fid", "fid_ci_low", "fid_ci_high", "nll", "nll_stderr")
TAIL_COLUMNS = ("checkpoint", "config_hash", "config", "eval_settings", "eval_hook", "train_seconds",
                "eval_seconds", "worker", "job_id", "time", "git_commit", "command")
TABLE = "sweep.csv"
SWEEP_JSON = "sweep.json"
Evaluate = Callable[[str, dict], dict]


def load_hook(spec: str | None):
    """``MODULE:FUNC`` -> the function (``None``/``"none"`` -> None); errors name the spec."""
    if spec is None or spec.lower() in ("none", ""):
        return None
    if ":" not in spec:
        raise SweepError(f"eval hook must be MODULE:FUNC or 'none', got {spec!r}")
    mod_name, func_name = spec.split(":", 1)
    import importlib

    try:
        fn = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SweepError(f"eval hook {spec}: cannot import {mod_name} ({exc})") from exc
    for part in func_name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise SweepError(f"eval hook {spec}: {mod_name} has no callable {func_name}")
    return fn


# ----------------------------------------------------------------------------- small files

def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a rows.csv / sweep.csv as dicts of strings ([] when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="") as fh:
            return [dict(r) for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: cannot read the table ({exc})") from exc


def _columns(rows: Sequence[dict]) -> list[str]:
    seen = set(COLUMNS) | set(TAIL_COLUMNS)
    extra = sorted({k for r in rows for k in r} - seen)
    return list(COLUMNS) + extra + list(TAIL_COLUMNS)


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows as CSV atomically (fixed leading columns, evaluator columns, provenance)."""
    cols = _columns(rows)
    from iddpm_core.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({c: _cell(r.get(c)) for c in cols})


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_id() -> str:
    """The submitit / Slurm job this process runs in ("" outside a job)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or ""


def _log(run_dir: Path, event: dict) -> None:
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"time": utc_now(), "worker": worker_id(), **event}, default=str) + "\n")


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the sweep

@dataclass
class SweepResult:
    """What one call of :func:`run_sweep` did."""

    out_dir: str
    table: str
    rows: int
    trained: list[str] = field(default_factory=list)    # "run@step" segments trained in this call
    evaluated: list[str] = field(default_factory=list)  # "run@step" checkpoints evaluated in this call
    skipped: list[str] = field(default_factory=list)    # runs already complete
    submitted: list[str] = field(default_factory=list)  # "run: job id" submitted in this call
    busy: list[str] = field(default_factory=list)       # runs whose job is still pending or running
    failed: list[str] = field(default_factory=list)     # "run: state (log)" of jobs that ended unfinished


def _check_sweep_json(out: Path, eval_settings: dict | None) -> None:
    """Rows of one sweep must share their evaluation settings: the first call with an evaluator
    records them in ``sweep.json``; later calls with an evaluator must match. Training-only calls
    (``eval_settings`` None) pass, so a sweep trained without an evaluator can be evaluated later."""
    path = out / SWEEP_JSON
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("eval")
        except (ValueError, AttributeError) as exc:
            raise SweepError(f"{path}: not readable JSON ({exc})") from exc
    if old is not None and eval_settings is not None:
        diff = sorted(k for k in set(old) | set(eval_settings) if old.get(k) != eval_settings.get(k))
        if diff:
            raise SweepError(f"{path} holds other evaluation settings ({', '.join(diff)} differ: "
                             f"{ {k: old.get(k) for k in diff} } vs { {k: eval_settings.get(k) for k in diff} }); "
                             "use the same settings or another --out folder")
    elif not path.exists() or (old is None and eval_settings is not None):
        write_text(path, json.dumps({"eval": eval_settings}, indent=2, sort_keys=True) + "\n")


def _check_run_json(run_dir: Path, run: RunSpec) -> None:
    path = run_dir / "run.json"
    mine = {"name": run.name, "index": run.index, "width": run.width, "depth": run.depth, "objective": run.objective,
            "schedule": run.schedule, "seed": run.seed, "steps": list(run.steps), "config_hash": run.config_hash,
            "identity": run.identity()}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config_hash") != mine["config_hash"]:
            a, b = old.get("identity", {}), mine["identity"]
            diffs = [f"{s}.{k}" for s in ("model", "diffusion", "train")
                     for k in sorted(set(a.get(s, {})) | set(b.get(s, {})))
                     if a.get(s, {}).get(k) != b.get(s, {}).get(k)]
            raise SweepError(f"{path}: run {run.name} was trained with another config ({', '.join(diffs) or 'hash'} "
                             "differ); use another --out folder")
    if not path.exists() or (old.get("steps"), old.get("index")) != (mine["steps"], mine["index"]):
        write_text(path, json.dumps(mine, indent=2, sort_keys=True) + "\n")


def merge_table(out_dir: str | os.PathLike, copy_to: str | os.PathLike | None = None) -> Path:
    """Re-merge ``OUT/sweep.csv`` from every ``runs/*/rows.csv`` (ordered by grid index, then step),
    under a file lock so concurrent workers never drop each other's rows; optionally write the same
    table to ``copy_to``."""
    out = Path(out_dir)
    with file_lock(out / ".table.lock"):
        rows = []
        for f in sorted((out / "runs").glob("*/rows.csv")):
            rows += read_rows(f)
        rows.sort(key=lambda r: (int(r.get("run_index") or 0), r.get("run", ""), int(r.get("step") or 0)))
        write_rows(out / TABLE, rows)
        if copy_to is not None:
            write_rows(copy_to, rows)
    return out / TABLE


def _ckpt_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt_{step:06d}.pt"


def _train_to(run: RunSpec, run_dir: Path, step: int, progress: bool, train_fn: Callable) -> float:
    """Train ``run`` to ``step`` (resuming from latest.pt) so that ``ckpt_<step>.pt`` exists.
    ``latest.pt`` is saved every ``train.save_interval`` steps on the way (0: only at ``step``)."""
    from iddpm_core.checkpoint import load_checkpoint

    target = _ckpt_path(run_dir, step)
    latest = run_dir / "checkpoints" / "latest.pt"
    if latest.exists():
        done = int(load_checkpoint(latest).get("step", 0))
        if done > step:
            raise SweepError(f"run {run.name} is already trained to step {done} but has no checkpoint at step "
                             f"{step} ({target}); choose checkpoint steps the run saved or use another --out")
        if done == step:  # trained, periodic copy missing
            shutil.copyfile(latest, target)
            return 0.0
    cfg = copy.deepcopy(run.config)
    cfg.train.steps = step
    if not cfg.train.save_interval or cfg.train.save_interval > step:
        cfg.train.save_interval = step
    t0 = time.time()
    train_fn(cfg, run_dir, resume="auto", progress=progress)
    if not target.exists() and latest.exists() and int(load_checkpoint(latest).get("step", -1)) == step:
        shutil.copyfile(latest, target)  # the step is not a multiple of save_interval: the final save
    if not target.exists():
        raise SweepError(f"run {run.name}: the trainer finished but wrote no {target}")
    return time.time() - t0


def _row_done(row: dict, evaluate: Evaluate | None) -> bool:
    return evaluate is None or bool(row.get("eval_hook"))


def run_done(out_dir: str | os.PathLike, run: RunSpec, evaluated: bool) -> bool:
    """Whether every checkpoint step of ``run`` has its row (with an evaluation when ``evaluated``)."""
    rows = {int(r["step"]): r for r in read_rows(Path(out_dir) / "runs" / run.name / "rows.csv")}
    return all(s in rows and (not evaluated or rows[s].get("eval_hook")) for s in run.steps)


def prepare(out_dir: str | os.PathLike, runs: Sequence[RunSpec], eval_settings: dict | None) -> None:
    """Checks before any work: no torchrun, a non-empty grid, evaluation settings and run configs
    that match what the folder already holds (run.json is written for new runs)."""
    out = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SweepError("the sweep does not run under torchrun (WORLD_SIZE > 1): each run is a job of its own; "
                         "use --launcher local/slurm")
    if not runs:
        raise SweepError("the grid has no runs")
    out.mkdir(parents=True, exist_ok=True)
    _check_sweep_json(out, eval_settings)
    for run in runs:
        _check_run_json(out / "runs" / run.name, run)


def run_one(out_dir: str | os.PathLike, run: RunSpec, evaluate: Evaluate | None = None, *,
            eval_settings: dict | None = None, eval_hook: str | None = None, command: str | None = None,
            table_copy: str | os.PathLike | None = None, progress: bool = True, train_fn: Callable | None = None,
            res: "SweepResult | None" = None) -> "SweepResult":
    """Train and evaluate one run of the grid into ``out_dir`` (what one job does; see the module
    docstring). ``evaluate(checkpoint_path, run_info) -> dict`` gets ``run_info`` with run,
    run_index, width, depth, step, params, train_flops, images_seen, run_dir, out_dir, data and
    ``eval`` (= ``eval_settings``). ``eval_hook`` names it in the table (default: its
    module:qualname). ``command`` (the command line) and the git commit are recorded in every row.
    ``train_fn`` defaults to :func:`iddpm_core.train.train`."""
    if train_fn is None:
        from iddpm_core.train import train as train_fn
    out = Path(out_dir)
    eval_settings = dict(eval_settings or {})
    if res is None:
        res = SweepResult(str(out), str(out / TABLE), 0)
    if evaluate is not None and eval_hook is None:
        eval_hook = f"{getattr(evaluate, '__module__', '?')}:{getattr(evaluate, '__qualname__', repr(evaluate))}"
    run_dir = out / "runs" / run.name
    rows_path = run_dir / "rows.csv"
    _check_run_json(run_dir, run)
    rows = {int(r["step"]): r for r in read_rows(rows_path)}
    if all(s in rows and _row_done(rows[s], evaluate) for s in run.steps):
        res.skipped.append(run.name)
        return res
    commit = git_commit()
    for step in run.steps:
        if step in rows and _row_done(rows[step], evaluate):
            continue
        ckpt = _ckpt_path(run_dir, step)
        train_seconds = None
        if not ckpt.exists():
            train_seconds = _train_to(run, run_dir, step, progress, train_fn)
            _log(run_dir, {"event": "trained", "step": step, "seconds": train_seconds})
            res.trained.append(f"{run.name}@{step}")
        row = _training_row(run, ckpt, step)
        row.update(train_seconds=train_seconds, config_hash=run.config_hash, config=run.config.to_dict(),
                   eval_settings=eval_settings, worker=worker_id(), job_id=job_id(), time=utc_now(),
                   git_commit=commit, command=command or "")
        if evaluate is not None:
            info = {**row, "run_dir": str(run_dir), "out_dir": str(out), "checkpoint": str(ckpt),
                    "data": run.config.train.data, "data_root": run.config.train.data_root,
                    "eval": eval_settings, "progress": progress}
            info.pop("config", None)
            t0 = time.time()
            got = evaluate(str(ckpt), info)
            if not isinstance(got, dict):
                raise SweepError(f"the evaluator {eval_hook} returned {type(got).__name__}, not a dict")
            reserved = set(got) & (set(row) - {"fid", "fid_ci_low", "fid_ci_high", "nll", "nll_stderr"})
            if reserved:
                raise SweepError(f"the evaluator {eval_hook} returned reserved columns {sorted(reserved)}")
            row.update(got)
            row.update(eval_hook=eval_hook, eval_seconds=time.time() - t0)
            _log(run_dir, {"event": "evaluated", "step": step, "seconds": row["eval_seconds"]})
            res.evaluated.append(f"{run.name}@{step}")
        rows[step] = row
        write_rows(rows_path, [rows[s] for s in sorted(rows)])
        merge_table(out, table_copy)
    return res


def run_sweep(out_dir: str | os.PathLike, runs: Sequence[RunSpec], evaluate: Evaluate | None = None, *,
              eval_settings: dict | None = None, eval_hook: str | None = None, only: Sequence[str] | None = None,
              command: str | None = None, table_copy: str | os.PathLike | None = None, progress: bool = True,
              train_fn: Callable | None = None) -> SweepResult:
    """Every run of the grid, one after the other in this process (``--launcher inline``; the jobs
    of the other launchers each call :func:`run_one`). ``only``: run names to do."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    runs = select(runs, only)
    prepare(out, runs, dict(eval_settings or {}) if evaluate is not None else None)
    res = SweepResult(str(out), str(out / TABLE), 0)
    for run in tqdm(runs, desc="sweep runs", disable=not progress):
        run_one(out, run, evaluate, eval_settings=eval_settings, eval_hook=eval_hook, command=command,
                table_copy=table_copy, progress=progress, train_fn=train_fn, res=res)
    table = merge_table(out, table_copy)
    res.rows = len(read_rows(table))
    return res


def _training_row(run: RunSpec, ckpt: Path, step: int) -> dict:
    """The training columns of a checkpoint (numbers read from inside it)."""
    from iddpm_core.checkpoint import load_checkpoint

    c = load_checkpoint(ckpt)
    if int(c.get("step", -1)) != step:
        raise SweepError(f"{ckpt}: holds step {c.get('step')}, expected {step}")
    cfg = run.config
    return {"run": run.name, "run_index": run.index, "width": run.width, "depth": run.depth,
            "objective": run.objective or cfg.diffusion.loss, "schedule": cfg.diffusion.schedule,
            "seed": cfg.train.seed, "step": step,
            "params": c.get("num_parameters"), "train_flops": c.get("train_flops"),
            "images_seen": c.get("images_seen"), "flops_per_image": c.get("flops_per_image"),
            "checkpoint": os.path.relpath(ckpt, ckpt.parents[3]) if len(ckpt.parents) > 3 else str(ckpt)}
