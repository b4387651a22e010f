"""`python -m cli`: how the worker supervisor starts its worker processes."""

from cli.app import app

app()
