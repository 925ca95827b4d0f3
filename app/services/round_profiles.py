"""Named round profiles: the product's defaults for a device, in one place.

A profile says how many rankings a round learns from, how long the task pool's answers are, and
the round spec (the body of POST /api/rounds) for PPO-max and DPO. `prefloop demo-loop` and the
efficacy benchmark (benchmarks/efficacy.py) both read them, so a newcomer's first round on a CPU is
the round whose effect the benchmark measures.

- `cpu`: SmolLM2-135M on a 2-core CPU, one round in about 30 minutes: 128 rankings of 4 answers
  at 64 tokens, a reward model (and a held-out judge) of two epochs at 3e-5 with a fifth of its prompts held out, PPO-max for 24 steps of 8
  rollouts at the same length, the gate on every held-out prompt × 2 samples.
- `gpu`: a single GPU: 300 rankings at 128 tokens, two reward epochs, 100 PPO steps of 32
  rollouts, the gate on every held-out prompt × 4 samples.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RoundProfile:
    name: str
    summary: str
    rankings: int  # tasks ranked before each round
    max_new_tokens: int  # the task pool's answer length, which is DPO's training length too
    rounds: int  # rounds the benchmark runs by default
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # algorithm -> POST /api/rounds body

    def spec(self, algorithm: str) -> dict[str, Any]:
        """The round spec for this algorithm (a copy: callers may change it)."""
        if algorithm not in self.specs:
            raise ValueError(
                f"profile {self.name!r} has no {algorithm!r} round; choose {', '.join(self.specs)}"
            )
        return copy.deepcopy(self.specs[algorithm])


def _specs(
    *,
    reward: dict[str, Any],
    ppo: dict[str, Any],
    dpo: dict[str, Any],
    max_new_tokens: int,
    gate_samples: int,
) -> dict[str, dict[str, Any]]:
    gate = {"samples_per_prompt": gate_samples}
    ppo_policy = {**ppo, "sampling": {"max_new_tokens": max_new_tokens}}
    return {
        "ppo": {"algorithm": "ppo", "reward": dict(reward), "policy": ppo_policy, "gate": gate},
        "dpo": {"algorithm": "dpo", "reward": dict(reward), "policy": dpo, "gate": dict(gate)},
    }


CPU = RoundProfile(
    name="cpu",
    summary="SmolLM2-135M on a small CPU: 128 rankings, one PPO-max round in about 30 minutes",
    rankings=128,
    max_new_tokens=64,
    rounds=1,
    specs=_specs(
        # The reward model sees half of 128 rankings (the judge the other half): about 330 pairs, so one
        # epoch at 1e-5 is some fifteen steps and leaves it near chance (held-out accuracy 0.60 on the
        # structured annotator's comparisons with 25% noise; 2 epochs at 3e-5: 0.67, p = 0.003). A fifth
        # of its prompts held out: a tenth, about 36 noisy pairs, is too few for the above-chance check.
        reward={"epochs": 2, "learning_rate": 3e-5, "eval_fraction": 0.2},
        ppo={"steps": 24, "rollout_batch_size": 8, "mini_batch_size": 4},
        dpo={"epochs": 1, "batch_size": 8, "max_length": 256},
        max_new_tokens=64,
        gate_samples=2,
    ),
)

GPU = RoundProfile(
    name="gpu",
    summary="one GPU: 300 rankings per round, PPO-max 100 steps of 32 rollouts",
    rankings=300,
    max_new_tokens=128,
    rounds=3,
    specs=_specs(
        reward={"epochs": 2},
        ppo={"steps": 100, "rollout_batch_size": 32, "mini_batch_size": 8},
        dpo={"epochs": 2, "batch_size": 8},
        max_new_tokens=128,
        gate_samples=4,
    ),
)

PROFILES: dict[str, RoundProfile] = {p.name: p for p in (CPU, GPU)}


def profile_named(name: str) -> RoundProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown round profile {name!r}; choose {', '.join(PROFILES)}")
    return PROFILES[name]


def profile_for_device(device: str) -> RoundProfile:
    """The profile for a torch device name ('cpu', 'cuda', 'cuda:1'); 'auto' looks for a GPU."""
    if device == "auto":
        import torch  # only when asked to look: the web process never is

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPU if device.startswith("cuda") else CPU
