"""Export: TF Serving layout, signature, metadata, and parity of SavedModel / TFLite with JAX.

Once per session (shared with tests/test_serve.py): configs/test.py is trained for a few steps on
the synthetic_small records (64² HU; the model takes 32², so the exported graph resizes too), and
`python -m liverjax.export`'s main exports the best checkpoint, with the parity check on the test
split and the threshold from the run's operating_point.json.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import re
import shutil
import stat

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import training_runs
from flax import nnx

from liverjax import checkpointing, evaluate, export, metrics, models, preprocess, serve, train
from tfds_liver import labels as labels_lib

DATASET = training_runs.DATASET
THRESHOLD = 0.42  # the run's operating point, as the evaluation would write it
# Long enough for the model to rank the train split (ROC AUC ~0.8, probabilities spread ~0.1), so
# that the quantized files' AUC loss is measured on a model that separates something. The test
# split is 12 slices of 2 patients: one flipped pair moves its AUC by ~0.03, so the export's own
# check runs on the 48 train slices; the tests below check parity on the test split too.
TRAIN_EPOCHS = 10
# How operating_point.json says the threshold was chosen (the served model's metadata repeats it).
CHOSEN = {
    "rule": "sensitivity",
    "target_sensitivity": 0.9,
    "split": "validation",
    "patient_level": {"patient_max": 0.61, "patient_mean": 0.47},
}
PARITY_SPLIT = "train"


def make_config(data_dir: pathlib.Path | None = None):
    """configs/test.py (the config the session's run trains)."""
    return training_runs.make_config(data_dir or pathlib.Path("unused"))


def make_model(seed: int) -> models.CNN:
    """A freshly initialised model of the test config, in inference mode (created as training
    creates it: under jit, with its quick-to-compile initialization PRNG)."""
    key = jax.random.key(seed, impl=train.INIT_PRNG)
    model = nnx.jit(lambda: models.create_model(make_config(), rngs=nnx.Rngs(key)))()
    model.eval()
    return model


@nnx.jit
def _logits(model: models.CNN, hu: jax.Array) -> jax.Array:
    return model(preprocess.preprocess(hu, make_config()), deterministic=True)


def jax_outputs(model: models.CNN, hu: np.ndarray) -> dict[str, np.ndarray]:
    """The JAX model's answer on HU images: liverjax.preprocess, the model, a sigmoid."""
    logit = _logits(model, jax.numpy.asarray(hu, np.float32))
    return {"probability": np.asarray(jax.nn.sigmoid(logit)), "logit": np.asarray(logit)}


def test_records(data_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """The test split as arrays: image (N, S, S, 1) int16, label, sop_uid, patient_id."""
    source = tfds.data_source(DATASET, split="test", data_dir=data_dir)
    rows = [source[i] for i in range(len(source))]
    return {
        "image": np.stack([r["image"] for r in rows]),
        "label": np.asarray([r["label"] for r in rows]),
        "sop_uid": np.asarray([r["sop_uid"].decode() for r in rows]),
        "patient_id": np.asarray([r["patient_id"].decode() for r in rows]),
    }


test_records.__test__ = False  # a helper, not a test


@functools.cache
def _export_once(root: str, data_dir: str) -> dict:
    root = pathlib.Path(root)
    config = make_config(pathlib.Path(data_dir))
    config.num_epochs = TRAIN_EPOCHS
    workdir = root / "run"
    train.train_and_evaluate(config, str(workdir))
    step = checkpointing.Checkpointer(
        workdir / train.CHECKPOINT_DIR, keep=1, keep_best=0, best_metric="", async_save=False
    ).latest_step()
    (workdir / evaluate.OPERATING_POINT_FILE).write_text(
        json.dumps({"threshold": THRESHOLD, "checkpoint_step": step} | CHOSEN)
    )
    result = export.main(
        ["--workdir", str(workdir), "--out", str(root / "export")]
        + ["--checkpoint", "latest", "--split", PARITY_SPLIT]
    )
    # The JAX model that was exported, restored again (its compilations now come from the cache).
    restored = evaluate.restore(config, workdir, "latest")
    assert restored.step == step
    return {
        "model": restored.model,
        "step": restored.step,
        "data_dir": pathlib.Path(data_dir),
        "out_dir": root / "export",
        "version_dir": result.version_dir,
        "version": result.version,
        "parity": result.parity,
    }


def shared_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Trains, exports (through the CLI) once per session; both test files use it.

    Returns model (the restored JAX model that was exported), step, data_dir, out_dir,
    version_dir, version, parity.
    """
    training_runs.compilation_cache(tmp_path_factory)
    data_dir = training_runs.liver_data(tmp_path_factory)
    root = training_runs.session_dir(tmp_path_factory) / "liverjax_export"
    root.mkdir(exist_ok=True)
    return _export_once(str(root), str(data_dir))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def records(exported):
    return test_records(pathlib.Path(exported["data_dir"]))


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf

    return tf


@pytest.fixture(scope="module")
def signature(exported, tf):
    """The exported SavedModel's serving_default, loaded with TensorFlow."""
    return tf.saved_model.load(str(exported["version_dir"])).signatures["serving_default"]


def test_layout_is_tf_serving_and_tflite(exported):
    out = pathlib.Path(exported["out_dir"])
    assert exported["version"] == 1
    version_dir = out / "liver" / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    for name in (export.METADATA_FILE, export.STABLEHLO_FILE, export.PARAMS_FILE):
        assert (version_dir / export.ASSETS_EXTRA / name).is_file(), name
    for name in ("liver.tflite", "liver_fp16.tflite", "liver_int8.tflite"):
        assert (out / name).stat().st_size > 0, name
    # nothing but the version is left in the model dir (the staging dir was renamed)
    assert sorted(p.name for p in (out / "liver").iterdir()) == ["1"]
    # readable by a server running as another user: the umask's mode, not mkdtemp's 0700
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o777 & ~umask
    # quantized files are smaller than the float one
    sizes = {n: (out / n).stat().st_size for n in export.TFLITE_FILES.values()}
    assert sizes["liver_int8.tflite"] < sizes["liver_fp16.tflite"] < sizes["liver.tflite"]


def test_metadata(exported, records):
    md = json.loads(
        (
            pathlib.Path(exported["version_dir"]) / export.ASSETS_EXTRA / export.METADATA_FILE
        ).read_text()
    )
    config = make_config()
    size = records["image"].shape[1]
    assert size != config.image_size  # the graph resizes
    assert md["label_names"] == list(labels_lib.LABEL_NAMES)
    assert md["input_size"] == size and md["model_image_size"] == config.image_size
    assert md["inputs"]["image"]["shape"] == [-1, size, size, 1]
    assert md["window"] == export.window_of(config)
    assert md["threshold"] == THRESHOLD
    assert md["threshold_source"].endswith(evaluate.OPERATING_POINT_FILE)
    assert md["checkpoint_step"] == exported["step"] and md["version"] == 1
    assert md["checkpoint"]["requested"] == "latest"
    assert md["config"]["model"]["widths"] == list(config.model.widths)
    assert md["signature_name"] == "serving_default"
    assert md["parity_split"] == PARITY_SPLIT
    assert md["operating_point"] == CHOSEN | {"checkpoint_step": exported["step"]}


def test_signature_has_dynamic_batch_and_named_outputs(signature, records, tf):
    _, inputs = signature.structured_input_signature
    size = records["image"].shape[1]
    assert list(inputs) == ["image"]
    assert inputs["image"].dtype == tf.float32
    assert inputs["image"].shape.as_list() == [None, size, size, 1]
    assert sorted(signature.structured_outputs) == ["logit", "probability"]
    for batch in (1, 3, 7):
        out = signature(image=tf.constant(records["image"][:batch].astype(np.float32)))
        assert out["probability"].shape == (batch,) and out["logit"].shape == (batch,)


def test_parity_on_test_records(exported, records, signature, tf):
    """JAX vs SavedModel vs float TFLite vs the serving module agree to 1e-5 on real records."""
    images = records["image"].astype(np.float32)
    want = jax_outputs(exported["model"], images)
    saved = {k: v.numpy() for k, v in signature(image=tf.constant(images)).items()}
    out = pathlib.Path(exported["out_dir"])
    tflite = export.run_tflite((out / "liver.tflite").read_bytes(), images)
    module = serve.Servable.load(exported["version_dir"], version=1, max_batch=4).predict(images)
    # Loaded onto a device of one's choosing (the export's own check loads it on the CPU).
    device = jax.devices()[-1]
    other = serve.Servable.load(exported["version_dir"], version=1, max_batch=4, device=device)
    assert {p.devices().pop() for p in other._params} == {device}
    np.testing.assert_array_equal(other.predict(images)["logit"], module["logit"])
    for got in (saved, tflite, module):
        for name in ("probability", "logit"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
    # a real spread of answers, not a constant
    assert np.ptp(want["probability"]) > 0
    # the export measured the same and recorded it
    parity = exported["parity"]
    for key in ("saved_model", "serving_module", "tflite_float32"):
        assert max(parity[key].values()) <= 1e-5, (key, parity[key])
    assert parity["images"] == len(
        export.read_parity_records(make_config(exported["data_dir"]), PARITY_SPLIT, 10_000)[0]
    )


def _stablehlo_producers(graph_defs) -> list[str]:
    """StableHLO versions of the modules the XlaCallModule ops of these GraphDefs carry."""
    found = []
    for graph in graph_defs:
        nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
        for node in nodes:
            if node.op == "XlaCallModule":
                found += re.findall(rb"StableHLO_v([0-9.]+)", node.attr["module"].s)[:1]
    return [v.decode() for v in found]


def test_saved_model_embeds_stablehlo_that_tensorflow_reads(exported):
    """jax2tf's modules are written at the installed TensorFlow's StableHLO version at newest
    (JAX writes that of four weeks before its release: 1.15.0 for JAX 0.10, 1.18.0 for 0.12,
    which TensorFlow 2.21, at 1.13.7, cannot read), and liverjax.json says which version."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((pathlib.Path(exported["version_dir"]) / "saved_model.pb").read_bytes())
    producers = _stablehlo_producers(m.graph_def for m in saved.meta_graphs)
    md = json.loads(
        (
            pathlib.Path(exported["version_dir"]) / export.ASSETS_EXTRA / export.METADATA_FILE
        ).read_text()
    )
    tf_version = export.tensorflow_stablehlo_version()
    assert producers and set(producers) == {md["saved_model_stablehlo_version"]}, producers
    assert export._version(producers[0]) <= export._version(tf_version)


def test_stablehlo_version_is_lowered_only_inside_the_conversion(tf):
    from jax._src.export import _export
    from jax.experimental import jax2tf

    serializer = _export._module_to_bytecode

    def convert_and_trace():
        converted = jax2tf.convert(lambda x: x * 2.0, with_gradient=False)
        fn = tf.function(converted, input_signature=[tf.TensorSpec([3], tf.float32)])
        return fn.get_concrete_function().graph.as_graph_def(), fn

    with export._stablehlo_for_tensorflow() as version:
        inside, fn = convert_and_trace()
    outside, _ = convert_and_trace()
    assert _export._module_to_bytecode is serializer
    assert _stablehlo_producers([inside]) == [version]
    assert export._version(version) <= export._version(export.tensorflow_stablehlo_version())
    np.testing.assert_allclose(fn(tf.constant([1.0, 2.0, 3.0])).numpy(), [2.0, 4.0, 6.0])
    assert len(_stablehlo_producers([outside])) == 1  # JAX's own choice outside
    with pytest.raises(RuntimeError, match="boom"), export._stablehlo_for_tensorflow():
        raise RuntimeError("boom")
    assert _export._module_to_bytecode is serializer


def test_quantized_variants_lose_little_auc(exported):
    """fp16 and int8 lose at most 0.01 ROC AUC against float32, on every record of the set."""
    config = make_config(exported["data_dir"])
    splits = {
        s: export.read_parity_records(config, s, 10_000) for s in ("train", "validation", "test")
    }
    images = np.concatenate([images for images, _ in splits.values()])
    labels = np.concatenate([labels for _, labels in splits.values()])
    out = pathlib.Path(exported["out_dir"])
    probs = {
        name: export.run_tflite((out / file).read_bytes(), images)["probability"]
        for name, file in export.TFLITE_FILES.items()
    }
    base = metrics.roc_auc(labels, probs["float32"])
    for name in ("fp16", "int8"):
        assert base - metrics.roc_auc(labels, probs[name]) <= export.AUC_TOLERANCE, name
        assert np.max(np.abs(probs[name] - probs["float32"])) > 0, f"{name} is not quantized"
    # the export measured the same on its parity split (the first rows here)
    quantized = exported["parity"]["quantized"]
    n = len(splits[PARITY_SPLIT][1])
    assert quantized["checked"] and quantized["examples"] == n
    assert quantized["roc_auc"]["float32"] == pytest.approx(
        metrics.roc_auc(labels[:n], probs["float32"][:n])
    )
    assert quantized["roc_auc"]["float32"] > 0.6  # a model that ranks: the check means something


def test_a_threshold_chosen_for_another_checkpoint_is_refused(exported, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(pathlib.Path(exported["out_dir"]).parent / "run", workdir)
    other = exported["step"] - 1
    (workdir / evaluate.OPERATING_POINT_FILE).write_text(
        json.dumps({"threshold": THRESHOLD, "checkpoint_step": other})
    )
    with pytest.raises(SystemExit) as failed:
        export.main(["--workdir", str(workdir), "--out", str(tmp_path / "e"), "--checkpoint",
                     "latest", "--split", PARITY_SPLIT, "--no-tflite"])  # fmt: skip
    message = str(failed.value.code)
    assert message.startswith("export failed: ")
    assert f"was chosen for checkpoint step {other}, but step {exported['step']}" in message
    assert "--allow_other_checkpoint_threshold" in message
    assert message.endswith(f"({train.TRACEBACK_ENV}=1 shows where)")
    assert not (tmp_path / "e").exists()  # nothing published


def test_a_failed_parity_check_ends_the_command_in_one_line(monkeypatch):
    # ParityError is a RuntimeError, which user_errors leaves alone unless the command names it
    def mismatch():
        with train.user_errors("export", export.ParityError):
            raise export.ParityError("int8 lost 0.25 of ROC AUC")

    with pytest.raises(SystemExit) as failed:
        mismatch()
    assert str(failed.value.code) == (
        f"export failed: int8 lost 0.25 of ROC AUC ({train.TRACEBACK_ENV}=1 shows where)"
    )
    monkeypatch.setenv(train.TRACEBACK_ENV, "1")
    with pytest.raises(export.ParityError):
        mismatch()
    with pytest.raises(RuntimeError), train.user_errors("export"):  # not named: a bug, traceback
        raise RuntimeError("a bug")


@pytest.mark.parametrize("count", ["0", "-1"])
def test_max_parity_examples_must_be_positive(tmp_path, capsys, count):
    # -1 once dropped the last record ([:-1]) and 0 said the split was empty
    with pytest.raises(SystemExit) as failed:
        export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "e"),
                     "--max_parity_examples", count])  # fmt: skip
    assert failed.value.code == 2
    assert f"--max_parity_examples: {count}: must be at least 1" in capsys.readouterr().err


def test_records_of_an_unbuilt_dataset_are_named_for_the_parity_check(tmp_path):
    config = training_runs.make_config(tmp_path / "nothing_built")
    with pytest.raises(
        FileNotFoundError,
        match=r"is not built in .*nothing_built.*The parity "
        r"check needs the records; pass --data_dir DATA or --split",
    ):
        export.read_parity_records(config, "test", 8)


def test_a_bfloat16_network_exports_without_tflite_and_says_so_with_it(tmp_path):
    config = make_config()
    config.model.dtype = "bfloat16"
    key = jax.random.key(0, impl=train.INIT_PRNG)
    model = nnx.jit(lambda: models.create_model(config, rngs=nnx.Rngs(key)))()
    with pytest.raises(ValueError, match=r"config.model.dtype = 'bfloat16': TFLite has no "
                       r"bfloat16 kernels.*export with --no-tflite"):  # fmt: skip
        export.export_model(model, config, tmp_path / "e")
    assert not (tmp_path / "e").exists()  # refused before any work
    result = export.export_model(model, config, tmp_path / "e", with_tflite=False)
    assert result.parity["saved_model"]["probability"] <= export.PARITY_TOLERANCE
    assert not list((tmp_path / "e").glob("*.tflite"))


def test_the_command_says_which_checkpoint_and_threshold_it_exported(
    exported, tmp_path, capsys, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(pathlib.Path(exported["out_dir"]).parent / "run", workdir)
    ours = logging.getLogger("liverjax")
    before, ours.level = ours.level, logging.NOTSET  # as in a fresh process
    try:
        with caplog.at_level(logging.INFO):
            result = export.main(["--workdir", str(workdir), "--out", str(tmp_path / "e"),
                                  "--checkpoint", "latest", "--split", PARITY_SPLIT,
                                  "--no-tflite"])  # fmt: skip
        level = ours.level
    finally:
        ours.setLevel(before)
    printed = json.loads(capsys.readouterr().out)
    written = result.version_dir / serve.ASSETS_EXTRA / serve.METADATA_FILE
    assert json.loads(written.read_text()) == result.metadata  # what was printed from
    assert printed["checkpoint_step"] == exported["step"]
    assert printed["threshold"] == THRESHOLD
    assert printed["threshold_source"] == evaluate.OPERATING_POINT_FILE
    # INFO lines of liverjax although grain and Orbax gave the root logger its handler
    assert level == logging.INFO
    assert "exported liver version 1" in caplog.text


def test_quantization_check_raises_on_auc_loss():
    labels = np.array([0, 0, 1, 1])
    float_probs = np.array([0.1, 0.2, 0.8, 0.9])
    swapped = np.array([0.1, 0.85, 0.8, 0.9])  # one pair out of four flips: AUC 1.0 → 0.75
    report = export._quantization_check(float_probs, {"int8": float_probs + 1e-3}, labels)
    assert report["auc_loss"]["int8"] == 0.0
    with pytest.raises(export.ParityError, match="int8.*0.25"):
        export._quantization_check(float_probs, {"int8": swapped}, labels)
    assert not export._quantization_check(float_probs, {"int8": swapped}, None)["checked"]


def test_versions_and_threshold(tmp_path):
    for name in ("1", "7", "tmp", ".staging-x"):
        (tmp_path / "liver" / name).mkdir(parents=True)
    assert serve.versions(tmp_path / "liver") == [1, 7]
    assert serve.versions(tmp_path / "missing") == []
    with pytest.warns(UserWarning, match="operating_point.json not found"):
        assert export.read_threshold(tmp_path) == (0.5, "default")
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": 0.37, "rule": "x"}))
    assert export.read_threshold(tmp_path) == (0.37, str(tmp_path / "operating_point.json"))
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": 1.5}))
    with pytest.raises(ValueError, match="operating_point.json: threshold = 1.5"):
        export.read_threshold(tmp_path)
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": True}))
    with pytest.raises(ValueError, match="operating_point.json: threshold = True"):
        export.read_threshold(tmp_path)


def test_publish_takes_the_next_version_above_any_numbered_entry(tmp_path):
    """A stray file named like a version is skipped, not retried for ever."""
    model_dir = tmp_path / "liver"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "2").write_text("not a version")
    (model_dir / "notes").mkdir()
    staging = model_dir / ".staging-x"
    (staging / export.ASSETS_EXTRA).mkdir(parents=True)
    (staging / export.ASSETS_EXTRA / export.METADATA_FILE).write_text("{}")
    assert export._publish(staging, model_dir) == 3
    metadata = json.loads(
        (model_dir / "3" / export.ASSETS_EXTRA / export.METADATA_FILE).read_text()
    )
    assert metadata["version"] == 3


def test_tflite_files_are_named_after_the_model():
    assert export.tflite_files("kidney") == {
        "float32": "kidney.tflite",
        "fp16": "kidney_fp16.tflite",
        "int8": "kidney_int8.tflite",
    }
    assert export.TFLITE_FILES == export.tflite_files(export.MODEL_NAME)
