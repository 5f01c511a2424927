"""Tests for tandem.data: datasets, splits, file formats, augmentation and the batch loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import tandem.data.image_folder as image_folder
import tandem.data.registry as registry
from tandem.data import (
    Augment,
    BatchLoader,
    DataSplits,
    ImageSet,
    SourceData,
    augment_batch,
    channel_stats,
    dataset_options,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
)
from tandem.data.cifar_pickle import CIFAR10_CLASSES, load_pickle
from tandem.data.idx import read_idx
from tandem.errors import DataError

# CI clones the repository next to shared/, so the real data sets live at <repo>/../shared/data.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_ZIP = SHARED / "cifar-10-jpg" / "cifar-10-jpg.zip"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own decoded-image cache (never the user's ~/.cache)."""
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))


def image_ids(s: ImageSet) -> list[int]:
    """Decode the ids written by the ``_indexed`` test dataset (pixel 0 + 256 * pixel 1)."""
    flat = s.images.reshape(len(s), -1).to(torch.int64)
    return (flat[:, 0] + 256 * flat[:, 1]).tolist()


def _indexed_source(root=None, *, n: int = 1000) -> SourceData:
    """Test dataset: each image encodes its index; unequal class sizes; test images have ids >= 50000."""
    ids = torch.arange(n)
    labels = torch.tensor([(i * i + i // 3) % 5 for i in range(n)])

    def make(idx):
        img = torch.zeros(len(idx), 1, 2, 2, dtype=torch.uint8)
        img[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
        img[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
        return img

    test_ids = 50000 + torch.arange(100)
    return SourceData(
        train=ImageSet(make(ids), labels),
        test=ImageSet(make(test_ids), torch.arange(100) % 5),
        num_classes=5,
    )


@pytest.fixture
def indexed():
    """Register the ``_indexed`` test dataset for one test only (other tests list the registry)."""
    register_dataset("_indexed")(_indexed_source)
    yield "_indexed"
    registry.DATASETS.unregister("_indexed")


# --- registry ------------------------------------------------------------------------------------


def test_registry_lists_datasets_and_rejects_unknown_names_and_options():
    names = list_datasets()
    for expected in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "image-folder",
                     "tiny-imagenet", "synthetic"):  # fmt: skip
        assert expected in names
    with pytest.raises(DataError, match="unknown dataset 'nope'.*digits"):
        load_dataset("nope")
    with pytest.raises(DataError, match=r"unknown option\(s\) bogus; allowed options: .*train_size"):
        load_dataset("synthetic", bogus=1)
    with pytest.raises(DataError, match="allowed options: none"):
        load_dataset("digits", image_size=4)
    with pytest.raises(DataError, match="mnist: needs a root"):
        load_dataset("mnist")
    assert dataset_options("synthetic")["train_size"] == 512
    assert load_dataset("SYNTHETIC", train_size=20, test_size=5).name == "synthetic"  # names are normalised


def test_bad_val_fraction_is_a_data_error():
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(DataError, match="val_fraction"):
            load_dataset("digits", val_fraction=bad)


# --- digits and splits ---------------------------------------------------------------------------


def test_digits_shapes_classes_and_stats():
    s = load_dataset("digits")
    assert isinstance(s, DataSplits) and s.name == "digits"
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert abs(len(s.test) - 0.2 * 1797) < 10
    assert abs(len(s.val) - 0.1 * (1797 - len(s.test))) < 10
    for split in (s.train, s.val, s.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 8, 8) and split.images.is_contiguous()
        assert set(split.labels.tolist()) == set(range(10))
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (8, 8))
    assert int(s.train.images.max()) == 255 and int(s.train.images.min()) == 0
    x = s.train.images.double() / 255
    assert s.mean[0] == pytest.approx(float(x.mean()), abs=1e-5)
    assert s.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-5)
    assert s.augment == Augment()
    assert s.class_names == [str(i) for i in range(10)]


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    s = load_dataset("digits", val_fraction=0)
    got = torch.cat([s.train.images, s.test.images])[:, 0].numpy()
    # the same multiset of images, label for label
    key = lambda imgs, labels: sorted(zip(map(bytes, imgs.reshape(len(imgs), -1)), labels.tolist()))  # noqa: E731
    assert key(got, torch.cat([s.train.labels, s.test.labels])) == key(expected, bunch.target)


def test_val_split_is_held_out_stratified_and_seeded(indexed):
    a = load_dataset(indexed, seed=0)
    b = load_dataset(indexed, seed=0)
    c = load_dataset(indexed, seed=1)
    train, val = set(image_ids(a.train)), set(image_ids(a.val))
    assert not train & val and train | val == set(range(1000))
    labels = torch.tensor([(i * i + i // 3) % 5 for i in range(1000)])
    for cls in range(5):
        n_cls = int((labels == cls).sum())
        assert int((a.val.labels == cls).sum()) == int(np.floor(0.1 * n_cls + 0.5))
    assert image_ids(a.val) == image_ids(b.val)
    assert image_ids(a.val) != image_ids(c.val)
    assert image_ids(a.test) == image_ids(c.test) == list(range(50000, 50100))
    # labels travel with their images
    for s in (a.train, a.val):
        assert [(i * i + i // 3) % 5 for i in image_ids(s)] == s.labels.tolist()
    empty = load_dataset(indexed, val_fraction=0)
    assert len(empty.val) == 0 and empty.val.images.shape == (0, 1, 2, 2) and len(empty.train) == 1000


def test_digits_test_split_does_not_depend_on_seed_or_val_fraction():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=7, val_fraction=0.3)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.labels, b.val.labels[: len(a.val)])


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=0, max_size=200),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_partitions_each_class(labels, fraction, seed):
    t = torch.tensor(labels, dtype=torch.int64)
    keep, held = stratified_split(t, fraction, seed)
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    assert keep.tolist() == sorted(keep.tolist()) and held.tolist() == sorted(held.tolist())
    for cls in set(labels):
        n = labels.count(cls)
        assert int((t[held] == cls).sum()) == min(n, int(np.floor(fraction * n + 0.5)))
    assert torch.equal(stratified_split(t, fraction, seed)[1], held)


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(x)
    ref = x.double() / 255
    assert mean == pytest.approx(ref.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(ref.permute(1, 0, 2, 3).reshape(3, -1).std(1, unbiased=False).tolist(), abs=1e-6)


# --- IDX / MNIST ---------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(folder: Path, n_train=40, n_test=20, gz=(True, False, True, False)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }
    write_idx(folder / "train-images-idx3-ubyte", data["train_x"], gz=gz[0])
    write_idx(folder / "train-labels-idx1-ubyte", data["train_y"], gz=gz[1])
    write_idx(folder / "t10k-images-idx3-ubyte", data["test_x"], gz=gz[2])
    write_idx(folder / "t10k-labels-idx1-ubyte", data["test_y"], gz=gz[3])
    return data


def test_mnist_from_idx_files_plain_and_gz(tmp_path):
    data = write_mnist(tmp_path / "m")
    s = load_dataset("mnist", tmp_path / "m", val_fraction=0.25)
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(data["test_x"]))
    assert s.test.labels.tolist() == data["test_y"].tolist()
    assert (len(s.train), len(s.val)) == (30, 10)
    # train + val together are exactly the training file, with their labels
    got = {bytes(img.numpy()): int(y) for img, y in zip(torch.cat([s.train.images, s.val.images]),
                                                       torch.cat([s.train.labels, s.val.labels]))}  # fmt: skip
    want = {bytes(img[None]): int(y) for img, y in zip(data["train_x"], data["train_y"])}
    assert got == want
    assert (s.mean, s.std, s.in_channels, s.image_size) == ((0.1307,), (0.3081,), 1, (28, 28))
    f = load_dataset("fashion-mnist", tmp_path / "m")
    assert (f.mean, f.std) == ((0.2860,), (0.3530,)) and f.class_names[9] == "Ankle boot"


def test_mnist_torchvision_raw_layout(tmp_path):
    write_mnist(tmp_path / "root" / "MNIST" / "raw")
    assert len(load_dataset("mnist", tmp_path / "root").test) == 20


def test_read_idx_multibyte_big_endian(tmp_path):
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "x.idx", arr, code=0x0C))
    assert got.dtype == np.int32 and np.array_equal(got, arr)
    f = np.array([0.5, -1.25], dtype=np.float32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "f.idx", f, code=0x0D, gz=True)), f)


