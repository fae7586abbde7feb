"""DINOv2 features (iddpm_eval.dinov2) on randomly initialised weights saved in the official
checkpoint layout: the suite's extractor against a direct timm forward on images preprocessed by an
independent numpy implementation of EDM2's resize and normalisation, with the position embedding
interpolated by an independent numpy implementation of DINOv2's run-time rule. Bad weights files."""

import hashlib

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from iddpm_eval import dinov2 as dv  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


# ----------------------------------------------------------------------------- independent maths

def _cubic(x, a):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _aa_bicubic_matrix(n_in, n_out):
    """Antialiased bicubic resampling (a = -0.5, support widened by the downscale factor, taps
    outside the image dropped and the weights renormalised): PIL's ImagingResample, which
    torch's interpolate(bicubic, antialias=True) follows. Row i gives output pixel i. As in torch,
    the scale, the tap centres and the filter arguments are float32 values (in float64 the centres
    of a 260 -> 224 resize move by up to ~1.5e-5 pixel, which moves outputs by ~3e-3 grey levels);
    the filter and the sums are float64."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    fs = max(scale, f32(1.0))
    inv = f32(1.0) / fs
    support = f32(2.0) * fs
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * f32(i + 0.5)
        lo, hi = max(int(center - support + f32(0.5)), 0), min(int(center + support + f32(0.5)), n_in)
        j = np.arange(lo, hi).astype(np.float32)
        k = _cubic(((j - center + f32(0.5)) * inv).astype(np.float64), -0.5)
        w[i, lo:hi] = k / k.sum()
    return w


def _edm2_preprocess(images):
    """uint8 NHWC -> float64 NCHW: resize each axis with the matrix above, /255, ImageNet mean/std."""
    x = images.astype(np.float64)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, -1)
    rh, rw = _aa_bicubic_matrix(x.shape[1], 224), _aa_bicubic_matrix(x.shape[2], 224)
    y = np.einsum("ih,nhwc,jw->ncij", rh, x, rw, optimize=True)
    return (y / 255 - MEAN[None, :, None, None]) / STD[None, :, None, None]


def _pos_embed_dinov2(pos, grid=16):
    """DINOv2's interpolate_pos_encoding in float64: bicubic (a = -0.75, clamped borders) at
    source positions (i + 0.5) / s - 0.5 with s = (grid + 0.1) / 37, i.e. torch's rule when given a
    scale factor (not the output size), no antialias."""
    cls, patch = pos[:, :1], pos[:, 1:]
    m = int(np.sqrt(patch.shape[1]))
    p = patch.reshape(m, m, -1)
    s = (grid + 0.1) / m
    w = np.zeros((grid, m))
    for i in range(grid):
        src = (i + 0.5) / s - 0.5
        f = np.floor(src)
        t = src - f
        for off in range(-1, 3):
            w[i, int(np.clip(f + off, 0, m - 1))] += _cubic(t - off, -0.75)
    out = np.einsum("ih,hwd,jw->ijd", w, p, w, optimize=True).reshape(1, grid * grid, -1)
    return np.concatenate([cls, out], 1)


# ----------------------------------------------------------------------------- fixtures

def _official_random_state(name, seed=0):
    """Random tensors under the official checkpoint's keys and shapes (norm weights near 1, layer
    scales ~0.1, everything else small), so that every block contributes."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in dv.official_shapes(name).items():
        t = torch.randn(shape, generator=g)
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            t = 1 + 0.1 * t
        elif k.endswith("gamma"):
            t = 0.1 + 0.05 * t
        elif k in ("pos_embed", "cls_token"):
            t = 0.5 * t
        else:
            t = 0.05 * t
        state[k] = t.contiguous()
    return state


@pytest.fixture(scope="module")
def vitb(tmp_path_factory):
    state = _official_random_state("dinov2-vitb14")
    path = tmp_path_factory.mktemp("dino") / "dinov2_vitb14_pretrain.pth"
    torch.save(state, path)
    return path, state


