"""The output folder of a bits/dim run, which is also its resume state.

``nll_settings.json`` holds what determines the numbers (a rerun with other settings is refused);
``nll_images.csv`` one row per finished image; ``parts/terms_*.npz`` the per-t terms of exact runs;
``pilot_terms.csv`` a pilot's breakdown; ``nll_terms.csv``, ``nll_terms.png`` and ``nll.json`` the
results.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iddpm_core.io import save_npz, write_text
from iddpm_eval.nll.bound import NLLError

IMAGES_CSV = "nll_images.csv"
TERMS_CSV = "nll_terms.csv"
TERMS_PNG = "nll_terms.png"
SUMMARY_JSON = "nll.json"
SETTINGS_JSON = "nll_settings.json"
PARTS_DIR = "parts"
PILOT_CSV = "pilot_terms.csv"
IMAGE_COLUMNS = ("index", "bpd", "prior_bpd", "decoder_bpd", "kl_bpd", "kl_var")


@dataclass
class Settings:
    """What determines the numbers of a run; stored in the output folder and checked on resume."""

    checkpoint_sha256: str
    data: str
    T: int
    seed: int
    cdf: str  # "tanh" or "exact"
    clip_denoised: bool
    ema_rate: float | None
    estimate: int | None = None
    proposal_sha256: str | None = None
    method: str = "batched"


def _slug(s: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return out.strip("_.")[:60] or "data"


def default_out_dir(checkpoint: str | os.PathLike, data: str, estimate: int | None) -> Path:
    """``<checkpoint folder>/nll-<checkpoint stem>-<data>-<exact|estK>``."""
    ck = Path(checkpoint)
    mode = "exact" if not estimate else f"est{estimate}"
    return ck.parent / f"nll-{ck.stem}-{_slug(Path(data).name if os.sep in data else data)}-{mode}"


def check_settings(path: Path, settings: Settings) -> None:
    """Write ``settings`` to ``path``, or refuse if the file there records other settings."""
    new = asdict(settings)
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise NLLError(f"{path.parent} holds a run with other settings ({', '.join(diff)} differ: "
                           f"{ {k: old.get(k) for k in diff} } vs { {k: new.get(k) for k in diff} }); "
                           "use another --out folder")
    else:
        write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def read_images_csv(path: Path) -> dict[int, dict]:
    """The finished images' rows ({index: {column: value}}); empty when the file is missing."""
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and set(IMAGE_COLUMNS) - set(rows[0]):
        raise NLLError(f"{path}: not a per-image bits/dim file (columns {sorted(rows[0])})")
    return {int(r["index"]): {c: float(r[c]) for c in IMAGE_COLUMNS if c != "index"} for r in rows}


def write_images_csv(path: Path, done: dict[int, dict]) -> None:
    """Rewrite the per-image file (atomically), rows in index order."""
    lines = [",".join(IMAGE_COLUMNS)]
    for i in sorted(done):
        lines.append(",".join([str(i)] + [repr(float(done[i][c])) for c in IMAGE_COLUMNS[1:]]))
    write_text(path, "\n".join(lines) + "\n")


def save_part(folder: Path, indices: np.ndarray, terms: np.ndarray) -> None:
    """The [n, 3, T] terms (vb, xstart_mse, mse) of the images ``indices`` as one file of parts/."""
    save_npz(folder / PARTS_DIR / f"terms_{indices[0]:08d}_{indices[-1]:08d}.npz", indices=indices, terms=terms)


def load_parts(folder: Path, want: set[int], T: int) -> dict[int, np.ndarray]:
    """Per-image [3, T] arrays (vb, xstart_mse, mse) of the images in ``want`` from parts/*.npz."""
    got: dict[int, np.ndarray] = {}
    for f in sorted((folder / PARTS_DIR).glob("terms_*.npz")):
        with np.load(f) as z:
            terms = z["terms"]
            if terms.shape[1:] != (3, T):
                raise NLLError(f"{f}: terms of shape {terms.shape}, expected (n, 3, {T})")
            for j, i in enumerate(z["indices"].tolist()):
                if i in want:
                    got[i] = terms[j]
    return got
