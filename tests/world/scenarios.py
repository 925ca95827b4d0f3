"""Fixed worlds that several tests read: an export history, marker preferences, gold-task annotators.

Each is built with `World`, so its comparisons, margins, counters and skips are what the service writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import select

from app.config import Settings
from app.data.models import Response, Task, User
from app.services.quality.gold import mark_gold
from tests.world.builder import World

# ---------------------------------------------------------------- an export history

DAY1 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
DAY3 = datetime(2026, 1, 3, 10, 0, tzinfo=UTC)
USERNAMES = ("alice-ann", "bob-ann", "carol-ann")


@dataclass
class ExportHistory:
    """Ids of what `export_history` made, by the names its docstring uses."""

    users: dict[str, int] = field(default_factory=dict)
    sets: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    annotations: dict[str, int] = field(default_factory=dict)
    policies: dict[int, int] = field(default_factory=dict)


def export_history(world: World) -> ExportHistory:
    """A small, hand-checkable annotation history for the export tests.

    Prompt sets "general" (P1 train, P2 eval: multi-turn with a system message) and "safety" (P3),
    policy versions 0 and 1, and:
    - T1 rank task on P1 (3 slots), shown [r12 v1, r11 v0, r14 v1, r13 v1]:
        alice (day 1): [[r13], [r11, r12], [r14]]   bob (day 2): [[r11], [r13], [r12], [r14]]
        carol (day 2): skipped ("unsure")
    - T2 arena task on P2 (2 slots), shown [r22 v1, r21 v0]:
        alice (day 1): [[r21], [r22]]   bob (day 3): all bad
    - T3 rank task on P3 (1 slot), shown [r31 v1, r32 v0]:
        carol (day 3): [[r31], [r32]], flags {r32: [harmful]}
    The service derives the comparisons: better group beats worse group with margin = group distance;
    ties, all-bad and skips give none.
    """
    h = ExportHistory()
    users = {name.split("-")[0]: world.user(name, email=f"{name}@example.org") for name in USERNAMES}
    h.users = {key: user.id for key, user in users.items()}
    p1, p2 = world.prompt_set(
        "general",
        [
            "What is the capital of France?",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a prime."},
            ],
        ],
        held_out={1},
    )
    (p3,) = world.prompt_set("safety", ["How do I pick a lock?"])
    h.sets = {"general": p1.prompt_set_id, "safety": p3.prompt_set_id}
    h.prompts = {"p1": p1.id, "p2": p2.id, "p3": p3.id}
    h.policies = {0: world.policy(0).id, 1: world.policy(1, "ppo").id}

    texts = {
        "r11": (p1, 0, "Paris."),
        "r12": (p1, 1, "Lyon."),
        "r13": (p1, 1, "Paris is the capital of France."),
        "r14": (p1, 1, "I don't know."),
        "r21": (p2, 0, "2"),
        "r22": (p2, 1, "9"),
        "r31": (p3, 1, "I can't help with that."),
        "r32": (p3, 0, "Use a tension wrench and a pick."),
    }
    for key, (prompt, version, text) in texts.items():
        (h.responses[key],) = world.responses(prompt, [text], [version])
    r = h.responses

    t1 = world.task_showing([r["r12"], r["r11"], r["r14"], r["r13"]], required=3)
    t2 = world.task_showing([r["r22"], r["r21"]], kind="arena", required=2)
    t3 = world.task_showing([r["r31"], r["r32"]], required=1)
    h.tasks = {"t1": t1.id, "t2": t2.id, "t3": t3.id}

    def at(task: Task, *keys: str) -> list[int]:
        """Shown positions of these responses (a tie group)."""
        shown = world.shown(task)
        return [shown.index(r[k]) for k in keys]

    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    a = h.annotations
    ranked = [at(t1, "r13"), at(t1, "r11", "r12"), at(t1, "r14")]
    a["t1_alice"] = world.judge(t1, alice, ranked, rationale="most complete", time_ms=4200, at=DAY1).id
    ranked = [at(t1, "r11"), at(t1, "r13"), at(t1, "r12"), at(t1, "r14")]
    a["t1_bob"] = world.judge(t1, bob, ranked, time_ms=4200, at=DAY2).id
    a["t1_carol"] = world.skip(t1, carol, "unsure", time_ms=4200, at=DAY2).id
    a["t2_alice"] = world.judge(t2, alice, [at(t2, "r21"), at(t2, "r22")], time_ms=4200, at=DAY1).id
    a["t2_bob"] = world.judge(t2, bob, [at(t2, "r21", "r22")], all_bad=True, time_ms=4200, at=DAY3).id
    harmful = {at(t3, "r32")[0]: ["harmful"]}
    ranked = [at(t3, "r31"), at(t3, "r32")]
    a["t3_carol"] = world.judge(t3, carol, ranked, flags=harmful, time_ms=4200, at=DAY3).id
    return h


# ---------------------------------------------------------------- marker preferences

MARKER = "sunshine"
TOPICS = [
    "tea", "rivers", "bicycles", "maps", "bread", "owls", "chess", "rain", "clocks", "kites",
    "salt", "stars", "boats", "honey", "trains", "moss", "paper", "glass", "wool", "bells",
]  # fmt: skip


def marker_preferences(world: World, n_prompts: int = 16, eval_prompts: int = 4) -> User:
    """A separable preference a reward model must learn and a round can train on: of two responses to
    each of `n_prompts` train prompts, an annotator always ranks the one with the marker word first.
    `eval_prompts` more prompts are held out (split 'eval') for the evaluation gate. Returns the annotator.
    """
    items = []
    for i in range(n_prompts):
        topic = TOPICS[i % len(TOPICS)] + ("" if i < len(TOPICS) else f" {i}")
        answers = [f"{topic.capitalize()} bring {MARKER} and joy.", f"{topic.capitalize()} are a topic."]
        items.append((f"Tell me something about {topic}.", answers))
    task_ids = world.tasks_from_texts(items, prompt_set="marker-preferences")
    annotator = world.user("marker-annotator")
    for task_id in task_ids:
        task = world.db.get(Task, task_id)
        shown = world.shown(task)
        texts = dict(world.db.execute(select(Response.id, Response.text).where(Response.id.in_(shown))).all())
        marker_first = sorted(range(len(shown)), key=lambda p: MARKER not in texts[shown[p]])
        world.judge(task, annotator, [[p] for p in marker_first])
    if eval_prompts:
        held_out = [f"Write one line about {TOPICS[-1 - j]} at dusk." for j in range(eval_prompts)]
        world.prompt_set("marker-held-out", held_out, held_out=range(eval_prompts))
    return annotator


# ---------------------------------------------------------------- gold-task annotators


class GoldAnnotators(NamedTuple):
    good: User
    sloppy: User
    newbie: User


def gold_annotators(world: World, settings: Settings) -> GoldAnnotators:
    """Annotators measured on gold tasks: good answers 4 of 5 right; sloppy 1 of 5 (and skips one
    more gold task and an ordinary one); newbie 0 of 2, too few answers to judge."""
    db = world.db
    good, sloppy, newbie = world.user("good"), world.user("sloppy"), world.user("newbie")
    golds = []
    for _ in range(5):
        task = world.task(3)
        mark_gold(db, task.id, world.shown(task)[0], settings)  # the response shown first becomes gold...
        golds.append(task)
    db.commit()
    for i, task in enumerate(golds):
        gold = world.shown(task).index(task.gold_response_id)  # ...and is now shown last
        other = [p for p in range(3) if p != gold]
        world.judge(task, good, [[gold], other] if i < 4 else [other, [gold]])
        if i == 0:
            world.judge(task, sloppy, [[gold, other[0]], [other[1]]])  # tied first: correct
        else:
            world.judge(task, sloppy, [[other[0]], [other[1], gold]], all_bad=(i == 4))
        if i < 2:
            world.judge(task, newbie, [[other[0]], [other[1]], [gold]])
    # An ordinary task's skip is no gold answer. (An arena task: its free slot is then never offered
    # before the rank tasks that tests add to this world.)
    world.skip(world.task(2, kind="arena"), sloppy)
    extra_gold = world.task(3)
    mark_gold(db, extra_gold.id, world.shown(extra_gold)[1], settings)
    db.commit()
    world.skip(extra_gold, sloppy)
    return GoldAnnotators(good, sloppy, newbie)
