"""Shards: raw sources -> WebDataset shards + manifest, safe reading, batched augmentation."""
