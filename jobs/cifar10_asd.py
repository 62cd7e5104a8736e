"""ASD on CIFAR-10 (ResNet-18, 120 epochs, the paper's settings): `asd-ray run --preset cifar10` as a Ray job.

Make the shards first, e.g. `asd-ray shards make --source cifar10 --root cifar-10-batches-bin --out c10-train`,
then poison/seeds as in the README, and submit::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/cifar10_asd.py --train /abs/train --test /abs/test --poison-test /abs/ptest \
        --seeds /abs/seeds.parquet --out /abs/runs/cifar10 [--workers N --scorers M --gpus-per-worker 1]

Every flag of `asd-ray run` is accepted (`--help`); paths must be absolute under
`ray job submit`, which runs the job in a copy of the working directory.
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--preset", "cifar10", *sys.argv[1:]]))
