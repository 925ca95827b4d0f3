"""The task pool: generation runs that sample responses from the live policy, the ranking and arena
tasks made from them, and the refill that keeps the pool from running dry.

- A *rank* task shows K distinct responses of the live policy to one prompt, in a shuffled order.
- An *arena* task shows one response of each of two policy versions to one prompt, side by side in
  a random order; the versions are recorded on the responses but never shown to annotators.
- `refill_if_low` (beat) asks for a generation run when fewer than `refill_below` tasks have a free
  slot; `request_refill` (also called after a promotion) creates the run row and enqueues
  the generation task, whose run body (workers/runs/generation.py) calls `generate_tasks`.

A generation run commits its responses and tasks batch by batch, so annotators get the first tasks
while the rest are still being sampled; a run cancelled or killed midway keeps what it committed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.common.reporting import RunCancelled
from app.config import Settings, get_settings
from app.data.models import Policy, PolicyAlias, Prompt, Response, Run, Task, TaskResponse
from app.services import dispatch
from app.services.pool_settings import paused_prompt_sets, task_overlap
from app.services.registry import live_policy, policy_by_version
from app.services.retention import LowDiskSpace, ensure_free_disk
from app.services.serving import load_policy

log = logging.getLogger(__name__)

# After a promotion a quarter of the refill prompts become arena tasks (new vs previous version):
# enough blind head-to-head judgements to see whether a round helped, without starving the rankings.
ARENA_SHARE = 0.25
# Prompts per generation batch: with K=4 that is 32 sequences, the batch size where the batched
# generator is most efficient on CPU, and a commit every batch puts tasks in front of annotators early.
PROMPTS_PER_BATCH = 8


# ---------------------------------------------------------------- creating tasks


def create_rank_task(
    db: Session, prompt_id: int, response_ids: Sequence[int], required: int, rng: random.Random
) -> Task:
    """A rank task over these responses, shown in a shuffled order (flushed, not committed)."""
    if len(response_ids) < 2:
        raise ValueError("a rank task needs at least two responses")
    order = list(response_ids)
    rng.shuffle(order)
    task = Task(prompt_id=prompt_id, kind="rank", required_annotations=required, status="open")
    task.items = [TaskResponse(position=i, response_id=rid) for i, rid in enumerate(order)]
    db.add(task)
    db.flush()
    return task


def create_arena_task(
    db: Session, prompt_id: int, response_a: int, response_b: int, required: int, rng: random.Random
) -> Task:
    """An arena task: two versions' responses side by side, sides drawn at random (flushed)."""
    order = [response_a, response_b]
    rng.shuffle(order)
    task = Task(prompt_id=prompt_id, kind="arena", required_annotations=required, status="open")
    task.items = [TaskResponse(position=i, response_id=rid) for i, rid in enumerate(order)]
    db.add(task)
    db.flush()
    return task


def close_open_arena_tasks(db: Session, policy_id: int) -> int:
    """Close the open arena tasks that show a response of this policy (flushed, not committed): its
    confirmation is over, so annotators stop being given them. Judgements already made are kept."""
    shown = (
        select(TaskResponse.task_id)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(Response.policy_id == policy_id)
    )
    tasks = db.scalars(
        select(Task).where(Task.kind == "arena", Task.status == "open", Task.id.in_(shown))
    ).all()
    for task in tasks:
        task.status = "closed"
    db.flush()
    return len(tasks)


def open_arena_task_count(db: Session, policy_id: int) -> int:
    """Open arena tasks showing a response of this policy that still have a free slot."""
    shown = (
        select(TaskResponse.task_id)
        .join(Response, Response.id == TaskResponse.response_id)
        .where(Response.policy_id == policy_id)
    )
    return (
        db.scalar(
            select(func.count(Task.id)).where(
                Task.kind == "arena",
                Task.status == "open",
                Task.claimed_count < Task.required_annotations,
                Task.id.in_(shown),
            )
        )
        or 0
    )


def claimable_task_count(db: Session) -> int:
    """Open ordinary tasks with at least one free slot (what annotators can still be given)."""
    return (
        db.scalar(
            select(func.count(Task.id)).where(
                Task.status == "open",
                Task.claimed_count < Task.required_annotations,
                Task.is_gold.is_(False),
            )
        )
        or 0
    )


def choose_prompts(
    db: Session, n: int, policy_id: int, prompt_set_id: int | None = None, exclude: Sequence[int] = ()
) -> list[int]:
    """Train-split prompts that this policy has answered least, in random order among equals: of
    `prompt_set_id`, or else of every prompt set the refill is not paused for."""
    answered = (
        select(Response.prompt_id, func.count(Response.id).label("n"))
        .where(Response.policy_id == policy_id)
        .group_by(Response.prompt_id)
        .subquery()
    )
    query = (
        select(Prompt.id)
        .outerjoin(answered, answered.c.prompt_id == Prompt.id)
        .where(Prompt.split == "train")
        .order_by(func.coalesce(answered.c.n, 0), func.random())
        .limit(n)
    )
    if prompt_set_id is not None:
        query = query.where(Prompt.prompt_set_id == prompt_set_id)
    elif paused := paused_prompt_sets(db):
        query = query.where(Prompt.prompt_set_id.not_in(sorted(paused)))
    if exclude:
        query = query.where(Prompt.id.not_in(list(exclude)))
    return list(db.scalars(query).all())


