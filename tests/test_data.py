"""Tests for iddpm_core.data: every source on tiny files written here, bad inputs, model range."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from iddpm_core import data as D


def _write_idx(path, arr, gz=True):
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def _rand_images(n, h=5, w=7, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_folder_png_recursive_and_labels(tmp_path):
    imgs = _rand_images(5)
    (tmp_path / "sub").mkdir()
    names = ["0_a.png", "1_b.png", "sub/2_c.png", "sub/1_d.PNG", "0_e.png"]
    for img, name in zip(imgs, names):
        Image.fromarray(img).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = D.FolderSource(tmp_path, class_from_prefix=True)
    assert len(src) == 5 and src.shape == (5, 7, 3)
    order = sorted(range(5), key=lambda i: str(tmp_path / names[i]))
    x, y = src.batch(range(5))
    np.testing.assert_array_equal(x, imgs[order])  # png is lossless: exact bytes back
    assert y.tolist() == [int(names[i][names[i].rfind("/") + 1]) for i in order]
    # batches through iter_batches equal one batch
    got = np.concatenate([b for b, _ in src.iter_batches(2)])
    np.testing.assert_array_equal(got, x)


def test_folder_grayscale_and_text_prefix(tmp_path):
    imgs = _rand_images(3, c=1)
    for img, name in zip(imgs, ["cat_1.png", "dog_2.png", "cat_3.jpg"]):
        Image.fromarray(img[..., 0], mode="L").save(tmp_path / name)
    src = D.load_source(tmp_path, class_from_prefix=True)
    assert src.shape == (5, 7, 1)
    assert src.class_names == ["cat", "dog"]
    assert src.batch([0, 1, 2])[1].tolist() == [0, 0, 1]
    np.testing.assert_array_equal(src[0][0], imgs[0])


def test_folder_bad_inputs(tmp_path):
    with pytest.raises(D.DataError, match="no images"):
        D.FolderSource(tmp_path)
    Image.fromarray(_rand_images(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(_rand_images(1, h=9)[0]).save(tmp_path / "b.png")
    with pytest.raises(D.DataError, match="different sizes"):
        D.FolderSource(tmp_path)
    (tmp_path / "b.png").unlink()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(D.DataError, match="broken.png"):
        D.load_source(tmp_path)


def test_npz_source_streams_rows(tmp_path):
    imgs, labels = _rand_images(7), np.arange(7) % 3
    np.savez(tmp_path / "b.npz", imgs, labels)
    src = D.load_source(tmp_path / "b.npz")
    assert len(src) == 7 and src.has_labels and src.shape == (5, 7, 3)
    x, y = src.batch([2, 3, 4])
    np.testing.assert_array_equal(x, imgs[2:5])
    assert y.tolist() == labels[2:5].tolist()
    x, _ = src.batch([6, 0])
    np.testing.assert_array_equal(x, imgs[[6, 0]])
    np.testing.assert_array_equal(src[-1][0], imgs[-1])
    # compressed archives work too, and grayscale [N, H, W]
    np.savez_compressed(tmp_path / "c.npz", arr_0=imgs[..., 0])
    src = D.NpzSource(tmp_path / "c.npz")
    assert src.shape == (5, 7, 1) and not src.has_labels
    np.testing.assert_array_equal(np.concatenate([b for b, _ in src.iter_batches(3)])[..., 0], imgs[..., 0])


@pytest.mark.parametrize("arr,msg", [
    (np.zeros((2, 4, 4, 3), np.float32), "uint8"),
    (np.zeros((2, 4, 4, 2), np.uint8), "C 1 or 3"),
    (np.zeros((0, 4, 4, 3), np.uint8), "no images"),
])
def test_npz_bad_arrays(tmp_path, arr, msg):
    np.savez(tmp_path / "x.npz", arr_0=arr)
    with pytest.raises(D.DataError, match=msg):
        D.NpzSource(tmp_path / "x.npz")


def test_npz_corrupt_and_missing_key(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK not really")
    with pytest.raises(D.DataError, match="bad.npz"):
        D.load_source(tmp_path / "bad.npz")
    np.savez(tmp_path / "k.npz", images=_rand_images(2))
    with pytest.raises(D.DataError, match="arr_0"):
        D.load_source(tmp_path / "k.npz")
    with pytest.raises(D.DataError, match="no such file"):
        D.load_source(tmp_path / "missing.npz")


def test_fashion_mnist_idx_from_given_folder(tmp_path):
    tr, te = _rand_images(6, 28, 28, 1)[..., 0], _rand_images(4, 28, 28, 1, seed=1)[..., 0]
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz=False)  # plain (un-gzipped) also read
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 8, 7, 6]), gz=False)
    src = D.load_source("fashion-mnist:train", root=tmp_path)
    assert len(src) == 6 and src.shape == (28, 28, 1)
    np.testing.assert_array_equal(src.batch(range(6))[0][..., 0], tr)
    assert src.batch(range(6))[1].tolist() == list(range(6))
    test = D.load_source("fashion-mnist:test", root=tmp_path)
    np.testing.assert_array_equal(test.images[..., 0], te)
    assert test.labels.tolist() == [9, 8, 7, 6]


def test_idx_corrupt(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    _write_idx(p, np.zeros((3, 4, 4)), gz=False)
    p.write_bytes(p.read_bytes()[:-5])  # truncated
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte"):
        D.read_idx(p)
    p.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)  # float IDX
    with pytest.raises(D.DataError, match="unsigned byte"):
        D.read_idx(p)
    with pytest.raises(D.DataError, match="not found"):
        D.fashion_mnist("test", tmp_path)


def test_fashion_mnist_folder_from_environment(tmp_path, monkeypatch):
    # every command (train, fid, nll, sweep) opens `fashion-mnist:SPLIT` through load_source
    te = _rand_images(3, 28, 28, 1, seed=2)[..., 0]
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", te)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    src = D.load_source("fashion-mnist:test")
    np.testing.assert_array_equal(src.images[..., 0], te)
    with pytest.raises(D.DataError, match=str(tmp_path)):
        D.load_source("fashion-mnist:train")  # the train files are not in that folder


def test_fashion_mnist_debian_install():
    if not (D.FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    src = D.load_source("fashion-mnist:test")
    assert len(src) == 10000 and src.shape == (28, 28, 1)
    assert sorted(set(src.labels.tolist())) == list(range(10))


def test_digits_levels():
    from sklearn.datasets import load_digits

    src = D.load_source("digits")
    ref = load_digits()
    assert len(src) == 1797 and src.shape == (8, 8, 1)
    # 0 -> 0, 16 -> 255, monotone, and back to the original levels exactly
    np.testing.assert_array_equal(np.rint(src.images[..., 0].astype(np.float64) * 16 / 255), ref.images)
    assert src.images.max() == 255 and src.images.min() == 0
    np.testing.assert_array_equal(src.labels, ref.target)


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(3)
    all_imgs, all_labels = [], []
    for name, n in [(f"data_batch_{i}", 2 + i) for i in range(1, 6)] + [("test_batch", 3)]:
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(tmp_path / name, "wb") as fh:
            pickle.dump({b"data": chw.reshape(n, -1), b"labels": labels}, fh)
        if name != "test_batch":
            all_imgs.append(chw.transpose(0, 2, 3, 1))
            all_labels += labels
    src = D.load_source(f"cifar10:train:{tmp_path}")
    assert len(src) == sum(2 + i for i in range(1, 6))
    x, y = src.batch(range(len(src)))
    np.testing.assert_array_equal(x, np.concatenate(all_imgs))
    assert y.tolist() == all_labels
    assert len(D.Cifar10Source(tmp_path, "test")) == 3
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.Cifar10Source(tmp_path, "train")
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(D.DataError, match="missing"):
        D.Cifar10Source(tmp_path, "train")


def test_unknown_spec(tmp_path):
    with pytest.raises(D.DataError, match="not a known dataset"):
        D.load_source("imagenet")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(D.DataError, match="not a folder"):
        D.load_source(tmp_path / "x.txt")


def test_model_range_and_flip():
    imgs = np.array([[[[0], [255]], [[128], [64]]]], np.uint8)  # 1x2x2x1
    x = D.to_model_range(imgs)
    assert x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x.numpy().ravel(), np.array([0, 255, 128, 64]) / 127.5 - 1, atol=1e-7)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    np.testing.assert_array_equal(D.from_model_range(x), imgs)  # round trip exact
    # round vs truncate differ on 0.5 bins
    y = torch.full((1, 1, 1, 1), 2 * 100.6 / 255 - 1)
    assert D.from_model_range(y, "round").item() == 101 and D.from_model_range(y, "truncate").item() == 100
    ds = D.TorchImageDataset(D.ArraySource(imgs), flip=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        t, label = ds[0]
        seen.add(tuple(t.ravel().tolist()))
        assert label.item() == -1
    flipped = tuple(x.flip(-1).ravel().tolist())
    assert seen == {tuple(x.ravel().tolist()), flipped}


def test_dataloader_over_npz(tmp_path):
    imgs = _rand_images(10, 4, 4, 3)
    np.savez(tmp_path / "b.npz", imgs)
    dl = torch.utils.data.DataLoader(D.TorchImageDataset(D.NpzSource(tmp_path / "b.npz")), batch_size=4)
    x = torch.cat([b for b, _ in dl])
    torch.testing.assert_close(x, D.to_model_range(imgs))
