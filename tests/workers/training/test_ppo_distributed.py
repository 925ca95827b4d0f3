"""PPO-max on two real gloo processes against one process with the same global batch.

Both runs sample every rollout row from its own seeded stream, so they draw the same tokens; the
whole-batch statistics are computed from the gathered buffer, mini-batches come from one global
permutation and each process's loss is its share of the mini-batch mean. What is left between
them is float noise: FSDP2 sums gradients in another order, and a forward pass over half the rows
rounds a little differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.common.reporting import MemoryReporter, RunCancelled
from tests.distributed_harness import spawn_group
from tests.workers.training.test_ppo import (  # noqa: F401 (fixtures)
    PROMPTS,
    one_thread,
    policy_dir,
    reward_model_dir,
)
from workers.training.ppo import PPOConfig, RolloutSampling, train_ppo

# Float noise between the runs, measured on this model: metrics differ by at most 3e-6 (the grad norm,
# about 19), published weights by at most 3e-7.
# The bounds leave room for other CPUs and BLAS builds while staying far below any real difference
# (one row's reward or one token of a response moves these metrics by > 1e-2).
METRIC_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-5
COMPARED = ("reward_raw", "kl_ref", "policy_loss", "value_loss", "response_length", "grad_norm")


class TheCounter:
    """A deterministic reward (+1 per " the" in the response) that also records what it scored, so the
    test can compare the sampled tokens; each process sees only its own rows."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        (self.the_id,) = AutoTokenizer.from_pretrained(model_dir)(" the", add_special_tokens=False).input_ids
        self.seen: list[list[list[int]]] = []

    def __call__(self, prompt_texts, texts, ids):
        self.seen.append([list(r) for r in ids])
        return [float(sum(t == self.the_id for t in r)) for r in ids]


def config(**overrides) -> PPOConfig:
    base = dict(
        steps=3,
        rollout_batch_size=8,
        mini_batch_size=4,  # two mini-batches a step: the second sees a policy that moved
        forward_batch_size=4,
        learning_rate=3e-3,
        critic_learning_rate=9e-3,
        lr_warmup_updates=1,
        sampling=RolloutSampling(max_new_tokens=8),
        critic_warmup_steps=0,
        guard_max_repetition=None,
        missing_eos_penalty=0.5,
        guard_min_eos_share=None,
        guard_length_headroom=None,
        checkpoint_every=100,
        device="cpu",
        dtype="float32",
        seed=3,
    )
    base.update(overrides)
    return PPOConfig(**base)


def _train(model_dir: Path, out: Path, settings: dict) -> dict:
    """One rank's run (also the one-process run): its reported metrics, result and scored rows."""
    reward = TheCounter(model_dir)
    reporter = MemoryReporter()
    result = train_ppo(
        model_dir,
        None,
        reward,
        PROMPTS,
        out / "policy",
        out / "ckpt",
        PPOConfig.from_dict(settings),
        reporter,
    )
    return {
        "metrics": {(step, name): value for (step, name), value in reporter.rows.items()},
        "rejected": result.rejected_reason,
        "sha": result.sha256,
        "path": str(result.policy_path) if result.policy_path else None,
        "seen": reward.seen,
    }


def series(metrics: dict, name: str) -> list[float]:
    return [value for (step, key), value in sorted(metrics.items()) if key == name]


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-3, "critic_learning_rate": 3e-3},
        # Parameters stay gathered between forward and backward, while the adapter switches between
        # the policy's and the critic's on the one shared base.
        {"lora": {"r": 4, "alpha": 8}, "sharding": "shard_grad_op", "learning_rate": 1e-3},
    ],
    ids=["full", "lora", "lora-shard_grad_op"],
)
def test_two_processes_train_as_one_does(policy_dir, tmp_path, overrides):  # noqa: F811
    settings = config(**overrides).to_dict()
    one = _train(policy_dir, tmp_path / "one", settings)
    first, second = spawn_group(_train, 2, policy_dir, tmp_path / "two", settings)

    assert one["rejected"] is None and first["rejected"] is None and second["rejected"] is None
    # The same rows drawn: each process generated and scored its half of every step's batch.
    assert len(first["seen"]) == len(second["seen"]) == len(one["seen"]) == 3
    for step, whole in enumerate(one["seen"]):
        assert first["seen"][step] + second["seen"][step] == whole, f"step {step + 1}"
    # Only the first process reports.
    assert second["metrics"] == {}
    two = first["metrics"]
    assert {name for _, name in two} == {name for _, name in one["metrics"]}
    for name in COMPARED:
        difference = max_difference(series(one["metrics"], name), series(two, name))
        assert difference < METRIC_TOLERANCE, (name, difference)
    # The first mini-batch of each step is scored by the policy that sampled it.
    assert series(two, "ratio_first_minibatch") == pytest.approx([1.0] * 3, abs=1e-5)
    assert max(series(two, "approx_kl")) > 0  # ... and the second by one that had moved

    # One published folder, the same on every process's result, equal to the one-process weights.
    assert first["sha"] == second["sha"] and first["path"] == second["path"]
    published = load_file(str(Path(first["path"]) / "model.safetensors"))
    alone = load_file(str(Path(one["path"]) / "model.safetensors"))
    assert published.keys() == alone.keys()
    before = load_file(str(policy_dir / "model.safetensors"))
    assert any(not torch.equal(before[k], published[k]) for k in before), "PPO changed nothing"
    worst = max((published[k] - alone[k]).abs().max().item() for k in alone)
    assert worst < WEIGHT_TOLERANCE, worst
    assert not (Path(first["path"]) / "adapter_config.json").exists()


