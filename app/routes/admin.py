"""The admin console: the live version, rounds and runs with live progress, metric charts, the registry.

Every page is for admins only. Pages that show something in progress serve a fragment of the same
template to htmx polling (`render(..., block=...)`, with `Vary: HX-Request`) and answer 286 once the
run or round has ended, which tells htmx to stop polling. Model output, prompts and error texts are
untrusted: the templates print them autoescaped, never `|safe`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.orm import Session

from app.deps import DbSession
from app.models import (
    RUN_KINDS,
    RUN_STATUSES,
    Annotation,
    Comparison,
    Policy,
    PolicyAlias,
    RewardModel,
    Round,
    Run,
    RunMetric,
    Task,
    User,
)
from app.registry import RegistryError, live_policy, policy_by_version
from app.security import Admin
from app.templating import is_htmx, render, templates

log = logging.getLogger(__name__)

router = APIRouter(tags=["admin console"], include_in_schema=False)

RUN_ENDED = ("succeeded", "failed", "cancelled")
ROUND_ACTIVE = ("queued", "running")
# htmx stops polling when a response carries this status (htmx docs, "Polling").
STOP_POLLING = 286
QUEUES = ("gpu", "default")


# ---------------------------------------------------------------- helpers the pages share


def run_ended(run: Run) -> bool:
    return run.status in RUN_ENDED


def round_ended(round_: Round) -> bool:
    return round_.status not in ROUND_ACTIVE


def pretty_json(value: Any) -> str:
    """Indented JSON for a <pre>; the template escapes it (values may hold model output)."""
    if not value:
        return ""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def flat_metrics(metrics: dict[str, Any] | None, prefix: str = "") -> list[tuple[str, str]]:
    """A policy's metrics as (name, shown value) rows; nested dicts become dotted names, lists are skipped."""
    rows: list[tuple[str, str]] = []
    for key, value in sorted((metrics or {}).items()):
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(flat_metrics(value, name + "."))
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            rows.append((name, str(value)))
        elif isinstance(value, int | float):
            rows.append((name, f"{value:.4g}"))
    return rows


def _runs_of(db: Session, round_ids: list[int]) -> dict[int, list[Run]]:
    by_round: dict[int, list[Run]] = {rid: [] for rid in round_ids}
    if round_ids:
        for run in db.scalars(select(Run).where(Run.round_id.in_(round_ids)).order_by(Run.id)):
            by_round[run.round_id].append(run)  # type: ignore[index]
    return by_round


def _policy_versions(db: Session) -> dict[int, int]:
    """Policy id → version, to show lineage as version numbers."""
    return dict(db.execute(select(Policy.id, Policy.version)).tuples().all())


NAV = (
    ("/admin", "Dashboard"),
    ("/admin/rounds", "Rounds"),
    ("/admin/runs", "Runs"),
    ("/admin/policies", "Policies"),
    ("/admin/playground", "Playground"),
    ("/admin/prompts", "Prompts"),
    ("/admin/quality", "Quality"),
)


def admin_nav_links() -> list[tuple[str, str]]:
    """The admin sub-navigation: links to the admin pages whose routes are installed (other areas add theirs)."""
    from app.routes import ROUTERS

    paths = {getattr(route, "path", None) for r in ROUTERS for route in r.routes}
    return [(href, label) for href, label in NAV if href in paths]


# templates/admin/_nav.html calls this, so any admin page can include the navigation without extra context.
templates().env.globals["admin_nav_links"] = admin_nav_links


# ---------------------------------------------------------------- queue depths and counts

_broker_engines: dict[str, Engine] = {}
_broker_engines_lock = threading.Lock()


def _broker_engine(url: str) -> Engine:
    with _broker_engines_lock:
        if url not in _broker_engines:
            _broker_engines[url] = create_engine(url, pool_pre_ping=True)
        return _broker_engines[url]


