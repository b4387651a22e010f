"""Phoenix's CPU per ingested span, by span content: `python -m bench.phoenix_ingest [--spans N]`.

Traced throughput on a small machine is bounded by what Phoenix spends per span, not by routerq.
This sends N spans of each kind straight from an OTel SDK (no routerq, no OpenInference) to a local
`phoenix serve` and reports its CPU per span, backlog included: if an empty span costs about what an
LLM span costs, trimming attributes cannot help and only the span count matters.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from bench.measure import cpu_seconds, tree, wait_idle
from routerq.devstack.localstack import free_port, start_phoenix

TEXT = "x" * 600


def attributes(kind: str) -> dict[str, Any]:
    if kind == "empty":
        return {}
    if kind == "chain":
        return {"openinference.span.kind": "CHAIN", "input.value": "hello", "output.value": "world"}
    return {  # about what OpenInference records for a chat completion
        "openinference.span.kind": "LLM",
        "llm.model_name": "meta-llama/llama-3.1-8b-instruct",
        "llm.provider": "openrouter",
        "llm.token_count.prompt": 12,
        "llm.token_count.completion": 40,
        "llm.token_count.total": 52,
        "input.value": json.dumps({"messages": [{"role": "user", "content": TEXT}]}),
        "input.mime_type": "application/json",
        "output.value": json.dumps({"choices": [{"message": {"content": TEXT}}]}),
        "output.mime_type": "application/json",
        "llm.input_messages.0.message.role": "user",
        "llm.input_messages.0.message.content": TEXT,
        "llm.output_messages.0.message.role": "assistant",
        "llm.output_messages.0.message.content": TEXT,
        "llm.invocation_parameters": json.dumps({"temperature": 0}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=3000, help="spans of each kind")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="routerq-phoenix-ingest-"))
    phoenix = start_phoenix(free_port(), free_port(), tmp / "phoenix")
    try:
        wait_idle([phoenix.process.pid])
        for kind in ("empty", "chain", "llm"):
            provider = TracerProvider(
                resource=Resource.create({"openinference.project.name": f"ingest-{kind}"})
            )
            exporter = OTLPSpanExporter(endpoint=f"{phoenix.url}/v1/traces")
            provider.add_span_processor(
                BatchSpanProcessor(exporter, max_queue_size=args.spans, max_export_batch_size=2048)
            )
            tracer = provider.get_tracer("bench")
            before = cpu_seconds(tree(phoenix.process.pid))
            started = time.perf_counter()
            for i in range(args.spans):
                with tracer.start_as_current_span(f"span-{i}", attributes=attributes(kind)):
                    pass
            provider.shutdown()
            wait_idle([phoenix.process.pid])
            spent = cpu_seconds(tree(phoenix.process.pid)) - before
            print(
                f"{kind:>5}: {spent / args.spans * 1000:.2f} ms of Phoenix CPU per span "
                f"({args.spans} spans, {time.perf_counter() - started:.0f} s until Phoenix was idle)",
                flush=True,
            )
    finally:
        phoenix.stop()


if __name__ == "__main__":
    main()