def test_mnist_missing_file_names_file_and_folder(tmp_path):
    write_mnist(tmp_path / "m")
    os.remove(tmp_path / "m" / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path / "m")
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in msg and str(tmp_path / "m") in msg and "not found" in msg


def test_mnist_truncated_gz_names_file(tmp_path):
    write_mnist(tmp_path / "m")
    path = tmp_path / "m" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*(corrupt|truncated)"):
        load_dataset("mnist", tmp_path / "m")


def test_mnist_bad_magic_and_bad_lengths_name_file(tmp_path):
    write_mnist(tmp_path / "m")
    path = tmp_path / "m" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 1  # claims 1 dimension: magic 0x00000801, a labels file
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz has magic number 0x00000801, expected 0x00000803"):
        load_dataset("mnist", tmp_path / "m")
    raw[:4] = b"\x12\x34\x08\x03"
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz has a bad IDX magic number"):
        load_dataset("mnist", tmp_path / "m")
    raw[:4] = b"\x00\x00\x08\x03"
    path.write_bytes(gzip.compress(bytes(raw[:-5])))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz header says shape \(20, 28, 28\)"):
        load_dataset("mnist", tmp_path / "m")
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(DataError, match="20 images but .*19 labels"):
        load_dataset("mnist", tmp_path / "m")


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/data/mnist not present")
@pytest.mark.parametrize("name,folder,mean", [("mnist", "mnist", 0.1307), ("fashion-mnist", "fashion-mnist", 0.2860)])
def test_real_mnist_and_fashion_mnist(name, folder, mean):
    s = load_dataset(name, SHARED / folder)
    assert (len(s.train) + len(s.val), len(s.test)) == (60000, 10000)
    assert len(s.val) == 6000 and s.image_size == (28, 28)
    full = torch.cat([s.train.images, s.val.images])
    assert float(full.double().mean() / 255) == pytest.approx(mean, abs=5e-4)
    counts = torch.bincount(torch.cat([s.train.labels, s.val.labels]), minlength=10)
    assert int(counts.sum()) == 60000 and int(counts.min()) > 5000
    if name == "fashion-mnist":
        assert counts.tolist() == [6000] * 10
        assert torch.bincount(s.test.labels).tolist() == [1000] * 10


