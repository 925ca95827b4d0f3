"""The lifecycle retries a body that raises RetryableRunError, up to the run's attempts, and no other."""

from __future__ import annotations

from app.data.db import session_factory
from app.data.models import Run
from app.services.runs import RetryableRunError, create_run, execute, request_cancel


def _run(db) -> int:
    run = create_run(db, "reward", {})
    db.commit()
    return run.id


def test_a_retryable_failure_runs_the_body_again_with_its_checkpoints_kept(settings, engine, db):
    run_id = _run(db)
    checkpoints = settings.runs_dir / str(run_id) / "checkpoints"
    attempts_seen = []

    def body(run_id, config, reporter):
        with session_factory(engine)() as other:
            attempts_seen.append(other.get(Run, run_id).attempts)
        if len(attempts_seen) == 1:
            checkpoints.mkdir(parents=True)
            (checkpoints / "step-000001").mkdir()
            raise RetryableRunError("training rank 1 of 2 failed (killed by SIGKILL)")
        assert (checkpoints / "step-000001").exists()  # the retry finds what the attempt saved
        return {"steps": 4}

    assert execute(run_id, body, session_factory(engine)) == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert attempts_seen == [1, 2] and run.attempts == 2 and run.result == {"steps": 4}
    assert not checkpoints.exists()  # removed once the run succeeded, as for any run


def test_the_run_fails_with_the_last_error_once_its_attempts_are_spent(settings, engine, db):
    run_id = _run(db)
    calls = []

    def body(run_id, config, reporter):
        calls.append(1)
        raise RetryableRunError(f"training rank 0 of 2 failed (exit code 1): attempt {len(calls)}")

    assert execute(run_id, body, session_factory(engine)) == "failed"
    db.expire_all()
    run = db.get(Run, run_id)
    assert len(calls) == settings.run_max_attempts == run.attempts
    assert f"attempt {settings.run_max_attempts}" in run.error


def test_other_errors_are_not_retried_and_a_cancelled_run_ends_cancelled(settings, engine, db):
    plain, cancelled = _run(db), _run(db)
    calls = []

    def failing(run_id, config, reporter):
        calls.append(run_id)
        raise ValueError("no comparisons to train on")

    assert execute(plain, failing, session_factory(engine)) == "failed"

    def cancelled_meanwhile(run_id, config, reporter):
        calls.append(run_id)
        with session_factory(engine)() as other:
            request_cancel(other, run_id)
        raise RetryableRunError("training rank 1 of 2 failed (killed by SIGTERM)")

    assert execute(cancelled, cancelled_meanwhile, session_factory(engine)) == "cancelled"
    assert calls == [plain, cancelled]
    db.expire_all()
    assert db.get(Run, plain).attempts == 1 and db.get(Run, cancelled).status == "cancelled"
