"""Each run of a sweep as a submitit job: local processes (``local``) or Slurm (``slurm``), through
one code path (:func:`make_executor` sets up a ``submitit.AutoExecutor``; :func:`launch` submits).

A job is :class:`RunJob`, a picklable callable: it imports the evaluation hook by name, trains and
evaluates its run with :func:`iddpm_core.sweep.run_one`, and records its state in
``OUT/jobs/<run>.state.json``. It implements submitit's checkpointing protocol
(:class:`submitit.helpers.Checkpointable`): on preemption or timeout submitit calls
:meth:`RunJob.checkpoint`, which logs the event and hands submitit the same callable to requeue;
everything the run needs to continue (``latest.pt``, ``rows.csv``) is on disk, so the requeued job
resumes exactly from the run's last saved checkpoint.

:func:`launch` submits only unfinished runs whose last job is not still pending or running (the one
check submitit does not do), writes ``OUT/jobs/<run>.json`` (launcher, job id, submitit folder,
stdout/stderr paths) and appends to ``OUT/jobs/history.jsonl``. The local launcher keeps at most
``max_parallel`` jobs running and waits for them (submitit's local executor has no such limit);
the Slurm launcher submits every job at once as an array with ``--array=...%max_parallel`` and
returns unless asked to wait. Before anything is submitted, Slurm options are checked by
``sbatch --test-only`` with the same flags, so a partition, account or resource request Slurm
refuses is an error naming it.

Job states (:func:`run_states`): COMPLETED / FAILED are written by the job itself; a job that
vanished without writing its end (``kill -9``, ``scancel``, node failure) shows as INTERRUPTED or
as Slurm's state (CANCELLED, TIMEOUT, ...), and the next run of the sweep resubmits it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from iddpm_core.io import write_text
from iddpm_core.provenance import utc_now
from iddpm_core.sweep import (SweepResult, TABLE, _log, load_hook, merge_table, prepare, read_rows, run_done,
                              run_one)
from iddpm_core.sweep_grid import RunSpec, SweepError

try:  # submitit is a dependency; the import is guarded so `iddpm-train run` works without it
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    submitit = None
    Checkpointable = object

LIVE_SLURM = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
              "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}


@dataclass
class LauncherOptions:
    """How runs become jobs. ``time`` in minutes. Slurm only: partition, account, cpus_per_task,
    gpus_per_task, sbatch (extra flags ``--name=value``). ``threads``: torch threads per job
    (default: cpus_per_task, or the machine's cores / max_parallel for local jobs)."""

    name: str = "local"
    max_parallel: int | None = None
    time: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    sbatch: tuple = ()
    wait: bool | None = None  # None: local waits, Slurm returns after submitting
    threads: int | None = None

    def resolved_threads(self) -> int | None:
        """Torch threads per job; None (torch's default) for Slurm jobs without --cpus-per-task."""
        if self.threads:
            return self.threads
        if self.cpus_per_task:
            return self.cpus_per_task
        if self.name == "slurm":
            return None
        return max(1, (os.cpu_count() or 1) // max(1, self.max_parallel or 1))


def _sbatch_params(opts: LauncherOptions) -> dict:
    """``--flag=value`` strings -> submitit's ``slurm_additional_parameters`` (``--flag`` alone -> True)."""
    extra = {}
    for flag in opts.sbatch:
        if not flag.startswith("--"):
            raise SweepError(f"--sbatch {flag!r}: expected a long sbatch flag such as --qos=high")
        key, _, value = flag[2:].partition("=")
        extra[key.replace("-", "_")] = value if value else True
    return extra


def sbatch_flags(opts: LauncherOptions) -> list[str]:
    """The sbatch flags the jobs are submitted with (for ``sbatch --test-only``)."""
    flags = [f"--time={opts.time}"]
    for key, value in (("partition", opts.partition), ("account", opts.account),
                       ("cpus-per-task", opts.cpus_per_task), ("gpus-per-task", opts.gpus_per_task)):
        if value is not None:
            flags.append(f"--{key}={value}")
    return flags + list(opts.sbatch)


def check_slurm(opts: LauncherOptions) -> None:
    """Ask Slurm whether it would take a job with these options (``sbatch --test-only``); its refusal
    becomes a SweepError quoting sbatch's message and the flags."""
    flags = sbatch_flags(opts)
    cmd = ["sbatch", "--test-only", *flags, "--wrap", "true"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SweepError("--launcher slurm: sbatch not found (is this a Slurm login node? SLURM_CONF set?)") from None
    except subprocess.TimeoutExpired:
        raise SweepError("--launcher slurm: sbatch --test-only did not answer within 60 s") from None
    if done.returncode != 0:
        msg = " ".join((done.stderr or done.stdout).split())
        raise SweepError(f"Slurm refuses the launcher options {shlex.join(flags)}: {msg}")


def make_executor(folder: str | os.PathLike, opts: LauncherOptions):
    """A submitit executor for ``opts.name`` ("local" or "slurm"), its parameters set."""
    if submitit is None:  # pragma: no cover
        raise SweepError("the local and slurm launchers need submitit (pip install submitit)")
    if opts.name not in ("local", "slurm"):
        raise SweepError(f"unknown launcher {opts.name!r}; choose local or slurm")
    ex = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=opts.name)
    params = {"timeout_min": opts.time, "name": "iddpm-sweep"}
    if opts.name == "slurm":
        params.update(slurm_partition=opts.partition, slurm_account=opts.account,
                      cpus_per_task=opts.cpus_per_task, slurm_gpus_per_task=opts.gpus_per_task,
                      slurm_additional_parameters=_sbatch_params(opts) or None)
        if opts.max_parallel:
            params["slurm_array_parallelism"] = opts.max_parallel
        params = {k: v for k, v in params.items() if v is not None}
    try:
        ex.update_parameters(**params)
    except (ValueError, TypeError) as exc:
        raise SweepError(f"launcher {opts.name}: {exc}") from exc
    return ex


class RunJob(Checkpointable):
    """One run of the sweep as a submitit job (picklable: names and plain data only)."""

    def __init__(self, out_dir: str, run: RunSpec, eval_hook: str | None, eval_settings: dict, command: str,
                 table_copy: str | None = None, threads: int | None = None):
        self.out_dir, self.run, self.eval_hook = str(out_dir), run, eval_hook
        self.eval_settings, self.command, self.table_copy, self.threads = dict(eval_settings), command, table_copy, threads

    def _state(self, state: str, **extra) -> None:
        from iddpm_core.sweep import job_id

        path = Path(self.out_dir) / "jobs" / f"{self.run.name}.state.json"
        write_text(path, json.dumps({"run": self.run.name, "job_id": job_id(), "state": state,
                                     "host": socket.gethostname(), "pid": os.getpid(), "time": utc_now(), **extra},
                                    indent=2) + "\n")

    def __call__(self) -> dict:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        run_dir = Path(self.out_dir) / "runs" / self.run.name
        self._state("RUNNING")
        _log(run_dir, {"event": "job started", "job_id": _job_id_env()})
        try:
            evaluate = load_hook(self.eval_hook)
            res = run_one(self.out_dir, self.run, evaluate, eval_settings=self.eval_settings,
                          eval_hook=self.eval_hook if evaluate is not None else None, command=self.command,
                          table_copy=self.table_copy, progress=False)
        except BaseException as exc:
            if not isinstance(exc, SystemExit):  # submitit's requeue exits; that is no failure
                self._state("FAILED", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            raise
        self._state("COMPLETED")
        _log(run_dir, {"event": "job completed", "job_id": _job_id_env()})
        return {"run": self.run.name, "trained": res.trained, "evaluated": res.evaluated}

    def checkpoint(self, *args, **kwargs):
        """Preemption or timeout: everything is on disk already; requeue this same job, which
        resumes from the run's latest.pt and rows.csv."""
        run_dir = Path(self.out_dir) / "runs" / self.run.name
        _log(run_dir, {"event": "requeued", "job_id": _job_id_env()})
        self._state("REQUEUED")
        return super().checkpoint(*args, **kwargs)


def _job_id_env() -> str:
    from iddpm_core.sweep import job_id

    return job_id()


# ----------------------------------------------------------------------------- records and states

def _jobs_dir(out: Path) -> Path:
    return out / "jobs"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record(out: Path, run: RunSpec, job, opts: LauncherOptions) -> dict:
    rec = {"run": run.name, "launcher": opts.name, "job_id": str(job.job_id), "host": socket.gethostname(),
           "folder": str(job.paths.folder), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
           "submitted": utc_now()}
    write_text(_jobs_dir(out) / f"{run.name}.json", json.dumps(rec, indent=2) + "\n")
    with open(_jobs_dir(out) / "history.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    _log(out / "runs" / run.name, {"event": "submitted", "job_id": rec["job_id"], "launcher": opts.name})
    return rec


def _slurm_state(job_id: str) -> str | None:
    """Slurm's state of a job (``squeue``, which keeps ended jobs for MinJobAge); None if unknown."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "--states=all", "-o", "%T"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    states = [s.strip() for s in done.stdout.split() if s.strip()]
    return states[0] if done.returncode == 0 and states else None


def _local_alive(rec: dict) -> bool:
    """Whether a local job's controller (its pid is the job id) still runs on this host."""
    if rec.get("host") != socket.gethostname():
        return False
    try:
        cmd = Path(f"/proc/{int(rec['job_id'])}/cmdline").read_bytes()
        stat = Path(f"/proc/{int(rec['job_id'])}/stat").read_text()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmd and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def job_state(out: Path, run_name: str) -> dict:
    """The run's last job with its state: the job's own record when it wrote its end, else what the
    launcher says (Slurm's queue; a local job's process), else INTERRUPTED. {} when never submitted."""
    rec = _read_json(_jobs_dir(out) / f"{run_name}.json")
    if rec is None:
        return {}
    own = _read_json(_jobs_dir(out) / f"{run_name}.state.json") or {}
    mine = own if str(own.get("job_id", "")) == rec["job_id"] else {}
    state = mine.get("state", "SUBMITTED")
    if rec["launcher"] == "slurm":
        sl = _slurm_state(rec["job_id"])
        if sl in LIVE_SLURM:
            state = sl
        elif state not in ("COMPLETED", "FAILED"):
            state = sl or "INTERRUPTED"
    elif state not in ("COMPLETED", "FAILED") and not _local_alive(rec):
        state = "INTERRUPTED"
    return {**rec, "state": state, "error": mine.get("error", "")}


def is_live(state: str) -> bool:
    return state in LIVE_SLURM or state in ("SUBMITTED", "RUNNING", "REQUEUED")


# ----------------------------------------------------------------------------- launching

@dataclass
class _Pending:
    run: RunSpec
    job: object = None
    rec: dict = field(default_factory=dict)


def _triage(out: Path, runs: Sequence[RunSpec], evaluated: bool, res: SweepResult) -> list[_Pending]:
    """The runs to submit: neither finished (added to ``res.skipped``) nor held by a live job
    (added to ``res.busy``)."""
    todo = []
    for run in runs:
        if run_done(out, run, evaluated):
            res.skipped.append(run.name)
            continue
        st = job_state(out, run.name)
        if st and is_live(st["state"]):
            res.busy.append(f"{run.name} (job {st['job_id']} {st['state']})")
            continue
        todo.append(_Pending(run))
    return todo


def _submit(out: Path, todo: list[_Pending], opts: LauncherOptions, job_of, submitted, wait: bool,
            poll_s: float) -> None:
    """Slurm: every job in one array, then (when waiting) poll until none is live. Local: at most
    ``max_parallel`` jobs at once, each submitted as a slot frees."""
    ex = make_executor(out / "submitit", opts)
    if opts.name == "slurm":
        with ex.batch():
            for p in todo:
                p.job = ex.submit(job_of(p))
        for p in todo:
            submitted(p)
        while wait and any(is_live(job_state(out, p.run.name)["state"]) for p in todo):
            time.sleep(poll_s)
        return
    limit = opts.max_parallel or 1
    queue, running = list(todo), []
    while queue or running:
        running = [p for p in running if not p.job.done()]
        while queue and len(running) < limit:
            p = queue.pop(0)
            p.job = ex.submit(job_of(p))
            submitted(p)
            running.append(p)
        if running:
            time.sleep(poll_s)


def launch(out_dir: str | os.PathLike, runs: Sequence[RunSpec], opts: LauncherOptions, *, eval_hook: str | None,
           eval_settings: dict | None, command: str = "", table_copy: str | None = None,
           poll_s: float = 1.0, echo=None) -> SweepResult:
    """Submit a job for every unfinished run (see the module docstring) and, when waiting, wait for
    them; returns what happened (``failed`` lists runs whose job ended unfinished)."""
    out = Path(out_dir).resolve()
    table_copy = str(Path(table_copy).resolve()) if table_copy else None  # jobs may start elsewhere
    evaluated = eval_hook is not None
    prepare(out, runs, dict(eval_settings or {}) if evaluated else None)
    if eval_hook is not None:
        load_hook(eval_hook)  # importable here, so the jobs can import it too
    res = SweepResult(str(out), str(out / TABLE), 0)
    todo = _triage(out, runs, evaluated, res)
    if opts.name == "slurm" and todo:
        check_slurm(opts)
    wait = opts.wait if opts.wait is not None else opts.name == "local"
    threads = opts.resolved_threads()

    def job_of(p: _Pending) -> RunJob:
        return RunJob(str(out), p.run, eval_hook, dict(eval_settings or {}), command, table_copy, threads)

    def submitted(p: _Pending) -> None:
        p.rec = _record(out, p.run, p.job, opts)
        res.submitted.append(f"{p.run.name}: {p.rec['job_id']}")
        if echo:
            echo(f"submitted {p.run.name} as {opts.name} job {p.rec['job_id']} (log {p.rec['stdout']})")

    if todo:
        _submit(out, todo, opts, job_of, submitted, wait, poll_s)
    if wait:
        for p in todo:
            st = job_state(out, p.run.name)
            if not run_done(out, p.run, evaluated):
                res.failed.append(f"{p.run.name}: job {st.get('job_id')} {st.get('state')}"
                                  + (f" ({st['error']})" if st.get("error") else "") + f", log {st.get('stderr')}")
    table = merge_table(out, table_copy)
    res.rows = len(read_rows(table))
    return res


def status(out_dir: str | os.PathLike) -> list[dict]:
    """One dict per run of the sweep folder: rows done / expected, last job, its state and logs."""
    out = Path(out_dir)
    if not (out / "runs").is_dir():
        raise SweepError(f"{out}: not a sweep folder (no runs/)")
    rows = []
    found = [(_read_json(p) or {}, p) for p in (out / "runs").glob("*/run.json")]
    for info, run_json in sorted(found, key=lambda t: (t[0].get("index", 1 << 30), t[1].parent.name)):
        name = run_json.parent.name
        done = read_rows(run_json.parent / "rows.csv")
        st = job_state(out, name)
        expected = len(info.get("steps") or []) or "?"
        rows.append({"run": name, "rows": f"{len(done)}/{expected}",
                     "last_step": max((int(r["step"]) for r in done), default=0),
                     "job_id": st.get("job_id", ""), "launcher": st.get("launcher", ""),
                     "state": st.get("state", "never submitted"), "submitted": st.get("submitted", ""),
                     "stdout": st.get("stdout", ""), "stderr": st.get("stderr", ""), "error": st.get("error", "")})
    return rows
