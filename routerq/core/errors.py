"""One hierarchy for every error routerq raises on purpose: `except RouterqError` catches them all.

Each class also derives from the builtin a caller would naturally catch (ValueError for bad input,
TimeoutError for a wait that ran out, RuntimeError otherwise), so code written against the builtins
keeps working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from routerq.core.batch_format import LineError, Validation
    from routerq.core.jobs import JobResult


class RouterqError(Exception):
    """Base of routerq's errors."""


class SettingsError(RouterqError, ValueError):
    """A bad environment, found at start-up; the message names the variable."""


class JobFailedError(RouterqError, RuntimeError):
    """A job ended as failed; carries the stored result so callers see OpenRouter's message."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        error = result.error
        detail = f"{error.code}: {error.message}" if error else "failed"
        status = f" (HTTP {error.status_code})" if error and error.status_code else ""
        super().__init__(f"job {result.job_id} failed{status}: {detail}")


class ResultTimeoutError(RouterqError, TimeoutError):
    """A job had no result within the time its caller was willing to wait."""


class BatchError(RouterqError, RuntimeError):
    """A batch operation that cannot be done: unknown id, wrong state, a reused idempotency key."""


class BatchFileError(BatchError, ValueError):
    """A batch file with bad lines: nothing of it was enqueued."""

    def __init__(self, validation: Validation) -> None:
        self.validation = validation
        super().__init__(f"{validation.error_count} bad line(s)")


class StagingFailed(BatchError):
    """Redis failed while lines were being staged: none of them was released onto the queue."""


class EmbedInputError(RouterqError, ValueError):
    """An embedding input with bad rows: nothing of it was enqueued."""

    def __init__(self, errors: list[LineError], count: int) -> None:
        self.errors = errors
        self.count = count
        super().__init__(f"{count} bad row(s)")


class EmbedError(RouterqError, RuntimeError):
    """An embedding run that cannot be read or written (expired, or an output format not installed)."""


class PreflightError(RouterqError, RuntimeError):
    """A worker that would only produce failures (no key, a rejected key) refuses to start."""


class PhoenixError(RouterqError, RuntimeError):
    """Phoenix answered a request routerq makes besides spans (GraphQL) with an error."""


class StackError(RouterqError, RuntimeError):
    """A service of the local stack (demo, tests, bench) did not start."""


class UpstreamBatchError(RouterqError, RuntimeError):
    """OpenRouter's Batch API refused or failed a submission or a poll (its message, redacted)."""

    def __init__(self, status_code: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(
            f"OpenRouter's Batch API: {message}" + (f" (HTTP {status_code})" if status_code else "")
        )
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after
