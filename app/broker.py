"""The Celery configuration shared by senders and workers, and the sender the web app and CLI install.

Tasks are sent by name (app.services.dispatch), so no process that only sends imports a task module.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings
from app.services import dispatch

# Above the longest training run: an unacknowledged message older than this is redelivered.
VISIBILITY_TIMEOUT_SECONDS = 48 * 3600


def make_celery(settings: Settings | None = None, *, include: list[str] | None = None) -> Celery:
    """A Celery app on the broker of `settings`: queues, routes and the settings long GPU jobs need."""
    settings = settings or get_settings()
    if settings.is_embedded:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    celery = Celery("prefloop", broker=settings.celery_broker_url, include=include or [])
    celery.conf.update(
        task_queues=[Queue("gpu"), Queue("default")],
        task_default_queue="default",
        task_routes={name: {"queue": queue} for name, queue in dispatch.QUEUE_OF.items()},
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
    )
    return celery


@lru_cache(maxsize=4)
def _sender_for(broker_url: str) -> Celery:
    return make_celery(get_settings())


def send_task(name: str, args: list) -> None:
    """Send a task by name on the broker of the current settings.

    The broker is resolved at each send, so a process whose settings changed after start-up (tests,
    `prefloop` subcommands) still reaches the right one.
    """
    _sender_for(get_settings().celery_broker_url).send_task(name, args=args)


def install_sender() -> None:
    """Route this process's `dispatch.enqueue` calls to the broker."""
    dispatch.install(send_task)