# --- CIFAR pickles -------------------------------------------------------------------------------


def write_cifar10(parent: Path, per_batch=12, n_test=10) -> dict:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {"train_x": [], "train_y": []}
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / f"data_batch_{i}").write_bytes(
            pickle.dumps({b"batch_label": b"x", b"labels": y, b"data": x, b"filenames": [b"a"] * per_batch}, protocol=2)
        )
        out["train_x"].append(x)
        out["train_y"] += y
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [i % 10 for i in range(n_test)]
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": ty, b"data": tx}, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10_CLASSES]}, protocol=2))
    out.update(train_x=np.concatenate(out["train_x"]), test_x=tx, test_y=ty)
    return out


def test_cifar10_pickle_folder(tmp_path):
    data = write_cifar10(tmp_path)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        s = load_dataset("cifar10", root, val_fraction=0)
        assert torch.equal(s.train.images, torch.from_numpy(data["train_x"].reshape(-1, 3, 32, 32)))
        assert s.train.labels.tolist() == data["train_y"]
        assert torch.equal(s.test.images.reshape(-1, 3072), torch.from_numpy(data["test_x"]))
        assert s.test.labels.tolist() == data["test_y"]
    assert s.class_names == CIFAR10_CLASSES and s.num_classes == 10
    assert s.mean == (0.4914, 0.4822, 0.4465) and s.std == (0.2470, 0.2435, 0.2616)
    assert s.augment == Augment(crop_padding=4, hflip=True)
    # a red-channel-only image stays red after the reshape to C x H x W
    assert s.train.images[0, 0].flatten().tolist() == data["train_x"][0, :1024].tolist()


