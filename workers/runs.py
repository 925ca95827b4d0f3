"""Run bodies: what a worker does for a run row of each kind (reward, ppo/dpo, evaluate).

Every body follows the same lifecycle (`execute`): claim the row (a redelivered message or a second
worker does nothing), report progress and metrics through DbReporter, stop on cancel, record the
result or the full error on the row. Trainers checkpoint under DATA_DIR/runs/<id>/checkpoints, so a
run whose worker died resumes where it stopped when the message is delivered again; the checkpoints
are deleted once the run has succeeded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.db import session_factory
from app.models import Policy, RewardModel, Run
from app.registry import live_policy, policy_by_version, register_reward_model, reward_models_dir
from workers.progress import DbReporter, Heartbeat, claim_run, fail_run, finish_run
from workers.training.reporting import RunCancelled

log = logging.getLogger(__name__)

TASK_FOR_KIND = {
    "reward": "workers.tasks.train_reward_model",
    "ppo": "workers.tasks.train_policy",
    "dpo": "workers.tasks.train_policy",
    "evaluate": "workers.tasks.evaluate_policy",
    "generate": "workers.tasks.generate_responses",
    "export": "workers.tasks.export_dataset",
}

Body = Callable[[int, dict[str, Any], DbReporter], dict[str, Any]]


def run_dir(run_id: int, settings: Settings | None = None) -> Path:
    return (settings or get_settings()).runs_dir / str(run_id)


def dataclass_from(cls, knobs: dict[str, Any] | None):
    """Build a trainer config from user knobs, refusing names the config does not have."""
    knobs = dict(knobs or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if hasattr(cls, "from_dict"):
        return cls.from_dict(knobs)
    return cls(**knobs)


# ---------------------------------------------------------------- creating and enqueueing


def create_run(
    db: Session, kind: str, config: dict[str, Any], round_id: int | None = None, created_by: int | None = None
) -> Run:
    run = Run(kind=kind, config=config, round_id=round_id, created_by=created_by, status="queued")
    db.add(run)
    db.flush()
    return run


def enqueue_run(run: Run) -> None:
    """Send the task that executes a run (its round's task when it belongs to one).
    Call after the transaction that created or re-queued the row has committed."""
    from workers.celery_app import send_task

    if run.round_id is not None:
        send_task("workers.tasks.run_round", args=[run.round_id])
    else:
        send_task(TASK_FOR_KIND[run.kind], args=[run.id])


# ---------------------------------------------------------------- lifecycle


def execute(run_id: int, body: Body, sessions: sessionmaker[Session] | None = None) -> str | None:
    """Claim, run the body, finish. Returns the final status, or None when the run was not ours."""
    sessions = sessions or session_factory()
    with sessions() as db:
        if not claim_run(db, run_id):
            log.info("run %s is owned by another delivery or already finished; nothing to do", run_id)
            return None
        config = dict(db.get(Run, run_id).config)
    reporter = DbReporter(sessions, run_id)
    try:
        with Heartbeat(sessions, run_id):
            result = body(run_id, config, reporter)
    except RunCancelled:
        reporter.flush()
        with sessions() as db:
            finish_run(db, run_id, "cancelled", error="cancelled on request")
        return "cancelled"
    except Exception as exc:
        log.exception("run %s failed", run_id)
        reporter.flush()
        with sessions() as db:
            fail_run(db, run_id, exc)
        return "failed"
    reporter.flush()
    with sessions() as db:
        finish_run(db, run_id, "succeeded", result=result)
    # Checkpoints exist to resume a run after a crash; a finished run's output is in the registry, and
    # each checkpoint holds a full model with its optimiser state, so they go now.
    shutil.rmtree(run_dir(run_id) / "checkpoints", ignore_errors=True)
    return "succeeded"


def _policy_for(db: Session, version: int | None) -> Policy:
    policy = policy_by_version(db, version) if version is not None else live_policy(db)
    if policy is None:
        raise ValueError("no policy to start from: run `prefloop init` to register the base policy")
    return policy


# ---------------------------------------------------------------- reward model


def reward_body(sessions: sessionmaker[Session], settings: Settings) -> Body:
    def body(run_id: int, config: dict[str, Any], reporter: DbReporter) -> dict[str, Any]:
        from workers.datasets import load_comparisons
        from workers.training.checkpoint import sha256_folder
        from workers.training.reward import RewardConfig, train_reward_model

        trainer_config = dataclass_from(RewardConfig, config.get("knobs"))
        with sessions() as db:
            existing = db.scalar(select(RewardModel).where(RewardModel.run_id == run_id))
            if existing is not None:  # registered by an earlier delivery that died before finishing
                return {"reward_model_id": existing.id, **existing.metrics}
            policy = _policy_for(db, config.get("policy_version"))
            snapshot = int(config["comparison_snapshot"])
            comparisons = load_comparisons(db, snapshot)
        if not comparisons:
            raise ValueError(
                "there are no comparisons to train on yet: annotators must rank some tasks first"
            )
        output = reward_models_dir(settings) / f"run-{run_id}"
        # Returns the published result without training again when an earlier delivery published it.
        result = train_reward_model(
            Path(policy.path),
            comparisons,
            output,
            run_dir(run_id, settings) / "checkpoints",
            trainer_config,
            reporter,
        )
        metrics = dict(result.metrics)
        with sessions() as db:
            if config.get("round_id"):  # the round records exactly the annotations it trained on
                from app.quality.gold import record_round_annotations

                record_round_annotations(db, config["round_id"], {c.group_id for c in comparisons})
            row = register_reward_model(
                db,
                output,
                sha256_folder(output),
                metrics=metrics,
                comparison_snapshot=snapshot,
                base_policy_id=policy.id,
                round_id=config.get("round_id"),
                run_id=run_id,
            )
            db.commit()
            return {
                "reward_model_id": row.id,
                "comparisons": len(comparisons),
                "steps": result.steps,
                **metrics,
            }

    return body


def execute_reward_run(run_id: int, sessions: sessionmaker[Session] | None = None) -> str | None:
    sessions = sessions or session_factory()
    return execute(run_id, reward_body(sessions, get_settings()), sessions)


# ---------------------------------------------------------------- policy (PPO-max or DPO)


def _base_policy(db: Session) -> Policy:
    base = db.scalar(select(Policy).where(Policy.kind == "base").order_by(Policy.version))
    if base is None:
        raise ValueError("no base policy registered: run `prefloop init`")
    return base


def policy_body(sessions: sessionmaker[Session], settings: Settings) -> Body:
    def body(run_id: int, config: dict[str, Any], reporter: DbReporter) -> dict[str, Any]:
        from app.registry import register_policy_folder
        from workers.datasets import load_comparisons, load_prompts
        from workers.training.checkpoint import sha256_folder

        algorithm = config.get("algorithm", "ppo")
        source = f"run:{run_id}"
        with sessions() as db:
            existing = db.scalar(select(Policy).where(Policy.source == source))
            if existing is not None:  # registered by an earlier delivery that died before finishing
                return {"policy_version": existing.version, **existing.metrics}
            start = _policy_for(db, config.get("policy_version"))
            start_path, start_id = Path(start.path), start.id
            reference_path = Path(_base_policy(db).path)
            reward_model = (
                db.get(RewardModel, config["reward_model_id"]) if config.get("reward_model_id") else None
            )
            prompts = load_prompts(db, "train")
            comparisons = (
                load_comparisons(db, int(config["comparison_snapshot"])) if algorithm == "dpo" else []
            )
        workdir = run_dir(run_id, settings)
        output = workdir / "policy"
        metrics: dict[str, Any]
        if (output / "config.json").exists():
            metrics = json.loads((workdir / "policy-metrics.json").read_text())
        elif algorithm == "ppo":
            from workers.training.ppo import PPOConfig, train_ppo

            if reward_model is None:
                raise ValueError("PPO needs a reward model: the round's reward stage did not produce one")
            if not prompts:
                raise ValueError("PPO needs train-split prompts: upload a prompt set first")
            result = train_ppo(
                start_path,
                reference_path,
                Path(reward_model.path),
                prompts,
                output,
                workdir / "checkpoints",
                dataclass_from(PPOConfig, config.get("knobs")),
                reporter,
            )
            if result.rejected_reason:
                return {"rejected_reason": result.rejected_reason, **result.final_metrics}
            metrics = dict(result.final_metrics)
        else:
            from workers.training.dpo import DPOConfig, train_dpo

            result = train_dpo(
                start_path,
                comparisons,
                output,
                workdir / "checkpoints",
                dataclass_from(DPOConfig, config.get("knobs")),
                reporter,
            )
            metrics = dict(getattr(result, "final_metrics", None) or getattr(result, "metrics", {}) or {})
        (workdir / "policy-metrics.json").write_text(json.dumps(metrics))
        with sessions() as db:
            parent = db.get(Policy, start_id)
            policy = register_policy_folder(
                db,
                output,
                sha256_folder(output),
                kind=algorithm,
                parent=parent,
                round_id=config.get("round_id"),
                reward_model_id=config.get("reward_model_id"),
                comparison_snapshot=config.get("comparison_snapshot"),
                metrics=metrics,
                status="candidate",
                source=source,
                settings=settings,
            )
            return {"policy_version": policy.version, **metrics}

    return body


def execute_policy_run(run_id: int, sessions: sessionmaker[Session] | None = None) -> str | None:
    sessions = sessions or session_factory()
    return execute(run_id, policy_body(sessions, get_settings()), sessions)


# ---------------------------------------------------------------- evaluation gate


def evaluation_body(sessions: sessionmaker[Session], settings: Settings) -> Body:
    def body(run_id: int, config: dict[str, Any], reporter: DbReporter) -> dict[str, Any]:
        from dataclasses import asdict, is_dataclass

        from workers.datasets import load_prompts
        from workers.training.evaluation import GateConfig, evaluate_candidate
        from workers.training.generation import SamplingConfig

        with sessions() as db:
            candidate = policy_by_version(db, int(config["candidate_version"]))
            baseline = policy_by_version(db, int(config["baseline_version"]))
            reward_model = (
                db.get(RewardModel, config["reward_model_id"]) if config.get("reward_model_id") else None
            )
            eval_prompts = load_prompts(db, "eval", limit=int(config.get("eval_prompts", 32)))
            if candidate is None or baseline is None:
                raise ValueError("candidate or baseline policy is missing from the registry")
            candidate_id, candidate_path, baseline_path = candidate.id, candidate.path, baseline.path
        if reward_model is None:
            raise ValueError("evaluation needs the round's reward model")
        if not eval_prompts:
            raise ValueError(
                "no eval-split prompts: upload a prompt set (a share of it is held out for evaluation)"
            )
        reporter.progress(0, 1, "sampling both policies on held-out prompts")
        sampling = SamplingConfig(**config.get("sampling", {"max_new_tokens": 64}))
        report = evaluate_candidate(
            Path(candidate_path),
            Path(baseline_path),
            Path(reward_model.path),
            eval_prompts,
            sampling,
            dataclass_from(GateConfig, config.get("gate")),
        )
        result = asdict(report) if is_dataclass(report) else dict(report)
        with sessions() as db:
            policy = db.get(Policy, candidate_id)
            policy.metrics = {
                **policy.metrics,
                "evaluation": {k: v for k, v in result.items() if k != "samples"},
            }
            policy.status = "approved" if report.passed else "rejected"
            db.commit()
        reporter.progress(1, 1, "passed" if report.passed else "; ".join(report.reasons))
        return result

    return body


def execute_evaluation_run(run_id: int, sessions: sessionmaker[Session] | None = None) -> str | None:
    sessions = sessions or session_factory()
    return execute(run_id, evaluation_body(sessions, get_settings()), sessions)
