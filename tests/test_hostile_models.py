"""Model files are untrusted: a card never chooses code to run, and every malformed or
hostile card or state dict is refused with one line (exit 2), never a traceback.

Also the CLI's exit codes: only asd-ray's own error types are the user's mistake
(exit 2); anything else is a bug (exit 1 with its traceback). And text from data
or model files reaches the terminal with its control characters escaped.
"""

import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_shards

import asd_ray.config
from asd_ray.cli import main
from asd_ray.cli.common import format_table
from asd_ray.data.shards import ShardSet
from asd_ray.errors import ConfigError, DataError
from asd_ray.models import ModelSpec, saved
from asd_ray.models.registry import to_numpy_weights
from asd_ray.models.saved import load_model, save_model

CLASSES = 4
SIDE = 8


def _card(**architecture) -> dict:
    """A valid card for a small_cnn on 8x8 grey images, as a run writes it."""
    arch = dict(
        name="small_cnn", num_classes=CLASSES, in_channels=1, image_size=SIDE, factory=None, meta_layers=[]
    )
    arch.update(architecture)
    return {
        "asd_ray_version": "0",
        "architecture": arch,
        "classes": [f"c{i}" for i in range(CLASSES)],
        "input": {"height": SIDE, "width": SIDE, "channels": 1, "mean": [0.5], "std": [0.25]},
        "epoch": 3,
        "kind": "best",
    }


def _weights(card: dict) -> dict:
    arch = card["architecture"]
    spec = ModelSpec(
        arch["name"],
        arch["num_classes"],
        arch["in_channels"],
        arch["image_size"],
        arch["factory"],
        tuple(arch["meta_layers"]),
    )
    return to_numpy_weights(spec.build())