def test_cifar100_pickle_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (30, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, 30)]
    coarse = [v // 5 for v in fine]
    for name, proto in (("train", 4), ("test", 5)):  # numpy 2 pickles, str keys
        (folder / name).write_bytes(pickle.dumps({"data": x, "fine_labels": fine, "coarse_labels": coarse}, protocol=proto))
    s = load_dataset("cifar100", tmp_path, val_fraction=0)
    assert s.num_classes == 100 and s.train.labels.tolist() == fine and len(s.class_names) == 100
    assert torch.equal(s.test.images.reshape(-1, 3072), torch.from_numpy(x))
    assert s.mean == (0.5071, 0.4865, 0.4409) and s.std == (0.2673, 0.2564, 0.2762)
    c = load_dataset("cifar100", folder, val_fraction=0, label_type="coarse")
    assert c.num_classes == 20 and c.train.labels.tolist() == coarse


class _Evil:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [1]}, protocol=2))
    with pytest.raises(DataError, match=r"refused to load .*data_batch_3.*(posix|os)\.system"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cbuiltins\neval\n(V__import__('os').getcwd()\ntR.")
    with pytest.raises(DataError, match=r"evil\.pkl.*builtins\.eval"):
        load_pickle(evil)
    # a real numpy array still loads
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"a": np.arange(5, dtype=np.uint8)}, protocol=2))
    assert load_pickle(ok)["a"].tolist() == [0, 1, 2, 3, 4]


def test_cifar_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match=r"expected data_batch_1 in .* or .*cifar-10-batches-py \(not found\)"):
        load_dataset("cifar10", tmp_path)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"expected data_batch_4 in .*cifar-10-batches-py \(not found\)"):
        load_dataset("cifar10", tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match=r"data_batch_2 is not a valid pickle"):
        load_pickle(batch)


# --- image folders -------------------------------------------------------------------------------


def color_for(cls_idx: int, k: int) -> tuple[int, int, int]:
    return (40 * cls_idx + 10, 7 * k + 3, 200 - 20 * cls_idx)


def write_image_tree(base: Path, splits=("train", "test"), classes=("dog", "ant", "cat"), per_class=3, size=(6, 5)):
    """PNG images (lossless) whose colour encodes (class, index); returns the expected arrays per split."""
    expected = {}
    for split in splits:
        imgs, labels = [], []
        for name in sorted(classes):
            folder = base / split / name if split else base / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                arr = np.zeros((size[1], size[0], 3), np.uint8)
                arr[:] = color_for(sorted(classes).index(name), k)
                arr[0, 0] = (k, 255, 0)  # a marker pixel: orientation is checked too
                Image.fromarray(arr).save(folder / f"{k:04d}.png")
                imgs.append(arr.transpose(2, 0, 1))
                labels.append(sorted(classes).index(name))
        expected[split] = (np.stack(imgs), labels)
    return expected


def zip_tree(src: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as z:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                z.write(path, prefix + path.relative_to(src).as_posix())
    return dest


def test_image_folder_train_test_layout_plain_and_zip(tmp_path):
    expected = write_image_tree(tmp_path / "tree")
    from_dir = load_dataset("image-folder", tmp_path / "tree", val_fraction=0)
    from_zip = load_dataset("image-folder", zip_tree(tmp_path / "tree", tmp_path / "t.zip", "wrapper/"), val_fraction=0)
    for s in (from_dir, from_zip):
        assert s.class_names == ["ant", "cat", "dog"]
        assert torch.equal(s.train.images, torch.from_numpy(expected["train"][0]))
        assert s.train.labels.tolist() == expected["train"][1]
        assert torch.equal(s.test.images, torch.from_numpy(expected["test"][0]))
        assert s.image_size == (5, 6) and s.in_channels == 3
        assert s.augment == Augment(crop_padding=0, hflip=True)
    gray = load_dataset("image-folder", tmp_path / "tree", channels=1, image_size=[10, 12], val_fraction=0)
    assert gray.train.images.shape == (9, 1, 10, 12) and gray.augment.crop_padding == 1


def test_image_folder_class_folders_with_held_out_test(tmp_path):
    write_image_tree(tmp_path / "flat", splits=("",), per_class=8)
    a = load_dataset("image-folder", tmp_path / "flat", seed=0, test_fraction=0.25)
    b = load_dataset("image-folder", tmp_path / "flat", seed=5, test_fraction=0.25)
    assert len(a.test) == 6 and torch.bincount(a.test.labels).tolist() == [2, 2, 2]
    assert torch.equal(a.test.images, b.test.images)
    assert len(a.train) + len(a.val) == 18
    assert len(load_dataset("image-folder", tmp_path / "flat").test) == 6  # default test_fraction 0.2 -> 2 of 8
    with pytest.raises(DataError, match="test_fraction"):
        load_dataset("image-folder", tmp_path / "flat", test_fraction=1.5)
    limited = load_dataset("image-folder", tmp_path / "flat", limit_per_class=4, test_fraction=0, val_fraction=0)
    assert torch.bincount(limited.train.labels).tolist() == [4, 4, 4]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("image-folder", tmp_path / "missing")
    write_image_tree(tmp_path / "t", per_class=2)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "t" / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"big\.png is 9x9 .*image_size"):
        load_dataset("image-folder", tmp_path / "t", cache=False)
    assert load_dataset("image-folder", tmp_path / "t", image_size=4, cache=False).image_size == (4, 4)
    (tmp_path / "t" / "train" / "cat" / "big.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot decode image .*big\.png"):
        load_dataset("image-folder", tmp_path / "t", cache=False)
    (tmp_path / "t" / "train" / "cat" / "big.png").unlink()
    (tmp_path / "t" / "test" / "emu").mkdir()
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "t" / "test" / "emu" / "0.png")
    with pytest.raises(DataError, match="test/ has class folders not in train/: emu"):
        load_dataset("image-folder", tmp_path / "t", cache=False)


