"""Errors raised on bad input.

Every message names the offending shard/key/value and says how to fix it: the
datasets are untrusted, so a failure must be explicit, never a silent skip.
"""


class DataError(ValueError):
    """Bad or unsafe input data (shards, manifests, source folders, tables)."""
