"""Per-sample scores: the SCE loss and prediction of every image under given weights.

Pure torch, no Ray: :mod:`asd_ray.scoring_pool` runs this in a pool of actors, and
:mod:`asd_ray.split` / :mod:`asd_ray.evaluate` read the tables it yields. Scores
are computed in full fp32 by default (channels_last where configured): the split
ranks samples by small loss differences. ``scoring.precision`` picks tf32 or bf16
where ``jobs/bench_scoring_precision.py`` shows they keep the split.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from asd_ray import compute, tables
from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
from asd_ray.data.augment import augment, normalize
from asd_ray.losses import sce_loss

PASS_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("label", pa.int32()), ("loss", pa.float32()), ("prediction", pa.int32())]
)


def score_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: DataConfig,
    scoring: ScoringConfig,
    compute_config: ComputeConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SCE loss and argmax prediction of every image, in batches on the model's device, in
    ``scoring.precision`` (losses always reduced in fp32).

    Args:
        model: the classifier, in eval mode.
        images: (N, H, W, C) uint8, on any device (batches are moved to the model's).
        labels: (N,) int64.
        generator: score under training augmentation with this stream (None: clean inputs).

    Returns:
        losses (N,) float32 and predictions (N,) int64, on the CPU.
    """
    device = next(model.parameters()).device
    fmt = compute.memory_format(compute_config)
    losses, predictions = [], []
    labels = compute.to_device(labels, device)  # once per pass, not one pageable copy per batch
    with torch.inference_mode(), compute.scoring_precision(scoring.precision, device):
        for start in range(0, len(labels), scoring.batch_size):
            batch = images[start : start + scoring.batch_size].to(device, non_blocking=True)
            x = augment(batch, data, generator) if generator else normalize(batch, data)
            logits = model(x.contiguous(memory_format=fmt)).float()  # (B, C)
            y = labels[start : start + scoring.batch_size]
            losses.append(sce_loss(logits, y, alpha=scoring.sce_alpha, beta=scoring.sce_beta))
            predictions.append(logits.argmax(1))
    if not losses:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(losses).cpu(), torch.cat(predictions).cpu()  # one device->host copy per pass


def scores_table(pass_table: pa.Table) -> pa.Table:
    """The (sample_id, label, loss) columns of a pass, as a validated scores table."""
    return tables.validate(pass_table.select(["sample_id", "label", "loss"]), "scores")
