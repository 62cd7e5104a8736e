"""asd-ray's shards are plain WebDataset, and foreign WebDataset shards come in safely."""

import io
import tarfile

import numpy as np
import pytest
from conftest import local_records
from PIL import Image

from asd_ray.cli import main
from asd_ray.data.shards import ShardSet


def test_the_webdataset_library_reads_asd_ray_shards_with_safe_decoders(train_set):
    wds = pytest.importorskip("webdataset")
    # Image decoding only, for the members named: never the pickle handlers of its defaults.
    dataset = wds.WebDataset([str(p) for p in train_set.paths], shardshuffle=False).decode(
        wds.autodecode.imagehandler("rgb8"), only=["png", "cls"]
    )
    theirs = [(int(sample["cls"]), sample["png"]) for sample in dataset]
    ours = [(s.label, s.image) for s in train_set.iter_samples()]
    assert len(theirs) == len(ours) == len(train_set)
    assert all(a == c and np.array_equal(b, d) for (a, b), (c, d) in zip(theirs, ours))


def _foreign_shard(path, records):
    with tarfile.open(path, "w") as tar:
        for name, body in records:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_shards_import_brings_foreign_shards_in_and_refuses_pickles(tmp_path, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    for shard in range(2):
        records = []
        for i in range(5):
            key = f"photos/img_{shard}_{i}"
            records += [(f"{key}.jpg", _jpeg(20 * i)), (f"{key}.cls", str(i % 3).encode())]
        _foreign_shard(folder / f"part-{shard}.tar", records)
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    code = main(
        [
            "shards",
            "import",
            "--in",
            str(folder),
            "--out",
            str(tmp_path / "mine"),
            "--classes",
            str(tmp_path / "names.txt"),
            "-q",
        ]
    )
    assert code == 0
    imported = ShardSet(tmp_path / "mine")
    assert len(imported) == 10 and imported.info.class_names == ["cat", "dog", "bird"]
    assert sorted(imported.labels.tolist()) == sorted([i % 3 for i in range(5)] * 2)
    stored = [bytes(m["jpg"]) for path in imported.paths for _, _, m in local_records(path)]
    assert stored[:5] == [_jpeg(20 * i) for i in range(5)]  # JPEG bytes kept as they came
    _foreign_shard(folder / "part-2.tar", [("evil.pyd", b"\x80\x04"), ("evil.cls", b"0")])
    capsys.readouterr()
    code = main(["shards", "import", "--in", str(folder), "--out", str(tmp_path / "again"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "'pyd' member" in err and not (tmp_path / "again").exists()
