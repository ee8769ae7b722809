"""A tiny run for tests: the synthetic_small records, a small CNN at 32x32, a few steps."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """The default config, shrunk to run in seconds on a CPU."""
    config = default.get_config()
    config.dataset.name = "liver/synthetic_small"
    config.image_size = 32
    config.model.widths = (8, 16)
    config.model.dense = 32
    config.model.dropout = 0.1
    # Light augmentation, per example: intensity only (an op with probability 0 is not traced).
    for name in ("rotate", "scale", "translate", "crop", "blur", "sharpen", "gamma"):
        config.augment[name].prob = 0.0
    config.augment.brightness.prob = config.augment.contrast.prob = 0.5
    config.augment.noise.prob = 0.5
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 2
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 0.01
    config.log_every_steps = 2
    config.checkpoint.every_steps = 5
    config.input.read_threads = 1
    config.input.prefetch_batches = 2
    return config
