"""Hostile and unusual inputs: crafted pickles, object arrays, 16-bit PNGs, unreadable or truncated
files, and the command-line messages they produce (one line naming the thing, no traceback)."""

from __future__ import annotations

import io
import os
import pickle
import stat
import struct
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from iddpm_core import data as D

torch.set_num_threads(1)


def _cli_error(result, *needles, code=None):
    """A refused command: non-zero exit (``code`` when given), every needle in the output, no traceback."""
    out = result.output
    assert result.exit_code != 0, out
    if code is not None:
        assert result.exit_code == code, out
    assert "Traceback" not in out and not isinstance(result.exception, (AttributeError, TypeError, KeyError)), out
    for needle in needles:
        assert str(needle) in out, (needle, out)
    return out


def _eval(*args):
    from iddpm_eval.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------- CIFAR-10 pickles

class _Payload:
    """Unpickling this writes a marker file (what a crafted CIFAR-10 batch did before the fix)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str (STRING opcodes), as cPickle did for the CIFAR-10
    python batches, and names numpy 1.x's module: the format of the files users download."""

    def _py2str(self, raw, obj):
        n = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + raw)
        self.memoize(obj)

    def save_bytes(self, obj):
        self._py2str(obj, obj)

    def save_str(self, obj):
        self._py2str(obj.encode("latin-1"), obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_dict(n, seed):
    rng = np.random.default_rng(seed)
    chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    return chw, labels


@pytest.mark.parametrize("writer", ["py2", "protocol2", "protocol4", "protocol5"])
def test_cifar_batches_in_every_pickle_dialect_read_back(tmp_path, writer):
    chw, labels = _cifar_dict(4, 1)
    d = {"batch_label": "testing batch 1 of 1", "labels": labels, "data": chw.reshape(4, -1),
         "filenames": [f"img_{i}.png" for i in range(4)]}
    if writer == "py2":
        raw = _py2_dumps(d)  # keys become b"data" ... when read with encoding="bytes"
    else:
        raw = pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=int(writer[-1]))
    (tmp_path / "test_batch").write_bytes(raw)
    src = D.load_source(f"cifar10:test:{tmp_path}")
    x, y = src.batch(range(4))
    np.testing.assert_array_equal(x, chw.transpose(0, 2, 3, 1))
    assert y.tolist() == labels


@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_crafted_cifar_batch_is_refused_without_running_code(tmp_path, where):
    marker = tmp_path / "MARKER"
    chw, labels = _cifar_dict(2, 2)
    d = {b"data": chw.reshape(2, -1), b"labels": labels}
    payload = _Payload(marker)
    obj = payload if where == "top" else {**d, where.encode(): payload}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(D.DataError, match="test_batch") as err:
        D.load_source(f"cifar10:test:{tmp_path}")
    assert "refused" in str(err.value) and "io.open" in str(err.value)  # the global it asked for
    assert not marker.exists()
    # the same through the command line: one line naming the file, no traceback, no marker
    out = _cli_error(_eval("stats", f"cifar10:test:{tmp_path}", "-o", tmp_path / "s.npz"), "test_batch", code=1)
    assert not marker.exists() and not (tmp_path / "s.npz").exists(), out


def test_cifar_batch_with_object_dtype_or_wrong_content_is_refused(tmp_path):
    objs = np.array([[1, 2], [3, 4]], dtype=object)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": objs, b"labels": [0, 1]}, protocol=2))
    with pytest.raises(D.DataError, match="test_batch.*Python objects"):
        D.load_source(f"cifar10:test:{tmp_path}")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}))
    with pytest.raises(D.DataError, match="test_batch.*uint8"):
        D.load_source(f"cifar10:test:{tmp_path}")


# ----------------------------------------------------------------------------- .npz and checkpoints

@pytest.mark.parametrize("arrays,cmd", [
    (dict(arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.array([1, "a", None, 2], dtype=object)), "fid"),
    (dict(mu=np.array([1.0, None], dtype=object), sigma=np.eye(2)), "fid"),
    (dict(pool=np.array([[1.0, None]] * 3, dtype=object)), "fid"),
    (dict(mu=np.zeros(2), sigma=np.eye(2), mode=np.array(["x", None], dtype=object)), "stats"),
])
def test_npz_object_array_is_refused_naming_file_and_array(tmp_path, arrays, cmd):
    path = tmp_path / "objects.npz"
    np.savez(path, **arrays)
    bad = next(k for k, v in arrays.items() if v.dtype == object)
    args = ("fid", path, "digits") if cmd == "fid" else ("stats", path, "-o", tmp_path / "o.npz")
    _cli_error(_eval(*args), "objects.npz", f"'{bad}'", "Python objects", code=1)


def _torch_file(path, obj):
    torch.save(obj, path)
    return path


