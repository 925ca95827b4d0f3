"""Training run bodies: what a worker does for a run row of kind reward (or judge) and ppo/dpo.

Each runs under the lifecycle of app.services.runs.execute (claim, heartbeat, progress, cancel,
finish) and checkpoints under run_dir(run_id), so a retried run resumes. A run row carries its
trainer's settings as the matching section of a round spec (`reward`, `policy` or `gate`), checked
by that section's model before the trainer's dataclass is built from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.common.files import sha256_folder
from app.config import Settings, get_settings
from app.data.db import session_factory
from app.data.models import Policy, RewardModel, Run
from app.services.prompt_sets import reference_answers
from app.services.quality.gold import record_round_annotations
from app.services.registry import (
    live_policy,
    policy_by_version,
    register_policy_folder,
    register_reward_model,
    reward_models_dir,
)
from app.services.round_spec import (
    DPOSection,
    PPOSection,
    RewardSection,
    Section,
    describe_problems,
)
from app.services.runs import Body, DbReporter, execute, run_dir
from workers.training.config import TrainerConfig

if TYPE_CHECKING:
    from workers.training.stage import StageJob

log = logging.getLogger(__name__)


def trainer_config(
    config: dict[str, Any], key: str, section: type[Section], config_type: type[TrainerConfig]
) -> Any:
    """The trainer's settings dataclass from the run row's `key` section of a round spec, checked by
    the section's model first, so a misspelt or mistyped setting fails the run at once, by name."""
    try:
        checked = section.model_validate(config.get(key) or {})
    except ValidationError as exc:
        raise ValueError(describe_problems(exc, prefix=key)) from None
    return config_type.from_dict(checked.model_dump())


def _policy_for(db: Session, version: int | None) -> Policy:
    policy = policy_by_version(db, version) if version is not None else live_policy(db)
    if policy is None:
        raise ValueError("no policy to start from: run `prefloop init` to register the base policy")
    return policy


