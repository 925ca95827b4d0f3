"""Rounds and runs in the admin console: start a round, follow rounds and runs live, chart a run's
metrics, cancel, and promote or roll back a policy version (which starts the task refill).

Pages that show something in progress serve a fragment of the same template to htmx polling
(`render(..., block=...)`, with `Vary: HX-Request`) and answer 286 once the run or round has ended,
which tells htmx to stop polling.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.data.models import RUN_KINDS, RUN_STATUSES, Policy, Round, Run, RunMetric, User
from app.services.cancellation import CancelRefused, cancel_round_on_request, cancel_run_on_request
from app.services.promotion import promote, rollback
from app.services.registry import RegistryError, live_policy, policy_by_version
from app.services.round_spec import (
    ALGORITHMS,
    SECTIONS,
    describe_problems,
    setting_fields,
    spec_from_settings,
)
from app.services.rounds import RoundConflict, RoundError, active_round, start_round
from app.services.run_metrics import metric_series
from app.web.admin_pages import (
    STOP_POLLING,
    evaluation_run,
    gate_view,
    policies_context,
    policy_versions,
    pretty_json,
    recent_rounds,
    round_ended,
    run_ended,
    runs_of,
    samples_of,
)
from app.web.deps import DbSession
from app.web.metric_charts import chart_layout, metric_label
from app.web.policy_holder import wake_local_policy_holder
from app.web.security import Admin
from app.web.templating import is_htmx, render

router = APIRouter(tags=["admin console"], include_in_schema=False)


# ---------------------------------------------------------------- the round form


def setting_inputs(algorithm: str) -> dict[str, list]:
    """The form's inputs: every setting of the round spec for this algorithm, by section."""
    by_section: dict[str, list] = {section: [] for section in SECTIONS}
    for field in setting_fields(algorithm if algorithm in ALGORITHMS else "ppo"):
        by_section[field.name.partition(".")[0]].append(field)
    return by_section


def _entered(form: Any) -> dict[str, Any]:
    """What the admin typed: the algorithm, the checkbox, and every setting not left blank."""
    entered: dict[str, Any] = {name: value.strip() for name, value in form.items() if isinstance(value, str)}
    settings = {k: v for k, v in entered.items() if k.partition(".")[0] in SECTIONS and "." in k and v}
    return {
        "algorithm": entered.get("algorithm", "ppo"),
        "auto_promote": entered.get("auto_promote") in ("on", "true", "1"),
        "settings": settings,
    }


# ---------------------------------------------------------------- rounds


def _rounds_page_context(db: Session, limit: int = 50) -> dict[str, Any]:
    rounds = recent_rounds(db, limit)
    return {
        "rounds": rounds,
        "round_runs": runs_of(db, [r.id for r in rounds]),
        "active_round": active_round(db),
    }


@router.get("/admin/rounds")
def rounds_page(request: Request, principal: Admin, db: DbSession):
    context = {**_rounds_page_context(db), "form": None, "setting_inputs": setting_inputs("ppo")}
    return render(request, "admin/rounds.html", context)


@router.get("/admin/rounds/settings")
def round_settings_fragment(request: Request, principal: Admin):
    """The settings inputs for the algorithm just chosen in the form (htmx), keeping what was typed."""
    entered = _entered(request.query_params)
    context = {"form": entered, "setting_inputs": setting_inputs(entered["algorithm"])}
    return render(request, "admin/round_settings.html", context)


@router.get("/admin/rounds/start-button")
def start_round_button(request: Request, principal: Admin, db: DbSession):
    """The start button, polled while a round is active: enabled (and polling stops) once it has ended."""
    active = active_round(db)
    return render(
        request,
        "admin/start_round_button.html",
        {"active_round": active},
        status_code=200 if active else STOP_POLLING,
    )


@router.post("/admin/rounds")
async def start_round_form(request: Request, principal: Admin, db: DbSession):
    entered = _entered(await request.form())
    # Starting a round commits and sends to the broker: a worker thread, not the event loop.
    return await run_in_threadpool(_start_round_from_form, request, entered, principal.id, db)


def _start_round_from_form(request: Request, entered: dict[str, Any], user_id: int, db: Session):
    context: dict[str, Any] = {
        **_rounds_page_context(db),
        "form": entered,
        "setting_inputs": setting_inputs(entered["algorithm"]),
    }
    try:
        spec = spec_from_settings(entered["algorithm"], entered["settings"], entered["auto_promote"])
    except ValidationError as exc:
        context["form_error"] = f"Check the form: {describe_problems(exc)}."
        return render(request, "admin/rounds.html", context, status_code=422)
    except ValueError as exc:
        context["form_error"] = str(exc)
        return render(request, "admin/rounds.html", context, status_code=422)
    try:
        round_ = start_round(db, spec, started_by=user_id)
    except RoundConflict as exc:
        context["conflict_round_id"] = exc.round_id
        return render(request, "admin/rounds.html", context, status_code=status.HTTP_409_CONFLICT)
    except RoundError as exc:
        context["form_error"] = str(exc)
        return render(request, "admin/rounds.html", context, status_code=422)
    return RedirectResponse(f"/admin/rounds/{round_.id}", status_code=303)


