import json
import subprocess
import sys

import numpy as np
import pytest

from asd_ray.cli import build_parser, main
from asd_ray.data.shards import ShardSet


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "command", [[], ["shards"], ["shards", "make"], ["shards", "inspect"], ["poison"], ["seeds"], ["run"]]
)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: asd-ray" in capsys.readouterr().out


def test_make_poison_seeds_inspect_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.arange(120) % 3)
    np.save(tmp_path / "xt.npy", rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8))
    np.save(tmp_path / "yt.npy", np.arange(30) % 3)
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    steps = [
        [
            "shards",
            "make",
            "--source",
            "arrays",
            "--images",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--out",
            a,
            "--samples-per-shard",
            "50",
        ],
        [
            "shards",
            "make",
            "--source",
            "arrays",
            "--split",
            "test",
            "--images",
            str(tmp_path / "xt.npy"),
            "--labels",
            str(tmp_path / "yt.npy"),
            "--out",
            a + "t",
        ],
        [
            "poison",
            "--attack",
            "badnets",
            "--rate",
            "0.1",
            "--target",
            "1",
            "--in",
            a,
            "--out",
            b,
            "--test-in",
            a + "t",
            "--test-out",
            b + "t",
        ],
        ["seeds", "--per-class", "5", "--in", a, "--out", str(tmp_path / "S.parquet")],
        ["shards", "inspect", b],
    ]
    summaries = []
    for argv in steps:
        code, out, err = run(argv, capsys)
        assert code == 0, err
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    assert summaries[0]["samples"] == 120 and summaries[0]["shards"] == 3
    # what the poisoned shards hold, against the clean ones: each poisoned sample is relabelled
    # to the target and its image changed, nothing else (the seeded draw takes 14 of the 80
    # non-target samples at rate 0.1)
    clean_images, clean_labels = ShardSet(a).load_arrays()
    images, labels = ShardSet(b).load_arrays()
    relabelled = labels != clean_labels
    assert summaries[2]["test_samples"] == 20 and summaries[2]["poisoned"] == relabelled.sum() == 14
    assert (labels[relabelled] == 1).all() and (clean_labels[relabelled] != 1).all()
    assert np.array_equal((images != clean_images).any(axis=(1, 2, 3)), relabelled)
    assert summaries[3]["seeds"] == 15
    assert summaries[4]["ground_truth_poisoned"] == summaries[2]["poisoned"]


