"""Rate limits: login per client address and per username, task requests and submissions per user.

Counting is the `limits` library's sliding-window counter (two counters per key, in Redis when the
app has PREFLOOP_REDIS_URL so every web process shares them, else in this process). Limits are
strings in its notation ("5/minute;20/hour"); "off" turns one off. A limit with an hourly tier on
top of a per-minute one is the backoff: a caller who keeps going waits a minute, then an hour.

Redis going away must not stop annotation: while it cannot be reached the counters fall back to
this process's memory (still limited, per process) and a warning is logged.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from fastapi import HTTPException, Request, status
from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from app.config import Settings
from app.web.security import Principal

log = logging.getLogger(__name__)

KEY_PREFIX = "prefloop-limits"
# A rate-limit check sits in front of every annotator request: a Redis that does not answer must
# cost little before the fallback takes over.
REDIS_TIMEOUT_SECONDS = 0.5
WARN_EVERY_SECONDS = 60.0
RETRY_REDIS_AFTER_SECONDS = 5.0


def parse_limit(value: str) -> tuple[RateLimitItem, ...]:
    """The tiers of a limit string; none for "off"."""
    if value.strip().lower() == "off":
        return ()
    return tuple(parse_many(value))


class RateLimited(HTTPException):
    """429 with Retry-After and a sentence that says what to do."""

    def __init__(self, retry_after: int, what: str) -> None:
        wait = f"{retry_after} seconds" if retry_after != 1 else "1 second"
        super().__init__(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"Too many {what}; try again in {wait}.",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rules:
    login_per_ip: tuple[RateLimitItem, ...]
    login_failures_per_user: tuple[RateLimitItem, ...]
    task_requests: tuple[RateLimitItem, ...]
    submissions: tuple[RateLimitItem, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            login_per_ip=parse_limit(settings.login_rate_limit_per_ip),
            login_failures_per_user=parse_limit(settings.login_failure_limit_per_user),
            task_requests=parse_limit(settings.task_request_rate_limit),
            submissions=parse_limit(settings.submission_rate_limit),
        )


class RateLimits:
    """The app's counters (one per app: create_app makes it)."""

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.rules = Rules.from_settings(settings)
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        if storage is None and settings.redis_url:
            storage = storage_from_string(
                "async+" + settings.redis_url,
                implementation="redispy",
                key_prefix=KEY_PREFIX,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            )
        self._shared = SlidingWindowCounterRateLimiter(storage) if storage is not None else None
        self._warned_at = -math.inf
        self._shared_down_until = -math.inf

    # ------------------------------------------------------------ counting

    async def _call(self, method: str, item: RateLimitItem, *key: str):
        if self._shared is not None and time.monotonic() >= self._shared_down_until:
            try:
                return await getattr(self._shared, method)(item, *key)
            except Exception as exc:  # Redis down or timing out: count here instead
                now = time.monotonic()
                # Leave it alone for a while, so requests do not each wait for its timeout.
                self._shared_down_until = now + RETRY_REDIS_AFTER_SECONDS
                if now - self._warned_at > WARN_EVERY_SECONDS:
                    self._warned_at = now
                    log.warning("rate limits: Redis unavailable (%s); counting in this process", exc)
        return await getattr(self._local, method)(item, *key)

    async def _retry_after(self, item: RateLimitItem, *key: str) -> int:
        stats = await self._call("get_window_stats", item, *key)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def hit(self, items: tuple[RateLimitItem, ...], *key: str) -> int | None:
        """Count one event against every tier; seconds to wait when a tier is exhausted, else None."""
        waits = [
            await self._retry_after(item, *key) for item in items if not await self._call("hit", item, *key)
        ]
        return max(waits) if waits else None

    async def exhausted(self, items: tuple[RateLimitItem, ...], *key: str) -> int | None:
        """Seconds to wait when a tier has no room left, without counting; else None."""
        waits = [
            await self._retry_after(item, *key) for item in items if not await self._call("test", item, *key)
        ]
        return max(waits) if waits else None

    async def clear(self, items: tuple[RateLimitItem, ...], *key: str) -> None:
        for item in items:
            await self._call("clear", item, *key)

    # ------------------------------------------------------------ the app's limits

    async def login_attempt(self, address: str, username: str) -> int | None:
        """Before a password is checked: seconds to wait, or None to go ahead.

        Every attempt counts against the address; a username that has failed too often waits
        whoever tries it (sessions and API tokens already issued keep working)."""
        wait = await self.hit(self.rules.login_per_ip, "login-ip", address)
        blocked = await self.exhausted(self.rules.login_failures_per_user, "login-user", username.lower())
        waits = [w for w in (wait, blocked) if w is not None]
        return max(waits) if waits else None

    async def login_failed(self, username: str) -> None:
        await self.hit(self.rules.login_failures_per_user, "login-user", username.lower())

    async def login_succeeded(self, username: str) -> None:
        await self.clear(self.rules.login_failures_per_user, "login-user", username.lower())

    async def task_request(self, principal: Principal) -> None:
        """Raises RateLimited when the user asked for tasks too often."""
        wait = await self.hit(self.rules.task_requests, "tasks", str(principal.id))
        if wait is not None:
            raise RateLimited(wait, "task requests")

    async def submission(self, principal: Principal) -> None:
        """Raises RateLimited when the user submitted too often."""
        wait = await self.hit(self.rules.submissions, "submissions", str(principal.id))
        if wait is not None:
            raise RateLimited(wait, "submissions")


def rate_limits(request: Request) -> RateLimits:
    return request.app.state.rate_limits


def client_address(request: Request) -> str:
    """The caller's address as the server saw it (behind a proxy: uvicorn's --proxy-headers)."""
    return request.client.host if request.client else "unknown"