def _generate_in_flight(db: Session) -> bool:
    return (
        db.scalar(
            select(func.count(Run.id)).where(Run.kind == "generate", Run.status.in_(("queued", "running")))
        )
        or 0
    ) > 0


def request_refill(
    db: Session,
    *,
    policy_version: int | None = None,
    arena_against: int | None = None,
    prompt_set_id: int | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
    created_by: int | None = None,
    settings: Settings | None = None,
    enqueue: bool = True,
) -> int | None:
    """Create a generation run (committed) and enqueue it; returns its id, or None with nothing to do.

    `policy_version` defaults to the live one. With `arena_against`, ARENA_SHARE of the prompts
    become arena tasks between the two versions; the rest rank K responses of `policy_version`.
    """
    settings = settings or get_settings()
    policy = policy_by_version(db, policy_version) if policy_version is not None else live_policy(db)
    if policy is None:
        log.info("no refill: there is no live policy yet (run `prefloop init`)")
        return None
    other = policy_by_version(db, arena_against) if arena_against is not None else None
    n = n_prompts or settings.refill_prompts
    prompt_ids = choose_prompts(db, n, policy.id, prompt_set_id)
    if not prompt_ids:
        log.info("no refill: no train prompts (upload a prompt set)")
        return None
    n_arena = round(len(prompt_ids) * ARENA_SHARE) if other is not None and other.id != policy.id else 0
    config: dict[str, Any] = {
        "policy_version": policy.version,
        "prompt_ids": prompt_ids[n_arena:],
        "arena_prompt_ids": prompt_ids[:n_arena],
        "arena_versions": [policy.version, other.version] if n_arena else [],
        "responses_per_task": settings.responses_per_task,
        "required_annotations": task_overlap(db, settings),
        "sampling": {"max_new_tokens": max_new_tokens or settings.refill_max_new_tokens},
        "seed": seed if seed is not None else random.SystemRandom().randrange(2**31),
    }
    run = Run(kind="generate", status="queued", config=config, created_by=created_by)
    db.add(run)
    db.commit()
    if enqueue:
        dispatch.enqueue(dispatch.GENERATE_RESPONSES, run.id)
    return run.id


def refill_if_low(db: Session, settings: Settings | None = None, enqueue: bool = True) -> int | None:
    """Beat: request a generation run when the pool is below `refill_below` and none is under way."""
    settings = settings or get_settings()
    if claimable_task_count(db) >= settings.refill_below or _generate_in_flight(db):
        db.rollback()
        return None
    alias = db.get(PolicyAlias, "live")
    if alias is None:
        db.rollback()
        return None
    try:
        ensure_free_disk(settings)
    except LowDiskSpace as exc:  # a run queued now would only fail: say so once per beat instead
        log.warning("task pool is low but no generation run is queued: %s", exc)
        db.rollback()
        return None
    previous = db.get(Policy, alias.previous_policy_id) if alias.previous_policy_id else None
    return request_refill(
        db,
        arena_against=previous.version if previous else None,
        settings=settings,
        enqueue=enqueue,
    )


# ---------------------------------------------------------------- the generation run


def sampling_config(overrides: dict[str, Any] | None):
    """The generator's SamplingConfig (PPO-max defaults) with a run's overrides."""
    # Imported here: app.inference loads torch, which the web process and the Celery prefork parent
    # (both import this module) must not load before a generation run needs it.
    from app.inference.sampling import SamplingConfig

    return SamplingConfig(**(overrides or {}))


def load_builtin_generator(policy: Policy, settings: Settings):
    return load_policy(policy.version, policy.path, settings.torch_device()).generator


# What samples a generation run's responses: called with the policy row and the settings, it returns an
# object with `chat_prompt_ids(conversation)` and `generate_ids(prompt_ids, sampling, seed=...)` (the
# built-in BatchedGenerator's calls). The loader owns what it loads: the worker's releases its engines'
# device memory when the run ends.
GeneratorLoader = Callable[[Policy, Settings], Any]


def _sample(generator, conversations: list[list[dict]], k: int, sampling, seed: int):
    """K samples per conversation: (text, token count, ended with EOS) per sample, grouped by prompt."""
    prompts = [generator.chat_prompt_ids(c) for c in conversations]
    repeated = [p for p in prompts for _ in range(k)]
    rollout = generator.generate_ids(repeated, sampling, seed=seed)
    samples = list(zip(rollout.texts, rollout.response_ids, rollout.ended_with_eos, strict=True))
    return [
        [(text.strip(), len(ids), eos) for text, ids, eos in samples[i * k : (i + 1) * k]]
        for i in range(len(prompts))
    ]


