from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from dfm.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class Train:
    max_steps: int = 10
    output_dir: str = "runs/x"
    resume: Optional[str] = None


@dataclass
class Cfg:
    train: Train = field(default_factory=Train)
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 50\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Cfg, p, ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "optim.schedule=cosine"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.schedule == "cosine" and cfg.train.output_dir == "runs/x"
    save_config(cfg, tmp_path / "resolved.yaml")
    assert to_dict(load_config(Cfg, tmp_path / "resolved.yaml")) == to_dict(cfg)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step' \(did you mean 'max_steps'\?\).*output_dir"):
        load_config(Cfg, None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(Cfg, None, ["trian.max_steps=3"])


def test_bad_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="must be int"):
        load_config(Cfg, None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="must be one of 'constant', 'cosine'"):
        load_config(Cfg, None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(Cfg, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, bad)
    assert load_config(Cfg, None, ["train.resume=null"]).train.resume is None
    assert load_config(Cfg, None, ["optim.lr=1e-3"]).optim.lr == 1e-3


@dataclass
class Text:
    null: Literal["empty", "zeros"] = "empty"


@dataclass
class Model:
    overrides: dict = field(default_factory=dict)


@dataclass
class Cfg2:
    text: Text = field(default_factory=Text)
    model: Model = field(default_factory=Model)


def test_bare_yaml_keys_read_as_their_words(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("text:\n  null: zeros\n")  # YAML reads the bare key `null` as None
    assert load_config(Cfg2, p).text.null == "zeros"


def test_dotted_keys_into_a_mapping_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  overrides:\n    num_layers: 2\n    ffn_dim: 64\n")
    cfg = load_config(Cfg2, p, ["model.overrides.num_layers=3", "model.overrides.patch_size=[1, 2, 2]"])
    assert cfg.model.overrides == {"num_layers": 3, "ffn_dim": 64, "patch_size": [1, 2, 2]}


# ------------------------------------------------------------------ issue 13: booleans and duplicate keys


def test_a_boolean_is_not_a_number(tmp_path):
    for value in ("true", "false", "yes"):
        with pytest.raises(ConfigError, match=r"config key 'train.max_steps' must be int, got (True|False) "
                                              r"\(a boolean\)"):
            load_config(Cfg, None, [f"train.max_steps={value}"])
    with pytest.raises(ConfigError, match="'optim.lr' must be float, got True"):
        load_config(Cfg, None, ["optim.lr=true"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: true\n")
    with pytest.raises(ConfigError, match="max_steps' must be int"):
        load_config(Cfg, p)
    assert load_config(Cfg, None, ["train.max_steps=3"]).train.max_steps == 3  # numbers still pass


def test_a_duplicate_key_at_any_level_is_one_line_error(tmp_path):
    p = tmp_path / "c.yaml"
    for text, key, lines in [("train:\n  max_steps: 5\noptim:\n  lr: 0.1\ntrain:\n  max_steps: 6\n", "train", (1, 5)),
                             ("train:\n  max_steps: 5\n  output_dir: a\n  max_steps: 6\n", "max_steps", (2, 4)),
                             ("train: {max_steps: 5, max_steps: 6}\n", "max_steps", (1, 1))]:
        p.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(Cfg, p)
        message = str(info.value)
        assert len(message.splitlines()) == 1 and str(p) in message
        assert f"key '{key}' appears twice in one mapping (lines {lines[0]} and {lines[1]}); keep one" in message
    p.write_text("base: &b {max_steps: 5}\ntrain:\n  <<: *b\n  output_dir: x\n")  # a merge key is not a duplicate
    from dfm.config import load_yaml

    assert load_yaml(p.read_text())["train"] == {"max_steps": 5, "output_dir": "x"}
