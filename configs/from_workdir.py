"""The config a run saved in its workdir (W/config.json), to train again with it exactly.

    python -m liverjax.main --config configs/from_workdir.py:W --workdir W2 [--config.x=y ...]

`W/config.json` is JSON, not a config file: give this file with the workdir after a colon. The
saved values are laid over `configs/default.py`, so a run saved before a setting existed gets
its default, and the default's tuples (`model.widths`, `augment.*.range`) stay tuples that
`--config.x=y` can override (JSON made them lists). A saved `model` section naming another
network than the seed CNN (`model.name`) is taken as it is.
"""

from typing import Any

import ml_collections

from configs import default
from liverjax import evaluate, models


def _overlay(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        known = key in config
        if known and isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            if key == "model" and value.get("name", models.SEED_MODEL) != models.SEED_MODEL:
                config[key] = value  # another network's fields, not the seed's
            else:
                _overlay(config[key], value)
            continue
        if known and isinstance(config[key], tuple) and isinstance(value, list):
            value = tuple(value)
        with config.unlocked():
            config[key] = value


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
    """The config saved in that run's folder (`evaluate.load_config`) over the default config."""
    if not workdir:
        raise ValueError(
            "configs/from_workdir.py needs the run's folder after a colon: "
            "--config configs/from_workdir.py:W"
        )
    config = default.get_config()
    _overlay(config, evaluate.load_config(workdir).to_dict())
    return config
