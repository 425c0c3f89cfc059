"""Every CALM config in configs/ is a valid training config with a valid compose section."""

from pathlib import Path

import pytest

from moeforge.compose.build import SECTION_KEYS
from moeforge.compose.config import CALMConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("calm_*.yaml"))
from moeforge.train import config as train_config  # noqa: E402


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_calm_config_is_valid(path):
    cfg = train_config.load_config(path)
    assert cfg.compose is not None and cfg.compose.get("augmenting")
    CALMConfig.from_dict(cfg.compose, extra_keys=SECTION_KEYS)


def test_there_is_a_calm_config():
    assert CONFIGS
