"""Process-tree CPU and memory from /proc, sampled while a run goes on."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(root: int) -> list[int]:
    """The root and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


class TreeSampler:
    """Peak RSS and CPU of the process trees under `roots`, sampled every `interval` s."""

    def __init__(self, roots: list[int], interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss = 0
        self.cpu_start = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _all(self) -> list[int]:
        return [pid for root in self.roots for pid in tree(root)]

    def _cpu(self) -> float:
        return cpu_seconds(self._all())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes(self._all()))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_used = self._cpu() - self.cpu_start

    def rss_now(self) -> int:
        return rss_bytes(self._all())


def wait_idle(roots: list[int], quiet: float = 0.05, every: float = 2.0, limit: float = 1800.0) -> float:
    """Seconds until the trees under `roots` use less than `quiet` of a core over `every` seconds
    (Phoenix working through its span backlog), at most `limit`."""
    started = time.perf_counter()
    last = cpu_seconds([pid for root in roots for pid in tree(root)])
    while time.perf_counter() - started < limit:
        time.sleep(every)
        now = cpu_seconds([pid for root in roots for pid in tree(root)])
        if now - last < quiet * every:
            return time.perf_counter() - started - every
        last = now
    return limit
