"""asd-ray: ASD backdoor defense (CVPR 2023) as a Ray + WebDataset pipeline.

Data flows shards -> scores -> split tables -> training -> evaluation/audit;
the module names follow that order (see README).
"""

from asd_ray.errors import DataError

__all__ = ["DataError", "__version__"]
__version__ = "0.1.0"
