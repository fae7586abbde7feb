"""Training step, ancestral sampling step and DDIM step: the suite against improved-diffusion, interleaved.

The peer is OpenAI's guided-diffusion as packaged on PyPI (``guided-diffusion-sdk``), the successor of
improved-diffusion with the same ``GaussianDiffusion``; its U-Net reduces to improved-diffusion's with
``resblock_updown=False``, the old attention order, ``num_head_channels=-1`` and the channel multipliers
given explicitly. Install it with the ``bench`` extra, without its dependencies (its blobfile and
mpi4py are not needed here; its ``dist_util`` and ``LossSecondMomentResampler`` are not used):

    .venv/bin/pip install --no-deps guided-diffusion-sdk      # or: pip install --no-deps -e '.[bench]'

Both sides are built at the same configuration and checked to be the same network (parameter count
and forward FLOPs equal) before anything is timed:

* ``reference``: 32x32x3, 32 base channels, channel_mult 1,2,2,2, one residual block per level,
  attention at 16 (4 heads), learned sigmas, cosine T = 1000, hybrid loss (rescale_learned_sigmas),
  AdamW lr 1e-4, EMA 0.9999, batch 32: 1,629,478 parameters, 566.9 MFLOP per forward image;
* ``fashion-mnist``: the main job's model (scripts/pipeline.sh, preset fashion-mnist): 28x28x1,
  16 base channels, channel_mult 1,2,2, attention at 7, learned sigmas, cosine T = 1000, hybrid loss,
  AdamW lr 2e-3, EMA 0.999, batch 32.

Timed operations (one process, the two sides alternating every repeat so machine load hits both
alike; medians of ``--repeats``):

* ``train``: one optimiser step as each trainer runs it. Peer: improved-diffusion's ``run_step``
  without its logging (``MixedPrecisionTrainer`` fp32: zero_grad, ``training_losses``, backward,
  gradient and parameter norms, AdamW step, ``update_ema``). Suite: ``iddpm_core.train``'s
  ``forward_backward`` and ``optimizer_step`` (losses, backward, logged statistics, gradient norm,
  AdamW step, EMA), exactly what the trainer calls.
* ``p_sample``: one ancestral step at batch 32 (``p_sample`` of both, t = 500 of the full chain).
* ``ddim``: one DDIM step (eta = 0) at batch 32.
* ``p_sample_loop``: a 20-step respaced ancestral loop per step (includes the loops' own overhead).

Each row holds wall-clock medians and, as the machine is shared, the process CPU time per step
(less sensitive to other jobs); ``ratio`` is peer / suite of the wall medians, ``cpu_ratio`` of the
CPU-time medians, ``best_ratio`` of each side's fastest repeat (the least disturbed one). With ``--precision bf16`` the suite side runs under bfloat16 autocast (the peer stays
fp32), which measures what the ``--precision bf16`` option of the trainer and sampler buys.

Notes (2026-12-02; 2-core Xeon with AVX-512 BF16, no AMX; shared with ~6 jobs, load average 5-10 in
every run, so the lead reruns this on a quiet machine; ``--threads 1`` was used here, as 2-thread runs
under that load measured mostly the other jobs).

Profile before (torch.profiler, reference config, batch 32, the previous code = ``reference_ops()``):
  sampling step: convolutions 47%, softmax of the explicit attention 18% and its two bmm 6% (a
  32 x 4 x 256 x 256 weight matrix at 16 px), GroupNorm 6%, SiLU 4%, other elementwise 8%, cat 3%;
  training step: convolution backward 32% and forward 9%, attention (bmm, softmax and its backward) 14%,
  GroupNorm forward and backward 4%, copies 5%, the per-tensor AdamW loop (118 tensors) 13 ms per step.
  The diffusion maths (q_sample, posterior, KL, decoder terms) are below 1% of either step.
Prediction: the CPU flash-attention kernel removes most of the attention's 24% of sampling and ~10% of
  training; channels-last activations make oneDNN's convolutions ~20% faster but torch's GroupNorm is
  2-3x slower on that layout (measured alone: 2.5 vs 0.4 ms forward at 32x64x16x16), so GroupNorm +
  scale-shift + SiLU become one node written for channels-last; fused AdamW ~3x faster than the loop.
  Expected: sampling ~1.6x, training ~1.45x (the convolution backward gains least).
Profile after: sampling: convolutions 45%, attention 10%, the GroupNorm node ~20% (sums, one multiply-add,
  SiLU), linear 5%, cat 2.5%; training: convolution backward 34% and forward 15%, attention forward and
  backward 12%, the GroupNorm node ~20%.
Measured in isolation (1 thread, CPU time, medians, interleaved): forward 235 vs 353 ms (1.50x) and
  forward+backward 728 vs 1031 ms (1.42x) against the previous code, whose times equal the peer's; the
  AdamW step 4.3 vs 12.9 ms; a p_sample step 330 vs 559 ms against the peer (1.69x; 1.56x after 3 training
  steps). Whole-step ratios from this script at load 5-10 (CPU time, 1 thread, 5-7 repeats) scattered:
  training 1.47x, 1.49x, 1.52x, 1.36x; p_sample 1.50x, 1.16x, 1.16x, 1.46x; DDIM 1.48x, 1.19x, 1.14x.
  The peer's sampling step varied most (350 to 560 ms CPU for the same work): its 32 x 4 x 256 x 256
  attention matrix makes it memory-bound, so its speed follows the other jobs' memory traffic. The
  committed CSV is the last complete run (training 1.52x, sampling 1.16x); a quiet rerun decides.
Narrow models: at 16 base channels (the main job's Fashion-MNIST model) channels-last convolutions were
  ~7% slower than contiguous ones and the GroupNorm node lost to torch's contiguous GroupNorm, so models
  below 32 base channels keep the contiguous layout; only the attention kernel, fused AdamW and the
  list-wise EMA apply there (forward 99 vs 106 ms, forward+backward equal): about the peer's speed.
torch.compile (inductor, default mode, reference config): compiling took 538 s wall (64 s CPU in this
  process) for the training graph and 257 s for the sampling graph on the loaded machine, for steps 9%
  (training) and 6% (sampling) faster than the eager fast path: it does not pay on the main job's few
  minutes of training, so it is not used.
bf16 autocast (``--precision bf16``): on this CPU oneDNN runs brgemm avx512_core_bf16 convolutions, but
  the per-call weight casts and reorders cost more than they save at these widths: reference config
  forward 408 vs 298 ms, forward+backward 1357 vs 909 ms (0.73x and 0.67x of fp32); outputs within 0.3%
  (relative L2) of fp32. Loss curve (main-job model, Fashion-MNIST, 200 steps, same seeds): the 10-step
  mean losses stay within 1.1% of fp32 (last 50 steps: 0.1312 vs 0.1318), at 0.68x fp32's speed
  (0.466 vs 0.318 CPU seconds per step).
  FID under bf16 was not measured. Kept as an option, off by default.

Usage: python benchmarks/train_sample.py [--quick] [--repeats 9] [--threads 2] [--precision fp32|bf16]
       [--configs reference,fashion-mnist] [--out results/benchmarks/train_sample.csv]
``--quick`` runs 3 repeats of the reference configuration only and writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iddpm_core.diffusion import DiffusionConfig, build_diffusion
from iddpm_core.diffusion.samplers import ddim_sample, p_sample, p_sample_loop
from iddpm_core.ema import EMA
from iddpm_core.io import write_text
from iddpm_core.models import ModelConfig, build_model
from iddpm_core.models.cost import count_parameters, forward_flops
from iddpm_core.precision import autocast
from iddpm_core.train_step import build_optimizer, forward_backward, optimizer_step
from iddpm_core.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PARAMS = 1_629_478


@dataclass
class Setup:
    name: str
    model: ModelConfig
    lr: float
    ema_rate: float
    batch: int = 32


CONFIGS = {
    "reference": Setup("reference", ModelConfig(image_size=32, in_channels=3, base_channels=32,
                                                channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                                                attention_resolutions=(16,), num_heads=4, learn_sigma=True),
                       lr=1e-4, ema_rate=0.9999),
    "fashion-mnist": Setup("fashion-mnist", ModelConfig(image_size=28, in_channels=1, base_channels=16,
                                                        channel_mult=(1, 2, 2), num_res_blocks=1,
                                                        attention_resolutions=(7,), num_heads=4, learn_sigma=True),
                           lr=2e-3, ema_rate=0.999),
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def import_peer():
    try:
        from guided_diffusion import fp16_util, logger
        from guided_diffusion.nn import update_ema
        from guided_diffusion.script_util import create_gaussian_diffusion
        from guided_diffusion.unet import UNetModel
    except ImportError as exc:
        sys.exit(f"benchmarks/train_sample.py: the peer is missing ({exc}); install it with "
                 "'.venv/bin/pip install --no-deps guided-diffusion-sdk' (the bench extra)")
    # its trainer logs norms through a global logger: give it one that writes nowhere
    logger.Logger.CURRENT = logger.Logger(dir=None, output_formats=[])
    return UNetModel, create_gaussian_diffusion, fp16_util.MixedPrecisionTrainer, update_ema


@contextlib.contextmanager
def peer_group_counts():
    """The peer's GroupNorm always takes 32 groups, which fails below 32 channels (the main job's 16-channel
    model). While the peer builds, give it the suite's rule (32 groups, or the largest divisor below 32 for
    narrower layers): the same parameters and FLOPs, and at 32+ channels exactly the peer's own layer."""
    import guided_diffusion.unet as peer_unet
    from guided_diffusion.nn import GroupNorm32

    from iddpm_core.models.layers import num_groups

    original = peer_unet.normalization
    peer_unet.normalization = lambda channels: GroupNorm32(num_groups(channels), channels)
    try:
        yield
    finally:
        peer_unet.normalization = original


