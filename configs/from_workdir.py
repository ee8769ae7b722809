"""The config a run saved in its workdir (W/config.json), to train again with it exactly.

    python -m liverjax.main --config configs/from_workdir.py:W --workdir W2 [--config.x=y ...]

`W/config.json` is JSON, not a config file: give this file with the workdir after a colon.
"""

import ml_collections

from liverjax import evaluate


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
    """`evaluate.load_config(workdir)`: the config saved in that run's folder."""
    if not workdir:
        raise ValueError(
            "configs/from_workdir.py needs the run's folder after a colon: "
            "--config configs/from_workdir.py:W"
        )
    return evaluate.load_config(workdir)
