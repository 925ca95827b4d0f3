"""The task overlap set from the console: stored, used for new tasks, the environment's as default."""

from __future__ import annotations

import pytest

from app.data.models import Run
from app.services.pool_settings import PoolSettingError, save_task_overlap, saved_task_overlap, task_overlap
from app.services.quality.gold import gold_choices, mark_gold, unmark_gold
from app.services.tasks_pool import request_refill
from tests.world import World


def test_the_saved_overlap_replaces_the_default_until_reset(db, settings):
    settings.task_overlap = 2
    assert task_overlap(db, settings) == 2 and saved_task_overlap(db) is None
    save_task_overlap(db, 4)
    assert task_overlap(db, settings) == 4 and saved_task_overlap(db) == 4
    save_task_overlap(db, None)
    assert task_overlap(db, settings) == 2 and saved_task_overlap(db) is None


@pytest.mark.parametrize("value", [0, -1, 21])
def test_an_overlap_out_of_range_is_refused_with_the_range(db, value):
    with pytest.raises(PoolSettingError, match="from 1 to 20"):
        save_task_overlap(db, value)


def test_new_generation_runs_and_unmarked_gold_tasks_use_the_saved_overlap(db, settings):
    world = World(db, settings)
    world.policy(0)
    world.prompt_set("refill", ["a prompt to answer"])
    save_task_overlap(db, 3)
    run_id = request_refill(db, policy_version=0, settings=settings, enqueue=False)
    assert db.get(Run, run_id).config["required_annotations"] == 3

    task = world.task(3)
    mark_gold(db, task.id, world.shown(task)[0], settings)
    unmark_gold(db, task.id, settings)
    assert task.required_annotations == 3


def test_gold_choices_list_ordinary_tasks_and_search_their_prompts(db):
    world = World(db)
    tides = world.task(2, prompt="How do TIDES work? 100% sure")
    eggs = world.task(2, prompt="Boil an egg")
    gold = world.task(2, prompt="tides again")
    mark_gold(db, gold.id, world.shown(gold)[0])
    db.commit()
    assert [c.task_id for c in gold_choices(db)][:2] == [eggs.id, tides.id]
    assert [c.task_id for c in gold_choices(db, "tides")] == [tides.id]
    assert [c.task_id for c in gold_choices(db, "100%")] == [tides.id]  # % is text, not a wildcard
    assert gold_choices(db, "_") == []


def test_the_refill_leaves_paused_prompt_sets_alone(db, settings):
    from app.services.pool_settings import paused_prompt_sets, set_prompt_set_in_refill
    from app.services.tasks_pool import choose_prompts

    world = World(db, settings)
    policy = world.policy(0)
    kept = world.prompt_set("kept", [f"kept {i}" for i in range(3)])
    paused = world.prompt_set("paused", [f"paused {i}" for i in range(3)])
    set_prompt_set_in_refill(db, paused[0].prompt_set_id, included=False)
    assert paused_prompt_sets(db) == {paused[0].prompt_set_id}
    assert set(choose_prompts(db, 10, policy.id)) == {p.id for p in kept}
    # Asked for by name, a paused set still answers (the console's "Generate tasks").
    assert set(choose_prompts(db, 10, policy.id, paused[0].prompt_set_id)) == {p.id for p in paused}
    set_prompt_set_in_refill(db, paused[0].prompt_set_id, included=True)
    assert len(choose_prompts(db, 10, policy.id)) == 6
