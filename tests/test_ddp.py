"""Two gloo processes on the CPU: one step with 2 processes of batch b equals one step with 1 process
of batch 2b; importance-sampler histories stay in sync; sampling shards split across processes."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from iddpm_core.config import RunConfig, TrainConfig
from iddpm_core.diffusion import DiffusionConfig
from iddpm_core.models import ModelConfig
from iddpm_core.sample import sample_to_dir
from iddpm_core.train import train

torch.set_num_threads(1)


def config(batch_size: int) -> dict:
    # lr is tiny so that the parameters of both runs stay within float noise of each other after a
    # step (Adam's first update is about lr * sign(g), which amplifies rounding in near-zero gradients)
    return RunConfig(
        model=ModelConfig(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2),
                          attention_resolutions=(4,), num_heads=2),
        diffusion=DiffusionConfig(steps=20),
        train=TrainConfig(batch_size=batch_size, microbatch=3, steps=3, lr=1e-6, ema_rates=(0.9,),
                          timestep_sampler="loss-second-moment", log_interval=1, sample_interval=0,
                          save_interval=0, sample_num=2, sample_steps="2"),
    ).to_dict()


class Recorder:
    def __init__(self):
        self.grads, self.sampler, self.world = None, None, None

    def __call__(self, step, model, ema, info):
        if step == 1:
            self.grads = [p.grad.detach().clone() for p in model.parameters()]
        self.sampler = {k: torch.as_tensor(np.asarray(v)) for k, v in info["timestep_sampler"].state_dict().items()}
        self.world = info["world_size"]


def worker(rank: int, world: int, ports: tuple, root: str, ckpt_1proc: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    rec = Recorder()
    summary = train(RunConfig.from_dict(config(4)), os.path.join(root, "ddp"), callback=rec, progress=False)
    os.environ["MASTER_PORT"] = str(ports[1])
    s = sample_to_dir(ckpt_1proc, os.path.join(root, "samples2"), 5, steps=2, seed=7, batch_size=2, progress=False)
    torch.save({"grads": rec.grads, "sampler": rec.sampler, "world": rec.world, "last": summary["last_metrics"],
                "shards_made": s["shards_made"]}, os.path.join(root, f"rank{rank}.pt"))


def free_ports(n: int) -> tuple:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_processes_equal_one_process_of_twice_the_batch(tmp_path):
    one = Recorder()
    single = train(RunConfig.from_dict(config(8)), tmp_path / "single", callback=one, progress=False)
    assert one.world == 1
    ckpt = str(tmp_path / "single" / "checkpoints" / "latest.pt")
    mp.spawn(worker, args=(2, free_ports(2), str(tmp_path), ckpt), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2

    # step 1: averaged gradients identical on both ranks and equal to the single process's
    for g0, g1, g in zip(r0["grads"], r1["grads"], one.grads):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, g, rtol=1e-5, atol=1e-8)
    assert sum(float(g.abs().sum()) for g in one.grads) > 0
    # importance-sampler histories: the same on both ranks, and the single run's 24 losses
    for k in r0["sampler"]:
        assert torch.equal(r0["sampler"][k], r1["sampler"][k]), k
        torch.testing.assert_close(r0["sampler"][k].double(), one.sampler[k].double(), rtol=1e-5, atol=1e-7)
    assert int(one.sampler["loss_counts"].sum()) == 24
    # the logged (process-averaged) metrics equal the single process's
    for key in ("loss", "mse", "vb", "loss_q0", "loss_q3", "grad_norm", "train_flops", "images_seen"):
        assert r0["last"][key] == pytest.approx(single["last_metrics"][key], rel=1e-5), key

    # sampling: shards dealt round-robin, merged output identical to a single process
    assert r0["shards_made"] == [0, 2] and r1["shards_made"] == [1]
    sample_to_dir(ckpt, tmp_path / "samples1", 5, steps=2, seed=7, batch_size=2, progress=False)
    with np.load(tmp_path / "samples1" / "samples.npz") as a, np.load(tmp_path / "samples2" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (5, 8, 8, 1)
