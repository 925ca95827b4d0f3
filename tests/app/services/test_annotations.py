"""Submission: validation, derived comparisons, idempotency, skip / all-bad, expired assignments."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from app.data.models import Annotation, Assignment, Comparison, Task, utcnow
from app.services import annotation
from app.services.annotation import AnnotationError, derive_comparisons, payload_hash
from app.services.assignment import expire_stale_assignments
from app.services.schemas import MAX_RANKED_RESPONSES, AnnotationIn
from tests.aio import run_async
from tests.annotating import next_task_id, shown_response_ids, submit_annotation
from tests.world import World

TTL = 600


def seed(db, n=1, required=1, k=4, name="s"):
    items = [(f"{name} prompt {i}", [f"{name} answer {i}.{j}" for j in range(k)]) for i in range(n)]
    return World(db).tasks_from_texts(items, required=required, prompt_set=name)


def assigned_task(db, make_user, **seed_kw):
    (task_id,) = seed(db, **seed_kw)
    user, _ = make_user()
    assert next_task_id(db, user.id, TTL) == task_id
    return task_id, user, shown_response_ids(db, task_id)


# ---------------------------------------------------------------- comparisons (pure)


def test_pairs_from_tie_groups_with_margin_as_group_distance():
    pairs = {(p.chosen, p.rejected, p.margin) for p in derive_comparisons([[1], [2, 3], [4]])}
    assert pairs == {(1, 2, 1.0), (1, 3, 1.0), (1, 4, 2.0), (2, 4, 1.0), (3, 4, 1.0)}
    assert len(derive_comparisons([[10], [20], [30], [40]])) == 6  # a strict order of 4: all 4·3/2 pairs
    assert derive_comparisons([[1, 2, 3]]) == []  # one tie group: nothing is preferred
    assert derive_comparisons([[1], [2]], all_bad=True) == []


def test_payload_hash_ignores_time_and_order_inside_tie_groups():
    a = AnnotationIn(ranking=[[1], [3, 2]], time_spent_ms=100)
    b = AnnotationIn(ranking=[[1], [2, 3]], time_spent_ms=999)
    c = AnnotationIn(ranking=[[1], [2], [3]])
    assert payload_hash(a) == payload_hash(b) != payload_hash(c)


def test_payload_rules_are_checked_before_the_database():
    with pytest.raises(ValidationError, match="skip_reason"):
        AnnotationIn(skip=True)
    with pytest.raises(ValidationError, match="leave it empty"):
        AnnotationIn(skip=True, skip_reason="unclear", ranking=[[1]])
    with pytest.raises(ValidationError, match="rank every response"):
        AnnotationIn()
    with pytest.raises(ValidationError, match="tie group is empty"):
        AnnotationIn(ranking=[[1], []])
    with pytest.raises(ValidationError):
        AnnotationIn(ranking=[[1]], flags={1: ["spam"]})
    with pytest.raises(ValidationError):
        AnnotationIn(ranking=[[1]], surprise=True)
    with pytest.raises(ValidationError, match=r"response ids \[1, 3\] appear more than once"):
        AnnotationIn(ranking=[[3, 1], [2], [1, 3]])
    with pytest.raises(ValidationError, match=f"at most {MAX_RANKED_RESPONSES} response ids"):
        AnnotationIn(ranking=[list(range(1, MAX_RANKED_RESPONSES + 1)), [MAX_RANKED_RESPONSES + 1]])
    AnnotationIn(ranking=[[i] for i in range(1, MAX_RANKED_RESPONSES + 1)])  # the cap itself is allowed


class _NoStatements:
    """A statement runner that must never be reached."""

    async def rows(self, statement, params):
        raise AssertionError(f"{statement} ran for a refused ranking")


@pytest.mark.parametrize(
    "ranking",
    [[[1] * 1000, [1] * 1000], [list(range(1000)), list(range(1000, 2000))]],
    ids=["repeated", "huge"],
)
def test_a_refused_ranking_never_derives_pairs(monkeypatch, ranking):
    def derive(*args, **kwargs):
        raise AssertionError("pairs derived for a refused ranking")

    monkeypatch.setattr(annotation, "derive_comparisons", derive)
    # Built without validation, as a caller inside the app could: the service must refuse it itself.
    payload = AnnotationIn.model_construct(ranking=ranking, all_bad=False, skip=False, flags={})
    with pytest.raises(AnnotationError) as err:
        run_async(annotation.submit_annotation(_NoStatements(), 1, 1, payload))
    assert err.value.status == 422 and "ranking" in err.value.message


# ---------------------------------------------------------------- storing


def test_submission_stores_the_ranking_and_its_comparisons(db, make_user):
    task_id, user, ids = assigned_task(db, make_user)
    a, b, c, d = ids
    payload = AnnotationIn(
        ranking=[[c], [a, d], [b]],
        flags={b: ["nonsense", "harmful", "nonsense"]},
        flag_note="",
        rationale=" c answers the question ",
        time_spent_ms=4200,
    )
    result, created = submit_annotation(db, task_id, user.id, payload)
    assert created and result.status == "submitted" and result.comparisons == 5
    assert result.shown_order_unchanged is False
    row = db.get(Annotation, result.annotation_id)
    assert row.ranking == [[c], sorted([a, d]), [b]]
    assert row.flags == {"responses": {str(b): ["harmful", "nonsense"]}}
    assert row.rationale == "c answers the question" and row.time_spent_ms == 4200
    pairs = db.execute(
        select(Comparison.chosen_response_id, Comparison.rejected_response_id, Comparison.margin)
    ).all()
    assert set(pairs) == {(c, a, 1.0), (c, d, 1.0), (c, b, 2.0), (a, b, 1.0), (d, b, 1.0)}
    task = db.get(Task, task_id)
    assert (task.status, task.annotation_count, task.claimed_count) == ("done", 1, 1)
    assert db.scalar(select(Assignment.status).where(Assignment.user_id == user.id)) == "submitted"


def test_same_payload_again_is_a_replay_and_a_different_one_is_409(db, make_user):
    task_id, user, ids = assigned_task(db, make_user)
    payload = AnnotationIn(ranking=[[ids[1], ids[0]], [ids[2]], [ids[3]]], time_spent_ms=10)
    first, created = submit_annotation(db, task_id, user.id, payload)
    again, created_again = submit_annotation(
        db, task_id, user.id, AnnotationIn(ranking=[[ids[0], ids[1]], [ids[2]], [ids[3]]], time_spent_ms=99)
    )
    assert created and not created_again and again == first
    with pytest.raises(AnnotationError) as err:
        submit_annotation(db, task_id, user.id, AnnotationIn(ranking=[[i] for i in ids]))
    assert err.value.status == 409 and "different judgement" in err.value.message
    assert db.scalar(select(func.count(Annotation.id))) == 1
    assert db.scalar(select(func.count(Comparison.id))) == first.comparisons == 5


def test_unknown_foreign_and_missing_ids_are_named(db, make_user):
    task_id, user, ids = assigned_task(db, make_user, name="mine")
    (other_task,) = seed(db, name="theirs")
    foreign = shown_response_ids(db, other_task)[0]
    cases = [
        ([[ids[0]], [ids[1]], [ids[2]], [ids[3]], [999999]], "unknown response ids [999999]"),
        (
            [[ids[0]], [ids[1]], [ids[2]], [ids[3], foreign]],
            f"response ids [{foreign}] belong to another task",
        ),
        ([[ids[0]], [ids[1]]], f"missing response ids {sorted(ids[2:])}"),
    ]
    for ranking, message in cases:
        with pytest.raises(AnnotationError) as err:
            submit_annotation(db, task_id, user.id, AnnotationIn(ranking=ranking))
        assert err.value.status == 422 and message in err.value.message
    with pytest.raises(AnnotationError, match="belong to another task"):
        submit_annotation(db, task_id, user.id, AnnotationIn(all_bad=True, flags={foreign: ["harmful"]}))
    assert db.scalar(select(func.count(Annotation.id))) == 0
    assert db.get(Task, task_id).annotation_count == 0


def test_all_bad_is_kept_without_comparisons(db, make_user):
    task_id, user, ids = assigned_task(db, make_user)
    result, _ = submit_annotation(db, task_id, user.id, AnnotationIn(all_bad=True, rationale="all wrong"))
    assert result.comparisons == 0 and result.status == "submitted"
    assert db.get(Annotation, result.annotation_id).all_bad is True
    assert db.scalar(select(func.count(Comparison.id))) == 0
    assert db.get(Task, task_id).status == "done"


def test_skip_keeps_the_reason_and_frees_the_slot(db, make_user):
    task_id, user, _ = assigned_task(db, make_user, required=2)
    payload = AnnotationIn(skip=True, skip_reason="Not my language")
    result, _ = submit_annotation(db, task_id, user.id, payload)
    assert result.status == "skipped" and result.comparisons == 0
    assert submit_annotation(db, task_id, user.id, payload) == (result, False)
    row = db.get(Annotation, result.annotation_id)
    assert row.skipped and row.skip_reason == "Not my language"
    task = db.get(Task, task_id)
    assert (task.status, task.annotation_count, task.claimed_count) == ("open", 0, 0)


def test_the_shown_order_submitted_unchanged_is_recorded(db, make_user):
    task_id, user, ids = assigned_task(db, make_user)
    result, _ = submit_annotation(db, task_id, user.id, AnnotationIn(ranking=[[i] for i in ids]))
    assert result.shown_order_unchanged is True
    assert db.get(Annotation, result.annotation_id).shown_order_unchanged is True


def test_submitting_an_unassigned_or_missing_task_is_refused(db, make_user):
    (task_id,) = seed(db)
    ids = shown_response_ids(db, task_id)
    user, _ = make_user()
    with pytest.raises(AnnotationError) as err:
        submit_annotation(db, task_id, user.id, AnnotationIn(ranking=[[i] for i in ids]))
    assert err.value.status == 409 and "not assigned to you" in err.value.message
    with pytest.raises(AnnotationError) as err:
        submit_annotation(db, 424242, user.id, AnnotationIn(ranking=[[1]]))
    assert err.value.status == 404


def test_a_submission_to_someone_elses_task_names_none_of_its_responses(db, make_user):
    task_id, _, ids = assigned_task(db, make_user)
    outsider, _ = make_user()
    messages = set()
    for ranking in ([[999_991], [999_992]], [[ids[0]]], [[i] for i in ids], []):
        payload = AnnotationIn(ranking=ranking, all_bad=not ranking, flags={999_993: ["harmful"]})
        with pytest.raises(AnnotationError) as err:
            submit_annotation(db, task_id, outsider.id, payload)
        assert err.value.status == 409 and "not assigned to you" in err.value.message
        assert {int(n) for n in re.findall(r"\d+", err.value.message)} <= {task_id}, err.value.message
        messages.add(err.value.message)
    assert len(messages) == 1  # the same answer whatever the ranking
    assert db.scalar(select(func.count(Annotation.id))) == 0


def test_a_late_submission_counts_while_a_slot_is_free(db, make_user):
    task_id, slow, ids = assigned_task(db, make_user)
    db.execute(update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    expire_stale_assignments(db)
    result, created = submit_annotation(db, task_id, slow.id, AnnotationIn(ranking=[[i] for i in ids]))
    assert created
    task = db.get(Task, task_id)
    assert (task.status, task.annotation_count, task.claimed_count) == ("done", 1, 1)


def test_a_late_submission_is_refused_when_others_filled_the_task(db, make_user):
    task_id, slow, ids = assigned_task(db, make_user)
    db.execute(update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    expire_stale_assignments(db)
    quick, _ = make_user()
    assert next_task_id(db, quick.id, TTL) == task_id
    submit_annotation(db, task_id, quick.id, AnnotationIn(ranking=[[i] for i in ids]))
    with pytest.raises(AnnotationError) as err:
        submit_annotation(db, task_id, slow.id, AnnotationIn(ranking=[[i] for i in reversed(ids)]))
    assert err.value.status == 409 and "no longer takes judgements" in err.value.message
    assert db.scalar(select(func.count(Annotation.id))) == 1


def _store_params(task_id: int, user_id: int, payload: AnnotationIn) -> dict:
    return annotation._Judgement.of(task_id, user_id, payload).params()


def test_the_storing_statement_derives_the_pairs_after_checking_the_ranking(db, make_user):
    """No pairs travel with the judgement: the statement derives them from the ranking, only after the
    ranking named each shown response once (Postgres in its function, SQLite at the same step), and by
    the same rule as app.data.statements.pairs."""
    from app.data.statements import Statement
    from app.data.statements.pairs import derive_pairs
    from tests.annotating import with_statements

    task_id, user, ids = assigned_task(db, make_user, name="mine")
    (other_task,) = seed(db, name="theirs")
    foreign = shown_response_ids(db, other_task)[0]
    a, b, c, d = ids
    params = _store_params(task_id, user.id, AnnotationIn(ranking=[[a], [b], [c], [foreign]]))
    assert not {"chosen", "rejected", "margin"} & set(params)

    def store(p):
        return with_statements(db, lambda statements: statements.rows(Statement.STORE_JUDGEMENT, p))

    assert store(params)[0].outcome == "invalid"
    assert db.scalar(select(func.count(Comparison.id))) == 0

    ranking = [[c], sorted([a, d]), [b]]
    (row,) = store(_store_params(task_id, user.id, AnnotationIn(ranking=ranking)))
    assert row.outcome == "stored"
    stored = db.execute(
        select(Comparison.chosen_response_id, Comparison.rejected_response_id, Comparison.margin)
        .where(Comparison.annotation_id == row.new_annotation_id)
        .order_by(Comparison.id)
    ).all()
    assert stored == [(p.chosen, p.rejected, p.margin) for p in derive_pairs(ranking)]
