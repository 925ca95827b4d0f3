"""Gold tasks: accuracy, flags, exclusion from training data and exports, round records, assignment hook."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from app.data.models import Annotation, Assignment, Comparison, Round, RoundAnnotation, utcnow
from app.services.quality.gold import (
    GoldError,
    choose_gold,
    excluded_annotator_ids,
    flagged_annotator_ids,
    gold_accuracy,
    gold_candidates,
    gold_tasks,
    is_gold_correct,
    mark_gold,
    record_round_annotations,
    record_usable_annotations,
    round_annotation_ids,
    unmark_gold,
    usable_annotation_clause,
    usable_comparisons_query,
)
from tests.world import World, gold_annotators


def test_gold_answer_is_correct_when_the_top_group_holds_the_gold_response():
    assert is_gold_correct([[5], [6], [7]], False, 5)
    assert is_gold_correct([[6, 5], [7]], False, 5)  # tied for first still names it best
    assert not is_gold_correct([[6], [5], [7]], False, 5)
    assert not is_gold_correct([[5], [6]], True, 5)  # "all bad" denies the known best response
    assert not is_gold_correct([], False, 5)


def test_gold_accuracy_and_flags(db, settings):
    good, sloppy, newbie = gold_annotators(World(db), settings)
    rows = {g.username: g for g in gold_accuracy(db, settings)}
    assert (rows["good"].answered, rows["good"].correct, rows["good"].flagged) == (5, 4, False)
    assert (rows["sloppy"].answered, rows["sloppy"].correct, rows["sloppy"].skipped) == (5, 1, 1)
    assert rows["sloppy"].flagged  # 20% < 60% after 5 answers
    assert rows["good"].accuracy.value == pytest.approx(0.8)
    assert rows["good"].accuracy.low < 0.8 < rows["good"].accuracy.high
    assert (rows["newbie"].answered, rows["newbie"].correct, rows["newbie"].flagged) == (2, 0, False)
    assert flagged_annotator_ids(db, settings) == {sloppy.id}

    stricter = settings.model_copy(update={"gold_min_answers": 2})
    assert flagged_annotator_ids(db, stricter) == {sloppy.id, newbie.id}


def test_flagged_annotators_comparisons_leave_training_data_and_exports(db, settings):
    w = World(db)
    good, sloppy, newbie = gold_annotators(w, settings)
    # ordinary (non-gold) work by both, which is what training reads
    for _ in range(3):
        task = w.task(3, required=2)
        w.judge(task, good, [[0], [1], [2]])
        w.judge(task, sloppy, [[2], [1], [0]])

    def users_of(query):
        return {a.user_id for a in db.scalars(query)}

    all_users = {
        uid
        for (uid,) in db.execute(
            select(Annotation.user_id).join(Comparison, Comparison.annotation_id == Annotation.id).distinct()
        )
    }
    assert sloppy.id in all_users

    assert excluded_annotator_ids(db, settings) == {sloppy.id}
    kept = db.scalars(usable_comparisons_query(db, settings)).all()
    kept_users = {db.get(Annotation, c.annotation_id).user_id for c in kept}
    assert sloppy.id not in kept_users and good.id in kept_users
    total = db.scalar(select(func.count()).select_from(Comparison))
    sloppy_count = db.scalar(
        select(func.count()).select_from(Comparison).join(Annotation).where(Annotation.user_id == sloppy.id)
    )
    assert len(kept) == total - sloppy_count > 0

    # the clause on Annotation serves queries over raw rankings (exports of per-annotator rankings)
    assert sloppy.id not in users_of(select(Annotation).where(usable_annotation_clause(db, settings)))

    # the setting switches exclusion off: every comparison is usable again
    lenient = settings.model_copy(update={"exclude_flagged_annotators": False})
    assert excluded_annotator_ids(db, lenient) == set()
    assert len(db.scalars(usable_comparisons_query(db, lenient)).all()) == total

    # a snapshot bound keeps later comparisons out
    first_id = min(c.id for c in kept)
    assert [
        c.id for c in db.scalars(usable_comparisons_query(db, settings, up_to_comparison_id=first_id))
    ] == [first_id]


def test_rounds_record_the_annotations_they_used(db, settings):
    good, sloppy, newbie = gold_annotators(World(db), settings)
    first = Round(algorithm="ppo", status="running")
    db.add(first)
    db.flush()
    first.status, first.active = "succeeded", None  # one active round at a time
    db.flush()
    second = Round(algorithm="dpo", status="running")
    db.add(second)
    db.flush()

    ids = [a.id for a in db.scalars(select(Annotation).where(Annotation.user_id == good.id))]
    assert record_round_annotations(db, first.id, ids) == len(ids)
    assert record_round_annotations(db, first.id, ids[:2]) == 0  # a retry records nothing twice
    db.commit()
    assert round_annotation_ids(db, first.id) == sorted(ids)

    recorded = record_usable_annotations(db, second.id, settings=settings)
    db.commit()
    used = set(round_annotation_ids(db, second.id))
    assert recorded == len(used) > 0
    expected = {c.annotation_id for c in db.scalars(usable_comparisons_query(db, settings))}
    assert used == expected
    assert not any(db.get(Annotation, a).user_id == sloppy.id for a in used)
    assert record_usable_annotations(db, second.id, settings=settings) == 0
    assert db.scalar(select(func.count()).select_from(RoundAnnotation)) == len(ids) + len(used)


def test_mark_gold_opens_the_task_and_shows_the_gold_response_last(db, settings):
    w = World(db)
    task = w.task(4, required=1)
    order = w.shown(task)
    mark_gold(db, task.id, order[1], settings)
    db.commit()
    db.refresh(task)
    assert task.is_gold and task.gold_response_id == order[1]
    assert task.required_annotations == settings.gold_max_annotations and task.status == "open"
    # rotated, not shuffled: the cyclic order is kept and the gold response comes last
    assert w.shown(task) == [order[2], order[3], order[0], order[1]]

    with pytest.raises(GoldError, match="not one of task"):
        mark_gold(db, task.id, 999_999, settings)
    with pytest.raises(GoldError, match="does not exist"):
        mark_gold(db, 999_999, order[0], settings)
    db.rollback()

    unmark_gold(db, task.id, settings)
    db.commit()
    db.refresh(task)
    assert not task.is_gold and task.gold_response_id is None
    assert task.required_annotations == settings.task_overlap
    assert [row.task_id for row in gold_tasks(db)] == []


def test_choose_gold_hands_each_annotator_each_gold_task_once(db, settings):
    w = World(db)
    ann, bob = w.user("ann"), w.user("bob")
    plain = w.task(3)
    gold = w.task(3)
    mark_gold(db, gold.id, w.shown(gold)[0], settings)
    db.commit()

    assert choose_gold(db, ann.id, 0.0, random.Random(0)) is None
    chosen = choose_gold(db, ann.id, 1.0, random.Random(0))
    assert chosen is not None and chosen.id == gold.id and chosen.id != plain.id

    # once assigned to ann, it is never offered to her again, but still to bob
    db.add(Assignment(task_id=gold.id, user_id=ann.id, expires_at=utcnow()))
    db.commit()
    assert choose_gold(db, ann.id, 1.0, random.Random(0)) is None
    assert choose_gold(db, bob.id, 1.0, random.Random(0)).id == gold.id

    # the share is a probability per call
    rng = random.Random(42)
    hits = sum(choose_gold(db, bob.id, 0.25, rng) is not None for _ in range(2000))
    assert 0.2 < hits / 2000 < 0.3


def test_gold_candidates_are_tasks_with_a_unanimous_single_winner(db, settings):
    w = World(db)
    users = [w.user() for _ in range(3)]
    clear, split = w.task(3, required=3), w.task(3, required=3)
    arena = w.task(2, kind="arena", versions=[0, 1], required=3)
    for u in users:
        w.judge(clear, u, [[2], [0, 1]])
        w.judge(arena, u, [[1], [0]])  # arena tasks measure policies, not annotators: never suggested
    w.judge(split, users[0], [[0], [1], [2]])
    w.judge(split, users[1], [[0], [1], [2]])
    w.judge(split, users[2], [[1], [0], [2]])
    found = gold_candidates(db)
    assert [(c.task_id, c.response_id, c.annotators) for c in found] == [(clear.id, w.shown(clear)[2], 3)]
    mark_gold(db, clear.id, w.shown(clear)[2], settings)
    db.commit()
    assert gold_candidates(db) == []
    assert [(g.task_id, g.answered, g.correct) for g in gold_tasks(db)] == [(clear.id, 3, 3)]


def test_exclusion_reaches_the_training_loader_and_the_exports(db, settings, monkeypatch):
    from app.config import reset_settings
    from app.services.exports.exporter import iter_rows
    from app.services.exports.spec import ExportSpec
    from workers.runs.comparisons import load_comparisons

    w = World(db)
    good, sloppy, newbie = gold_annotators(w, settings)
    for _ in range(3):
        task = w.task(3, required=2)
        w.judge(task, good, [[0], [1], [2]])
        w.judge(task, sloppy, [[2], [1], [0]])

    def trained_users() -> set[int]:
        snapshot = db.scalar(select(func.max(Comparison.id)))
        return {db.get(Annotation, c.group_id).user_id for c in load_comparisons(db, snapshot)}

    def exported_users() -> set[int]:
        spec = ExportSpec(format="pairwise", split_mode="none")
        return {meta.user_id for _, _, meta in iter_rows(db, spec, pseudonym_key=settings.pseudonym_key)}

    assert good.id in trained_users() and sloppy.id not in trained_users()
    assert good.id in exported_users() and sloppy.id not in exported_users()

    monkeypatch.setenv("PREFLOOP_EXCLUDE_FLAGGED_ANNOTATORS", "false")
    reset_settings()
    assert sloppy.id in trained_users() and sloppy.id in exported_users()
