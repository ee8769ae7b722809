"""A TF-Serving-compatible REST server for the exported classifier, plus a DICOM upload endpoint.

`python -m liverjax.serve --model_base_path E/liver --port 8501 [--model_name liver]`

It speaks the TF Serving REST API, so existing clients work unchanged:

    GET  /v1/models/liver[/versions/N]             version status
    GET  /v1/models/liver[/versions/N]/metadata    signature (and liverjax.json under "liverjax")
    POST /v1/models/liver[/versions/N]:predict     {"instances": [...]} → {"predictions": [...]}
                                                   {"inputs": ...}      → {"outputs": {...}}
and adds
    POST /v1/models/liver[/versions/N]:classify_dicom
         body application/dicom (one file) or multipart/form-data (several files) →
         per image: probability, logit, label and class at the exported threshold, DICOM ids,
         file_index (upload order), warnings and turned (how a slice stored rotated or
         flipped was turned to the standard axial orientation); not CT: 422 unless
         --allow_non_ct
    GET  /healthz (process up), /readyz (a version is loaded and warm), /statsz (counters)

What it runs: each version directory holds, beside the SavedModel, the same StableHLO module
serialized with `jax.export` (`assets.extra/liverjax.stablehlo`, weights in `params.npz`), which
`liverjax.export` checked against the SavedModel and the JAX model before publishing. The server
loads that module with JAX, so it needs no tensorflow and runs exactly the exported graph (HU window
and resize inside). To serve the SavedModel itself, use TF Serving (`launch/tfserving.sh`): the
client and the API are the same.

Versions: the newest integer directory under `--model_base_path` that loads is served; the
directory is polled every `--file_system_poll_wait_seconds`, and a newer version is loaded and
warmed in the background, then swapped in between requests (the previous one is unloaded, as TF
Serving's default "latest" policy does). A version that fails to load is reported in the status
(state END, with the error) and tried again when its files change; publish versions by renaming a
finished directory into place, as `liverjax.export` does.

Requests that arrive together are batched into one model call (up to `--max_batch_size` images;
a batch is what queued while the previous call ran, plus what arrives within `--batch_timeout_ms`).

Every error is JSON `{"error": "..."}`: 400 for a bad request (the message says what was wrong and
where), 404 for an unknown model, version or path, 413 for a body over `--max_body_bytes` or a
DICOM file over `--max_pixels` (refused from its header, before its pixels are decoded), 415 for
an upload that is not DICOM or multipart, 503 while no version is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import threadpoolctl
import uvicorn
from python_multipart.multipart import parse_options_header
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from liverjax import dicom

log = logging.getLogger("liverjax.serve")

# The layout and file names `liverjax.export` writes (kept here too so serving needs no tensorflow
# import path; tests check they match).
ASSETS_EXTRA = "assets.extra"
METADATA_FILE = "liverjax.json"
SIGNATURE = "serving_default"
INPUT = "image"
OUTPUTS = ("probability", "logit")
_VERSION_RE = re.compile(r"^\d+$")
_MODEL_PATH_RE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z_]+))?$"
)
DICOM_TYPES = ("application/dicom", "application/octet-stream")
DEFAULTS = {
    "model_name": "liver",
    "host": "127.0.0.1",
    "port": 8501,
    "max_batch_size": 16,
    # 0: a batch is what queued while the previous model call ran (no added latency when idle);
    # > 0 waits that long for more requests, as TF Serving's batch_timeout_micros.
    "batch_timeout_ms": 0.0,
    "max_body_bytes": 64 * 2**20,  # a few uncompressed 512² CT slices, or one JSON image
    "max_files": 64,  # DICOM files in one multipart upload
    # pixels in one DICOM file (rows x columns x frames), and in the square its longest side pads
    # to: 4096² x 4 is a 16-frame 2048² object, and its decoding takes ~1 GB
    "max_pixels": 4096 * 4096 * 4,
    "poll_seconds": 1.0,  # TF Serving's default --file_system_poll_wait_seconds
}


# BLAS threads per process while serving. Idle OpenBLAS threads spin on the cores XLA's thread pool
# needs: when resampling was a dense matrix product, decode + model call of a 512² DICOM on 2 cores
# took 28 ms with OpenBLAS's default and 4 ms with one thread. The banded resample no longer calls
# BLAS; this keeps any matrix product on the request path from bringing the stall back.
BLAS_THREADS = 1


def limit_blas_threads() -> None:
    """Caps this process's BLAS thread pools at BLAS_THREADS (for serving)."""
    threadpoolctl.threadpool_limits(limits=BLAS_THREADS, user_api="blas")


