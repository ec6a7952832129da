"""`python -m train` as a user meets it: config values checked, errors in one line, and `eval` on any
checkpoint a run or a release leaves, saying how many videos it evaluated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from train_support import tiny_config

from contract import checkpoints
from train import cli
from train.loop import fit

CODE = ["imports=[train_support]", "data.loader=train_support:SyntheticLoader"]   # never read from a checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished one-epoch run on synthetic clips: runs/<run> with config, metrics and a checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    fit(tiny_config(root, sched={"epochs": 1}, train={"eval_every": 0}, eval={"at_end": False}))
    return root / "run"


@pytest.fixture
def recipe(tmp_path) -> Path:
    cfg = tiny_config(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: cfg[k] for k in ("imports", "model", "data", "optim", "train")}))
    return path


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr='abc': expected a number, got str"),
    ("model=tsm_r18", "model='tsm_r18': model is a section, not a value; set its keys, e.g. model.name=..."),
    ("sched.epochs=0", "sched.epochs=0: must be at least 1"),
    ("model.num_classes=2", "model.num_classes=2 but the train shards (synthetic:32) name 4 classes "
                            "[class0, class1, class2, class3]; set model.num_classes=4"),
])
def test_a_wrong_config_value_is_one_line_naming_key_value_and_what_was_expected(recipe, tmp_path, capsys,
                                                                                 override, message):
    with pytest.raises(SystemExit) as exit:
        cli.main(["fit", "--config", str(recipe), override, "--run-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()


def test_a_bug_is_not_passed_off_as_a_users_error(recipe, monkeypatch):
    def broken_fit(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("train.loop.fit", broken_fit)
    with pytest.raises(ZeroDivisionError):
        cli.main(["fit", "--config", str(recipe)])


def test_a_run_that_cannot_start_leaves_no_config_behind(tmp_path):
    """The real loader refuses a folder without shards after the model is built: nothing is written."""
    cfg = tiny_config(tmp_path, data={"loader": "pipelines.loader:VideoLoader", "train": {"shards": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="has no split .train."):
        fit(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", ["run", "run/checkpoints", "run/checkpoints/epoch0001-update00000004.pt"])
def test_eval_takes_a_run_folder_its_checkpoints_folder_or_a_file_by_a_relative_path(tiny_run, tmp_path, monkeypatch,
                                                                                     given):
    monkeypatch.chdir(tiny_run.parent)
    report = cli.main(["eval", "--checkpoint", given, *CODE, "--run-dir", str(tmp_path / "eval")])
    assert report["checkpoint"] == str(tiny_run / "checkpoints" / "epoch0001-update00000004.pt")
    assert report["results"]["main"]["normal"]["video"]["count"] == 12


def test_eval_finds_the_newest_checkpoint_of_a_ray_train_run_folder(tiny_run, tmp_path):
    """Ray Train's layout: <storage>/<run>/checkpoint_<time>/state.pt, <storage> being <run>/ray by default."""
    state = checkpoints.load(str(tiny_run))
    ray_run = tmp_path / "run" / checkpoints.RAY_FOLDER / "run"
    for stamp, updates in (("2026-01-01_10-00-00.000001", 2), ("2026-01-01_10-05-00.000001", 4)):
        checkpoints.save({**state, "updates": updates}, str(ray_run / f"checkpoint_{stamp}" / checkpoints.STATE))
    newest = str(ray_run / "checkpoint_2026-01-01_10-05-00.000001" / checkpoints.STATE)
    for given in (tmp_path / "run", ray_run, ray_run / "checkpoint_2026-01-01_10-05-00.000001"):
        assert checkpoints.resolve(str(given)) == newest
    report = cli.main(["eval", "--checkpoint", str(ray_run), *CODE])
    assert report["checkpoint"] == newest
    assert len(list((tmp_path / "run").glob("eval-*/eval_report.md"))) == 1    # beside the run, not in Ray's storage


def test_a_release_with_only_weights_build_contract_and_classes_is_evaluated_on_the_shards_given(tiny_run, tmp_path):
    """A converted release has no optimizer and no config: its build record names the model, the command
    line the data."""
    state = checkpoints.load(str(tiny_run))
    checkpoints.save({k: state[k] for k in ("model", "build", "contract", "classes")}, str(tmp_path / "release.pt"))
    release = cli.main(["eval", "--checkpoint", str(tmp_path / "release.pt"), "data.val.shards=synthetic:12",
                        "data.loader=train_support:SyntheticLoader", "--run-dir", str(tmp_path / "eval")])
    trained = cli.main(["eval", "--checkpoint", str(tiny_run), *CODE, "--run-dir", str(tmp_path / "eval-run")])
    assert release["model"] == "test_tiny_bcthw" and release["results"] == trained["results"]


def test_eval_without_config_runs_no_code_that_the_checkpoint_names(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--checkpoint", str(tiny_run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1
    assert "imports=[train_support] data.loader=train_support:SyntheticLoader" in err[0] and "--config" in err[0]


def test_eval_exits_non_zero_and_lists_the_videos_it_could_not_evaluate_unless_allowed(tiny_run, tmp_path,
                                                                                       capsys):
    broken = [*CODE, "data.val.options.broken=[2,5]"]
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--checkpoint", str(tiny_run), *broken, "--run-dir", str(tmp_path / "refused")])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert "10 of 12 videos evaluated; missing: vid00002 (decode: made unreadable by the test)" in err
    written = (tmp_path / "refused" / "eval_report.md").read_text()       # written before refusing
    assert "**10 of 12 videos evaluated.**" in written and "| vid00005 | synthetic | decode |" in written

    report = cli.main(["eval", "--checkpoint", str(tiny_run), *broken, "--allow-missing",
                       "--run-dir", str(tmp_path / "allowed")])
    assert [m["key"] for m in report["coverage"]["main"]["missing"]] == ["vid00002", "vid00005"]
    assert report["results"]["main"]["normal"]["video"]["count"] == 10
    assert json.loads((tmp_path / "allowed" / "eval_report.json").read_text())["coverage"] == report["coverage"]
