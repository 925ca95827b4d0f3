"""The policy registry in the admin console: every version with its metrics, and one version's page."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy import select

from app.data.models import Policy, RewardModel
from app.services.registry import live_policy, policy_by_version
from app.web.admin_pages import evaluation_run, flat_metrics, policies_context, samples_of
from app.web.deps import DbSession
from app.web.security import Admin
from app.web.templating import render

router = APIRouter(tags=["admin console"], include_in_schema=False)


@router.get("/admin/policies")
def policies_page(request: Request, principal: Admin, db: DbSession, notice: str | None = None):
    return render(request, "admin/policies.html", {**policies_context(request, db), "notice": notice})


@router.get("/admin/policies/{version}")
def policy_page(version: int, request: Request, principal: Admin, db: DbSession):
    policy = policy_by_version(db, version)
    if policy is None:
        raise HTTPException(404, f"There is no policy version {version}.")
    live = live_policy(db)
    evaluation = evaluation_run(db, round_id=policy.round_id) if policy.round_id else None
    if evaluation is None or str(evaluation.config.get("candidate_version", version)) != str(version):
        evaluation = evaluation_run(db, version=version)
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
