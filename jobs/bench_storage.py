"""Benchmark reading a scorer's share from object storage against reading it from local disk.

Starts moto's S3 server (``moto[server]``, in the ``test`` extra) on 127.0.0.1 in
a process of its own (dummy credentials; stopped at the end, also on error), writes
one synthetic shard set twice, to a local folder and to ``s3://bench/...``
(``write_shards``), and measures side by side, interleaved, best of ``--repeats``:

- ``local``: ``load_share(ShardSet(folder), slices)`` for the share of scorer 0 of
  ``--scorers`` (``ShardSet.worker_slices``), opening the set included;
- ``s3``: the same share from the server (8 MiB ranged GETs through ``storage.open_stream``);
- ``raw_s3`` / ``raw_local``: the same shard objects streamed with
  ``storage.open_stream`` and discarded (no tar walk, no decode): the server's (or
  the page cache's) read rate, the bound the decoding path cannot beat;
- ``s3_parallel`` / ``local_parallel``: the shares of ``--readers`` scorers loaded
  at once, one thread each (aggregate rates; the local one tells the machine's
  limit from the server's).

``ratio_s3_to_local`` = rate(s3) / rate(local) and ``ratio_s3_to_raw`` = rate(s3) /
rate(raw_s3), in MB/s. The issue's bar: >= 0.8 of the local rate, or, where the test
server's raw rate is lower than the local decode rate (the server is the bound), of
that: ``ratio_s3_to_bound`` divides by the lower of the two.
MB/s counts the share's encoded bytes (its shards' bytes, pro rata where a share
holds part of a shard); MB = 10^6 bytes.

Peak memory: scorer 0's share is loaded again in a fresh subprocess per location,
after that process has opened the set and warmed its decoder; ``excess`` is its peak
RSS during the load (``VmHWM``, reset before it) minus its RSS before, minus the
share's decoded size: what reading costs beyond the array. The S3 share is loaded
twice: from the shard set above and from a copy of the same records in shards as
large as the whole share (``s3_one_shard``), where an S3 stream that held a whole
shard in memory would show up as the shard's size; the 8 MiB buffer and the
walk's window (256 KiB) are what it should hold.

GETs per shard are counted from the server's request log, over one extra
(untimed) S3 load.

    python jobs/bench_storage.py [--images 3200] [--per-shard 400] [--size 224] [--png] \\
        [--scorers 2] [--readers 2] [--repeats 3] [--smoke]

Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from asd_ray import storage
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.share import load_share
from asd_ray.data.slices import ShardSlice
from asd_ray.data.sources import Source, SourceRecord, from_arrays

BUCKET = "bench"
MB = 1e6
_READ = 256 << 10  # bytes per read of the raw stream: what the tar walk asks for at a time
_SERVER_START_S = 60.0
# In a fresh process: open shard set ARGV[1] and warm the decoder (imports, the manifest, the
# S3 client), then load scorer 0's share of ARGV[2] scorers; prints the RSS before the load
# and the peak RSS during it (VmHWM, reset before the load). Not ru_maxrss: a child's
# starts at its parent's peak (the high-water mark survives fork + exec).
_PEAK_RSS = r"""
import io, json, re, sys
import numpy as np
from PIL import Image
from asd_ray.data.records import decode_image
from asd_ray.data.share import load_share
from asd_ray.data.shards import ShardSet

def kib(field):
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\s+(\d+) kB", status.read()).group(1))

