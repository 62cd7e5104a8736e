"""Versioned table schemas (JSON), shipped as the resource package ``asd_ray.schemas``.

Read them through :mod:`asd_ray.tables`, which builds ``pyarrow.Schema`` objects
and validates every table the project writes or reads.
"""
