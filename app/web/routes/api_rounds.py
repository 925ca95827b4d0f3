"""JSON API for rounds, runs and the policy registry (admins; researchers may read the registry)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator
from sqlalchemy import select

from app.common.errors import public_error
from app.data.models import Policy, Round, Run
from app.services.cancellation import CancelRefused, cancel_round_on_request
from app.services.promotion import promote, rollback
from app.services.registry import RegistryError, live_policy
from app.services.round_spec import RoundSpec
from app.services.rounds import RoundConflict, RoundError, start_round
from app.services.run_metrics import Series, metric_series
from app.web.deps import DbSession, PathId, PathVersion
from app.web.policy_holder import wake_local_policy_holder
from app.web.security import EXPORT_ROLES, Admin, require_role

router = APIRouter(tags=["rounds and policies"])


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: str
    progress: float
    progress_message: str
    error: str
    attempts: int

    # A short message and its error id; the traceback is in the server's log.
    _short_error = field_validator("error", mode="before")(public_error)
    result: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RoundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    algorithm: str
    status: str
    stage: str
    trigger: str
    config: dict[str, Any]
    comparison_snapshot: int
    error: str
    # The promotion gate's verdict: the held-out judge's figures, checks and reasons ("judge"), and
    # in human mode the arena votes and why the candidate passed, failed or waits ("human").
    gate: dict[str, Any] = {}
    created_at: datetime
    finished_at: datetime | None
    runs: list[RunOut] = []

    _short_error = field_validator("error", mode="before")(public_error)


class PolicyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: int
    kind: str
    status: str
    parent_version: int | None = None
    round_id: int | None
    reward_model_id: int | None
    comparison_snapshot: int | None
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime
    live: bool = False


def _round_out(db, round_: Round) -> RoundOut:
    runs = db.scalars(select(Run).where(Run.round_id == round_.id).order_by(Run.id)).all()
    out = RoundOut.model_validate(round_)
    out.runs = [RunOut.model_validate(r) for r in runs]
    return out


def _policy_out(policy: Policy, live_id: int | None) -> PolicyOut:
    out = PolicyOut.model_validate(policy)
    out.parent_version = policy.parent.version if policy.parent else None
    out.live = policy.id == live_id
    return out


@router.post(
    "/api/rounds",
    status_code=201,
    response_model=RoundOut,
    summary="Start a round",
    responses={409: {"description": "Another round is still active; `round_id` names it."}},
)
def create_round(spec: RoundSpec, principal: Admin, db: DbSession):
    """Start a round: reward model → policy → evaluation → register → promote → refill. 409 while one
    runs. Settings left out keep their defaults; a setting the trainers do not have is a 422 naming it
    (`policy.lr_typo`)."""
    try:
        round_ = start_round(db, spec, started_by=principal.id)
    except RoundConflict as exc:
        return JSONResponse({"detail": str(exc), "round_id": exc.round_id}, status_code=409)
    except RoundError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return _round_out(db, round_)


@router.get("/api/rounds", response_model=list[RoundOut], summary="Recent rounds")
def list_rounds(principal: Admin, db: DbSession, limit: int = 20):
    rounds = db.scalars(select(Round).order_by(Round.id.desc()).limit(min(max(limit, 1), 200))).all()
    return [_round_out(db, r) for r in rounds]


@router.get("/api/rounds/{round_id}", response_model=RoundOut, summary="One round with its runs")
def get_round(round_id: PathId, principal: Admin, db: DbSession):
    round_ = db.get(Round, round_id)
    if round_ is None:
        raise HTTPException(404, f"no round {round_id}")
    return _round_out(db, round_)


@router.post(
    "/api/rounds/{round_id}/cancel",
    response_model=RoundOut,
    summary="Cancel a round",
    responses={409: {"description": "The round already ended."}},
)
def cancel(round_id: PathId, principal: Admin, db: DbSession):
    try:
        round_ = cancel_round_on_request(db, round_id)
    except CancelRefused as exc:
        raise HTTPException(404 if exc.missing else 409, str(exc)) from None
    return _round_out(db, round_)


@router.get("/api/runs/{run_id}", response_model=RunOut, summary="One run")
def get_run(run_id: PathId, principal: Admin, db: DbSession):
    run = db.get(Run, run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    return RunOut.model_validate(run)


@router.get("/api/runs/{run_id}/metrics", summary="A run's metrics as series by name")
def run_metrics(run_id: PathId, principal: Admin, db: DbSession) -> Series:
    """Each metric as [[step, value], ...] in step order; a value that was not finite is null."""
    if db.get(Run, run_id) is None:
        raise HTTPException(404, f"no run {run_id}")
    return metric_series(db, run_id)


@router.get(
    "/api/policies",
    response_model=list[PolicyOut],
    dependencies=[Depends(require_role(*EXPORT_ROLES))],
    summary="The policy registry with lineage",
)
def list_policies(db: DbSession):
    live = live_policy(db)
    policies = db.scalars(select(Policy).order_by(Policy.version.desc())).all()
    return [_policy_out(p, live.id if live else None) for p in policies]


@router.post(
    "/api/policies/{version}/promote",
    response_model=PolicyOut,
    summary="Make a version live",
    responses={409: {"description": "The version was rejected by its evaluation gate."}},
)
def promote_version(version: PathVersion, request: Request, principal: Admin, db: DbSession):
    try:
        policy = promote(db, version).policy
    except RegistryError as exc:
        raise HTTPException(409 if "rejected" in str(exc) else 404, str(exc)) from None
    wake_local_policy_holder(request)
    return _policy_out(policy, policy.id)


@router.post(
    "/api/policies/rollback",
    response_model=PolicyOut,
    summary="Put the previous live version back",
    responses={409: {"description": "There is no previous live version to go back to."}},
)
def rollback_version(request: Request, principal: Admin, db: DbSession):
    try:
        policy = rollback(db).policy
    except RegistryError as exc:
        raise HTTPException(409, str(exc)) from None
    wake_local_policy_holder(request)
    return _policy_out(policy, policy.id)