shards = ShardSet(sys.argv[1])
jpeg = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, format="JPEG")
decode_image(jpeg.getvalue(), shard="warm-up", key="-")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak RSS starts again from here
before = kib("VmRSS")
images, _, _ = load_share(shards, shards.worker_slices(int(sys.argv[2]))[0])
print(json.dumps({"before_kib": before, "peak_kib": kib("VmHWM")}))
"""


def photo_like_jpegs(n: int, size: int, rng: np.random.Generator) -> Source:
    """JPEGs (q90) of smooth colour fields with sensor-like noise: about 20 KB at 224 px,
    the size of an ImageNet photo resized to 224 px, and as slow to decode."""
    records = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, size=(size // 16, size // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BILINEAR), np.float32)
        image = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        records.append(SourceRecord(label=i % 10, source=f"synthetic:{i}", encoded=buf.getvalue(), ext="jpg"))
    return Source("synthetic-jpeg", [str(c) for c in range(10)], records, n)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """moto's S3 server in a child process on a free port of 127.0.0.1; yields its endpoint.
    Its request log (one line per request) goes to ``log``."""
    port = _free_port()
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _SERVER_START_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto's server exited ({server.returncode}): {log.read_text()[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not listen on port {port} in {_SERVER_START_S:.0f} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def use_server(endpoint: str) -> None:
    """Point this process (and its children) at the local server with dummy credentials,
    and create the bucket."""
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    admin = pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True)
    admin.create_dir(BUCKET)


def share_bytes(shards: ShardSet, slices: list[ShardSlice], sizes: dict[str, int]) -> int:
    """The encoded bytes of a share: its shards' ``sizes``, pro rata where it holds part of one."""
    counts = {str(s["file"]): int(s["count"]) for s in shards.info.shards}
    return round(sum(sizes[s.path.name] * s.count / counts[s.path.name] for s in slices))


def load(where: str, scorers: int, scorer: int = 0) -> int:
    """What a scorer does: open the set, decode its share; returns the images decoded."""
    shards = ShardSet(where)
    images, _, _ = load_share(shards, shards.worker_slices(scorers)[scorer])
    return len(images)


def stream_raw(where: str, scorers: int) -> int:
    """Stream the shard objects of scorer 0's share and discard them; returns the bytes read."""
    shards = ShardSet(where)
    read = 0
    for piece in shards.worker_slices(scorers)[0]:
        with storage.open_stream(piece.path) as stream:
            while chunk := stream.read(_READ):
                read += len(chunk)
    return read


def load_parallel(where: str, scorers: int, readers: int) -> int:
    """The shares of scorers 0..readers-1 loaded at once, a thread each; returns the images."""
    with concurrent.futures.ThreadPoolExecutor(readers) as pool:
        return sum(pool.map(lambda scorer: load(where, scorers, scorer), range(readers)))


