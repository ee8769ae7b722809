"""report.html opened in headless Chromium: the metrics table and every image are there.

The report is built by liverjax.evaluate's functions (operating points, patient bootstrap, worst
cases) from seeded predictions of two splits, with Grad-CAM maps of a freshly initialised CNN on
small images, so the page has every section a real evaluation writes. Chromium loads it from disk;
a script added to a copy of the page records each image's decoded size into the DOM, which
`--dump-dom` prints after the page has loaded.
"""

import html
import html.parser
import json
import re
import shutil
import subprocess

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from liverjax import evaluate, metrics, models, report, saliency, train
from tfds_liver import curation as curation_lib

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
IMAGE_SIZE = 32
WORST = 2

# Appended to a copy of the page: once everything has loaded, write each image's state.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map((im) => ({
    id: im.id, cls: im.className, complete: im.complete,
    width: im.naturalWidth, height: im.naturalHeight }));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>"""


def _rngs(seed: int) -> nnx.Rngs:
    """Initialization keys of training's PRNG (threefry initializers compile slowly on CPU)."""
    return nnx.Rngs(jax.random.key(seed, impl=train.INIT_PRNG))


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def _predictions(split: str, n_patients: int, slices: int, rng) -> evaluate.Predictions:
    """Seeded predictions: half the patients have lesion slices; lesion raises the probability."""
    patients = np.repeat([f"{split}-{i:03d}" for i in range(n_patients)], slices)
    has_lesion = np.repeat(np.arange(n_patients) % 2 == 0, slices)
    labels = (has_lesion & (rng.random(patients.size) < 0.6)).astype(np.int64)
    probs = 1.0 / (1.0 + np.exp(-(rng.normal(size=labels.size) + 1.5 * (2 * labels - 1))))
    ids = {
        name: np.asarray([f"{name}-{i}" for i in range(labels.size)]) for name in evaluate.ID_FIELDS
    }
    ids["patient_id"] = patients
    ids["source"] = np.where(np.repeat(np.arange(n_patients) % 3 == 0, slices), "site-b", "site-a")
    return evaluate.Predictions(split=split, labels=labels, probs=probs, ids=ids)


