"""The broker protocol both sides share: task names and how many batch lines a message carries.

Producers publish by task name (routerq.envelope) and never import a task body, nor Celery; workers
register the bodies on their Celery app (worker.app).
"""

from __future__ import annotations

TASK_NAME = "routerq.run_job"
LINE_TASK_NAME = "routerq.run_lines"  # args: batch id, [line indexes], enqueued at
EMBED_TASK_NAME = "routerq.run_embed"
# args: batch id, chunk id, [line indexes], enqueued at: lines sent as one of OpenRouter's batches
UPSTREAM_BATCH_TASK_NAME = "routerq.run_upstream_batch"
# args: run id, chunk id, [[text indexes of one request], ...], enqueued at: an embedding run's
# requests sent as one of OpenRouter's batches
EMBED_UPSTREAM_BATCH_TASK_NAME = "routerq.run_embed_upstream_batch"
# Batch lines per queue message. Each message costs the worker's consumer a fetch, an unacked record
# and an ack in Redis (about a third of a line's CPU, one line a message); 16 makes that small, while
# a crash or a retry still concerns few lines (a retried line travels alone).
LINES_PER_MESSAGE = 16
