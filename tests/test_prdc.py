"""Precision/recall/density/coverage: peers (torch-fidelity 0.4, prdc), an exact float64 full-matrix
reference written here from the definitions, blockwise == full, and synthetic modes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from iddpm_eval.prdc import compute_prdc, knn_radii

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _sq(a, b):
    """Exact (float64) full squared-distance matrix, written directly from the definition."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    step = max(1, (1 << 21) // (b.shape[0] * b.shape[1]))
    return np.concatenate([((a[i:i + step, None, :] - b[None]) ** 2).sum(-1) for i in range(0, len(a), step)])


def _ref(real, fake, k=K):
    """Full-matrix reference: radius = k-th neighbour excluding self, membership <=."""
    drr, dff, drf = _sq(real, real), _sq(fake, fake), _sq(real, fake)
    np.fill_diagonal(drr, np.inf)
    np.fill_diagonal(dff, np.inf)
    rr2 = np.sort(drr, 1)[:, k - 1]
    rf2 = np.sort(dff, 1)[:, k - 1]
    in_real_ball = drf <= rr2[:, None]  # [real, fake]: fake inside the real point's ball
    in_fake_ball = drf <= rf2[None, :]  # [real, fake]: real inside the fake point's ball
    return {
        "precision": in_real_ball.any(0).mean(),
        "recall": in_fake_ball.any(1).mean(),
        "density": in_real_ball.sum() / (k * fake.shape[0]),
        "coverage": in_real_ball.any(1).mean(),
        "radii_real": np.sqrt(rr2),
        "drf": drf, "rr2": rr2, "rf2": rf2,
    }


def _inception_like(rng, n, dim=256, shift=0.0, latent=32, mix=None):
    """Non-negative features of Inception pool_3 scale (values ~0-10, norms ~20-30)."""
    mix = rng.standard_normal((latent, dim)) / np.sqrt(latent) if mix is None else mix
    z = rng.standard_normal((n, latent)) + shift
    x = np.maximum(z @ mix + 0.3 * rng.standard_normal((n, dim)), 0) * 3.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def realistic():
    rng = np.random.default_rng(1234)
    mix = rng.standard_normal((32, 256)) / np.sqrt(32)
    real = _inception_like(rng, 700, mix=mix)
    fake = _inception_like(rng, 530, shift=0.15, mix=mix)
    return real, fake


def test_feature_scale_is_realistic(realistic):
    real, _ = realistic
    norms = np.linalg.norm(real, axis=1)
    assert real.min() >= 0 and 5 < real.max() < 40
    assert 15 < np.median(norms) < 40


def _peer_float32_error(a, b, exact=None):
    """Largest relative error of the squared distances the peers compute: torch.cdist in float32
    (torch-fidelity) and scikit-learn's pairwise_distances with a float32 result (prdc)."""
    import sklearn.metrics

    exact = _sq(a, b) if exact is None else exact
    ok = exact > 0
    tf = torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).double().numpy() ** 2
    sk = sklearn.metrics.pairwise_distances(a, b).astype(np.float64) ** 2
    return max((np.abs(tf - exact)[ok] / exact[ok]).max(), (np.abs(sk - exact)[ok] / exact[ok]).max())


def test_no_ties_within_float32_error(realistic):
    """With continuous random features no decision is closer to a tie than the peers' own float32
    rounding allows (margin > 3x the largest relative error they make on these features), so
    `<` vs `<=` and float32 vs float64 distances cannot change any count: the agreement with the
    peers below is exact, not luck."""
    real, fake = realistic
    eps = max(_peer_float32_error(real, fake), _peer_float32_error(real, real), _peer_float32_error(fake, fake))
    assert 1e-8 < eps < 1e-5
    ref = _ref(real, fake)
    drf, rr2, rf2 = ref["drf"], ref["rr2"], ref["rf2"]
    assert (np.abs(drf - rr2[:, None]) / rr2[:, None]).min() > 3 * eps
    assert (np.abs(drf - rf2[None, :]) / rf2[None, :]).min() > 3 * eps
    for x in (real, fake):  # the k-th neighbour is unambiguous
        d = _sq(x, x)
        np.fill_diagonal(d, np.inf)
        s = np.sort(d, 1)
        assert ((s[:, K] - s[:, K - 1]) / s[:, K - 1]).min() > 3 * eps
        assert ((s[:, K - 1] - s[:, K - 2]) / s[:, K - 1]).min() > 3 * eps


