"""Gradient checkpointing in DPO and PPO: the blocks' activations are recomputed in the backward pass
(checked by counting the checkpointed calls), and training computes the same numbers as without it,
on one process and, for DPO, on two sharded processes."""

from __future__ import annotations

import pytest
import transformers.modeling_utils as modeling_utils

from app.common.reporting import MemoryReporter
from tests.distributed_harness import spawn_group
from tests.workers.training.test_dpo import comparisons, small_config
from tests.workers.training.test_dpo_distributed import SETTINGS as DPO_SETTINGS
from tests.workers.training.test_dpo_distributed import _assert_same_run, _one_process, _train
from tests.workers.training.test_ppo import (
    PROMPTS,
    policy_dir,  # noqa: F401 (fixture)
    reward_model_dir,  # noqa: F401 (fixture)
)
from tests.workers.training.test_ppo_distributed import COMPARED, TheCounter, max_difference, series
from tests.workers.training.test_ppo_distributed import config as ppo_config
from workers.training.dpo import train_dpo
from workers.training.ppo import PPOConfig, train_ppo

# Recomputing a block runs the same kernels on the same inputs: the results agree to float noise.
TOLERANCE = 1e-5


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list[int]:
    """Counts the calls of the checkpoint function Hugging Face wraps each block's forward in."""
    calls: list[int] = []
    real = modeling_utils.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(1)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    return calls


def _dpo_rows(model_dir, root, **overrides) -> dict:
    reporter = MemoryReporter()
    config = small_config(epochs=1, batch_size=4, max_length=48, device="cpu", **overrides)
    train_dpo(model_dir, comparisons(8), root / "out", root / "ckpt", config, reporter)
    return {k: v for k, v in reporter.rows.items() if k[1] != "step_seconds"}


def test_dpo_recomputes_activations_and_trains_the_same(tiny_model_dir, tmp_path, checkpoint_calls):
    plain = _dpo_rows(tiny_model_dir, tmp_path / "plain")
    assert not checkpoint_calls
    recomputed = _dpo_rows(tiny_model_dir, tmp_path / "recomputed", gradient_checkpointing=True)
    assert checkpoint_calls, "no block ran under activation checkpointing"
    assert recomputed == pytest.approx(plain, abs=TOLERANCE)


def _ppo_metrics(model_dir, reward, root, **overrides) -> dict:
    reporter = MemoryReporter()
    settings = ppo_config(steps=2, **overrides).to_dict()
    result = train_ppo(
        model_dir,
        None,
        reward if reward is not None else TheCounter(model_dir),
        PROMPTS,
        root / "policy",
        root / "ckpt",
        PPOConfig.from_dict(settings),
        reporter,
    )
    assert result.rejected_reason is None
    return dict(reporter.rows)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_ppo_recomputes_activations_and_trains_the_same(
    policy_dir,  # noqa: F811
    reward_model_dir,  # noqa: F811
    tmp_path,
    checkpoint_calls,
    lora,
):
    # With LoRA and a reward model the policy and the critic have bases of their own.
    reward = reward_model_dir if lora else None
    plain = _ppo_metrics(policy_dir, reward, tmp_path / "plain", lora=lora)
    assert not checkpoint_calls
    recomputed = _ppo_metrics(policy_dir, reward, tmp_path / "again", lora=lora, gradient_checkpointing=True)
    assert checkpoint_calls, "no block ran under activation checkpointing"
    for name in COMPARED:
        assert max_difference(series(plain, name), series(recomputed, name)) < TOLERANCE, name


def test_ppo_refuses_checkpointing_where_policy_and_critic_switch_adapters_on_one_base(policy_dir, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="train against a reward model, or turn gradient checkpointing off"):
        _ppo_metrics(policy_dir, None, tmp_path, lora={"r": 4, "alpha": 8}, gradient_checkpointing=True)


def test_dpo_with_checkpointing_on_two_sharded_processes_trains_as_one_without(tiny_model_dir, tmp_path):
    settings = {**DPO_SETTINGS, "epochs": 1}
    reference = _one_process(tiny_model_dir, tmp_path / "one", settings)
    first, _ = spawn_group(
        _train,
        2,
        tiny_model_dir,
        tmp_path / "out",
        tmp_path / "ckpt",
        {**settings, "gradient_checkpointing": True},
        None,
    )
    _assert_same_run(first, reference)