def _train_with_reward_model(model_dir: Path, reward_dir: Path, out: Path, settings: dict) -> dict:
    reporter = MemoryReporter()
    result = train_ppo(
        model_dir,
        None,
        reward_dir,
        PROMPTS,
        out / "policy",
        out / "ckpt",
        PPOConfig.from_dict(settings),
        reporter,
    )
    return {
        "metrics": dict(reporter.rows),
        "path": str(result.policy_path),
        "rejected": result.rejected_reason,
    }


def test_lora_with_a_reward_model_on_two_processes(policy_dir, reward_model_dir, tmp_path):  # noqa: F811
    # The reward model is the critic's base with its adapter off: scoring goes through the sharded root.
    settings = config(lora={"r": 4, "alpha": 8}, learning_rate=1e-3).to_dict()
    one = _train_with_reward_model(policy_dir, reward_model_dir, tmp_path / "one", settings)
    first, _ = spawn_group(
        _train_with_reward_model, 2, policy_dir, reward_model_dir, tmp_path / "two", settings
    )
    assert one["rejected"] is None and first["rejected"] is None
    for name in COMPARED:
        a, b = series(one["metrics"], name), series(first["metrics"], name)
        assert b == pytest.approx(a, rel=METRIC_TOLERANCE, abs=METRIC_TOLERANCE), name
    published = load_file(str(Path(first["path"]) / "model.safetensors"))
    alone = load_file(str(Path(one["path"]) / "model.safetensors"))
    assert max((published[k] - alone[k]).abs().max().item() for k in alone) < WEIGHT_TOLERANCE


class StopAfter(MemoryReporter):
    """Asks to stop once `step` has been reported: the cancel a user sends mid-run."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def should_stop(self) -> bool:
        return any(done >= self.step for done, _ in self.rows)


def _straight_stopped_and_resumed(model_dir: Path, out: Path) -> dict:
    """Four steps straight; then four steps cancelled after the checkpoint at step 2 and run again."""
    settings = config(steps=4, checkpoint_every=2)

    def run(name: str, reporter: MemoryReporter):
        return train_ppo(
            model_dir,
            None,
            TheCounter(model_dir),
            PROMPTS,
            out / name,
            out / f"{name}-ckpt",
            settings,
            reporter,
        )

    straight_reporter = MemoryReporter()
    straight = run("straight", straight_reporter)
    try:
        run("resumed", StopAfter(2))
        cancelled = False
    except RunCancelled:
        cancelled = True
    resumed_reporter = MemoryReporter()
    resumed = run("resumed", resumed_reporter)
    return {
        "cancelled": cancelled,
        "straight": (straight.steps_done, str(straight.policy_path), dict(straight_reporter.rows)),
        "resumed": (resumed.steps_done, str(resumed.policy_path), dict(resumed_reporter.rows)),
        "resumed_from": resumed.resumed_from_step,
    }


def test_two_processes_resume_from_their_checkpoint_after_a_cancel(policy_dir, tmp_path):  # noqa: F811
    first, second = spawn_group(_straight_stopped_and_resumed, 2, policy_dir, tmp_path)
    assert first["cancelled"] and second["cancelled"], "every process stops at the same step"
    assert first["resumed_from"] == second["resumed_from"] == 2
    steps, path, rows = first["resumed"]
    straight_steps, straight_path, straight_rows = first["straight"]
    assert steps == straight_steps == 4
    assert sorted({step for step, _ in rows}) == [3, 4]  # only the remaining steps ran
    for (step, name), value in rows.items():
        if name not in ("step_seconds", "generation_seconds", "tokens_per_s"):  # wall-clock, not results
            assert value == pytest.approx(straight_rows[(step, name)], abs=1e-6), (step, name)
    a = load_file(str(Path(straight_path) / "model.safetensors"))
    b = load_file(str(Path(path) / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def _refused(model_dir: Path, out: Path) -> str:
    try:
        _train(model_dir, out, config(rollout_batch_size=7, mini_batch_size=7).to_dict())
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_batch_that_does_not_split_evenly_is_refused(policy_dir, tmp_path):  # noqa: F811
    messages = spawn_group(_refused, 2, policy_dir, tmp_path)
    assert all("policy.rollout_batch_size is 7" in m and "multiple of 2" in m for m in messages)


def test_the_rollout_engine_and_sharding_are_checked():
    with pytest.raises(ValueError, match="unknown rollout engine 'fast'"):
        PPOConfig(rollout_engine="fast")
    with pytest.raises(ValueError, match="unknown sharding 'ddp'"):
        PPOConfig(sharding="ddp")
