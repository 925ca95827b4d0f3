"""The database session each request gets, as a typed dependency (`DbSession`), and path ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.services.row_ids import MAX_ROW_ID


async def get_db(request: Request) -> AsyncIterator[Session]:
    """One session per request, bound to the engine the app was created with.

    Opening a session does no I/O, and neither does closing one whose work was committed or rolled
    back, so both stay on the event loop; only a session still holding a connection (a handler that
    read without committing) is closed in a worker thread, since handing the connection back to the
    pool rolls it back over the network.
    """
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


DbSession = Annotated[Session, Depends(get_db)]

# An id in the path names a row: bounded as the database column is (app.services.row_ids).
PathId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
PathVersion = Annotated[int, Path(ge=0, le=MAX_ROW_ID)]
