"""The worker's Celery app: the shared configuration (app.broker), the task module and beat's schedule.

Queues: `gpu` (generation and training, one task at a time per GPU host) and `default`
(exports, statistics, maintenance). State lives in our tables, so there is no result backend.
"""

from __future__ import annotations

from datetime import timedelta

from celery.signals import worker_ready, worker_shutdown

from app.broker import install_sender, make_celery
from app.config import get_settings
from app.services import dispatch
from app.services.worker_status import HeartbeatWriter

MAINTENANCE_EVERY = timedelta(seconds=30)
CLEANUP_EVERY = timedelta(hours=1)

celery_app = make_celery(include=["workers.tasks"])
celery_app.conf.update(
    # A periodic message not taken before the next one is sent is dropped when a worker gets to it:
    # while no default worker runs, beat's messages would otherwise pile up, and all run at once later.
    beat_schedule={
        "maintenance": {
            "task": dispatch.PERIODIC_MAINTENANCE,
            "schedule": MAINTENANCE_EVERY,
            "options": {"expires": MAINTENANCE_EVERY.total_seconds()},
        },
        "cleanup": {
            "task": dispatch.CLEANUP_DISK,
            "schedule": CLEANUP_EVERY,
            "options": {"expires": CLEANUP_EVERY.total_seconds()},
        },
    },
    beat_schedule_filename=str(get_settings().resolved_data_dir / "celerybeat-schedule"),
)
# Run bodies enqueue follow-up work (a refill after a promotion, a re-queued run).
install_sender()


# ---------------------------------------------------------------- liveness

_heartbeat: HeartbeatWriter | None = None


@worker_ready.connect
def _start_heartbeat(sender=None, **_kwargs) -> None:
    """The worker's main process records its heartbeat (hostname and queues) while it runs."""
    global _heartbeat
    settings = get_settings()
    consumer = sender
    queues = sorted(q.name for q in consumer.task_consumer.queues) if consumer.task_consumer else []
    _heartbeat = HeartbeatWriter(
        settings.sqlalchemy_url, consumer.hostname, queues, settings.worker_heartbeat_seconds
    ).start()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