def _store_responses(
    db: Session, prompt_id: int, policy_id: int, samples, sampling_record: dict[str, Any]
) -> list[Response]:
    rows = [
        Response(
            prompt_id=prompt_id,
            policy_id=policy_id,
            text=text,
            sampling=sampling_record,
            token_count=tokens,
            ended_with_eos=eos,
        )
        for text, tokens, eos in samples
    ]
    db.add_all(rows)
    db.flush()
    return rows


def generate_tasks(
    sessions: sessionmaker[Session],
    config: dict[str, Any],
    reporter=None,
    settings: Settings | None = None,
    load_generator: GeneratorLoader | None = None,
) -> dict[str, Any]:
    """The body of a generation run: sample, store responses, create tasks; returns the run's result.

    `load_generator` picks the sampler (the worker passes one for its configured engine); the built-in
    batched generator of the loaded policy by default.
    """
    settings = settings or get_settings()
    load = load_generator or load_builtin_generator
    sampling = sampling_config(config.get("sampling"))
    seed = int(config.get("seed", 0))
    k = int(config.get("responses_per_task", settings.responses_per_task))
    required = int(config.get("required_annotations", settings.task_overlap))
    prompt_ids: list[int] = list(config.get("prompt_ids", []))
    arena_ids: list[int] = list(config.get("arena_prompt_ids", []))
    arena_versions: list[int] = list(config.get("arena_versions", []))
    rng = random.Random(seed)
    result = {"responses": 0, "rank_tasks": 0, "arena_tasks": 0, "skipped_prompts": 0}

    with sessions() as db:
        if config.get("policy_version") is not None:
            policy = policy_by_version(db, int(config["policy_version"]))
        else:
            policy = live_policy(db)
        if policy is None:
            raise RuntimeError("no policy to sample from: the live alias is unset")
        messages = {
            pid: msgs
            for pid, msgs in db.execute(
                select(Prompt.id, Prompt.messages).where(Prompt.id.in_(prompt_ids + arena_ids))
            ).all()
        }
    result["policy_version"] = policy.version
    total = len(prompt_ids) + len(arena_ids) * max(1, len(arena_versions))
    done = 0

    def step(n: int, message: str) -> None:
        nonlocal done
        done += n
        if reporter is not None:
            reporter.progress(done, total, message)
            if reporter.should_stop():
                raise RunCancelled()

    generator = load(policy, settings)
    record = {**asdict(sampling), "seed": seed, "policy_version": policy.version}
    usable = [pid for pid in prompt_ids if pid in messages]
    for b, start in enumerate(range(0, len(usable), PROMPTS_PER_BATCH)):
        batch = usable[start : start + PROMPTS_PER_BATCH]
        grouped = _sample(generator, [messages[pid] for pid in batch], k, sampling, seed + b)
        with sessions() as db:
            for pid, samples in zip(batch, grouped, strict=True):
                rows = _store_responses(db, pid, policy.id, samples, record)
                result["responses"] += len(rows)
                distinct: dict[str, int] = {}
                for row in rows:  # identical samples would only be tied; show each text once
                    distinct.setdefault(row.text, row.id)
                if len(distinct) < 2:
                    result["skipped_prompts"] += 1
                    continue
                create_rank_task(db, pid, list(distinct.values()), required, rng)
                result["rank_tasks"] += 1
            db.commit()
        step(len(batch), f"sampled {k} responses for {done + len(batch)} prompts with v{policy.version}")

    if arena_ids and len(arena_versions) == 2:
        arena = [pid for pid in arena_ids if pid in messages]
        per_version: dict[int, dict[int, int]] = {}
        for v_index, version in enumerate(arena_versions):
            with sessions() as db:
                versioned = policy_by_version(db, version)
            if versioned is None:
                raise RuntimeError(f"arena version v{version} is not registered")
            gen = generator if versioned.id == policy.id else load(versioned, settings)
            v_record = {**asdict(sampling), "seed": seed, "policy_version": version}
            per_version[version] = {}
            for b, start in enumerate(range(0, len(arena), PROMPTS_PER_BATCH)):
                batch = arena[start : start + PROMPTS_PER_BATCH]
                v_seed = seed + 10_000 * (v_index + 1) + b
                grouped = _sample(gen, [messages[pid] for pid in batch], 1, sampling, v_seed)
                with sessions() as db:
                    for pid, samples in zip(batch, grouped, strict=True):
                        (row,) = _store_responses(db, pid, versioned.id, samples, v_record)
                        per_version[version][pid] = row.id
                        result["responses"] += 1
                    db.commit()
                step(len(batch), f"arena: sampled v{version} for {len(batch)} prompts")
            del gen
        a, b_version = arena_versions
        with sessions() as db:
            for pid in arena:
                create_arena_task(db, pid, per_version[a][pid], per_version[b_version][pid], required, rng)
                result["arena_tasks"] += 1
            db.commit()
    return result
