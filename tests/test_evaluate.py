"""ACC, ASR, robust accuracy and the detection figures on hand-computed cases, and
``evaluate_model`` on shard sets with a model whose every prediction is known."""

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import auroc_by_pairs

from asd_ray.attacks.poison import poison_test_shards
from asd_ray.config import AttackConfig
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.sources import from_arrays
from asd_ray.errors import DataError
from asd_ray.evaluate import (
    accuracy,
    attack_success_rate,
    auroc,
    detection,
    evaluate_model,
    robust_accuracy,
)
from asd_ray.scores import PASS_SCHEMA


def _pass(labels, predictions) -> pa.Table:
    """A prediction pass as the scoring pool returns it (the loss does not matter here)."""
    n = len(labels)
    columns = [
        np.arange(n),
        np.asarray(labels, np.int32),
        np.zeros(n, np.float32),
        np.asarray(predictions, np.int32),
    ]
    return pa.Table.from_arrays([pa.array(c) for c in columns], schema=PASS_SCHEMA)


# --- the figures on prediction passes ---------------------------------------------------------


def test_accuracy_is_the_share_of_rows_predicted_as_labelled():
    assert accuracy(_pass([0, 1, 2, 3, 1], [0, 1, 0, 3, 2])) == 3 / 5
    assert accuracy(_pass([2, 2], [2, 2])) == 1.0 and accuracy(_pass([2, 2], [0, 1])) == 0.0
    with pytest.raises(ValueError, match="zero samples"):
        accuracy(_pass([], []))


def test_asr_is_the_share_of_the_triggered_set_predicted_as_the_attackers_label():
    # the triggered set carries the attacker's label (target 1) on every row
    assert attack_success_rate(_pass([1, 1, 1, 1], [1, 0, 1, 3])) == 2 / 4
    with pytest.raises(ValueError, match="zero samples"):
        attack_success_rate(_pass([], []))


def test_robust_accuracy_counts_the_original_labels_kept_under_the_trigger():
    triggered = _pass([1, 1, 1, 1, 1], [1, 0, 2, 1, 3])  # attacker's labels, the model's predictions
    original = np.array([0, 0, 2, 3, 3])
    assert robust_accuracy(triggered, original) == 3 / 5  # rows 1, 2 and 4 kept their class
    assert attack_success_rate(triggered) == 2 / 5  # rows 0 and 3: a row cannot count for both
    with pytest.raises(ValueError, match="5 predictions for 4 original labels"):
        robust_accuracy(triggered, original[:4])
    with pytest.raises(ValueError, match="zero samples"):
        robust_accuracy(_pass([], []), np.array([], np.int64))


def test_auroc_by_hand_and_against_every_pair():
    positives = np.array([False, False, True, True])
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), positives) == 0.75  # 0.35 loses to 0.4 only
    assert auroc(np.array([0.1, 0.2, 0.3, 0.4]), positives) == 1.0
    assert auroc(np.array([0.4, 0.3, 0.2, 0.1]), positives) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), positives) == 0.5  # all ties: half each
    assert auroc(np.array([0.1, 0.5, 0.5, 0.9]), positives) == 0.875  # one tie of four pairs
    assert auroc(np.array([0.1, 0.2]), np.array([True, True])) is None
    assert auroc(np.array([0.1, 0.2]), np.array([False, False])) is None
    rng = np.random.default_rng(0)
    for _ in range(20):  # many ties: scores on a coarse grid
        scores = rng.integers(0, 6, 40) / 5
        positives = rng.random(40) < 0.3
        assert auroc(scores, positives) == pytest.approx(auroc_by_pairs(scores, positives), abs=1e-12)


def test_detection_by_hand():
    flagged = np.array([True, True, False, False, True, False])
    poisoned = np.array([True, False, False, True, True, False])
    suspicion = np.array([0.9, 0.8, 0.1, 0.7, 1.0, 0.0])
    figures = detection(flagged, poisoned, suspicion)
    # 2 of the 3 flagged are poisoned, 2 of the 3 poisoned are flagged
    assert figures["precision"] == pytest.approx(2 / 3) and figures["recall"] == pytest.approx(2 / 3)
    assert figures["f1"] == pytest.approx(2 / 3)
    assert figures["auroc"] == pytest.approx(8 / 9)  # 0.7 loses to 0.8 only
    uneven = detection(
        np.array([True, True, True, True, False]), np.array([True, False, False, False, False]), np.zeros(5)
    )
    assert (uneven["precision"], uneven["recall"]) == (0.25, 1.0) and uneven["f1"] == pytest.approx(0.4)
    assert uneven["auroc"] == 0.5  # equal scores: no ranking


