"""routerq's batches as OpenAI batch objects (`../shared/reference/openai-batch-format.md`)."""

from __future__ import annotations

from typing import Any

from routerq.api.file_store import ERROR_PREFIX, OUTPUT_PREFIX
from routerq.core.batch_store import Batch, BatchStatus

COMPLETION_WINDOW_S = 24 * 3600
# A paused batch is still in progress to OpenAI's clients; `routerq.status` says it is paused.
_STATUS = {BatchStatus.PAUSED: "in_progress"}


def batch_object(batch: Batch) -> dict[str, Any]:
    origin = batch.origin
    final = batch.status.final
    failed = batch.failed + batch.cancelled  # both are in the error file, as OpenAI's are
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": origin.endpoint if origin else "",
        "errors": None,
        "input_file_id": origin.input_file_id if origin else "",
        "completion_window": origin.completion_window if origin else "24h",
        "status": _STATUS.get(batch.status, batch.status.value),
        "output_file_id": f"{OUTPUT_PREFIX}{batch.id}" if final and batch.succeeded else None,
        "error_file_id": f"{ERROR_PREFIX}{batch.id}" if final and failed else None,
        "created_at": int(batch.created_at),
        "in_progress_at": _int(batch.in_progress_at),
        "expires_at": int(batch.created_at + COMPLETION_WINDOW_S),
        "finalizing_at": None,
        "completed_at": _int(batch.completed_at),
        "failed_at": _int(batch.completed_at) if batch.status is BatchStatus.FAILED else None,
        "expired_at": None,
        "cancelling_at": _int(batch.cancelled_at),
        "cancelled_at": _int(batch.cancelled_at) if batch.status is BatchStatus.CANCELLED else None,
        "request_counts": {"total": batch.total, "completed": batch.succeeded, "failed": failed},
        "metadata": dict(batch.metadata),
        "usage": {
            "input_tokens": batch.prompt_tokens,
            "output_tokens": batch.completion_tokens,
            "total_tokens": batch.prompt_tokens + batch.completion_tokens,
        },
        "routerq": {
            "status": batch.status.value,
            "reason": batch.reason,
            "cost": batch.cost,
            "running": batch.running,
            "held": batch.held,
            "parked": batch.parked,
        },
    }


def _int(value: float | None) -> int | None:
    return int(value) if value is not None else None