def queue_depths(broker_url: str, queues: tuple[str, ...] = QUEUES) -> dict[str, int | None]:
    """Messages waiting in each Celery queue; None where the broker cannot say (shown as "unknown").

    Redis keeps a queue as a list under the queue's name (LLEN). kombu's SQLAlchemy transport, the
    embedded default, keeps messages in `kombu_message` joined to `kombu_queue`; a message taken by a
    worker is marked invisible until acknowledged, so only visible rows are waiting.
    """
    unknown: dict[str, int | None] = {q: None for q in queues}
    try:
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(broker_url, socket_timeout=1, socket_connect_timeout=1)
            try:
                pipe = client.pipeline()
                for queue in queues:
                    pipe.llen(queue)
                return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))
            finally:
                client.close()
        if broker_url.startswith("sqla+"):
            engine = _broker_engine(broker_url.removeprefix("sqla+"))
            if engine.dialect.name == "sqlite" and not _sqlite_file_exists(engine):
                return {q: 0 for q in queues}  # the broker was never used: nothing is waiting
            with engine.connect() as conn:
                if not inspect(conn).has_table("kombu_message"):
                    return {q: 0 for q in queues}
                rows = conn.execute(
                    text(
                        "SELECT q.name, COUNT(m.id) FROM kombu_queue q "
                        "LEFT JOIN kombu_message m ON m.queue_id = q.id AND m.visible "
                        "GROUP BY q.name"
                    )
                ).all()
            counts = {name: int(n) for name, n in rows}
            return {q: counts.get(q, 0) for q in queues}
    except Exception as exc:  # the console must render even when the broker is down
        log.info("queue depths unavailable: %s", exc)
    return unknown


def _sqlite_file_exists(engine: Engine) -> bool:
    from pathlib import Path

    database = engine.url.database
    return bool(database) and (database == ":memory:" or Path(database).exists())


def annotator_counts(db: Session) -> dict[str, int]:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "annotators": db.scalar(
            select(func.count(User.id)).where(User.role == "annotator", User.is_active.is_(True))
        )
        or 0,
        "active_today": db.scalar(
            select(func.count(func.distinct(Annotation.user_id))).where(Annotation.created_at >= today)
        )
        or 0,
        "annotations_today": db.scalar(
            select(func.count(Annotation.id)).where(Annotation.created_at >= today)
        )
        or 0,
        "annotations": db.scalar(select(func.count(Annotation.id))) or 0,
        "comparisons": db.scalar(select(func.count(Comparison.id))) or 0,
        "open_tasks": db.scalar(select(func.count(Task.id)).where(Task.status == "open")) or 0,
    }


def _comparisons_since_last_round(db: Session) -> int | None:
    try:
        from app.rounds import comparisons_since_last_round
    except ImportError:
        return None
    return comparisons_since_last_round(db)


def live_state(request: Request, db: Session) -> dict[str, Any]:
    """The live alias (what should be served) and what this web process actually serves."""
    alias = db.get(PolicyAlias, "live")
    versions = _policy_versions(db)
    holder = request.app.state.policy_holder
    return {
        "live_version": versions.get(alias.policy_id) if alias else None,
        "previous_version": versions.get(alias.previous_policy_id)
        if alias and alias.previous_policy_id
        else None,
        "alias_updated_at": alias.updated_at if alias else None,
        "served_version": holder.served_version if holder else None,
        "loading_version": holder.loading_version if holder else None,
        "holder_error": holder.last_error if holder else None,
        "model_loaded": bool(holder and holder.current is not None and holder.current.generator is not None),
    }


# ---------------------------------------------------------------- the round form