def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    code, out, err = run(["shards", "inspect", str(tmp_path / "missing")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("asd-ray: error: shard folder") and "asd-ray shards make" in err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = run(
        [
            "shards",
            "make",
            "--source",
            "arrays",
            "--images",
            str(tmp_path / "obj.npy"),
            "--labels",
            str(tmp_path / "obj.npy"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "pickle" in err.lower() and not (tmp_path / "o").exists()


def test_console_script_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "asd_ray", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "poison" in result.stdout


def test_overwrite_replaces_only_shard_sets_and_outputs_never_equal_inputs(tmp_path, capsys):
    from conftest import make_shards

    make_shards(tmp_path / "clean", n=40, size=8, classes=4, per_shard=20)
    users = tmp_path / "users-folder"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    poison = [
        "poison",
        "--attack",
        "badnets",
        "--rate",
        "0.2",
        "--target",
        "1",
        "--in",
        str(tmp_path / "clean"),
    ]
    code, _, err = run([*poison, "--out", str(users), "--overwrite"], capsys)
    assert code == 2 and "is not a shard set made by asd-ray (it holds 'thesis.tex')" in err
    assert (users / "thesis.tex").read_text() == "years of work"
    code, _, err = run([*poison, "--out", str(tmp_path / "clean"), "--overwrite"], capsys)
    assert code == 2 and "--out and --in are the same folder" in err
    code, _, err = run(
        [
            *poison,
            "--out",
            str(tmp_path / "p"),
            "--test-in",
            str(tmp_path / "clean"),
            "--test-out",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert code == 2 and "are the same folder" in err and not (tmp_path / "p").exists()
    assert run([*poison, "--out", str(tmp_path / "p")], capsys)[0] == 0
    assert (
        run([*poison, "--out", str(tmp_path / "p"), "--overwrite", "--seed", "1"], capsys)[0] == 0
    )  # a shard set


def test_resume_reads_the_run_config_and_refuses_algorithm_changes(tmp_path, capsys):
    from asd_ray.config import config_yaml, load_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(config_yaml(load_config("mnist-quick")))
    code, _, err = run(["run", "--out", str(out), "--resume", "--set", "mixmatch.lr=0.01"], capsys)
    assert code == 2 and "mixmatch.lr differs from the run's config" in err and len(err.splitlines()) == 1
    code, _, err = run(["run", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "no config.yaml there" in err


def test_a_record_older_than_a_setting_resumes_with_what_it_ran(tmp_path):
    """A run folder recorded before mixmatch.noise_overlay and split.meta_loss_guard existed
    ran the paper's algorithm: its resume keeps that (0), not today's defaults, and an
    explicit value still wins."""
    import yaml

    from asd_ray.config import config_yaml, load_config, load_recorded_config

    values = yaml.safe_load(config_yaml(load_config("mnist-quick")))
    assert values["mixmatch"].pop("noise_overlay") == 0.2
    assert values["split"].pop("meta_loss_guard") == 0.2
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(values))
    resumed = load_recorded_config(old)
    assert resumed.mixmatch.noise_overlay == 0.0 and resumed.split.meta_loss_guard == 0.0
    assert load_recorded_config(old, ["mixmatch.noise_overlay=0.1"]).mixmatch.noise_overlay == 0.1
    new = tmp_path / "new.yaml"
    new.write_text(config_yaml(load_config("mnist-quick", overrides=["mixmatch.noise_overlay=0.15"])))
    assert load_recorded_config(new).mixmatch.noise_overlay == 0.15
    assert load_recorded_config(new).split.meta_loss_guard == 0.2


def test_paper_turns_off_every_setting_the_paper_does_not_have(capsys):
    """--paper: the two settings on by default and the hold-out go to 0; --set still wins."""
    import yaml

    code, out, _ = run(["config", "show", "--preset", "mnist-quick"], capsys)
    default = yaml.safe_load(out)
    assert code == 0 and default["split"]["meta_loss_guard"] > 0 and default["mixmatch"]["noise_overlay"] > 0
    code, out, _ = run(["config", "show", "--preset", "mnist-quick", "--paper"], capsys)
    paper = yaml.safe_load(out)
    assert code == 0
    assert (paper["split"]["meta_loss_guard"], paper["split"]["holdout_ratio"]) == (0, 0)
    assert paper["mixmatch"]["noise_overlay"] == 0
    paper["split"]["meta_loss_guard"] = paper["mixmatch"]["noise_overlay"] = "default"
    default["split"]["meta_loss_guard"] = default["mixmatch"]["noise_overlay"] = "default"
    assert paper == default  # nothing else changes
    argv = ["config", "show", "--preset", "mnist-quick", "--paper", "--set", "mixmatch.noise_overlay=0.1"]
    code, out, _ = run(argv, capsys)
    assert yaml.safe_load(out)["mixmatch"]["noise_overlay"] == 0.1


@pytest.mark.parametrize(
    ("attack", "flags"),
    [
        ("sig", ["--rate", "0.5", "--sig-delta", "30", "--sig-frequency", "2"]),
        ("adaptive-blend", ["--rate", "0.3", "--adaptive-pieces", "3", "--adaptive-grid", "2"]),
    ],
)
def test_poison_runs_the_new_attacks_with_their_flags(tmp_path, capsys, attack, flags):
    from conftest import make_shards

    from asd_ray import tables

    make_shards(tmp_path / "clean", n=40, size=8, classes=4, per_shard=20)
    make_shards(tmp_path / "clean-test", n=12, size=8, classes=4, seed=1, name="test")
    argv = ["poison", "--attack", attack, "--target", "1", "--in", str(tmp_path / "clean")]
    argv += ["--out", str(tmp_path / "p"), "--test-in", str(tmp_path / "clean-test")]
    code, out, err = run([*argv, "--test-out", str(tmp_path / "pt"), *flags, "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    truth = tables.read_parquet(tmp_path / "p" / "poison.parquet", "poison").to_pydict()
    params = json.loads(truth["params"][0])
    assert summary["attack"] == attack == truth["attack"][0] and summary["test_samples"] == 9
    if attack == "sig":
        assert summary["poisoned"] == 5 and summary["cover"] == 0  # half of the 10 target samples
        assert (params["sig_delta"], params["sig_frequency"]) == (30.0, 2.0)
    else:  # 7 relabelled to the target (seeded draw, rate 0.3 of 30), as many covers that keep theirs
        clean_images, clean_labels = ShardSet(tmp_path / "clean").load_arrays()
        images, labels = ShardSet(tmp_path / "p").load_arrays()
        relabelled, changed = labels != clean_labels, (images != clean_images).any(axis=(1, 2, 3))
        assert summary["poisoned"] == relabelled.sum() == 7 and (labels[relabelled] == 1).all()
        assert summary["cover"] == (changed & ~relabelled).sum() == 7 and changed[relabelled].all()
        assert sum(truth["is_modified"]) == 2 * sum(truth["is_poison"])
        assert (params["adaptive_pieces"], params["adaptive_grid"]) == (3, 2)