def test_image_folder_cache_hit_corruption_and_invalidation(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "t")
    first = load_dataset("image-folder", tmp_path / "t", val_fraction=0)
    entries = list((tmp_path / "cache" / "decoded").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    assert not list(entries[0].glob("*.tmp"))
    assert not list(entries[0].glob(".*"))   # no temporary file left beside the entry

    real_decode = image_folder.decode_images
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(image_folder, "decode_images", counting_decode)
    second = load_dataset("image-folder", tmp_path / "t", val_fraction=0)
    assert calls == [] and torch.equal(first.train.images, second.train.images)
    assert second.class_names == first.class_names

    npy = entries[0] / "train_images.npy"
    npy.write_bytes(npy.read_bytes()[:100])  # corrupt cache entry -> rebuilt
    third = load_dataset("image-folder", tmp_path / "t", val_fraction=0)
    assert len(calls) == 2 and torch.equal(first.train.images, third.train.images)
    assert np.load(npy).shape == tuple(first.train.images.shape)

    # a changed image changes the key (size/mtime), so it is decoded again
    Image.fromarray(np.full((5, 6, 3), 77, np.uint8)).save(tmp_path / "t" / "train" / "ant" / "0000.png")
    os.utime(tmp_path / "t" / "train" / "ant" / "0000.png", ns=(1, 1))
    fourth = load_dataset("image-folder", tmp_path / "t", val_fraction=0)
    assert len(calls) == 4 and int(fourth.train.images[0, 0, 0, 0]) == 77
    load_dataset("image-folder", tmp_path / "t", val_fraction=0, cache=False)
    assert len(calls) == 6


def test_parallel_decoding_from_zip_matches_serial(tmp_path):
    root = tmp_path / "many"
    rng = np.random.default_rng(3)
    for i in range(600):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    source = image_folder.FileSource(zip_tree(root, tmp_path / "many.zip"), "test")
    members = source.image_files()
    serial = image_folder.decode_images(source, members, workers=1)
    # the parent's zip handle is open: workers must not share its file offset
    parallel = image_folder.decode_images(source, members, workers=2)
    assert serial.shape == (600, 4, 4, 3) and np.array_equal(serial, parallel)
    direct = np.asarray(Image.open(root / "c1" / "0001.png"))
    assert np.array_equal(serial[members.index("c1/0001.png")], direct)


@pytest.fixture(scope="session")
def cifar_jpg_subset(tmp_path_factory):
    if not CIFAR_ZIP.is_file():
        pytest.skip("../shared/data/cifar-10-jpg not present")
    mp = pytest.MonkeyPatch()
    mp.setenv("TANDEM_CACHE", str(tmp_path_factory.mktemp("cifar-cache")))
    try:
        return load_dataset("image-folder", CIFAR_ZIP, limit_per_class=20, val_fraction=0.1)
    finally:
        mp.undo()


def test_real_cifar10_jpg_zip_subset(cifar_jpg_subset):
    s = cifar_jpg_subset
    assert s.class_names == CIFAR10_CLASSES
    assert (len(s.train) + len(s.val), len(s.test)) == (200, 200) and len(s.val) == 20
    assert s.image_size == (32, 32) and s.in_channels == 3 and s.augment == Augment(4, True)
    assert torch.bincount(s.test.labels).tolist() == [20] * 10
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        first_test = np.asarray(Image.open(io.BytesIO(z.read("cifar-10-jpg/test/airplane/0000.jpg"))).convert("RGB"))
    assert np.array_equal(s.test.images[0].permute(1, 2, 0).numpy(), first_test)
    assert all(0.3 < m < 0.65 for m in s.mean)


# --- tiny-imagenet -------------------------------------------------------------------------------


def write_tiny(base: Path, wnids=("n02", "n01", "n03"), per_class=2, n_val=5) -> dict:
    root = base / "tiny-imagenet-200"
    rng = np.random.default_rng(4)
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "train" / w / "images" / f"{w}_{k}.JPEG", "JPEG")
    lines, val_labels = [], []
    for i in range(n_val):
        w = wnids[i % len(wnids)]
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG", "JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t7\t7")
        val_labels.append(sorted(wnids).index(w))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "images" / "test_0.JPEG", "JPEG")
    return {"root": root, "val_labels": val_labels}


