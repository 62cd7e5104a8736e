"""``python -m asd_ray`` runs the CLI."""

import sys

from asd_ray.cli import main

sys.exit(main())
