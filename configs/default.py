"""The seed's training recipe: the seed CNN, SGD at 0.001, batch 32, 50 epochs, L2, early stopping.

    python -m liverjax.main --config configs/default.py --workdir W --config.dataset.data_dir=DATA

Every field is documented where it is defined; variants (demo.py, test.py) start from
`get_config()` and override only what differs.
"""

import ml_collections

from liverjax import evaluate, models, preprocess


def get_config() -> ml_collections.ConfigDict:
    """The default (seed) configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, data order, dropout and augmentation all derive from it

    # Records: tfds.data_source(name, split, data_dir); the synthetic configs build themselves.
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "liver/synthetic"  # or "liver/manual" (built with `tfds build`)
    # None: the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR); so is "None" or "" (what
    # --config.dataset.data_dir=None gives a string field).
    config.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.build_if_missing = True  # build the records on first use (process 0)
    config.dataset.manual_dir = ml_collections.FieldReference(None, field_type=str)

    # Host input pipeline (grain).
    config.input = ml_collections.ConfigDict()
    config.input.num_workers = 0  # grain worker processes; 0 reads in threads of this process
    config.input.read_threads = 2  # threads reading and batching records
    config.input.prefetch_batches = 4  # batches read ahead

    # The network (liverjax.models) and its input (liverjax.preprocess).
    config.image_size = 128  # side of the square network input; records are resized to it
    config.model = models.default_model_config()
    config.preprocess = preprocess.default_preprocess_config()
    config.augment = preprocess.default_augment_config()

    config.batch_size = 32  # global: split over all devices of all processes
    config.eval_batch_size = 64  # global; the last validation batch is padded, never dropped
    config.num_epochs = 50
    config.num_train_steps = -1  # > 0: train this many steps instead of num_epochs

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # sgd | momentum | adam | adamw
    config.optimizer.learning_rate = 0.001
    config.optimizer.momentum = 0.9  # momentum (and nesterov) only
    config.optimizer.nesterov = False
    config.optimizer.b1 = 0.9  # adam, adamw
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    # L2 on weights (kernels, not biases): added to the gradient (optax.add_decayed_weights), or
    # decoupled for adamw.
    config.optimizer.weight_decay = 1e-4
    config.optimizer.grad_clip_norm = 0.0  # > 0: clip the global gradient norm

    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "constant"  # constant | warmup_cosine
    config.schedule.warmup_epochs = 0.0  # warmup_cosine: linear warmup from 0
    config.schedule.end_fraction = 0.0  # warmup_cosine: final rate = learning_rate * end_fraction

    # Class imbalance: none | pos_weight (BCE weight of lesion examples; train/loss is weighted,
    # validation/loss is not) | balanced_sampling (batches half lesion, half normal, each class
    # drawn from its own reshuffled stream: an "epoch" stays len(train) // batch_size steps, so
    # it passes over the minority class more than once and over the majority class partly).
    config.imbalance = ml_collections.ConfigDict()
    config.imbalance.method = "none"
    config.imbalance.pos_weight = 0.0  # 0: (normal count) / (lesion count) of the train split

    # Validation every eval_every_steps (0: once per epoch); early stopping on config.best_metric.
    config.eval_every_steps = 0
    config.best_metric = "roc_auc"  # roc_auc, average_precision, brier or ece: best/early stopping
    config.early_stopping = ml_collections.ConfigDict()
    config.early_stopping.patience = 10  # evaluations without improvement before stopping; 0 = off
    config.early_stopping.min_delta = 0.0  # a smaller step up resets no patience (still "best")
    config.early_stopping.start_epoch = 0.0  # evaluations before this epoch use no patience

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 500  # also at every evaluation, at the end and on SIGTERM
    config.checkpoint.keep = 3  # latest checkpoints kept
    config.checkpoint.keep_best = 1  # plus the best by validation config.best_metric
    config.checkpoint.async_save = True  # write in the background while training goes on

    # After training: evaluate the best checkpoint on this split into WORKDIR/report/ ("" = no;
    # python -m liverjax.main does it, train.train_and_evaluate does not).
    config.final_eval_split = ""
    # Evaluation settings (threshold_rule youden | sensitivity, target_sensitivity, bootstrap,
    # calibration bins, worst cases): liverjax.evaluate.default_eval_config documents each; the
    # evaluation CLI overrides them with --eval KEY=VALUE.
    config.eval = evaluate.default_eval_config()
    config.log_every_steps = 50  # train metrics, images/s and ETA

    # Multi-process: jax.distributed.initialize() (see liverjax.parallel).
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = "auto"  # True | False | "auto" (detect SLURM, MPI, TPU, ...)
    config.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    config.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
    config.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
    config.distributed.initialization_timeout = 300  # seconds to wait for all processes
    return config