def build_peer(cfg: ModelConfig):
    UNetModel, create_gaussian_diffusion, _, _ = import_peer()
    with peer_group_counts():
        model = build_peer_unet(UNetModel, cfg)
    diffusion = create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                          rescale_timesteps=True, rescale_learned_sigmas=True)
    return model, diffusion


def build_peer_unet(UNetModel, cfg: ModelConfig):
    return UNetModel(image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.base_channels,
                     out_channels=cfg.out_channels, num_res_blocks=cfg.num_res_blocks,
                     attention_resolutions=tuple(cfg.image_size // r for r in cfg.attention_resolutions),
                     dropout=0.0, channel_mult=cfg.resolved_channel_mult(), num_classes=None,
                     use_checkpoint=False, use_fp16=False, num_heads=cfg.num_heads, num_head_channels=-1,
                     use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False)


def check_same_network(setup: Setup, peer: torch.nn.Module, suite: torch.nn.Module) -> dict:
    """Parameter counts and forward FLOPs of the two networks; exits when they differ."""
    cfg = setup.model
    n_peer, n_suite = count_parameters(peer), count_parameters(suite)
    f_peer = forward_flops(peer, cfg.image_size, cfg.in_channels)
    f_suite = forward_flops(suite)
    if n_peer != n_suite or f_peer != f_suite:
        sys.exit(f"{setup.name}: the peer's U-Net is not the suite's: {n_peer} vs {n_suite} parameters, "
                 f"{f_peer} vs {f_suite} FLOPs per forward image")
    if setup.name == "reference" and n_suite != REFERENCE_PARAMS:
        sys.exit(f"reference config has {n_suite} parameters, expected {REFERENCE_PARAMS}")
    return {"params": n_suite, "mflops_forward": round(f_suite / 1e6, 1)}


class Sides:
    """The two implementations at one configuration, with their training state and fixed inputs."""

    def __init__(self, setup: Setup, precision: str):
        cfg = setup.model
        self.setup, self.precision = setup, precision
        _, _, MixedPrecisionTrainer, update_ema = import_peer()
        torch.manual_seed(0)
        self.peer, self.peer_diffusion = build_peer(cfg)
        self.peer_mp = MixedPrecisionTrainer(model=self.peer, use_fp16=False)
        self.peer_opt = torch.optim.AdamW(self.peer_mp.master_params, lr=setup.lr, weight_decay=0.0)
        self.peer_ema = [p.detach().clone() for p in self.peer.parameters()]
        self.update_ema = update_ema
        torch.manual_seed(0)
        self.suite = build_model(cfg)
        self.cost = check_same_network(setup, self.peer, self.suite)
        dcfg = DiffusionConfig(steps=1000, schedule="cosine", var_type="learned_range", loss="hybrid")
        self.diffusion = build_diffusion(dcfg)
        self.diffusion_20 = build_diffusion(dcfg, "20")
        self.peer_diffusion_20 = build_peer_diffusion_respaced("20")
        tcfg = TrainConfig(lr=setup.lr, ema_rates=(setup.ema_rate,))
        self.opt = build_optimizer(self.suite, tcfg)
        self.ema = EMA(self.suite, tcfg.ema_rates)
        self.acc = torch.zeros(14, dtype=torch.float64)
        g = torch.Generator().manual_seed(1)
        B, C, S = setup.batch, cfg.in_channels, cfg.image_size
        self.x0 = torch.rand(B, C, S, S, generator=g) * 2 - 1
        self.noise = torch.randn(B, C, S, S, generator=g)
        self.t = torch.randint(0, 1000, (B,), generator=g)
        self.w = torch.ones(B)
        self.xt = torch.randn(B, C, S, S, generator=g)
        self.t_mid = torch.full((B,), 500, dtype=torch.long)
        self.shape = (B, C, S, S)

    # ---- peer
    def peer_train(self):
        self.peer.train()
        self.peer_mp.zero_grad()
        losses = self.peer_diffusion.training_losses(self.peer, self.x0, self.t, noise=self.noise)
        self.peer_mp.backward((losses["loss"] * self.w).mean())
        self.peer_mp.optimize(self.peer_opt)
        self.update_ema(self.peer_ema, self.peer_mp.master_params, rate=self.setup.ema_rate)

    def peer_p_sample(self):
        self.peer.eval()
        with torch.no_grad():
            self.peer_diffusion.p_sample(self.peer, self.xt, self.t_mid, clip_denoised=True)

    def peer_ddim(self):
        self.peer.eval()
        with torch.no_grad():
            self.peer_diffusion.ddim_sample(self.peer, self.xt, self.t_mid, clip_denoised=True, eta=0.0)

    def peer_loop(self):
        self.peer.eval()
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(self.shape, generator=g)
        self.peer_diffusion_20.p_sample_loop(self.peer, self.shape, noise=noise, clip_denoised=True)

    # ---- suite
    def _autocast(self):
        return autocast(self.precision, "cpu")

    def suite_train(self):
        self.suite.train()
        with self._autocast():
            forward_backward(self.suite, self.diffusion, self.x0, self.t, self.w, self.noise, None,
                             self.setup.batch, self.acc, set())
        optimizer_step(self.suite, self.opt, self.ema, 0.0)

    def suite_p_sample(self):
        self.suite.eval()
        with torch.no_grad(), self._autocast():
            p_sample(self.diffusion, self.suite, self.xt, self.t_mid, clip_denoised=True)

    def suite_ddim(self):
        self.suite.eval()
        with torch.no_grad(), self._autocast():
            ddim_sample(self.diffusion, self.suite, self.xt, self.t_mid, eta=0.0, clip_denoised=True)

    def suite_loop(self):
        self.suite.eval()
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(self.shape, generator=g)
        with self._autocast():
            p_sample_loop(self.diffusion_20, self.suite, self.shape, generator=g, noise=noise)


def build_peer_diffusion_respaced(spec: str):
    _, create_gaussian_diffusion, _, _ = import_peer()
    return create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="cosine",
                                     rescale_timesteps=True, rescale_learned_sigmas=True,
                                     timestep_respacing=spec)


