"""Serving speed: DICOM latency through the server vs in-process, and throughput under load.

    python -m liverjax.serve_benchmark [--export_dir E] [--duration_s 20] [--clients 16] [--out F]

On one machine, in one run:

1. latency of one 512×512 phantom CT slice: posted to `:classify_dicom` by one client, and the
   bare cost in-process (`serve.decode_dicom`, exactly what the endpoint does, + one model call
   at batch 1), alternating between the two so that the machine's load drift hits both alike;
   goal: server p50 within `LATENCY_GOAL`× the bare p50;
2. load: `--clients` concurrent clients for `--duration_s` seconds against `:predict` (one image
   per request) and against `:classify_dicom`, with batching on and off: requests/s, p50, p99,
   errors, and the mean batch the server formed.

Without `--export_dir` it exports a freshly initialised model of `--config` (default
`configs/default.py`: the seed CNN at 128², taking 128² records like the `synthetic` dataset);
speed does not depend on the weights. That step needs tensorflow; the server does not.
Client threads run on the same machine as the server, so the load figures include their cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np

from liverjax.client import Client

LATENCY_GOAL = 1.5  # server p50 / in-process p50 for one DICOM
BENCH_DICOM_SIZE = 512  # rows = columns of the benchmark DICOM, a typical CT slice
DEFAULT_CLIENTS = 16
DEFAULT_DURATION_S = 20.0
DEFAULT_REPEATS = 50  # sequential requests for the latency figures
SERVER_START_TIMEOUT_S = 300.0


@dataclasses.dataclass
class LoadReport:
    """What a load run measured."""

    clients: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    first_errors: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds; NaN for no samples."""
    if not seconds:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 99])
    return float(p50), float(p99)