def test_detection_where_a_figure_is_undefined_or_zero():
    nothing_flagged = detection(np.zeros(4, bool), np.array([True, False, False, False]), np.zeros(4))
    assert nothing_flagged["precision"] is None and nothing_flagged["recall"] == 0.0
    assert nothing_flagged["f1"] is None
    no_poison = detection(np.array([True, False]), np.zeros(2, bool), np.array([0.2, 0.1]))
    assert no_poison == {"precision": 0.0, "recall": None, "f1": None, "auroc": None}
    all_wrong = detection(np.array([True, False]), np.array([False, True]), np.array([1.0, 0.0]))
    assert all_wrong == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auroc": 0.0}


# --- evaluate_model on shard sets ---------------------------------------------------------------

GREY = {0: 20, 1: 70, 2: 120, 3: 170}  # every image of a class is this one grey level
TARGET = 1
MEAN, STD = 0.5, 0.25


class TwoPixelModel(torch.nn.Module):
    """A classifier whose every prediction is known: the corner pixel's grey level gives the
    class; a 2x2 patch at rows 4-5, columns 4-5 that differs from the corner (BadNets' small
    image trigger) sends the image to the target, unless its class is ``immune``; on clean
    images ``confuse`` maps a class to another."""

    def __init__(self, *, immune=(), confuse=None, num_classes=4, side=8):
        super().__init__()
        self.immune, self.confuse = set(immune), confuse or {}
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # scoring finds the device from a parameter
        self.card = {
            "input": {"height": side, "width": side, "channels": 1, "mean": [MEAN], "std": [STD]},
            "architecture": {"num_classes": num_classes},
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = (x * STD + MEAN) * 255  # back to the stored pixels
        corner = raw[:, 0, 0, 0]
        true = ((corner - 20) / 50).round().long().clamp(0, 3)
        triggered = (raw[:, 0, 4:6, 4:6] - corner[:, None, None]).abs().amax((1, 2)) > 1
        prediction = true.clone()
        for a, b in self.confuse.items():
            prediction[(true == a) & ~triggered] = b
        fooled = triggered & ~torch.isin(true, torch.tensor(sorted(self.immune), dtype=torch.long))
        prediction[fooled] = TARGET
        return torch.nn.functional.one_hot(prediction, 4).float() * 10 + self.anchor


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A clean test set of 12 grey 8x8 images (3 per class) and its BadNets ASR set (target 1):
    the 9 images outside the target class, triggered and labelled 1."""
    root = tmp_path_factory.mktemp("evaluate")
    labels = np.arange(12) % 4
    images = np.stack([np.full((8, 8, 1), GREY[c], np.uint8) for c in labels])
    write_shards(from_arrays(images, labels), root / "test", name="test", samples_per_shard=5)
    poison_test_shards(root / "test", root / "asr", AttackConfig("badnets", target=TARGET))
    return ShardSet(root / "test"), ShardSet(root / "asr")


def test_evaluate_model_gives_the_hand_counted_figures(sets):
    test, asr = sets
    assert len(asr) == 9 and (asr.labels == TARGET).all()
    model = TwoPixelModel(immune={3}, confuse={2: 3})
    figures = evaluate_model(model, test, asr, batch_size=5)
    # ACC: class 2's 3 images are read as 3, the other 9 right
    # ASR: the triggered images of classes 0 and 2 (6) go to the target, class 3's 3 do not;
    #      the target class's own images are not in the set (else it would be 9/12)
    # robust: class 3's 3 triggered images keep their class
    assert figures == {"acc": 9 / 12, "asr": 6 / 9, "robust_acc": 3 / 9}
    assert evaluate_model(TwoPixelModel(), test, asr) == {"acc": 1.0, "asr": 1.0, "robust_acc": 0.0}
    assert evaluate_model(TwoPixelModel(immune={0, 2, 3}), test, asr)["asr"] == 0.0


def test_evaluate_model_without_a_triggered_set_or_its_ground_truth(sets, tmp_path):
    test, asr = sets
    assert evaluate_model(TwoPixelModel(), test) == {"acc": 1.0, "asr": None, "robust_acc": None}
    bare = tmp_path / "asr"
    shutil.copytree(asr.folder, bare)
    (bare / GROUND_TRUTH_FILE).unlink()
    assert evaluate_model(TwoPixelModel(), test, ShardSet(bare)) == {
        "acc": 1.0,
        "asr": 1.0,
        "robust_acc": None,
    }


def test_evaluate_model_refuses_sets_the_model_cannot_read(sets):
    test, asr = sets
    with pytest.raises(DataError, match="has 4 classes, the model 5"):
        evaluate_model(TwoPixelModel(num_classes=5), test)
    with pytest.raises(DataError, match=r"images are \(8, 8, 1\), the model takes \(16, 16, 1\)"):
        evaluate_model(TwoPixelModel(side=16), test, asr)
