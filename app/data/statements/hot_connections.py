"""Postgres: a few async autocommit connections that run the annotators' statements on the event loop.

Each of an annotator's requests runs one self-contained statement (claim the next task; store a
judgement through prefloop_submit_annotation), so it needs no transaction and no worker thread. A
sync handler costs a hand-over to a worker thread and back per request, and the session around it;
on two cores those cost as much as the statement itself. HotConnections keeps `size` connections in
autocommit (Postgres commits each statement by itself) and runs statements on the event loop,
prepared on their first use on each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy import Engine

from app.data.db import IDLE_PING_SECONDS

log = logging.getLogger(__name__)
APPLICATION_NAME = "prefloop-hot"  # how these connections show in pg_stat_activity


class HotConnections:
    """A small pool of async autocommit connections; `rows()` runs one statement on one of them."""

    def __init__(self, engine: Engine, size: int):
        # psycopg takes the URL without SQLAlchemy's driver suffix.
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.size = size
        # Each slot: its connection (None until first use, or after one was dropped) and when it came back.
        self._idle: asyncio.LifoQueue[tuple[psycopg.AsyncConnection | None, float]] | None = None

    async def open(self) -> None:
        """Make the pool on the running loop; connections are opened on first use."""
        self._idle = asyncio.LifoQueue()
        for _ in range(self.size):
            self._idle.put_nowait((None, 0.0))

    async def close(self) -> None:
        idle, self._idle = self._idle, None
        while idle is not None and not idle.empty():
            connection, _ = idle.get_nowait()
            if connection is not None:
                await _discard(connection)

    @property
    def is_open(self) -> bool:
        return self._idle is not None

    async def rows(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        """Run one self-contained statement (psycopg's %(name)s placeholders; it commits by itself)
        and return its rows as named tuples."""
        idle = self._idle
        if idle is None:
            raise RuntimeError("HotConnections is not open")
        connection, returned_at = await idle.get()
        try:
            connection = await self._usable(connection, returned_at)
            cursor = connection.cursor(row_factory=namedtuple_row)
            await cursor.execute(sql, params, prepare=True)
            return await cursor.fetchall() if cursor.description else []
        finally:
            # Broken, or left mid-statement (the request was cancelled while it waited): the next
            # request that draws this slot connects afresh instead.
            if connection is not None and connection.info.transaction_status != TransactionStatus.IDLE:
                await _discard(connection)
                connection = None
            idle.put_nowait((connection, time.monotonic()))

    async def _usable(self, connection: psycopg.AsyncConnection | None, returned_at: float):
        """This slot's connection, opened if it has none and checked if it sat idle a while (a
        database restart or an idle timeout kills connections while they wait, as in app.data.db)."""
        if connection is not None and time.monotonic() - returned_at >= IDLE_PING_SECONDS:
            try:
                await connection.execute("SELECT 1", prepare=False)
            except psycopg.Error as error:
                log.info("an idle hot-path connection is gone (%s); connecting again", error)
                await _discard(connection)
                connection = None
        if connection is None or connection.closed:
            connection = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, application_name=APPLICATION_NAME
            )
        return connection


async def _discard(connection: psycopg.AsyncConnection) -> None:
    with contextlib.suppress(psycopg.Error):  # already gone
        await connection.close()
