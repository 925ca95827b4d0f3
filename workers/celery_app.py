"""The Celery application: queues, routes and the settings long GPU jobs need (DESIGN.md §7).

Queues: `gpu` (generation and training, one task at a time per GPU host) and `default`
(exports, statistics, maintenance). State lives in our tables, so there is no result backend.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

GPU_TASK_PATTERNS = (
    "workers.tasks.train_*",
    "workers.tasks.generate_*",
    "workers.tasks.evaluate_*",
    "workers.tasks.run_round",
)
# Above the longest training run: an unacknowledged message older than this is redelivered.
VISIBILITY_TIMEOUT_SECONDS = 48 * 3600


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if settings.is_embedded:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    celery = Celery("prefloop", broker=settings.celery_broker_url, include=["workers.tasks"])
    celery.conf.update(
        task_queues=[Queue("gpu"), Queue("default")],
        task_default_queue="default",
        task_routes={pattern: {"queue": "gpu"} for pattern in GPU_TASK_PATTERNS},
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged after it finished, so a crashed worker's task is delivered again;
        # tasks claim their run row first, which makes redelivery harmless.
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # A fresh child per task: GPU memory is returned and a crashed CUDA context does not linger.
        worker_max_tasks_per_child=1 if not settings.is_embedded else None,
        # Redis only: kombu's SQLAlchemy transport hands its options to create_engine().
        broker_transport_options={}
        if settings.is_embedded
        else {"visibility_timeout": VISIBILITY_TIMEOUT_SECONDS},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        worker_hijack_root_logger=False,
        beat_schedule={
            "maintenance": {"task": "workers.tasks.periodic_maintenance", "schedule": timedelta(seconds=30)},
        },
        beat_schedule_filename=str(settings.resolved_data_dir / "celerybeat-schedule"),
    )
    return celery


celery_app = make_celery()


@lru_cache(maxsize=4)
def _sender_for(broker_url: str) -> Celery:
    return make_celery(get_settings())


def send_task(name: str, args: list) -> None:
    """Enqueue a task by name on the broker of the current settings (web app, CLI, beat, tests).

    The module-level app is fixed at import time for the worker; senders resolve the broker now, so a
    process whose settings changed after import (tests, `prefloop` subcommands) still reaches the right one.
    """
    _sender_for(get_settings().celery_broker_url).send_task(name, args=args)
