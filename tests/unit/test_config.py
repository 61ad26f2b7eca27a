"""Config: defaults, YAML, --set overrides and error messages that name key and value."""

import pytest

from sdray.config import config_from_dict, load_config
from sdray.errors import ConfigError


def test_defaults_are_the_embedded_cpu_config():
    from pathlib import Path

    config = load_config()
    assert config.model.source == "tiny" and config.model.device == "cpu"
    assert config.output.format == "files"
    # configs/cpu.yaml spells out the embedded default: they must never drift apart.
    assert load_config(Path(__file__).resolve().parents[2] / "configs/cpu.yaml") == config


def test_overrides_reach_nested_keys_with_yaml_types():
    config = load_config(
        None,
        [
            "generation.steps=30",
            "generation.guidance_scale=5",
            "output.partition_by=[scheduler]",
            "model.device=cpu",
            "batch.batch_size=2",
        ],
    )
    assert config.generation.steps == 30
    assert config.generation.guidance_scale == 5.0
    assert config.output.partition_by == ["scheduler"]
    assert config.batch.batch_size == 2


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'generation.stepz'"):
        load_config(None, ["generation.stepz=3"])


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"generation.width = 100"):
        load_config(None, ["generation.width=100"])
    with pytest.raises(ConfigError, match=r"output.format = 'zip'"):
        config_from_dict({"output": {"format": "zip"}})
    with pytest.raises(ConfigError, match="unknown scheduler 'warp'"):
        load_config(None, ["generation.scheduler=warp"])


def test_malformed_set_is_refused():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["generation.steps"])


def test_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generation:\n  steps: 7\nbatch:\n  max_actors: 3\n")
    config = load_config(path, ["generation.steps=9"])
    assert config.generation.steps == 9 and config.batch.max_actors == 3
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", ["configs/cpu.yaml", "configs/gpu-sd15.yaml"])
def test_shipped_configs_validate(path):
    from pathlib import Path

    load_config(Path(__file__).resolve().parents[2] / path)
