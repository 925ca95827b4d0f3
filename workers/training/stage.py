"""A training stage as plain data, and the one call that hands it to its trainer.

A worker gathers a stage's inputs from the database (comparisons, prompts, model folders, the
trainer's settings) into a `StageJob`. In one process it calls `run_stage` itself; across processes
every rank reads the same job back from a JSON file (workers/training/launch.py) and calls the same
`run_stage`, so the single-process and the distributed stage are one path with one set of inputs.
`run_stage` returns a JSON-safe summary, the same for both, which the worker records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.common.reporting import Reporter
from workers.training.config import TrainerConfig
from workers.training.data import Comparison

STAGE_KINDS = ("reward", "ppo", "dpo")


def config_type(kind: str) -> type[TrainerConfig]:
    """The settings dataclass of a stage kind's trainer (imported here: trainers load transformers)."""
    if kind == "reward":
        from workers.training.reward import RewardConfig

        return RewardConfig
    if kind == "ppo":
        from workers.training.ppo import PPOConfig

        return PPOConfig
    if kind == "dpo":
        from workers.training.dpo import DPOConfig

        return DPOConfig
    raise ValueError(f"unknown training stage {kind!r}; known: {', '.join(STAGE_KINDS)}")


@dataclass
class StageJob:
    """Everything one trainer call needs. Paths are strings so the job reads back from JSON unchanged."""

    kind: str  # reward | ppo | dpo
    start_path: str  # the policy the stage starts from (a reward model's backbone too)
    output_dir: str  # where the trainer publishes its folder
    checkpoint_dir: str  # kept across attempts: a retry resumes from the newest checkpoint
    config: TrainerConfig  # RewardConfig, PPOConfig or DPOConfig
    comparisons: list[Comparison] = field(default_factory=list)  # reward and DPO
    prompts: list[list[dict]] = field(default_factory=list)  # PPO's train prompts
    ptx_conversations: list[list[dict]] | None = None  # PPO's ptx chats, when ptx_coef > 0
    reference_path: str | None = None  # PPO's and DPO's reference policy
    reward_model_path: str | None = None  # PPO's reward model

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["comparisons"] = [dataclasses.asdict(c) for c in self.comparisons]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageJob:
        data = dict(data)
        data["config"] = config_type(data["kind"]).from_dict(data["config"])
        data["comparisons"] = [Comparison(**c) for c in data.get("comparisons", [])]
        return cls(**data)


def run_stage(job: StageJob, reporter: Reporter) -> dict[str, Any]:
    """Call the stage's trainer with the job's inputs; the summary the worker records.

    Summary: `steps`, `metrics` (the trainer's final metrics), and for the policy trainers
    `resumed_from_step`; PPO adds `rejected_reason` (None unless a collapse guard tripped).
    """
    if job.kind == "reward":
        from workers.training.reward import train_reward_model

        result = train_reward_model(
            Path(job.start_path),
            job.comparisons,
            Path(job.output_dir),
            Path(job.checkpoint_dir),
            job.config,
            reporter,
        )
        return {"steps": result.steps, "metrics": dict(result.metrics)}
    if job.kind == "ppo":
        from workers.training.ppo import train_ppo

        result = train_ppo(
            Path(job.start_path),
            Path(job.reference_path) if job.reference_path else None,
            Path(job.reward_model_path or ""),
            job.prompts,
            Path(job.output_dir),
            Path(job.checkpoint_dir),
            job.config,
            reporter,
            ptx_conversations=job.ptx_conversations,
        )
        return {
            "steps": result.steps_done,
            "resumed_from_step": result.resumed_from_step,
            "metrics": dict(result.final_metrics),
            "rejected_reason": result.rejected_reason,
        }
    if job.kind == "dpo":
        from workers.training.dpo import train_dpo

        result = train_dpo(
            Path(job.start_path),
            job.comparisons,
            Path(job.output_dir),
            Path(job.checkpoint_dir),
            job.config,
            reporter,
            reference_path=Path(job.reference_path) if job.reference_path else None,
        )
        return {
            "steps": result.steps_done,
            "resumed_from_step": result.resumed_from_step,
            "metrics": dict(result.final_metrics),
        }
    raise ValueError(f"unknown training stage {job.kind!r}; known: {', '.join(STAGE_KINDS)}")
