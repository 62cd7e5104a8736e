"""ASD on VGGFace2-30 subset (DenseNet-121 at 224 px, virtual-model lr 0.02): `asd-ray run --preset vggface2_30` as a Ray job.

Make the shards first, e.g. `asd-ray shards make --source imagefolder --root VGGFACE2/train --class-list vggface2_30.txt --image-size 224 --out vgg30-train`,
then poison/seeds as in the README, and submit::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/vggface2_asd.py --train /abs/train --test /abs/test --poison-test /abs/ptest \
        --seeds /abs/seeds.parquet --out /abs/runs/vggface2_30 [--workers N --scorers M --gpus-per-worker 1]

Every flag of `asd-ray run` is accepted (`--help`); paths must be absolute under
`ray job submit`, which runs the job in a copy of the working directory.
"""

import sys

from asd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--preset", "vggface2_30", *sys.argv[1:]]))
