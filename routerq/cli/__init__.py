"""The `routerq` command line (cli.app), and what a `routerq` process never loads.

- redis-py 8 imports OpenTelemetry's metrics API and SDK whenever they are installed (they always are
  beside routerq) for metrics that only an explicit `redis.observability` set-up turns on; routerq
  never does, and those imports were a fifth of `routerq status`'s start-up. So a `routerq` process
  imports redis-py with them marked absent (Python raises ImportError for a None in sys.modules, which
  redis-py takes as "not installed"), then unmarks them: tracing commands still import them.
- `phoenix.otel` imports the OTLP gRPC exporter (grpc, and the SDK's logs and metrics) at module
  level, for its `protocol="grpc"`; routerq sends spans over HTTP only (routerq.telemetry). A
  `routerq` process gets a stand-in module that refuses to be used. Why a stand-in, and not another
  way: arize-phoenix-otel has no option to skip that import, and routerq is built on its `register`
  (the project's resource, its HTTP exporter, the default processor it replaces). Measured here
  (2026-12-04, three runs each): `import phoenix.otel` 0.18-0.20 s, 0.07 s with the stand-in; the
  gRPC exporter alone 0.115 s, a tenth of `routerq enqueue`. It uses nothing private of the library:
  it only pre-fills `sys.modules` for a module routerq never calls.

Both apply to `routerq` processes only: an application using `Producer` in its own process imports
its libraries as they are.
"""

import sys
import types

_METRICS = ("opentelemetry.metrics", "opentelemetry.sdk.metrics")
_GRPC_EXPORTER = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"


class GrpcNotLoaded:
    """What phoenix.otel sees as the gRPC span exporter in a `routerq` process."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("routerq sends spans over OTLP/HTTP; the gRPC exporter is not loaded")


if _GRPC_EXPORTER not in sys.modules:
    _stand_in = types.ModuleType(_GRPC_EXPORTER, GrpcNotLoaded.__doc__)
    _stand_in.OTLPSpanExporter = GrpcNotLoaded  # type: ignore[attr-defined]
    sys.modules[_GRPC_EXPORTER] = _stand_in

if "redis" not in sys.modules:
    _marked = [name for name in _METRICS if name not in sys.modules]
    sys.modules.update(dict.fromkeys(_marked))  # type: ignore[arg-type]
    try:
        import redis  # noqa: F401
    finally:
        for name in _marked:
            del sys.modules[name]
