"""DINOv2 features for FD_DINOv2 (Stein et al. 2023; EDM2's ``fd_dinov2``), offline.

The protocol is EDM2's ``calculate_metrics.py`` (``DINOv2Detector``, default ``resize_mode='torch'``):
uint8 RGB images (grayscale replicated) as float NCHW in [0, 255], resized to 224 x 224 by
``torch.nn.functional.interpolate(mode='bicubic', antialias=True)`` (no rounding, no clamp),
divided by 255, normalised with the ImageNet mean (0.485, 0.456, 0.406) and standard deviation
(0.229, 0.224, 0.225); the feature is the DINOv2 model's output: the class token after the final
LayerNorm (1024 values for ViT-L/14, 768 for ViT-B/14).

The architecture comes from timm (``vit_large_patch14_dinov2``, ``vit_base_patch14_dinov2``,
built without downloading anything); the weights are the official files
``dinov2_vit{b,l}14_pretrain.pth`` (facebookresearch/dinov2's hub checkpoints), converted by timm's
checkpoint filter. One detail is done here rather than by timm: the official model interpolates
its 37 x 37 position embedding to the 16 x 16 grid of a 224 input at run time, with
``interpolate(mode='bicubic', scale_factor=(16.1 / 37, 16.1 / 37), antialias=False)`` (the
``interpolate_offset`` 0.1 of DINOv2's code, which also sets the sampling positions); timm's filter
would resample with its own rule (output size, antialias), so the embedding is interpolated the
official way before timm sees it.

Weights, in this order: the ``weights`` argument (``--dinov2-weights``), ``$IDDPM_DINOV2_WEIGHTS``,
the torch hub cache (``$TORCH_HOME/hub/checkpoints/dinov2_vitl14_pretrain.pth``, where
``torch.hub.load`` leaves it). Their sha256 goes into every result; ``expected_sha256`` (or
``$IDDPM_DINOV2_SHA256``) pins it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from iddpm_eval.features import weights_sha256
from iddpm_eval.preprocess import check_images

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 224
PATCH = 14
OFFICIAL_GRID = 37  # 518 / 14: the grid of the official position embedding
INTERPOLATE_OFFSET = 0.1
MODE = "edm2"  # the preprocessing mode recorded with DINOv2 statistics
ARCHS = {
    "dinov2-vitb14": dict(timm="vit_base_patch14_dinov2", file="dinov2_vitb14_pretrain.pth", dim=768),
    "dinov2-vitl14": dict(timm="vit_large_patch14_dinov2", file="dinov2_vitl14_pretrain.pth", dim=1024),
}
URL = "https://dl.fbaipublicfiles.com/dinov2/{stem}/{file}"


class DinoV2Error(ValueError):
    """DINOv2 weights that are missing or do not fit; the message names the file."""


def _timm():
    try:
        import timm
    except ImportError:
        raise DinoV2Error("DINOv2 features need timm: pip install 'timm>=1.0' (or the package's [dinov2] extra)") \
            from None
    return timm


def weights_url(name: str) -> str:
    f = ARCHS[name]["file"]
    return URL.format(stem=f.replace("_pretrain.pth", ""), file=f)


def resolve_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """The weights file of ``name``: ``path``, else ``$IDDPM_DINOV2_WEIGHTS``, else the torch hub cache."""
    if name not in ARCHS:
        raise DinoV2Error(f"unknown DINOv2 model {name!r}; choose one of {', '.join(ARCHS)}")
    for given, what in ((path, "--dinov2-weights"), (os.environ.get("IDDPM_DINOV2_WEIGHTS"), "$IDDPM_DINOV2_WEIGHTS")):
        if given:
            p = Path(given)
            if not p.is_file():
                raise DinoV2Error(f"{what} {p}: no such file")
            return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ARCHS[name]["file"]
    if cached.is_file():
        return cached
    raise DinoV2Error(f"no {name} weights: give --dinov2-weights FILE or set $IDDPM_DINOV2_WEIGHTS, or place "
                      f"{ARCHS[name]['file']} in {cached.parent} (download it once from {weights_url(name)})")


def official_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official checkpoint (facebookresearch/dinov2 hub layout, 518 px, no chunks)."""
    timm = _timm()
    with torch.device("meta"):
        m = timm.create_model(ARCHS[name]["timm"], pretrained=False, img_size=OFFICIAL_GRID * PATCH, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    shapes["mask_token"] = (1, ARCHS[name]["dim"])
    return shapes


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int = SIZE // PATCH) -> torch.Tensor:
    """DINOv2's run-time interpolation of the [1, 1 + 37*37, D] embedding to a grid x grid input
    (class token untouched; bicubic with scale factor (grid + 0.1) / 37, no antialias, float32)."""
    cls, patch = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    m = int(math.isqrt(patch.shape[1]))
    dim = patch.shape[-1]
    s = float(grid + INTERPOLATE_OFFSET) / m
    out = torch.nn.functional.interpolate(patch.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                                          antialias=False, scale_factor=(s, s))
    assert out.shape[-2:] == (grid, grid)
    return torch.cat([cls, out.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def load_official(name: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official checkpoint (tensors only) and check every key and shape."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        raise DinoV2Error(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DinoV2Error(f"{path}: expected a state dict of tensors (the official {ARCHS[name]['file']})")
    want = official_shapes(name)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise DinoV2Error(f"{path}: not {name} weights in the official layout: {len(missing)} key(s) missing "
                          f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise DinoV2Error(f"{path}: {k} has shape {tuple(state[k].shape)}, {name} needs {shape}")
    return state


def build_model(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's ViT for a 224 input with the official weights (position embedding interpolated as DINOv2 does)."""
    timm = _timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(ARCHS[name]["timm"], pretrained=False, img_size=SIZE, num_classes=0)
    state = dict(state)
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"])
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model.eval().requires_grad_(False)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW: EDM2's antialiased bicubic resize to 224, /255, ImageNet normalisation."""
    images = check_images(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x.to(torch.float32), size=(SIZE, SIZE), mode="bicubic", antialias=True)
    x = x / 255
    x = x - torch.tensor(MEAN, dtype=torch.float32).reshape(1, -1, 1, 1)
    return x / torch.tensor(STD, dtype=torch.float32).reshape(1, -1, 1, 1)


class DinoV2Extractor:
    """Same interface as :class:`iddpm_eval.features.FeatureExtractor` (``__call__`` gives ``{"pool": ...}``)."""

    def __init__(self, name: str = "dinov2-vitl14", weights: str | os.PathLike | None = None,
                 device: str | None = None, batch_size: int = 32, expected_sha256: str | None = None,
                 progress: bool = False):
        if batch_size < 1:
            raise DinoV2Error(f"batch_size must be >= 1, got {batch_size}")
        self.detector = name
        self.weights_path = resolve_weights(name, weights)
        self.weights_sha256 = weights_sha256(self.weights_path)
        expected = expected_sha256 or os.environ.get("IDDPM_DINOV2_SHA256")
        if expected and expected.lower() != self.weights_sha256:
            raise DinoV2Error(f"{self.weights_path}: sha256 {self.weights_sha256} but {expected.lower()} was expected")
        self.mode = MODE
        self.dims = ARCHS[name]["dim"]
        self.batch_size = batch_size
        self.progress = progress
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = build_model(name, load_official(name, self.weights_path)).to(self.device)

    def provenance(self) -> dict[str, str]:
        return {"feature_extractor": self.detector, "fid_mode": self.mode, "weights_path": str(self.weights_path),
                "weights_sha256": self.weights_sha256}

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        images = check_images(images)
        out = np.empty((len(images), self.dims), np.float32)
        for s in tqdm(range(0, len(images), self.batch_size), desc=self.detector, disable=not self.progress):
            x = preprocess(images[s:s + self.batch_size]).to(self.device)
            out[s:s + len(x)] = self.net(x).float().cpu().numpy()
        return {"pool": out}
