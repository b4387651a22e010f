"""How routerq starts a Python child process (worker processes, serve, the fake, the supervisor).

`python -m NAME` searches the current directory first: started beside a user's own `worker.py` or
`api/` package, a child would run the user's file instead of routerq's. `-P` (Python 3.11+) leaves the
current directory off `sys.path`, so a child finds only the installed `routerq`.
"""

import sys


def python_module(module: str, *args: str) -> list[str]:
    """The argv that runs `module` of the installed routerq in a child process."""
    return [sys.executable, "-P", "-m", module, *args]
