"""Every bad input a careless user or an attacker can hand the CLI: exit status 2, one
line on stderr that names the problem, nothing on stdout, never a traceback.

Cases that need a running Ray (a corrupt image found by the scoring actors, a GPU
request the cluster cannot meet) are in test_driver.py.
"""

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards

from asd_ray import tables
from asd_ray.cli import main
from asd_ray.seeds import pick_seeds


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A clean 4-class set, a 3-class test set and a valid seeds table, never modified."""
    root = tmp_path_factory.mktemp("bad_input")
    grey = {"size": 8, "channels": 1}  # the mnist-quick preset's input
    train = make_shards(root / "train", n=80, classes=4, per_shard=40, **grey)
    make_shards(root / "test", n=24, classes=4, seed=1, name="test", **grey)
    make_shards(root / "three", n=24, classes=3, seed=2, name="test", **grey)
    tables.write_parquet(pick_seeds(train, 5), root / "seeds.parquet", "seeds")
    return root


def _copy(data: Path, tmp: Path, name: str = "train") -> Path:
    return Path(shutil.copytree(data / name, tmp / f"{name}-copy"))


def _rewrite_first_record(folder: Path, member: str, payload: bytes) -> Path:
    """Replace (or add) one member of record 000000000 in the first shard."""
    shard = sorted(folder.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    names = [name for name, _ in members]
    if member in names:
        members[names.index(member)] = (member, payload)
    else:
        members.insert(0, (member, payload))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return folder


def _png(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _negative_size(folder: Path) -> Path:
    shard = sorted(folder.glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[124:136] = b"-0000001750\0"  # the first header's size field: -1000
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    shard.write_bytes(bytes(raw))
    return folder


def _gzipped(folder: Path) -> Path:
    shard = sorted(folder.glob("*.tar"))[0]
    shard.write_bytes(gzip.compress(shard.read_bytes()))
    return folder


def _dataset_json(folder: Path, change) -> Path:
    info = json.loads((folder / "dataset.json").read_text())
    change(info)
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


def _seeds(data: Path, tmp: Path, change) -> Path:
    """The valid seeds table with its rows changed by ``change(rows) -> rows``."""
    rows = change(tables.read_parquet(data / "seeds.parquet", "seeds").to_pylist())
    table = tables.from_pydict({k: [r[k] for r in rows] for k in rows[0]}, "seeds")
    return tables.write_parquet(table, tmp / "bad_seeds.parquet", "seeds")


def _one_per_class_repeated(rows: list[dict]) -> list[dict]:
    first = {}
    return [dict(first.setdefault(r["label"], r)) for r in rows]


def _inspect(folder: Path) -> list[str]:
    return ["shards", "inspect", str(folder)]


def _run(data: Path, tmp: Path, *extra: str, train: Path | None = None, seeds: Path | None = None):
    return [
        "run",
        "--preset",
        "mnist-quick",
        "--train",
        str(train or data / "train"),
        "--test",
        str(data / "test"),
        "--seeds",
        str(seeds or data / "seeds.parquet"),
        "--out",
        str(tmp / "run"),
        *extra,
    ]


def _poison(data: Path, *extra: str) -> list[str]:
    return ["poison", "--attack", "badnets", "--rate", "0.1", "--in", str(data / "train"), *extra]


def _write(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


# (id, argv builder (data, tmp) -> argv, words the one line must contain)
CASES = [
    # shard sets
    ("missing shard folder", lambda d, t: _inspect(t / "nowhere"), "asd-ray shards make"),
    ("empty folder", lambda d, t: _inspect(t), "holds no files"),
    ("missing shard file", lambda d, t: _inspect(_unlink_shard(_copy(d, t))), "train-000001.tar is missing"),
    ("empty shard", lambda d, t: _inspect(_truncate(_copy(d, t), 0)), "empty"),
    ("truncated tar", lambda d, t: _inspect(_truncate(_copy(d, t), 3000)), "train-000000.tar"),
    (
        "non-image bytes",
        lambda d, t: _inspect(_rewrite_first_record(_copy(d, t), "000000000.png", b"nope")),
        "000000000",
    ),
    (
        "label out of range",
        lambda d, t: _inspect(_rewrite_first_record(_copy(d, t), "000000000.cls", b"7")),
        "label",
    ),
    (
        "label not a number",
        lambda d, t: _inspect(_rewrite_first_record(_copy(d, t), "000000000.cls", b"x")),
        "cls",
    ),
    (
        "wrong image size",
        lambda d, t: _inspect(_rewrite_first_record(_copy(d, t), "000000000.png", _png(9))),
        "(9, 9",
    ),
    (
        "pickle member",
        lambda d, t: _inspect(_rewrite_first_record(_copy(d, t), "000000000.pyd", b"\x80\x04")),
        "pyd",
    ),
    ("negative tar size", lambda d, t: _inspect(_negative_size(_copy(d, t))), "train-000000.tar"),
    ("gzip disguised as tar", lambda d, t: _inspect(_gzipped(_copy(d, t))), "train-000000.tar"),
    ("dataset.json not JSON", lambda d, t: _inspect(_garble_json(_copy(d, t))), "dataset.json"),
    (
        "dataset.json wrong type",
        lambda d, t: _inspect(_dataset_json(_copy(d, t), lambda i: i.update(num_samples="80"))),
        "num_samples",
    ),
    (
        "dataset.json file outside",
        lambda d, t: _inspect(_dataset_json(_copy(d, t), _escape)),
        "inside the folder",
    ),
    ("dataset.json deep nesting", lambda d, t: _inspect(_deep_json(_copy(d, t))), "dataset.json"),
    # shards make and poison
    (
        "object array",
        lambda d, t: [
            "shards",
            "make",
            "--source",
            "arrays",
            "--images",
            str(_object_npy(t)),
            "--labels",
            str(_object_npy(t)),
            "--out",
            str(t / "o"),
        ],
        "pickle",
    ),
    ("poison out is in", lambda d, t: _poison(d, "--out", str(d / "train"), "--overwrite"), "--in"),
    (
        "poison out is test-out",
        lambda d, t: _poison(
            d, "--out", str(t / "p"), "--test-in", str(d / "test"), "--test-out", str(t / "p")
        ),
        "--test-out",
    ),
    (
        "overwrite a user folder",
        lambda d, t: _poison(d, "--out", str(_user_folder(t)), "--overwrite"),
        "not a shard set",
    ),
    (
        "seeds from a missing folder",
        lambda d, t: ["seeds", "--in", str(t / "nowhere"), "--out", str(t / "s.parquet")],
        "nowhere",
    ),
    (
        "more seeds than a class has",
        lambda d, t: ["seeds", "--in", str(d / "test"), "--out", str(t / "s.parquet"), "--per-class", "50"],
        "class",
    ),
    # settings
    *[
        (f"setting {setting}", lambda d, t, s=setting: _run(d, t, "--set", s), setting.split("=")[0])
        for setting in (
            "seed=-1",
            "mixmatch.lr=-1",
            "mixmatch.temperature=0",
            "scoring.batch_size=0",
            "cluster.threads_per_process=0",
            "data.crop_padding=-5",
            "virtual.epochs=-1",
            "mixmatch.lambda_u=nan",
            "cluster.cpus_per_scorer=-1",
        )
    ],
    ("unknown setting", lambda d, t: _run(d, t, "--set", "nosuch.key=1"), "unknown config key 'nosuch'"),
    ("flag of the wrong type", lambda d, t: _run(d, t, "--epochs", "many"), "--epochs"),
    ("unknown preset", lambda d, t: _run(d, t, "--preset", "cifar100"), "cifar100"),
    ("missing config file", lambda d, t: _run(d, t, "--config", str(t / "none.yaml")), "none.yaml"),
    (
        "YAML syntax error",
        lambda d, t: _run(d, t, "--config", str(_write(t, "c.yaml", "mixmatch: [1,"))),
        "c.yaml",
    ),
    (
        "YAML unsafe tag",
        lambda d, t: _run(
            d, t, "--config", str(_write(t, "c.yaml", "x: !!python/object/apply:os.system ['true']"))
        ),
        "c.yaml",
    ),
    (
        "YAML not a mapping",
        lambda d, t: _run(d, t, "--config", str(_write(t, "c.yaml", "- 1\n- 2\n"))),
        "c.yaml",
    ),
    # run inputs
    (
        "asd without seeds",
        lambda d, t: [a for a in _run(d, t) if a not in ("--seeds", str(d / "seeds.parquet"))],
        "seeds",
    ),
    ("seeds file missing", lambda d, t: _run(d, t, seeds=t / "none.parquet"), "none.parquet"),
    ("seeds not Parquet", lambda d, t: _run(d, t, seeds=_write(t, "s.parquet", "hello")), "s.parquet"),
    ("too few seeds in a class", lambda d, t: _run(d, t, seeds=_seeds(d, t, lambda rows: rows[1:])), "class"),
    ("one seed repeated", lambda d, t: _run(d, t, seeds=_seeds(d, t, _one_per_class_repeated)), "repeat"),
    (
        "seed id outside the set",
        lambda d, t: _run(d, t, seeds=_seeds(d, t, lambda rows: [{**rows[0], "sample_id": 999}, *rows[1:]])),
        "999",
    ),
    ("class-count mismatch", lambda d, t: [*_run(d, t)[:6], str(d / "three"), *_run(d, t)[7:]], "classes"),
    ("resume without a run", lambda d, t: _run(d, t, "--resume"), "--resume"),
    (
        "run folder not empty",
        lambda d, t: _run(d, t) if _write(_mkdir(t / "run"), "notes.txt", "mine") else [],
        "not empty",
    ),
    ("report on a missing run", lambda d, t: ["report", str(t / "nowhere")], "nowhere"),
]


def _unlink_shard(folder: Path) -> Path:
    sorted(folder.glob("*.tar"))[1].unlink()
    return folder


def _truncate(folder: Path, size: int) -> Path:
    shard = sorted(folder.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:size])
    return folder


def _garble_json(folder: Path) -> Path:
    (folder / "dataset.json").write_text('{"name": "train", ')
    return folder


def _deep_json(folder: Path) -> Path:
    (folder / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


def _escape(info: dict) -> None:
    info["shards"][0]["file"] = "../../etc/passwd"


def _object_npy(tmp: Path) -> Path:
    np.save(tmp / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return tmp / "obj.npy"


def _user_folder(tmp: Path) -> Path:
    folder = _mkdir(tmp / "mine")
    (folder / "thesis.tex").write_text("months of work")
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize(("build", "words"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2(build, words, data, tmp_path, capsys):
    argv = build(data, tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's usage errors
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("asd-ray") and "error:" in lines[0]
    assert words in lines[0], lines[0]
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing half-made
    if "mine" in argv[-2:]:
        assert (tmp_path / "mine" / "thesis.tex").exists()
