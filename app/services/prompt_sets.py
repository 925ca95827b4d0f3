"""Prompt sets: store a parsed upload as a new set with its deterministic train/eval split, and list sets.

By default an upload with any invalid row stores nothing; `skip_invalid` imports the valid
rows and still reports the rest.

The split of a prompt is a pure function of (its content hash, the set's seed, the eval fraction):
the same file gives the same split in any order, and appending rows never moves an existing prompt
to the other side. A row may pin its side with a `split` field (in its metadata or as a column) of
"train" or "eval": prompts written for evaluation stay held out whatever the fraction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.data.models import SPLITS, Prompt, PromptSet
from app.services.prompt_uploads import PromptSetError, RowError, parse_prompt_file

MAX_ERRORS_REPORTED = 200  # a broken file should not produce a megabyte of error text


@dataclass
class ImportReport:
    prompt_set: PromptSet
    created: int
    duplicates: int
    train: int
    eval: int
    errors: list[RowError]


def split_for(hash_hex: str, seed: int, eval_fraction: float) -> str:
    """'eval' for a pseudo-random eval_fraction of prompts, decided by content and seed only."""
    digest = hashlib.sha256(f"{seed}:{hash_hex}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "eval" if u < eval_fraction else "train"


def create_prompt_set(
    db: Session,
    *,
    name: str,
    data: bytes,
    filename: str | None = None,
    fmt: str | None = None,
    description: str = "",
    eval_fraction: float = 0.1,
    split_seed: int = 0,
    created_by: int | None = None,
    skip_invalid: bool = False,
) -> ImportReport:
    """Parse and store a new prompt set in one transaction (committed). Raises PromptSetError."""
    name = name.strip()
    if not name:
        raise PromptSetError("the prompt set needs a name")
    if not 0.0 <= eval_fraction < 1.0:
        raise PromptSetError("eval_fraction must be at least 0 and below 1")
    if db.scalar(select(PromptSet.id).where(PromptSet.name == name)) is not None:
        raise PromptSetError(f"a prompt set named {name!r} exists already; choose another name", status=409)
    parsed = parse_prompt_file(data, filename, fmt)
    if parsed.errors and not skip_invalid:
        shown = parsed.errors[:MAX_ERRORS_REPORTED]
        raise PromptSetError(
            f"{len(parsed.errors)} of {parsed.rows} rows are invalid; fix them or import with skip_invalid",
            shown,
        )
    if not parsed.prompts:
        raise PromptSetError("the file holds no valid prompts", parsed.errors[:MAX_ERRORS_REPORTED])
    prompt_set = PromptSet(
        name=name,
        description=description,
        eval_fraction=eval_fraction,
        split_seed=split_seed,
        created_by=created_by,
    )
    db.add(prompt_set)
    db.flush()
    counts = {"train": 0, "eval": 0}
    rows = []
    for p in parsed.prompts:
        h = p.content_hash
        pinned = p.meta.get("split")
        split = pinned if pinned in SPLITS else split_for(h, split_seed, eval_fraction)
        counts[split] += 1
        rows.append(
            Prompt(
                prompt_set_id=prompt_set.id,
                external_id=p.external_id,
                content_hash=h,
                messages=p.messages,
                text=p.text,
                meta=p.meta,
                split=split,
            )
        )
    db.add_all(rows)
    db.commit()
    return ImportReport(
        prompt_set=prompt_set,
        created=len(rows),
        duplicates=parsed.duplicates,
        train=counts["train"],
        eval=counts["eval"],
        errors=parsed.errors[:MAX_ERRORS_REPORTED],
    )


@dataclass
class PromptSetSummary:
    id: int
    name: str
    description: str
    eval_fraction: float
    split_seed: int
    prompts: int
    train: int
    eval: int
    created_at: Any


def list_prompt_sets(db: Session) -> list[PromptSetSummary]:
    counts = (
        select(
            Prompt.prompt_set_id.label("set_id"),
            func.count().label("total"),
            func.sum(case((Prompt.split == "eval", 1), else_=0)).label("eval"),
        )
        .group_by(Prompt.prompt_set_id)
        .subquery()
    )
    rows = db.execute(
        select(PromptSet, counts.c.total, counts.c.eval)
        .outerjoin(counts, counts.c.set_id == PromptSet.id)
        .order_by(PromptSet.created_at.desc(), PromptSet.id.desc())
    ).all()
    out = []
    for ps, total, n_eval in rows:
        total, n_eval = int(total or 0), int(n_eval or 0)
        out.append(
            PromptSetSummary(
                id=ps.id,
                name=ps.name,
                description=ps.description,
                eval_fraction=ps.eval_fraction,
                split_seed=ps.split_seed,
                prompts=total,
                train=total - n_eval,
                eval=n_eval,
                created_at=ps.created_at,
            )
        )
    return out


def reference_answers(db: Session) -> list[list[dict[str, str]]]:
    """Train prompts that carry a reference answer (a `reference` column or metadata field of their
    prompt set), each as its chat followed by that answer as the assistant's turn: PPO's ptx texts."""
    conversations = []
    for messages, meta in db.execute(
        select(Prompt.messages, Prompt.meta).where(Prompt.split == "train").order_by(Prompt.id)
    ):
        answer = (meta or {}).get("reference")
        if isinstance(answer, str) and answer.strip():
            conversations.append([*messages, {"role": "assistant", "content": answer.strip()}])
    return conversations