# What the dataset section reads: a curation report with every kind of warning.
CURATION = {
    "files_total": 80,
    "counts": {"written": 78, "duplicate": 1, "skipped": 1},
    "skipped_by_reason": {"not_dicom": 1},
    "files_with_clipped_pixels": 1,
    "files_not_ct": {"": 1, "MR": 2},
    "files_turned": 4,
    "dicom_patient_ids_labelled_as_several_patients": [
        {"dicom_patient_id": "X1", "patient_ids": ["A", "B"], "splits": ["test", "train"]},
        {"dicom_patient_id": "X2", "patient_ids": ["C", "D"], "splits": ["train"]},
    ],
    "near_identical_images": [
        {"patient_ids": ["E", "F"], "splits": ["train", "test"], "slice_pairs": 2},
        {"patient_ids": ["G", "H"], "splits": ["train", "train"], "slice_pairs": 1},
    ],
    "patient_ids_alike": [{"patient_ids": ["p-01", "P1"], "splits": ["test", "train"]}],
    "patients_sharing_a_study": [
        {"patient_ids": ["J", "K"], "study_uids": ["1.2"], "series_uids": [], "split": "test"}
    ],
    "patients_with_several_dicom_patient_ids": [
        {"patient_id": "L", "dicom_patient_ids": ["1", "2"]}
    ],
    "label_rows_without_image": [
        {"sheet": "labels.csv", "row": 7, "path": "a.dcm", "sop_instance_uid": None, "why": "-"}
    ],
    "files_with_non_square_pixels": 2,
    "files_without_pixel_spacing": 1,
    "slices_by_source": {"siteA": 200, "siteB": 112},
    "splits": {
        "train": {"patients": 40, "slices": 240, "lesion": 70, "normal": 170},
        "test": {
            "patients": 12,
            "patients_with_lesion": 5,
            "slices_by_source": {"siteA": 40, "siteB": 32},
            "slices": 72,
            "lesion": 20,
            "normal": 52,
            "pixel_spacing_mm": {"missing": 1, "min": 0.5, "median": 0.78125, "max": 1.5},
        },
    },
}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(report.html path, result) of a report with every section filled."""
    rng = np.random.default_rng(0)
    validation = _predictions("validation", 10, 6, rng)
    test = _predictions("test", 12, 6, rng)
    config = ml_collections.ConfigDict(
        {
            "model": models.default_model_config(),
            "image_size": IMAGE_SIZE,
            "seed": 0,
            "eval": {"bootstrap_resamples": 200, "worst_cases": WORST},
        }
    )
    config.model.widths, config.model.dense = (4, 8), 8
    settings = evaluate.eval_settings(config)
    analysis = evaluate.analyse(validation, test, settings)
    threshold = analysis["levels"]["slice"]["threshold"]
    indices = evaluate.worst_cases(test, threshold, WORST)
    model = nnx.jit(lambda: models.create_model(config, rngs=_rngs(0)))()
    model.eval()
    flat = np.concatenate(list(indices.values()))
    images = rng.random((flat.size, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
    maps, _ = saliency.grad_cam(model, images)
    kinds = [k for k, idx in indices.items() for _ in idx]
    cases = [
        {
            "kind": kind,
            **{name: str(test.ids[name][i]) for name in evaluate.ID_FIELDS},
            "label": int(test.labels[i]),
            "probability": float(test.probs[i]),
            "image": images[j, ..., 0],
            "cam": np.asarray(maps[j]),
        }
        for j, (kind, i) in enumerate(zip(kinds, flat, strict=True))
    ]
    curation = CURATION
    result = {
        "split": "test",
        "created": "2026-01-01T00:00:00+00:00",
        "dataset": {
            "name": "liver/synthetic_small",
            "version": "1.2.0",
            "full_name": "liver/synthetic_small/1.2.0",
            "data_dir": "DATA",
            "images": int(test.labels.size),
            "lesion_images": int(test.labels.sum()),
            "patients": 12,
        },
        "checkpoint": {"requested": "best", "step": 7, "chosen": "as requested"},
        **analysis,
        "config": config.to_dict(),
        "versions": {"jax": jax.__version__},
    }
    out = tmp_path_factory.mktemp("report")
    path = report.write_report(
        out, result, {level: test.level(level)[1:] for level in evaluate.LEVELS}, cases, curation
    )
    assert {c["kind"] for c in cases} == set(report.CASE_TITLES), "both kinds of error shown"
    return path, result, test, len(cases)


class _Tables(html.parser.HTMLParser):
    """The text of every cell of the table with id `table_id`, row by row."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell = table_id, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_page_is_self_contained(page):
    path, _, _, n_cases = page
    text = path.read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(sources) == len(report.FIGURES) + n_cases
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)
    assert "<script" not in text


