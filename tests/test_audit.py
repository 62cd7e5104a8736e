import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from asd_ray import tables
from asd_ray.audit.report import report
from asd_ray.config import SplitConfig
from asd_ray.driver import METRICS_FILE, split_path
from asd_ray.errors import DataError
from asd_ray.split import make_split


def _fake_run(folder, *, with_truth: bool):
    """Three epochs of real split tables over random scores, plus metrics rows."""
    rng = np.random.default_rng(0)
    n, classes = 60, 3
    labels = np.arange(n) % classes
    is_poison = np.zeros(n, bool)
    is_poison[:6] = True
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(n),
            "is_poison": is_poison,
            "is_modified": is_poison,
            "original_label": labels,
            "label_after": labels,
            "attack": ["badnets"] * n,
            "params": ["{}"] * n,
        },
        "poison",
    )
    config = SplitConfig(stage2_epoch=1, stage3_epoch=2)
    rows = []
    for epoch in range(3):
        loss = rng.random(n).astype(np.float32)
        loss[is_poison] += 5  # poison is hard to fit: always flagged
        scores = pa.table(
            {
                "sample_id": pa.array(np.arange(n)),
                "label": pa.array(labels, pa.int32()),
                "loss": pa.array(loss),
            }
        )
        reduction = (rng.random(n) + 5 * is_poison).astype(np.float32)  # the virtual model learns poison fast
        meta = scores.set_column(2, "loss", pa.array(loss - reduction)) if epoch == 2 else None
        split = make_split(
            epoch,
            scores,
            config=config,
            num_classes=classes,
            seed_ids=np.array([10, 11, 12]),
            meta_scores=meta,
            ground_truth=truth if with_truth else None,
        )
        tables.write_parquet(split, split_path(folder, epoch), "splits")
        rows.append(
            {
                "epoch": epoch,
                "stage": epoch + 1,
                "defense": "asd",
                "acc": 0.5 + 0.1 * epoch,
                "asr": 0.1,
                "clean_pool": 30,
                "polluted_pool": 30,
                "poison_in_clean": 0 if with_truth else None,
                "poison_fraction_clean": 0.0 if with_truth else None,
                "train_loss": 1.0,
                "score_s": 0.1,
                "virtual_s": 0.0,
                "split_s": 0.0,
                "train_s": 1.0,
                "eval_s": 0.1,
                "epoch_s": 1.2,
                "fixed_s": 0.01,
            }
        )
    metrics = tables.from_pydict({k: [r[k] for r in rows] for k in tables.schema("metrics").names}, "metrics")
    tables.write_parquet(metrics, folder / METRICS_FILE, "metrics")


def test_report_writes_flags_and_a_plot(tmp_path):
    _fake_run(tmp_path, with_truth=True)
    summary = report(tmp_path)
    flags = tables.read_parquet(tmp_path / "audit" / "flags.parquet", "flags").to_pydict()
    assert summary["samples"] == 60 and summary["flagged_last_epoch"] == 30
    assert summary["poisoned"] == 6 and summary["poison_recall_last_epoch"] == 1.0
    assert all(flags["epochs_polluted"][i] >= 2 for i in range(6))  # stage 2 and 3 flagged them
    assert set(flags["epochs_seen"]) == {3} and set(flags["last_epoch"]) == {2}
    with Image.open(tmp_path / "audit" / "metrics.png") as plot:
        assert plot.size == (900, 420)


def test_report_without_ground_truth_and_without_runs(tmp_path):
    _fake_run(tmp_path / "run", with_truth=False)
    summary = report(tmp_path / "run")
    assert "poisoned" not in summary and summary["flagged_last_epoch"] == 30
    with pytest.raises(DataError, match="no such metrics table"):
        report(tmp_path / "missing")
