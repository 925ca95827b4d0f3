"""From the tables to the trainers' comparisons: whether each answer was cut off travels with it."""

from __future__ import annotations

from sqlalchemy import func, select

from app.data.models import Comparison, Response
from tests.world.builder import World
from workers.runs.comparisons import load_comparisons


def test_each_side_says_whether_its_answer_ended_or_was_cut_off(db):
    w = World(db)
    task = w.task(["A finished answer.", "An answer cut off at the", "Another finished one."])
    shown = w.shown(task)
    cut = db.get(Response, shown[1])
    cut.ended_with_eos = False
    db.commit()
    w.judge(task, w.user(), [[1], [0], [2]])  # the cut-off answer ranked first

    snapshot = db.scalar(select(func.max(Comparison.id)))
    loaded = load_comparisons(db, snapshot)
    assert len(loaded) == 3
    by_texts = {(c.chosen, c.rejected): c for c in loaded}
    top = by_texts[(cut.text, db.get(Response, shown[0]).text)]
    assert (top.chosen_ended, top.rejected_ended) == (False, True)
    rest = by_texts[(db.get(Response, shown[0]).text, db.get(Response, shown[2]).text)]
    assert (rest.chosen_ended, rest.rejected_ended) == (True, True)