@router.get("/admin/rounds/{round_id}")
def round_page(round_id: int, request: Request, principal: Admin, db: DbSession):
    round_ = db.get(Round, round_id)
    if round_ is None:
        raise HTTPException(404, f"There is no round {round_id}.")
    runs = list(db.scalars(select(Run).where(Run.round_id == round_id).order_by(Run.id)))
    ended = round_ended(round_)
    live = live_policy(db)
    candidates = list(db.scalars(select(Policy).where(Policy.round_id == round_id).order_by(Policy.version)))
    context: dict[str, Any] = {
        "round": round_,
        "runs": runs,
        "candidates": candidates,
        "live_policy_id": live.id if live else None,
    }
    if is_htmx(request) and request.query_params.get("part") == "gate":
        # The gate's votes, polled while the round waits for them.
        waiting = round_.status == "awaiting_votes"
        context["gate"] = gate_view(db, round_)
        return render(
            request, "admin/round.html", context, block="gate", status_code=200 if waiting else STOP_POLLING
        )
    if is_htmx(request):
        # The poll that sees the end also swaps in the cancel button's absence and the candidates.
        context["oob"] = ended
        return render(
            request, "admin/round.html", context, block="progress", status_code=STOP_POLLING if ended else 200
        )
    evaluation = evaluation_run(db, round_id=round_id)
    versions = policy_versions(db)
    context |= {
        "base_version": versions.get(round_.base_policy_id) if round_.base_policy_id else None,
        "samples": samples_of(evaluation),
        "evaluation": evaluation,
        "gate": gate_view(db, round_),
        "config_json": pretty_json(round_.config),
        "started_by": db.get(User, round_.started_by) if round_.started_by else None,
    }
    return render(request, "admin/round.html", context, block="progress")


@router.post("/admin/rounds/{round_id}/cancel")
def cancel_round_form(round_id: int, principal: Admin, db: DbSession):
    try:
        cancel_round_on_request(db, round_id)
    except CancelRefused as exc:
        raise HTTPException(404 if exc.missing else 409, str(exc)) from None
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
    ended = run_ended(run)
    result = {k: v for k, v in (run.result or {}).items() if k != "samples"}
    context: dict[str, Any] = {"run": run, "result_json": pretty_json(result)}
    if is_htmx(request):
        # The poll that sees the end also swaps in the cancel button's absence, the error and the result.
        context["oob"] = ended
        return render(
            request,
            "admin/run.html",
            context,
            block="progress",
            status_code=STOP_POLLING if ended else 200,
        )
    context |= {
        "config_json": pretty_json(run.config),
        "samples": samples_of(run),
        "metric_count": db.scalar(select(func.count(RunMetric.id)).where(RunMetric.run_id == run_id)) or 0,
        "round": db.get(Round, run.round_id) if run.round_id else None,
    }
    return render(request, "admin/run.html", context, block="progress")


@router.post("/admin/runs/{run_id}/cancel")
def cancel_run_form(run_id: int, principal: Admin, db: DbSession):
    try:
        cancel_run_on_request(db, run_id)
    except CancelRefused as exc:
        raise HTTPException(404 if exc.missing else 409, str(exc)) from None
    return RedirectResponse(f"/admin/runs/{run_id}", status_code=303)


# ---------------------------------------------------------------- metric charts


@router.get("/admin/runs/{run_id}/metrics.json")
def run_metrics_json(run_id: int, principal: Admin, db: DbSession) -> JSONResponse:
    run = db.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"There is no run {run_id}.")
    series = metric_series(db, run_id)
    body = {
        "run_id": run.id,
        "status": run.status,
        "finished": run_ended(run),
        "series": series,
        "labels": {name: metric_label(name) for name in series},
        "charts": chart_layout(series),
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


# ---------------------------------------------------------------- promote and roll back


@router.post("/admin/policies/{version}/promote")
def promote_form(version: int, request: Request, principal: Admin, db: DbSession):
    try:
        policy = promote(db, version, request.app.state.settings).policy
    except RegistryError as exc:
        context = {**policies_context(request, db), "error": str(exc)}
        code = 404 if policy_by_version(db, version) is None else status.HTTP_409_CONFLICT
        return render(request, "admin/policies.html", context, status_code=code)
    wake_local_policy_holder(request)
    return RedirectResponse(f"/admin/policies?notice=promoted-{policy.version}", status_code=303)


@router.post("/admin/policies/rollback")
def rollback_form(request: Request, principal: Admin, db: DbSession):
    try:
        policy = rollback(db, request.app.state.settings).policy
    except RegistryError as exc:
        context = {**policies_context(request, db), "error": str(exc)}
        return render(request, "admin/policies.html", context, status_code=status.HTTP_409_CONFLICT)
    wake_local_policy_holder(request)
    return RedirectResponse(f"/admin/policies?notice=rolled-back-{policy.version}", status_code=303)
