"""The evaluation gate's run body: a candidate against the policy it would replace, by the round's judge.

The judge is the reward model the round trained on the comparisons the policy never saw (its
`judge` stage); both policies answer every eval prompt k times at the length the policy trained at;
the candidate's KL to the base policy is measured too. The report (figures, checks, reasons, a few
samples side by side) is the run's result; the round copies it onto its row for the admin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.data.db import session_factory
from app.data.models import Policy, RewardModel
from app.services.registry import policy_by_version
from app.services.round_spec import GateSection
from app.services.runs import Body, DbReporter, execute
from workers.runs.training import trainer_config


def judge_description(judge: RewardModel, comparisons: int | None = None) -> str:
    """The judge in words, for the admin: which reward model and what it learnt from."""
    metrics = judge.metrics or {}
    accuracy = metrics.get("val_accuracy")
    parts = [f"reward model #{judge.id} held out from the policy's training"]
    if comparisons is not None:
        parts.append(f"trained on {comparisons} comparisons of prompts the policy never learnt from")
    if isinstance(accuracy, int | float):
        parts.append(f"held-out accuracy {accuracy:.2f}")
    return ", ".join(parts)


def evaluation_body(sessions: sessionmaker[Session], settings: Settings) -> Body:
    def body(run_id: int, config: dict[str, Any], reporter: DbReporter) -> dict[str, Any]:
        # The comparisons loader and the evaluation gate load torch: imported when the stage runs.
        from workers.runs.comparisons import load_prompts
        from workers.training.evaluation import GateConfig, evaluate_candidate

        gate = trainer_config(config, "gate", GateSection, GateConfig)
        if config.get("max_new_tokens") and gate.at_training_length:
            gate.sampling.max_new_tokens = int(config["max_new_tokens"])
        with sessions() as db:
            candidate = policy_by_version(db, int(config["candidate_version"]))
            baseline = policy_by_version(db, int(config["baseline_version"]))
            base = db.scalar(select(Policy).where(Policy.kind == "base").order_by(Policy.version))
            judge_id = config.get("judge_model_id") or config.get("reward_model_id")
            judge = db.get(RewardModel, judge_id) if judge_id else None
            eval_prompts = load_prompts(db, "eval", limit=gate.prompts)
            if candidate is None or baseline is None:
                raise ValueError("candidate or baseline policy is missing from the registry")
            candidate_id, candidate_path, baseline_path = candidate.id, candidate.path, baseline.path
            base_path = base.path if base is not None else None
            judge_path, judge_name = (
                (judge.path, judge_description(judge, config.get("judge_comparisons")))
                if judge
                else (None, "")
            )
        if judge_path is None:
            raise ValueError(
                "evaluation needs the round's held-out judge (its judge stage did not produce one)"
            )
        if not eval_prompts:
            raise ValueError(
                "no eval-split prompts: upload a prompt set (a share of it is held out for evaluation)"
            )
        reporter.progress(0, 1, f"sampling both policies on {len(eval_prompts)} held-out prompts")
        report = evaluate_candidate(
            Path(candidate_path),
            Path(baseline_path),
            Path(judge_path),
            eval_prompts,
            gate,
            base_path=Path(base_path) if base_path else None,
            judge_name=judge_name,
            progress=lambda done, total, message: reporter.progress(done, total + 1, message),
        )
        result = report.to_dict()
        with sessions() as db:
            policy = db.get(Policy, candidate_id)
            policy.metrics = {
                **policy.metrics,
                "evaluation": {k: v for k, v in result.items() if k != "samples"},
            }
            # In human mode a candidate that passed the checks waits for the arena votes.
            policy.status = (
                ("candidate" if gate.mode == "human" else "approved") if report.passed else "rejected"
            )
            db.commit()
        reporter.progress(1, 1, "passed" if report.passed else "; ".join(report.reasons))
        return result

    return body


def execute_evaluation_run(run_id: int, sessions: sessionmaker[Session] | None = None) -> str | None:
    sessions = sessions or session_factory()
    return execute(run_id, evaluation_body(sessions, get_settings()), sessions)
