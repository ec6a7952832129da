"""LoaderConfig: the loader's settings, frozen and checked once; how a recipe's keys and a model's input
contract reach it (train/data.py). On an index without videos: nothing here reads a byte."""
from __future__ import annotations

import pytest
from test_plan import index_without_videos

from contract.inputs import InputContract
from pipelines.config import LoaderConfig
from pipelines.loader import VideoLoader
from train.config import ConfigError, load_config
from train.data import build_loader

CONTRACT = InputContract(layout="super", num_frames=8, crop_size=96, grid=(2, 4), mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("config")
    index_without_videos(root / "train")
    return str(root)


def recipe(shards: str, **data) -> dict:
    return load_config(None, model={"name": "tsn_r18", "num_classes": 4},
                       data={"train": {"shards": shards}, "batch_size": 4, **data})


def test_keywords_are_the_configs_fields_and_its_contracts():
    config = LoaderConfig.of(4, readers=3, train_crop="tsn_multiscale", num_frames=16, layout="super",
                             color_jitter=0.4)
    assert (config.readers, config.train_crop) == (3, "tsn_multiscale")
    assert config.contract == InputContract(layout="super", num_frames=16, grid=(4, 4))     # SIFAR's rule for 16
    assert config.augment.color_jitter == (0.4, 0.4, 0.4, 0.0)
    with pytest.raises(Exception):
        config.readers = 4                                                                # frozen


def test_an_unknown_keyword_is_refused_naming_the_nearest_field():
    with pytest.raises(ValueError, match=r"^unknown loader option 'redaers'; did you mean 'readers'\?$"):
        LoaderConfig.of(4, redaers=2)


def test_the_loader_takes_a_models_contract_whole(shards):
    loader = VideoLoader(shards, 4, split="train", contract=CONTRACT)
    assert loader.config.contract == CONTRACT
    assert (loader.pipeline_config.grid, loader.pipeline_config.mean) == ((2, 4), (0.5,) * 3)


def test_every_data_option_of_a_recipe_lands_on_the_config_field_of_its_name(shards):
    cfg = recipe(shards, sampling="dense", options={"readers": 3, "stride": 4, "max_failures": 0.01},
                 train={"shards": shards, "options": {"shuffle_buffer": 16, "num_frames": 4}})
    config = build_loader(cfg, "main", "train", contract=CONTRACT, device="cpu", rank=1, world_size=2).config
    assert (config.readers, config.stride, config.max_failures, config.shuffle_buffer) == (3, 4, 0.01, 16)
    assert (config.sampling, config.batch_size, config.rank, config.world_size) == ("dense", 4, 1, 2)
    assert config.contract == InputContract(layout="super", num_frames=4, crop_size=96, grid=(2, 4),
                                            mean=(0.5,) * 3, std=(0.25,) * 3)     # the model's, frames overridden


def test_a_data_option_no_field_takes_is_refused_naming_the_section_and_the_nearest_key(shards):
    cfg = recipe(shards, train={"shards": shards, "options": {"shufle_buffer": 16}})
    with pytest.raises(ConfigError, match=r"^data\.train\.options\.shufle_buffer is not a loader setting; did you mean "
                                          r"data\.train\.options\.shuffle_buffer\?$"):
        build_loader(cfg, "main", "train", contract=CONTRACT, device="cpu")


def test_a_setting_that_cannot_work_is_a_one_line_config_error_naming_where_it_came_from(shards):
    cfg = recipe(shards, options={"train_crop": "center"})
    with pytest.raises(ConfigError, match=r"^data\.options / data\.train\.options: train_crop must be one of"):
        build_loader(cfg, "main", "train", contract=CONTRACT, device="cpu")