def test_foreign_checkpoint_errors_are_short_and_give_no_unsafe_advice(tmp_path):
    from iddpm_core.cli import sample_main

    files = {"global.pt": lambda p: _torch_file(p, {"f": os.getcwd}),
             "random.pt": lambda p: p.write_bytes(np.random.default_rng(0).bytes(2000)),
             "pickle.pt": lambda p: p.write_bytes(pickle.dumps({"x": 1}, protocol=2))}
    for name, make in files.items():
        make(tmp_path / name)
        for r in (CliRunner().invoke(sample_main, ["--checkpoint", str(tmp_path / name), "--num", "2", "--out",
                                                   str(tmp_path / "s")]),
                  _eval("fid", tmp_path / name, "digits", "--num", "4")):
            out = _cli_error(r, name)
            assert "weights_only" not in out and "trusted source" not in out, out
            assert len([line for line in out.splitlines() if line.strip()]) <= 3, out  # usage, hint, the error


# ----------------------------------------------------------------------------- 16-bit PNGs

def _write_png16(path, arr):
    """A 16-bit PNG written by hand (grayscale HxW, or RGB HxWx3), so no library decides the bytes."""
    arr = np.asarray(arr, np.uint16)
    arr = arr[..., None] if arr.ndim == 2 else arr
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_copy_of_8bit_images_reads_as_the_same_bytes(tmp_path, channels):
    imgs = np.random.default_rng(5).integers(0, 256, (6, 8, 8, channels), dtype=np.uint8)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im[..., 0] if channels == 1 else im).save(tmp_path / "a" / f"{i}.png")
        _write_png16(tmp_path / "b" / f"{i}.png", (im[..., 0] if channels == 1 else im).astype(np.uint16) * 257)
    a, b = D.FolderSource(tmp_path / "a"), D.FolderSource(tmp_path / "b")
    assert a.shape == b.shape == (8, 8, channels)
    np.testing.assert_array_equal(b.batch(range(6))[0], imgs)
    np.testing.assert_array_equal(a.batch(range(6))[0], imgs)


