"""Running `routerq serve`: an open server only on loopback, submits traced, a graceful stop."""

from __future__ import annotations

import contextlib
import logging

import uvicorn

from routerq.api.app import create_app
from routerq.api.auth import LOOPBACK, Tokens
from routerq.api.file_store import check_writable
from routerq.core import telemetry
from routerq.core.errors import SettingsError
from routerq.core.redaction import redact_handlers
from routerq.core.settings import Settings

# Seconds requests in progress get to finish after SIGTERM or Ctrl-C (an upload of 200 MB on a slow
# link takes longer; its client retries).
GRACEFUL_S = 30
STARTUP_FAILURE = 3  # the exit code `uvicorn.run` gives when the server cannot start


def check_auth(settings: Settings, host: str, no_auth: bool) -> Tokens:
    tokens = Tokens(settings.api_tokens)
    if no_auth and tokens.required:
        raise SettingsError("--no-auth with ROUTERQ_API_KEYS set: choose one")
    if not no_auth and not tokens.required:
        raise SettingsError(
            "ROUTERQ_API_KEYS is not set: set it to the bearer tokens callers use (comma-separated), "
            "or pass --no-auth to serve without auth on a loopback address"
        )
    if no_auth and host not in LOOPBACK:
        raise SettingsError(f"--no-auth serves only on a loopback address (127.0.0.1, ::1), not {host}")
    return tokens


def serve(settings: Settings, host: str, port: int, no_auth: bool, log_level: str = "info") -> None:
    tokens = check_auth(settings, host, no_auth)
    check_writable(settings.files_dir)
    # a caller's traceparent continues into the submit span; a server rides out a Phoenix restart
    telemetry.setup_tracing(
        settings, telemetry.WORKER_EXPORT_TIMEOUT_S, telemetry.WORKER_EXPORT_RETRY_S, exits_soon=False
    )
    app = create_app(settings, tokens)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=True, timeout_graceful_shutdown=GRACEFUL_S
    )  # configures uvicorn's logging: its handlers exist from here on
    if not logging.getLogger().handlers:  # routerq's own records and every other library's, on stderr
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    redact_handlers(settings.secrets)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    telemetry.flush()
    if not server.started:  # the port was taken, or the app failed to start: uvicorn said why
        raise SystemExit(STARTUP_FAILURE)
