"""What several admin pages show alike: run and round state, the live version, evaluations, metrics rows.

Model output, prompts and error texts are untrusted: these helpers hand them to the templates as plain
strings, which print them autoescaped, never `|safe`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.data.models import Policy, PolicyAlias, Round, Run
from app.services.human_gate import round_verdict

RUN_ENDED = ("succeeded", "failed", "cancelled")
ROUND_ACTIVE = ("queued", "running", "awaiting_votes")  # votes still come in while it waits
# htmx stops polling when a response carries this status (htmx docs, "Polling").
STOP_POLLING = 286


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


def runs_of(db: Session, round_ids: list[int]) -> dict[int, list[Run]]:
    """Each round's runs in the order they were created."""
    by_round: dict[int, list[Run]] = {rid: [] for rid in round_ids}
    if round_ids:
        for run in db.scalars(select(Run).where(Run.round_id.in_(round_ids)).order_by(Run.id)):
            by_round[run.round_id].append(run)  # type: ignore[index]
    return by_round


def recent_rounds(db: Session, limit: int) -> list[Round]:
    return list(db.scalars(select(Round).order_by(Round.id.desc()).limit(limit)))


def policy_versions(db: Session) -> dict[int, int]:
    """Policy id → version, to show lineage as version numbers."""
    return dict(db.execute(select(Policy.id, Policy.version)).tuples().all())


def live_state(request: Request, db: Session) -> dict[str, Any]:
    """The live alias (what should be served) and what this web process actually serves."""
    alias = db.get(PolicyAlias, "live")
    versions = policy_versions(db)
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


def policies_context(request: Request, db: Session) -> dict[str, Any]:
    """The registry page's context: every version with its metrics, and the live state."""
    policies = list(db.scalars(select(Policy).order_by(Policy.version.desc())))
    versions = {p.id: p.version for p in policies}
    return {
        "policies": policies,
        "versions": versions,
        "metrics": {p.id: flat_metrics(p.metrics) for p in policies},
        "live": live_state(request, db),
    }


def evaluation_run(db: Session, round_id: int | None = None, version: int | None = None) -> Run | None:
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
                "live_reward": sample.get(
                    "live_score", sample.get("live_reward", sample.get("baseline_reward"))
                ),
                "candidate_reward": sample.get("candidate_score", sample.get("candidate_reward")),
            }
        )
    return out


def gate_view(db: Session, round_: Round) -> dict[str, Any]:
    """The round's promotion gate for its page: the held-out judge's figures, checks and reasons, and
    in human mode the arena votes (counted afresh while the round waits for them)."""
    gate = dict(round_.gate or {})
    if round_.status == "awaiting_votes":
        verdict = round_verdict(db, round_)
        if verdict is not None:
            gate["human"] = {**(gate.get("human") or {}), **verdict.as_dict()}
    return gate
