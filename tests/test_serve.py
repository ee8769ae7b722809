"""The REST server, for real: `python -m liverjax.serve` in a process on 127.0.0.1 with tensorflow
blocked, the session's export, DICOM files of the synthetic set, and the stdlib client.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
import training_runs
from test_dicom import deflated_dicom
from test_export import (
    DATASET,
    THRESHOLD,
    jax_outputs,
    make_config,
    make_model,
    shared_export,
    test_records,
)

from liverjax import client as liverjax_client
from liverjax import export, serve
from liverjax.client import Client, ServerError, multipart
from liverjax.serve_benchmark import ServerProcess, run_load

MAX_BODY = 2**20  # the server's --max_body_bytes in these tests
LOAD_CLIENTS = 16
LOAD_SECONDS = 5.0
NEW_VERSION_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def records(exported):
    return test_records(exported["data_dir"])


@pytest.fixture(scope="module")
def dicom_files(exported, records, tmp_path_factory) -> dict[str, pathlib.Path]:
    """sop_uid → DICOM file of the test split, regenerated from the builder's phantom settings."""
    config = tfds.builder(DATASET, data_dir=exported["data_dir"]).builder_config
    out = tmp_path_factory.mktemp("phantom")
    config.write_phantom(out)
    wanted = set(records["sop_uid"])
    found = {}
    for path in sorted(out.rglob("*.dcm")):
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        if uid in wanted:
            found[uid] = path
    assert set(found) == wanted, "the phantom no longer reproduces the records' files"
    return found


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """The server on a copy of the export, with tensorflow made unimportable."""
    root = tmp_path_factory.mktemp("serve")
    base = root / "liver"
    shutil.copytree(exported["version_dir"], base / "1")
    blocker = root / "blocker"
    (blocker / "tensorflow").mkdir(parents=True)
    marker = root / "tensorflow_imported"
    (blocker / "tensorflow" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "raise ImportError('tensorflow is blocked: the server must not need it')\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(blocker), *sys.path]),
        # the session's compilation cache: the server's programs are the tests' programs
        JAX_COMPILATION_CACHE_DIR=str(training_runs.compilation_cache(tmp_path_factory)),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    flags = (
        f"--max_body_bytes={MAX_BODY}",
        "--max_batch_size=4",  # few batch sizes to compile at each load
        "--batch_timeout_ms=5",
        "--file_system_poll_wait_seconds=0.2",
    )
    with ServerProcess(base, flags=flags, env=env, log_path=root / "server.log") as proc:
        proc.base = base
        proc.marker = marker
        yield proc
    assert not marker.exists(), "the server imported tensorflow"


@pytest.fixture
def client(server):
    with Client(server.url) as c:
        yield c


def test_status_metadata_health(server, client, records):
    assert client.status() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    md = client.metadata()
    assert md["model_spec"]["name"] == "liver" and md["model_spec"]["version"] == "1"
    signature = md["metadata"]["signature_def"]["signature_def"]["serving_default"]
    size = records["image"].shape[1]
    dims = [int(d["size"]) for d in signature["inputs"]["image"]["tensor_shape"]["dim"]]
    assert dims == [-1, size, size, 1]
    assert sorted(signature["outputs"]) == ["logit", "probability"]
    assert md["metadata"]["liverjax"]["threshold"] == THRESHOLD
    assert client.request("GET", "/healthz") == (200, {"status": "ok"})
    assert client.request("GET", "/readyz")[1]["version"] == 1
    assert not server.marker.exists()


def test_predict_row_and_columnar_match_jax(client, records, exported):
    images = records["image"][:5].astype(np.float32)
    want = jax_outputs(exported["model"], images)
    for columnar in (False, True):
        got = client.predict(images, columnar=columnar)
        for name in ("probability", "logit"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
    # instances as {"image": ...} objects, and a version in the path
    body = json.dumps({"instances": [{"image": images[0].tolist()}]}).encode()
    status, answer = client.request("POST", "/v1/models/liver/versions/1:predict", body)
    assert status == 200
    assert answer["predictions"][0]["probability"] == pytest.approx(
        float(want["probability"][0]), abs=1e-5
    )


def test_decode_equals_the_records(records, dicom_files):
    """The server's DICOM path gives the very int16 image the builder stored."""
    size = records["image"].shape[1]
    for uid, image in zip(records["sop_uid"], records["image"], strict=True):
        [(s, decoded, doubts, clipped, turned)] = serve.decode_dicom(
            dicom_files[uid].read_bytes(), dicom_files[uid].name, size
        )
        assert s.sop_uid == uid and doubts == [] and clipped == 0  # square-pixelled CT
        assert turned is None  # stored head first supine
        assert decoded.dtype == np.int16
        np.testing.assert_array_equal(decoded, image[..., 0])


def test_classify_dicom_has_no_skew(client, records, dicom_files, exported):
    """classify_dicom on the synthetic set's DICOM files = the JAX model on the same records."""
    want = jax_outputs(exported["model"], records["image"].astype(np.float32))
    files = [dicom_files[uid] for uid in records["sop_uid"]]
    results = client.classify_dicom(files)  # multipart, all test files in one request
    assert len(results) == len(files)
    threshold = THRESHOLD
    for i, result in enumerate(results):
        assert result["sop_uid"] == records["sop_uid"][i]
        assert result["patient_id"] == records["patient_id"][i]
        assert result["file"] == files[i].name and result["file_index"] == i
        assert result["path"] == str(files[i])  # the client's; the server saw the name only
        assert result["warnings"] == []
        assert (result["model_version"], result["threshold"]) == ("1", THRESHOLD)
        assert result["probability"] == pytest.approx(float(want["probability"][i]), abs=1e-4)
        label = int(result["probability"] >= threshold)
        assert (result["label"], result["class"]) == (label, ("normal", "lesion")[label])
    # one file as the body (application/dicom)
    [single] = client.classify_dicom([files[3]])
    assert single["probability"] == pytest.approx(float(want["probability"][3]), abs=1e-4)
    assert single["sop_uid"] == records["sop_uid"][3] and single["file"] == files[3].name


def test_file_names_that_are_not_utf8_are_sent_escaped(client, dicom_files, tmp_path, capsys):
    """A name written as Latin-1 on another system (Python keeps a surrogate escape): the server
    is sent `\\xe9`, as the dataset's report names it; `path` is the name as given."""
    source = next(iter(dicom_files.values()))
    latin1 = tmp_path / "caf\udce9.dcm"
    latin1.write_bytes(source.read_bytes())
    want = client.classify_dicom([source])[0]["probability"]
    for files in ([latin1], [latin1, source]):  # one file as the body; multipart
        got = client.classify_dicom(files)[0]
        assert got["file"] == "caf\\xe9.dcm" and got["path"] == str(latin1)
        assert got["probability"] == pytest.approx(want, abs=1e-6)  # another batch size
    # Backslashes, quotes and line breaks in a multipart file name: sent escaped, named as given
    # (line breaks percent-encoded, as browsers send them: no header can be forged).
    names = ["a\\b\\\\c.dcm", 'say "hi".dcm', "line\r\nX-Evil: 1.dcm", "\ud800x.dcm"]
    got = client.classify_dicom([source] * len(names), names=names)
    assert [r["file"] for r in got] == [
        "a\\b\\\\c.dcm",
        'say "hi".dcm',
        "line%0D%0AX-Evil: 1.dcm",
        "\\ud800x.dcm",
    ]
    liverjax_client.main(["--url", client.url, "classify", str(latin1)])
    assert json.loads(capsys.readouterr().out)[0]["file"] == "caf\\xe9.dcm"


def _without_pixels(path: pathlib.Path) -> bytes:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _bad_requests(size: int, dicom_path: pathlib.Path):
    good = np.zeros((1, size, size, 1)).tolist()
    predict = "/v1/models/liver:predict"
    classify = "/v1/models/liver:classify_dicom"
    dcm = {"Content-Type": "application/dicom"}
    body, content_type = multipart([("a.dcm", dicom_path.read_bytes()), ("b.txt", b"hello")])
    one, one_type = multipart([("a.dcm", dicom_path.read_bytes())])
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    many, many_type = multipart(
        [(f"{i}.dcm", b"x") for i in range(serve.DEFAULTS["max_files"] + 1)]
    )
    # A part without a filename is a form field, read as text (curl -F 'b=<file')
    unnamed = b'--x\r\nContent-Disposition: form-data; name="b"\r\n\r\nDICM\r\n--x--\r\n'
    mr = pydicom.dcmread(dicom_path)
    mr.Modality, mr.RescaleType = "MR", "US"  # the phantom says HU; US: unspecified
    out = io.BytesIO()
    mr.save_as(out, enforce_file_format=True)
    return [
        (
            "not CT",
            "POST",
            f"{classify}?filename=mr.dcm",
            out.getvalue(),
            dcm,
            422,
            "mr.dcm: not_ct: Modality 'MR'; this model reads CT in Hounsfield units",
        ),
        (
            "multipart part without a filename",
            "POST",
            classify,
            unnamed,
            {"Content-Type": "multipart/form-data; boundary=x"},
            400,
            "multipart parts ['b'] have no filename",
        ),
        (
            "a boolean in an image",
            "POST",
            predict,
            json.dumps({"instances": good}).replace("0.0", "true", 1).encode(),
            {},
            400,
            "instances[0][0][0][0]: true/false is not a number",
        ),
        (
            "an integer of 5000 digits",
            "POST",
            predict,
            b'{"instances": [' + b"1" * 5000 + b"]}",
            {},
            400,
            "malformed JSON: Exceeds the limit",
        ),
        (
            "UTF-16 JSON",  # json.loads reads it, and the true/false check would not
            "POST",
            predict,
            json.dumps({"instances": good}).encode("utf-16"),
            {},
            400,
            "the JSON body is not UTF-8",
        ),
        ("GET an unknown method", "GET", "/v1/models/liver:regress", None, {}, 404, "unknown"),
        ("no model name", "GET", "/v1/models", None, {}, 400, "missing model name in request"),
        ("no model name/", "GET", "/v1/models/", None, {}, 400, "missing model name in request"),
        ("POST to the status", "POST", "/v1/models/liver", b"{}", {}, 405, "POST is not allowed"),
        (
            "too many files",
            "POST",
            classify,
            many,
            {"Content-Type": many_type},
            400,
            "Too many files. Maximum number of files is 64. (the server's --max_files)",
        ),
        ("malformed JSON", "POST", predict, b'{"instances": [1,', {}, 400, "malformed JSON"),
        ("empty body", "POST", predict, b"", {}, 400, "empty body"),
        ("deeply nested JSON", "POST", predict, deep, {}, 400, "malformed JSON: nested too deeply"),
        ("neither key", "POST", predict, b'{"foo": 1}', {}, 400, "unknown keys ['foo']"),
        (
            "wrong shape",
            "POST",
            predict,
            json.dumps({"instances": [[[1.0]]]}).encode(),
            {},
            400,
            f"shape [1, 1, 1], expected [batch, {size}, {size}, 1]",
        ),
        (
            "wrong dtype",
            "POST",
            predict,
            json.dumps({"inputs": [[["a"]]]}).encode(),
            {},
            400,
            "expected numbers",
        ),
        (
            "ragged",
            "POST",
            predict,
            json.dumps({"inputs": [[1, 2], [3]]}).encode(),
            {},
            400,
            "not a rectangular array",
        ),
        ("null", "POST", predict, b'{"inputs": {"image": null}}', {}, 400, "got null"),
        (
            "integer beyond int64",
            "POST",
            predict,
            b'{"instances": [[[[100000000000000000000000]]]]}',
            {},
            400,
            "got an integer too large for int64",
        ),
        ("version not an integer", "GET", "/v1/models/liver/versions/x", None, {}, 400, "'x'"),
        (
            "NaN",
            "POST",
            predict,
            json.dumps({"instances": good}).replace("0.0", "NaN", 1).encode(),
            {},
            400,
            "value at index [0, 0, 0, 0] is nan",
        ),
        (
            "outside int16",
            "POST",
            predict,
            json.dumps({"instances": good}).replace("0.0", "40000.0", 1).encode(),
            {},
            400,
            "value at index [0, 0, 0, 0] is 40000.0, outside int16 (-32768..32767)",
        ),
        (
            "bad signature",
            "POST",
            predict,
            json.dumps({"signature_name": "x", "instances": good}).encode(),
            {},
            400,
            "signature_name 'x' not found",
        ),
        ("oversized", "POST", predict, b" " * (MAX_BODY + 1), {}, 413, "over the server's limit"),
        (
            "oversized chunked",
            "POST",
            predict,
            (b" " * 65536 for _ in range(MAX_BODY // 65536 + 1)),
            {},
            413,
            "over the server's limit",
        ),
        ("empty upload", "POST", classify, b"", dcm, 400, "empty"),
        ("not DICOM", "POST", classify, b"hello, not a DICOM file" * 10, dcm, 400, "not_dicom"),
        ("no pixels", "POST", classify, _without_pixels(dicom_path), dcm, 400, "no_pixels"),
        (
            "bad file in multipart",
            "POST",
            classify,
            body,
            {"Content-Type": content_type},
            400,
            "b.txt: not_dicom",
        ),
        (
            "truncated multipart",
            "POST",
            classify,
            one[: len(one) // 2],
            {"Content-Type": one_type},
            400,
            "multipart body: truncated, no closing boundary",
        ),
        (
            "wrong content type",
            "POST",
            classify,
            b"{}",
            {"Content-Type": "application/json"},
            415,
            "Content-Type 'application/json'",
        ),
        ("unknown model", "GET", "/v1/models/kidney", None, {}, 404, "unknown model 'kidney'"),
        (
            "unknown version",
            "POST",
            "/v1/models/liver/versions/9:predict",
            json.dumps({"instances": good}).encode(),
            {},
            404,
            "version 9 of model 'liver'",
        ),
        ("unknown method", "POST", "/v1/models/liver:regress", b"{}", {}, 404, "unknown method"),
        ("unknown path", "GET", "/v2/other", None, {}, 404, "no such path"),
    ]


def test_bad_input_gets_4xx_and_the_server_keeps_serving(client, records, dicom_files):
    size = records["image"].shape[1]
    dicom_path = dicom_files[records["sop_uid"][0]]
    image = records["image"][:1].astype(np.float32)
    want = client.predict(image)["probability"]
    for what, method, path, body, headers, status, message in _bad_requests(size, dicom_path):
        got_status, answer = client.request(method, path, body, headers)
        assert got_status == status, (what, answer)
        assert message in answer["error"], (what, answer)
        # and the next request is answered as before
        np.testing.assert_array_equal(client.predict(image)["probability"], want)
    with pytest.raises(ServerError) as e:
        client.classify_dicom([b"not dicom"], names=["x.dcm"])
    assert e.value.status == 400 and "x.dcm: not_dicom" in e.value.message


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) * 1024


def _strip(path: pathlib.Path, rows: int, columns: int) -> bytes:
    """The DICOM file at `path` with rows x columns pixels (a 1 x 16000 strip is 33 KB)."""
    ds = pydicom.dcmread(path)
    dtype = ds.pixel_array.dtype
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = np.zeros((rows, columns), dtype).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_dicom_over_max_pixels_is_refused_from_its_header(server, client, records, dicom_files):
    """Small bodies that decode to gigabytes get 413 before their pixels are decoded or inflated;
    the server's peak memory does not grow by what they would take."""
    path = dicom_files[records["sop_uid"][0]]
    want = client.classify_dicom([path])[0]["probability"]
    classify = "/v1/models/liver:classify_dicom"
    dcm = {"Content-Type": "application/dicom"}
    flag = f"over the server's limit of {serve.DEFAULTS['max_pixels']} pixels (--max_pixels)"
    side = 16384
    cases = [
        ("strip.dcm", _strip(path, 1, 16000), ("1×16000 pixels: the longest side, 16000", flag)),
        ("zeros.dcm", deflated_dicom(side, side, side * side * 2), (f"= {side**2} pixels", flag)),
        ("bomb.dcm", deflated_dicom(64, 64, 2**26), ("deflated dataset inflates to more than",)),
    ]
    before = _peak_rss(server.process.pid)
    for name, body, messages in cases:
        assert len(body) < MAX_BODY
        status, answer = client.request("POST", f"{classify}?filename={name}", body, dcm)
        assert status == 413 and answer["file"] == name, (name, answer)
        for message in messages:
            assert message in answer["error"], answer
    grown = _peak_rss(server.process.pid) - before
    assert grown < 256 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"
    # a Deflated file of an ordinary size is read as before
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    status, answer = client.request("POST", classify, out.getvalue(), dcm)
    assert status == 200 and answer["results"][0]["probability"] == pytest.approx(want, abs=1e-6)


def _with(path: pathlib.Path, **attributes) -> bytes:
    """The DICOM file at `path` with `attributes` changed."""
    ds = pydicom.dcmread(path)
    for name, value in attributes.items():
        setattr(ds, name, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_doubtful_images_are_answered_with_warnings(server, client, records, dicom_files, tmp_path):
    path = dicom_files[records["sop_uid"][0]]
    want = client.classify_dicom([path])[0]
    assert want["warnings"] == []
    stretched = _with(path, PixelSpacing=[0.7, 1.4])
    [got] = client.classify_dicom([stretched], names=["stretched.dcm"])
    assert got["warnings"] == [
        "non-square pixels (0.7 x 1.4 mm): resampled as square, its anatomy is stretched along "
        "one axis"
    ]
    assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)  # same pixels
    # Stored head first prone (upside down and mirrored): turned back, and scored as it shows
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, ::-1]).tobytes()
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    prone_file = tmp_path / "prone.dcm"
    ds.save_as(prone_file)
    [prone] = client.classify_dicom([prone_file])
    assert want["turned"] is None
    assert prone["turned"].startswith("stored rotated 180° (Image Orientation (Patient)")
    assert prone["warnings"] == [] and prone["sop_uid"] == want["sop_uid"]
    assert prone["probability"] == pytest.approx(want["probability"], abs=1e-6)
    # Hounsfield units by their Rescale Type, under another Modality: the decoder's own rule
    [hu] = client.classify_dicom([_with(path, Modality="OT", RescaleType="HU")], names=["ot.dcm"])
    assert hu["warnings"] == [] and hu["probability"] == pytest.approx(want["probability"])
    # --allow_non_ct answers an MR image, and says what it is
    with (
        ServerProcess(server.base, flags=("--allow_non_ct",), log_path=tmp_path / "log") as lenient,
        Client(lenient.url) as other,
    ):
        mr_file = _with(path, Modality="MR", RescaleType="US")
        [mr] = other.classify_dicom([mr_file], names=["mr.dcm"])
    assert mr["warnings"] == ["not CT (Modality MR): its values are not Hounsfield units"]
    assert mr["modality"] == "MR" and mr["class"] in ("normal", "lesion")


def test_405_says_which_methods_are_allowed(server):
    # RFC 9110: a 405 carries Allow
    for method, path, allowed in [
        ("GET", "/v1/models/liver:predict", "POST"),
        ("POST", "/v1/models/liver/versions/1", "GET, HEAD"),
        ("PUT", "/v1/models/liver", "GET, HEAD, POST"),
    ]:
        conn = http.client.HTTPConnection(server.url.split("//")[1], timeout=30)
        try:
            conn.request(method, path, body=b"{}" if method != "GET" else None)
            response = conn.getresponse()
            answer = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 405 and "error" in answer, (method, path, answer)
        assert sorted(response.getheader("Allow").split(", ")) == sorted(allowed.split(", "))


def test_an_empty_signature_name_is_the_default_one(client, records):
    # as in TF Serving, whose clients send "" for the default
    image = records["image"][:1].astype(np.float32)
    want = client.predict(image)["probability"]
    body = json.dumps({"signature_name": "", "instances": image.tolist()}).encode()
    status, answer = client.request("POST", "/v1/models/liver:predict", body)
    assert status == 200
    assert answer["predictions"][0]["probability"] == pytest.approx(float(want[0]), abs=1e-6)


def test_head_is_get_without_a_body(client):
    for path in ("/v1/models/liver", "/v1/models/liver/versions/1", "/v1/models/liver/metadata"):
        assert client.request("GET", path)[0] == 200
        assert client.request("HEAD", path) == (200, None), path
    assert client.request("HEAD", "/v1/models/liver/versions/9") == (404, None)
    assert client.request("HEAD", "/v1/models/liver:predict") == (405, None)
    assert client.request("HEAD", "/healthz") == (200, None)


def test_an_unexpected_exception_is_a_json_500_with_a_logged_traceback(caplog):
    """The catch-all of the application (the server's own routes raise only what they handle)."""

    async def broken(scope, receive, send):
        raise ZeroDivisionError("a bug")

    async def answer() -> list[dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
        await serve.InternalError(broken)(scope, receive, send)
        return sent

    with caplog.at_level(logging.ERROR, logger="liverjax.serve"):
        start, body = asyncio.run(answer())
    assert start["status"] == 500
    assert (b"content-type", b"application/json") in start["headers"]
    assert json.loads(body["body"]) == {
        "error": "internal error (ZeroDivisionError); the server log has the traceback"
    }
    [record] = caplog.records
    assert record.getMessage() == "GET /x failed" and record.exc_info[0] is ZeroDivisionError


def test_zero_padded_version_directories(exported, tmp_path):
    """TF Serving serves E/liver/003 as version 3: so does this server (the directory as named)."""
    base = tmp_path / "liver"
    shutil.copytree(exported["version_dir"], base / "003")
    (base / "0010").mkdir()  # a newer version that does not load
    assert serve.versions(base) == [3, 10]
    assert serve.version_dirs(base) == {3: base / "003", 10: base / "0010"}
    manager = serve.ModelManager("liver", base, max_batch=1, poll_seconds=1)
    manager.refresh()
    assert manager.current.version == 3 and manager.current.path == base / "003"
    assert manager.get("3") is manager.current
    assert [(s["version"], s["state"]) for s in manager.status()] == [
        ("3", "AVAILABLE"),
        ("10", "END"),
    ]
    (base / "3").mkdir()  # 3 and 003 both: "3" is the one
    assert serve.version_dirs(base)[3] == base / "3"


def test_a_version_exported_under_another_name_is_warned_of(exported, tmp_path, caplog):
    base = tmp_path / "kidney"
    shutil.copytree(exported["version_dir"], base / "1")
    metadata_path = base / "1" / serve.ASSETS_EXTRA / serve.METADATA_FILE
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps(metadata | {"model_name": "kidney"}))
    with caplog.at_level(logging.WARNING, logger="liverjax.serve"):
        serve.ModelManager("liver", base, max_batch=1, poll_seconds=1).refresh()
    assert "exported as model 'kidney' and is served as 'liver' (--model_name)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="liverjax.serve"):
        serve.ModelManager("kidney", base, max_batch=1, poll_seconds=1).refresh()
    assert "exported as" not in caplog.text


def test_a_base_path_of_the_export_root_names_the_model_folder(tmp_path, caplog):
    # --model_base_path E instead of E/liver: no version folder there, the model one below it
    root = tmp_path / "E"
    (root / "liver" / "1").mkdir(parents=True)
    manager = serve.ModelManager("liver", root, max_batch=1, poll_seconds=60)
    with caplog.at_level(logging.WARNING, logger="liverjax.serve"):
        manager.start()
    manager.stop()
    assert f"{root} holds no version folder" in caplog.text
    assert f"It holds models: give --model_base_path {root / 'liver'}" in caplog.text


def test_an_unlistable_folder_beside_the_models_is_no_crash(tmp_path, monkeypatch, caplog):
    # a volume root with lost+found, which a server not run as root cannot list
    root = tmp_path / "E"
    (root / "lost+found").mkdir(parents=True)
    listed = serve.version_dirs

    def version_dirs(path):
        if path.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return listed(path)

    monkeypatch.setattr(serve, "version_dirs", version_dirs)
    manager = serve.ModelManager("liver", root, max_batch=1, poll_seconds=60)
    with caplog.at_level(logging.WARNING, logger="liverjax.serve"):
        manager.start()  # waits for a version, as before
    manager.stop()
    assert f"{root} holds no version folder" in caplog.text and "It holds models" not in caplog.text


def test_status_while_the_poller_records_failed_versions(tmp_path, caplog):
    """status() reads the failed versions while the poller thread adds them."""
    base = tmp_path / "liver"
    for version in range(1, 3001):
        (base / str(version)).mkdir(parents=True)
    manager = serve.ModelManager("liver", base, max_batch=1, poll_seconds=1)
    caplog.set_level(logging.CRITICAL, logger="liverjax.serve")
    poller = threading.Thread(target=manager.refresh)  # each of the 3000 fails to load
    poller.start()
    try:
        while poller.is_alive():
            manager.status()
    finally:
        poller.join()
    assert len(manager.status()) == 3000


def test_load_16_clients_no_errors_and_batches(server, records, dicom_files, exported):
    images = records["image"].astype(np.float32)
    want = jax_outputs(exported["model"], images)["probability"]
    bodies = [
        json.dumps({"instances": images[i : i + 1].tolist()}).encode() for i in range(len(images))
    ]
    files = [dicom_files[uid].read_bytes() for uid in records["sop_uid"]]
    before = Client(server.url).request("GET", "/statsz")[1]

    def request(client: Client, worker: int, n: int) -> None:
        i = (worker + n) % len(images)  # each client cycles through different images
        if n % 2:
            [result] = client.classify_dicom([files[i]], names=[f"{i}.dcm"])
            got = result["probability"]
        else:
            status, answer = client.request("POST", "/v1/models/liver:predict", bodies[i])
            if status != 200:
                raise ServerError(status, str(answer))
            got = answer["predictions"][0]["probability"]
        if abs(got - want[i]) > 1e-4:
            raise AssertionError(f"image {i}: got {got}, want {want[i]}")

    report = run_load(server.url, request, clients=LOAD_CLIENTS, duration_s=LOAD_SECONDS)
    after = Client(server.url).request("GET", "/statsz")[1]
    assert report.errors == 0, report.first_errors
    assert report.requests >= LOAD_CLIENTS
    images_served = after["images"] - before["images"]
    calls = after["model_calls"] - before["model_calls"]
    assert images_served == report.requests
    assert calls < images_served, "16 concurrent clients were never batched together"
    print(f"\nload: {report.as_dict()}; mean batch {images_served / calls:.2f}")


def test_picks_up_a_new_version_and_never_a_failed_one(server, client, records):
    """An export written while the server runs is served without a restart (and v1 goes); one
    that fails its parity check leaves nothing the server could pick up."""
    other = make_model(seed=1)
    images = records["image"][:3].astype(np.float32)
    out = server.base.parent
    export_args = dict(
        input_size=images.shape[1], parity_images=images, threshold=0.25, with_tflite=False
    )
    with pytest.raises(export.ParityError, match="SavedModel disagrees"):
        # TF's float32 kernels differ from XLA's by ~1e-7: a zero tolerance must fail.
        export.export_model(other, make_config(), out, tolerance=0.0, **export_args)
    assert sorted(p.name for p in server.base.iterdir()) == ["1"]
    assert not list(out.glob("*.tflite"))
    assert client.status()["model_version_status"][0]["version"] == "1"

    result = export.export_model(other, make_config(), out, **export_args)
    assert result.version == 2
    assert sorted(p.name for p in server.base.iterdir()) == ["1", "2"]
    deadline = time.monotonic() + NEW_VERSION_TIMEOUT_S
    while client.status()["model_version_status"][0]["version"] != "2":
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    want = jax_outputs(other, images)
    got = client.predict(images)
    np.testing.assert_allclose(got["probability"], want["probability"], rtol=0, atol=1e-5)
    assert client.metadata()["metadata"]["liverjax"]["threshold"] == 0.25
    assert client.predict(images, version=2)["logit"] == pytest.approx(want["logit"], abs=1e-5)
    with pytest.raises(ServerError) as e:
        client.predict(images, version=1)
    assert e.value.status == 404

    # A version that does not load is reported, and the last good one goes on serving.
    broken = server.base / ".incoming"
    shutil.copytree(server.base / "2", broken)
    (broken / serve.ASSETS_EXTRA / "liverjax.stablehlo").write_bytes(b"not a module")
    broken.rename(server.base / "3")
    deadline = time.monotonic() + NEW_VERSION_TIMEOUT_S
    while len(status := client.status()["model_version_status"]) < 2:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE"), ("3", "END")]
    assert "not a liverjax export" in status[1]["status"]["error_message"]
    np.testing.assert_array_equal(client.predict(images)["probability"], got["probability"])
    # Its directory removed, it leaves the status.
    shutil.rmtree(server.base / "3")
    deadline = time.monotonic() + NEW_VERSION_TIMEOUT_S
    while len(status := client.status()["model_version_status"]) > 1:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert [(s["version"], s["state"]) for s in status] == [("2", "AVAILABLE")]


def test_tfserving_launcher_serves_the_export(exported, tmp_path):
    """launch/tfserving.sh mounts E/liver into the official image (dry run: no Docker here)."""
    script = pathlib.Path(__file__).resolve().parents[1] / "launch" / "tfserving.sh"
    env = dict(os.environ, DRY_RUN="1", MAX_BATCH_SIZE="8")
    run = subprocess.run(
        ["bash", str(script), str(exported["out_dir"]), "9001"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    command = run.stdout.split()
    assert command[:2] == ["docker", "run"] and "tensorflow/serving:latest" in command
    assert f"{exported['out_dir']}/liver:/models/liver:ro" in command
    assert "9001:8501" in command and "--model_base_path=/models/liver" in command
    assert "--enable_batching=true" in command
    [mount] = [arg for arg in command if arg.endswith(":/config:ro")]
    batching = pathlib.Path(mount.split(":")[0], "batching.config").read_text()
    assert "max_batch_size { value: 8 }" in batching
    assert "versions: 1" in run.stderr
    missing = subprocess.run(
        ["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "export first" in missing.stderr


def test_client_recovers_after_a_timeout_and_a_refused_connection():
    """A client that timed out (or found no server yet) is usable again: a retry loop while a
    server starts must not fail for ever on a connection stuck mid-request."""
    import http.server

    answered = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if not answered.is_set():
                answered.set()
                time.sleep(1.5)  # slower than the client's timeout
            body = json.dumps({"model_version_status": []}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the timed-out client is gone

        def log_message(self, *args):
            pass

    port = training_runs.free_port()
    with Client(f"http://127.0.0.1:{port}", timeout=0.5) as client:
        with pytest.raises(ConnectionRefusedError):
            client.status()  # nothing listens yet
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            with pytest.raises(TimeoutError):
                client.status()
            assert client.status() == {"model_version_status": []}
        finally:
            httpd.shutdown()
            httpd.server_close()
    with pytest.raises(ValueError, match="no files given"):
        Client("http://127.0.0.1:1").classify_dicom([])


def test_status_takes_zero_padded_versions_like_the_other_routes(client):
    version = client.status()["model_version_status"][0]["version"]  # 2 after the test above
    status, answer = client.request("GET", f"/v1/models/liver/versions/00{version}")
    assert status == 200 and answer["model_version_status"][0]["version"] == version
    assert client.request("GET", f"/v1/models/liver/versions/00{version}/metadata")[0] == 200


def test_a_client_gone_mid_upload_is_no_server_error(server, client):
    """An upload cut off (timeout, cancelled push) is logged as such, not as a 500 with a
    traceback: monitoring would count server errors that never happened."""
    import socket

    before = client.request("GET", "/statsz")[1]["responses"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/models/liver:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b"[" * 1000
        )
    deadline = time.monotonic() + 30
    while "the client disconnected" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    after = client.request("GET", "/statsz")[1]["responses"]
    assert after.get("500") == before.get("500"), (before, after)
    assert "ClientDisconnect" not in server.log()


def test_an_unknown_log_level_is_a_usage_error(tmp_path, capsys):
    # "warn" once loaded the model and then failed inside uvicorn
    with pytest.raises(SystemExit) as failed:
        serve.main(["--model_base_path", str(tmp_path), "--log_level", "warn"])
    assert failed.value.code == 2
    assert "invalid choice: 'warn'" in capsys.readouterr().err
    # upper case is a level too (it was before the choices); the next check fails instead
    with pytest.raises(SystemExit) as failed:
        serve.main(["--model_base_path", str(tmp_path), "--log_level", "WARNING", "--max_files=0"])
    assert "--max_files must be at least 1" in capsys.readouterr().err


def test_the_client_names_a_missing_file_not_the_server(tmp_path, capsys):
    from liverjax import client

    missing = tmp_path / "no_such.dcm"
    url = f"http://127.0.0.1:{training_runs.free_port()}"  # nothing listens: never reached
    with pytest.raises(SystemExit) as failed:
        client.main(["--url", url, "classify", str(missing)])
    assert str(failed.value.code) == f"{missing}: No such file or directory"


def test_the_client_command_needs_only_the_standard_library(tmp_path):
    # numpy made unimportable: status and classify still run (and fail only on the server)
    blocker = tmp_path / "blocker" / "numpy"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('numpy is blocked')\n")
    path = os.pathsep.join([str(blocker.parent), str(training_runs.REPO)])
    env = {**os.environ, "PYTHONPATH": path}
    url = f"http://127.0.0.1:{training_runs.free_port()}"  # nothing listens
    done = subprocess.run(
        [sys.executable, "-m", "liverjax.client", "--url", url, "status"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "ConnectionRefusedError" in done.stderr, done.stderr
    assert "numpy" not in done.stderr


def test_batcher_answers_mixed_batch_sizes_that_overflow_a_batch():
    # Requests of 10, 10, 2 and 1 images with max_batch 12: the second 10 waits for the next
    # call. Taking the batch out of the queue once compared the queued (servable, array) tuples,
    # which raised inside the batcher's task and left every later request waiting forever.
    calls = []

    async def run(servable, images):
        calls.append(len(images))
        await asyncio.sleep(0)
        return {"twice": images * 2.0, "version": np.full(len(images), servable)}

    async def scenario():
        batcher = serve.Batcher(max_batch=12, timeout_s=0.05, run=run)
        batcher.start()
        sizes = [10, 10, 2, 1, 10, 3, 1]
        requests = [
            np.full((n, 2, 2, 1), float(i), np.float32) for i, n in enumerate(sizes, start=1)
        ]
        versions = [1, 1, 1, 2, 1, 2, 1]  # two versions at once: one call each
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(batcher.predict(v, x) for v, x in zip(versions, requests, strict=True))
            ),
            10,
        )
        for v, x, got in zip(versions, requests, answers, strict=True):
            np.testing.assert_array_equal(got["twice"], x * 2.0)
            assert (got["version"] == v).all()
        assert batcher.alive and max(calls) <= 12 and sum(calls) == sum(sizes)
        failing = serve.Batcher(max_batch=4, timeout_s=0.01, run=lambda *_: _fail())
        failing.start()
        with pytest.raises(ValueError, match="model failed"):
            await asyncio.wait_for(failing.predict(1, requests[2]), 10)
        assert failing.alive  # a failed call fails its requests only
        # outputs that cannot be shared out (a list, not a dict of arrays): the same
        odd = serve.Batcher(max_batch=4, timeout_s=0.01, run=_listed)
        odd.start()
        with pytest.raises(AttributeError):
            await asyncio.wait_for(odd.predict(1, requests[2]), 10)
        assert odd.alive
        await odd.stop()
        await batcher.stop()
        await failing.stop()
        assert not batcher.alive
        with pytest.raises(RuntimeError, match="batcher is not running"):
            await batcher.predict(1, requests[2])

    async def _fail():
        raise ValueError("model failed")

    async def _listed(servable, images):
        return [images]

    asyncio.run(scenario())
