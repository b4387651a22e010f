"""Uploads through `routerq serve`: lines/s for a 50,000-line file, and whether server memory stays flat.

    python -m bench.api_upload [--lines 50000]

The official `openai` client uploads the file (`files.create`) and creates its batch (`batches.create`:
the file is read again and every line staged in Redis) against `routerq serve` on this machine. The
server's RSS is sampled from outside while it works, and compared with a file a tenth the size: an
upload streamed to disk keeps the two peaks close. The rows go into bench/RESULTS.md between markers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import openai

from bench.__main__ import mib, write_batch
from bench.measure import TreeSampler
from bench.results import put_section, section, table
from bench.services import Services
from routerq.devstack.localstack import Service, free_port, start_api, start_redis

BEGIN, END = "<!-- api-upload:begin -->", "<!-- api-upload:end -->"
TOKEN = "bench-token"
FLOOR_LINES_PER_S = 5000


class Stack(Services):
    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.redis = self._keep(start_redis(free_port(), tmp / "redis"))
        env = {
            "REDIS_URL": self.redis.url,
            "ROUTERQ_API_KEYS": TOKEN,
            "ROUTERQ_FILES_DIR": str(tmp / "files"),
            "ROUTERQ_TRACING": "false",
        }
        self.api: Service = self._keep(start_api(env, tmp, free_port()))
        self.client = openai.OpenAI(base_url=f"{self.api.url}/v1", api_key=TOKEN, max_retries=0, timeout=600)


def upload(stack: Stack, path: Path) -> tuple[float, float, int]:
    """Seconds to upload, seconds to create the batch, and the server's peak RSS meanwhile."""
    with TreeSampler([stack.api.process.pid], interval=0.05) as sampler:
        started = time.perf_counter()
        with path.open("rb") as handle:
            uploaded = stack.client.files.create(file=handle, purpose="batch")
        uploaded_at = time.perf_counter()
        stack.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        created_at = time.perf_counter()
    return uploaded_at - started, created_at - uploaded_at, sampler.peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routerq-api-upload-") as tmp:
        stack = Stack(Path(tmp))
        try:
            small = write_batch(Path(tmp) / "small.jsonl", args.lines // 10, "small")
            big = write_batch(Path(tmp) / "big.jsonl", args.lines, "big")
            size = big.stat().st_size
            upload(stack, small)  # warm: first imports, connections
            small_up, small_create, small_rss = upload(stack, small)
            big_up, big_create, big_rss = upload(stack, big)
        finally:
            stack.close()
    rows = [
        (f"upload of {args.lines:,} lines ({size / 1e6:.1f} MB) through `files.create`, lines/s (floor "
         f"{FLOOR_LINES_PER_S:,})", f"{args.lines / big_up:,.0f}"),
        (f"`batches.create` of those {args.lines:,} lines (read again, staged in Redis), lines/s",
         f"{args.lines / big_create:,.0f}"),
        (f"server peak RSS, {args.lines // 10:,}-line vs {args.lines:,}-line upload",
         f"{mib(small_rss)} vs {mib(big_rss)} ({big_rss / small_rss:.2f}x)"),
        (f"{args.lines // 10:,}-line upload + create, s", f"{small_up:.2f} + {small_create:.2f}"),
    ]  # fmt: skip
    command = ("python -m bench.api_upload " + " ".join(sys.argv[1:])).strip()
    setup = "`routerq serve` (tracing off) and Redis on this machine; the official `openai` client uploads."
    put_section(BEGIN, END, section(BEGIN, END, f"Batch API uploads (`{command}`)", setup, table(rows)))
    print(table(rows))


if __name__ == "__main__":
    main()