class StartRoundForm(BaseModel):
    """What an admin may set when starting a round in the console; blank fields keep the trainer's default."""

    algorithm: str = Field(pattern="^(ppo|dpo)$")
    steps: int | None = Field(None, ge=1, le=100_000)
    learning_rate: float | None = Field(None, gt=0, lt=1)
    kl_coef: float | None = Field(None, ge=0, le=100)
    auto_promote: bool = False

    @field_validator("steps", "learning_rate", "kl_coef", mode="before")
    @classmethod
    def _blank_is_default(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


# The form's generic names, and the config field each trainer calls them (first one its config has).
KNOB_NAMES = {
    "steps": ("steps", "max_steps"),
    "learning_rate": ("policy_lr", "learning_rate", "lr"),
    # DPO's beta plays the part of PPO's KL coefficient: the strength of the pull to the reference.
    "kl_coef": ("kl_coef", "beta"),
}
POLICY_CONFIGS = {"ppo": ("workers.training.ppo", "PPOConfig"), "dpo": ("workers.training.dpo", "DPOConfig")}


def _config_fields(algorithm: str) -> set[str] | None:
    import importlib

    module_name, class_name = POLICY_CONFIGS[algorithm]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None
    return {f.name for f in fields(cls)} if is_dataclass(cls) else None


def round_knobs(form: StartRoundForm) -> dict[str, Any]:
    """The knobs dict `start_round` takes: {"auto_promote": ..., "policy": {<trainer field>: value}}."""
    known = _config_fields(form.algorithm)
    policy: dict[str, Any] = {}
    for generic, candidates in KNOB_NAMES.items():
        value = getattr(form, generic)
        if value is None:
            continue
        name = next((c for c in candidates if known is None or c in known), None)
        if name is None:
            raise ValueError(
                f"{form.algorithm.upper()} has no setting for {generic.replace('_', ' ')}; leave it blank"
            )
        policy[name] = value
    return {"auto_promote": form.auto_promote, "policy": policy}


def _form_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


# ---------------------------------------------------------------- dashboard


def _recent_rounds(db: Session, limit: int) -> list[Round]:
    return list(db.scalars(select(Round).order_by(Round.id.desc()).limit(limit)))


def _rounds_page_context(db: Session, limit: int = 50) -> dict[str, Any]:
    rounds = _recent_rounds(db, limit)
    return {"rounds": rounds, "round_runs": _runs_of(db, [r.id for r in rounds])}


@router.get("/admin")
def dashboard(request: Request, principal: Admin, db: DbSession):
    live = live_state(request, db)
    if is_htmx(request):  # the polled live-version panel only
        return render(request, "admin/dashboard.html", {"live": live}, block="live")
    rounds = _recent_rounds(db, 5)
    runs = list(db.scalars(select(Run).order_by(Run.id.desc()).limit(10)))
    context = {
        "live": live,
        "rounds": rounds,
        "round_runs": _runs_of(db, [r.id for r in rounds]),
        "runs": runs,
        "queues": queue_depths(request.app.state.settings.celery_broker_url),
        "counts": annotator_counts(db),
        "since_last_round": _comparisons_since_last_round(db),
        "form": None,
    }
    return render(request, "admin/dashboard.html", context, block="live")


# ---------------------------------------------------------------- rounds


@router.get("/admin/rounds")
def rounds_page(request: Request, principal: Admin, db: DbSession):
    return render(request, "admin/rounds.html", {**_rounds_page_context(db), "form": None})


@router.post("/admin/rounds")
async def start_round_form(request: Request, principal: Admin, db: DbSession):
    from app.rounds import RoundConflict, RoundError, start_round

    raw = dict(await request.form())
    data = {k: v for k, v in raw.items() if k in StartRoundForm.model_fields}
    data["auto_promote"] = raw.get("auto_promote") in ("on", "true", "1")
    context: dict[str, Any] = {**_rounds_page_context(db), "form": data}
    try:
        form = StartRoundForm.model_validate(data)
        knobs = round_knobs(form)
    except ValidationError as exc:
        context["form_error"] = f"Check the form: {_form_errors(exc)}."
        return render(request, "admin/rounds.html", context, status_code=422)
    except ValueError as exc:
        context["form_error"] = str(exc)
        return render(request, "admin/rounds.html", context, status_code=422)
    try:
        round_ = start_round(db, algorithm=form.algorithm, knobs=knobs, started_by=principal.id)
    except RoundConflict as exc:
        context["conflict_round_id"] = exc.round_id
        return render(request, "admin/rounds.html", context, status_code=status.HTTP_409_CONFLICT)
    except RoundError as exc:
        context["form_error"] = str(exc)
        return render(request, "admin/rounds.html", context, status_code=422)
    return RedirectResponse(f"/admin/rounds/{round_.id}", status_code=303)


def _evaluation_run(db: Session, round_id: int | None = None, version: int | None = None) -> Run | None:
    """The evaluation run of a round, or the latest one that judged this candidate version."""
    query = select(Run).where(Run.kind == "evaluate").order_by(Run.id.desc())
    if round_id is not None:
        return db.scalar(query.where(Run.round_id == round_id))
    for run in db.scalars(query.limit(200)):
        if str(run.config.get("candidate_version")) == str(version):
            return run
    return None


def samples_of(run: Run | None) -> list[dict[str, str]]:
    """The evaluation's side-by-side samples as plain strings (the template escapes them)."""
    if run is None or not isinstance(run.result, dict):
        return []
    samples = run.result.get("samples") or []
    out = []
    for sample in samples if isinstance(samples, list) else []:
        if not isinstance(sample, dict):
            continue
        out.append(
            {
                "prompt": str(sample.get("prompt", "")),
                "live": str(sample.get("live", sample.get("baseline", ""))),
                "candidate": str(sample.get("candidate", "")),
                "live_reward": sample.get("live_reward", sample.get("baseline_reward")),
                "candidate_reward": sample.get("candidate_reward"),
            }
        )
    return out


@router.get("/admin/rounds/{round_id}")
def round_page(round_id: int, request: Request, principal: Admin, db: DbSession):
    round_ = db.get(Round, round_id)
    if round_ is None:
        raise HTTPException(404, f"There is no round {round_id}.")
    runs = list(db.scalars(select(Run).where(Run.round_id == round_id).order_by(Run.id)))
    ended = round_ended(round_)
    context: dict[str, Any] = {"round": round_, "runs": runs}
    if is_htmx(request):
        return render(
            request, "admin/round.html", context, block="progress", status_code=STOP_POLLING if ended else 200
        )
    live = live_policy(db)
    candidates = list(db.scalars(select(Policy).where(Policy.round_id == round_id).order_by(Policy.version)))
    evaluation = _evaluation_run(db, round_id=round_id)
    versions = _policy_versions(db)
    context |= {
        "candidates": candidates,
        "live_policy_id": live.id if live else None,
        "base_version": versions.get(round_.base_policy_id) if round_.base_policy_id else None,
        "samples": samples_of(evaluation),
        "evaluation": evaluation,
        "config_json": pretty_json(round_.config),
        "started_by": db.get(User, round_.started_by) if round_.started_by else None,
    }
    return render(request, "admin/round.html", context, block="progress")


@router.post("/admin/rounds/{round_id}/cancel")
def cancel_round_form(round_id: int, request: Request, principal: Admin, db: DbSession):
    from app.rounds import cancel_round

    round_ = db.get(Round, round_id)
    if round_ is None:
        raise HTTPException(404, f"There is no round {round_id}.")
    if not cancel_round(db, round_id):
        raise HTTPException(
            409, f"Round {round_id} already ended ({round_.status}); there is nothing to cancel."
        )
    return RedirectResponse(f"/admin/rounds/{round_id}", status_code=303)


# ---------------------------------------------------------------- runs


@router.get("/admin/runs")
def runs_page(
    request: Request,
    principal: Admin,
    db: DbSession,
    kind: str | None = None,
    run_status: Annotated[str | None, Query(alias="status")] = None,
):
    query = select(Run).order_by(Run.id.desc()).limit(100)
    # Unknown filter values are ignored rather than answered with an empty list.
    kind = kind if kind in RUN_KINDS else None
    run_status = run_status if run_status in RUN_STATUSES else None
    if kind:
        query = query.where(Run.kind == kind)
    if run_status:
        query = query.where(Run.status == run_status)
    context = {
        "runs": list(db.scalars(query)),
        "kind": kind or "",
        "status": run_status or "",
        "kinds": RUN_KINDS,
        "statuses": RUN_STATUSES,
    }
    return render(request, "admin/runs.html", context)


@router.get("/admin/runs/{run_id}")
def run_page(run_id: int, request: Request, principal: Admin, db: DbSession):
    run = db.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    context: dict[str, Any] = {"run": run}
    if is_htmx(request):
        return render(
            request,
            "admin/run.html",
            context,
            block="progress",
            status_code=STOP_POLLING if run_ended(run) else 200,
        )
    result = {k: v for k, v in (run.result or {}).items() if k != "samples"}
    context |= {
        "config_json": pretty_json(run.config),
        "result_json": pretty_json(result),
        "samples": samples_of(run),
        "metric_count": db.scalar(select(func.count(RunMetric.id)).where(RunMetric.run_id == run_id)) or 0,
        "round": db.get(Round, run.round_id) if run.round_id else None,
    }
    return render(request, "admin/run.html", context, block="progress")


# Charts: names that share a word share a chart (e.g. reward_raw and reward_normalised); others get their own.
CHART_GROUPS: tuple[tuple[str, Any], ...] = (
    ("Losses", lambda w: w == "loss" or w.endswith("loss")),
    ("Accuracy", lambda w: w.startswith("acc")),
    ("KL", lambda w: w == "kl" or w.startswith("kl")),
    ("Length", lambda w: w in ("length", "len", "tokens")),
    ("Reward", lambda w: w.startswith("reward") or w in ("score", "scores")),
)


# Shown in this order (the loop's headline figures first); matching above runs losses first so that
# e.g. "reward_loss" lands with the losses.
CHART_ORDER = ("Reward", "KL", "Length", "Accuracy", "Losses")


def chart_group(name: str) -> str:
    """The chart a metric belongs on: a known group by the words of its name, else its own name."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    for title, matches in CHART_GROUPS:
        if any(matches(w) for w in words):
            return title
    return name


def metric_series(db: Session, run_id: int) -> dict[str, list[list[float]]]:
    """name → [[step, value], ...] in step order; non-finite values become gaps (JSON has no NaN)."""
    series: dict[str, list[list[float]]] = {}
    rows = db.execute(
        select(RunMetric.name, RunMetric.step, RunMetric.value)
        .where(RunMetric.run_id == run_id)
        .order_by(RunMetric.name, RunMetric.step)
    )
    for name, step, value in rows:
        series.setdefault(name, []).append([step, value if math.isfinite(value) else None])
    return series


@router.get("/admin/runs/{run_id}/metrics.json")
def run_metrics_json(run_id: int, principal: Admin, db: DbSession) -> JSONResponse:
    run = db.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    series = metric_series(db, run_id)
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(chart_group(name), []).append(name)
    order = list(CHART_ORDER)
    charts = sorted(
        groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])
    )
    body = {
        "run_id": run.id,
        "status": run.status,
        "finished": run_ended(run),
        "series": series,
        "charts": [{"title": title, "names": names} for title, names in charts],
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.post("/admin/runs/{run_id}/cancel")
def cancel_run_form(run_id: int, principal: Admin, db: DbSession):
    from workers.progress import request_cancel

    run = db.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    if not request_cancel(db, run_id):
        raise HTTPException(409, f"Run {run_id} already ended ({run.status}); there is nothing to cancel.")
    return RedirectResponse(f"/admin/runs/{run_id}", status_code=303)


# ---------------------------------------------------------------- the policy registry


def _policies_context(request: Request, db: Session) -> dict[str, Any]:
    policies = list(db.scalars(select(Policy).order_by(Policy.version.desc())))
    versions = {p.id: p.version for p in policies}
    return {
        "policies": policies,
        "versions": versions,
        "metrics": {p.id: flat_metrics(p.metrics) for p in policies},
        "live": live_state(request, db),
    }


@router.get("/admin/policies")
def policies_page(request: Request, principal: Admin, db: DbSession, notice: str | None = None):
    return render(request, "admin/policies.html", {**_policies_context(request, db), "notice": notice})


def _refill_safely(db: Session, policy: Policy, refill: Callable[[], None]) -> None:
    """Refill the task pool for the policy now live; a failure there must not undo the promote or
    rollback that already happened."""
    try:
        refill()
    except Exception:
        log.exception("refilling tasks for v%s failed", policy.version)
        db.rollback()


def _refill_after_promote(db: Session, policy: Policy, previous: Policy | None) -> None:
    from app.rounds import after_promote

    if previous is None or previous.id != policy.id:
        _refill_safely(db, policy, lambda: after_promote(db, policy, previous))


@router.post("/admin/policies/{version}/promote")
def promote_form(version: int, request: Request, principal: Admin, db: DbSession):
    from app.registry import promote

    previous = live_policy(db)
    try:
        policy = promote(db, version, request.app.state.settings)
    except RegistryError as exc:
        context = {**_policies_context(request, db), "error": str(exc)}
        code = 404 if policy_by_version(db, version) is None else status.HTTP_409_CONFLICT
        return render(request, "admin/policies.html", context, status_code=code)
    _refill_after_promote(db, policy, previous)
    _wake_holder(request)
    return RedirectResponse(f"/admin/policies?notice=promoted-{policy.version}", status_code=303)


@router.post("/admin/policies/rollback")
def rollback_form(request: Request, principal: Admin, db: DbSession):
    from app.registry import rollback

    try:
        policy = rollback(db, request.app.state.settings)
    except RegistryError as exc:
        context = {**_policies_context(request, db), "error": str(exc)}
        return render(request, "admin/policies.html", context, status_code=status.HTTP_409_CONFLICT)
    from app.rounds import after_rollback

    _refill_safely(db, policy, lambda: after_rollback(db, policy))
    _wake_holder(request)
    return RedirectResponse(f"/admin/policies?notice=rolled-back-{policy.version}", status_code=303)


def _wake_holder(request: Request) -> None:
    # This process's holder need not wait for its next poll; other processes get the pub/sub wake-up.
    holder = request.app.state.policy_holder
    if holder is not None:
        holder.wake()


@router.get("/admin/policies/{version}")
def policy_page(version: int, request: Request, principal: Admin, db: DbSession):
    policy = policy_by_version(db, version)
    if policy is None:
        raise HTTPException(404, f"There is no policy version {version}.")
    live = live_policy(db)
    evaluation = _evaluation_run(db, round_id=policy.round_id) if policy.round_id else None
    if evaluation is None or str(evaluation.config.get("candidate_version", version)) != str(version):
        evaluation = _evaluation_run(db, version=version)
    children = list(db.scalars(select(Policy).where(Policy.parent_id == policy.id).order_by(Policy.version)))
    context = {
        "policy": policy,
        "is_live": live is not None and live.id == policy.id,
        "live_version": live.version if live else None,
        "parent_version": policy.parent.version if policy.parent else None,
        "children": children,
        "reward_model": db.get(RewardModel, policy.reward_model_id) if policy.reward_model_id else None,
        "metrics": flat_metrics(policy.metrics),
        "evaluation": evaluation,
        "samples": samples_of(evaluation),
    }
    return render(request, "admin/policy.html", context)
