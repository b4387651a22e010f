"""`phoenix.otel` without the Phoenix server.

`arize-phoenix-otel` ships `phoenix/otel` into a `phoenix` namespace package. Where the server,
`arize-phoenix`, is installed in the same environment (as Phoenix's own docs install it), it adds a
`phoenix/__init__.py` that imports the whole server (sessions, database, pandas): `import phoenix.otel`
then took `routerq status` 29 s and grew each worker process to ~450 MiB. routerq imports
`phoenix.otel` under a bare `phoenix` package, as if only `arize-phoenix-otel` were installed, and
takes the bare package out again, so a later `import phoenix` by the host application still gets the
real one.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any


def import_phoenix_otel() -> Any:
    """The `phoenix.otel` module, loaded without running `phoenix/__init__.py` unless it already ran."""
    if "phoenix.otel" in sys.modules or "phoenix" in sys.modules:
        import phoenix.otel

        return phoenix.otel
    bare = types.ModuleType("phoenix")
    bare.__path__ = [
        os.path.join(entry or ".", "phoenix")
        for entry in sys.path
        if os.path.isdir(os.path.join(entry or ".", "phoenix"))
    ]
    sys.modules["phoenix"] = bare
    try:
        import phoenix.otel

        return phoenix.otel
    finally:
        if sys.modules.get("phoenix") is bare:
            del sys.modules["phoenix"]
