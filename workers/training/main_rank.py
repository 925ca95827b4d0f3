"""Work that only rank 0 of a training job does (reading or publishing a folder), with its outcome
shared: every rank gets rank 0's result, or fails with rank 0's error, so none is left waiting at the
next collective. For a group of one it is simply `action()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from workers.training.distributed import ProcessGroup

T = TypeVar("T")


def on_main(group: ProcessGroup, action: Callable[[], T]) -> T:
    """`action()` on rank 0 only; its (picklable) result on every rank. A failure on rank 0 is raised
    there as it is and on the other ranks as a RuntimeError that names it."""
    if not group.distributed:
        return action()
    result, error = None, None
    if group.is_main:
        try:
            result = action()
        except Exception as exc:
            error = exc
    message = None if error is None else f"{type(error).__name__}: {error}"
    result, message = group.broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"the main training process failed: {message}")
    return result