def test_16bit_gray_png_keeps_its_high_byte_and_joins_rgb_folders(tmp_path):
    v = np.array([[0, 255, 256, 32767, 32768, 0x80FF, 0x7F80, 65535]], np.uint16)
    _write_png16(tmp_path / "g.png", v)
    src = D.FolderSource(tmp_path)
    assert src.shape == (1, 8, 1)
    assert src[0][0][0, :, 0].tolist() == (v[0] // 256).tolist()  # what Pillow does for 16-bit RGB too
    Image.fromarray(np.full((1, 8, 3), 7, np.uint8)).save(tmp_path / "h.png")
    src = D.FolderSource(tmp_path)  # one RGB file: the 16-bit gray one is replicated to 3 channels
    assert src.shape == (1, 8, 3)
    np.testing.assert_array_equal(src[0][0], np.repeat((v[0] // 256).astype(np.uint8)[None, :, None], 3, -1))


def test_fid_between_16bit_and_8bit_copies_is_zero(tmp_path, monkeypatch):
    import json

    from iddpm_eval import sources
    from test_stats_fid import FakeExtractor

    monkeypatch.setattr(sources, "make_extractor", lambda mode="legacy-tf", *a, **k: FakeExtractor())
    imgs = np.random.default_rng(6).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "a" / f"{i}.png")
        _write_png16(tmp_path / "b" / f"{i}.png", im.astype(np.uint16) * 257)
    r = _eval("fid", tmp_path / "a", tmp_path / "b", "--json", "--no-progress")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fid"] == 0.0 and out["a_fingerprint"] == out["b_fingerprint"]


# ----------------------------------------------------------------------------- unreadable and truncated files

@pytest.fixture
def honour_modes(monkeypatch):
    """Tests run as root, where chmod 000 does not stop reading: make os.scandir refuse folders
    without read permission, as the kernel does for everyone else."""
    real = os.scandir

    def scandir(path="."):
        if not os.stat(path).st_mode & stat.S_IRUSR:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _images_into(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)):
        Image.fromarray(im).save(folder / f"{i}.png")


@pytest.mark.parametrize("which", ["sub", "top"])
def test_unreadable_folder_is_refused_with_path_and_reason(tmp_path, honour_modes, which):
    root = tmp_path / "imgs"
    _images_into(root, 3, 0)
    _images_into(root / "sub", 3, 1)
    locked = root / "sub" if which == "sub" else root
    locked.chmod(0)
    try:
        with pytest.raises(D.DataError) as err:
            D.FolderSource(root)
        r = _eval("stats", root, "-o", tmp_path / "s.npz")
    finally:
        locked.chmod(0o755)
    assert str(locked) in str(err.value) and "Permission denied" in str(err.value)
    _cli_error(r, str(locked), "Permission denied", code=1)
    assert len(D.FolderSource(root)) == 6  # readable again: every image found


def test_truncated_image_is_refused_when_the_folder_is_opened(tmp_path):
    _images_into(tmp_path / "imgs", 4, 2)
    big = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "imgs" / "9_cut.png").write_bytes(raw[: len(raw) // 2])  # header intact, pixels cut
    with Image.open(tmp_path / "imgs" / "9_cut.png") as im:
        assert im.size == (8, 8)  # the header alone looks fine
    with pytest.raises(D.DataError, match="9_cut.png"):
        D.FolderSource(tmp_path / "imgs")
    assert len(D.FolderSource(tmp_path / "imgs", verify=False)) == 5  # headers only, on request


# ----------------------------------------------------------------------------- FID round-off

def test_fid_of_identical_sets_is_exactly_zero():
    from iddpm_eval.fid import clamp_round_off, fid_lowrank, frechet_distance, frechet_distance_eig
    from iddpm_eval.stats import stats_from_features

    feats = np.random.default_rng(0).random((50, 64))  # fewer images than dimensions: singular sqrtm
    mu, sigma = stats_from_features(feats)
    # the raw formula lands below zero by round-off here (about -3e-8, trace 5.3)
    from scipy import linalg

    raw = 2 * np.trace(sigma) - 2 * np.trace(np.real(linalg.sqrtm(sigma @ sigma)))
    assert raw < 0
    for value in (frechet_distance(mu, sigma, mu, sigma), frechet_distance_eig(mu, sigma, mu, sigma),
                  fid_lowrank(feats, feats)):
        assert value == 0.0
    other = np.random.default_rng(1).random((50, 64))
    assert frechet_distance(mu, sigma, *stats_from_features(other)) > 0.1
    assert clamp_round_off(-1.0, 10.0) == -1.0  # beyond round-off: shown as it is, not hidden
    assert clamp_round_off(-1e-5, 10.0) == 0.0 and clamp_round_off(2.5, 10.0) == 2.5


# ----------------------------------------------------------------------------- messages

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step digits run (8x8x1, channel_mult 1,2, attention at 4 px) with its checkpoint."""
    from iddpm_core.cli import train_main

    out = tmp_path_factory.mktemp("run") / "run"
    r = CliRunner().invoke(train_main, ["run", "--out", str(out), "--data", "digits", "--base-channels", "8",
                                        "--channel-mult", "1,2", "--num-heads", "1", "--diffusion-steps", "10",
                                        "--batch-size", "2", "--steps", "1", "--sample-interval", "0",
                                        "--sample-num", "2", "--sample-steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _train(*args):
    from iddpm_core.cli import train_main

    return CliRunner().invoke(train_main, ["run", *[str(a) for a in args]])


SMALL = ("--data", "digits", "--base-channels", "8", "--channel-mult", "1,2", "--num-heads", "1",
         "--diffusion-steps", "10", "--batch-size", "2", "--sample-interval", "0", "--sample-num", "2",
         "--sample-steps", "2", "--no-progress")


@pytest.mark.parametrize("flag,value", [("--channel-mult", "a,b"), ("--attention-resolutions", "16,x"),
                                        ("--ema-rates", "0.9,fast"), ("--num-classes", "ten")])
def test_bad_list_flag_is_named(tmp_path, flag, value):
    out = _cli_error(_train("--out", tmp_path / "r", flag, value, "--steps", "1"), flag, repr(value), code=2)
    assert "invalid literal" not in out
    assert not (tmp_path / "r").exists()


def test_resuming_with_other_model_flags_names_the_settings(tmp_path, run_dir):
    ckpt = run_dir / "checkpoints" / "latest.pt"
    # one level fewer: the stored attention at 4 px is no level of the given model; name the flag instead
    out = _cli_error(_train("--out", tmp_path / "r", "--resume", ckpt, "--channel-mult", "1", "--base-channels", "16",
                            "--steps", "2"),
                     "model.channel_mult (checkpoint [1, 2], given [1])", "model.base_channels (checkpoint 8, given 16)",
                     code=2)
    assert "attention resolution" not in out
    # flags equal to the stored values, and resumable ones, are accepted
    r = _train("--out", tmp_path / "r", "--resume", ckpt, "--channel-mult", "1,2", "--steps", "2", "--no-progress")
    assert r.exit_code == 0, r.output


def test_invalid_train_config_is_prefixed_once(tmp_path):
    out = _cli_error(_train("--out", tmp_path / "r", *SMALL, "--log-interval", "0"), "log_interval must be >= 1",
                     code=2)
    assert out.count("train config") <= 1, out
    (tmp_path / "c.json").write_text('{"train": {"batch_size": 0}}')
    out = _cli_error(_train("--out", tmp_path / "r2", "--config", tmp_path / "c.json"),
                     "c.json [train]: batch_size must be >= 1", code=2)
    assert "train config" not in out


def test_zero_steps_are_refused(tmp_path, run_dir):
    from iddpm_core.cli import sample_main

    _cli_error(_train("--out", tmp_path / "r", *SMALL, "--steps", "0"), "steps must be >= 1", code=2)
    assert not (tmp_path / "r" / "checkpoints").exists()
    r = CliRunner().invoke(sample_main, ["--checkpoint", str(run_dir / "checkpoints" / "latest.pt"), "--num", "2",
                                         "--steps", "0", "--out", str(tmp_path / "s"), "--no-progress"])
    _cli_error(r, "--steps", code=2)
    assert not (tmp_path / "s" / "samples.npz").exists()
    from iddpm_core.sample import respacing_for

    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        respacing_for(0, "ddpm", 10)
    assert respacing_for(None, "ddpm", 10) == ""


def test_weights_that_do_not_fit_the_config_give_one_line(tmp_path, run_dir):
    from iddpm_core.cli import sample_main

    ckpt = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    ckpt["model_config"]["base_channels"] = 16  # the stored weights are for 8
    bad_run = tmp_path / "bad"
    (bad_run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, bad_run / "checkpoints" / "latest.pt")
    bad = bad_run / "checkpoints" / "latest.pt"
    results = {"sample": CliRunner().invoke(sample_main, ["--checkpoint", str(bad), "--num", "2", "--out",
                                                          str(tmp_path / "s"), "--no-progress"]),
               "fid": _eval("fid", bad, "digits", "--num", "4"),
               "resume": _train("--out", bad_run, "--resume", "auto", "--steps", "2", "--no-progress")}
    for what, r in results.items():
        out = _cli_error(r, "latest.pt", "do not fit", "another shape")
        assert len([line for line in out.splitlines() if line.strip()]) <= 3, (what, out)


def test_truncated_image_stops_training_before_a_run_folder_exists(tmp_path):
    _images_into(tmp_path / "imgs", 5, 4)
    raw = (tmp_path / "imgs" / "4.png").read_bytes()
    (tmp_path / "imgs" / "4.png").write_bytes(raw[: len(raw) // 2])
    args = [a if a != "digits" else tmp_path / "imgs" for a in SMALL]
    _cli_error(_train("--out", tmp_path / "r", *args, "--steps", "3"), "4.png", code=2)
    assert not (tmp_path / "r").exists()


@pytest.fixture
def extractors(monkeypatch):
    """The cheap fake extractor; the list records every extractor made (made = feature work began)."""
    from iddpm_eval import sources
    from test_stats_fid import FakeExtractor

    made = []
    monkeypatch.setattr(sources, "make_extractor",
                        lambda mode="legacy-tf", *a, **k: made.append(FakeExtractor()) or made[-1])
    return made


def test_num_larger_than_a_source_names_it_before_any_feature_work(tmp_path, extractors):
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "big.npz", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "small.npz", rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    _cli_error(_eval("fid", tmp_path / "big.npz", tmp_path / "small.npz", "--num", "20"),
               "--num 20 is larger than the source", "small.npz (10 images)", code=1)
    assert extractors == []
    _cli_error(_eval("stats", tmp_path / "small.npz", "--num", "20", "-o", tmp_path / "s.npz"), "small.npz", code=1)


def test_recall_k_too_large_is_refused_before_any_feature_work(tmp_path, extractors):
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "real.npz", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "fake.npz", rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    _cli_error(_eval("recall", tmp_path / "real.npz", tmp_path / "fake.npz", "--k", "5"),
               "fake.npz", "--k 5", "more than 5 images", code=1)
    _cli_error(_eval("recall", tmp_path / "real.npz", tmp_path / "fake.npz", "--k", "3", "--num", "3"),
               "real.npz", "--k 3", code=1)
    assert extractors == []
    r = _eval("recall", tmp_path / "real.npz", tmp_path / "fake.npz", "--k", "4", "--no-progress")
    assert r.exit_code == 0, r.output


def test_stats_output_must_be_readable_back(tmp_path, extractors):
    np.savez(tmp_path / "imgs.npz", np.random.default_rng(10).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    _cli_error(_eval("stats", tmp_path / "imgs.npz", "-o", tmp_path / "ref"), "ref", ".npz", code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs.npz"] and extractors == []
    r = _eval("stats", tmp_path / "imgs.npz", "-o", tmp_path / "ref.npz", "--no-progress")
    assert r.exit_code == 0, r.output
    r = _eval("fid", tmp_path / "ref.npz", tmp_path / "imgs.npz", "--json")  # the file reads back
    assert r.exit_code == 0 and '"fid": 0.0' in r.output, r.output