def _images():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)  # upsampled, grayscale
    big = rng.integers(0, 256, (2, 300, 260, 3), dtype=np.uint8)  # downsampled (antialias matters)
    return small, big


# ----------------------------------------------------------------------------- tests

def test_preprocess_equals_independent_edm2_resize():
    for imgs in _images():
        got = dv.preprocess(imgs).double().numpy()
        ref = _edm2_preprocess(imgs)
        # float32 resize of values <= 255 then two float32 ops: |error| <~ 1e-4 in units of the
        # normalised image (values up to ~2.6); measured max 3e-6
        assert np.abs(got - ref).max() < 2e-5


def test_pos_embed_interpolation_equals_dinov2_rule():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(1))
    got = dv.interpolate_pos_embed(pos).double().numpy()
    ref = _pos_embed_dinov2(pos.double().numpy())
    assert got.shape == (1, 257, 8)
    assert np.abs(got - ref).max() < 1e-5  # float32 cubic weights on O(1) values


def test_vitb14_features_equal_direct_timm_forward(vitb):
    path, state = vitb
    fx = dv.DinoV2Extractor("dinov2-vitb14", weights=path, device="cpu", batch_size=3)
    assert fx.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    direct = {k: v for k, v in state.items() if k != "mask_token"}
    direct["pos_embed"] = torch.from_numpy(_pos_embed_dinov2(state["pos_embed"].double().numpy())).float()
    model.load_state_dict(direct, strict=True)
    small, big = _images()
    for imgs in (small, big):
        got = fx(imgs)["pool"]
        with torch.no_grad():
            ref = model(torch.from_numpy(_edm2_preprocess(imgs)).float()).numpy()
        assert got.shape == (len(imgs), 768)
        # float32 ViT-B on inputs that differ by ~1e-6: relative difference of the feature vectors
        # measured ~1e-6; 1e-5 asked by the issue
        rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
        print("relative difference", rel)
        assert rel.max() < 1e-5, rel
        assert np.abs(ref).max() > 0.1  # not a degenerate network


def test_vitl14_shapes_and_output_width(tmp_path):
    shapes = dv.official_shapes("dinov2-vitl14")
    assert shapes["pos_embed"] == (1, 1370, 1024) and shapes["mask_token"] == (1, 1024)
    assert shapes["blocks.23.ls2.gamma"] == (1024,) and "blocks.24.norm1.weight" not in shapes
    assert len(shapes) == 4 + 24 * 14 + 2 + 1  # cls, pos, patch w/b; 14 tensors per block; norm w/b; mask


def test_bad_weights_clear_errors(tmp_path, vitb, monkeypatch):
    path, state = vitb
    wrong = dict(state)
    wrong["blocks.3.attn.qkv.weight"] = torch.zeros(10, 768)
    p = tmp_path / "wrong_shape.pth"
    torch.save(wrong, p)
    with pytest.raises(dv.DinoV2Error, match=r"wrong_shape.pth: blocks.3.attn.qkv.weight has shape \(10, 768\)"):
        dv.DinoV2Extractor("dinov2-vitb14", weights=p)
    with pytest.raises(dv.DinoV2Error, match="not dinov2-vitl14 weights in the official layout"):
        dv.DinoV2Extractor("dinov2-vitl14", weights=path)
    with pytest.raises(dv.DinoV2Error, match="sha256 .* but 0000 was expected"):
        dv.DinoV2Extractor("dinov2-vitb14", weights=path, expected_sha256="0000")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(dv.DinoV2Error, match="junk.pth: not a readable PyTorch weights file"):
        dv.DinoV2Extractor("dinov2-vitb14", weights=junk)
    monkeypatch.delenv("IDDPM_DINOV2_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohub"))
    with pytest.raises(dv.DinoV2Error, match="download it once from https://dl.fbaipublicfiles.com/dinov2/"
                                             "dinov2_vitb14/dinov2_vitb14_pretrain.pth"):
        dv.resolve_weights("dinov2-vitb14")
    monkeypatch.setenv("IDDPM_DINOV2_WEIGHTS", str(path))
    assert dv.resolve_weights("dinov2-vitb14") == path
