"""GET /healthz: database, broker, workers and queues, live policy.

503 when the database or the broker is down: this web process cannot do its work. "degraded" with
200 when no worker is alive: pages and annotation work, but rounds, generation and exports wait (a
load balancer must not take the web app out for that; `prefloop serve` restarts its workers).
Workers and queue depths are read at most every PREFLOOP_WORKER_STATUS_CACHE_SECONDS per process.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.web.security import public

router = APIRouter(tags=["health"])


def check_broker(url: str, timeout: float = 2.0) -> tuple[bool, str]:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True, "ok"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


@router.get("/healthz", dependencies=[Depends(public)], summary="Liveness of the database, broker and policy")
def healthz(request: Request) -> JSONResponse:
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
    holder = request.app.state.policy_holder
    body["live_policy_version"] = holder.live_version if holder else None
    body["served_policy_version"] = holder.served_version if holder else None
    body["policy_loading_version"] = holder.loading_version if holder else None
    body["policy_error"] = holder.last_error if holder else None
    workers = request.app.state.worker_reports.get(request.app.state.sessionmaker, settings)
    body["workers"] = workers.public()
    body["status"] = "ok" if healthy and workers.any_alive else "degraded"
    return JSONResponse(body, status_code=200 if healthy else 503)