def run_load(
    url: str,
    make_request: Callable[[Client, int, int], None],
    *,
    clients: int = DEFAULT_CLIENTS,
    duration_s: float = DEFAULT_DURATION_S,
    model_name: str = "liver",
) -> LoadReport:
    """`clients` threads, each with its own connection, call `make_request(client, worker, n)`
    back to back for `duration_s`; an exception (HTTP error or wrong answer) counts as an error."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        with Client(url, model_name=model_name) as client:
            start.wait()
            n = 0
            while time.perf_counter() < deadline[0]:
                t0 = time.perf_counter()
                try:
                    make_request(client, i, n)
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    errors[i].append(f"{type(e).__name__}: {e}")
                    client.close()
                else:
                    latencies[i].append(time.perf_counter() - t0)
                n += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration_s
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ok = [x for per in latencies for x in per]
    failed = [x for per in errors for x in per]
    p50, p99 = percentiles_ms(ok)
    return LoadReport(
        clients=clients,
        duration_s=elapsed,
        requests=len(ok) + len(failed),
        errors=len(failed),
        rps=len(ok) / elapsed,
        p50_ms=p50,
        p99_ms=p99,
        first_errors=failed[:5],
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m liverjax.serve` in a subprocess on 127.0.0.1; a context manager."""

    def __init__(
        self,
        model_base_path: str | os.PathLike,
        *,
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "liverjax.serve",
            f"--model_base_path={model_base_path}",
            f"--port={self.port}",
            "--host=127.0.0.1",
            "--log_level=warning",
            *flags,
        ]
        self.env = env
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="liverjax-serve-", suffix=".log")
            os.close(fd)
        self.log_path = pathlib.Path(log_path)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)  # never leave a server behind
            raise
        return self

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        """Waits until /readyz answers 200; raises with the server's log if it dies or hangs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def load_config(path: str | os.PathLike) -> Any:
    """`get_config()` of a config file (the repository root must be importable for its imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("liverjax_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def export_fresh_model(config_path: str, records_size: int, out_dir: pathlib.Path) -> pathlib.Path:
    """Exports an initialised (untrained) model of the config; returns the model base path."""
    import jax
    from flax import nnx

    from liverjax import export, models, train

    config = load_config(config_path)
    key = jax.random.key(config.seed, impl=train.INIT_PRNG)  # as training initialises
    model = nnx.jit(lambda: models.create_model(config, rngs=nnx.Rngs(key)))()
    export.export_model(model, config, out_dir, input_size=records_size)
    return out_dir / export.MODEL_NAME


def bench_dicom(out_dir: pathlib.Path, size: int = BENCH_DICOM_SIZE) -> pathlib.Path:
    """One phantom CT slice of size×size written as DICOM."""
    from tfds_liver import phantom

    phantom.write_phantom(out_dir, patients=1, seed=0, size=size, slices=2)
    return sorted(out_dir.rglob("*.dcm"))[0]


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bare_call(version_dir: pathlib.Path, data: bytes) -> Callable[[], Any]:
    """decode + resample + one model call in this process: the bare cost of classify_dicom."""
    from liverjax import serve

    serve.limit_blas_threads()  # as the server does
    servable = serve.Servable.load(version_dir, version=int(version_dir.name))
    size = servable.input_size

    def once():
        [decoded] = serve.decode_dicom(data, "bench.dcm", size)
        image = decoded.image
        return servable.predict(image[None, ..., None].astype(np.float32))

    return once


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each call, alternating between them so that load drift hits all alike."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def server_figures(
    base: pathlib.Path,
    data: bytes,
    bare: Callable[[], Any],
    *,
    batching: bool,
    clients: int,
    duration_s: float,
    repeats: int,
) -> dict[str, Any]:
    """One DICOM through classify_dicom vs in-process (interleaved), then load on both APIs."""
    flag = "--enable_batching" if batching else "--no-enable_batching"
    with ServerProcess(base, flags=(flag,)) as server:
        with Client(server.url) as client:
            size = client.metadata()["metadata"]["liverjax"]["input_size"]
            times = interleaved(
                {
                    "in_process": bare,
                    "classify_dicom": lambda: client.classify_dicom([data], names=["bench.dcm"]),
                },
                repeats,
            )
        latency = {
            name: dict(zip(("p50_ms", "p99_ms"), percentiles_ms(t), strict=True))
            for name, t in times.items()
        }
        latency["ratio_p50"] = latency["classify_dicom"]["p50_ms"] / latency["in_process"]["p50_ms"]
        image = np.random.default_rng(0).uniform(-1000, 1000, (1, size, size, 1))
        body = json.dumps({"instances": image.astype(np.float32).tolist()}).encode()

        def classify(client: Client, worker: int, n: int) -> None:
            client.classify_dicom([data], names=["bench.dcm"])

        def predict(client: Client, worker: int, n: int) -> None:
            status, answer = client.request("POST", "/v1/models/liver:predict", body)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {answer}")

        out: dict[str, Any] = {"latency_one_dicom": latency}
        for name, fn in (("classify_dicom", classify), ("predict", predict)):
            with Client(server.url) as c:
                before = c.request("GET", "/statsz")[1]
            report = run_load(server.url, fn, clients=clients, duration_s=duration_s)
            with Client(server.url) as c:
                after = c.request("GET", "/statsz")[1]
            calls = after["model_calls"] - before["model_calls"]
            out[f"load_{name}"] = {
                **report.as_dict(),
                "mean_batch": (after["images"] - before["images"]) / calls if calls else 0.0,
            }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run the benchmark and print (and optionally write) a JSON report."""
    parser = argparse.ArgumentParser(
        prog="python -m liverjax.serve_benchmark", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--export_dir", default=None, help="an export root E (uses E/liver)")
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--records_size", type=int, default=128, help="input side of the export")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--duration_s", type=float, default=DEFAULT_DURATION_S)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="liverjax-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        if args.export_dir:
            base = pathlib.Path(args.export_dir) / "liver"
        else:
            base = export_fresh_model(args.config, args.records_size, tmp / "export")
        from liverjax import serve

        version_dir = max(serve.version_dirs(base).items())[1]
        data = bench_dicom(tmp / "dicom").read_bytes()
        bare = bare_call(version_dir, data)
        report: dict[str, Any] = {"dicom": f"{BENCH_DICOM_SIZE}x{BENCH_DICOM_SIZE}"}
        report["cpus"] = os.cpu_count()
        report["load_average_before"] = os.getloadavg()[0]
        for batching in (True, False):
            report["batching_on" if batching else "batching_off"] = server_figures(
                base,
                data,
                bare,
                batching=batching,
                clients=args.clients,
                duration_s=args.duration_s,
                repeats=args.repeats,
            )
        report["load_average_after"] = os.getloadavg()[0]
    report["latency_ratio"] = report["batching_on"]["latency_one_dicom"]["ratio_p50"]
    report["latency_goal"] = LATENCY_GOAL
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
