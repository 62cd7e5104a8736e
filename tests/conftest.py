"""Tiny synthetic shard sets shared by the tests (built in tmp folders, never committed), and
the independent computations that tests check the code's figures against."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asd_ray import storage
from asd_ray.config import StorageConfig
from asd_ray.data import tar
from asd_ray.data.records import iter_records
from asd_ray.data.shard_layout import DATASET_FILE, GROUND_TRUTH_FILE
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.sources import from_arrays
from asd_ray.errors import DataError

# The tests' object stores are local servers (tests/object_store.py) that take any key. Dummy
# credentials, set here before the shared Ray starts so that its workers inherit them, keep a
# developer's own (and a cloud machine's metadata service) out of every test; the endpoint is
# passed explicitly, never through the session's environment (the ``backend`` fixture sets it
# for one test, as a user's command would be given it).
os.environ.update(
    AWS_ACCESS_KEY_ID="asd-test-access-key",
    AWS_SECRET_ACCESS_KEY="asd-test-secret-key",
    AWS_EC2_METADATA_DISABLED="true",
    AWS_REGION="us-east-1",
    AWS_CONFIG_FILE=os.devnull,
    AWS_SHARED_CREDENTIALS_FILE=os.devnull,
)
for _name in (
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
):
    os.environ.pop(_name, None)


def synthetic_arrays(n: int = 200, size: int = 32, channels: int = 3, classes: int = 4, seed: int = 0):
    """Random uint8 images (n, size, size, channels) and balanced labels (n,)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def make_shards(
    folder: Path,
    n: int = 200,
    *,
    size: int = 32,
    channels: int = 3,
    classes: int = 4,
    per_shard: int = 64,
    seed: int = 0,
    name: str = "train",
) -> ShardSet:
    images, labels = synthetic_arrays(n, size, channels, classes, seed)
    write_shards(
        from_arrays(images, labels, class_names=[f"c{i}" for i in range(classes)]),
        folder,
        name=name,
        samples_per_shard=per_shard,
    )
    return ShardSet(folder)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Turn a hang into a failure: a read of a FIFO, or a tar walk on a negative size, once
    blocked forever."""

    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_processes_end(started: dict[int, int], timeout: float = 30) -> None:
    """Wait until none of ``started`` (pid -> start time, as asd_ray.reaper notes them) is
    alive any more; fail naming those still alive after ``timeout`` seconds."""
    import time

    from asd_ray.reaper import _processes

    deadline = time.monotonic() + timeout
    while left := {pid for pid, start in started.items() if _processes().get(pid, (0, -1))[1] == start}:
        assert time.monotonic() < deadline, f"Ray processes outlived their driver: {sorted(left)}"
        time.sleep(0.5)


def null_device(path: Path) -> None:
    """A character device like /dev/null (1, 3), made in the test's folder: /dev itself is
    never touched (root only, else the test is skipped)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A raw tar with the given (name, data) members, for malformed-shard tests."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class ShortReads:
    """A shard as object storage streams it: ``read(n)`` only (no seek, tell or fileno), and
    every other read returns 7 bytes fewer than asked, as sockets may."""

    def __init__(self, data: bytes) -> None:
        self._data, self._short = data, False
        self.consumed = 0  # bytes handed out so far

    def read(self, size: int) -> bytes:
        self._short = not self._short
        if self._short and size > 7:
            size -= 7
        chunk = self._data[self.consumed : self.consumed + size]
        self.consumed += len(chunk)
        return chunk


@pytest.fixture(params=["local file", "short-read stream", "s3 object"])
def open_shard(request, monkeypatch):
    """Opens a shard file for the readers: as a local file; as a non-seekable stream of short
    reads walked 3 blocks at a time (so every archive spans several checksum batches); or
    uploaded to the session's S3 server and streamed back through the storage seam."""
    if request.param == "local file":
        return lambda path: open(path, "rb")
    if request.param == "s3 object":
        bucket = request.getfixturevalue("shared_bucket")

        def from_bucket(path):
            where = bucket / f"{uuid.uuid4().hex}/{Path(path).name}"
            with where.fs.open_output_stream(where.fs_path) as out:  # one PUT: half of upload's time
                out.write(Path(path).read_bytes())
            return storage.open_stream(where)

        return from_bucket
    monkeypatch.setattr(tar, "_WINDOW", 3 * tar.BLOCK)
    return lambda path: contextlib.nullcontext(ShortReads(Path(path).read_bytes()))


