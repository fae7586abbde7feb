"""Images per second of FID Inception features: iddpm vs torch-fidelity vs clean-fid, one run, same images.

    .venv/bin/python benchmarks/fid_features.py [--n 64] [--batch-size 64] [--repeats 2]

Every contender gets the same uint8 images (Fashion-MNIST 28x28 when installed, else random) and
the same Inception-2015-12-05 weights (torch-fidelity through the mapped ``.pth``, clean-fid
through the TorchScript saved in a temporary folder), and does its whole job from uint8 images
to pool_3 features, resizing to 299x299 included:

* ``torch-fidelity``: ``FeatureExtractorInceptionV3`` (TF1 bilinear resize inside), legacy-tf;
* ``clean-fid``: its "clean" path for in-memory images (PIL bicubic resize per image, then the
  TorchScript layers), as ``get_files_features`` runs it minus file decoding;
* ``iddpm legacy-tf`` / ``iddpm clean``: :class:`iddpm_eval.features.FeatureExtractor`;
* ``iddpm plain``: the same network without the speed work (batch norm not folded, NCHW memory,
  separate ReLU) to show what the speed work buys.

Timing: the contenders run round-robin ``--repeats`` times after a warm-up; each keeps its best
pass (the machine is shared; the best pass is the least disturbed one). Written to
``results/benchmarks/fid.csv`` as images/s and ratios against the peers measured in the same run,
with the largest relative feature difference against the peer of the same convention.

The machine is shared, so the CSV also has images per CPU-second of this process
(``img_per_cpu_s``), which depends much less on what else runs; both ratios are reported.

Profile (torch.profiler, 16 images, channels-last with folded batch norm, before fusing the ReLU):
convolutions 62% of the time, the separate ReLU pass 24%, channel concatenation 8%, pooling 5%.
Prediction before the speed work: torch-fidelity ~7 img/s here; folding + channels-last ~12
(REFERENCE.md); fusing the ReLU into oneDNN's convolution removes most of the 24% ReLU share, so
~2x torch-fidelity (~14-15 img/s), against a compute limit of ~23 img/s (11.4 GFLOP/img at ~260
GFLOP/s).

What each step bought (A/B in one process, CPU time, 2 threads, load ~10 on 2 cores):
fused conv+ReLU (oneDNN) with weights prepacked once: 2.4 -> 3.3 img/s wall at batch 32 (+35%);
prepacking alone made single convolutions 25-40% faster; glibc allocator thresholds
(``features.tune_cpu_allocator``): minor page faults /3.3, +12-15% images per CPU-second; batch
64 vs 32 vs 16: 13.4 vs 11.7 vs 10.2 images per CPU-second; TF1 resize as exact one-hot matmuls
instead of ``index_select`` on NHWC: 0.4 s instead of 3.6-5.7 s CPU per 64 images at 28x28.
Tried and dropped: ``torch.jit.freeze`` + ``optimize_for_inference`` (slower than eager
channels-last here: 1.3 vs 2.0 img/s); merging each block's 1x1 convolutions that read the same
input into one convolution (no measurable change, 11.1 vs 11.1 images per CPU-second).

Measured on a quiet machine (load < 1, the committed CSV): torch-fidelity 17.5 img/s, clean-fid
20.7, iddpm legacy-tf 35.7 (2.05x torch-fidelity, 1.73x clean-fid); a run at batch 32 gave
18.9 / 19.5 / 33.7 (1.78x, 1.73x). The peers are 2.5x faster than REFERENCE.md's 7.3 img/s on
this CPU and our 35.7 img/s exceeds its "23 img/s compute limit", so this CPU does more than
260 GFLOP/s; the prediction (2x) held under load (2.4x) and roughly on a quiet machine (1.8-2.05x).

Measured (2026-11-23, 64 Fashion-MNIST images, batch 64, machine shared with ~6 other jobs, so
absolute rates are 2-4x below an idle machine): iddpm legacy-tf 5.8 img/s wall = 2.42x
torch-fidelity (2.38x by CPU time), iddpm clean 2.05x clean-fid (2.20x by CPU time); features
within 1.5e-6 (legacy-tf vs torch-fidelity) and 2.7e-6 (clean vs clean-fid) relative. Note the
allocator setting is process-wide, so the peers in the same run profit from it too: the ratios
are conservative.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # peers.py: the peer libraries set up on the same weights

from peers import cleanfid_offline, torch_fidelity_weights  # noqa: E402

from iddpm_core.io import write_text  # noqa: E402
from iddpm_eval.features import FeatureExtractor  # noqa: E402
from iddpm_eval.inception import FIDInception  # noqa: E402
from iddpm_eval.preprocess import preprocess  # noqa: E402
from iddpm_eval.weights import load_nvidia_state  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def load_images(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    if FASHION.exists():
        with gzip.open(FASHION, "rb") as fh:
            data = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return np.repeat(data[:n, :, :, None], 3, axis=-1), "fashion-mnist 28x28"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8), "random 28x28"


def batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def make_contenders(images: np.ndarray, batch_size: int, tmp: Path, plain: bool):
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tf_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=str(torch_fidelity_weights(tmp)))

    def torch_fidelity(imgs):
        x = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
        with torch.no_grad():
            return torch.cat([tf_net(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]).numpy()

    with cleanfid_offline(tmp):
        cf_model = build_feature_extractor("clean", device=torch.device("cpu"), use_dataparallel=False)
    cf_resize = build_resizer("clean")

    def clean_fid(imgs):
        out = []
        for chunk in batches(imgs, batch_size):
            x = torch.from_numpy(np.stack([cf_resize(img) for img in chunk]).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                out.append(cf_model(x).numpy())
        return np.concatenate(out)

    ours = FeatureExtractor(mode="legacy-tf", batch_size=batch_size, progress=False)
    ours_clean = FeatureExtractor(mode="clean", batch_size=batch_size, progress=False)
    contenders = {
        "torch-fidelity": ("legacy-tf", torch_fidelity),
        "clean-fid": ("clean", clean_fid),
        "iddpm legacy-tf": ("legacy-tf", lambda imgs: ours(imgs)["pool"]),
        "iddpm clean": ("clean", lambda imgs: ours_clean(imgs)["pool"]),
    }
    if plain:
        net = FIDInception.from_state(load_nvidia_state(ours.weights_path), fold=False)

        def iddpm_plain(imgs):
            with torch.inference_mode():
                return torch.cat([net(preprocess(c, "legacy-tf").contiguous())[0]
                                  for c in batches(imgs, batch_size)]).numpy()

        contenders["iddpm plain (no fold, NCHW)"] = ("legacy-tf", iddpm_plain)
    return contenders, ours


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images per timed pass")
    parser.add_argument("--batch-size", type=int, default=64, help="the iddpm-eval default")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per contender (best kept)")
    parser.add_argument("--no-plain", action="store_true", help="skip the unoptimised iddpm row")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "fid.csv")
    args = parser.parse_args(argv)

    images, source = load_images(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        contenders, ours = make_contenders(images, args.batch_size, Path(tmp), plain=not args.no_plain)
        best = {name: float("inf") for name in contenders}
        best_cpu = dict(best)
        feats = {}
        for name, (_, fn) in contenders.items():  # warm-up on one full batch (oneDNN primitives, packed
            fn(images[: args.batch_size])  # weights, allocator), so every timed pass is steady state
        for rep in range(args.repeats):
            for name, (_, fn) in contenders.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                feats[name] = fn(images)
                best[name] = min(best[name], time.perf_counter() - start)
                best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
                print(f"pass {rep + 1}: {name:28s} {len(images) / (time.perf_counter() - start):6.2f} img/s",
                      flush=True)

    rate = {name: len(images) / t for name, t in best.items()}
    cpu_rate = {name: len(images) / t for name, t in best_cpu.items()}
    peer_of = {"legacy-tf": "torch-fidelity", "clean": "clean-fid"}
    rows = ["extractor,mode,images,batch_size,threads,img_per_s,ratio_vs_torch_fidelity,ratio_vs_clean_fid,"
            "img_per_cpu_s,cpu_ratio_vs_torch_fidelity,cpu_ratio_vs_clean_fid,max_rel_diff_vs_peer,peer,source"]
    for name, (mode, _) in contenders.items():
        peer = peer_of[mode]
        diff = rel_diff(feats[name], feats[peer]) if name != peer else 0.0
        rows.append(f"{name},{mode},{len(images)},{args.batch_size},{torch.get_num_threads()},{rate[name]:.3f},"
                    f"{rate[name] / rate['torch-fidelity']:.3f},{rate[name] / rate['clean-fid']:.3f},"
                    f"{cpu_rate[name]:.3f},{cpu_rate[name] / cpu_rate['torch-fidelity']:.3f},"
                    f"{cpu_rate[name] / cpu_rate['clean-fid']:.3f},{diff:.3g},{peer},{source}")
    text = "\n".join(rows) + "\n"
    write_text(args.out, text)
    print(text)
    print(f"weights sha256 {ours.weights_sha256}; written {args.out}")
    return args.out


if __name__ == "__main__":
    main()