def test_matches_torch_fidelity(realistic):
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = realistic
    ours = compute_prdc(real, fake, k=K, block_size=128, device="cpu", f_score=True)
    # torch-fidelity 0.4: features_1 (input1) is GENERATED, features_2 (input2) is REAL
    tf = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=K,
                                prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    n_fake, n_real = len(fake), len(real)
    assert 0.1 < ours["precision"] < 0.95 and 0.1 < ours["recall"] < 0.95  # not a trivial case
    assert round(ours["precision"] * n_fake) == round(tf["precision"] * n_fake)
    assert round(ours["recall"] * n_real) == round(tf["recall"] * n_real)
    assert ours["f1"] == pytest.approx(tf["f_score"], rel=1e-6)


def test_matches_prdc_package(realistic, capsys):
    import prdc

    real, fake = realistic
    ours = compute_prdc(real, fake, k=K, block_size=200, device="cpu")
    theirs = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=K)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key
    assert ours["n_real"] == len(real) and ours["n_fake"] == len(fake) and ours["k"] == K
    # radii agree with prdc's k-NN distances (prdc returns float32)
    r_theirs = prdc.prdc.compute_nearest_neighbour_distances(real, K)
    np.testing.assert_allclose(knn_radii(real, K, block_size=100, device="cpu"), r_theirs, rtol=2e-6)


@pytest.mark.parametrize("block_size", [9, 64, 333, 4096])
def test_blockwise_equals_full_reference(realistic, block_size):
    real, fake = realistic
    real, fake = real[:260], fake[:190]
    ref = _ref(real, fake)
    ours = compute_prdc(real, fake, k=K, block_size=block_size, device="cpu")
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(knn_radii(real, K, block_size=block_size, device="cpu"), ref["radii_real"],
                               rtol=1e-12)


@pytest.mark.parametrize("block_size", [5, 16, 1000])
def test_exact_ties_and_duplicates(block_size):
    """Small-integer features: squared distances are exact integers, so there are many exact
    ties at the radius and duplicated points; membership must be `<=`, self excluded by index."""
    rng = np.random.default_rng(7)
    real = rng.integers(0, 3, size=(150, 4)).astype(np.float32)
    fake = rng.integers(0, 3, size=(120, 4)).astype(np.float32)
    ref = _ref(real, fake)
    assert (np.abs(ref["drf"] - ref["rr2"][:, None]) == 0).sum() > 100  # ties do occur
    ours = compute_prdc(real, fake, k=K, block_size=block_size, device="cpu")
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    # The squared radii are exact integers on both sides; the square root of a float64 is correctly
    # rounded in numpy, but a vectorised torch sqrt is not always (sqrt(2) comes out 1 ulp low with
    # torch 2.14 on x86-64), and which kernel runs depends on the CPU: allow 2 ulp.
    np.testing.assert_allclose(knn_radii(real, K, block_size=block_size, device="cpu"), ref["radii_real"],
                               rtol=2 * np.finfo(np.float64).eps, atol=0)


def test_near_ties_below_float32_resolution():
    """Fakes placed at the real radius times (1 +- 1e-7), and at the k-th neighbour exactly:
    float32 cannot tell these apart, the exact recheck must."""
    rng = np.random.default_rng(3)
    real = rng.standard_normal((200, 64)) * 2 + 5
    d = _sq(real, real)
    np.fill_diagonal(d, np.inf)
    kth = np.argsort(d, 1)[:, K - 1]
    centre = real[:60]
    direction = real[kth[:60]] - centre
    fake = np.concatenate([centre + direction * (1 + 1e-7),  # just outside
                           centre + direction * (1 - 1e-7),  # just inside
                           real[kth[60:90]],  # exactly on the sphere (a copy of the k-th neighbour)
                           rng.standard_normal((40, 64)) * 2 + 5])
    ref = _ref(real, fake)
    ours = compute_prdc(real, fake, k=K, block_size=50, device="cpu")
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    # the construction is as sharp as intended: each centre's ball excludes / includes its fake
    inside = ref["drf"] <= ref["rr2"][:, None]
    idx = np.arange(60)
    assert not inside[idx, idx].any() and inside[idx, idx + 60].all()
    assert inside[np.arange(60, 90), np.arange(120, 150)].all()  # on the sphere counts as inside
    # and these margins are far below float32 resolution of the distances
    rel = np.abs(ref["drf"][idx, idx] / ref["rr2"][idx] - 1)
    assert rel.max() < 1e-6


def _clusters(rng, centres, n, scale=0.05):
    which = np.arange(n) % len(centres)  # equal share per mode
    return (centres[which] + scale * rng.standard_normal((n, centres.shape[1]))).astype(np.float32)


