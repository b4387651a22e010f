"""The `routerq` command line (cli.app).

redis-py 8 imports OpenTelemetry's metrics SDK whenever it is installed (it always is beside routerq)
for metrics that only an explicit `redis.observability` set-up turns on; routerq never does, and that
import is a sixth of `routerq status`'s start-up. So a `routerq` process imports redis-py with the
module marked absent (Python raises ImportError for a None in sys.modules, which redis-py takes as
"not installed"), then unmarks it: tracing commands still import the SDK (phoenix.otel needs it), and
library users (`Producer` in their own process) are not affected.
"""

import sys

_METRICS_SDK = "opentelemetry.sdk.metrics"

if _METRICS_SDK not in sys.modules:
    sys.modules[_METRICS_SDK] = None  # type: ignore[assignment]
    try:
        import redis  # noqa: F401
    finally:
        del sys.modules[_METRICS_SDK]
