"""GET /healthz: database, broker, workers and queues, live policy.

503 when the database or the broker is down: this web process cannot do its work. "degraded" with
200 when no worker is alive: pages and annotation work, but rounds, generation and exports wait (a
load balancer must not take the web app out for that; `prefloop serve` restarts its workers).
Workers and queue depths are read at most every PREFLOOP_WORKER_STATUS_CACHE_SECONDS per process.

The answer is reused for PREFLOOP_HEALTH_CACHE_SECONDS (anyone may call it, and each check opens a
broker connection), and only admins see why something is down: exception text can name hosts,
users and paths.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.web.security import current_principal, public

router = APIRouter(tags=["health"])


def check_broker(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True, "ok"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


HIDDEN = "hidden: details for admins"


def without_detail(body: dict[str, Any]) -> dict[str, Any]:
    """The body as callers other than admins see it: "down" without the reason, errors without their
    text (in nested sections too)."""
    public_body = {}
    for key, value in body.items():
        if isinstance(value, dict):
            value = without_detail(value)
        elif isinstance(value, str) and value.startswith("down:"):
            value = "down"
        elif key.endswith("error") and value:
            value = HIDDEN
        public_body[key] = value
    return public_body


async def asked_by_admin(request: Request) -> bool:
    """Whether an admin is asking. Reading the caller may need the database, and a database that is
    down must not turn the health check itself into an error: then nobody counts as an admin."""
    try:
        principal = await current_principal(request)
    except Exception:
        return False
    return principal is not None and principal.role == "admin"


@router.get("/healthz", dependencies=[Depends(public)], summary="Liveness of the database, broker and policy")
def healthz(request: Request, admin: Annotated[bool, Depends(asked_by_admin)]) -> JSONResponse:
    state = request.app.state
    cached = getattr(state, "health", None)
    if cached is None or time.monotonic() - cached[0] >= state.settings.health_cache_seconds:
        cached = state.health = (time.monotonic(), *check_dependencies(request))
    _, checks, healthy = cached
    body = {**checks, **policy_state(request)}
    workers = state.worker_reports.get(state.sessionmaker, state.settings)
    body["workers"] = workers.public()
    body["status"] = "ok" if healthy and workers.any_alive else "degraded"
    if not admin:
        body = without_detail(body)
    return JSONResponse(body, status_code=200 if healthy else 503)


def check_dependencies(request: Request) -> tuple[dict[str, Any], bool]:
    """The services the app needs, checked now (the costly part, reused while cached)."""
    settings = request.app.state.settings
    body: dict[str, Any] = {}
    healthy = True
    try:
        with request.app.state.sessionmaker() as db:
            db.execute(text("SELECT 1"))
        body["database"] = "ok"
    except Exception as exc:
        healthy = False
        body["database"] = f"down: {type(exc).__name__}"
    ok, detail = check_broker(settings.celery_broker_url)
    body["broker"] = "ok" if ok else f"down: {detail}"
    healthy &= ok
    return body, healthy


def policy_state(request: Request) -> dict[str, Any]:
    """What this process serves (read from memory, so never cached: swaps show at once)."""
    holder = request.app.state.policy_holder
    return {
        "live_policy_version": holder.live_version if holder else None,
        "served_policy_version": holder.served_version if holder else None,
        "policy_loading_version": holder.loading_version if holder else None,
        "policy_error": holder.last_error if holder else None,
    }
