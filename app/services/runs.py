"""The run lifecycle: create and enqueue run rows, claim, throttled progress and metrics, cancel, finish.

Every run body (workers/runs/) goes through `execute`: claim the row (a redelivered message or a
second worker does nothing), report progress and metrics through DbReporter, stop on cancel, record
the result, or a short error with an error id on the row (the traceback goes to the log). Trainers checkpoint under DATA_DIR/runs/<id>/checkpoints, so
a run whose worker died resumes where it stopped when the message is delivered again, and a body
that raises RetryableRunError (a training process died) is started again at once, from the same
checkpoints, while the run has attempts left; the checkpoints are deleted once the run has succeeded.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from app.common.errors import describe_exception, record_failure
from app.common.reporting import RunCancelled
from app.config import Settings, get_settings
from app.data.db import session_factory
from app.data.models import Round, Run, RunMetric, utcnow
from app.services import dispatch
from app.services.retention import LowDiskSpace, ensure_free_disk

log = logging.getLogger(__name__)


def stale_after() -> timedelta:
    """A running row whose heartbeat is older than this belongs to a dead worker and may be taken over."""
    return timedelta(seconds=get_settings().run_stale_seconds)


def claim_run(db: Session, run_id: int) -> bool:
    """Atomically move a run to 'running'. False when another delivery already owns it (or it ended).

    A 'running' row with a stale heartbeat is taken over: its worker died and the broker redelivered.
    """
    now = utcnow()
    result = db.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.cancel_requested.is_(False),
            or_(Run.status == "queued", (Run.status == "running") & (Run.heartbeat_at < now - stale_after())),
        )
        .values(status="running", started_at=now, heartbeat_at=now, attempts=Run.attempts + 1, error="")
    )
    db.commit()
    return result.rowcount == 1


def finish_run(
    db: Session, run_id: int, status: str, result: dict[str, Any] | None = None, error: str = ""
) -> None:
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if result is not None:
        values["result"] = result
    if status == "succeeded":
        values["progress"] = 1.0
    db.execute(update(Run).where(Run.id == run_id).values(**values))
    db.commit()


def fail_run(db: Session, run_id: int, exc: BaseException) -> str:
    """Fail a run: the traceback goes to the log under an error id, the row keeps a short message
    with that id (it reaches the API and the pages). Returns the stored message."""
    error = record_failure(log, exc, f"run {run_id} failed")
    finish_run(db, run_id, "failed", error=error)
    return error


def request_cancel(db: Session, run_id: int) -> bool:
    """Ask a run to stop; a queued run is cancelled at once, a running one at its next check."""
    run = db.get(Run, run_id)
    if run is None or run.status in ("succeeded", "failed", "cancelled"):
        return False
    run.cancel_requested = True
    if run.status == "queued":
        run.status = "cancelled"
        run.finished_at = utcnow()
    db.commit()
    return True


def upsert_metrics(db: Session, run_id: int, rows: dict[tuple[int, str], float]) -> None:
    """Write (step, name) → value; a step repeated after a resume overwrites instead of duplicating."""
    if not rows:
        return
    values = [{"run_id": run_id, "step": s, "name": n, "value": float(v)} for (s, n), v in rows.items()]
    insert = pg_insert if db.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(RunMetric).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "step", "name"], set_={"value": stmt.excluded.value}
    )
    db.execute(stmt)
    db.commit()


class DbReporter:
    """The trainers' Reporter over the runs and run_metrics tables, throttled to a write every few seconds."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, every_seconds: float = 2.0):
        self._sessions = sessions
        self.run_id = run_id
        self._every = every_seconds
        self._pending: dict[tuple[int, str], float] = {}
        self._progress: tuple[int, int, str] | None = None
        self._last_flush = 0.0
        self._cancelled = False

    def progress(self, done: int, total: int, message: str = "") -> None:
        self._progress = (done, total, message)
        self._maybe_flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._pending[(step, name)] = float(value)
        self._maybe_flush()

    def should_stop(self) -> bool:
        self._maybe_flush()
        return self._cancelled

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self._every:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        with self._sessions() as db:
            upsert_metrics(db, self.run_id, self._pending)
            self._pending = {}
            values: dict[str, Any] = {"heartbeat_at": utcnow()}
            if self._progress is not None:
                done, total, message = self._progress
                values["progress"] = min(1.0, done / total) if total else 0.0
                values["progress_message"] = message or f"{done}/{total}"
            db.execute(update(Run).where(Run.id == self.run_id).values(**values))
            db.commit()
            self._cancelled = bool(db.scalar(select(Run.cancel_requested).where(Run.id == self.run_id)))


class Heartbeat:
    """Touches the run row every few seconds from a background thread while a body works, so a long
    step (a model load, a slow rollout) never looks like a dead worker."""

    def __init__(self, sessions: sessionmaker[Session], run_id: int, every_seconds: float | None = None):
        import threading

        self._sessions = sessions
        self._run_id = run_id
        self._every = every_seconds or get_settings().run_heartbeat_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with self._sessions() as db:
                    db.execute(
                        update(Run)
                        .where(Run.id == self._run_id, Run.status == "running")
                        .values(heartbeat_at=utcnow())
                    )
                    db.commit()
            except Exception as exc:  # a missed beat is harmless; the next one retries
                log.debug("heartbeat for run %s failed: %s", self._run_id, exc)


