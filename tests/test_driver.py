"""End to end on local Ray: 2 training workers, 2 scoring actors, all three stages."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch
from conftest import TINY_RUN, figures_of

from asd_ray import tables
from asd_ray.config import load_config
from asd_ray.driver import run
from asd_ray.errors import DataError
from asd_ray.messages import Pools
from asd_ray.models.saved import load_model
from asd_ray.run_folder import METRICS_FILE, split_path
from asd_ray.split import pool_masks

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, poisoned_data, tmp_path_factory):
    """One undisturbed three-stage run (shares in memory), for the tests that check or compare with it."""
    root = tmp_path_factory.mktemp("tiny")
    config = load_config("mnist-quick", overrides=[*TINY_RUN, f"cluster.cache_dir={root / 'cache'}"])
    lines = []
    summary = run(config, poisoned_data, root / "run", progress=lines.append)
    return root, summary, lines


def test_three_stages_write_valid_tables_metrics_and_checkpoints(tiny_run, poisoned_data):
    root, summary, lines = tiny_run
    out = root / "run"
    assert summary["epochs"] == 3 and summary["defense"] == "asd"
    last = load_model(out, "last")
    assert last.card["input"]["mean"] == [0.1307]  # the normalisation figures_of applies
    figures = figures_of(last, poisoned_data)  # the final model, evaluated here
    assert {k: summary[k] for k in figures} == pytest.approx(figures, abs=1e-12)
    splits = []
    for epoch, stage in enumerate([1, 2, 3]):
        split = tables.read_parquet(split_path(out, epoch), "splits")
        splits.append(split)
        assert set(split.column("stage").to_pylist()) == {stage}
        assert split.num_rows == 240
        meta_nulls = split.column("meta_loss").null_count
        assert meta_nulls == (0 if stage == 3 else 240)
        pools = split.column("pool").to_pylist()
        assert pools.count("clean") == (40 if stage == 1 else 120)  # seeds only at epoch 0; 50% after
    history = ds.dataset(out / "splits", format="parquet", partitioning="hive").to_table()
    assert history.num_rows == 3 * 240 and sorted(set(history.column("epoch").to_pylist())) == [0, 1, 2]
    metrics = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and [m["stage"] for m in metrics] == [1, 2, 3]
    assert metrics[2]["virtual_s"] > 0 and metrics[0]["virtual_s"] == 0
    for m, split in zip(metrics, splits):  # the poisoned samples the clean pool holds, counted here
        clean = np.array(split.column("pool").to_pylist()) == "clean"
        is_poison = split.column("is_poison").to_numpy(zero_copy_only=False)
        assert m["poison_in_clean"] == int((clean & is_poison).sum())
    assert metrics[0]["poison_in_clean"] == 0  # epoch 0's clean pool: the 40 oracle seeds
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    checkpoints = [c for c in (out / "train").glob("checkpoint_*") if c.is_dir()]
    assert len(checkpoints) == 2 and all((c / "state.pt").is_file() for c in checkpoints)  # the last 2 kept
    state = torch.load(max(checkpoints) / "state.pt", weights_only=True)
    pools = Pools.pack(
        *pool_masks(splits[2], 240, load_config("mnist-quick", overrides=TINY_RUN).split.holdout_ratio)
    )
    assert state["epoch"] == 2 and state["split"] == pools.digest  # the workers trained on the table's pools
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    assert len([line for line in lines if line.startswith("epoch")]) == 3


def test_stop_and_resume_from_the_cli_continue_from_the_last_epoch(
    ray_cluster, poisoned_data, tmp_path, capsys
):
    """Stopped after epoch 0, then resumed by `asd-ray run --resume` with one more epoch than
    planned: the epoch checkpointed but not recorded is re-evaluated, not redone, and the
    command prints its human lines on stderr and only the JSON summary on stdout."""
    from asd_ray.cli import main

    config = load_config("mnist-quick", overrides=TINY_RUN)
    out = tmp_path / "run"
    first = run(config, poisoned_data, out, stop_after_epoch=0, progress=lambda _: None)
    assert first["epochs"] == 1
    epoch0 = split_path(out, 0).read_bytes()
    (out / METRICS_FILE).unlink()  # as if the driver died after the checkpoint, before the metrics row
    capsys.readouterr()
    code = main(["run", "--resume", "--out", str(out), "--epochs", "4"])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and len(stdout.splitlines()) == 1 and json.loads(stdout)["epochs"] == 4
    lines = [line for line in stderr.splitlines() if line.startswith("asd-ray:")]
    assert "resuming after epoch 0" in lines[0] and "resumed from checkpoint_" in lines[1]
    assert "the resume took" in lines[2] and "placement on 1 node(s)" in lines[3]
    assert "epoch 0 was checkpointed but not recorded" in lines[4]
    assert "epoch   4/4" in stderr
    assert split_path(out, 0).read_bytes() == epoch0  # epoch 0 was not redone
    metrics = tables.read_parquet(out / METRICS_FILE, "metrics").column("epoch").to_pylist()
    assert metrics == [0, 1, 2, 3]
    assert json.loads((out / "model" / "card.json").read_text())["last"]["epoch"] == 3


def test_no_defense_baseline_trains_on_everything(ray_cluster, poisoned_data, tmp_path):
    config = load_config(
        "mnist-quick",
        overrides=[*TINY_RUN, "epochs=1", "defense=none", "split.stage2_epoch=0", "split.stage3_epoch=0"],
    )
    summary = run(config, poisoned_data, tmp_path / "base", progress=lambda _: None)
    metrics = tables.read_parquet(tmp_path / "base" / METRICS_FILE, "metrics").to_pylist()
    assert summary["defense"] == "none" and metrics[0]["clean_pool"] == 240
    truth = tables.read_parquet(poisoned_data.ground_truth, "poison")
    poisoned = int(truth.column("is_poison").to_numpy(zero_copy_only=False).sum())
    assert metrics[0]["poison_in_clean"] == poisoned and metrics[0]["poison_fraction_clean"] == poisoned / 240
    assert not (tmp_path / "base" / "splits").exists()


def test_bad_inputs_fail_before_ray_work(poisoned_data, tmp_path):
    config = load_config("mnist-quick", overrides=TINY_RUN)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError, match="not empty"):
        run(config, poisoned_data, tmp_path / "full")
    too_many = load_config("mnist-quick", overrides=[*TINY_RUN, "split.seeds_per_class=11"])
    with pytest.raises(DataError, match="class 0 .* has 10 seed\\(s\\).*seeds_per_class = 11"):
        run(too_many, poisoned_data, tmp_path / "seeds")
    rgb = load_config("cifar10", overrides=TINY_RUN)
    with pytest.raises(DataError, match="1 channel\\(s\\) but data.mean has 3"):
        run(rgb, poisoned_data, tmp_path / "rgb")
    assert not (tmp_path / "seeds").exists() and not (tmp_path / "rgb").exists()  # nothing written


def test_class_count_mismatch(poisoned_data, tmp_path):
    from conftest import make_shards

    make_shards(tmp_path / "five", n=50, size=16, channels=1, classes=5, name="test")
    inputs = dataclasses.replace(poisoned_data, test=str(tmp_path / "five"))
    with pytest.raises(DataError, match="class-count mismatch.*5 classes.*4"):
        run(load_config("mnist-quick", overrides=TINY_RUN), inputs, tmp_path / "run")


def test_seeds_from_the_clean_parent_are_evidence_against_their_tampered_copies(
    ray_cluster, poisoned_data, tmp_path
):
    """Seeds drawn from the clean parent: each one the attack altered is pinned to the polluted
    pool, and its trusted copy trains in its place (ids after the training set's)."""
    from pathlib import Path

    import numpy as np

    from asd_ray.audit import history
    from asd_ray.data.shards import ShardSet
    from asd_ray.seeds import pick_seeds

    clean = ShardSet(Path(poisoned_data.train).parent / "clean")
    seeds = pick_seeds(clean, 10, seed=3)  # not the oracle: poisoned samples can be drawn
    truth = tables.read_parquet(poisoned_data.ground_truth, "poison")
    modified = truth.column("is_modified").to_numpy(zero_copy_only=False)
    altered = np.intersect1d(seeds.column("sample_id").to_numpy(), np.flatnonzero(modified))
    assert altered.size  # the draw hits poisoned samples, as real seeds would
    tables.write_parquet(seeds, tmp_path / "seeds.parquet", "seeds")
    inputs = dataclasses.replace(poisoned_data, seeds=str(tmp_path / "seeds.parquet"))
    out = tmp_path / "run"
    lines = []
    summary = run(load_config("mnist-quick", overrides=TINY_RUN), inputs, out, progress=lines.append)
    assert summary["seeds_tampered"] == altered.size and summary["seeds_added"] == altered.size
    assert any(f"{altered.size} seed(s) differ" in line for line in lines)
    assert not any("another dataset" in line for line in lines)  # trusted copies are not foreign seeds
    assert ShardSet(out / "trusted-seeds").labels.tolist() == [
        int(seeds.filter(pa.compute.equal(seeds.column("sample_id"), i)).column("label")[0].as_py())
        for i in altered
    ]
    for epoch in range(3):
        split = tables.read_parquet(split_path(out, epoch), "splits")
        assert split.num_rows == 240 + altered.size
        rows = split.to_pylist()
        tampered = [r["sample_id"] for r in rows if r["pinned"] == "tampered"]
        assert tampered == altered.tolist() and all(rows[i]["pool"] == "polluted" for i in tampered)
        trusted = rows[240:]
        assert all(r["pinned"] == "trusted" and r["pool"] == "clean" and r["is_seed"] for r in trusted)
        assert all(r["is_poison"] is False for r in trusted)  # ground truth extended over them
    flagged = {r["sample_id"]: r for r in history.flagged_samples(out, "last").to_pylist()}
    assert all(flagged[i]["suspicion"] == 1.0 for i in altered.tolist())  # proven: the top score


def test_seeds_from_another_dataset_under_the_noise_overlay_are_warned_of_before_training(
    ray_cluster, poisoned_data, tmp_path, monkeypatch
):
    """The advice is printed and logged to RUN/run.log before any worker starts."""
    from conftest import make_shards

    from asd_ray import driver
    from asd_ray.run_folder import RUN_LOG
    from asd_ray.seeds import pick_seeds

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(driver, "_Session", stop)  # nothing to train: the check ends at the start
    other = make_shards(tmp_path / "other", n=80, size=16, channels=1, classes=4, seed=7)
    tables.write_parquet(pick_seeds(other, 10), tmp_path / "seeds.parquet", "seeds")
    inputs = dataclasses.replace(poisoned_data, seeds=str(tmp_path / "seeds.parquet"))
    for overlay, warned in (("0.2", True), ("0", False)):
        out, lines = tmp_path / f"run-{overlay}", []
        config = load_config("mnist-quick", overrides=[*TINY_RUN, f"mixmatch.noise_overlay={overlay}"])
        with pytest.raises(Stopped):
            run(config, inputs, out, progress=lines.append)
        advice = "40 seed(s) come from another dataset and mixmatch.noise_overlay is 0.2"
        assert any(advice in line for line in lines) == warned
        assert (advice in (out / RUN_LOG).read_text()) == warned


def test_memory_budget_serves_shares_from_disk_with_identical_results(tiny_run, poisoned_data, tmp_path):
    root, _, _ = tiny_run
    assert not (root / "cache").exists() or not list((root / "cache").iterdir())  # in memory: no cache
    cache = tmp_path / "cache"
    budget = ["cluster.memory_budget_gb=0.000001", f"cluster.cache_dir={cache}"]
    config = load_config("mnist-quick", overrides=[*TINY_RUN, *budget])
    run(config, poisoned_data, tmp_path / "disk", stop_after_epoch=1, progress=lambda _: None)
    assert cache.is_dir() and not list(cache.iterdir())  # the run's caches, removed at its end
    for epoch in (0, 1):  # epoch 1's pools come from the model trained on disk-served batches
        on_disk = tables.read_parquet(split_path(tmp_path / "disk", epoch), "splits")
        assert on_disk.equals(tables.read_parquet(split_path(root / "run", epoch), "splits"))


def test_repeated_seed_ids_are_refused(poisoned_data, tmp_path):
    seeds = tables.read_parquet(poisoned_data.seeds, "seeds")
    ids = seeds.column("sample_id").to_numpy().copy()
    labels = seeds.column("label").to_numpy()
    for c in range(4):  # one real seed per class, listed ten times: the per-class count still holds
        ids[labels == c] = ids[labels == c][0]
    repeated = seeds.set_column(seeds.schema.get_field_index("sample_id"), "sample_id", pa.array(ids))
    tables.write_parquet(repeated, tmp_path / "repeated.parquet", "seeds")
    inputs = dataclasses.replace(poisoned_data, seeds=str(tmp_path / "repeated.parquet"))
    with pytest.raises(DataError, match="is listed 10 times .*4 id\\(s\\) repeated"):
        run(load_config("mnist-quick", overrides=TINY_RUN), inputs, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting, refusal",
    [
        ("cluster.gpus_per_scorer=1", "asks for 2 GPUs .* the Ray cluster has 0"),
        (
            "cluster.worker_resources={trainer_host: 1}",
            "asks for 2 of the custom resource trainer_host .*ray start --resources .* the Ray cluster has 0",
        ),
    ],
)
def test_a_request_the_cluster_cannot_meet_is_refused_not_awaited(
    ray_cluster, poisoned_data, tmp_path, setting, refusal
):
    config = load_config("mnist-quick", overrides=[*TINY_RUN, setting])
    with pytest.raises(DataError, match=refusal):
        run(config, poisoned_data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_image_found_by_the_actors_is_one_clear_error(ray_cluster, poisoned_data, tmp_path):
    import shutil
    import tarfile
    from pathlib import Path

    train = tmp_path / "train"
    shutil.copytree(poisoned_data.train, train)
    shard = sorted(train.glob("*.tar"))[1]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 16 : member.offset_data + 40] = b"\xff" * 24  # header checksums stay valid
    shard.write_bytes(bytes(data))
    (train / "poison.parquet").unlink()
    inputs = dataclasses.replace(poisoned_data, train=str(train), ground_truth=None, seeds=None)
    config = load_config("mnist-quick", overrides=[*TINY_RUN, "defense=none"])
    with pytest.raises(DataError) as caught:
        run(config, inputs, tmp_path / "run", progress=lambda _: None)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and shard.name in message and Path(member.name).stem in message


def test_a_second_driver_on_the_same_run_folder_is_refused(ray_cluster, poisoned_data, tmp_path):
    from asd_ray.run_lock import lock_run_folder

    held = lock_run_folder(tmp_path / "run")  # as if another driver were writing it
    try:
        with pytest.raises(DataError, match="is being written by the asd-ray driver pid .* on .* since"):
            run(load_config("mnist-quick", overrides=TINY_RUN), poisoned_data, tmp_path / "run")
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing else was written
    finally:
        held.close()
    assert not (tmp_path / "run").exists()  # the holder started no run there: what it made is gone


def test_resume_applies_cluster_and_epochs_and_refuses_other_changes(poisoned_data, tmp_path):
    from asd_ray.config import config_yaml

    out = tmp_path / "run"
    out.mkdir()
    saved = load_config("mnist-quick", overrides=TINY_RUN)
    (out / "config.yaml").write_text(config_yaml(saved))
    (out / "inputs.json").write_text(json.dumps(dataclasses.asdict(poisoned_data.absolute())))
    changed = load_config(None, out / "config.yaml", ["mixmatch.lr=0.01", "cluster.workers=1"])
    with pytest.raises(
        DataError,
        match="mixmatch.lr differs from the run's config .*only cluster.\\*, storage.\\* and epochs may change",
    ):
        run(changed, poisoned_data, out, resume=True)


@pytest.mark.slow  # transfer pre-training end to end (about 40 s), with the other transfer runs
def test_transfer_pretraining_starts_asd_from_seeds_of_another_dataset(ray_cluster, poisoned_data, tmp_path):
    """Seeds from another shard set: pre-training runs once before epoch 0, its model is
    checkpointed (a resume starts from it, not again), and its figures are recorded. The
    shares are over a memory budget: their trusted copies join a disk-cached share."""
    from conftest import make_shards

    from asd_ray.models import ModelSpec
    from asd_ray.run_folder import PRETRAIN_FILE
    from asd_ray.seeds import pick_seeds

    other = make_shards(tmp_path / "other", n=80, size=16, channels=1, classes=4, seed=7)
    tables.write_parquet(pick_seeds(other, 10), tmp_path / "seeds.parquet", "seeds")
    inputs = dataclasses.replace(poisoned_data, seeds=str(tmp_path / "seeds.parquet"))
    config = load_config(
        "mnist-quick",
        overrides=[
            *TINY_RUN,
            "transfer.semi_epochs=2",
            "transfer.head_epochs=0.5",
            "transfer.head_min_steps=0",
            "cluster.memory_budget_gb=0.000001",
            f"cluster.cache_dir={tmp_path / 'cache'}",
        ],
    )
    out = tmp_path / "run"
    lines = []
    first = run(config, inputs, out, stop_after_epoch=-1, progress=lines.append)  # pre-training alone
    assert first["epochs"] == 0 and first["seeds_added"] == 40
    pretrained = [
        line for line in lines if "transfer pre-training (2 MixMatch epochs with the 40 seeds" in line
    ]
    assert len(pretrained) == 1
    record = json.loads((out / PRETRAIN_FILE).read_text())
    assert record["labeled"] == 40 and record["head_steps"] == 2  # half of 280 samples in batches of 128
    # its figures are those of the checkpointed pre-trained model, evaluated here
    (checkpoint,) = [c for c in (out / "train").glob("checkpoint_*") if c.is_dir()]
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    pretrained = ModelSpec("small_cnn", 4, 1, 16).build()
    pretrained.load_state_dict(state["model"])
    assert state["epoch"] == -1
    figures = figures_of(pretrained, inputs)
    assert {k: record[k] for k in figures} == pytest.approx(figures, abs=1e-12)
    lines.clear()
    summary = run(config, inputs, out, resume=True, progress=lines.append)
    assert not any("transfer pre-training" in line for line in lines)  # the checkpoint carried it
    assert any("resumed from checkpoint_" in line and "(epoch -1)" in line for line in lines)
    assert summary["epochs"] == 3 and summary["pretrain"] == record
    assert not list((tmp_path / "cache").iterdir())  # the runs' caches, removed at their ends