class RequestError(ValueError):
    """A request the server cannot answer; `status` is the HTTP code, str() the message."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = status
        self.headers = headers  # of the response (405's Allow)
        self.extra = extra  # more keys of the JSON answer


@dataclasses.dataclass
class Stats:
    """Counters shown at /statsz: answers by status, model calls and the images they carried."""

    responses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    model_calls: int = 0
    images: int = 0
    largest_batch: int = 0

    def record_call(self, images: int) -> None:
        self.model_calls += 1
        self.images += images
        self.largest_batch = max(self.largest_batch, images)

    def as_dict(self) -> dict[str, Any]:
        calls = self.model_calls
        return {
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "model_calls": calls,
            "images": self.images,
            "mean_batch": self.images / calls if calls else 0.0,
            "largest_batch": self.largest_batch,
        }


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the model is compiled for: powers of two up to `max_batch`, and `max_batch`."""
    sizes = {2**i for i in range(int(math.log2(max_batch)) + 1)} | {max_batch}
    return tuple(sorted(sizes))


@dataclasses.dataclass
class Servable:
    """One loaded version: its metadata and a compiled call on HU images (N, size, size, 1)."""

    version: int
    path: pathlib.Path
    metadata: dict[str, Any]
    buckets: tuple[int, ...]
    _call: Callable[..., dict[str, jax.Array]]
    _params: list[jax.Array]

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata["label_names"])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        version: int,
        max_batch: int = DEFAULTS["max_batch_size"],
        warmup: bool = True,
        device: jax.Device | None = None,
    ) -> Servable:
        """Loads a version directory written by `liverjax.export`; warmup compiles every bucket.

        It runs where its parameters are: on `device`, else JAX's default device.
        """
        path = pathlib.Path(path)
        assets = path / ASSETS_EXTRA
        metadata_path = assets / METADATA_FILE
        try:
            metadata = json.loads(metadata_path.read_text())
            module = metadata["serving_module"]
            exported = jax.export.deserialize(
                bytearray((assets / module["stablehlo"]).read_bytes())
            )
            with np.load(assets / module["params"]) as npz:
                params = [jax.device_put(npz[k], device) for k in sorted(npz.files)]
        except Exception as e:  # noqa: BLE001 - garbage can fail deserialization in any way
            raise RuntimeError(
                f"{path}: not a liverjax export ({type(e).__name__}: {e}); export with "
                f"`python -m liverjax.export`, or serve a plain SavedModel with TF Serving"
            ) from e
        servable = cls(
            version, path, metadata, batch_buckets(max_batch), jax.jit(exported.call), params
        )
        if warmup:
            size = servable.input_size
            for b in servable.buckets:
                servable.predict(np.zeros((b, size, size, 1), np.float32))
        return servable

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """{"probability", "logit"} float32 (N,) for float32 HU images (N, size, size, 1)."""
        n = len(images)
        top = self.buckets[-1]
        chunks = []
        for start in range(0, n, top):
            chunk = images[start : start + top]
            bucket = next(b for b in self.buckets if b >= len(chunk))
            padded = np.zeros((bucket, *chunk.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            out = self._call(self._params, padded)
            chunks.append({k: np.asarray(out[k])[: len(chunk)] for k in OUTPUTS})
        return {k: np.concatenate([c[k] for c in chunks]) for k in OUTPUTS}


def versions(base_path: str | os.PathLike) -> list[int]:
    """The integer version directories under `base_path`, ascending (none if it does not exist)."""
    return sorted(version_dirs(base_path))


def version_dirs(base_path: str | os.PathLike) -> dict[int, pathlib.Path]:
    """Version → its directory under `base_path`, named as it is (TF Serving serves `003` as 3;
    of `3` and `003` both there, `3` is taken)."""
    path = pathlib.Path(base_path)
    if not path.is_dir():
        return {}
    dirs = sorted(
        (p for p in path.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)),
        key=lambda p: (int(p.name), p.name != str(int(p.name)), p.name),
        reverse=True,
    )
    return {int(p.name): p for p in dirs}


def _fingerprint(path: pathlib.Path) -> tuple:
    """(relative path, size, mtime) of every file under `path`: changes while files are written."""
    entries = []
    for p in sorted(path.rglob("*")):
        with contextlib.suppress(OSError):  # a file removed while we look
            stat = p.stat()
            entries.append((str(p.relative_to(path)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def _holds_versions(path: pathlib.Path) -> bool:
    """A folder with version folders in it (False for one that cannot be listed: lost+found)."""
    try:
        return path.is_dir() and bool(version_dirs(path))
    except OSError:
        return False


class ModelManager:
    """Keeps the newest version of one model loaded; polls the base path for new ones."""

    def __init__(
        self, name: str, base_path: str | os.PathLike, *, max_batch: int, poll_seconds: float
    ):
        self.name = name
        self.base_path = pathlib.Path(base_path)
        self.max_batch = max_batch
        self.poll_seconds = poll_seconds
        self.current: Servable | None = None
        # version → (its files when it failed to load, why); retried once its files change
        self.failed: dict[int, tuple[tuple, str]] = {}
        self._failed_lock = threading.Lock()  # the poller writes `failed` while requests read it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Serves the newest version that loads; keeps the current one if none newer does.
        A version that failed to load and whose directory is gone leaves the status."""
        dirs = version_dirs(self.base_path)
        with self._failed_lock:
            for version in [v for v in self.failed if v not in dirs]:
                del self.failed[version]
        for version, path in sorted(dirs.items(), reverse=True):
            if self.current is not None and version == self.current.version:
                return
            files = _fingerprint(path)
            if version in self.failed and self.failed[version][0] == files:
                continue
            log.info("loading %s version %d", self.name, version)
            try:
                servable = Servable.load(path, version=version, max_batch=self.max_batch)
            except Exception as e:  # noqa: BLE001 - keep serving the previous version, report why
                log.error("could not load %s version %d: %s", self.name, version, e)
                with self._failed_lock:
                    self.failed[version] = (files, str(e))
                continue
            with self._failed_lock:
                self.failed.pop(version, None)
            self.current = servable
            log.info("serving %s version %d", self.name, version)
            exported_as = servable.metadata.get("model_name")
            if exported_as and exported_as != self.name:
                log.warning(
                    "version %d was exported as model %r and is served as %r (--model_name): "
                    "clients must ask for /v1/models/%s",
                    version,
                    exported_as,
                    self.name,
                    self.name,
                )
            return

    def start(self) -> None:
        """Loads what is there now, then polls in a background thread."""
        if not self.base_path.is_dir():
            log.warning("%s does not exist yet; waiting for a version to appear", self.base_path)
        elif not version_dirs(self.base_path):
            models = sorted(p.name for p in self.base_path.iterdir() if _holds_versions(p))
            log.warning(
                "%s holds no version folder (an integer, as the export writes); waiting for one "
                "to appear%s",
                self.base_path,
                f". It holds models: give --model_base_path {self.base_path / models[0]}"
                if models
                else "",
            )
        self.refresh()

        def poll():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - the poller must outlive a bad directory scan
                    log.exception("polling %s failed", self.base_path)

        self._thread = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self, version: str | None) -> Servable:
        """The servable for `version` (None = newest); RequestError 404/503 if there is none."""
        current = self.current
        if current is None:
            raise RequestError(
                f"model {self.name!r} has no loaded version yet under {self.base_path}", 503
            )
        if version is None:
            return current
        if not _VERSION_RE.match(version):
            raise RequestError(f"version {version!r} is not an integer", 400)
        if int(version) != current.version:
            raise RequestError(
                f"version {version} of model {self.name!r} is not loaded "
                f"(serving version {current.version})",
                404,
            )
        return current

    def status(self) -> list[dict[str, Any]]:
        """TF Serving's model_version_status list."""
        out = []
        current = self.current
        if current is not None:
            out.append(_version_status(current.version, "AVAILABLE"))
        with self._failed_lock:
            failed = list(self.failed.items())
        for version, (_, why) in sorted(failed, reverse=True):
            out.append(_version_status(version, "END", "UNKNOWN", why))
        return out


def _version_status(version: int, state: str, code: str = "OK", message: str = "") -> dict:
    return {
        "version": str(version),
        "state": state,
        "status": {"error_code": code, "error_message": message},
    }


class Batcher:
    """Groups concurrent predictions for the same version into one model call (bounded wait)."""

    def __init__(
        self,
        max_batch: int,
        timeout_s: float,
        run: Callable[[Servable, np.ndarray], Any],
    ):
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.run = run  # async (servable, images) -> outputs
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def predict(self, servable: Servable, images: np.ndarray) -> dict[str, np.ndarray]:
        """Queues `images` and waits for their share of a batched call."""
        if not self.alive:
            raise RuntimeError("the request batcher is not running (see the log)")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((servable, images, future))
        return await future

    @property
    def alive(self) -> bool:
        """Whether the loop runs (False before start and after a crash, which it logs)."""
        return self._task is not None and not self._task.done()

    async def _loop(self) -> None:
        pending: collections.deque = collections.deque()
        try:
            while True:
                await self._round(pending)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a defect here: fail every waiting request, not hang it
            log.exception("the batcher stopped; model requests fail until a restart")
            failure = RuntimeError(f"the request batcher stopped ({type(e).__name__}: {e})")
            while self.queue is not None and not self.queue.empty():
                pending.append(self.queue.get_nowait())
            for *_, future in pending:
                if not future.done():
                    future.set_exception(failure)
            raise

    async def _round(self, pending: collections.deque) -> None:
        """Collects queued requests into `pending`, then runs one batch of them."""
        loop = asyncio.get_running_loop()
        if not pending:
            pending.append(await self.queue.get())
        # Everything that queued while the previous call ran joins at once; then wait at most
        # timeout_s for more, unless the batch is full.
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        deadline = loop.time() + self.timeout_s
        count = sum(len(item[1]) for item in pending)
        while count < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                item = await asyncio.wait_for(self.queue.get(), remaining)
            except TimeoutError:
                break
            pending.append(item)
            count += len(item[1])
        # One call per version, up to max_batch images; the rest waits for the next round, in
        # its order. (By position: comparing the queued tuples would compare their arrays.)
        servable = pending[0][0]
        batch, rest, count = [], [], 0
        for item in pending:
            if item[0] is servable and (not batch or count + len(item[1]) <= self.max_batch):
                batch.append(item)
                count += len(item[1])
            else:
                rest.append(item)
        pending.clear()
        pending.extend(rest)
        try:
            images = np.concatenate([item[1] for item in batch])
            out = await self.run(servable, images)
            start, shares = 0, []
            for _, item_images, _ in batch:
                end = start + len(item_images)
                shares.append({k: v[start:end] for k, v in out.items()})
                start = end
        except BaseException as e:  # the error goes to each waiting request, none left hanging
            error = e if isinstance(e, Exception) else RuntimeError(f"model call stopped: {e!r}")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(e, Exception):
                raise  # cancellation, exit: the loop ends too
            return
        for (*_, future), share in zip(batch, shares, strict=True):
            if not future.done():
                future.set_result(share)


# ----------------------------------------------------------------------------- request parsing


def _object_contents(array: np.ndarray) -> str:
    """What a rectangular JSON array that numpy holds as objects has in it besides numbers."""
    for x in array.flat:
        if x is None:
            return "null"
        if isinstance(x, bool) or not isinstance(x, int | float):
            return f"{type(x).__name__} values"
    return "an integer too large for int64"


def _first_bool(value: Any) -> str | None:
    """Where the first JSON true/false is in a parsed request, as a path, else None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool):
            return path
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in reversed(node.items()))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(node))))
    return None


def _as_images(value: Any, where: str, size: int, *, batched: bool) -> np.ndarray:
    """A JSON tensor → float32 (N, size, size, 1), or RequestError naming what is wrong."""
    want = f"[{'batch, ' if batched else ''}{size}, {size}, 1]"
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise RequestError(
            f"{where}: not a rectangular array of numbers ({e}); expected {want}"
        ) from None
    if array.dtype == object or array.dtype.kind not in "iuf":
        kind = {"b": "booleans", "U": "strings", "O": "a ragged or mixed array"}.get(
            array.dtype.kind, str(array.dtype)
        )
        if array.dtype == object:
            kind = _object_contents(array)
        raise RequestError(f"{where}: expected numbers (float32 Hounsfield units), got {kind}")
    if not batched:
        array = array[None]
    if array.ndim != 4 or array.shape[1:] != (size, size, 1) or len(array) == 0:
        got = list(array.shape if batched else array.shape[1:])
        raise RequestError(f"{where}: shape {got}, expected {want} (float32 Hounsfield units)")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise RequestError(
            f"{where}: value at index {list(index)} is {array[index]}; images must be finite "
            f"float32 Hounsfield units"
        )
    info = np.iinfo(np.int16)
    outside = (array < info.min - 0.5) | (array >= info.max + 0.5)
    if outside.any():  # as liverjax.predict refuses them: the records hold int16 HU
        index = tuple(int(i) for i in np.argwhere(outside)[0])
        raise RequestError(
            f"{where}: value at index {list(index)} is {array[index]}, outside int16 "
            f"({info.min}..{info.max}): the model reads Hounsfield units as the records hold "
            "them, rounded to int16"
        )
    return array


def parse_predict(body: bytes, size: int) -> tuple[np.ndarray, str]:
    """A TF Serving predict body → (images, "row" | "columnar")."""
    if not body:
        raise RequestError('empty body: send JSON {"instances": [...]} or {"inputs": ...}')
    try:
        text = body.decode("utf-8")  # as TF Serving reads it (json.loads would take UTF-16 too)
    except UnicodeDecodeError as e:
        raise RequestError(f"the JSON body is not UTF-8 ({e})") from None
    try:
        request = json.loads(text)
    except RecursionError:
        raise RequestError(
            "malformed JSON: nested too deeply; an image is [height, width, 1] lists of numbers"
        ) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 4300+ digits
        raise RequestError(f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise RequestError('the body must be a JSON object with "instances" or "inputs"')
    if b"true" in body or b"false" in body:  # numpy would read them as 1.0 and 0.0 HU
        where = _first_bool(request)
        if where is not None:
            raise RequestError(f"{where}: true/false is not a number (float32 Hounsfield units)")
    signature = request.get("signature_name", SIGNATURE)
    if signature == "":  # as in TF Serving: the default signature
        signature = SIGNATURE
    if signature != SIGNATURE:
        raise RequestError(f"signature_name {signature!r} not found; this model has {SIGNATURE!r}")
    unknown = set(request) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise RequestError(f"unknown keys {sorted(unknown)}; use 'instances' or 'inputs'")
    if ("instances" in request) == ("inputs" in request):
        raise RequestError('give exactly one of "instances" (row format) or "inputs" (columnar)')
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError('"instances" must be a non-empty list, one entry per image')
        if all(isinstance(i, dict) for i in instances):
            rows = []
            for n, instance in enumerate(instances):
                if set(instance) != {INPUT}:
                    raise RequestError(
                        f"instances[{n}] has keys {sorted(instance)}; the only input is {INPUT!r}"
                    )
                rows.append(
                    _as_images(instance[INPUT], f"instances[{n}].{INPUT}", size, batched=False)
                )
            return np.concatenate(rows), "row"
        return _as_images(instances, "instances", size, batched=True), "row"
    inputs = request["inputs"]
    if isinstance(inputs, dict):
        if set(inputs) != {INPUT}:
            raise RequestError(f"inputs has keys {sorted(inputs)}; the only input is {INPUT!r}")
        return _as_images(inputs[INPUT], f"inputs.{INPUT}", size, batched=True), "columnar"
    return _as_images(inputs, "inputs", size, batched=True), "columnar"


def decode_dicom(
    data: bytes, name: str, size: int, max_pixels: int | None = None
) -> list[dicom.Resampled]:
    """`dicom.decode_resampled` (the dataset builder's decoding and resampling, with each
    slice's doubts); with `max_pixels`, a file whose header declares more pixels than that (see
    `check_size`) is refused before its pixel data is read, decoded or inflated."""
    if max_pixels is not None:
        check_size(data, name, max_pixels)
    return dicom.decode_resampled(data, name, size)


def check_size(data: bytes, name: str, max_pixels: int) -> None:
    """RequestError 413 for a file over `max_pixels` (rows x columns x frames, or the square its
    longest side pads to in `dicom.resample`) by its header, or a Deflated one that inflates to
    more than its pixels and DEFLATED_HEADER_BYTES. A header that does not say passes, for
    `read_dicom` to explain."""
    declared = dicom.declared_size(data, name=name)
    if declared is None:
        return
    rows, columns, frames = declared.rows, declared.columns, declared.frames
    shape = f"{rows}×{columns} pixels" + (f" × {frames} frames" if frames != 1 else "")
    limit = f"the server's limit of {max_pixels} pixels (--max_pixels)"
    if declared.pixels > max_pixels:
        raise RequestError(
            f"{name}: {shape} = {declared.pixels} pixels, over {limit}", 413, file=name
        )
    side = max(rows, columns)
    if side * side > max_pixels:
        raise RequestError(
            f"{name}: {shape}: the longest side, {side}, is resized as a {side}×{side} square, "
            f"over {limit}",
            413,
            file=name,
        )
    most = declared.pixel_bytes + dicom.DEFLATED_HEADER_BYTES
    inflated = dicom.inflated_size(data, most)
    if inflated is not None and inflated > most:
        raise RequestError(
            f"{name}: the deflated dataset inflates to more than {most} bytes: {shape} "
            f"({declared.pixel_bytes} bytes) and {dicom.DEFLATED_HEADER_BYTES} bytes besides",
            413,
            file=name,
        )


# ----------------------------------------------------------------------------- the application


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes` (declared length, or as it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return (
            f"request body of {size} bytes is over the server's limit of {self.max_bytes} bytes "
            f"(--max_body_bytes); send fewer images per request"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"error": self._too_large(length)}, 413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited_receive, send)


class InternalError:
    """ASGI middleware: an exception nothing else handled is logged with its traceback and
    answered 500 with JSON {"error": ...} (if no answer has started), like every other error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # Gone mid-upload (a timeout, a cancelled push): no one to answer, not a server error.
            log.warning(
                "%s %s: the client disconnected before its request was read (not answered)",
                scope.get("method"),
                scope.get("path"),
            )
        except Exception as e:  # noqa: BLE001 - the JSON error contract holds for bugs too
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            message = f"internal error ({type(e).__name__}); the server log has the traceback"
            await JSONResponse({"error": message}, 500)(scope, receive, send)


class CountResponses:
    """ASGI middleware: counts answers by HTTP status."""

    def __init__(self, app, counter: collections.Counter):
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


@dataclasses.dataclass
class ServerOptions:
    """What the command line sets."""

    model_base_path: str
    model_name: str = DEFAULTS["model_name"]
    enable_batching: bool = True
    max_batch_size: int = DEFAULTS["max_batch_size"]
    batch_timeout_ms: float = DEFAULTS["batch_timeout_ms"]
    max_body_bytes: int = DEFAULTS["max_body_bytes"]
    max_files: int = DEFAULTS["max_files"]
    max_pixels: int = DEFAULTS["max_pixels"]
    allow_non_ct: bool = False
    poll_seconds: float = DEFAULTS["poll_seconds"]
    threads: int = max(2, os.cpu_count() or 1)


def create_app(options: ServerOptions) -> Starlette:
    """The ASGI application (model loading starts with the app's lifespan)."""
    manager = ModelManager(
        options.model_name,
        options.model_base_path,
        max_batch=options.max_batch_size,
        poll_seconds=options.poll_seconds,
    )
    # Model calls and request preparation (JSON parsing, DICOM decoding) in separate pools, so that
    # a burst of uploads never queues in front of the model, and neither blocks the event loop.
    executor = concurrent.futures.ThreadPoolExecutor(options.threads, thread_name_prefix="model")
    prepare = concurrent.futures.ThreadPoolExecutor(options.threads, thread_name_prefix="prepare")
    stats = Stats()

    async def call_model(servable: Servable, images: np.ndarray) -> dict[str, np.ndarray]:
        stats.record_call(len(images))
        return await asyncio.get_running_loop().run_in_executor(executor, servable.predict, images)

    async def in_pool(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(prepare, fn, *args)

    batcher = Batcher(options.max_batch_size, options.batch_timeout_ms / 1000, call_model)

    async def run_model(servable: Servable, images: np.ndarray) -> dict[str, np.ndarray]:
        if options.enable_batching:
            return await batcher.predict(servable, images)
        return await call_model(servable, images)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        limit_blas_threads()
        await asyncio.get_running_loop().run_in_executor(None, manager.start)
        batcher.start()
        try:
            yield
        finally:
            manager.stop()
            await batcher.stop()
            executor.shutdown(wait=False, cancel_futures=True)
            prepare.shutdown(wait=False, cancel_futures=True)

    def model_spec(servable: Servable) -> dict[str, str]:
        return {"name": manager.name, "version": str(servable.version), "signature_name": SIGNATURE}

    async def predict(request: Request, servable: Servable) -> JSONResponse:
        body = await request.body()
        images, layout = await in_pool(parse_predict, body, servable.input_size)
        out = await run_model(servable, images)
        if layout == "row":
            rows = [{k: float(out[k][i]) for k in OUTPUTS} for i in range(len(images))]
            return JSONResponse({"predictions": rows})
        return JSONResponse({"outputs": {k: out[k].tolist() for k in OUTPUTS}})

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        content_type = request.headers.get("content-type", "application/dicom")
        media = content_type.split(";")[0].strip().lower()
        if media == "multipart/form-data":
            body = await request.body()  # the form parses this copy (bounded by --max_body_bytes)
            files, fields = [], []
            try:
                async with request.form(max_files=options.max_files) as form:
                    for field, value in form.multi_items():
                        if isinstance(value, UploadFile):
                            files.append((value.filename or field, await value.read()))
                        else:
                            fields.append(field)
            except HTTPException as e:
                detail = e.detail
                if "Too many files" in detail:
                    detail += " (the server's --max_files); send the files in several requests"
                raise RequestError(f"multipart body: {detail}", e.status_code) from None
            boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
            if b"--" + boundary + b"--" not in body:
                raise RequestError(
                    f"multipart body: truncated, no closing boundary after {len(body)} bytes; "
                    f"send the whole body"
                )
            if fields:  # parsed as text: a DICOM file's bytes would not survive
                raise RequestError(
                    f"multipart parts {fields} have no filename, so they are form fields, not "
                    "files; give every DICOM part a filename (Content-Disposition: form-data; "
                    'name="file"; filename="slice.dcm")'
                )
            if not files:
                raise RequestError("multipart body holds no file parts; attach DICOM files")
            return files
        if media not in DICOM_TYPES:
            raise RequestError(
                f"Content-Type {media!r}: send one DICOM file as application/dicom, or several "
                f"as multipart/form-data",
                415,
            )
        name = request.query_params.get("filename", "upload.dcm")
        return [(name, await request.body())]

    async def classify_dicom(request: Request, servable: Servable) -> JSONResponse:
        files = await uploads(request)

        async def decode(name: str, data: bytes) -> list[tuple[str, dicom.DicomSlice, np.ndarray]]:
            try:
                slices = await in_pool(
                    decode_dicom, data, name, servable.input_size, options.max_pixels
                )
            except dicom.DicomError as e:
                raise RequestError(
                    f"{name}: {e.reason}: {e.detail}", 400, file=name, reason=e.reason
                ) from None
            not_ct = sorted({s.modality for s, *_ in slices if not s.hounsfield})
            if not_ct and not options.allow_non_ct:
                modality = f"Modality {not_ct[0]!r}" if not_ct[0] else "no Modality"
                raise RequestError(
                    f"{name}: not_ct: {modality}; this model reads CT in Hounsfield units and "
                    "its answer on other values means nothing (the server's --allow_non_ct "
                    "answers anyway, with a warning)",
                    422,
                    file=name,
                    reason="not_ct",
                )
            return [(name, r) for r in slices]

        per_file = await asyncio.gather(
            *(decode(name, data) for name, data in files), return_exceptions=True
        )
        for outcome in per_file:  # the first bad file in upload order
            if isinstance(outcome, BaseException):
                raise outcome
        decoded = [(index, *item) for index, items in enumerate(per_file) for item in items]
        images = np.stack([r.image for *_, r in decoded]).astype(np.float32)[..., None]
        out = await run_model(servable, images)
        results = []
        for i, (index, name, r) in enumerate(decoded):
            probability = float(out["probability"][i])
            label = int(probability >= servable.threshold)
            results.append(
                {
                    "file": name,
                    "file_index": index,  # in upload order: names repeat across series
                    **r.slice.ids(),
                    "warnings": r.doubts,
                    "turned": r.turned,
                    "probability": probability,
                    "logit": float(out["logit"][i]),
                    "label": label,
                    "class": servable.label_names[label],
                }
            )
        return JSONResponse(
            {
                "model_spec": model_spec(servable),
                "threshold": servable.threshold,
                "results": results,
            }
        )

    def metadata(servable: Servable) -> JSONResponse:
        def tensor(name: str, spec: dict, tf_name: str) -> dict:
            dims = [{"size": str(d), "name": ""} for d in spec["shape"]]
            return {
                "dtype": "DT_FLOAT",
                "tensor_shape": {"dim": dims, "unknown_rank": False},
                "name": tf_name,
            }

        md = servable.metadata
        signature = {
            "inputs": {k: tensor(k, v, f"{SIGNATURE}_{k}:0") for k, v in md["inputs"].items()},
            "outputs": {k: tensor(k, v, k) for k, v in md["outputs"].items()},
            "method_name": "tensorflow/serving/predict",
        }
        return JSONResponse(
            {
                "model_spec": {**model_spec(servable), "signature_name": ""},
                "metadata": {
                    "signature_def": {"signature_def": {SIGNATURE: signature}},
                    "liverjax": md,
                },
            }
        )

    async def models(request: Request) -> JSONResponse:
        if request.url.path.rstrip("/") == "/v1/models":  # as TF Serving: 400, not a redirect
            raise RequestError(f"missing model name in request: /v1/models/{manager.name}", 400)
        match = _MODEL_PATH_RE.match(request.url.path)
        if not match:
            raise RequestError(f"no such path {request.url.path!r}", 404)
        name, version, verb = match["name"], match["version"], match["verb"]
        if name != manager.name:
            raise RequestError(f"unknown model {name!r}; this server serves {manager.name!r}", 404)
        if request.method in ("GET", "HEAD"):  # Starlette answers HEAD without the body
            if verb in ("predict", "classify_dicom"):
                raise RequestError(f":{verb} needs POST", 405, headers={"Allow": "POST"})
            if verb:
                raise RequestError(
                    f"unknown method {request.url.path!r}; POST :predict or :classify_dicom", 404
                )
            if match["metadata"]:
                return metadata(manager.get(version))
            status = manager.status()
            if version is not None:
                if not _VERSION_RE.match(version):
                    raise RequestError(f"version {version!r} is not an integer", 400)
                status = [s for s in status if int(s["version"]) == int(version)]
                if not status:
                    raise RequestError(f"version {version} of model {name!r} is not loaded", 404)
            if not status:
                raise RequestError(
                    f"model {name!r} has no version yet under {manager.base_path}", 404
                )
            return JSONResponse({"model_version_status": status})
        if verb is None:
            raise RequestError(
                f"POST is not allowed on {request.url.path!r}; POST :predict or :classify_dicom",
                405,
                headers={"Allow": "GET, HEAD"},
            )
        if verb == "predict":
            return await predict(request, manager.get(version))
        if verb == "classify_dicom":
            return await classify_dicom(request, manager.get(version))
        raise RequestError(
            f"unknown method {request.url.path!r}; POST :predict or :classify_dicom", 404
        )

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        current = manager.current
        if current is None:
            return JSONResponse({"status": "no model version loaded yet"}, 503)
        if options.enable_batching and not batcher.alive:
            return JSONResponse({"status": "the request batcher stopped (see the log)"}, 503)
        return JSONResponse({"status": "ready", "model": manager.name, "version": current.version})

    async def statsz(request: Request) -> JSONResponse:
        current = manager.current
        return JSONResponse(
            {
                "version": current.version if current else None,
                "batching": options.enable_batching,
                **stats.as_dict(),
            }
        )

    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.extra}, exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail
        if exc.status_code == 404:
            message = (
                f"no such path {request.url.path!r}; the API is under /v1/models/{manager.name}"
            )
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path!r}"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/statsz", statsz),
            Route("/v1/models", models, methods=["GET", "POST"]),
            Route("/v1/models/{path:path}", models, methods=["GET", "POST"]),
        ],
        middleware=[
            Middleware(CountResponses, counter=stats.responses),
            Middleware(InternalError),
            Middleware(BodyLimit, max_bytes=options.max_body_bytes),
        ],
        exception_handlers={RequestError: request_error, HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.manager = manager
    return app


def main(argv: list[str] | None = None) -> None:
    """Command line: parse flags and run uvicorn."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.serve",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model_base_path", required=True, help="E/liver: integer version dirs from the export"
    )
    parser.add_argument("--model_name", default=DEFAULTS["model_name"], help="name in the URLs")
    parser.add_argument(
        "--port", "--rest_api_port", type=int, default=DEFAULTS["port"], help="HTTP port"
    )
    parser.add_argument(
        "--host", default=DEFAULTS["host"], help="0.0.0.0 to listen on all interfaces"
    )
    parser.add_argument(
        "--enable_batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch requests that arrive together into one model call",
    )
    parser.add_argument(
        "--max_batch_size", type=int, default=DEFAULTS["max_batch_size"], help="images per call"
    )
    parser.add_argument(
        "--batch_timeout_ms",
        type=float,
        default=DEFAULTS["batch_timeout_ms"],
        help="extra wait for a fuller batch (0: batch only what queued during the last call)",
    )
    parser.add_argument(
        "--max_body_bytes",
        type=int,
        default=DEFAULTS["max_body_bytes"],
        help="larger request bodies get 413",
    )
    parser.add_argument(
        "--max_files", type=int, default=DEFAULTS["max_files"], help="DICOM files per upload"
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=DEFAULTS["max_pixels"],
        help="a DICOM file with more pixels (rows x columns x frames, or longest side squared) "
        "gets 413 before it is decoded",
    )
    parser.add_argument(
        "--allow_non_ct",
        action="store_true",
        help="classify DICOM images of another modality than CT (their values are not HU) "
        "with a warning, instead of refusing them with 422",
    )
    parser.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=DEFAULTS["poll_seconds"],
        help="how often to look for a new version",
    )
    parser.add_argument(
        "--log_level",
        default="info",
        type=str.lower,
        choices=("critical", "error", "warning", "info", "debug"),
        help="of the server's log and uvicorn's",
    )
    args = parser.parse_args(argv)
    for flag in ("max_batch_size", "max_body_bytes", "max_files", "max_pixels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.batch_timeout_ms < 0 or args.file_system_poll_wait_seconds <= 0:
        parser.error("--batch_timeout_ms must be >= 0 and --file_system_poll_wait_seconds > 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("liverjax").setLevel(args.log_level.upper())  # whatever imports configured
    options = ServerOptions(
        model_base_path=args.model_base_path,
        model_name=args.model_name,
        enable_batching=args.enable_batching,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        max_body_bytes=args.max_body_bytes,
        max_files=args.max_files,
        max_pixels=args.max_pixels,
        allow_non_ct=args.allow_non_ct,
        poll_seconds=args.file_system_poll_wait_seconds,
    )
    started = time.monotonic()
    app = create_app(options)
    log.info("starting on http://%s:%d (%.1fs)", args.host, args.port, time.monotonic() - started)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
