"""Train and validate: `python -m liverjax.main --config configs/default.py --workdir W`.

`--config.x=y` overrides any config field; a second call with the same workdir resumes.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from liverjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard logs.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("liverjax").setLevel(logging.INFO)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
