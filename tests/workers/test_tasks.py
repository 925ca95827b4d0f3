"""Beat's maintenance task: it starts a round once enough new comparisons arrived, and only one; it
sends again a run or round whose task was lost, and nothing that a worker took."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import select, update

from app.config import reset_settings
from app.data.models import Round, Run
from app.services import dispatch
from app.services.registry import init_base_policy
from app.services.round_spec import RoundSpec
from app.services.rounds import active_round, comparisons_since_last_round, start_round
from app.services.runs import claim_run, finish_run
from app.services.tasks_pool import request_refill
from tests.world import World, marker_preferences


def test_maintenance_starts_a_round_when_enough_comparisons_arrived(
    db, settings, tiny_model_dir, monkeypatch
):
    from workers.tasks import periodic_maintenance

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=1)
    arrived = comparisons_since_last_round(db)
    assert arrived > 0
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(dispatch, "_sender", lambda name, args: sent.append((name, args)))

    def maintenance_with_threshold(threshold: int) -> dict[str, int]:
        monkeypatch.setenv("PREFLOOP_AUTO_ROUND_MIN_COMPARISONS", str(threshold))
        reset_settings()
        return periodic_maintenance()

    assert maintenance_with_threshold(0)["auto_round"] == 0  # 0 turns automatic rounds off
    assert maintenance_with_threshold(arrived + 1)["auto_round"] == 0  # not enough yet
    assert not any(name == dispatch.RUN_ROUND for name, _ in sent)

    round_id = maintenance_with_threshold(arrived)["auto_round"]
    assert round_id
    db.expire_all()
    round_ = db.get(Round, round_id)
    assert round_.trigger == "auto" and round_.status == "queued"
    assert (dispatch.RUN_ROUND, [round_id]) in sent
    # The next beat finds the round still active and starts no second one.
    assert maintenance_with_threshold(arrived)["auto_round"] == 0


@contextmanager
def _installed(sender: dispatch.Sender) -> Iterator[None]:
    previous = dispatch.install(sender)
    try:
        yield
    finally:
        dispatch.install(previous)


def _broker_down(name: str, args: list) -> None:
    raise ConnectionError("broker unreachable")


def _maintenance(monkeypatch, resend_after_seconds: float) -> dict[str, int]:
    from workers.tasks import periodic_maintenance

    monkeypatch.setenv("PREFLOOP_QUEUED_RESEND_SECONDS", str(resend_after_seconds))
    reset_settings()
    return periodic_maintenance()


def test_a_refill_whose_send_failed_is_sent_again_until_a_worker_takes_it(
    db, settings, tiny_model_dir, monkeypatch
):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    with _installed(_broker_down), pytest.raises(ConnectionError):
        request_refill(db, settings=settings)
    run = db.scalar(select(Run).where(Run.kind == "generate"))
    assert run.status == "queued"  # committed, with no message anywhere: it blocks every later refill

    sent: list[tuple[str, list]] = []
    with _installed(lambda name, args: sent.append((name, args))):
        assert _maintenance(monkeypatch, 600)["resent_runs"] == 0  # too recent: its message may be on its way
        assert sent == []
        assert _maintenance(monkeypatch, 0)["resent_runs"] == 1
        assert sent == [(dispatch.GENERATE_RESPONSES, [run.id])]  # and no second refill beside it
        assert _maintenance(monkeypatch, 600)["resent_runs"] == 0  # sent again once per period, not each beat

        assert claim_run(db, run.id)  # a worker took it
        sent.clear()
        assert _maintenance(monkeypatch, 0)["resent_runs"] == 0
        assert sent == []
        finish_run(db, run.id, "succeeded", result={})
        _maintenance(monkeypatch, 0)
        assert (dispatch.GENERATE_RESPONSES, [run.id]) not in sent


def test_a_round_whose_send_failed_is_sent_again_until_it_runs(db, settings, tiny_model_dir, monkeypatch):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    with _installed(_broker_down):
        # A send that fails leaves the round queued (stored, not sent) rather than an error.
        start_round(db, RoundSpec.model_validate({}))
    round_id = active_round(db).id
    assert db.get(Round, round_id).status == "queued"

    sent: list[tuple[str, list]] = []
    with _installed(lambda name, args: sent.append((name, args))):
        assert _maintenance(monkeypatch, 0)["resent_rounds"] == 1
        assert (dispatch.RUN_ROUND, [round_id]) in sent
        db.execute(update(Round).where(Round.id == round_id).values(status="running"))
        db.commit()
        sent.clear()
        assert _maintenance(monkeypatch, 0)["resent_rounds"] == 0
        assert (dispatch.RUN_ROUND, [round_id]) not in sent
