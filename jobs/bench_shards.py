"""Benchmark the shard layer: write, read+decode, and the tar/I-O overhead.

Synthetic data: 50,000 random 32x32 RGB images (PNG) and 2,000 224x224 JPEGs
(smooth random images, JPEG q95). For each set it times writing the shards,
reading + decoding them through ``ShardSet.iter_samples`` (the path every
consumer uses), and decoding the same encoded bytes from memory; the ratio
``decode_from_memory_s / shard_read_decode_s`` is the share of time spent in
actual image decoding (target: >= 0.8, i.e. tar + I/O + checks cost < 20%).
Each timing is the best of ``--repeats`` runs, measured side by side.

    python jobs/bench_shards.py [--small-n 50000] [--large-n 2000] [--repeats 3]

Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from asd_ray.data.shards import IMAGE_EXTS, ShardSet, decode_image, iter_records, write_shards
from asd_ray.data.sources import Source, SourceRecord, from_arrays


def _smooth_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random images with photo-like smoothness (so JPEG sizes are realistic)."""
    coarse = rng.integers(0, 256, size=(n, size // 16, size // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(name: str, source: Source, n: int, repeats: int, folder: Path) -> dict:
    out = folder / name
    write_s = _best(lambda: write_shards(source, out, overwrite=True), 1)
    shards = ShardSet(out)
    encoded = [
        (key, next(v for e, v in members.items() if e in IMAGE_EXTS))
        for path in shards.paths
        for _, key, members in iter_records(path)
    ]

    def read_decode() -> None:
        count = sum(1 for _ in shards.iter_samples())
        assert count == n

    def decode_memory() -> None:
        for key, data in encoded:
            decode_image(data, shard="memory", key=key)

    read_s = _best(read_decode, repeats)
    memory_s = _best(decode_memory, repeats)
    return {
        "images": n,
        "bytes_on_disk": sum(p.stat().st_size for p in shards.paths),
        "write_images_per_s": round(n / write_s, 1),
        "read_decode_images_per_s": round(n / read_s, 1),
        "decode_from_memory_images_per_s": round(n / memory_s, 1),
        "ratio_memory_over_shards": round(memory_s / read_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-n", type=int, default=50_000)
    parser.add_argument("--large-n", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(args.small_n, 32, 32, 3), dtype=np.uint8)
    small_source = from_arrays(small, np.arange(args.small_n) % 10)
    large = _smooth_images(args.large_n, 224, rng)
    jpegs = []
    for i, image in enumerate(large):  # JPEG sources are stored verbatim, as for ImageNet
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        jpegs.append(SourceRecord(label=i % 30, source=f"synthetic:{i}", encoded=buf.getvalue(), ext="jpg"))
    large_source = Source("synthetic-jpeg", [str(c) for c in range(30)], jpegs, len(jpegs))
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "bench": "shards",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "repeats": args.repeats,
            "png_32px": bench("png32", small_source, args.small_n, args.repeats, Path(tmp)),
            "jpeg_224px": bench("jpeg224", large_source, args.large_n, args.repeats, Path(tmp)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
