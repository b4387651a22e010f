"""`routerq worker` as a supervisor: one worker process per share of the concurrency, each started
again whenever it dies on its own.

`routerq worker` becomes the supervisor by exec'ing this module (`exec_supervisor`): the command's
imports (typer, rich, pydantic, openai for the key check) would otherwise stay in the supervisor's
memory, ~70 MiB that does nothing but wait. This module imports the standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import NoReturn

from routerq.core.child_process import python_module

SUPERVISED_ENV = "ROUTERQ_SUPERVISED"
WORKER_INDEX_ENV = "ROUTERQ_WORKER_INDEX"
# A process that ran this long before dying starts again after 1 s; quicker deaths back off to 30 s.
HEALTHY_RUN_S = 60.0
POLL_S = 0.2


def default_processes(concurrency: int) -> int:
    """One process per core: each runs one event loop holding its share of the calls in flight, and a
    second loop on the same core would only add a second interpreter's memory."""
    return max(1, min(concurrency, os.cpu_count() or 1))


def split(concurrency: int, processes: int) -> list[int]:
    """Calls in flight per process, adding up to `concurrency`."""
    base, extra = divmod(concurrency, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def supervise(argvs: list[list[str]], max_backoff: float = 30.0) -> int:
    """Run one worker process per argv and start each again whenever it dies on its own.

    Celery's consumer can die on a broker connection loss (an `Unrecoverable error` seen here when
    Redis is killed mid-ack); unacked jobs are safe in Redis, but someone must start a worker again.
    SIGTERM/SIGINT are passed on to every process and end the loop: each shuts down warmly.
    """
    log = logging.getLogger("routerq.supervisor")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    stopping = False
    children: list[subprocess.Popen[bytes] | None] = [None] * len(argvs)
    started = [0.0] * len(argvs)
    backoff = [1.0] * len(argvs)
    due = [0.0] * len(argvs)

    def forward(signum: int, _frame: object) -> None:
        """The first SIGTERM or Ctrl-C asks every process for a warm shutdown (running calls finish);
        the next one for a cold shutdown (they are cancelled and go back to the queue). A Ctrl-C in a
        terminal also reaches the processes themselves: Celery takes that SIGINT as the same request
        for a warm shutdown, so one Ctrl-C stays one warm shutdown."""
        nonlocal stopping
        forwarded = signal.SIGQUIT if stopping else signal.SIGTERM
        stopping = True
        for child in children:
            if child is not None and child.poll() is None:
                child.send_signal(forwarded)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    codes: list[int | None] = [None] * len(argvs)
    while True:
        for i, argv in enumerate(argvs):
            child = children[i]
            if child is None:
                if stopping or codes[i] == 0 or time.monotonic() < due[i]:
                    continue
                started[i] = time.monotonic()
                env = {**os.environ, SUPERVISED_ENV: "1", WORKER_INDEX_ENV: str(i)}
                children[i] = subprocess.Popen(argv, env=env)
                codes[i] = None
                continue
            code = child.poll()
            if code is None:
                continue
            children[i], codes[i] = None, code
            if stopping or code == 0:
                continue
            if time.monotonic() - started[i] > HEALTHY_RUN_S:
                backoff[i] = 1.0
            log.warning(
                "worker process %d exited unexpectedly (code %s); starting it again in %.0f s",
                i, code, backoff[i],
            )  # fmt: skip
            due[i] = time.monotonic() + backoff[i]
            backoff[i] = min(backoff[i] * 2, max_backoff)
        if (stopping or all(c == 0 for c in codes)) and all(c is None for c in children):
            return max((c or 0) for c in codes)
        time.sleep(POLL_S)


def exec_supervisor(argvs: list[list[str]]) -> NoReturn:
    """Replace this process (same pid, same output) by a bare supervisor of `argvs`."""
    sys.stdout.flush()
    sys.stderr.flush()
    argv = python_module(__name__, json.dumps(argvs))
    os.execv(argv[0], argv)


if __name__ == "__main__":
    sys.exit(supervise(json.loads(sys.argv[1])))
