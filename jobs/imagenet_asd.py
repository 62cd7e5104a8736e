"""ASD on ImageNet-30 subset (ResNet-18 at 224 px): `asd-ray run --preset imagenet30` as a Ray job.

Make the shards first, e.g. `asd-ray shards make --source imagefolder --root IMAGENET/train --class-list imagenet30.txt --image-size 224 --out in30-train`,
then poison/seeds as in the README, and submit::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/imagenet_asd.py --train /abs/train --test /abs/test --poison-test /abs/ptest \
        --seeds /abs/seeds.parquet --out /abs/runs/imagenet30 [--workers N --scorers M --gpus-per-worker 1]

Every flag of `asd-ray run` is accepted (`--help`); paths must be absolute under
`ray job submit`, which runs the job in a copy of the working directory.
"""

import sys

from asd_ray.cli import main

COMMAND = ["run", "--preset", "imagenet30"]  # what this job runs, before its own arguments

if __name__ == "__main__":
    sys.exit(main([*COMMAND, *sys.argv[1:]]))
