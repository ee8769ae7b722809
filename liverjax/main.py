"""Train and validate: `python -m liverjax.main --config configs/default.py --workdir W`.

`--config.x=y` overrides any config field; a second call with the same workdir resumes. With
`config.final_eval_split` set (the demo sets "test"), the best checkpoint is then evaluated on that
split as `python -m liverjax.evaluate` would, into WORKDIR/report/.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from liverjax import checkpointing, evaluate, host_memory, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard logs.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    host_memory.keep_freed_memory()  # before JAX starts: XLA:CPU's step buffers are reused
    logging.getLogger("liverjax").setLevel(logging.INFO)
    checkpointing.quiet_orbax_logs()
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if FLAGS.config.final_eval_split:
        # The demo's "trains, evaluates": the best checkpoint on that split → WORKDIR/report/.
        evaluate.evaluate(FLAGS.config, FLAGS.workdir, split=FLAGS.config.final_eval_split)


if __name__ == "__main__":
    app.run(main)
