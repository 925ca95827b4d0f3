"""A bounded in-process map whose entries lapse after a fixed time (per-process caches of the web tier)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringMap(Generic[V]):
    """Entries live `ttl` seconds; ttl <= 0 keeps nothing. At `max_entries` the lapsed entries are
    dropped first, and everything when that is not enough (it only ever holds what is cheap to redo)."""

    def __init__(self, ttl: float, max_entries: int):
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            if self.ttl <= 0:
                self._entries.pop(key, None)
                return
            now = time.monotonic()
            if len(self._entries) >= self.max_entries:
                self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
            self._entries[key] = (now + self.ttl, value)

    def discard_where(self, doomed: Callable[[V], bool]) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if not doomed(v[1])}
