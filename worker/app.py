"""The worker's Celery app: the shared broker configuration with routerq's task bodies registered."""

from __future__ import annotations

from celery import Celery

from routerq.broker import create_app
from routerq.settings import Settings
from worker import tasks


def create_worker_app(settings: Settings) -> Celery:
    app = create_app(settings)
    tasks.register(app)
    return app
