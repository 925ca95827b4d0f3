"""Whether workers are alive, and what waits for them: worker heartbeats and queue depths per queue.

Each Celery worker process records a heartbeat row every PREFLOOP_WORKER_HEARTBEAT_SECONDS
(`HeartbeatWriter`, started by the worker's Celery app) and deletes it when it stops cleanly. A row
older than PREFLOOP_WORKER_STALE_SECONDS belongs to a worker that died without saying so. Heartbeats
live in the database, not the broker: workers may run on other hosts, the embedded SQLite broker
cannot broadcast a ping, and the database answers even when no worker does.

`/healthz` and the admin dashboard read `worker_report`, which each web process caches for
PREFLOOP_WORKER_STATUS_CACHE_SECONDS, so a health probe every second costs one read every few seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine, create_engine, delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.config import Settings
from app.data.models import WorkerHeartbeat, utcnow
from app.services.queue_status import QUEUES, queue_depths

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- writing (in each worker)


def record_heartbeat(db: Session, hostname: str, queues: list[str], pid: int, started_at: datetime) -> None:
    """Insert or refresh this worker's row."""
    values = {
        "hostname": hostname,
        "queues": ",".join(queues),
        "pid": pid,
        "started_at": started_at,
        "beat_at": utcnow(),
    }
    insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(WorkerHeartbeat).values(values)
    db.execute(
        stmt.on_conflict_do_update(
            index_elements=["hostname"],
            set_={k: stmt.excluded[k] for k in ("queues", "pid", "started_at", "beat_at")},
        )
    )
    db.commit()


def forget_worker(db: Session, hostname: str) -> None:
    db.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == hostname))
    db.commit()


class HeartbeatWriter:
    """A daemon thread in a worker's main process that records its heartbeat until stopped.

    It uses an engine of its own without a pool: the prefork pool forks children from this process,
    and a child must never inherit an open database connection of its parent.
    """

    def __init__(self, database_url: str, hostname: str, queues: list[str], every_seconds: float):
        self.hostname = hostname
        self.queues = queues
        self._every = every_seconds
        self._started_at = utcnow()
        self._engine: Engine = create_engine(database_url, poolclass=NullPool)
        self._sessions = sessionmaker(bind=self._engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)

    def start(self) -> HeartbeatWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and delete the row: a worker that stops cleanly is not a dead one."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self._sessions() as db:
                forget_worker(db, self.hostname)
        except Exception as exc:
            log.info("could not remove the heartbeat of %s: %s", self.hostname, exc)
        self._engine.dispose()

    def beat(self) -> None:
        with self._sessions() as db:
            record_heartbeat(db, self.hostname, self.queues, os.getpid(), self._started_at)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # the database is down: the next beat retries
                log.warning("worker heartbeat not recorded: %s", exc)
            self._stop.wait(self._every)


# ---------------------------------------------------------------- reading (web app, CLI)


@dataclass(frozen=True)
class WorkerSeen:
    hostname: str
    queues: tuple[str, ...]
    pid: int
    started_at: datetime
    beat_at: datetime
    alive: bool


@dataclass(frozen=True)
class QueueState:
    name: str
    workers_alive: int
    waiting: int | None  # None: the broker could not say


@dataclass(frozen=True)
class WorkerReport:
    workers: list[WorkerSeen] = field(default_factory=list)
    queues: list[QueueState] = field(default_factory=list)
    error: str = ""  # why the heartbeats could not be read (logged; shown to admins only)

    @property
    def any_alive(self) -> bool:
        return any(w.alive for w in self.workers)

    @property
    def queues_without_worker(self) -> list[str]:
        return [q.name for q in self.queues if q.workers_alive == 0]

    def public(self) -> dict:
        """What anyone may see: per queue, live workers and waiting messages; no hosts, no errors."""
        return {
            "alive": sum(1 for w in self.workers if w.alive),
            "queues": {q.name: {"workers": q.workers_alive, "waiting": q.waiting} for q in self.queues},
        }


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; they are stored in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=utcnow().tzinfo)


def read_workers(db: Session, stale_after: timedelta) -> list[WorkerSeen]:
    now = utcnow()
    rows = db.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.hostname)).all()
    return [
        WorkerSeen(
            hostname=row.hostname,
            queues=tuple(q for q in row.queues.split(",") if q),
            pid=row.pid,
            started_at=_aware(row.started_at),
            beat_at=_aware(row.beat_at),
            alive=now - _aware(row.beat_at) <= stale_after,
        )
        for row in rows
    ]


def build_report(sessions: sessionmaker[Session], settings: Settings) -> WorkerReport:
    """Read heartbeats and queue depths now (uncached)."""
    workers: list[WorkerSeen] = []
    error = ""
    try:
        with sessions() as db:
            workers = read_workers(db, timedelta(seconds=settings.worker_stale_seconds))
    except Exception as exc:
        log.warning("worker heartbeats unreadable: %s", exc)
        error = f"{type(exc).__name__}: {exc}"
    depths = queue_depths(settings.celery_broker_url)
    queues = [
        QueueState(
            name=name,
            workers_alive=sum(1 for w in workers if w.alive and name in w.queues),
            waiting=depths.get(name),
        )
        for name in QUEUES
    ]
    return WorkerReport(workers=workers, queues=queues, error=error)


class WorkerReportCache:
    """One web process's recent `WorkerReport`, read again at most every `ttl` seconds."""

    def __init__(self, ttl: float):
        self._ttl = ttl
        self._lock = threading.Lock()
        self._value: tuple[float, WorkerReport] | None = None

    def get(self, sessions: sessionmaker[Session], settings: Settings) -> WorkerReport:
        with self._lock:  # one reader at a time; the others wait and reuse its answer
            if self._value is not None and time.monotonic() - self._value[0] < self._ttl:
                return self._value[1]
            report = build_report(sessions, settings)
            self._value = (time.monotonic(), report)
            return report
