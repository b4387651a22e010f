"""Job and result schemas: what travels through the queue and what comes back."""

from __future__ import annotations

import base64
import json
import time
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from routerq.core.vectors import from_float32


class JobKind(StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"

    @property
    def path(self) -> str:
        """OpenAI-compatible endpoint path, relative to the API base URL."""
        return _PATHS[self]

    @property
    def url(self) -> str:
        """The `url` of an OpenAI Batch input line for this kind."""
        return f"/v1{_PATHS[self]}"

    @property
    def input_field(self) -> str:
        """The body field a request of this kind cannot do without."""
        return _INPUT_FIELDS[self]


_PATHS = {
    JobKind.CHAT: "/chat/completions",
    JobKind.COMPLETION: "/completions",
    JobKind.EMBEDDING: "/embeddings",
}
_INPUT_FIELDS = {JobKind.CHAT: "messages", JobKind.COMPLETION: "prompt", JobKind.EMBEDDING: "input"}


# Models build their validators on first use, not at import: `routerq status` never validates a Job,
# and building every schema up front cost it ~25 ms.
BUILT_ON_FIRST_USE = ConfigDict(defer_build=True)


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


class Job(BaseModel):
    """One upstream request. `body` is the OpenAI-compatible request, passed through unchanged."""

    model_config = BUILT_ON_FIRST_USE

    id: str = Field(default_factory=new_job_id)
    kind: JobKind
    body: dict[str, Any]
    session_id: str | None = None
    user_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    enqueued_at: float = Field(default_factory=time.time)
    batch_id: str | None = None
    custom_id: str | None = None
    project: str | None = None  # the producer's Phoenix project: the worker's spans go there too

    @field_validator("body")
    @classmethod
    def _body_names_a_model(cls, body: dict[str, Any]) -> dict[str, Any]:
        model, models = body.get("model"), body.get("models")
        if not (isinstance(model, str) and model) and not (isinstance(models, list) and models):
            raise ValueError("body needs a model (or a `models` fallback list)")
        if body.get("stream"):
            raise ValueError("streaming is not supported for queued jobs; drop `stream`")
        return body

    @model_validator(mode="after")
    def _body_fits_kind(self) -> Job:
        if self.kind.input_field not in self.body:
            raise ValueError(f"a {self.kind.value} job needs `{self.kind.input_field}` in its body")
        return self

    @property
    def models(self) -> list[str]:
        """Every model the request may be served by (primary and fallbacks)."""
        names = [self.body["model"]] if isinstance(self.body.get("model"), str) else []
        names += [m for m in self.body.get("models") or [] if isinstance(m, str)]
        return list(dict.fromkeys(names))

    @property
    def prompt_text(self) -> str:
        return prompt_of(self.kind, self.body)


def prompt_of(kind: JobKind, body: dict[str, Any]) -> str:
    """Human-readable input (the last message, the prompt, the text), for spans and logs."""
    if kind is JobKind.CHAT:
        messages = body.get("messages") or []
        last = messages[-1].get("content", "") if messages and isinstance(messages[-1], dict) else ""
        return last if isinstance(last, str) else json.dumps(last)
    value = body.get("prompt" if kind is JobKind.COMPLETION else "input")
    return value if isinstance(value, str) else json.dumps(value)


class Usage(BaseModel):
    model_config = BUILT_ON_FIRST_USE
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None


class JobError(BaseModel):
    """A failure as OpenAI's batch format reports it, plus what OpenRouter said."""

    model_config = BUILT_ON_FIRST_USE

    code: str
    message: str
    status_code: int | None = None
    metadata: dict[str, Any] | None = None


class JobResult(BaseModel):
    model_config = BUILT_ON_FIRST_USE
    job_id: str
    kind: JobKind
    status: Literal["succeeded", "failed"]
    response: dict[str, Any] | None = None
    error: JobError | None = None
    model: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    usage: Usage | None = None
    attempts: int = 1
    enqueued_at: float
    started_at: float
    finished_at: float
    batch_id: str | None = None
    custom_id: str | None = None
    trace_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def text(self) -> str:
        """The answer as a person reads it: the message, the completion, or the vectors' shape."""
        if self.response is None:
            return ""
        if self.kind is JobKind.EMBEDDING:
            vectors = [embedding_vector(item["embedding"]) for item in self.response.get("data", [])]
            size = len(vectors[0]) if vectors else 0
            return f"{len(vectors)} embedding(s) of dimension {size}"
        choice = self.response["choices"][0]
        if self.kind is JobKind.CHAT:
            message = choice.get("message") or {}
            content = message.get("content")
            if content:
                return str(content)
            return str(message.get("tool_calls") or "")
        return str(choice.get("text", ""))


def embedding_vector(value: list[float] | str) -> list[float]:
    """An embedding as floats, whether it came as JSON numbers or base64 little-endian float32."""
    return from_float32(base64.b64decode(value)) if isinstance(value, str) else value
