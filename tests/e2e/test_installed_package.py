"""routerq as a user installs it: the built wheel in a fresh virtualenv, run from a project of the user's
own that has an `api/` package, a `producer.py` and a `worker.py` (names many services use)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest
from conftest import Stack, wait_for

from routerq.devstack.localstack import free_port

REPO = Path(__file__).resolve().parents[2]
# Each of the user's files says so in a marker file when run or imported: routerq must never do either.
USER_FILE = "import pathlib; pathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel; its dependencies are read from the test venv's
    site-packages (a path entry, not a site dir: the editable install's finder there stays inactive)."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", REPO],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("routerq-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    return env_dir / "bin"


@pytest.fixture
def user_project(tmp_path: Path) -> Path:
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "__init__.py").write_text(USER_FILE)
    (tmp_path / "api" / "server.py").write_text(USER_FILE)
    (tmp_path / "producer.py").write_text(USER_FILE)
    (tmp_path / "worker.py").write_text(USER_FILE)
    (tmp_path / "cli.py").write_text(USER_FILE)
    return tmp_path


def ran_user_files(project: Path) -> list[str]:
    return sorted(str(p.relative_to(project)) for p in project.rglob("*.ran"))


def test_the_wheel_installs_one_top_level_package_named_routerq(installed: Path) -> None:
    (dist_info,) = installed.parent.glob("lib/python*/site-packages/routerq-*.dist-info")
    record = (dist_info / "RECORD").read_text().splitlines()
    in_site_packages = [line.split(",")[0] for line in record if not line.startswith("../")]  # bin/ is ../
    top = sorted({path.split("/")[0] for path in in_site_packages} - {dist_info.name})
    assert top == ["routerq"], top
    assert (dist_info / "top_level.txt").read_text().split() == ["routerq"]
    assert any(line.startswith("routerq/worker/execution/tasks.py,") for line in record)
    assert any(line.startswith("routerq/producer/api.py,") for line in record)
    for script in ("routerq/core/lua/batch_go.lua", "routerq/worker/upstream/lua/limiter_acquire.lua"):
        assert any(line.startswith(script + ",") for line in record), script


def test_from_routerq_import_producer_in_a_project_with_its_own_producer_and_worker(
    installed: Path, user_project: Path, stack: Stack
) -> None:
    code = (
        "from routerq import Producer, BatchClient\n"
        "import routerq, routerq.producer, routerq.worker\n"
        "print(Producer.__module__, BatchClient.__module__, routerq.__file__)\n"
    )
    ran = subprocess.run(
        [installed / "python", "-c", code], cwd=user_project, env={**os.environ, **stack.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    module, client_module, path = ran.stdout.split()
    assert (module, client_module) == ("routerq.producer.api", "routerq.producer.batch_client")
    assert Path(path).is_relative_to(installed.parent), path
    assert ran_user_files(user_project) == []


def test_routerq_worker_beside_a_users_worker_py_runs_routerqs_worker(
    installed: Path, user_project: Path, stack: Stack
) -> None:
    log = user_project / "worker.log"
    env = {**os.environ, **stack.env, "ROUTERQ_QUEUE": "installed-wheel"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [installed / "routerq", "worker", "--concurrency", "2", "--processes", "2"],
            cwd=user_project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: log.read_text().count(" ready.") >= 2 or process.poll() is not None,
                 "two supervised worker processes of the installed wheel to say ready", timeout=90)  # fmt: skip
        assert process.poll() is None, log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    assert ran_user_files(user_project) == [], log.read_text()


def test_routerq_serve_beside_a_users_api_package_serves_routerqs_api(
    installed: Path, user_project: Path, stack: Stack
) -> None:
    port = free_port()
    log = user_project / "serve.log"
    env = {**os.environ, **stack.env, "ROUTERQ_API_KEYS": "tok-installed"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [installed / "routerq", "serve", "--port", str(port)],
            cwd=user_project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def healthy() -> bool:
        if process.poll() is not None:
            return True
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, "routerq serve of the installed wheel to answer /healthz", timeout=60)
        assert process.poll() is None, log.read_text()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    assert ran_user_files(user_project) == [], log.read_text()
