"""Revising a judgement: the row and its comparisons hold the latest version, the replaced one is
kept, exports read the latest; skips, closed tasks and judgements a round trained on stay as they
are; someone else's judgement is not found. Giving a held task back frees its slot for others."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.data.models import Annotation, AnnotationRevision, Assignment, Comparison, Round, Task
from app.services.annotation import AnnotationError
from app.services.assignment import release_task
from app.services.exports import ExportSpec, iter_rows
from app.services.revisions import judged_task_view, recent_judgements, revise_annotation
from app.services.schemas import AnnotationIn
from tests.annotating import next_task_id, submit_annotation
from tests.world import World

SECRET = "test-secret-key-that-is-long-enough-0123456789"


def judged(db, rationale="first look"):
    world = World(db)
    task = world.task(["alpha", "beta", "gamma"])
    user = world.user()
    annotation = world.judge(task, user, [[0], [1], [2]], rationale=rationale)
    return world, task, user, annotation, world.shown(task)


def pairs(db, annotation_id) -> set[tuple[int, int, float]]:
    rows = db.scalars(select(Comparison).where(Comparison.annotation_id == annotation_id)).all()
    return {(c.chosen_response_id, c.rejected_response_id, c.margin) for c in rows}


def test_a_revision_replaces_the_judgement_and_keeps_the_old_version(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    old_hash = annotation.payload_hash
    assert pairs(db, annotation.id) == {(a, b, 1.0), (a, c, 2.0), (b, c, 1.0)}

    revised = revise_annotation(
        db,
        annotation.id,
        user.id,
        AnnotationIn(ranking=[[c], [a, b]], rationale="c is right after all", flags={b: ["nonsense"]}),
    )
    db.expire_all()
    row = db.get(Annotation, revised.id)
    assert row.ranking == [[c], sorted([a, b])] and row.rationale == "c is right after all"
    assert row.flags == {"responses": {str(b): ["nonsense"]}}
    assert row.revision == 1 and row.revised_at is not None and row.payload_hash != old_hash
    assert pairs(db, annotation.id) == {(c, a, 1.0), (c, b, 1.0)}
    (kept,) = db.scalars(select(AnnotationRevision).where(AnnotationRevision.annotation_id == row.id)).all()
    assert kept.revision == 0 and kept.ranking == [[a], [b], [c]] and kept.rationale == "first look"
    assert kept.payload_hash == old_hash

    # The same judgement again changes nothing; a third version keeps the second.
    revise_annotation(
        db,
        annotation.id,
        user.id,
        AnnotationIn(ranking=[[c], [b, a]], rationale="c is right after all", flags={b: ["nonsense"]}),
    )
    db.expire_all()
    assert db.get(Annotation, row.id).revision == 1
    revise_annotation(db, annotation.id, user.id, AnnotationIn(all_bad=True))
    db.expire_all()
    assert db.get(Annotation, row.id).revision == 2 and pairs(db, row.id) == set()
    versions = db.scalars(
        select(AnnotationRevision.revision)
        .where(AnnotationRevision.annotation_id == row.id)
        .order_by(AnnotationRevision.revision)
    ).all()
    assert versions == [0, 1]


def test_exports_read_the_latest_version(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    revise_annotation(db, annotation.id, user.id, AnnotationIn(ranking=[[b], [c], [a]]))
    rankings = [row for _, row, _ in iter_rows(db, ExportSpec(format="rankings"), pseudonym_key=SECRET)]
    assert [r["ranking"] for r in rankings if r["annotation_id"] == annotation.id] == [[[b], [c], [a]]]
    pairwise = [row for _, row, _ in iter_rows(db, ExportSpec(format="pairwise"), pseudonym_key=SECRET)]
    chosen_first = {
        (r["chosen_response_id"], r["rejected_response_id"])
        for r in pairwise
        if r["annotation_id"] == annotation.id
    }
    assert chosen_first == {(b, c), (b, a), (c, a)}


def test_a_revision_must_name_every_response_and_cannot_skip(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    with pytest.raises(AnnotationError) as missing:
        revise_annotation(db, annotation.id, user.id, AnnotationIn(ranking=[[a], [b]]))
    assert missing.value.status == 422 and "every response" in missing.value.message
    with pytest.raises(AnnotationError) as skip:
        revise_annotation(db, annotation.id, user.id, AnnotationIn(skip=True, skip_reason="changed my mind"))
    assert skip.value.status == 422
    db.expire_all()
    assert db.get(Annotation, annotation.id).revision == 0


def test_someone_elses_judgement_is_not_found(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    other = world.user()
    with pytest.raises(AnnotationError) as refused:
        revise_annotation(db, annotation.id, other.id, AnnotationIn(ranking=[[c], [b], [a]]))
    assert refused.value.status == 404
    assert recent_judgements(db, other.id) == []


def test_closed_tasks_skips_and_trained_judgements_cannot_be_revised(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    (line,) = recent_judgements(db, user.id)
    assert line.not_revisable is None and line.order == "1 > 2 > 3" and line.outcome == "ranked"

    # A round took comparisons up to this judgement's: they are frozen.
    first = min(
        cid for cid in db.scalars(select(Comparison.id).where(Comparison.annotation_id == annotation.id))
    )
    db.add(Round(status="succeeded", active=None, comparison_snapshot=first))
    db.commit()
    (line,) = recent_judgements(db, user.id)
    assert line.not_revisable == "a training round has already used it"
    with pytest.raises(AnnotationError) as frozen:
        revise_annotation(db, annotation.id, user.id, AnnotationIn(ranking=[[c], [b], [a]]))
    assert frozen.value.status == 409 and "training round" in frozen.value.message

    other_task = world.task(["x", "y"])
    skipped = world.skip(other_task, user)
    closed_task = world.task(["p", "q"])
    closed = world.judge(closed_task, user, [[1], [0]])
    db.execute(Task.__table__.update().where(Task.id == closed_task.id).values(status="closed"))
    db.commit()
    reasons = {line.annotation_id: line.not_revisable for line in recent_judgements(db, user.id)}
    assert reasons[skipped.id] == "a skipped task cannot be revised"
    assert reasons[closed.id] == "its task is closed"


def test_the_revise_view_shows_the_ranking_as_judged(db):
    world, task, user, annotation, (a, b, c) = judged(db)
    revise_annotation(db, annotation.id, user.id, AnnotationIn(ranking=[[c], [a, b]]))
    db.expire_all()
    laid_out = judged_task_view(db, db.get(Annotation, annotation.id))
    assert [r.id for r in laid_out.view.responses] == [c, min(a, b), max(a, b)]
    assert laid_out.tied == [max(a, b)]
    assert sorted(r.position for r in laid_out.view.responses) == [0, 1, 2]


def test_an_arena_judgement_keeps_its_sides_and_says_its_verdict(db):
    world = World(db)
    task = world.task(["left", "right"], kind="arena")
    user = world.user()
    left, right = world.shown(task)
    annotation = world.judge(task, user, [[1], [0]])
    laid_out = judged_task_view(db, annotation)
    assert [r.id for r in laid_out.view.responses] == [left, right] and laid_out.verdict == "2"
    revise_annotation(db, annotation.id, user.id, AnnotationIn(ranking=[[left, right]]))
    db.expire_all()
    assert judged_task_view(db, db.get(Annotation, annotation.id)).verdict == "tie"


def test_a_released_task_goes_to_someone_else(db):
    world = World(db)
    first = world.task(["one", "two"])
    second = world.task(["three", "four"])
    user, other = world.user(), world.user()
    assert next_task_id(db, user.id, 600) == first.id
    assert release_task(db, first.id, user.id) is True
    assert release_task(db, first.id, user.id) is False  # nothing held any more
    db.expire_all()
    assert db.get(Task, first.id).claimed_count == 0
    status = db.scalar(
        select(Assignment.status).where(Assignment.task_id == first.id, Assignment.user_id == user.id)
    )
    assert status == "released"
    assert next_task_id(db, user.id, 600) == second.id  # never the task they gave back

    # A judgement from a tab still showing it is taken like one on an expired assignment: while the
    # task has a free slot (the same on Postgres's function and SQLite's steps).
    shown = World(db).shown(first)
    result, created = submit_annotation(db, first.id, user.id, AnnotationIn(ranking=[[i] for i in shown]))
    assert created and result.status == "submitted"
    db.expire_all()
    assert db.get(Task, first.id).status == "done" and db.get(Task, first.id).claimed_count == 1
    assert next_task_id(db, other.id, 600) is None