def test_tiny_imagenet_folder_and_zip(tmp_path):
    info = write_tiny(tmp_path)
    s = load_dataset("tiny-imagenet", tmp_path, val_fraction=0)
    assert s.class_names == ["n01", "n02", "n03"] and s.num_classes == 3
    assert s.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.test.labels.tolist() == info["val_labels"] and s.image_size == (8, 8)
    direct = np.asarray(Image.open(info["root"] / "val" / "images" / "val_0.JPEG").convert("RGB"))
    assert np.array_equal(s.test.images[0].permute(1, 2, 0).numpy(), direct)  # grayscale val image -> RGB
    z = load_dataset("tiny-imagenet", zip_tree(tmp_path, tmp_path.parent / "tiny.zip"), val_fraction=0)
    assert torch.equal(z.train.images, s.train.images) and torch.equal(z.test.labels, s.test.labels)
    assert load_dataset("tiny-imagenet", info["root"], val_fraction=0, limit_per_class=1).train.labels.tolist() == [0, 1, 2]


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match=r"expected wnids\.txt in .*tiny-imagenet-200 \(not found\)"):
        load_dataset("tiny-imagenet", tmp_path)
    info = write_tiny(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(info["root"] / "val" / "images" / "extra.JPEG", "JPEG")
    with pytest.raises(DataError, match=r"extra\.JPEG has no line in .*val_annotations\.txt"):
        load_dataset("tiny-imagenet", tmp_path)
    (info["root"] / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match=r"expected .*val_annotations\.txt in"):
        load_dataset("tiny-imagenet", tmp_path)


def test_tiny_imagenet_val_images_of_another_size_need_image_size(tmp_path):
    info = write_tiny(tmp_path, n_val=3)
    for f in (info["root"] / "val" / "images").iterdir():
        Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(f, "JPEG")
    with pytest.raises(DataError, match=r"val images are 7x6 but train images are 8x8; pass image_size"):
        load_dataset("tiny-imagenet", tmp_path, cache=False)
    assert load_dataset("tiny-imagenet", tmp_path, image_size=8, cache=False).test.shape == (3, 8, 8)


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable():
    a = load_dataset("synthetic", val_fraction=0)
    b = load_dataset("synthetic", val_fraction=0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape == (512, 3, 32, 32) and a.test.images.shape == (128, 3, 32, 32)
    assert torch.bincount(a.train.labels).tolist() == [52] * 2 + [51] * 8
    small = load_dataset("synthetic", num_classes=4, channels=1, image_size=[6, 8], train_size=40, test_size=8)
    assert small.train.images.shape[1:] == (1, 6, 8) and small.num_classes == 4
    # nearest class mean (on images centred per image: brightness varies) already separates the classes
    def centred(s):
        x = s.images.float().flatten(1)
        return x - x.mean(1, keepdim=True)

    x = centred(a.train)
    means = torch.stack([x[a.train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(centred(a.test), means).argmin(1)
    assert (pred == a.test.labels).float().mean() > 0.95


# --- augmentation --------------------------------------------------------------------------------


def test_augment_noop_when_empty():
    x = torch.rand(4, 3, 5, 5)
    assert augment_batch(x, Augment(), torch.Generator()) is x
    assert augment_batch(x, None) is x
    with pytest.raises(ValueError):
        Augment(crop_padding=-1)


def test_random_crop_matches_manual_crop():
    n, p = 32, 2
    x = torch.rand(n, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, Augment(crop_padding=p), torch.Generator().manual_seed(123))
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=torch.Generator().manual_seed(123))
    padded = F.pad(x, (p, p, p, p))
    for i in range(n):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        assert torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 6])
    assert len(set(offsets[0].tolist())) > 1 and len(set(offsets[1].tolist())) > 1


def test_random_crop_shifts_content():
    # One bright pixel per image: it must move by (p - dy, p - dx) and stay the only bright pixel.
    n, p, h, w = 200, 3, 9, 9
    x = torch.zeros(n, 1, h, w)
    x[:, 0, 4, 4] = 1.0
    out = augment_batch(x, Augment(crop_padding=p), torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(n):
        pos = torch.nonzero(out[i, 0])
        assert len(pos) == 1
        shifts.add((int(pos[0, 0]) - 4, int(pos[0, 1]) - 4))
    assert shifts == {(a, b) for a in range(-p, p + 1) for b in range(-p, p + 1)}
    assert out.sum() == n  # padding is zeros


def test_hflip_flips_about_half():
    x = torch.rand(400, 2, 3, 4)
    out = augment_batch(x, Augment(hflip=True), torch.Generator().manual_seed(5))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped | same).all()) and 150 < int(flipped.sum()) < 250
    expected = torch.rand(400, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(flipped, expected)


def test_crop_and_flip_together():
    n, p = 16, 1
    x = torch.rand(n, 3, 4, 4)
    out = augment_batch(x, Augment(crop_padding=p, hflip=True), torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    offsets = torch.randint(0, 2 * p + 1, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    padded = F.pad(x, (p, p, p, p))
    for i in range(n):
        dy, dx = int(offsets[0, i]), int(offsets[1, i])
        crop = padded[i, :, dy : dy + 4, dx : dx + 4]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


# --- BatchLoader ---------------------------------------------------------------------------------


def toy_set(n: int) -> ImageSet:
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(n, 3, 4, 4)
    return ImageSet(images, torch.arange(n) % 3)


def test_loader_normalises_in_order():
    s = load_dataset("digits")
    loader = BatchLoader(s.train, 100, mean=s.mean, std=s.std)
    assert len(loader) == -(-len(s.train) // 100)
    xs, ys = zip(*list(loader))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    ref = (s.train.images.float() / 255 - s.mean[0]) / s.std[0]
    assert torch.allclose(x, ref, atol=1e-5) and torch.equal(y, s.train.labels)
    assert xs[-1].shape[0] == len(s.train) % 100 or len(s.train) % 100 == 0
    per_channel = BatchLoader(toy_set(5), 5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 1.0))
    (xb, _), = list(per_channel)
    ref = (toy_set(5).images.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(xb, ref, atol=1e-5)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_loader_epochs_are_reproducible_and_differ():
    data = toy_set(50)
    aug = Augment(crop_padding=1, hflip=True)
    make = lambda seed=0: BatchLoader(data, 8, shuffle=True, augment=aug, mean=(0.5,) * 3, std=(0.5,) * 3, seed=seed)  # noqa: E731
    a, b = make(), make()
    xa, ya = _epoch(a, 3)
    _epoch(b, 0), _epoch(b, 1)  # b has run other epochs before: must not matter
    xb, yb = _epoch(b, 3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x_again, _ = _epoch(a, 3)
    assert torch.equal(xa, x_again)
    a.set_epoch(3)
    resumed = torch.cat([x for x, _ in a.batches(start=4)])  # resume inside the epoch
    assert torch.equal(resumed, xa[4 * 8 :])
    x4, _ = _epoch(a, 4)
    assert not torch.equal(a.epoch_indices(3), a.epoch_indices(4)) and not torch.equal(xa, x4)
    assert not torch.equal(make(seed=1).epoch_indices(3), a.epoch_indices(3))
    assert sorted(a.epoch_indices(3).tolist()) == list(range(50))
    # the same permutation without augmentation: labels identical, pixels not
    plain = BatchLoader(data, 8, shuffle=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    xp, yp = _epoch(plain, 3)
    assert torch.equal(yp, ya) and not torch.equal(xp, xa)
    assert torch.equal(yp, data.labels[a.epoch_indices(3)])


def test_loader_shards_are_disjoint_equal_and_cover():
    data = toy_set(10)
    shards = [BatchLoader(data, 3, shuffle=True, mean=(0,) * 3, std=(1,) * 3, rank=r, world_size=2, seed=4) for r in range(2)]
    idx = [s.epoch_indices(2) for s in shards]
    assert len(idx[0]) == len(idx[1]) == 5 and len(shards[0]) == 2
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    assert sorted(idx[0].tolist() + idx[1].tolist()) == list(range(10))
    # odd size: padded by wrapping, as DistributedSampler does
    odd = [BatchLoader(toy_set(11), 4, shuffle=True, mean=(0,) * 3, std=(1,) * 3, rank=r, world_size=2) for r in range(2)]
    idx = [s.epoch_indices(0) for s in odd]
    assert len(idx[0]) == len(idx[1]) == 6
    assert set(idx[0].tolist()) | set(idx[1].tolist()) == set(range(11))
    assert len(set(idx[0].tolist()) & set(idx[1].tolist())) == 1
    dropped = [BatchLoader(toy_set(11), 4, mean=(0,) * 3, std=(1,) * 3, rank=r, world_size=2, drop_last=True) for r in range(2)]
    idx = [s.epoch_indices(0) for s in dropped]
    assert len(idx[0]) == len(idx[1]) == 5 and not set(idx[0].tolist()) & set(idx[1].tolist())
    ys = torch.cat([y for _, y in odd[1]])
    assert torch.equal(ys, toy_set(11).labels[odd[1].epoch_indices(0)])


def test_loader_drop_last_and_empty_set():
    data = toy_set(10)
    keep = BatchLoader(data, 4, mean=(0,) * 3, std=(1,) * 3)
    drop = BatchLoader(data, 4, mean=(0,) * 3, std=(1,) * 3, drop_last=True)
    assert [len(y) for _, y in keep] == [4, 4, 2] and len(keep) == 3
    assert [len(y) for _, y in drop] == [4, 4] and len(drop) == 2
    empty = BatchLoader(ImageSet.empty(3, 4, 4), 4, mean=(0,) * 3, std=(1,) * 3)
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        BatchLoader(data, 4, mean=(0.5,), std=(0.5,))


def test_train_and_test_limits_keep_a_fixed_stratified_subset(tmp_path, capsys):
    full = load_dataset("digits", val_fraction=0.1, seed=0)
    a = load_dataset("digits", val_fraction=0.1, seed=0, train_limit=500, test_limit=100)
    b = load_dataset("digits", val_fraction=0.1, seed=3, train_limit=500, test_limit=100)
    assert abs(len(a.train) + len(a.val) - 500) <= 10 and abs(len(a.test) - 100) <= 10
    assert len(a.test) < len(full.test) and len(a.train) < len(full.train)
    # the same subset for every seed (only the validation split moves)
    assert torch.equal(torch.sort(torch.cat([a.train.labels, a.val.labels])).values,
                       torch.sort(torch.cat([b.train.labels, b.val.labels])).values)
    assert torch.equal(a.test.images, b.test.images)
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 8                                        # stratified: every class present
    # a run records the limits, and `tandem eval` re-creates the same test subset
    from tandem.cli import main
    out = tmp_path / "run"
    assert main(["run", "method=baseline", "train.epochs=1", "dataset.test_limit=100", "train.progress=false",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"on {len(a.test)} images" in capsys.readouterr().out


def test_fashion_mnist_augmentation_options_and_mnist_has_no_flip(tmp_path):
    write_mnist(tmp_path / "m")
    assert not load_dataset("fashion-mnist", tmp_path / "m").augment.active   # default: none
    f = load_dataset("fashion-mnist", tmp_path / "m", crop_padding=2, hflip=True)
    assert f.augment == Augment(crop_padding=2, hflip=True)
    assert load_dataset("mnist", tmp_path / "m", crop_padding=2).augment == Augment(crop_padding=2)
    with pytest.raises(DataError, match="unknown option.*hflip"):
        load_dataset("mnist", tmp_path / "m", hflip=True)         # a flip changes a digit
    with pytest.raises(DataError, match="fashion-mnist: option crop_padding"):
        load_dataset("fashion-mnist", tmp_path / "m", crop_padding=-1)


def test_a_relative_root_that_does_not_exist_names_where_it_was_looked_for(tmp_path, monkeypatch, refused):
    monkeypatch.chdir(tmp_path)
    refused(["dataset=mnist", "train.epochs=1"],
            [(["dataset.root=no/such/dir"], f"root no/such/dir does not exist (resolved to {tmp_path}/no/such/dir "
                                            f"from the current directory {tmp_path})")])