def _raw_model_file(path: Path, payload) -> Path:
    """Any payload torch.save can write (and weights-only loading reads), as a .pt file."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def model_dir(tmp_path) -> Path:
    card = _card()
    save_model(tmp_path / "model", "best", _weights(card), card)
    return tmp_path / "model"


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_models")
    make_shards(root / "test", n=24, classes=CLASSES, size=SIDE, channels=1, name="test")
    return root / "test"


def _evaluate(model: Path, test_set: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["evaluate", "--model", str(model), "--test", str(test_set), "--quiet", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_valid_model_file_loads_and_evaluates(model_dir, test_set, capsys):
    model = load_model(model_dir)
    assert model.card["epoch"] == 3 and not model.training
    code, out, err = _evaluate(model_dir, test_set, capsys)
    assert code == 0, err
    images, labels = ShardSet(test_set).load_arrays()  # the model's own accuracy, computed here
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        hits = (model(x).argmax(1).numpy() == labels).sum()
    result = json.loads(out)
    assert result["acc"] == hits / 24 and result["asr"] is None and result["robust_acc"] is None


@pytest.fixture
def trap(tmp_path, monkeypatch) -> tuple[str, Path]:
    """An importable module that leaves a marker file when its top-level code runs."""
    marker = tmp_path / "code-ran"
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "asd_trap_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def build(**kwargs):\n    raise SystemExit('factory called')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    yield "asd_trap_module:build", marker
    sys.modules.pop("asd_trap_module", None)


def test_a_card_naming_a_factory_runs_no_code(tmp_path, trap, test_set, capsys):
    factory, marker = trap
    card = _card(name="custom", factory=factory, meta_layers=["block4"])
    save_model(tmp_path / "model", "best", _weights(_card()), card)
    with pytest.raises(DataError, match="never chooses code to run.*--factory asd_trap_module:build"):
        load_model(tmp_path / "model")
    code, out, err = _evaluate(tmp_path / "model", test_set, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "--factory" in err
    assert not marker.exists(), "the model file made asd-ray import the module it names"


def test_a_custom_model_loads_only_with_the_users_own_matching_factory(tmp_path, test_set, capsys):
    factory = "custom_factory:tiny_net"  # tests/ is on sys.path under pytest
    card = _card(name="custom", factory=factory, meta_layers=["0"])
    save_model(tmp_path / "model", "best", _weights(card), card)
    model = load_model(tmp_path / "model", factory=factory)
    assert model(torch.zeros(2, 1, SIDE, SIDE)).shape == (2, CLASSES)
    code, out, err = _evaluate(tmp_path / "model", test_set, capsys, "--factory", factory)
    assert code == 0, err
    with pytest.raises(DataError, match="is not the factory this model was trained with"):
        load_model(tmp_path / "model", factory="custom_factory:other")


def test_a_built_in_model_refuses_a_factory(model_dir):
    with pytest.raises(DataError, match="needs no factory"):
        load_model(model_dir, factory="custom_factory:tiny_net")


def _without(card: dict, path: tuple[str, ...]) -> dict:
    card = copy.deepcopy(card)
    node = card
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return card


def _with(card: dict, path: tuple[str, ...], value) -> dict:
    card = copy.deepcopy(card)
    node = card
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return card


def _leaf_paths(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in node.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _leaf_paths(value, (*prefix, key))
    return paths


REQUIRED = [
    p
    for p in _leaf_paths(_card())
    if p not in {("asd_ray_version",), ("architecture", "factory"), ("architecture", "meta_layers")}
]
HOSTILE_VALUES = [None, "10", 10**9, -1, 2.5, True, [], {}, "\x1b[2J", float("nan")]


def _cards() -> list[tuple[str, object, bool]]:
    """(case, card, whether it may load): every required field missing, every field given
    every hostile value, and cards that are wrong as a whole."""
    base = _card()
    cases = [(f"missing {'.'.join(p)}", _without(base, p), False) for p in REQUIRED]
    for path in _leaf_paths(base):
        for value in HOSTILE_VALUES:
            changed = _with(base, path, value)
            # only free text that is never used to build or size anything may change
            harmless = path == ("asd_ray_version",)
            if changed != base:
                cases.append((f"{'.'.join(path)}={value!r}", changed, harmless))
    cases += [
        ("card is a string", "architecture: resnet18", False),
        ("card is a list", [1, 2], False),
        ("card is None", None, False),
        ("unknown architecture", _with(base, ("architecture", "name"), "os.system"), False),
        ("a factory on a built-in", _with(base, ("architecture", "factory"), "os:system"), False),
        ("custom without a factory", _with(base, ("architecture", "name"), "custom"), False),
        ("classes do not match", _with(base, ("classes",), ["a", "b"]), False),
        ("a class name is not text", _with(base, ("classes",), [1, 2, 3, 4]), False),
        ("mean per channel missing", _with(base, ("input", "mean"), []), False),
        ("std zero", _with(base, ("input", "std"), [0.0]), False),
        (
            "architecture and input disagree on channels",
            _with(base, ("architecture", "in_channels"), 3),
            False,
        ),
        ("architecture and input disagree on size", _with(base, ("architecture", "image_size"), 32), False),
        ("a side over the JPEG limit", _with(base, ("input", "width"), 70_000), False),
        ("an unknown kind", _with(base, ("kind",), "newest"), False),
        (
            "pixels over the limit",
            _with(_with(base, ("input", "height"), 10**6), ("input", "width"), 10**6),
            False,
        ),
    ]
    return cases


@pytest.mark.parametrize(("name", "card", "may_load"), [pytest.param(*case, id=case[0]) for case in _cards()])
def test_every_malformed_or_hostile_card_is_one_line(tmp_path, name, card, may_load):
    state = {k: torch.from_numpy(v) for k, v in _weights(_card()).items()}
    path = _raw_model_file(tmp_path / "m.pt", {"format": saved.FORMAT, "state_dict": state, "card": card})
    if may_load:
        assert load_model(path).card["epoch"] == 3
        return
    with pytest.raises(DataError) as refused:
        load_model(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"format": "asd-ray-model/1", "card": _card()}, id="no state_dict"),
        pytest.param(
            {"format": "asd-ray-model/1", "state_dict": "weights", "card": _card()}, id="state_dict str"
        ),
        pytest.param({"format": "asd-ray-model/1", "state_dict": {}, "card": _card()}, id="state_dict empty"),
        pytest.param(
            {"format": "asd-ray-model/1", "state_dict": {"w": [1, 2]}, "card": _card()},
            id="value not a tensor",
        ),
        pytest.param(
            {"format": "asd-ray-model/1", "state_dict": {"head.weight": torch.zeros(3)}, "card": _card()},
            id="weights that do not fit",
        ),
        pytest.param({"format": "other", "state_dict": {}, "card": _card()}, id="wrong format"),
        pytest.param([1, 2, 3], id="not a mapping"),
    ],
)
def test_every_malformed_state_dict_is_one_line(tmp_path, test_set, capsys, payload):
    path = _raw_model_file(tmp_path / "m.pt", payload)
    with pytest.raises(DataError):
        load_model(path)
    code, out, err = _evaluate(path, test_set, capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err


def test_truncated_and_foreign_files_are_one_line(model_dir, tmp_path, test_set, capsys):
    data = (model_dir / "best.pt").read_bytes()
    for name, body in (("truncated", data[: len(data) // 2]), ("text", b"not a model"), ("empty", b"")):
        path = tmp_path / f"{name}.pt"
        path.write_bytes(body)
        code, out, err = _evaluate(path, test_set, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, (name, err)


def test_model_files_are_refused_on_a_torch_whose_weights_only_load_can_run_code(model_dir, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ConfigError, match="install torch >= 2.6"):
        load_model(model_dir)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(model_dir, monkeypatch):
    monkeypatch.setattr(saved, "MAX_MODEL_BYTES", 1000)
    with pytest.raises(DataError, match="larger than the 1000-byte limit"):
        load_model(model_dir)


def test_a_bug_exits_1_with_its_traceback_not_as_bad_input(monkeypatch, capsys):
    def broken(config):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(asd_ray.config, "config_yaml", broken)
    code = main(["config", "show", "--preset", "mnist-quick"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" in err and "internal invariant" in err and "bug in asd-ray" in err


def test_a_bad_setting_is_the_users_mistake(capsys):
    code = main(["config", "show", "--preset", "mnist-quick", "--set", "mixmatch.lr=-1"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "mixmatch.lr" in err


def test_control_characters_from_data_never_reach_the_terminal_raw(tmp_path, capsys):
    hostile = tmp_path / "x\x1b[2J\u202e.yaml"
    code = main(["config", "show", "--config", str(hostile)])
    _, err = capsys.readouterr()
    assert code == 2 and "\x1b" not in err and "\u202e" not in err and "\\x1b[2J\\u202e" in err
    table = format_table([{"class": "cat\x1b[31m\nred"}], ["class"])
    assert "\x1b" not in table and "cat\\x1b[31m\\nred" in table


def test_a_card_whose_architecture_cannot_be_built_blames_the_file(tmp_path):
    card = _card()
    state = {k: torch.from_numpy(v) for k, v in _weights(card).items()}
    small = _with(
        _with(_with(card, ("architecture", "image_size"), 4), ("input", "height"), 4), ("input", "width"), 4
    )
    path = _raw_model_file(tmp_path / "m.pt", {"format": saved.FORMAT, "state_dict": state, "card": small})
    with pytest.raises(DataError, match="the card's architecture cannot be built"):
        load_model(path)


def test_a_factory_with_the_wrong_signature_is_the_flags_mistake(tmp_path, monkeypatch):
    (tmp_path / "asd_wrong_factory.py").write_text("def build(classes):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = "asd_wrong_factory:build"
    card = _card(name="custom", factory=factory, meta_layers=["0"])
    save_model(tmp_path / "model", "best", _weights(_card()), card)
    with pytest.raises(ConfigError, match="cannot be called as"):
        load_model(tmp_path / "model", factory=factory)
    sys.modules.pop("asd_wrong_factory", None)


def test_a_traceback_reaches_the_terminal_escaped(monkeypatch, capsys):
    def broken(config):
        raise KeyError("\x1b[2J column")

    monkeypatch.setattr(asd_ray.config, "config_yaml", broken)
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J column" in err


def test_a_config_file_that_is_not_text_is_the_users_mistake(tmp_path, capsys):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe epochs: 3")
    assert main(["config", "show", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_resuming_a_run_folder_never_imports_the_factory_it_names(tmp_path, trap, capsys):
    factory, marker = trap
    run = tmp_path / "run"
    run.mkdir()
    config = asd_ray.config.load_config(
        "mnist-quick", overrides=["model.name=custom", f"model.factory={factory}", "model.meta_layers=[x]"]
    )
    (run / "config.yaml").write_text(asd_ray.config.config_yaml(config))
    assert main(["run", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--set model.factory={factory}" in err and len(err.splitlines()) == 1
    assert not marker.exists()


def test_a_run_whose_out_is_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    argv = ["run", "--train", "t", "--test", "t", "--out", str(tmp_path / "afile" / "run"), "--quiet"]
    assert main(argv) == 2
    assert "afile is a file; name a folder for the run" in capsys.readouterr().err
