"""The typed config loader refuses bad configs before any work starts, naming key and file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mmdiff.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Recipe:
    name: str = "debug"
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "fp32"
    optim: Optim = field(default_factory=Optim)
    tasks: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    resume_from: Optional[str] = None


def _write(tmp_path, text):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = _write(tmp_path, "steps: 5\noptim:\n  lr: 3e-4\ntasks: {vqa: 0.5}\n")
    cfg = load_config(Recipe, p, ["optim.betas=[0.8,0.9]", "precision=bf16", "name=x"])
    assert cfg.steps == 5 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.precision == "bf16"
    assert cfg.tasks == {"vqa": 0.5} and cfg.name == "x"


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(Recipe, p)
    assert "optim.lrr" in str(e.value) and "recipe.yaml" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, "steps: ten\n")
    with pytest.raises(ConfigError, match=r"'steps': expected int"):
        load_config(Recipe, p)
    with pytest.raises(ConfigError, match=r"precision.*fp32"):
        load_config(Recipe, None, ["precision=fp16"])
    with pytest.raises(ConfigError, match="tasks.vqa"):
        load_config(Recipe, None, ["tasks.vqa=lots"])


def test_impossible_value_refused(tmp_path):
    p = _write(tmp_path, "optim: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml.*optim.lr must be > 0"):
        load_config(Recipe, p)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_round_trip(tmp_path):
    cfg = load_config(Recipe, None, ["steps=7", "resume_from=ckpt"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(Recipe, tmp_path / "out.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_nested_validation_message_names_the_key_once():
    from mmdiff.config import from_dict
    from mmdiff.sampling.engine import SamplerConfig

    with pytest.raises(ConfigError) as e:
        from_dict(SamplerConfig, {"remask": {"ratio": 2.0}})
    assert str(e.value).startswith("remask.ratio must be in (0, 1]"), str(e.value)
