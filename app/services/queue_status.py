"""How many Celery messages wait in each queue, read straight from the broker for the admin dashboard.

Celery's own inspection asks the workers, which says nothing when none is running, and that is when
an admin most needs to see the backlog. So this reads the broker's storage directly: Redis keeps a
queue as a list under the queue's name (LLEN); kombu's SQLAlchemy transport, the embedded default,
keeps messages in `kombu_message` joined to `kombu_queue`, and marks a message a worker took as
invisible until it is acknowledged, so only visible rows are waiting. Nothing here writes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, inspect, text

log = logging.getLogger(__name__)

QUEUES = ("gpu", "default")

_broker_engines: dict[str, Engine] = {}
_broker_engines_lock = threading.Lock()

# kombu's tables, as its SQLAlchemy transport creates them; counted per queue, waiting messages only.
_KOMBU_WAITING = text(
    "SELECT q.name, COUNT(m.id) FROM kombu_queue q "
    "LEFT JOIN kombu_message m ON m.queue_id = q.id AND m.visible "
    "GROUP BY q.name"
)


def queue_depths(broker_url: str, queues: tuple[str, ...] = QUEUES) -> dict[str, int | None]:
    """Messages waiting in each queue; None where the broker cannot say (the console shows "unknown")."""
    try:
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            return _redis_depths(broker_url, queues)
        if broker_url.startswith("sqla+"):
            return _kombu_table_depths(broker_url.removeprefix("sqla+"), queues)
    except Exception as exc:  # the console must render even when the broker is down
        log.info("queue depths unavailable: %s", exc)
    return {q: None for q in queues}


def _redis_depths(broker_url: str, queues: tuple[str, ...]) -> dict[str, int | None]:
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        pipe = client.pipeline()
        for queue in queues:
            pipe.llen(queue)
        return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))
    finally:
        client.close()


def _kombu_table_depths(database_url: str, queues: tuple[str, ...]) -> dict[str, int | None]:
    engine = _broker_engine(database_url)
    if engine.dialect.name == "sqlite" and not _sqlite_file_exists(engine):
        return {q: 0 for q in queues}  # the broker was never used: nothing is waiting
    with engine.connect() as conn:
        if not inspect(conn).has_table("kombu_message"):
            return {q: 0 for q in queues}
        counts = {name: int(n) for name, n in conn.execute(_KOMBU_WAITING).all()}
    return {q: counts.get(q, 0) for q in queues}


def _broker_engine(url: str) -> Engine:
    # One engine per broker URL for the life of the process: the dashboard polls, and a new engine
    # per request would open a new connection pool each time.
    with _broker_engines_lock:
        if url not in _broker_engines:
            _broker_engines[url] = create_engine(url, pool_pre_ping=True)
        return _broker_engines[url]


def _sqlite_file_exists(engine: Engine) -> bool:
    # Connecting to a SQLite file that is not there would create an empty one.
    database = engine.url.database
    return bool(database) and (database == ":memory:" or Path(database).exists())
