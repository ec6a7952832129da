"""Classes are checked wherever a model meets shards: at fit, at resume and at eval, against the shards'
classes.txt (the synthetic loader's `class_names`); a checkpoint carries its class names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import tiny_config

import models
from contract import checkpoints
from train import cli
from train.config import ConfigError, load_config
from train.loop import fit

REPO = Path(__file__).resolve().parent.parent
CODE = ["imports=[train_support]", "data.loader=train_support:SyntheticLoader"]
OTHER = ["up", "down", "left", "right"]
SHORT = dict(sched={"epochs": 1}, train={"max_updates": 1, "eval_every": 0}, eval={"at_end": False})


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> dict:
    return fit(tiny_config(tmp_path_factory.mktemp("classes"), **SHORT))


def test_a_checkpoint_holds_its_class_names_and_models_load_rebuilds_its_model(short_run):
    state = checkpoints.load(short_run["run_dir"])
    assert state["classes"] == ["class0", "class1", "class2", "class3"]
    model = models.load(short_run["run_dir"])          # no recipe: the checkpoint's build record and contract
    clips = torch.randn(2, 3, 8, 16, 16)
    torch.testing.assert_close(model(clips), short_run["model"].eval()(clips))
    assert model.contract == short_run["model"].contract


def test_train_and_val_shards_with_other_class_names_are_refused_naming_both(tmp_path):
    cfg = tiny_config(tmp_path, data={"val": {"options": {"class_names": OTHER}}}, **SHORT)
    with pytest.raises(ConfigError, match=r"the train shards \(synthetic:32\) and the val shards \(synthetic:12\) name "
                                          r"different classes: \[class0, class1, class2, class3\] vs \[up, down, left, "
                                          r"right\]"):
        fit(cfg)                               # at the start, though this run validates only at its end


def test_resuming_on_shards_with_other_class_names_is_refused_naming_both(short_run):
    cfg = tiny_config(Path(short_run["run_dir"]).parent, data={"options": {"class_names": OTHER}},
                      run={"resume": "auto"}, **SHORT)
    with pytest.raises(ConfigError, match=r"checkpoint .*epoch0000-update00000001.pt and the train shards "
                                          r"\(synthetic:32\) name different classes: \[class0, class1, class2, "
                                          r"class3\] vs \[up, down, left, right\]"):
        fit(cfg)


def test_evaluating_on_shards_with_other_class_names_is_refused_naming_both(short_run, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--checkpoint", short_run["run_dir"], *CODE, "data.val.options.class_names=[a,b,c,d]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1
    assert ("and the val shards (synthetic:12) name different classes: [class0, class1, class2, class3] vs "
            "[a, b, c, d]") in err[0]


def test_a_paper_recipe_trained_from_random_weights_prints_a_warning(tmp_path, capsys):
    tiny = [*CODE, "model.name=test_tiny_bcthw", "model.img_size=16", "model.num_classes=4", "data.batch_size=4",
            "data.train.shards=synthetic:8", "data.val.shards=synthetic:4", "train.max_updates=1",
            "train.eval_every=0", "train.device=cpu", "eval.at_end=false", f"run.dir={tmp_path / 'run'}"]
    cli.main(["fit", "--config", str(REPO / "configs" / "cnn_study_k400_f8.yaml"), *tiny])
    err = capsys.readouterr().err
    assert "warning: cnn_study_k400_f8.yaml is a paper recipe, but neither model.pretrained nor init_from is set" in err
    sample = load_config(REPO / "configs" / "sample_tsm.yaml")
    assert cli.from_scratch_warning(sample, str(REPO / "configs" / "sample_tsm.yaml")) is None