def peak_rss_mb(where: str, scorers: int) -> tuple[float, float]:
    """RSS before and peak RSS during the load of scorer 0's share of ``where`` in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, where, str(scorers)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures["before_kib"] * 1024 / MB, figures["peak_kib"] * 1024 / MB


def count_requests(log: Path, fn, *args) -> dict[str, int]:
    """Requests the server logged while ``fn(*args)`` ran, by method, and GETs of shards."""
    before = log.stat().st_size
    fn(*args)
    time.sleep(0.5)  # the server writes its log line after the response
    with open(log, "rb") as text:
        text.seek(before)
        lines = text.read().decode(errors="replace").splitlines()
    methods: dict[str, int] = {}
    for line in lines:
        if match := re.search(r'"([A-Z]+) (\S+) HTTP', line):
            key = (
                "GET shard" if match.group(1) == "GET" and match.group(2).endswith(".tar") else match.group(1)
            )
            methods[key] = methods.get(key, 0) + 1
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--per-shard", type=int, default=400, help="records per shard (~8 MB at 224 px)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--png", action="store_true", help="random-noise PNGs (up to 64 px) instead of JPEGs")
    parser.add_argument("--scorers", type=int, default=2)
    parser.add_argument(
        "--readers", type=int, default=2, help="parallel S3 readers, at most --scorers (0: skip)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.per_shard, args.repeats = 128, 32, 1  # shards of 0.7 MB: more than a tar window
    if args.scorers < 1 or not 0 <= args.readers <= args.scorers:
        parser.error("--scorers must be at least 1, --readers between 0 and --scorers")
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    if args.png:
        pixels = rng.integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)
        source = from_arrays(pixels, np.arange(args.images) % 10)
    else:
        source = photo_like_jpegs(args.images, args.size, rng)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "moto.log"
        with s3_server(log) as endpoint:
            use_server(endpoint)
            result = measure(args, source, Path(tmp) / "set", log)
    result["load_avg_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


def measure(args: argparse.Namespace, source: Source, local: Path, log: Path) -> dict:
    remote, one_shard = f"s3://{BUCKET}/set", f"s3://{BUCKET}/one-shard-per-share"
    write_shards(source, local, samples_per_shard=args.per_shard)
    write_shards(source, remote, samples_per_shard=args.per_shard)
    shards = ShardSet(local)
    sizes = {p.name: v.size for p, v in zip(shards.paths, storage.versions(shards.paths))}
    shares = shards.worker_slices(args.scorers)
    images = [sum(s.count for s in share) for share in shares]
    encoded = [share_bytes(shards, share, sizes) for share in shares]
    whole_shards = sum(sizes[s.path.name] for s in shares[0])
    # name: (function, its arguments, images it decodes, bytes its MB/s counts)
    paths = {
        "local": (load, (str(local), args.scorers), images[0], encoded[0]),
        "s3": (load, (remote, args.scorers), images[0], encoded[0]),
        "raw_local": (stream_raw, (str(local), args.scorers), 0, whole_shards),
        "raw_s3": (stream_raw, (remote, args.scorers), 0, whole_shards),
    }
    if args.readers:
        for name, where in (("local_parallel", str(local)), ("s3_parallel", remote)):
            paths[name] = (
                load_parallel,
                (where, args.scorers, args.readers),
                sum(images[: args.readers]),
                sum(encoded[: args.readers]),
            )
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(args.repeats):  # interleaved, so the shared machine's drift hits every path alike
        for name, (fn, fn_args, count, volume) in paths.items():
            start = time.perf_counter()
            done = fn(*fn_args)
            best[name] = min(best[name], time.perf_counter() - start)
            if done != (count or volume):
                raise RuntimeError(f"{name}: read {done}, expected {count or volume}")
    rates, mb_per_s = {}, {name: volume / MB / best[name] for name, (*_, volume) in paths.items()}
    for name, (_, _, count, _) in paths.items():
        rates[name] = {"s": round(best[name], 3), "mb_per_s": round(mb_per_s[name], 1)}
        if count:
            rates[name]["images_per_s"] = round(count / best[name], 1)
    open_s3_s = min(_seconds(ShardSet, remote) for _ in range(args.repeats))
    requests = count_requests(log, load, remote, args.scorers)
    write_shards(source, one_shard, samples_per_shard=max(images))
    h, w, c = shards.require_uniform_size("the benchmark")
    decoded_mb = images[0] * h * w * c / MB
    memory: dict = {"decoded_share": round(decoded_mb, 1)}
    for name, where in (("local", str(local)), ("s3", remote), ("s3_one_shard", one_shard)):
        baseline, peak = peak_rss_mb(where, args.scorers)
        memory[name] = {
            "before_load": round(baseline, 1),
            "peak": round(peak, 1),
            "excess": round(peak - baseline - decoded_mb, 1),
        }
    one = ShardSet(one_shard)
    return {
        "bench": "storage",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "server": "moto_server (moto 5, werkzeug), 127.0.0.1",
        "repeats": args.repeats,
        "smoke": args.smoke,
        "set": {
            "format": "png" if args.png else "jpeg",
            "images": args.images,
            "image_px": args.size,
            "shards": len(sizes),
            "mb": round(sum(sizes.values()) / MB, 2),
        },
        "share": {
            "scorers": args.scorers,
            "images": images[0],
            "shards": len(shares[0]),
            "mb": round(encoded[0] / MB, 2),
        },
        "rates": rates,
        "ratio_s3_to_local": round(best["local"] / best["s3"], 3),
        "ratio_s3_to_raw": round(mb_per_s["s3"] / mb_per_s["raw_s3"], 3),
        "ratio_s3_to_bound": round(mb_per_s["s3"] / min(mb_per_s["local"], mb_per_s["raw_s3"]), 3),
        "open_s3_set_s": round(open_s3_s, 3),
        "requests_per_s3_load": requests,
        "memory_mb": memory,
        "shard_mb": {
            "set": round(max(sizes.values()) / MB, 2),
            "one_shard_per_share": round(max(v.size for v in storage.versions(one.paths)) / MB, 2),
        },
    }


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
