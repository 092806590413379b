"""Training configuration (posefix.config): presets, TOML files, overrides and their rejections."""
import json

import pytest

from posefix.config import PRESETS, dump_toml, from_dict, load_config, to_dict
from posefix.errors import InputError


def test_config_presets_overrides_and_rejections(tmp_path):
    assert "cpu-small" in PRESETS
    for name in PRESETS:
        load_config(preset=name)
    cfg = load_config(preset="cpu-small", overrides=["train.max_steps=7", "model.input_size=[64, 64]",
                                                     "data.train_images=/data/coco/train2017", "train.seed=3",
                                                     "model.backbone=resnet34"])
    assert cfg.train.max_steps == 7 and cfg.model.input_size == (64, 64) and cfg.train.seed == 3
    assert cfg.data.train_images == "/data/coco/train2017" and cfg.model.backbone == "resnet34"
    toml = tmp_path / "c.toml"
    toml.write_text(dump_toml(cfg))
    assert load_config(config=str(toml)) == cfg
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(InputError, match=r"train\.max_stepz: unknown key"):
        load_config(preset="cpu-small", overrides=["train.max_stepz=3"])
    with pytest.raises(InputError, match="train.max_steps: must be an integer"):
        load_config(overrides=["train.max_steps=many"])
    with pytest.raises(InputError, match="model.backbone"):
        load_config(overrides=["model.backbone=vgg16"])
    with pytest.raises(InputError, match="model.input_size"):
        load_config(overrides=["model.input_size=[100, 64]"])
    with pytest.raises(InputError, match="unknown section"):
        load_config(overrides=["optimizer.lr=1"])
    with pytest.raises(InputError, match="unknown preset"):
        load_config(preset="r9000")
