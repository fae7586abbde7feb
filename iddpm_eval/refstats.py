"""Reference statistics in other programs' formats: EDM2's ``.pkl`` and the ADM evaluator's batches.

EDM2 (``calculate_metrics.py ref``) pickles ``dict(num_images=N, fid=dict(mu, sigma),
fd_dinov2=dict(mu, sigma))``: float64 numpy arrays, Inception-2015-12-05 pool_3 statistics under
``fid`` (its Inception takes uint8 images and resizes as TF1 did: our ``legacy-tf``) and DINOv2
ViT-L/14 statistics under ``fd_dinov2`` (EDM2's preprocessing: our ``edm2``). A pickle can run
code when loaded, so it is read by a restricted unpickler that builds only dicts, lists, strings,
numbers and numpy arrays (numpy's array reconstruction functions, ``ndarray`` and ``dtype``, and
``_codecs.encode`` which protocol 2 uses for bytes); any other global named in the file is refused
with the file and the name.

The ADM evaluator's reference batches are ``.npz`` files with the images (``arr_0``, uint8 NHWC)
and, precomputed, ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (sFID's spatial features);
:func:`iddpm_eval.stats.load_stats` reads them and :func:`save_adm_batch` writes them (with our
provenance keys beside, which the evaluator ignores).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from iddpm_core.io import RefusedPickle, load_plain_pickle, save_npz, write_bytes
from iddpm_eval.stats import INCEPTION, FeatureStats, StatsError

# EDM2's metric key -> (our detector, preprocessing mode)
EDM2_KEYS = {"fid": (INCEPTION, "legacy-tf"), "fd_dinov2": ("dinov2-vitl14", "edm2")}
def _read_pickle_safely(path: str | os.PathLike):
    """Unpickle ``path`` admitting only plain containers, numbers, strings and numpy arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StatsError(f"cannot read {path}: {exc}") from None
    try:
        return load_plain_pickle(io.BytesIO(data))
    except RefusedPickle as exc:
        raise StatsError(f"{path}: {exc}; EDM2 reference statistics hold only dicts and numpy arrays") from None
    except Exception as exc:  # noqa: BLE001 - a malformed pickle is the user's input error
        raise StatsError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


def _edm2_detectors(obj) -> list[str]:
    return [EDM2_KEYS[k][0] for k in EDM2_KEYS if isinstance(obj, dict) and k in obj]


def load_edm2_pkl(path: str | os.PathLike, detector: str = INCEPTION) -> FeatureStats:
    """The statistics of ``detector`` in an EDM2 reference ``.pkl``; a file without them is refused
    with the detectors it has."""
    obj = _read_pickle_safely(path)
    if not isinstance(obj, dict) or not any(k in obj for k in EDM2_KEYS):
        raise StatsError(f"{path}: not an EDM2 reference statistics file (a dict with 'fid' and/or 'fd_dinov2'); "
                         f"got {type(obj).__name__}" + (f" with keys {sorted(map(str, obj))}" if isinstance(obj, dict) else ""))
    key = next((k for k, (det, _) in EDM2_KEYS.items() if det == detector), None)
    if key is None or key not in obj:
        have = ", ".join(_edm2_detectors(obj)) or "none"
        raise StatsError(f"{path} holds EDM2 statistics of {have}, not of {detector} (this run's detector)")
    entry = obj[key]
    if not isinstance(entry, dict) or "mu" not in entry or "sigma" not in entry:
        raise StatsError(f"{path}: entry {key!r} has no mu and sigma")
    n = obj.get("num_images")
    return FeatureStats(mu=entry["mu"], sigma=entry["sigma"], count=int(n) if n is not None else None,
                        mode=EDM2_KEYS[key][1], source=str(path), origin="edm2", detector=detector)


def check_edm2_writable(path, detector: str | None, mode: str | None) -> str:
    """EDM2's key for (detector, mode), or an error naming the file: its keys carry no weights hash
    or mode, so only its two (detector, mode) pairs can be written."""
    key = next((k for k, (det, m) in EDM2_KEYS.items() if det == detector and m == mode), None)
    if key is None:
        raise StatsError(f"{path}: EDM2 .pkl files hold only {', '.join(f'{d} ({m})' for d, m in EDM2_KEYS.values())} "
                         f"statistics, these are {detector} ({mode})")
    return key


def save_edm2_pkl(path: str | os.PathLike, stats: FeatureStats) -> Path:
    """Write ``stats`` as an EDM2 reference ``.pkl`` (``num_images`` and one metric entry, float64)."""
    key = check_edm2_writable(path, stats.detector, stats.mode)
    obj = {"num_images": int(stats.count or 0),
           key: {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}}
    write_bytes(path, pickle.dumps(obj, protocol=4))
    return Path(path)


def save_adm_batch(path: str | os.PathLike, images: np.ndarray, stats: FeatureStats) -> None:
    """An ADM evaluator reference batch: ``arr_0`` images, ``mu``/``sigma``, and ``mu_s``/``sigma_s``
    when present, plus our provenance keys (count, mode, weights_sha256, detector)."""
    if stats.detector != INCEPTION or stats.mode != "legacy-tf":
        raise StatsError(f"{path}: ADM reference batches hold Inception legacy-tf statistics, these are "
                         f"{stats.detector} ({stats.mode})")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise StatsError(f"{path}: ADM batches hold uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    arrays = dict(arr_0=images, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count or len(images)),
                  mode=np.str_(stats.mode), weights_sha256=np.str_(stats.weights_sha256 or ""),
                  detector=np.str_(stats.detector))
    if stats.mu_s is not None:
        arrays.update(mu_s=stats.mu_s, sigma_s=stats.sigma_s)
    save_npz(path, **arrays)