class Backend:
    """Where a test opens the shard set it built: its local folder, or (with a bucket) also a
    copy of the folder published under a fresh prefix of that bucket."""

    def __init__(self, bucket: storage.Location | None = None) -> None:
        self._bucket = bucket

    def outcome(self, folder: Path, action: Callable[[str], str]) -> str:
        """``action(location)``'s outcome (as text) on the set in ``folder``, as the folder gives
        it. With a bucket the folder, as it is now, is also published (``dataset.json`` last, as
        a writer does) and opened from there: that outcome must be the same but for the location
        named in it, so a case one backend accepts, refuses or words differently fails."""
        local = action(str(folder))
        if self._bucket is not None:
            where = self._bucket / f"{uuid.uuid4().hex}/{folder.name}"
            storage.publish_folder(folder, where, last=(DATASET_FILE,))
            found = action(str(where))
            assert found == local.replace(str(folder), str(where)), f"s3 and local disagree on {folder}"
        return local


def refusal(action: Callable[[str], object]) -> Callable[[str], str]:
    """For :meth:`Backend.outcome`: the message of the DataError ``action(location)`` raises,
    which must be one line."""

    def refused(where: str) -> str:
        with pytest.raises(DataError) as err:
            action(where)
        message = str(err.value)
        assert "\n" not in message, message
        return message

    return refused


