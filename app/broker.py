"""The Celery configuration shared by senders and workers, and the sender the web app and CLI install.

Tasks are sent by name (app.services.dispatch), so no process that only sends imports a task module.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings
from app.services import dispatch

# Above the longest training run: an unacknowledged message older than this is redelivered. It
# stays an hour above the longest hard time limit, whatever the settings say.
VISIBILITY_TIMEOUT_SECONDS = 48 * 3600

LONG_TASKS = (
    dispatch.TRAIN_REWARD_MODEL,
    dispatch.TRAIN_POLICY,
    dispatch.EVALUATE_POLICY,
    dispatch.GENERATE_RESPONSES,
    dispatch.RUN_ROUND,
)


def hard_limit(soft_seconds: float) -> float:
    """The hard time limit after a soft one: time for the task to record why it stopped."""
    return soft_seconds + max(30.0, 0.05 * soft_seconds)


def time_limits(settings: Settings) -> dict[str, dict[str, float]]:
    """Celery's soft and hard time limit of each task, by name."""
    soft_by_task = {name: settings.long_task_time_limit_seconds for name in LONG_TASKS}
    soft_by_task[dispatch.EXPORT_DATASET] = settings.export_task_time_limit_seconds
    soft_by_task[dispatch.PERIODIC_MAINTENANCE] = settings.maintenance_task_time_limit_seconds
    soft_by_task[dispatch.CLEANUP_DISK] = settings.maintenance_task_time_limit_seconds
    return {
        name: {"soft_time_limit": float(soft), "time_limit": hard_limit(soft)}
        for name, soft in soft_by_task.items()
    }


def visibility_timeout(settings: Settings) -> float:
    longest = max(limits["time_limit"] for limits in time_limits(settings).values())
    return max(float(VISIBILITY_TIMEOUT_SECONDS), longest + 3600)


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
        # A child killed mid-task (SIGKILL, the OOM killer) would otherwise have its message
        # acknowledged as failed: the message was gone and only beat noticed, once the run's
        # heartbeat went stale. Rejected instead, the message is delivered again at once; its run
        # claim lets it take over only a stale row, and run_max_attempts bounds a task that kills
        # its worker every time. A hard time limit still acknowledges: it is not retried.
        task_reject_on_worker_lost=True,
        # The soft limit raises inside the task, so its run fails with the reason recorded.
        task_annotations=time_limits(settings),
        worker_prefetch_multiplier=1,
        # A fresh child per task: GPU memory is returned and a crashed CUDA context does not linger.
        worker_max_tasks_per_child=1 if not settings.is_embedded else None,
        # Redis only: kombu's SQLAlchemy transport hands its options to create_engine().
        broker_transport_options={}
        if settings.is_embedded
        else {"visibility_timeout": visibility_timeout(settings)},
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
