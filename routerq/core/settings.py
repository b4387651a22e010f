"""routerq's configuration: every knob is an environment variable, read and checked in this one place."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from routerq.core.errors import SettingsError

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
# Seconds between the longest a job may run plus wait for its retry, and its redelivery.
VISIBILITY_SLACK = 10
# Phoenix spends 15-17 ms of CPU ingesting one of routerq's LLM or line spans when it shares two cores
# with the workers (bench/RESULTS.md, trace budget): at 25 spans/s it took 0.47 of a core and traced
# batches ran at 0.57x untraced, and a 100,000-line batch left it 27 s behind. 10 spans/s is what one
# such Phoenix keeps up with beside the always-sent failures; raise it for a Phoenix on its own cores.
DEFAULT_TRACE_BUDGET = 10.0
# A line slower than this (or than its batch's running p99) is always traced.
DEFAULT_TRACE_SLOW_S = 30.0
DEFAULT_FILES_DIR = Path.home() / ".local" / "share" / "routerq" / "files"
DEFAULT_MAX_UPLOAD_MB = 200.0  # OpenAI's own limit for a batch input file
DEFAULT_MAX_LINE_MB = 10.0  # a long conversation fits; a line the size of the upload does not
DEFAULT_MAX_REQUEST_KB = 1024.0  # a JSON request body (not an upload): 16 metadata pairs and an id


class ModelLimits(BaseModel):
    """Per-model limits; 0 means no limit. Same window as the overall limits."""

    requests: int = Field(0, ge=0)
    tokens: int = Field(0, ge=0)
    in_flight: int = Field(0, ge=0)


class Settings(BaseSettings):
    """Fields are declared by their environment variable names so errors and docs use one vocabulary."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # repr=False: the URL may hold a password (its own, or REDIS_PASSWORD put in below); never shown
    redis_url: Annotated[str, Field(alias="REDIS_URL", repr=False)] = "redis://localhost:6379/0"
    redis_password: Annotated[SecretStr | None, Field(alias="REDIS_PASSWORD")] = None
    queue: Annotated[str, Field(alias="ROUTERQ_QUEUE", min_length=1)] = "routerq"
    result_ttl: Annotated[int, Field(alias="ROUTERQ_RESULT_TTL", gt=0)] = 7 * 24 * 3600
    visibility_timeout: Annotated[int, Field(alias="ROUTERQ_VISIBILITY_TIMEOUT", gt=0)] = 300
    restore_interval: Annotated[float, Field(alias="ROUTERQ_RESTORE_INTERVAL", gt=0)] = 5.0
    sweep_interval: Annotated[float, Field(alias="ROUTERQ_SWEEP_INTERVAL", gt=0)] = 30.0
    job_time_limit: Annotated[float, Field(alias="ROUTERQ_JOB_TIME_LIMIT", gt=0)] = 180.0
    max_attempts: Annotated[int, Field(alias="ROUTERQ_MAX_ATTEMPTS", ge=1)] = 6
    retry_base_delay: Annotated[float, Field(alias="ROUTERQ_RETRY_BASE_DELAY", ge=0)] = 1.0
    retry_max_delay: Annotated[float, Field(alias="ROUTERQ_RETRY_MAX_DELAY", ge=0)] = 60.0
    max_deliveries: Annotated[int, Field(alias="ROUTERQ_MAX_DELIVERIES", ge=1)] = 3
    # A rate-limited job keeps waiting for capacity this long (OpenAI's Batch API never fails a line
    # for rate limits; an hour rides out any 429 storm a provider's status page would not report).
    max_retry_time: Annotated[float, Field(alias="ROUTERQ_MAX_RETRY_TIME", gt=0)] = 3600.0

    rate_limit_requests: Annotated[int, Field(alias="ROUTERQ_RATE_LIMIT_REQUESTS", ge=0)] = 0
    rate_limit_tokens: Annotated[int, Field(alias="ROUTERQ_RATE_LIMIT_TOKENS", ge=0)] = 0
    rate_limit_window: Annotated[float, Field(alias="ROUTERQ_RATE_LIMIT_WINDOW", gt=0)] = 60.0
    max_in_flight: Annotated[int, Field(alias="ROUTERQ_MAX_IN_FLIGHT", ge=0)] = 0
    model_limits: Annotated[dict[str, ModelLimits], Field(alias="ROUTERQ_MODEL_LIMITS")] = {}
    # Find each model's rate and pace it (worker.upstream.limiter); off, a 429 makes every worker
    # wait out its Retry-After for that model and nothing is paced.
    rate_discovery: Annotated[bool, Field(alias="ROUTERQ_RATE_DISCOVERY")] = True

    openrouter_api_key: Annotated[SecretStr | None, Field(alias="OPENROUTER_API_KEY")] = None
    openrouter_base_url: Annotated[str, Field(alias="OPENROUTER_BASE_URL")] = OPENROUTER_BASE_URL
    openrouter_http_referer: Annotated[str | None, Field(alias="OPENROUTER_HTTP_REFERER")] = None
    openrouter_app_title: Annotated[str, Field(alias="OPENROUTER_APP_TITLE")] = "routerq"
    openrouter_timeout: Annotated[float, Field(alias="OPENROUTER_TIMEOUT", gt=0)] = 120.0
    # OpenRouter's Batch API (`submit --via batch`). Its quickstart says /api/beta/batches, some pages
    # /api/v1/batches: unset, it is OPENROUTER_BASE_URL's /v1 replaced by /beta/batches.
    openrouter_batches_url: Annotated[str | None, Field(alias="OPENROUTER_BATCHES_URL")] = None
    # Requests and request bytes per upstream batch: OpenRouter takes at most 5,000 requests a batch;
    # the bytes bound one submission's body (and its memory in the worker).
    upstream_batch_max_requests: Annotated[
        int, Field(alias="ROUTERQ_UPSTREAM_BATCH_MAX_REQUESTS", ge=1, le=5000)
    ] = 5000
    upstream_batch_max_bytes: Annotated[int, Field(alias="ROUTERQ_UPSTREAM_BATCH_MAX_BYTES", ge=1)] = (
        50_000_000
    )

    tracing: Annotated[bool, Field(alias="ROUTERQ_TRACING")] = True
    phoenix_collector_endpoint: Annotated[str, Field(alias="PHOENIX_COLLECTOR_ENDPOINT")] = (
        "http://localhost:6006"
    )
    phoenix_project_name: Annotated[str, Field(alias="PHOENIX_PROJECT_NAME", min_length=1)] = "routerq"
    phoenix_api_key: Annotated[SecretStr | None, Field(alias="PHOENIX_API_KEY")] = None
    # Spans per second of successful batch lines sent to Phoenix, shared by all workers; failed,
    # retried, parked, rate-limited and slow lines are always sent. `all` sends every line's trace.
    trace_budget: Annotated[float | None, Field(alias="ROUTERQ_TRACE_BUDGET")] = DEFAULT_TRACE_BUDGET
    trace_slow_s: Annotated[float, Field(alias="ROUTERQ_TRACE_SLOW_S", gt=0)] = DEFAULT_TRACE_SLOW_S
    phoenix_pricing: Annotated[bool, Field(alias="ROUTERQ_PHOENIX_PRICING")] = True
    phoenix_pricing_settle: Annotated[float, Field(alias="ROUTERQ_PHOENIX_PRICING_SETTLE", ge=0)] = 6.0

    # `routerq serve`: bearer tokens callers use (comma-separated; each token sees only its own files
    # and batches), where uploaded files are kept, and the largest upload accepted.
    api_keys: Annotated[SecretStr | None, Field(alias="ROUTERQ_API_KEYS")] = None
    files_dir: Annotated[Path, Field(alias="ROUTERQ_FILES_DIR")] = DEFAULT_FILES_DIR
    max_upload_mb: Annotated[float, Field(alias="ROUTERQ_MAX_UPLOAD_MB", gt=0)] = DEFAULT_MAX_UPLOAD_MB
    # One JSONL line is read whole: this bounds what one line costs (a line past it is a bad line;
    # `routerq serve` refuses the upload with 413). POST /v1/batches bodies are a few hundred bytes.
    max_line_mb: Annotated[float, Field(alias="ROUTERQ_MAX_LINE_MB", gt=0)] = DEFAULT_MAX_LINE_MB
    max_request_kb: Annotated[float, Field(alias="ROUTERQ_MAX_REQUEST_KB", gt=0)] = DEFAULT_MAX_REQUEST_KB
    # A bearer token `/metrics` asks for; unset, it is open (Prometheus scrapers rarely carry tokens).
    metrics_token: Annotated[SecretStr | None, Field(alias="ROUTERQ_METRICS_TOKEN")] = None

    @field_validator("trace_budget", mode="before")
    @classmethod
    def _budget(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "all":
            return None
        if value is None or (isinstance(value, int | float | str) and float(value) <= 0):
            raise ValueError("must be a number of spans per second above 0, or `all`")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _password_into_url(self) -> Settings:
        """REDIS_PASSWORD goes into the URL escaped, so `@ : / #` in a password cannot break it."""
        if self.redis_password is None:
            return self
        parts = urlsplit(self.redis_url)
        if parts.password is not None:
            raise ValueError("REDIS_PASSWORD is set and REDIS_URL has a password too: keep one")
        secret = quote(self.redis_password.get_secret_value(), safe="")
        user = quote(parts.username, safe="") if parts.username else ""
        netloc = f"{user}:{secret}@{parts.netloc}"
        object.__setattr__(self, "redis_url", urlunsplit(parts._replace(netloc=netloc)))
        return self

    @field_validator("openrouter_base_url", "phoenix_collector_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("phoenix_collector_endpoint")
    @classmethod
    def _phoenix_base(cls, value: str) -> str:
        """Accept the OTLP path too; routerq derives /v1/traces and /graphql from the base."""
        return value.removesuffix("/v1/traces")

    @model_validator(mode="after")
    def _redelivery_is_safe(self) -> Settings:
        """A job still running, or a retry still waiting, past the visibility timeout is delivered twice."""
        if self.openrouter_timeout >= self.job_time_limit:
            raise ValueError(
                f"OPENROUTER_TIMEOUT ({self.openrouter_timeout:g}) must be below "
                f"ROUTERQ_JOB_TIME_LIMIT ({self.job_time_limit:g})"
            )
        needed = self.job_time_limit + self.retry_max_delay + VISIBILITY_SLACK
        if needed > self.visibility_timeout:
            raise ValueError(
                f"ROUTERQ_JOB_TIME_LIMIT ({self.job_time_limit:g}) + ROUTERQ_RETRY_MAX_DELAY "
                f"({self.retry_max_delay:g}) + {VISIBILITY_SLACK} s slack exceeds ROUTERQ_VISIBILITY_TIMEOUT "
                f"({self.visibility_timeout}): jobs would be delivered twice"
            )
        return self

    @property
    def api_key(self) -> str:
        return self.openrouter_api_key.get_secret_value() if self.openrouter_api_key else ""

    @property
    def batches_url(self) -> str:
        if self.openrouter_batches_url:
            return self.openrouter_batches_url.rstrip("/")
        return self.openrouter_base_url.rstrip("/").removesuffix("/v1") + "/beta/batches"

    @property
    def api_tokens(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [token.strip() for token in raw.split(",") if token.strip()]

    @property
    def max_line_bytes(self) -> int:
        return int(self.max_line_mb * 1_000_000)

    @property
    def secrets(self) -> list[str]:
        """Values that must never leave the process in spans, logs, results or errors."""
        keys = (self.openrouter_api_key, self.phoenix_api_key, self.redis_password, self.metrics_token)
        return [k.get_secret_value() for k in keys if k and k.get_secret_value()] + self.api_tokens


def load_settings() -> Settings:
    """Read the environment, turning pydantic's error into one line per bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(part) for part in err["loc"])
            lines.append(f"{name}: {err['msg']}" if name else str(err["msg"]).removeprefix("Value error, "))
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