def requeue_stale_runs(db: Session) -> list[int]:
    """Runs whose worker died (stale heartbeat): queue them again, or fail them after too many attempts."""
    settings = get_settings()
    stale = db.scalars(
        select(Run).where(Run.status == "running", Run.heartbeat_at < utcnow() - stale_after())
    ).all()
    requeued = []
    for run in stale:
        if run.attempts >= settings.run_max_attempts:
            run.status, run.finished_at = "failed", utcnow()
            run.error = f"the worker running this run was lost {run.attempts} times; giving up"
            db.commit()
            continue
        run.status, run.sent_at = "queued", utcnow()
        db.commit()
        enqueue_run(run)
        requeued.append(run.id)
    return requeued


def resend_queued_runs(db: Session, older_than: timedelta) -> list[int]:
    """Send again the task of each run still queued `older_than` after its task was last sent.

    A send that failed after the row committed leaves it queued with no message anywhere. A
    duplicate message is harmless: the first delivery claims the row, the others find it taken. A
    round's run is sent as its round's task, and only while that round runs: a round ended has no
    use for it, and a queued round is re-sent by itself.
    """
    cutoff = utcnow() - older_than
    running_rounds = select(Round.id).where(Round.status == "running")
    due = db.scalars(
        select(Run)
        .where(
            Run.status == "queued",
            or_(Run.round_id.is_(None), Run.round_id.in_(running_rounds)),
            func.coalesce(Run.sent_at, Run.created_at) < cutoff,
        )
        .order_by(Run.id)
    ).all()
    resent = []
    for run in due:
        run.sent_at = utcnow()
        db.commit()
        enqueue_run(run)
        resent.append(run.id)
    return resent


Body = Callable[[int, dict[str, Any], DbReporter], dict[str, Any]]


def run_dir(run_id: int, settings: Settings | None = None) -> Path:
    return (settings or get_settings()).runs_dir / str(run_id)


# ---------------------------------------------------------------- creating and enqueueing


def create_run(
    db: Session, kind: str, config: dict[str, Any], round_id: int | None = None, created_by: int | None = None
) -> Run:
    run = Run(kind=kind, config=config, round_id=round_id, created_by=created_by, status="queued")
    db.add(run)
    db.flush()
    return run


def enqueue_run(run: Run) -> None:
    """Send the task that executes a run (its round's task when it belongs to one).
    Call after the transaction that created or re-queued the row has committed."""
    dispatch.enqueue_run(run.kind, run.id, run.round_id)


# ---------------------------------------------------------------- lifecycle


class RetryableRunError(RuntimeError):
    """Raised by a body whose attempt failed for a reason that may not recur (a training process
    died: out of memory, a lost host, a signal). The lifecycle starts the run again, resuming from its
    checkpoints, until it has made PREFLOOP_RUN_MAX_ATTEMPTS attempts; then the run fails with it."""


def requeue_for_retry(db: Session, run_id: int, exc: BaseException, max_attempts: int) -> bool:
    """Put a running run whose attempt failed back in the queue, its checkpoints kept, when it has
    attempts left and nobody cancelled it. The row says which attempt failed and why."""
    run = db.get(Run, run_id)
    db.refresh(run)
    if run.cancel_requested or run.attempts >= max_attempts:
        return False
    detail = describe_exception(exc)
    run.status, run.sent_at = "queued", utcnow()
    run.progress_message = f"attempt {run.attempts} of {max_attempts} failed ({detail}); the next resumes from the last checkpoint"
    db.commit()
    log.warning("run %s: attempt %s failed, trying again: %s", run_id, run.attempts, detail)
    return True


def execute(run_id: int, body: Body, sessions: sessionmaker[Session] | None = None) -> str | None:
    """Claim, run the body, finish. Returns the final status, or None when the run was not ours.

    A body that raises RetryableRunError is started again here, from the run's checkpoints, while
    the run has attempts left (each claim counts one); any other exception fails the run at once.
    """
    sessions = sessions or session_factory()
    with sessions() as db:
        if not claim_run(db, run_id):
            log.info("run %s is owned by another delivery or already finished; nothing to do", run_id)
            return None
        config = dict(db.get(Run, run_id).config)
        try:
            # Checked when the run starts, not only when it was asked for: the disk may have filled
            # while it waited, and a run that fills it fails half-way with less clear errors.
            ensure_free_disk(get_settings())
        except LowDiskSpace as exc:
            finish_run(db, run_id, "failed", error=f"not started: {exc}")
            return "failed"
    while True:
        reporter = DbReporter(sessions, run_id)
        try:
            with Heartbeat(sessions, run_id):
                result = body(run_id, config, reporter)
        except RunCancelled:
            reporter.flush()
            with sessions() as db:
                finish_run(db, run_id, "cancelled", error="cancelled on request")
            return "cancelled"
        except RetryableRunError as exc:
            reporter.flush()
            with sessions() as db:
                if db.scalar(select(Run.cancel_requested).where(Run.id == run_id)):
                    # Asked to stop while its processes failed: what was asked is what it ends as.
                    finish_run(db, run_id, "cancelled", error="cancelled on request")
                    return "cancelled"
                if requeue_for_retry(db, run_id, exc, get_settings().run_max_attempts):
                    if claim_run(db, run_id):
                        continue
                    # Cancelled in between (a queued run is cancelled at once), or taken by another.
                    db.expire_all()
                    return db.get(Run, run_id).status
                fail_run(db, run_id, exc)
            return "failed"
        except Exception as exc:
            reporter.flush()
            with sessions() as db:
                fail_run(db, run_id, exc)
            return "failed"
        break
    reporter.flush()
    with sessions() as db:
        finish_run(db, run_id, "succeeded", result=result)
    # Checkpoints exist to resume a run after a crash; a finished run's output is in the registry, and
    # each checkpoint holds a full model with its optimiser state, so they go now.
    shutil.rmtree(run_dir(run_id) / "checkpoints", ignore_errors=True)
    return "succeeded"
