"""Timestep samplers: uniform, loss-second-moment importance sampling (unbiasedness, state, multi-process)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from iddpm_core.diffusion import LossSecondMomentSampler, UniformSampler, create_sampler


def fill(sampler, losses, rounds):
    T = len(losses)
    for _ in range(rounds):
        sampler.update_with_all_losses(list(range(T)), list(losses))


def test_uniform_sampler():
    s = create_sampler("uniform", 7)
    assert isinstance(s, UniformSampler)
    t, w = s.sample(5000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 6
    torch.testing.assert_close(w, torch.ones(5000))
    counts = np.bincount(t.numpy(), minlength=7)
    assert np.all(np.abs(counts - 5000 / 7) < 5 * np.sqrt(5000 / 7))
    s.update_with_all_losses([1, 2], [0.3, 0.4])  # no state to change
    s.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        create_sampler("importance", 7)
    with pytest.raises(ValueError, match="for 8 timesteps"):
        s.load_state_dict({"num_timesteps": 8})


def test_second_moment_warmup_and_probabilities():
    T = 6
    s = create_sampler("loss-second-moment", T)
    assert isinstance(s, LossSecondMomentSampler) and s.history == 10 and s.uniform_prob == 0.001
    rng = np.random.default_rng(0)
    hist = rng.uniform(0.1, 3.0, size=(T, 15))
    for j in range(15):
        # every t but the last gets its losses; uniform until all have 10
        s.update_with_all_losses(list(range(T - 1)), hist[: T - 1, j].tolist())
    assert not s.warmed_up()
    np.testing.assert_allclose(s.probabilities(), np.full(T, 1 / T))
    for j in range(10):
        s.update_with_all_losses([T - 1], [hist[T - 1, j]])
    assert s.warmed_up()
    last10 = np.vstack([hist[: T - 1, 5:15], hist[T - 1:, :10]])  # older entries dropped
    rms = np.sqrt((last10 ** 2).mean(axis=1))
    expected = 0.999 * rms / rms.sum() + 0.001 / T
    np.testing.assert_allclose(s.probabilities(), expected, rtol=1e-12)
    t, w = s.sample(1000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.from_numpy(1 / (T * expected[t.numpy()])).float())
    with pytest.raises(ValueError, match="outside"):
        s.update_with_all_losses([T], [1.0])


def test_importance_weighted_loss_is_unbiased():
    T = 50
    s = LossSecondMomentSampler(T)
    L = np.linspace(0.01, 5.0, T) ** 2  # strongly uneven per-t losses
    fill(s, L, 10)
    p = s.probabilities()
    assert p.max() / p.min() > 100
    # exactly: sum_t p_t * 1/(T p_t) * L_t = mean L
    assert np.sum(p * (1 / (T * p)) * L) == pytest.approx(L.mean(), rel=1e-12)
    # numerically, over many draws
    t, w = s.sample(400_000, generator=torch.Generator().manual_seed(1))
    est = w.double().numpy() * L[t.numpy()]
    se = est.std() / np.sqrt(len(est))
    assert abs(est.mean() - L.mean()) < 4 * se
    # and the importance sampler has the lower variance (the point of it)
    tu, wu = UniformSampler(T).sample(400_000, generator=torch.Generator().manual_seed(1))
    assert est.var() < (wu.double().numpy() * L[tu.numpy()]).var()


def test_state_roundtrip(tmp_path):
    T = 8
    a = LossSecondMomentSampler(T, history=3, uniform_prob=0.01)
    fill(a, np.arange(1, T + 1, dtype=float), 4)
    a.update_with_all_losses([2, 2], [7.0, 9.0])
    from iddpm_core.io import torch_save
    torch_save(a.state_dict(), tmp_path / "s.pt")
    b = LossSecondMomentSampler(T, history=3)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    np.testing.assert_array_equal(a.probabilities(), b.probabilities())
    ta, wa = a.sample(64, generator=torch.Generator().manual_seed(3))
    tb, wb = b.sample(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)
    with pytest.raises(ValueError, match="loss_history has shape"):
        LossSecondMomentSampler(T, history=4).load_state_dict(a.state_dict())
    # numpy arrays are accepted too
    c = LossSecondMomentSampler(T, history=3)
    c.load_state_dict({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a.probabilities(), c.probabilities())


def test_local_update_without_distributed():
    s = LossSecondMomentSampler(3, history=1)
    s.update_with_local_losses(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 4.0]))
    r = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(s.probabilities(), 0.999 * r / r.sum() + 0.001 / 3)
    with pytest.raises(ValueError, match="3 timesteps but 2 losses"):
        s.update_with_local_losses(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0]))


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from iddpm_core.diffusion import LossSecondMomentSampler
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    s = LossSecondMomentSampler(4, history=2)
    if rank == 0:   # batch sizes differ between the processes
        ts, ls = torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    else:
        ts, ls = torch.tensor([3, 0, 1, 2, 3]), torch.tensor([4.0, 5.0, 6.0, 7.0, 8.0])
    s.update_with_local_losses(ts, ls)
    print(s.loss_counts.tolist(), s.loss_history.tolist())
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_update_with_local_losses_two_processes(tmp_path):
    store = str(tmp_path / "store")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), store], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    # both ranks see every loss, in rank order
    expected = "[2, 2, 2, 2] [[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]]"
    assert outs[0][0].strip() == outs[1][0].strip() == expected
