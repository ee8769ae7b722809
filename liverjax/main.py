"""Train and validate: `python -m liverjax.main --config configs/default.py --workdir W`.

`--config.x=y` overrides any config field; a second call with the same workdir resumes. With
`config.final_eval_split` set (the demo sets "test"), the best checkpoint is then evaluated on that
split as `python -m liverjax.evaluate` would, into WORKDIR/report/.

On SIGTERM (preemption) the run saves a checkpoint and exits with status 143 (128 + SIGTERM, what
a process ended by the signal reports) without the final evaluation: the run is not finished, and
the grace period before SIGKILL is for the save. Launching again resumes.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from liverjax import checkpointing, evaluate, host_memory, train

FLAGS = flags.FLAGS
PREEMPTED_EXIT_CODE = 128 + 15  # 128 + SIGTERM
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and TensorBoard logs.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator(
    "workdir",
    lambda value: value is None or bool(value.strip()),
    message="--workdir is empty (an unset shell variable?): give the run's folder",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    host_memory.keep_freed_memory()  # before JAX starts: XLA:CPU's step buffers are reused
    logging.getLogger("liverjax").setLevel(logging.INFO)
    checkpointing.quiet_orbax_logs()
    with train.user_errors("training", train.NonFiniteLossError):
        evaluate.eval_settings(FLAGS.config)  # used after training: a bad value fails now
        summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if summary.stop_reason == "preempted":
        logging.getLogger("liverjax").warning(
            "preempted at step %d: checkpoint saved, final evaluation skipped; launch again "
            "with --workdir %s to resume",
            summary.step,
            FLAGS.workdir,
        )
        sys.exit(PREEMPTED_EXIT_CODE)
    if FLAGS.config.final_eval_split:
        # The demo's "trains, evaluates": the best checkpoint on that split → WORKDIR/report/.
        with train.user_errors("the final evaluation"):
            evaluate.evaluate(FLAGS.config, FLAGS.workdir, split=FLAGS.config.final_eval_split)


if __name__ == "__main__":
    app.run(main, flags_parser=train.parse_config_flags)