def test_half_the_modes():
    """Generated set covers 5 of 10 real modes: recall ~ 0.5, precision ~ 1; swapping the roles
    swaps the two numbers, so they cannot have been exchanged."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 2)) * 10  # low dimension: k-NN balls fill each mode
    real = _clusters(rng, centres, 1000)
    fake = _clusters(rng, centres[:5], 600)
    r = compute_prdc(real, fake, k=K, block_size=256, device="cpu")
    assert r["precision"] > 0.95
    assert abs(r["recall"] - 0.5) < 0.05
    assert abs(r["coverage"] - 0.5) < 0.05
    assert 0.8 < r["density"] < 1.2
    s = compute_prdc(fake, real, k=K, block_size=256, device="cpu")
    assert abs(s["precision"] - 0.5) < 0.05 and s["recall"] > 0.95


def test_identical_sets():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    r = compute_prdc(x, x.copy(), block_size=64, device="cpu")
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["coverage"] == 1.0


def test_f_score():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((200, 8))
    fake = rng.standard_normal((150, 8)) * 1.5
    r = compute_prdc(real, fake, f_score=True, beta=8.0, device="cpu")
    p, q = r["precision"], r["recall"]
    assert r["f1"] == pytest.approx(2 * p * q / (p + q))
    assert r["f_beta"] == pytest.approx(65 * p * q / (64 * p + q))
    assert "f1" not in compute_prdc(real, fake, device="cpu")


def test_float64_and_float32_inputs_agree():
    rng = np.random.default_rng(11)
    real = rng.random((120, 20)).astype(np.float32)
    fake = rng.random((90, 20)).astype(np.float32)
    a = compute_prdc(real, fake, block_size=32, device="cpu")
    b = compute_prdc(real.astype(np.float64), torch.from_numpy(fake), block_size=50, device="cpu")
    assert a == b


@pytest.mark.parametrize("real,fake,kw,match", [
    (np.zeros((10, 4)), np.zeros((10, 5)), {}, "dimension"),
    (np.zeros((10,)), np.zeros((10, 5)), {}, "real.*2-D"),
    (np.zeros((10, 4)), np.full((10, 4), np.nan), {}, "fake.*NaN"),
    (np.zeros((3, 4)), np.zeros((10, 4)), {}, "real: need more than k=3"),
    (np.zeros((10, 4)), np.zeros((10, 4)), {"k": 0}, "k must be"),
    (np.zeros((10, 4)), np.zeros((10, 4)), {"block_size": 0}, "block_size"),
    (np.array([["a"] * 4] * 10), np.zeros((10, 4)), {}, "real numeric"),
    (np.zeros((10, 4)), np.zeros((10, 4)), {"beta": -1.0}, "beta"),
])
def test_bad_input(real, fake, kw, match):
    with pytest.raises(ValueError, match=match):
        compute_prdc(real, fake, device="cpu", **kw)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 40), m=st.integers(5, 40), dim=st.integers(1, 3), k=st.integers(1, 4),
       block=st.integers(1, 50), seed=st.integers(0, 2**16), levels=st.integers(2, 4))
def test_property_matches_reference_with_ties(n, m, dim, k, block, seed, levels):
    """Random small integer sets (many exact ties and duplicates), any k and block size."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, levels, size=(n, dim)).astype(np.float32)
    fake = rng.integers(0, levels, size=(m, dim)).astype(np.float64)
    ref = _ref(real, fake, k=k)
    ours = compute_prdc(real, fake, k=k, block_size=block, device="cpu")
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_inception_dimension_matches_both_peers():
    """2048-d features (the Inception pool_3 width) against torch-fidelity and prdc at once, with
    the same tie-margin check as above."""
    import prdc
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(99)
    mix = rng.standard_normal((32, 2048)) / np.sqrt(32) / 3
    real = _inception_like(rng, 240, dim=2048, mix=mix) * np.float32(0.6)
    fake = _inception_like(rng, 200, dim=2048, shift=0.2, mix=mix) * np.float32(0.6)
    assert 15 < np.median(np.linalg.norm(real, axis=1)) < 40
    ref = _ref(real, fake)
    drr, dff = _sq(real, real), _sq(fake, fake)
    eps = max(_peer_float32_error(real, fake, ref["drf"]), _peer_float32_error(real, real, drr),
              _peer_float32_error(fake, fake, dff))
    assert (np.abs(ref["drf"] - ref["rr2"][:, None]) / ref["rr2"][:, None]).min() > 3 * eps
    assert (np.abs(ref["drf"] - ref["rf2"][None, :]) / ref["rf2"][None, :]).min() > 3 * eps
    ours = compute_prdc(real, fake, block_size=100, device="cpu")
    tf = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=K,
                                prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    theirs = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=K)
    assert 0.05 < ours["precision"] < 0.95 and 0.05 < ours["recall"] < 0.95
    assert round(ours["precision"] * len(fake)) == round(tf["precision"] * len(fake))
    assert round(ours["recall"] * len(real)) == round(tf["recall"] * len(real))
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(theirs[key]), abs=1e-12), key
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
