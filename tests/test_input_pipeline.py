"""The grain pipeline on the synthetic_small records: order, epochs, sharding, padding, state."""

import hashlib
import os
import signal
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
import training_runs as runs

from liverjax import input_pipeline

BATCH = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.liver_data(tmp_path_factory)


@pytest.fixture(scope="module")
def config(data_dir):
    return runs.make_config(data_dir)


@pytest.fixture(scope="module")
def train_source(config):
    return input_pipeline.open_source(config.dataset, "train")


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def _take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


def test_train_batches_are_int16_hu_and_each_epoch_is_a_new_permutation(config, train_source):
    records = {_digest(train_source[i]["image"]): i for i in range(len(train_source))}
    assert len(records) == len(train_source) == 48  # every image distinct
    per_epoch = len(train_source) // BATCH

    batches = _take(
        iter(input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH)),
        3 * per_epoch,
    )
    assert batches[0]["image"].dtype == np.int16 and batches[0]["image"].shape == (BATCH, 64, 64, 1)
    assert batches[0]["label"].dtype == np.int32 and set(batches[0]) == {"image", "label"}
    epochs = []
    for e in range(3):
        order = [
            records[_digest(img)]
            for b in batches[e * per_epoch : (e + 1) * per_epoch]
            for img in b["image"]
        ]
        assert sorted(order) == list(range(48))  # each record exactly once per epoch
        epochs.append(order)
        labels = [
            int(lab) for b in batches[e * per_epoch : (e + 1) * per_epoch] for lab in b["label"]
        ]
        assert labels == [int(train_source[i]["label"]) for i in order]  # labels travel along
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])

    # The same seed gives the same stream; another seed another one.
    again = _take(
        iter(input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH)), 3
    )
    for a, b in zip(again, batches, strict=False):
        np.testing.assert_array_equal(a["image"], b["image"])
    config_b = runs.make_config(config.dataset.data_dir, seed=1)
    other = next(
        iter(input_pipeline.train_dataset(train_source, config_b, global_batch_size=BATCH))
    )
    assert not np.array_equal(other["image"], batches[0]["image"])


def test_processes_read_their_rows_of_each_global_batch(config, train_source, monkeypatch):
    whole = _take(
        iter(input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH)), 7
    )
    parts = []
    for process in range(2):
        monkeypatch.setattr(input_pipeline, "_shard", lambda p=process: (p, 2))
        ds = input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH)
        parts.append(_take(iter(ds), 7))
    for step in range(7):
        # Process p holds rows [p*4, p*4+4) of the global batch: the rows its devices hold.
        joined = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
        np.testing.assert_array_equal(joined, whole[step]["image"])


def test_eval_covers_every_record_once_with_a_padding_mask(config, data_dir, monkeypatch):
    source = input_pipeline.open_source(config.dataset, "validation")
    assert len(source) == 12
    for processes in (1, 2):
        rows = []
        for process in range(processes):
            monkeypatch.setattr(input_pipeline, "_shard", lambda p=process, n=processes: (p, n))
            ds = input_pipeline.eval_dataset(source, config, global_batch_size=BATCH)
            rows.append(list(ds))
        batches = [np.concatenate([r[i]["image"] for r in rows]) for i in range(len(rows[0]))]
        masks = [np.concatenate([r[i]["mask"] for r in rows]) for i in range(len(rows[0]))]
        assert len(batches) == input_pipeline.num_eval_batches(12, BATCH) == 2
        images, mask = np.concatenate(batches), np.concatenate(masks)
        assert mask.tolist() == [True] * 12 + [False] * 4  # padding only at the very end
        for i in range(12):
            np.testing.assert_array_equal(images[i], source[i]["image"])
        assert not images[12:].any()


def test_iterator_state_resumes_the_stream(config, train_source):
    it = iter(input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH))
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)  # crosses into the second epoch
    resumed = iter(input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH))
    resumed.set_state(state)
    for a, b in zip(_take(resumed, 4), expected, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_balanced_sampling_alternates_classes(data_dir, train_source):
    config = runs.make_config(data_dir, **{"imbalance.method": "balanced_sampling"})
    labels = input_pipeline.read_labels(train_source)
    assert labels.tolist() == [int(train_source[i]["label"]) for i in range(48)]
    assert 0 < labels.sum() < 48
    ds = input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH, labels=labels)
    drawn = np.concatenate([b["label"] for b in _take(iter(ds), 12)])
    assert drawn.mean() == 0.5  # half lesion, although the split is not balanced
    with pytest.raises(ValueError, match="needs the labels"):
        input_pipeline.train_dataset(train_source, config, global_batch_size=BATCH)


def test_worker_processes_run_outside_an_absl_app(data_dir, tmp_path, tmp_path_factory):
    """train_and_evaluate from a script or notebook (no absl app has parsed flags) with grain
    worker processes, which read absl flags."""
    script = tmp_path / "run.py"
    script.write_text(
        "from configs import test\n"
        "from liverjax import train\n"
        "if __name__ == '__main__':  # grain's workers start by spawning\n"
        "    config = test.get_config()\n"
        f"    config.dataset.data_dir = {str(data_dir)!r}\n"
        "    config.input.num_workers = 1\n"
        "    config.num_train_steps = 2\n"
        f"    print('STEPS', train.train_and_evaluate(config, {str(tmp_path / 'w')!r}).step)\n"
    )
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=8)
    log = tmp_path / "run.log"
    child = runs.start_python(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", env, log
    )
    assert child.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "STEPS 2" in log.read_text()


