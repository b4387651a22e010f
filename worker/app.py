"""The worker's Celery app: the shared broker configuration, routerq's task bodies registered, and
the asyncio pool (worker.pool) that runs them."""

from __future__ import annotations

from celery import Celery

from routerq.broker import create_app
from routerq.settings import Settings
from worker import tasks


def create_worker_app(settings: Settings) -> Celery:
    app = create_app(settings)
    app.conf.worker_pool = "worker.pool:AsyncioPool"
    tasks.register(app)
    return app
