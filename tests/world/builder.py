"""The world builder: test data made by the services that make it in production.

Prompt sets come from `create_prompt_set`, policy versions from `publish_policy`, tasks from the task
pool's `create_rank_task` / `create_arena_task`, and judgements from the annotation pool: an annotator
asks `next_task` for work and `submit_annotation` stores what they decide, so comparisons, margins,
counters and skip accounting are exactly what the service writes. Two things have no service and are
written here: response texts (in production only a model's samples become responses) and, when asked
for, the date of a judgement (the service stamps the current time).

The pool hands each annotator the oldest task of a kind with a free slot that they have not seen, so a
world is judged in that order: a judgement the pool would not have offered raises `PoolOrderError`.
Give earlier tasks fewer slots (`required`) or have the annotator judge them first.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.data.models import (
    Annotation,
    Comparison,
    Policy,
    Prompt,
    Response,
    Task,
    TaskResponse,
    User,
)
from app.services.accounts import create_user
from app.services.assignment import TaskView
from app.services.prompt_sets import create_prompt_set, split_for
from app.services.prompt_uploads import content_hash, normalise_messages
from app.services.registry import policy_by_version, publish_policy
from app.services.schemas import AnnotationIn
from app.services.tasks_pool import create_arena_task, create_rank_task
from tests.annotating import next_task, submit_annotation

PASSWORD = "world-password-1"
CLAIM_SECONDS = 600
MAX_SPLIT_SEEDS = 100_000
PromptSpec = str | list[dict[str, str]]  # one user turn, or a whole conversation
_serial = itertools.count(1)


class PoolOrderError(AssertionError):
    """A world asked for a judgement the task pool would not have offered to that annotator."""


class _AsGiven(random.Random):
    """Randomness for task creation that shows responses in the order given (positions are then known)."""

    def shuffle(self, x: list) -> None:  # type: ignore[override]
        return None


class _DrawsGold(random.Random):
    """Randomness for assignment that draws a gold task and, among those left, the wanted one."""

    def __init__(self, wanted: int):
        super().__init__(0)
        self.wanted = wanted

    def random(self) -> float:
        return 0.0

    def choice(self, seq: Sequence):  # type: ignore[override]
        return self.wanted if self.wanted in seq else super().choice(seq)


def _unique(stem: str) -> str:
    """A default name no other world in this process uses, so a test names only what it asserts on."""
    return f"{stem}-{next(_serial)}"


class World:
    """Builds users, policies, prompt sets, tasks and judgements in one database session."""

    def __init__(self, db: Session, settings: Settings | None = None):
        self.db = db
        self.settings = settings

    # ------------------------------------------------------------ people and policies

    def user(self, name: str | None = None, role: str = "annotator", email: str | None = None) -> User:
        """An account that can log in with PASSWORD."""
        user = create_user(self.db, name or _unique(role), role, PASSWORD, email)
        self.db.commit()
        return user

    def policy(self, version: int, kind: str | None = None) -> Policy:
        """Policy `version`, publishing the versions up to it first: v0 is the base, each later one a
        child of the one before (kind 'ppo' unless given)."""
        existing = policy_by_version(self.db, version)
        if existing is not None:
            return existing
        parent = self.policy(version - 1) if version > 0 else None
        made = publish_policy(
            self.db,
            lambda folder: _write_note(folder, f"test policy v{version}"),
            kind=kind or ("base" if version == 0 else "ppo"),
            parent=parent,
            settings=self.settings,
        )
        if made.version != version:
            raise AssertionError(f"the registry numbered the policy v{made.version}, not v{version}")
        return made

    # ------------------------------------------------------------ prompts

    def prompt_set(
        self, name: str | None, prompts: Sequence[PromptSpec], held_out: Collection[int] = ()
    ) -> list[Prompt]:
        """An uploaded prompt set; returns its prompts in the order given.

        `held_out` are indexes of prompts that must land in the eval split: the set's split seed is
        chosen so that the content-hash split puts exactly those there.
        """
        conversations = [_conversation(p) for p in prompts]
        hashes = [content_hash(normalise_messages(c)) for c in conversations]
        fraction, seed = _split_for_held_out(hashes, set(held_out))
        lines = [json.dumps({"messages": c}, ensure_ascii=False) for c in conversations]
        report = create_prompt_set(
            self.db,
            name=name or _unique("prompt set"),
            data="\n".join(lines).encode(),
            filename="prompts.jsonl",
            eval_fraction=fraction,
            split_seed=seed,
        )
        by_hash = {
            p.content_hash: p
            for p in self.db.scalars(select(Prompt).where(Prompt.prompt_set_id == report.prompt_set.id))
        }
        return [by_hash[h] for h in hashes]

    # ------------------------------------------------------------ tasks

    def responses(
        self, prompt: Prompt, texts: Sequence[str], versions: Sequence[int | None] | None = None
    ) -> list[int]:
        """Response texts to a prompt, standing in for a model's samples; `versions` gives each one's
        policy version (published on first use). Returns their ids in the order given."""
        versions = list(versions) if versions is not None else [None] * len(texts)
        rows = [
            Response(
                prompt_id=prompt.id,
                policy_id=None if version is None else self.policy(version).id,
                text=text,
                sampling={},
            )
            for text, version in zip(texts, versions, strict=True)
        ]
        self.db.add_all(rows)
        self.db.flush()
        return [r.id for r in rows]

    def task(
        self,
        responses: int | Sequence[str] = 3,
        *,
        prompt: Prompt | str | None = None,
        kind: str = "rank",
        versions: Sequence[int] | None = None,
        required: int = 1,
    ) -> Task:
        """A task showing new responses in the order given (position 0 first).

        `responses` are texts, or a count of made-up ones; `versions` gives each response's policy
        version; a prompt given as text (or none) gets a prompt set of its own.
        """
        if not isinstance(prompt, Prompt):
            (prompt,) = self.prompt_set(None, [prompt or _unique("prompt")])
        if isinstance(responses, int):
            responses = [f"response {i} of {prompt.text}" for i in range(responses)]
        return self.task_showing(self.responses(prompt, responses, versions), kind=kind, required=required)

    def task_showing(self, response_ids: Sequence[int], *, kind: str = "rank", required: int = 1) -> Task:
        """A task showing these responses (to one prompt) in the order given."""
        prompt_id = self.db.get(Response, response_ids[0]).prompt_id
        task = self._task(prompt_id, list(response_ids), kind, required, _AsGiven())
        self.db.commit()
        return task

    def tasks_from_texts(
        self,
        items: Iterable[tuple[str, Sequence[str]]],
        *,
        required: int = 1,
        kind: str = "rank",
        prompt_set: str | None = None,
        policy: Policy | None = None,
        seed: int = 0,
    ) -> list[int]:
        """Tasks from (prompt, response texts) pairs, as a generation run would make them from samples:
        one prompt set for all, responses shown in an order shuffled with `seed`. Returns the task ids."""
        items = list(items)
        prompts = self.prompt_set(prompt_set, list(dict.fromkeys(text for text, _ in items)))
        by_text = {p.text: p for p in prompts}
        rng = random.Random(seed)
        task_ids = []
        for text, responses in items:
            prompt = by_text[text.strip()]
            ids = self.responses(prompt, responses, [policy.version if policy else None] * len(responses))
            task_ids.append(self._task(prompt.id, ids, kind, required, rng).id)
        self.db.commit()
        return task_ids

    def shown(self, task: Task | int) -> list[int]:
        """The task's response ids in the order annotators see them now."""
        task_id = task if isinstance(task, int) else task.id
        return list(
            self.db.scalars(
                select(TaskResponse.response_id)
                .where(TaskResponse.task_id == task_id)
                .order_by(TaskResponse.position)
            )
        )

    def _task(self, prompt_id: int, ids: list[int], kind: str, required: int, rng: random.Random) -> Task:
        if kind == "arena":
            if len(ids) != 2:
                raise ValueError("an arena task shows exactly two responses")
            return create_arena_task(self.db, prompt_id, ids[0], ids[1], required, rng)
        return create_rank_task(self.db, prompt_id, ids, required, rng)

    # ------------------------------------------------------------ judgements

    def judge(
        self,
        task: Task,
        user: User,
        positions: Sequence[Sequence[int]] = (),
        *,
        all_bad: bool = False,
        flags: dict[int, list[str]] | None = None,
        rationale: str = "",
        time_ms: int = 5000,
        at: datetime | None = None,
    ) -> Annotation:
        """`user` takes `task` from the pool and ranks it: `positions` are tie groups of shown positions
        (0 = shown first), best first; `flags` names flags per shown position. `at` dates the judgement."""
        view = self._claim(task, user)
        shown = [r.id for r in view.responses]
        payload = AnnotationIn(
            ranking=[[shown[p] for p in group] for group in positions],
            all_bad=all_bad,
            flags={shown[p]: names for p, names in (flags or {}).items()},
            rationale=rationale,
            time_spent_ms=time_ms,
        )
        return self._submit(task, user, payload, at)

    def skip(
        self,
        task: Task,
        user: User,
        reason: str = "cannot judge",
        *,
        time_ms: int = 5000,
        at: datetime | None = None,
    ) -> Annotation:
        """`user` takes `task` from the pool and skips it, giving the slot back."""
        self._claim(task, user)
        payload = AnnotationIn(skip=True, skip_reason=reason, time_spent_ms=time_ms)
        return self._submit(task, user, payload, at)

    def _claim(self, task: Task, user: User) -> TaskView:
        """Ask the pool for the user's next task (a gold draw for a gold task) and check it is this one."""
        self.db.refresh(task)
        task_id, kind, gold, user_id, username = task.id, task.kind, task.is_gold, user.id, user.username
        self.db.commit()  # the pool's statements run on connections of their own
        view = next_task(
            self.db,
            user_id,
            CLAIM_SECONDS,
            kinds=[kind],
            gold_share=1.0 if gold else 0.0,
            rng=_DrawsGold(task_id),
        )
        if view is None or view.id != task_id:
            offered = "nothing" if view is None else f"task {view.id}"
            raise PoolOrderError(
                f"the pool offers {username} {offered}, not task {task_id}: let them judge earlier "
                "tasks first, or give those tasks fewer slots (required)"
            )
        return view

    def _submit(self, task: Task, user: User, payload: AnnotationIn, at: datetime | None) -> Annotation:
        """Store the judgement with the service (then date it, when asked) and return its row."""
        task_id, user_id = task.id, user.id  # read before the service's own connections write
        self.db.commit()
        result, created = submit_annotation(self.db, task_id, user_id, payload)
        if not created:
            raise AssertionError(f"user {user_id} had judged task {task_id} already")
        annotation_id = result.annotation_id
        if at is not None:
            self.db.execute(update(Annotation).where(Annotation.id == annotation_id).values(created_at=at))
            self.db.execute(
                update(Comparison).where(Comparison.annotation_id == annotation_id).values(created_at=at)
            )
        self.db.commit()
        self.db.refresh(task)
        return self.db.get(Annotation, annotation_id)


def _conversation(prompt: PromptSpec) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _write_note(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text + "\n")


def _split_for_held_out(hashes: Sequence[str], held_out: set[int]) -> tuple[float, int]:
    """(eval fraction, split seed) that put exactly the `held_out` prompts in the eval split."""
    if not held_out:
        return 0.0, 0
    fraction = min(max(len(held_out) / len(hashes), 0.05), 0.95)  # the likeliest fraction to succeed
    wanted = ["eval" if i in held_out else "train" for i in range(len(hashes))]
    for seed in range(MAX_SPLIT_SEEDS):
        if all(split_for(h, seed, fraction) == w for h, w in zip(hashes, wanted, strict=True)):
            return fraction, seed
    raise AssertionError(
        f"no split seed below {MAX_SPLIT_SEEDS} holds out exactly prompts {sorted(held_out)}"
    )
