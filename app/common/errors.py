"""Failures as people see them: a short message and an error id; the traceback goes to the log only.

Run, round and export errors reach the API and the web pages. A traceback there tells a caller the
server's paths, library versions and sometimes SQL with its parameters, and helps no one who cannot
read the server's log anyway. So a failure is logged once with its traceback under a short random
error id, and the row (and every response) carries only `<Type>: <first line> (error id <id>)`;
an operator finds the traceback by searching the log for the id.
"""

from __future__ import annotations

import errno
import logging
import secrets

MAX_MESSAGE = 300


def new_error_id() -> str:
    """A short random id that ties a shown message to its logged traceback (8 hex digits)."""
    return secrets.token_hex(4)


def short_message(text: str, limit: int = MAX_MESSAGE) -> str:
    """The first non-empty line of a message, at most `limit` characters: what may be shown."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[: limit - 1] + "…"


def describe_exception(exc: BaseException) -> str:
    """`<Type>: <first line of the message>`, short, never a traceback; a full disk in words an
    operator acts on."""
    full = disk_full_error(exc)
    if full is not None:
        where = f" writing {full.filename}" if isinstance(full, OSError) and full.filename else ""
        return short_message(
            f"The disk is full (no space left on device{where}): free space under the data directory "
            "(old exports, checkpoints of failed runs) and start it again."
        )
    detail = short_message(str(exc))
    return short_message(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def disk_full_error(exc: BaseException) -> BaseException | None:
    """The ENOSPC in the exception or its causes (torch, safetensors and zipfile wrap it), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        if "No space left on device" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def record_failure(logger: logging.Logger, exc: BaseException, what: str) -> str:
    """Log `what` failed with the traceback under a new error id; return the message to store and show."""
    error_id = new_error_id()
    logger.error("%s [error id %s]", what, error_id, exc_info=(type(exc), exc, exc.__traceback__))
    return f"{describe_exception(exc)} (error id {error_id})"


def public_error(text: str | None) -> str:
    """A stored error as responses show it: its first line only, so an older row that holds a whole
    traceback still shows none."""
    return short_message(text or "", limit=2 * MAX_MESSAGE)
