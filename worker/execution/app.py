"""The worker's Celery app: the broker configuration, routerq's task bodies registered, and the asyncio
pool (worker.pool) that runs them. Redis broker, JSON only, late acks."""

from __future__ import annotations

from celery import Celery

from routerq.core.settings import Settings
from routerq.worker.execution import embed_batches, tasks, upstream_batches


def create_app(settings: Settings) -> Celery:
    # No Celery result backend: outcomes live in routerq's own stores (one copy each), and Celery's
    # Redis backend would refuse a rediss:// URL without its own ssl_cert_reqs parameter.
    app = Celery("routerq", broker=settings.redis_url, set_as_current=True)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Sweep for lost (unacked) messages every ROUTERQ_RESTORE_INTERVAL s instead of kombu's ~100 s.
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.job_time_limit,
        task_soft_time_limit=max(1.0, settings.job_time_limit - 5),
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
    )
    app.conf.routerq_settings = settings
    return app


def create_worker_app(settings: Settings) -> Celery:
    app = create_app(settings)
    app.conf.worker_pool = "routerq.worker.execution.pool:AsyncioPool"
    tasks.register(app)
    upstream_batches.register(app)
    embed_batches.register(app)
    return app
