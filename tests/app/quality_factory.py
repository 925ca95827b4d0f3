"""Rows for the quality tests, inserted directly with the ORM (no annotation flow needed)."""

from __future__ import annotations

import hashlib
import itertools
from datetime import datetime

from sqlalchemy.orm import Session

from app.models import (
    Annotation,
    Comparison,
    Policy,
    Prompt,
    PromptSet,
    Response,
    Task,
    TaskResponse,
    User,
)

_counter = itertools.count()


class QualityFactory:
    def __init__(self, db: Session) -> None:
        self.db = db
        self._default_set: PromptSet | None = None
        self._policies: dict[int, Policy] = {}

    def user(self, name: str | None = None, role: str = "annotator") -> User:
        user = User(username=name or f"u{next(_counter)}", role=role, password_hash="x")
        self.db.add(user)
        self.db.flush()
        return user

    def prompt_set(self, name: str | None = None) -> PromptSet:
        ps = PromptSet(name=name or f"set-{next(_counter)}")
        self.db.add(ps)
        self.db.flush()
        return ps

    def policy(self, version: int, kind: str = "ppo") -> Policy:
        if version not in self._policies:
            policy = Policy(version=version, kind=kind, path=f"/nowhere/{version}", sha256="0" * 64)
            self.db.add(policy)
            self.db.flush()
            self._policies[version] = policy
        return self._policies[version]

    def task(
        self,
        n_responses: int = 3,
        *,
        kind: str = "rank",
        prompt_set: PromptSet | None = None,
        versions: list[int] | None = None,
        required: int = 50,
        prompt_text: str | None = None,
        texts: list[str] | None = None,
    ) -> Task:
        """A task with n responses shown in creation order; `versions` gives each response's policy."""
        if prompt_set is None:
            self._default_set = self._default_set or self.prompt_set()
            prompt_set = self._default_set
        text = prompt_text or f"prompt {next(_counter)}"
        prompt = Prompt(
            prompt_set_id=prompt_set.id,
            content_hash=hashlib.sha256(text.encode()).hexdigest(),
            messages=[{"role": "user", "content": text}],
            text=text,
        )
        self.db.add(prompt)
        self.db.flush()
        versions = versions or [0] * n_responses
        task = Task(prompt_id=prompt.id, kind=kind, required_annotations=required)
        self.db.add(task)
        self.db.flush()
        for position, version in enumerate(versions):
            body = texts[position] if texts else f"response {position} of {text}"
            response = Response(prompt_id=prompt.id, policy_id=self.policy(version).id, text=body)
            self.db.add(response)
            self.db.flush()
            self.db.add(TaskResponse(task_id=task.id, position=position, response_id=response.id))
        self.db.flush()
        self.db.refresh(task)
        return task

    def ids(self, task: Task) -> list[int]:
        return [item.response_id for item in sorted(task.items, key=lambda i: i.position)]

    def annotate(
        self,
        task: Task,
        user: User,
        groups: list[list[int]] | None = None,
        *,
        all_bad: bool = False,
        skipped: bool = False,
        time_ms: int = 5000,
        unchanged: bool = False,
        flags: dict | None = None,
        created_at: datetime | None = None,
    ) -> Annotation:
        """`groups` are tie groups of positions (0 = first shown), best first; comparisons derive from them."""
        ids = self.ids(task)
        ranking = [] if skipped else [[ids[p] for p in group] for group in (groups or [])]
        annotation = Annotation(
            task_id=task.id,
            user_id=user.id,
            ranking=ranking,
            all_bad=all_bad,
            skipped=skipped,
            flags=flags or {},
            time_spent_ms=time_ms,
            shown_order_unchanged=unchanged,
            payload_hash=hashlib.sha256(f"{task.id}-{user.id}".encode()).hexdigest(),
        )
        if created_at is not None:
            annotation.created_at = created_at
        self.db.add(annotation)
        task.annotation_count += 1
        task.claimed_count += 1
        self.db.flush()
        if not (skipped or all_bad):
            for hi, better in enumerate(ranking):
                for worse in ranking[hi + 1 :]:
                    for chosen in better:
                        for rejected in worse:
                            self.db.add(
                                Comparison(
                                    annotation_id=annotation.id,
                                    prompt_id=task.prompt_id,
                                    chosen_response_id=chosen,
                                    rejected_response_id=rejected,
                                )
                            )
        self.db.flush()
        return annotation