def test_dataset_section_warns_of_values_that_are_not_hounsfield_units(page):
    text = page[0].read_text()
    dataset = text[text.index('<section id="dataset">') :]
    dataset = dataset[: dataset.index("</section>")]
    assert (
        '<p class="warn">3 written input files are not CT (1 without Modality, 2 MR): their '
        "values are not Hounsfield units.</p>" in dataset
    )
    assert "1 written input files had pixel values outside int16" in dataset
    assert "2 written input files have non-square pixels" in dataset
    assert "1 written input files have no pixel spacing" in dataset
    # What was done, not doubtful: not a warning
    assert (
        "<p>4 written input files were stored rotated, flipped or transposed (prone; feet first "
        "as seen from the gantry) and are turned to the standard axial orientation: their "
        "entries say how.</p>" in dataset
    )
    tables = _Tables("splits")
    tables.feed(dataset)
    spacing = {row[0]: row[-1] for row in tables.rows}
    assert spacing["Split"] == "Pixel spacing, mm (median, range)"
    assert spacing["test"] == "0.781 (0.5–1.5), 1 without"
    assert spacing["train"] == "n/a"  # a report from before the spacing was summarised
    # Every warning of curation.patient_warnings, in the build summary's words
    for warning in curation_lib.patient_warnings(CURATION):
        assert f'<p class="warn">{html.escape(warning, quote=True)}</p>' in dataset, warning
    assert (
        "2 DICOM PatientIDs are labelled as several patients (1 of them in more than one split, "
        "e.g. X1: test, train)" in dataset
    )
    assert "(1 of them in more than one split, e.g. p-01 and P1: test, train)" in dataset
    assert (
        "2 pairs of patients have near-identical images (1 of them in more than one split, "
        "e.g. E and F: train, test)" in dataset
    )
    assert "2 patients share DICOM studies with another (1 groups, each kept in one split)" in (
        dataset
    )
    assert "1 patients hold images of several DICOM PatientIDs" in dataset
    assert "1 label rows match no image (e.g. labels.csv line 7)" in dataset
    lesion_patients = {row[0]: row[2] for row in tables.rows}
    assert lesion_patients == {"Split": "Patients with lesion", "train": "n/a", "test": "5"}
    assert "Per split: test siteA 40, siteB 32." in dataset


def test_chromium_renders_table_and_images(page, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    path, result, test, n_cases = page
    probed = tmp_path / "probed.html"
    probed.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    run = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout

    # Every image decoded, at the size it was written with.
    probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert probe, f"the probe script did not run; DOM starts with {dom[:500]!r}"
    images = json.loads(html.unescape(probe.group(1)))
    assert len(images) == len(report.FIGURES) + n_cases
    assert all(im["complete"] and im["width"] > 0 and im["height"] > 0 for im in images)
    figures = {im["id"]: im for im in images if im["cls"] == "figure"}
    assert set(figures) == {f"fig-{name}" for name in report.FIGURES}
    roc_png = (path.parent / "roc.png").read_bytes()
    # PNG IHDR: width and height as big-endian uint32 at bytes 16..24.
    assert figures["fig-roc"]["width"] == int.from_bytes(roc_png[16:20], "big")
    cases = [im for im in images if im["cls"] == "case"]
    expected_width = (IMAGE_SIZE * 2 + IMAGE_SIZE // report.CASE_GAP_FRACTION) * (
        report.CASE_DISPLAY_SIZE // IMAGE_SIZE
    )
    assert [im["width"] for im in cases] == [expected_width] * n_cases

    # The metrics table, as rendered, carries the numbers of the evaluation.
    tables = _Tables("metrics")
    tables.feed(dom)
    rows = {row[0]: row[1:] for row in tables.rows}
    assert rows[""] == [report.LEVEL_TITLES[level] for level in evaluate.LEVELS]
    slice_ = result["levels"]["slice"]
    auc = metrics.roc_auc(test.labels, test.probs)
    low, high = slice_["ci"]["roc_auc"]
    assert rows["ROC AUC"][0] == f"{auc:.3f} ({low:.3f}\u2013{high:.3f})"
    assert rows["Units"][0] == f"{test.labels.size} images"
    m = slice_["metrics"]
    assert rows["TP / FP / TN / FN"][0] == f"{m['tp']} / {m['fp']} / {m['tn']} / {m['fn']}"
    assert m["tp"] + m["fn"] == int(test.labels.sum())

    # One row per source, its images adding up to the split.
    tables = _Tables("sources")
    tables.feed(dom)
    sources = {row[0]: row for row in tables.rows[1:]}
    assert set(sources) == {"site-a", "site-b"}
    assert sum(int(row[3]) for row in sources.values()) == test.labels.size
    for name, row in sources.items():
        counts = [int(c) for c in row[-1].split(" / ")]
        assert sum(counts) == int(row[3]), name  # TP / FP / TN / FN cover the source's images
        v = result["by_source"][name]
        assert int(row[2]) == v["patients_with_lesion"] > 0
