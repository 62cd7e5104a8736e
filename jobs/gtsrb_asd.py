"""ASD on GTSRB (ResNet-18 at 32 px, 100 epochs, no flips): `asd-ray run --preset gtsrb` as a Ray job.

Make the shards first, e.g. `asd-ray shards make --source gtsrb --root GTSRB --image-size 32 --out gtsrb-train`,
then poison/seeds as in the README, and submit::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/gtsrb_asd.py --train /abs/train --test /abs/test --poison-test /abs/ptest \
        --seeds /abs/seeds.parquet --out /abs/runs/gtsrb [--workers N --scorers M --gpus-per-worker 1]

Every flag of `asd-ray run` is accepted (`--help`); paths must be absolute under
`ray job submit`, which runs the job in a copy of the working directory.
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--preset", "gtsrb", *sys.argv[1:]]))
