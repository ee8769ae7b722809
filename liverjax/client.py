"""A small client for the classifier's REST API: TF Serving's `:predict`, and `:classify_dicom`.

Standard library only (`http.client`; `predict` needs numpy), so it runs wherever Python does,
next to a PACS or in a notebook, with nothing to install; it keeps one connection open per client
(HTTP keep-alive), so one client per thread. The same client talks to `liverjax.serve` and to a
real TF Serving (`launch/tfserving.sh`) for `status`, `metadata` and `predict`; `classify_dicom` is
liverjax's.

    from liverjax.client import Client
    client = Client("http://127.0.0.1:8501")
    client.predict(hu_images)            # {"probability": array (N,), "logit": array (N,)}
    client.classify_dicom(["a.dcm"])     # [{"probability": ..., "class": "lesion", "sop_uid": ...}]

Command line: `python -m liverjax.client [--url URL] classify FILE... | status | metadata`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import sys
import urllib.parse
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

DEFAULT_URL = "http://127.0.0.1:8501"
DEFAULT_TIMEOUT_S = 60.0
OUTPUTS = ("probability", "logit")


class ServerError(RuntimeError):
    """The server answered with an error; `status` is the HTTP code, `body` the parsed answer."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class Client:
    """One keep-alive connection to a model server (not thread-safe: one client per thread)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        model_name: str = "liver",
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url
        self.model_name = model_name
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self._host, self._port, timeout=self._timeout)
        return self._conn

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON answer) of one request; reconnects once if the server closed."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                try:
                    conn.request(method, self._prefix + path, body=body, headers=headers or {})
                except (BrokenPipeError, ConnectionResetError):
                    # The server may answer (e.g. 413) and close before the whole body is sent.
                    pass
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            except BaseException:
                # A timeout, a refused connection, an interrupt: the connection is mid-request
                # (a later request would raise CannotSendRequest, or read this one's late answer).
                self.close()
                raise
            if response.getheader("connection", "").lower() == "close":
                self.close()
            try:
                return response.status, json.loads(data) if data else None
            except json.JSONDecodeError:
                return response.status, data.decode("utf-8", "replace")
        raise AssertionError("unreachable")

    def _checked(self, method: str, path: str, body=None, headers=None) -> Any:
        status, answer = self.request(method, path, body, headers)
        if status >= 400:
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            raise ServerError(status, str(message), answer)
        return answer

    def _model_path(self, version: int | None) -> str:
        path = f"/v1/models/{self.model_name}"
        return path if version is None else f"{path}/versions/{int(version)}"

    def status(self, version: int | None = None) -> dict[str, Any]:
        """GET /v1/models/NAME: the version status list."""
        return self._checked("GET", self._model_path(version))

    def metadata(self, version: int | None = None) -> dict[str, Any]:
        """GET /v1/models/NAME/metadata: the signature (and liverjax.json from liverjax.serve)."""
        return self._checked("GET", self._model_path(version) + "/metadata")

    def predict(
        self,
        images: np.ndarray,
        *,
        version: int | None = None,
        columnar: bool = False,
        signature_name: str = "serving_default",
    ) -> dict[str, np.ndarray]:
        """Lesion probabilities and logits (N,) for float32 HU images (N, H, W, 1)."""
        import numpy as np  # only here: the rest of the client is the standard library

        images = np.asarray(images, np.float32)
        key = "inputs" if columnar else "instances"
        body = json.dumps({"signature_name": signature_name, key: images.tolist()}).encode()
        answer = self._checked(
            "POST",
            self._model_path(version) + ":predict",
            body,
            {"Content-Type": "application/json"},
        )
        if columnar:
            return {k: np.asarray(answer["outputs"][k], np.float32) for k in OUTPUTS}
        rows = answer["predictions"]
        return {k: np.asarray([row[k] for row in rows], np.float32) for k in OUTPUTS}

    def classify_dicom(
        self,
        files: Sequence[str | os.PathLike | bytes],
        *,
        version: int | None = None,
        names: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One result per image: probability, class at the exported threshold, DICOM ids, the
        server's `warnings`, `turned` (how a slice stored rotated or flipped was turned, else
        None), `file_index` (which of `files`), `path` (that file as given; the server sees only
        its name), and the `model_version` and `threshold` that answered."""
        if not files:
            raise ValueError("classify_dicom: no files given")
        payloads = []
        for i, f in enumerate(files):
            raw = isinstance(f, bytes)
            name = names[i] if names else f"file{i}.dcm" if raw else pathlib.Path(f).name
            payloads.append((_text(name), f if raw else pathlib.Path(f).read_bytes()))
        path = self._model_path(version) + ":classify_dicom"
        if len(payloads) == 1:
            name, data = payloads[0]
            query = urllib.parse.urlencode({"filename": name})
            answer = self._checked(
                "POST", f"{path}?{query}", data, {"Content-Type": "application/dicom"}
            )
        else:
            body, content_type = multipart(payloads)
            answer = self._checked("POST", path, body, {"Content-Type": content_type})
        results = answer["results"]
        for result in results:
            given = files[result.get("file_index", 0)]
            result["path"] = None if isinstance(given, bytes) else str(given)
            result["model_version"] = answer["model_spec"]["version"]
            result["threshold"] = answer["threshold"]
        return results


def _text(name: str) -> str:
    """A file name as UTF-8 text for the server: bytes of a name that are not UTF-8 (written on
    another system, kept by Python as surrogate escapes) become `\\xNN`, as the dataset's
    report names them."""
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def multipart(files: Sequence[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of (filename, bytes) pairs."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        # A quoted string: a backslash escapes a backslash or a quote (the server unescapes
        # them); CR and LF are percent-encoded, as browsers send them (no header is forged).
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        quoted = quoted.replace("\r", "%0D").replace("\n", "%0A")
        parts.append(
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{quoted}"\r\n'
            f"Content-Type: application/dicom\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main(argv: list[str] | None = None) -> None:
    """Command line: classify DICOM files, or print the model's status or metadata."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--model_name", default="liver")
    parser.add_argument("--version", type=int, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    classify = sub.add_parser("classify", help="POST DICOM files to :classify_dicom")
    classify.add_argument("files", nargs="+")
    sub.add_parser("status", help="GET the version status")
    sub.add_parser("metadata", help="GET the signature")
    args = parser.parse_args(argv)
    with Client(args.url, model_name=args.model_name) as client:
        try:
            if args.command == "classify":
                answer = client.classify_dicom(args.files, version=args.version)
            elif args.command == "status":
                answer = client.status(args.version)
            else:
                answer = client.metadata(args.version)
        except ServerError as e:
            sys.exit(f"{args.url}: {e}")
        except OSError as e:
            if e.filename is not None:  # a file to upload is missing or unreadable
                sys.exit(f"{e.filename}: {e.strerror or e}")
            sys.exit(f"{args.url}: {type(e).__name__}: {e}")  # refused, timed out
        except http.client.HTTPException as e:
            sys.exit(f"{args.url}: {type(e).__name__}: {e}")
    json.dump(answer, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
