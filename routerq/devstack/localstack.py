"""Start and stop the local stack (Redis, Phoenix, the OpenRouter stand-in, workers) as child processes.

One implementation serves `make demo` and the test fixtures, so what the tests exercise is what a
user runs. Every service binds to loopback and is waited for until it answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from routerq.core.child_process import python_module
from routerq.core.errors import StackError
from routerq.worker.upkeep.supervisor import default_processes


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """SIGTERM goes to the service's own process, as `kill` or `docker stop` would send it, and
        lets it shut down its children; SIGKILL (or a timeout) takes the whole process group."""
        if self.process.poll() is not None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, service: Service | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise StackError(f"{what}: process exited early:\n{service.log()[-3000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = service.log()[-3000:] if service else ""
    raise StackError(f"{what}: not ready after {timeout} s\n{tail}")


def spawn(
    name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, so stop() reaches its children too
        )
    return process, log_path


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    ca: Path


def start_redis(
    port: int, data_dir: Path, password: str | None = None, tls: TLSFiles | None = None
) -> Service:
    """With `tls`, Redis listens on TLS only and the URL is rediss:// trusting `tls.ca`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server not found: install it with `apt-get install redis-server`")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory-policy", "noeviction", "--daemonize", "no",
    ]  # fmt: skip
    if password:
        argv += ["--requirepass", password]
    if tls:
        argv[argv.index("--port") + 1] = "0"
        argv += ["--tls-port", str(port), "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                 "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]  # fmt: skip
    process, log_path = spawn(f"redis-{port}", argv, data_dir)
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{port}/0"
    if tls:
        url = f"rediss://{auth}127.0.0.1:{port}/0?ssl_ca_certs={tls.ca}"
    service = Service("redis", process, url, log_path)
    wait_until(lambda: bool(redis.Redis.from_url(url).ping()), 20, "redis-server", service)
    return service


PHOENIX_VENV = ".venv-phoenix"


def find_phoenix() -> str:
    """The `phoenix` server command: ROUTERQ_PHOENIX_BIN, a .venv-phoenix in the current directory or
    beside a source checkout (what `make install` creates), or `phoenix` on PATH."""
    candidates = [
        os.environ.get("ROUTERQ_PHOENIX_BIN"),
        str(Path.cwd() / PHOENIX_VENV / "bin" / "phoenix"),
        str(
            Path(__file__).resolve().parents[2] / PHOENIX_VENV / "bin" / "phoenix"
        ),  # <checkout>/routerq/devstack
        shutil.which("phoenix"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError(
        "Phoenix server not found: install it apart from routerq (`python3 -m venv .venv-phoenix && "
        ".venv-phoenix/bin/pip install arize-phoenix`, here) or set ROUTERQ_PHOENIX_BIN to its `phoenix`"
    )


def start_phoenix(port: int, grpc_port: int, data_dir: Path) -> Service:
    env = {
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_WORKING_DIR": str(data_dir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    argv = [find_phoenix(), "serve"]
    process, log_path = spawn(f"phoenix-{port}", argv, data_dir, env)
    url = f"http://127.0.0.1:{port}"
    service = Service("phoenix", process, url, log_path)
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, 120, "phoenix", service)
    return service


def start_fake_openrouter(
    port: int, log_dir: Path, keys: list[str] | None = None, latency_ms: float = 0
) -> Service:
    argv = python_module(
        "routerq.devstack.fake_openrouter", "--port", str(port), "--latency-ms", str(latency_ms)
    )
    for key in keys or []:
        argv += ["--key", key]
    process, log_path = spawn(f"fake-openrouter-{port}", argv, log_dir)
    url = f"http://127.0.0.1:{port}/api/v1"
    service = Service("fake-openrouter", process, url, log_path)
    base = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, "fake openrouter", service
    )
    return service


def start_api(env: Mapping[str, str], log_dir: Path, port: int, *extra: str) -> Service:
    """`routerq serve` on loopback, returned once /healthz answers."""
    argv = python_module("routerq.cli", "serve", "--port", str(port), *extra)
    process, log_path = spawn(f"api-{port}", argv, log_dir, env)
    service = Service("api", process, f"http://127.0.0.1:{port}", log_path)
    healthy = f"{service.url}/healthz"
    wait_until(lambda: httpx.get(healthy, timeout=2).status_code == 200, 30, "routerq serve", service)
    return service


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    name: str = "worker",
    concurrency: int = 4,
    processes: int | None = None,
    loglevel: str = "INFO",
) -> Service:
    """`routerq worker`, returned once every one of its processes says it is ready."""
    processes = processes or default_processes(concurrency)
    argv = python_module("routerq.cli", "worker", "--concurrency", str(concurrency))
    argv += ["--processes", str(processes), "--loglevel", loglevel]
    log_path = log_dir / f"{name}.log"
    seen = log_path.stat().st_size if log_path.exists() else 0
    process, log_path = spawn(name, argv, log_dir, env)
    service = Service(name, process, "", log_path)
    try:
        wait_until(lambda: service.log()[seen:].count(" ready.") >= processes, 60, f"celery {name}", service)
    except StackError:
        service.stop(signal.SIGKILL)  # never leave a half-started worker behind
        raise
    return service
