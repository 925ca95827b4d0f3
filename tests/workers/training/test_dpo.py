"""DPO: the loss against hand-computed values, and training on the tiny model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.common.reporting import MemoryReporter, RunCancelled
from workers.training.data import Comparison
from workers.training.dpo import DPOConfig, dpo_loss, train_dpo
from workers.training.lora import LoraSettings


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dpo_loss_by_hand():
    # chosen ratio -1 - (-1.5) = 0.5, rejected ratio -2 - (-1.5) = -0.5, beta*h = 0.1
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, rc, rr = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.1)))  # -log sigmoid(0.1) = 0.64440
    assert rc.item() == pytest.approx(0.05) and rr.item() == pytest.approx(-0.05)
    losses.sum().backward()
    # d/d logp_chosen of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))


def test_dpo_loss_label_smoothing_and_symmetry():
    args = (torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    # 0.9 * -log sigmoid(0.1) + 0.1 * -log sigmoid(-0.1)
    assert smoothed.item() == pytest.approx(
        0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1))
    )
    # Equal log-ratios on both sides: log 2, whatever beta is.
    even, _, _ = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 5.0
    )
    assert even.item() == pytest.approx(math.log(2.0))


def comparisons(n: int = 24) -> list[Comparison]:
    """Chosen answers talk about "the ..." and rejected ones about "a ...", under different prompts."""
    rng = random.Random(0)
    nouns = ["cat", "dog", "mat", "park", "tree", "house", "car", "bird"]
    verbs = ["sat", "ran", "slept", "stood"]
    items = []
    for i in range(n):
        noun, other, verb = rng.choice(nouns), rng.choice(nouns), rng.choice(verbs)
        prompt = [{"role": "user", "content": f"Say something about item {i}."}]
        items.append(
            Comparison(
                comparison_id=i,
                prompt_id=i,
                group_id=i,
                prompt=prompt,
                chosen=f"the {noun} {verb} on the {other}",
                rejected=f"a {noun} {verb} on a {other}",
            )
        )
    return items


def test_a_cut_off_answer_teaches_no_end_of_turn(tiny_model_dir):
    """DPO learns the tokens of each answer as the annotator saw it: a finished answer with the
    template's end-of-turn tokens (so DPO teaches when to stop), a cut-off one without them (so a
    preferred cut-off answer never teaches the policy to stop mid-sentence)."""
    from transformers import AutoTokenizer

    from workers.training.dpo import _split_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prompt = [{"role": "user", "content": "Describe a river."}]
    head, finished = _split_tokens(tokenizer, prompt, "A river flows", 256)
    head_cut, cut = _split_tokens(tokenizer, prompt, "A river flows", 256, ended=False)
    assert head == head_cut
    assert finished[: len(cut)] == cut and len(finished) > len(cut)
    assert tokenizer.eos_token_id in finished and tokenizer.eos_token_id not in cut
    assert tokenizer.decode(cut) == "A river flows"


def small_config(**overrides) -> DPOConfig:
    base = dict(
        learning_rate=2e-3,
        epochs=3,
        batch_size=4,
        eval_fraction=0.25,
        eval_every=5,
        checkpoint_every=100,
        warmup_ratio=0.1,
        seed=0,
    )
    base.update(overrides)
    return DPOConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_dpo_raises_the_held_out_chosen_over_rejected_log_ratio(tiny_model_dir, tmp_path):
    reporter = MemoryReporter()
    result = train_dpo(
        tiny_model_dir, comparisons(), tmp_path / "out", tmp_path / "ckpt", small_config(), reporter
    )

    before, after = result.eval_before["eval_logratio"], result.eval_after["eval_logratio"]
    assert after > before + 1.0, (before, after)
    assert result.eval_after["eval_reward_accuracy"] > result.eval_before["eval_reward_accuracy"]
    losses = reporter.series("loss")
    assert len(losses) == result.steps_done > 6
    assert sum(losses[-3:]) / 3 < losses[0]
    assert reporter.series("reward_margin")[-1] > 0
    for name in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "eval_logratio"):
        assert reporter.series(name), name

    start, end = weights(tiny_model_dir), weights(result.policy_path)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_dpo_lora_publishes_a_merged_policy(tiny_model_dir, tmp_path):
    config = small_config(epochs=1, lora=LoraSettings(r=4, alpha=8), learning_rate=2e-3)
    result = train_dpo(
        tiny_model_dir, comparisons(), tmp_path / "out", tmp_path / "ckpt", config, MemoryReporter()
    )
    assert result.eval_after["eval_logratio"] > result.eval_before["eval_logratio"]
    assert not (result.policy_path / "adapter_config.json").exists()
    start, end = weights(tiny_model_dir), weights(result.policy_path)
    assert set(start) == set(end)
    assert any(not torch.equal(start[k], end[k]) for k in start)


@dataclass
class StopAfter(MemoryReporter):
    """Asks to stop once `limit` steps have started: a worker that dies mid-run."""

    limit: int = 0
    calls: int = 0

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls > self.limit


def test_dpo_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    config = small_config(epochs=1, checkpoint_every=2)
    straight = train_dpo(
        tiny_model_dir, comparisons(), tmp_path / "a", tmp_path / "ckpt-a", config, MemoryReporter()
    )
    with pytest.raises(RunCancelled):
        train_dpo(
            tiny_model_dir, comparisons(), tmp_path / "b", tmp_path / "ckpt-b", config, StopAfter(limit=3)
        )
    resumed = train_dpo(
        tiny_model_dir, comparisons(), tmp_path / "b", tmp_path / "ckpt-b", config, MemoryReporter()
    )
    assert resumed.resumed_from_step == 2
    assert resumed.eval_before == straight.eval_before
    a, b = weights(straight.policy_path), weights(resumed.policy_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_second_round_is_anchored_to_the_base_and_starts_where_the_first_ended(tiny_model_dir, tmp_path):
    # Round 1 from the base, round 2 from its result on the same comparisons, both against the base.
    data = comparisons()
    config = small_config(epochs=1)
    first = train_dpo(
        tiny_model_dir, data, tmp_path / "v1", tmp_path / "c1", config, MemoryReporter(), tiny_model_dir
    )
    assert first.eval_before["eval_loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy = reference
    second = train_dpo(
        first.policy_path, data, tmp_path / "v2", tmp_path / "c2", config, MemoryReporter(), tiny_model_dir
    )
    # Measured against the base, round 2 starts with round 1's held-out result, not a fresh log 2
    # (which a reference re-anchored to the live policy would give it, budget and all, every round).
    assert second.eval_before["eval_loss"] == pytest.approx(first.eval_after["eval_loss"], abs=1e-4)
    assert second.eval_before["eval_loss"] < math.log(2.0) - 0.01
    assert second.eval_before["eval_reward_margin"] == pytest.approx(
        first.eval_after["eval_reward_margin"], abs=1e-4
    )
