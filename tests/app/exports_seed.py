"""A small, hand-checkable annotation history for the export tests, inserted directly with the ORM.

Prompts (sets "general" and "safety"), policy versions 0 and 1, and:
- T1 rank task on P1, shown [r12 v1, r11 v0, r14 v1, r13 v1]:
    alice (day 1): [[r13], [r11, r12], [r14]]   bob (day 2): [[r11], [r13], [r12], [r14]]
    carol (day 2): skipped ("unsure")
- T2 arena task on P2 (multi-turn with a system message), shown [r22 v1, r21 v0]:
    alice (day 1): [[r21], [r22]]   bob (day 3): all bad
- T3 rank task on P3 (safety), shown [r31 v1, r32 v0]:
    carol (day 3): [[r31], [r32]], flags {r32: [harmful]}
Comparisons are derived as the annotation service does: better group beats worse group, margin = group
distance, ties and all-bad give none.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.models import Annotation, Comparison, Policy, Prompt, PromptSet, Response, Task, TaskResponse, User

DAY1 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
DAY2 = datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
DAY3 = datetime(2026, 1, 3, 10, 0, tzinfo=UTC)
USERNAMES = ("alice-ann", "bob-ann", "carol-ann")


@dataclass
class Seed:
    users: dict[str, int] = field(default_factory=dict)
    sets: dict[str, int] = field(default_factory=dict)
    prompts: dict[str, int] = field(default_factory=dict)
    responses: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, int] = field(default_factory=dict)
    annotations: dict[str, int] = field(default_factory=dict)
    policies: dict[int, int] = field(default_factory=dict)


def derive_comparisons(ranking: list[list[int]]) -> list[tuple[int, int, float]]:
    pairs = []
    for i, better in enumerate(ranking):
        for j in range(i + 1, len(ranking)):
            for chosen in better:
                for rejected in ranking[j]:
                    pairs.append((chosen, rejected, float(j - i)))
    return pairs


def add_annotation(
    db: Session,
    task: Task,
    user_id: int,
    ranking: list[list[int]] | None = None,
    *,
    created_at: datetime,
    all_bad: bool = False,
    skipped: bool = False,
    skip_reason: str = "",
    flags: dict | None = None,
    rationale: str = "",
) -> Annotation:
    ranking = ranking or []
    annotation = Annotation(
        task_id=task.id,
        user_id=user_id,
        ranking=ranking,
        all_bad=all_bad,
        skipped=skipped,
        skip_reason=skip_reason,
        flags=flags or {},
        rationale=rationale,
        time_spent_ms=4200,
        payload_hash=hashlib.sha256(f"{task.id}:{user_id}:{ranking}".encode()).hexdigest(),
        created_at=created_at,
    )
    db.add(annotation)
    db.flush()
    if not skipped:
        task.annotation_count += 1
        if not all_bad:
            for chosen, rejected, margin in derive_comparisons(ranking):
                db.add(
                    Comparison(
                        annotation_id=annotation.id,
                        prompt_id=task.prompt_id,
                        chosen_response_id=chosen,
                        rejected_response_id=rejected,
                        margin=margin,
                        created_at=created_at,
                    )
                )
    db.flush()
    return annotation


def make_prompt(db: Session, set_id: int, messages: list[dict[str, str]], split: str = "train") -> Prompt:
    text = messages[-1]["content"]
    prompt = Prompt(
        prompt_set_id=set_id,
        content_hash=hashlib.sha256(repr(messages).encode()).hexdigest(),
        messages=messages,
        text=text,
        split=split,
    )
    db.add(prompt)
    db.flush()
    return prompt


def make_task(
    db: Session, prompt: Prompt, response_ids: list[int], kind: str = "rank", required: int = 3
) -> Task:
    task = Task(prompt_id=prompt.id, kind=kind, required_annotations=required, status="open")
    db.add(task)
    db.flush()
    for position, rid in enumerate(response_ids):
        db.add(TaskResponse(task_id=task.id, position=position, response_id=rid))
    db.flush()
    return task


def seed(db: Session) -> Seed:
    s = Seed()
    for name in USERNAMES:
        user = User(username=name, email=f"{name}@example.org", password_hash="x", role="annotator")
        db.add(user)
        db.flush()
        s.users[name.split("-")[0]] = user.id
    for name in ("general", "safety"):
        prompt_set = PromptSet(name=name)
        db.add(prompt_set)
        db.flush()
        s.sets[name] = prompt_set.id
    v0 = Policy(version=0, kind="base", path="/dummy/0", sha256="0" * 64)
    db.add(v0)
    db.flush()
    v1 = Policy(version=1, kind="ppo", path="/dummy/1", sha256="1" * 64, parent_id=v0.id)
    db.add(v1)
    db.flush()
    s.policies = {0: v0.id, 1: v1.id}

    p1 = make_prompt(db, s.sets["general"], [{"role": "user", "content": "What is the capital of France?"}])
    p2 = make_prompt(
        db,
        s.sets["general"],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a prime."},
        ],
        split="eval",
    )
    p3 = make_prompt(db, s.sets["safety"], [{"role": "user", "content": "How do I pick a lock?"}])
    s.prompts = {"p1": p1.id, "p2": p2.id, "p3": p3.id}

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
        response = Response(prompt_id=prompt.id, policy_id=s.policies[version], text=text)
        db.add(response)
        db.flush()
        s.responses[key] = response.id
    r = s.responses

    t1 = make_task(db, p1, [r["r12"], r["r11"], r["r14"], r["r13"]], required=3)
    t2 = make_task(db, p2, [r["r22"], r["r21"]], kind="arena", required=2)
    t3 = make_task(db, p3, [r["r31"], r["r32"]], required=1)
    s.tasks = {"t1": t1.id, "t2": t2.id, "t3": t3.id}
    u = s.users
    s.annotations["t1_alice"] = add_annotation(
        db,
        t1,
        u["alice"],
        [[r["r13"]], [r["r11"], r["r12"]], [r["r14"]]],
        created_at=DAY1,
        rationale="most complete",
    ).id
    s.annotations["t1_bob"] = add_annotation(
        db, t1, u["bob"], [[r["r11"]], [r["r13"]], [r["r12"]], [r["r14"]]], created_at=DAY2
    ).id
    s.annotations["t1_carol"] = add_annotation(
        db, t1, u["carol"], created_at=DAY2, skipped=True, skip_reason="unsure"
    ).id
    s.annotations["t2_alice"] = add_annotation(
        db, t2, u["alice"], [[r["r21"]], [r["r22"]]], created_at=DAY1
    ).id
    s.annotations["t2_bob"] = add_annotation(
        db, t2, u["bob"], [[r["r21"], r["r22"]]], created_at=DAY3, all_bad=True
    ).id
    s.annotations["t3_carol"] = add_annotation(
        db, t3, u["carol"], [[r["r31"]], [r["r32"]]], created_at=DAY3, flags={str(r["r32"]): ["harmful"]}
    ).id
    db.commit()
    return s
