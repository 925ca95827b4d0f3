"""Thin Celery tasks: they receive ids, claim rows and call plain functions (DESIGN.md §5, §7).

torch and the trainers are imported inside task bodies so the prefork parent never touches CUDA.
"""

from __future__ import annotations

import logging

from app.db import session_scope
from workers.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(name="workers.tasks.periodic_maintenance")
def periodic_maintenance() -> dict[str, int]:
    """Beat: return expired assignments to the pool."""
    from app.assignment import expire_stale_assignments

    with session_scope() as db:
        expired = expire_stale_assignments(db)
    if expired:
        log.info("expired %d stale assignments", expired)
    return {"expired_assignments": expired}