def _train(
    job: StageJob,
    config: dict[str, Any],
    reporter: DbReporter,
    run_id: int,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> dict[str, Any]:
    """Hand the stage's job to its trainer: in this process, or on the processes the run's
    `processes` section asks for (workers/runs/launcher.py); the trainer's summary either way."""
    from workers.runs.launcher import plan_processes, train

    with sessions() as db:
        attempt = db.scalar(select(Run.attempts).where(Run.id == run_id)) or 1
    return train(
        job, plan_processes(config, settings), reporter, run_dir(run_id, settings), run_id, attempt, settings
    )


# ---------------------------------------------------------------- reward model


def reward_body(sessions: sessionmaker[Session], settings: Settings) -> Body:
    def body(run_id: int, config: dict[str, Any], reporter: DbReporter) -> dict[str, Any]:
        # Imported when a stage runs, like every trainer below: the trainers and the comparisons loader
        # load torch (and CUDA), and importing this module (the round driver does) must not.
        from workers.runs.comparisons import comparisons_for_side, load_comparisons
        from workers.runs.launcher import plan_processes
        from workers.training.reward import RewardConfig
        from workers.training.stage import StageJob

        reward_config = trainer_config(config, "reward", RewardSection, RewardConfig)
        plan_processes(config, settings)  # a stage asking more than this host offers fails before loading
        with sessions() as db:
            existing = db.scalar(select(RewardModel).where(RewardModel.run_id == run_id))
            if existing is not None:  # registered by an earlier delivery that died before finishing
                return {"reward_model_id": existing.id, **existing.metrics}
            policy = _policy_for(db, config.get("policy_version"))
            snapshot = int(config["comparison_snapshot"])
            # A round trains its policy's reward model and its held-out judge on disjoint prompts.
            split = config.get("comparison_split")
            comparisons = comparisons_for_side(load_comparisons(db, snapshot), split)
        if not comparisons:
            if split:
                raise ValueError(
                    f"no comparisons fall on the {split['side']} side of the judge split: annotators "
                    "must rank tasks of more prompts (or change gate.judge_share)"
                )
            raise ValueError(
                "there are no comparisons to train on yet: annotators must rank some tasks first"
            )
        output = reward_models_dir(settings) / f"run-{run_id}"
        job = StageJob(
            kind="reward",
            start_path=str(policy.path),
            output_dir=str(output),
            checkpoint_dir=str(run_dir(run_id, settings) / "checkpoints"),
            config=reward_config,
            comparisons=comparisons,
        )
        # Returns the published result without training again when an earlier delivery published it.
        result = _train(job, config, reporter, run_id, sessions, settings)
        metrics = dict(result["metrics"])
        if split:
            metrics["trained_for"] = split["side"]  # the policy's reward model, or the gate's judge
        with sessions() as db:
            if config.get("round_id"):  # the round records exactly the annotations it trained on
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
                "steps": result["steps"],
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
        # The comparisons loader and the trainers load torch: imported here, as in reward_body.
        from workers.runs.comparisons import comparisons_for_side, load_comparisons, load_prompts
        from workers.runs.launcher import plan_processes
        from workers.training.stage import StageJob

        algorithm = config.get("algorithm", "ppo")
        source = f"run:{run_id}"
        plan_processes(config, settings)  # a stage asking more than this host offers fails before loading
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
            ptx = reference_answers(db) if algorithm == "ppo" else []
            comparisons = (
                # DPO learns from the comparisons directly: only those the gate's judge does not hold.
                comparisons_for_side(
                    load_comparisons(db, int(config["comparison_snapshot"])), config.get("comparison_split")
                )
                if algorithm == "dpo"
                else []
            )
        workdir = run_dir(run_id, settings)
        output = workdir / "policy"
        metrics: dict[str, Any]
        # How training went, for the run's result: a resumed run names the checkpoint it resumed from.
        schedule: dict[str, Any] = {}
        if (output / "config.json").exists():
            metrics = json.loads((workdir / "policy-metrics.json").read_text())
        elif algorithm == "ppo":
            from workers.training.ppo import PPOConfig

            if reward_model is None:
                raise ValueError("PPO needs a reward model: the round's reward stage did not produce one")
            if not prompts:
                raise ValueError("PPO needs train-split prompts: upload a prompt set first")
            ppo_config = trainer_config(config, "policy", PPOSection, PPOConfig)
            if ppo_config.ptx_coef > 0 and not ptx:
                raise ValueError(
                    f"policy.ptx_coef is {ppo_config.ptx_coef} but no train prompt carries a reference "
                    "answer: upload a prompt set with a 'reference' column, or set policy.ptx_coef to 0"
                )
            job = StageJob(
                kind="ppo",
                start_path=str(start_path),
                output_dir=str(output),
                checkpoint_dir=str(workdir / "checkpoints"),
                config=ppo_config,
                prompts=prompts,
                ptx_conversations=ptx if ppo_config.ptx_coef > 0 else None,
                reference_path=str(reference_path),
                reward_model_path=str(reward_model.path),
            )
            result = _train(job, config, reporter, run_id, sessions, settings)
            if result["rejected_reason"]:
                return {"rejected_reason": result["rejected_reason"], **result["metrics"]}
            metrics = dict(result["metrics"])
            schedule = {"steps": result["steps"], "resumed_from_step": result["resumed_from_step"]}
        else:
            from workers.training.dpo import DPOConfig

            job = StageJob(
                kind="dpo",
                start_path=str(start_path),
                output_dir=str(output),
                checkpoint_dir=str(workdir / "checkpoints"),
                config=trainer_config(config, "policy", DPOSection, DPOConfig),
                comparisons=comparisons,
                reference_path=str(reference_path),  # the base: drift stays bounded across rounds
            )
            result = _train(job, config, reporter, run_id, sessions, settings)
            metrics = dict(result["metrics"])
            schedule = {"steps": result["steps"], "resumed_from_step": result["resumed_from_step"]}
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
            return {"policy_version": policy.version, **schedule, **metrics}

    return body


def execute_policy_run(run_id: int, sessions: sessionmaker[Session] | None = None) -> str | None:
    sessions = sessions or session_factory()
    return execute(run_id, policy_body(sessions, get_settings()), sessions)
