"""`python -m routerq.cli`: how the worker supervisor starts its worker processes."""

from routerq.cli.app import app

app()
