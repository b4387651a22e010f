// A Node.js producer for routerq's Batch API (`routerq serve`): the official `openai` npm client,
// traced with OpenInference JS into Phoenix. Its own span is the parent of routerq's submit span
// (the `traceparent` header), so one Phoenix trace shows this script and the batch it submitted.
//
//   ROUTERQ_API_URL=http://127.0.0.1:8000/v1 ROUTERQ_API_KEY=my-token node producer.mjs requests.jsonl
//
// Prints one JSON object: the trace id, the batch id and status, its counts, and its output lines.
import fs from "node:fs";
import OpenAI from "openai";
import { context, propagation, trace, SpanStatusCode } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, NodeTracerProvider } from "@opentelemetry/sdk-trace-node";
import { OpenAIInstrumentation } from "@arizeai/openinference-instrumentation-openai";
import { OpenInferenceSpanKind, SemanticConventions } from "@arizeai/openinference-semantic-conventions";

const phoenix = process.env.PHOENIX_COLLECTOR_ENDPOINT ?? "http://localhost:6006";
const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({
    "openinference.project.name": process.env.PHOENIX_PROJECT_NAME ?? "routerq",
  }),
  spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({ url: `${phoenix}/v1/traces` }))],
});
provider.register({ propagator: new W3CTraceContextPropagator() });
new OpenAIInstrumentation().manuallyInstrument(OpenAI); // chat/completions/embeddings calls get LLM spans

const file = process.argv[2];
const client = new OpenAI({
  baseURL: process.env.ROUTERQ_API_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.ROUTERQ_API_KEY,
});
const tracer = trace.getTracer("routerq-node-producer");
const attributes = {
  [SemanticConventions.OPENINFERENCE_SPAN_KIND]: OpenInferenceSpanKind.CHAIN,
  [SemanticConventions.INPUT_VALUE]: file,
};

await tracer.startActiveSpan("node.submit-batch", { attributes }, async (span) => {
  try {
    const headers = {};
    propagation.inject(context.active(), headers); // traceparent: routerq continues this trace
    const uploaded = await client.files.create({ file: fs.createReadStream(file), purpose: "batch" });
    let batch = await client.batches.create(
      { input_file_id: uploaded.id, endpoint: "/v1/chat/completions", completion_window: "24h" },
      { headers },
    );
    while (!["completed", "failed", "cancelled"].includes(batch.status)) {
      await new Promise((resolve) => setTimeout(resolve, 500));
      batch = await client.batches.retrieve(batch.id);
    }
    const text = batch.output_file_id ? await (await client.files.content(batch.output_file_id)).text() : "";
    const summary = { batch: batch.id, status: batch.status, counts: batch.request_counts };
    span.setAttribute(SemanticConventions.OUTPUT_VALUE, JSON.stringify(summary));
    const output = text.split("\n").filter(Boolean).map((line) => JSON.parse(line));
    console.log(JSON.stringify({ trace_id: span.spanContext().traceId, ...summary, output }));
  } catch (error) {
    span.recordException(error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: String(error) });
    console.error(String(error));
    process.exitCode = 1;
  } finally {
    span.end();
  }
});
await provider.forceFlush();
await provider.shutdown();