OPS = {"train": 1, "p_sample": 1, "ddim": 1, "p_sample_loop": 20}  # steps per call


def time_ops(sides: Sides, repeats: int, ops, progress: bool) -> list[dict]:
    rows = []
    for op in ops:
        fns = {"peer": getattr(sides, f"peer_{op.replace('p_sample_loop', 'loop')}"),
               "suite": getattr(sides, f"suite_{op.replace('p_sample_loop', 'loop')}")}
        for fn in fns.values():  # warm-up (oneDNN primitive caches, allocator)
            fn()
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        loads = []
        for r in range(repeats):
            order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
            for name, fn in order:
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append((time.perf_counter() - w0) * 1e3 / OPS[op])
                cpu[name].append((time.process_time() - c0) * 1e3 / OPS[op])
            loads.append(os.getloadavg()[0])
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        best = {k: min(v) for k, v in wall.items()}  # the least disturbed repeat of each side
        row = {"config": sides.setup.name, "op": op, "precision": sides.precision, "batch": sides.setup.batch,
               **sides.cost, "peer_ms": round(med["peer"], 2), "suite_ms": round(med["suite"], 2),
               "ratio": round(med["peer"] / med["suite"], 3),
               "peer_cpu_ms": round(cmed["peer"], 2), "suite_cpu_ms": round(cmed["suite"], 2),
               "cpu_ratio": round(cmed["peer"] / cmed["suite"], 3),
               "peer_best_ms": round(best["peer"], 2), "suite_best_ms": round(best["suite"], 2),
               "best_ratio": round(best["peer"] / best["suite"], 3), "repeats": repeats,
               "torch_threads": torch.get_num_threads(), "load_avg_1min": round(statistics.median(loads), 2),
               "cpu_model": cpu_model(), "torch_version": torch.__version__}
        rows.append(row)
        if progress:
            print(f"{row['config']:>13} {op:>13} {sides.precision}: peer {row['peer_ms']:8.1f} ms  "
                  f"suite {row['suite_ms']:8.1f} ms  ratio {row['ratio']:.2f}x (cpu {row['cpu_ratio']:.2f}x, "
                  f"best {row['best_ratio']:.2f}x)  "
                  f"load {row['load_avg_1min']}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default="reference,fashion-mnist")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--quick", action="store_true", help="3 repeats, reference config, no CSV unless --out")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default results/benchmarks/train_sample.csv); rows of the other "
                        "precision already there are kept")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.configs = 3, "reference"
    names = [c for c in a.configs.split(",") if c]
    ops = [o for o in a.ops.split(",") if o]
    bad = [c for c in names if c not in CONFIGS] + [o for o in ops if o not in OPS]
    if bad or a.repeats < 1 or a.threads < 1:
        p.error(f"unknown config/op {bad} (configs: {list(CONFIGS)}, ops: {list(OPS)}) or repeats/threads < 1")
    torch.set_num_threads(a.threads)
    import_peer()
    rows = []
    for name in names:
        rows += time_ops(Sides(CONFIGS[name], a.precision), a.repeats, ops, not a.no_progress)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    sys.stdout.write(buf.getvalue())
    out = a.out if a.out is not None else (None if a.quick else ROOT / "results" / "benchmarks" / "train_sample.csv")
    if out is not None:  # rows of the other precision already in the file are kept
        old = []
        if out.exists():
            with open(out, newline="") as fh:
                old = [r for r in csv.DictReader(fh) if r.get("precision") != a.precision]
        merged = io.StringIO()
        w = csv.DictWriter(merged, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + old if a.precision == "fp32" else old + rows)
        write_text(out, merged.getvalue())

if __name__ == "__main__":
    main()
