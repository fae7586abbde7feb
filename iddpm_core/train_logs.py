"""The trainer's logs on rank 0: TensorBoard scalars, ``metrics.csv`` and ``callback_metrics.csv``.

On resume all three keep what was logged up to the resumed step and drop what a killed run logged
after its last checkpoint; a fresh run starts them empty.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from iddpm_core.io import write_text

CSV_COLUMNS = ("step", "images_seen", "train_flops", "loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2",
               "loss_q3", "grad_norm", "lr", "images_per_sec", "wall_time")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class MetricsCSV:
    """metrics.csv: rows appended (and flushed) as they come; on resume, rows after the resumed step
    (written before a crash, after the last checkpoint) are dropped by an atomic rewrite."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("step", "").isdigit() and int(r["step"]) <= resume_step
                        and len(r) == len(CSV_COLUMNS) and None not in r.values()]
            lines = [",".join(CSV_COLUMNS)] + [",".join(r[c] for c in CSV_COLUMNS) for r in rows]
            write_text(path, "\n".join(lines) + "\n")
        else:
            write_text(path, ",".join(CSV_COLUMNS) + "\n")

    def append(self, row: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(",".join(_fmt(row.get(c)) for c in CSV_COLUMNS) + "\n")
            fh.flush()


def trim_callback_csv(path: Path, resume_step: int | None) -> None:
    """callback_metrics.csv as TensorBoard will show it: rows up to ``resume_step``; none for a fresh run."""
    if not path.exists():
        return
    if resume_step is None:
        path.unlink()
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines[1:]
            if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) <= resume_step]
    write_text(path, "\n".join(lines[:1] + keep) + "\n")


class TrainLogger:
    """The three logs of a run in ``out``, opened for a fresh run (``resume_step`` None) or a run
    resumed at ``resume_step``."""

    def __init__(self, out: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        # TensorBoard keeps what metrics.csv keeps: the points up to the resumed step (its own point
        # included); later ones, logged after the checkpoint by a run that was killed, are purged. A
        # fresh run purges everything an earlier attempt logged before it was killed without a checkpoint.
        self.writer = SummaryWriter(str(out / "tb"), purge_step=0 if resume_step is None else resume_step + 1)
        self.csv = MetricsCSV(out / "metrics.csv", resume_step)
        trim_callback_csv(out / "callback_metrics.csv", resume_step)

    def metrics(self, row: dict) -> None:
        """One logging step's row: every number except step and wall time to TensorBoard as
        ``train/<name>`` (NaNs left out), and the whole row to metrics.csv."""
        step = row["step"]
        for key, v in row.items():
            if key not in ("step", "wall_time") and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(f"train/{key}", v, step)
        self.writer.flush()
        self.csv.append(row)

    def callback(self, step: int, values: dict) -> None:
        """The numbers a training callback returned, as ``callback/<name>`` and to callback_metrics.csv
        (values that are not numbers are skipped)."""
        path = self.out / "callback_metrics.csv"
        new = not path.exists()
        with open(path, "a") as fh:
            if new:
                fh.write("step,name,value\n")
            for k, v in values.items():
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    continue
                self.writer.add_scalar(f"callback/{k}", v, step)
                fh.write(f"{step},{k},{v!r}\n")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