@pytest.fixture(params=["local", "s3"])
def backend(request, monkeypatch) -> Backend:
    """Runs a test on a shard set opened from its local folder, and again from the session's S3
    server, reached as a user's command reaches it: through AWS_ENDPOINT_URL (set for the test)."""
    if request.param == "local":
        return Backend()
    bucket = request.getfixturevalue("shared_bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket.settings.endpoint)
    return Backend(bucket.with_settings(StorageConfig()))


def local_records(path: Path, **window) -> list[tuple[int, str, dict[str, bytes]]]:
    """Every record of a local shard file, as ``iter_records`` reads it (without offsets)."""
    with open(path, "rb") as stream:
        return [record[:3] for record in iter_records(stream, str(path), **window)]


@pytest.fixture
def train_set(tmp_path) -> ShardSet:
    return make_shards(tmp_path / "train")


@pytest.fixture
def test_set(tmp_path) -> ShardSet:
    return make_shards(tmp_path / "test", n=80, seed=1, name="test")


_SHARED_RAY: dict[str, str] = {}  # the temp dir of the session's local Ray while it runs


def _start_shared_ray() -> None:
    """Start the session's one local Ray unless it runs (start-up ~5 s on 2 cores)."""
    import logging
    import os
    import tempfile

    import ray

    from asd_ray.cluster import RAY_TRAIN_ENV

    if not _SHARED_RAY:
        for key, value in RAY_TRAIN_ENV.items():  # the raylet, and so Ray Train's controller, inherit them
            os.environ.setdefault(key, value)
        temp_dir = tempfile.mkdtemp(
            prefix="ray-", dir="/tmp"
        )  # short: Ray's socket paths have a length limit
        ray.init(
            num_cpus=4,
            object_store_memory=200 * 1024**2,
            dashboard_host="127.0.0.1",
            dashboard_port=8266,
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
        )
        _SHARED_RAY["temp_dir"] = temp_dir


@pytest.fixture(scope="module")
def ray_cluster():
    """The session's one local Ray, started on first use and kept for every later module;
    a test that needs a Ray of its own takes ``own_ray``."""
    import ray

    _start_shared_ray()
    yield ray


def _stop_shared_ray() -> None:
    import shutil

    import ray

    if _SHARED_RAY:
        ray.shutdown()
        shutil.rmtree(_SHARED_RAY.pop("temp_dir"), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_stops_at_the_end():
    yield
    _stop_shared_ray()


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray (a ``ray start`` head, a two-node cluster): the
    shared one stops first, so no two clusters compete for ports or auto-discovery; the
    next module that takes ``ray_cluster`` starts it again."""
    _stop_shared_ray()


@pytest.fixture(scope="session")
def poisoned_data(tmp_path_factory):
    """Tiny 16x16 grey shards, BadNets-poisoned, with test sets and oracle seeds."""
    from asd_ray import tables
    from asd_ray.attacks.poison import poison_shards, poison_test_shards
    from asd_ray.config import AttackConfig
    from asd_ray.inputs import RunInputs
    from asd_ray.seeds import pick_seeds

    root = tmp_path_factory.mktemp("poisoned")
    make_shards(root / "clean", n=240, size=16, channels=1, classes=4, per_shard=50)
    make_shards(root / "clean_test", n=60, size=16, channels=1, classes=4, seed=2, name="test")
    attack = AttackConfig("badnets", rate=0.1, target=1)
    poison_shards(root / "clean", root / "train", attack)
    poison_test_shards(root / "clean_test", root / "poison_test", attack)
    truth = tables.read_parquet(root / "train" / "poison.parquet", "poison")
    exclude = np.asarray(truth.column("is_modified").to_numpy(zero_copy_only=False))
    seeds = pick_seeds(ShardSet(root / "train"), 10, exclude=exclude, method="ground-truth-clean")
    tables.write_parquet(seeds, root / "seeds.parquet", "seeds")
    return RunInputs(
        train=str(root / "train"),
        test=str(root / "clean_test"),
        poison_test=str(root / "poison_test"),
        seeds=str(root / "seeds.parquet"),
        ground_truth=str(root / "train" / "poison.parquet"),
    )


TINY_RUN = [
    "epochs=3",
    "split.stage2_epoch=1",
    "split.stage3_epoch=2",
    "mixmatch.iterations=4",
    "virtual.min_steps=4",
    "data.crop_padding=2",
]


def figures_of(model, inputs) -> dict:
    """ACC, ASR and robust accuracy of ``model`` (trained under mnist-quick's normalisation),
    from its logits computed here (no scoring actors, no evaluate module): the count behind
    each figure over its own denominator."""
    import torch

    from asd_ray import tables

    mean, std = 0.1307, 0.3081

    def predict(folder: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = ShardSet(folder).load_arrays()
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            return model.train(False)(x).argmax(1).numpy(), labels

    predicted, labels = predict(inputs.test)
    triggered, attackers = predict(inputs.poison_test)
    truth = tables.read_parquet(Path(inputs.poison_test) / GROUND_TRUTH_FILE, "poison")
    original = truth.column("original_label").to_numpy()
    assert len(labels) == 60 and len(attackers) == 45  # poisoned_data's ASR set: the non-target images
    return {
        "acc": (predicted == labels).sum() / 60,
        "asr": (triggered == attackers).sum() / 45,
        "robust_acc": (triggered == original).sum() / 45,
    }


def auroc_by_pairs(scores: np.ndarray, positives: np.ndarray) -> float:
    """The definition: the chance a positive outscores a negative, ties counting half."""
    pos, neg = scores[positives], scores[~positives]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


# The tiny run that the fault and interrupt tests disturb, and the undisturbed run they must end as.
FAULT_RUN = [*TINY_RUN, "mixmatch.iterations=12", "cluster.max_failures=1"]
METRIC_KEYS = ("epoch", "stage", "clean_pool", "poison_in_clean", "acc", "asr", "train_loss")
# The files of an epoch's record, in the order a resume must find them committed in.
FINAL_RECORD = ("last.pt", "best.pt", "card.json", "metrics.jsonl", "metrics.parquet")


def fault_config():
    from asd_ray.config import load_config

    return load_config("mnist-quick", overrides=FAULT_RUN)


def pipeline_run_flags(root: str) -> dict[str, str]:
    """``asd-ray run``'s data flags for sets made the quick start's way at ``root`` (a folder
    or a bucket prefix): clean-train/-test, train (poisoned), poison-test, seeds.parquet."""
    return {
        "--train": f"{root}/train",
        "--test": f"{root}/clean-test",
        "--poison-test": f"{root}/poison-test",
        "--seeds": f"{root}/seeds.parquet",
        "--ground-truth": f"{root}/train/poison.parquet",
    }


def run_outcome(out: Path) -> tuple[list, list]:
    """What a run produced: its split tables and the timing-free part of its metrics rows."""
    from asd_ray import tables
    from asd_ray.run_folder import METRICS_FILE, split_path

    splits = [tables.read_parquet(split_path(out, epoch), "splits") for epoch in range(3)]
    rows = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
    return splits, [{k: row[k] for k in METRIC_KEYS} for row in rows]


@pytest.fixture(scope="session")
def undisturbed(poisoned_data, tmp_path_factory) -> tuple[Path, Path]:
    """The undisturbed run of :func:`fault_config` (one for the session: the fault and the
    interrupt tests compare with it), and beside it copies of its folder as a driver killed
    before each file of the final epoch's record (:data:`FINAL_RECORD`) would have left it:
    taken by the run itself just before it wrote that file."""
    import contextlib

    from asd_ray import tables
    from asd_ray.driver import run
    from asd_ray.run_folder import split_path

    _start_shared_ray()
    root = tmp_path_factory.mktemp("undisturbed")
    out, killed = root / "run", root / "killed"
    atomic_file = tables.atomic_file

    @contextlib.contextmanager
    def copy_then_write(path: Path, **options):
        if split_path(out, 2).exists() and path.name in FINAL_RECORD and not (killed / path.name).exists():
            _copy_as_it_is(out, killed / path.name)
        with atomic_file(path, **options) as tmp:
            yield tmp

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tables, "atomic_file", copy_then_write)
        run(fault_config(), poisoned_data, out, progress=lambda _: None)
    assert sorted(p.name for p in killed.iterdir()) == sorted(FINAL_RECORD)
    return out, killed


def _copy_as_it_is(source: Path, target: Path) -> None:
    """``source`` copied as it is on disk now; a file that vanishes meanwhile (Ray Train
    removing an old checkpoint) is left out, as it would be after a kill."""
    import contextlib
    import os
    import shutil

    for folder, _, files in os.walk(source):
        there = target / Path(folder).relative_to(source)
        there.mkdir(parents=True, exist_ok=True)
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(Path(folder) / name, there / name)


@pytest.fixture(scope="session")
def reference(undisturbed) -> tuple[list, list]:
    """The undisturbed run's split tables and metrics rows (:func:`run_outcome`)."""
    return run_outcome(undisturbed[0])


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server for the session: ``.endpoint`` ("http://127.0.0.1:PORT"),
    ``.address`` (host, port), ``.create_bucket()``, ``.delete_bucket(name)``, ``.client()``."""
    from object_store import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_bucket(s3_server) -> storage.Location:
    """One bucket of the session's S3 server for tests that each upload under a fresh prefix
    (cheaper than a bucket per test), with the server's endpoint in its settings."""
    name = s3_server.create_bucket()
    yield storage.location(f"s3://{name}", StorageConfig(endpoint=s3_server.endpoint))
    s3_server.delete_bucket(name)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket, as "s3://NAME"; it and its objects are deleted after the test."""
    name = s3_server.create_bucket()
    yield f"s3://{name}"
    s3_server.delete_bucket(name)


@pytest.fixture(scope="session")
def gcs_server():
    """The GCS emulator for the session: ``.endpoint`` ("127.0.0.1:PORT", for pyarrow's
    ``endpoint_override`` with ``scheme="http"``), ``.filesystem()``, ``.create_bucket()``,
    ``.delete_bucket(name)``."""
    from object_store import GcsServer

    server = GcsServer()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh empty bucket, as "gs://NAME"; it and its objects are deleted after the test."""
    name = gcs_server.create_bucket()
    yield f"gs://{name}"
    gcs_server.delete_bucket(name)


@pytest.fixture
def fault_proxy(s3_server):
    """A ``FaultProxy`` in front of the session's S3 server, with no fault set; point the client
    at ``fault_proxy.endpoint`` instead of ``s3_server.endpoint``."""
    from object_store import FaultProxy

    proxy = FaultProxy(s3_server.address)
    yield proxy
    proxy.stop()


class ShardReads:
    """Every byte range opened through ``storage.open_stream`` and the bytes read from them."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes, self.ranges = 0, []


@pytest.fixture
def shard_reads(monkeypatch) -> ShardReads:
    """Count what is read from shard files (and any other stream) from now on."""
    from asd_ray import storage

    seen, real = ShardReads(), storage.open_stream

    class Counted:
        def __init__(self, stream) -> None:
            self._stream = stream

        def read(self, size: int = -1) -> bytes:
            data = self._stream.read(size)
            seen.bytes += len(data)
            return data

        def close(self) -> None:
            self._stream.close()

    @contextlib.contextmanager
    def counting(where, **window):
        seen.ranges.append((where.name, window.get("start", 0), window.get("stop")))
        with real(where, **window) as stream:
            yield Counted(stream)

    monkeypatch.setattr(storage, "open_stream", counting)
    return seen