@pytest.mark.parametrize(
    "split, message",
    [
        ("tset", r"no split 'tset' \(Unknown split"),
        # What a Beam build's empty split, or a slice selecting none, gives.
        ("validation[5:5]", "split 'validation\\[5:5\\]' has no records"),
    ],
)
def test_a_missing_or_empty_split_names_the_built_splits(config, split, message):
    with pytest.raises(ValueError, match=message) as e:
        input_pipeline.open_source(config.dataset, split)
    assert "its splits: train 48, validation 12, test 12" in str(e.value)
    assert f"in data_dir={config.dataset.data_dir}: " in str(e.value)  # the data_dir given
    # ... also for the ReadOnlyBuilder of a config built from JSON, whose data_dir_root is the
    # version's folder
    built = tfds.builder(config.dataset.name, data_dir=config.dataset.data_dir)
    read_only = tfds.builder_from_directory(built.data_dir)
    assert os.fspath(read_only.data_dir_root) == built.data_dir  # what the message once showed
    assert input_pipeline.data_dir_of(read_only) == config.dataset.data_dir
    assert input_pipeline.data_dir_of(built) == config.dataset.data_dir
    # The report explains empty splits; a typo needs no such hint.
    assert ("curation_report.json" in str(e.value)) == (split != "tset")
    # Split expressions still open.
    assert len(input_pipeline.open_source(config.dataset, "train[:10%]+test")) == 5 + 12


def test_a_missing_manual_dir_is_named(tmp_path):
    dataset = runs.make_config(tmp_path / "data").dataset
    dataset.name = "liver/manual"
    dataset.build_if_missing = True
    dataset.manual_dir = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="config.dataset.manual_dir = .*no_such_folder"):
        input_pipeline.ensure_built(dataset)


def test_a_manual_build_without_a_manual_dir_says_to_set_it(tmp_path):
    dataset = runs.make_config(tmp_path / "data").dataset
    dataset.name, dataset.build_if_missing, dataset.manual_dir = "liver/manual", True, None
    with pytest.raises(
        FileNotFoundError, match=r"needs your DICOM: set --config.dataset.manual_dir"
    ):
        input_pipeline.ensure_built(dataset)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*"))


def test_records_of_another_version_are_named(tmp_path):
    dataset = runs.make_config(tmp_path / "data").dataset
    dataset.build_if_missing = False
    old = tmp_path / "data" / "liver" / "synthetic_small" / "1.0.0"
    old.mkdir(parents=True)
    (old / "dataset_info.json").write_text("{}")
    (old.parent / "0.0.1").mkdir()  # not a build: no dataset_info.json
    for call in (input_pipeline.ensure_built, lambda d: input_pipeline.open_source(d, "train")):
        with pytest.raises(FileNotFoundError) as e:
            call(dataset)
        message = str(e.value)
        assert "'liver/synthetic_small' version " in message and "is not built" in message
        assert "it holds version 1.0.0, which this liverjax does not read" in message
        assert "0.0.1" not in message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("kidney/manual", r"config.dataset.name = 'kidney/manual': no such dataset is registered"),
        ("liver/manal", r"config.dataset.name = 'liver/manal': the builder has no such config"),
    ],
)
def test_an_unknown_dataset_name_is_one_short_line(tmp_path, name, message):
    dataset = runs.make_config(tmp_path / "data").dataset
    dataset.name = name
    with pytest.raises(ValueError, match=message) as e:
        input_pipeline.ensure_built(dataset)
    assert "'synthetic', 'synthetic_small', 'manual'" in str(e.value)
    assert len(str(e.value)) < 600  # TFDS's own lists every dataset it knows (8,000 characters)


@pytest.mark.parametrize("text", ["None", "", " "])
def test_a_data_dir_of_none_as_text_is_the_tfds_default(tmp_path, text):
    # --config.dataset.data_dir=None sets the string field to "None": once a folder of that name
    dataset = runs.make_config(tmp_path).dataset
    dataset.data_dir = text
    assert input_pipeline.data_dir(dataset) is None
    root = input_pipeline._dataset_builder(dataset).data_dir_root
    assert os.path.basename(root) not in ("None", ""), root


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that does not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_grain_workers_exit_with_a_killed_training_process(data_dir, tmp_path, tmp_path_factory):
    # SIGKILL cannot stop the workers: once orphans, read records forever (GBs after many kills)
    code = textwrap.dedent(
        f"""
        import multiprocessing, os, signal
        from configs import test
        from liverjax import input_pipeline
        if __name__ == "__main__":
            config = test.get_config()
            config.dataset.data_dir = {str(data_dir)!r}
            config.input.num_workers = 2
            source = input_pipeline.open_source(config.dataset, "train")
            it = iter(input_pipeline.train_dataset(source, config, global_batch_size=8))
            next(it)
            print("WORKERS", *[p.pid for p in multiprocessing.active_children()], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    env = runs.child_env(runs.compilation_cache(tmp_path_factory), devices=1)
    log = tmp_path / "run.log"
    child = runs.start_python(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", env, log
    )
    assert child.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-3000:]
    line = next(x for x in log.read_text().splitlines() if x.startswith("WORKERS"))
    workers = [int(p) for p in line.split()[1:]]
    assert len(workers) == 2, line
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)]
