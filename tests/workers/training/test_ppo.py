"""PPO-max end to end on the tiny model with a rule-based reward (+1 per " the" in the response)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.common.reporting import MemoryReporter, RunCancelled
from workers.training.lora import LoraSettings, pack, prompt_token_ids
from workers.training.ppo import PPOConfig, PPOModels, RolloutSampling, train_ppo
from workers.training.reward import score

WORDS = [
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "in",
    "the",
    "mat",
    "park",
    "big",
    "small",
    "red",
    "blue",
    "and",
    "then",
]
PROMPTS = [
    [{"role": "system", "content": "Reply."}, {"role": "user", "content": f"item {i}"}] for i in range(16)
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tests share two cores with other jobs; one intra-op thread avoids spin-waiting under contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model after a few supervised steps on replies made of 16 words, one of them
    " the": a policy that says " the" now and then, which PPO can learn to say more often."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    texts = [
        tokenizer.apply_chat_template(
            [
                *PROMPTS[i % 16],
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(12))},
            ],
            tokenize=False,
        )
        for i in range(64)
    ]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokenizer.padding_side = "right"
    for step in range(40):
        enc = tokenizer(
            texts[step * 8 % 64 : step * 8 % 64 + 8],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dest = tmp_path_factory.mktemp("sft-policy")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def the_reward(policy_dir):
    from transformers import AutoTokenizer

    (the_id,) = AutoTokenizer.from_pretrained(policy_dir)(" the", add_special_tokens=False).input_ids

    def reward(prompt_texts, texts, ids):
        assert len(prompt_texts) == len(texts) == len(ids)
        return [float(sum(t == the_id for t in r)) for r in ids]

    return reward


def small_config(**overrides) -> PPOConfig:
    base = dict(
        steps=30,
        rollout_batch_size=8,
        mini_batch_size=8,
        learning_rate=3e-3,
        critic_learning_rate=9e-3,
        lr_warmup_updates=1,
        sampling=RolloutSampling(max_new_tokens=16),
        guard_max_repetition=None,  # " the the the" is what this reward asks for
        critic_warmup_steps=0,
        # 16-token rollouts of a policy taught 12-word replies: cut-off answers are common here
        missing_eos_penalty=None,
        guard_min_eos_share=None,
        guard_length_headroom=None,
        checkpoint_every=100,
        seed=0,
    )
    base.update(overrides)
    return PPOConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_reward_rises_while_kl_stays_under_the_guard(policy_dir, the_reward, tmp_path):
    reporter = MemoryReporter()
    # The test learning rate is huge, so the KL leash is firmer than MOSS's 0.02: over seeds 0-2 the
    # reward rises by 2.5-3 while the KL to the reference peaks at 10-16 nats.
    config = small_config(kl_coef=0.05)
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "out", tmp_path / "ckpt", config, reporter
    )

    assert result.rejected_reason is None
    rewards = reporter.series("reward_raw")
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 1.0, rewards
    kl = reporter.series("kl_ref")
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert max(kl) < config.guard_max_kl
    for name in (
        "reward_normalised",
        "approx_kl",
        "response_length",
        "ppl_policy",
        "ppl_reference",
        "repetition_rate",
        "eos_share",
        "policy_clipfrac",
        "value_clipfrac",
        "value_loss",
        "policy_loss",
        "entropy",
        "tokens_per_s",
    ):
        assert len(reporter.series(name)) == 30, name
    assert reporter.progress_log[-1][:2] == (30, 30)

    before, after = weights(policy_dir), weights(result.policy_path)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "PPO did not change any parameter"
    assert result.sha256 and (result.policy_path / "tokenizer.json").exists()


def test_minibatches_and_epochs_use_clipping(policy_dir, the_reward, tmp_path):
    # Two mini-batches over two epochs: later updates see a policy that moved, so ratios leave 1.
    reporter = MemoryReporter()
    config = small_config(steps=3, mini_batch_size=4, ppo_epochs=2, learning_rate=2e-2)
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "out", tmp_path / "ckpt", config, reporter
    )
    assert result.rejected_reason is None
    assert max(reporter.series("approx_kl")) > 0
    assert max(reporter.series("policy_clipfrac")) > 0


def test_huge_learning_rate_trips_a_guard_and_rejects(policy_dir, the_reward, tmp_path):
    reporter = MemoryReporter()
    config = small_config(steps=20, learning_rate=1.0, critic_learning_rate=1.0)
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "out", tmp_path / "ckpt", config, reporter
    )
    assert result.rejected_reason is not None
    assert result.rejected_reason.startswith("collapse guard")
    assert result.steps_done < 20
    assert result.policy_path is None and not (tmp_path / "out").exists()


def test_tiny_kl_guard_states_its_reason(policy_dir, the_reward, tmp_path):
    config = small_config(steps=10, guard_max_kl=1e-6, guard_patience=2)
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "out", tmp_path / "ckpt", config, MemoryReporter()
    )
    assert "KL to reference" in result.rejected_reason
    assert "2 steps in a row" in result.rejected_reason


def test_resume_continues_exactly_where_the_checkpoint_left_off(policy_dir, the_reward, tmp_path):
    straight = train_ppo(
        policy_dir,
        None,
        the_reward,
        PROMPTS,
        tmp_path / "a",
        tmp_path / "ckpt-a",
        small_config(steps=4, checkpoint_every=2),
        MemoryReporter(),
    )

    first = train_ppo(
        policy_dir,
        None,
        the_reward,
        PROMPTS,
        tmp_path / "b1",
        tmp_path / "ckpt-b",
        small_config(steps=2, checkpoint_every=2),
        MemoryReporter(),
    )
    assert first.resumed_from_step is None
    reporter = MemoryReporter()
    resumed = train_ppo(
        policy_dir,
        None,
        the_reward,
        PROMPTS,
        tmp_path / "b2",
        tmp_path / "ckpt-b",
        small_config(steps=4, checkpoint_every=2),
        reporter,
    )
    assert resumed.resumed_from_step == 2
    assert sorted({step for step, _ in reporter.rows}) == [3, 4]  # only the remaining steps ran
    a, b = weights(straight.policy_path), weights(resumed.policy_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_cancel_raises(policy_dir, the_reward, tmp_path):
    reporter = MemoryReporter(stop=True)
    with pytest.raises(RunCancelled):
        train_ppo(
            policy_dir,
            None,
            the_reward,
            PROMPTS,
            tmp_path / "o",
            tmp_path / "c",
            small_config(steps=2),
            reporter,
        )


def test_no_eos_penalty_is_subtracted_from_cut_off_answers(policy_dir, the_reward, tmp_path):
    reporter = MemoryReporter()
    config = small_config(steps=2, missing_eos_penalty=3.0, reward_scaling=False)
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "o", tmp_path / "c", config, reporter
    )
    assert result.rejected_reason is None
    # Without scaling, a response that never ended scores its reward minus the penalty.
    eos, normalised = reporter.series("eos_share"), reporter.series("reward_normalised")
    raw = reporter.series("reward_raw")
    assert min(eos) < 1.0  # some responses were cut off, so the penalty was paid
    for share, norm, r in zip(eos, normalised, raw, strict=True):
        assert norm == pytest.approx(r - 3.0 * (1.0 - share), abs=1e-5)


REFERENCE_ANSWERS = [
    [*PROMPTS[i], {"role": "assistant", "content": "the cat sat on the mat"}] for i in range(3)
]


def one_update(policy_dir, reward, tmp_path, name, **overrides) -> dict[str, float]:
    reporter = MemoryReporter()
    train_ppo(
        policy_dir,
        None,
        reward,
        PROMPTS,
        tmp_path / f"{name}-o",
        tmp_path / f"{name}-c",
        small_config(steps=1, **overrides),
        reporter,
        ptx_conversations=REFERENCE_ANSWERS if overrides.get("ptx_coef") else None,
    )
    return {name: value for (_, name), value in reporter.rows.items()}


def test_the_entropy_bonus_and_the_ptx_loss_change_the_loss(policy_dir, the_reward, tmp_path):
    plain = one_update(policy_dir, the_reward, tmp_path, "plain")
    assert plain["loss"] == pytest.approx(plain["policy_loss"] + plain["value_loss"], abs=1e-5)
    # Same seed, same rollout, same first update: the knob adds exactly its term to the loss.
    bonus = one_update(policy_dir, the_reward, tmp_path, "entropy", entropy_coef=0.1)
    assert bonus["policy_loss"] == pytest.approx(plain["policy_loss"], abs=1e-6)
    assert bonus["entropy_bonus"] == pytest.approx(bonus["entropy"], rel=1e-4)  # one mini-batch = the buffer
    assert bonus["loss"] == pytest.approx(plain["loss"] - 0.1 * bonus["entropy_bonus"], abs=1e-5)
    ptx = one_update(policy_dir, the_reward, tmp_path, "ptx", ptx_coef=0.5)
    assert ptx["ptx_loss"] > 0
    assert ptx["loss"] == pytest.approx(plain["loss"] + 0.5 * ptx["ptx_loss"], abs=1e-5)


def test_ptx_without_reference_answers_is_refused(policy_dir, the_reward, tmp_path):
    with pytest.raises(ValueError, match="ptx_coef is 0.5 but there are no reference answers"):
        train_ppo(
            policy_dir,
            None,
            the_reward,
            PROMPTS,
            tmp_path / "o",
            tmp_path / "c",
            small_config(steps=1, ptx_coef=0.5),
            MemoryReporter(),
        )


def test_a_reference_answer_is_split_after_the_assistant_header(policy_dir):
    from transformers import AutoTokenizer

    from workers.training.ppo import _answer_tokens

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompt, answer = _answer_tokens(tokenizer, REFERENCE_ANSWERS[0], 512)
    assert prompt == prompt_token_ids(tokenizer, PROMPTS[0])
    assert tokenizer.decode(answer).startswith("the cat sat on the mat<|im_end|>")
    short_prompt, short_answer = _answer_tokens(tokenizer, REFERENCE_ANSWERS[0], 8)
    assert len(short_prompt) + len(short_answer) <= 8 and short_answer == answer[:4]


def test_lora_mode_shares_one_base_and_publishes_merged_weights(policy_dir, the_reward, tmp_path):
    reporter = MemoryReporter()
    config = small_config(
        steps=4, lora=LoraSettings(r=4, alpha=8), learning_rate=1e-3, critic_learning_rate=3e-3
    )
    result = train_ppo(
        policy_dir, None, the_reward, PROMPTS, tmp_path / "out", tmp_path / "ckpt", config, reporter
    )
    assert result.rejected_reason is None
    assert reporter.series("kl_ref")[0] == pytest.approx(0.0, abs=1e-4)  # adapters start at zero
    assert max(abs(k) for k in reporter.series("kl_ref")[1:]) > 0
    assert not (result.policy_path / "adapter_config.json").exists()
    before, after = weights(policy_dir), weights(result.policy_path)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lora_models_share_the_frozen_base(policy_dir, the_reward):
    config = small_config(lora=LoraSettings(r=4, alpha=8))
    models = PPOModels(policy_dir, None, the_reward, config, torch.device("cpu"), torch.float32)
    assert models.critic is models.policy and models.reference is None
    base = [p for n, p in models.policy.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    assert all(".policy." in n for n in models.policy_params)
    assert all(
        ".critic." in n or n in ("critic.value_head.weight", "critic.value_bias")
        for n in models.critic_params
    )


@pytest.fixture(scope="module")
def reward_model_dir(policy_dir, tmp_path_factory) -> Path:
    """A reward-model folder as reward.py publishes it: a 1-label classifier plus reward_stats.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    dest = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(dest)
    (dest / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return dest


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)], ids=["full", "lora"])
def test_critic_starts_as_the_reward_model(policy_dir, reward_model_dir, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    models = PPOModels(
        policy_dir, None, reward_model_dir, small_config(lora=lora), torch.device("cpu"), torch.float32
    )
    assert models.reward_stats == {"mean": 0.5, "std": 2.0}
    assert models.value_bias.item() == pytest.approx(-0.25)  # -mean / std
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    prompts = [prompt_token_ids(tokenizer, p) for p in PROMPTS[:3]]
    batch = pack(prompts, [[260, 2644], [2644], [81, 260, 2]], tokenizer.pad_token_id)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1).eval()
    with torch.no_grad():
        hidden = rm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state
        raw = rm.score(hidden[:, batch.prompt_width - 1 : -1]).squeeze(-1)
        # The rewards' map folded into the head: z-score with the RM's stats (mean 0.5, std 2), then
        # the running std at initialisation (1).
        expected = (raw - 0.5) / 2.0
        torch.testing.assert_close(models.values(batch), expected, rtol=1e-4, atol=1e-5)
        # The reward model itself still gives raw scores.
        rm_scores = models.scores(PROMPTS[:2], ["", ""], ["a cat", "the dog"], [[], []])
        torch.testing.assert_close(
            rm_scores, score(rm, tokenizer, PROMPTS[:2], ["a cat", "the dog"]), rtol=1e-4, atol=1e-5
        )
    # The reward model scores with the original head even after the critic's copy moved.
    if lora is not None:
        head = models.critic.base_model.model.score.modules_to_save["critic"]
        with torch.no_grad():
            head.weight.add_(1.0)
        assert not torch.allclose(models.values(batch), expected)
        with models.reward_model.disable_adapter(), torch.no_grad():
            original = models.reward_model.base_model.model.score(hidden)
        torch.testing.assert_close(original[:, batch.prompt_width - 1 : -1].squeeze(-1), raw)


def test_ppo_with_a_reward_model_folder(policy_dir, reward_model_dir, tmp_path):
    reporter = MemoryReporter()
    # The default critic warm-up (2 steps) is capped at half of a 2-step run.
    config = small_config(
        steps=2, lora=LoraSettings(r=4, alpha=8), critic_warmup_steps=PPOConfig().critic_warmup_steps
    )
    result = train_ppo(
        policy_dir, policy_dir, reward_model_dir, PROMPTS, tmp_path / "o", tmp_path / "c", config, reporter
    )
    assert result.rejected_reason is None
    assert len(reporter.series("reward_raw")) == 2
    # Step 1 only warmed up the critic, so the policy had not moved when step 2 sampled.
    assert reporter.series("kl_ref")[1] == pytest.approx(0.0, abs=1e-4)


def test_config_round_trips_through_json():
    config = PPOConfig(
        lora=LoraSettings(r=8), sampling=RolloutSampling(max_new_tokens=32, temperature=0.7), kl_coef=0.05
    )
    again = PPOConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)], ids=["full", "lora"])
def test_rollouts_are_on_policy_at_a_non_default_temperature(policy_dir, the_reward, tmp_path, lora):
    # Two mini-batches, so the first one's ratio is measured before any update of this step.
    reporter = MemoryReporter()
    config = small_config(
        steps=2,
        mini_batch_size=4,
        sampling=RolloutSampling(max_new_tokens=16, temperature=0.7),
        lora=lora,
        critic_warmup_steps=0,
        dtype="float32",  # the 1e-4 below is float32's noise, on a GPU too
    )
    result = train_ppo(
        policy_dir, policy_dir, the_reward, PROMPTS, tmp_path / "o", tmp_path / "c", config, reporter
    )
    assert result.rejected_reason is None
    # The log-probs PPO trains on are the sampler's own: exp(old - sampler) = 1 on every token.
    assert max(reporter.series("sampler_ratio_max_dev")) < 1e-4
    assert reporter.series("ratio_first_minibatch") == pytest.approx([1.0, 1.0], abs=1e-4)
    # Policy = reference at step 0, both tempered alike: the k1 KL is exactly 0 on every response.
    assert reporter.series("kl_ref")[0] == pytest.approx(0.0, abs=1e-4)


def test_rollout_sampling_keeps_no_top_p_or_penalty():
    sampling = RolloutSampling(max_new_tokens=8, temperature=0.6).sampling_config()
    assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty) == (0.6, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RolloutSampling(temperature=0.0)


def test_the_missing_eos_penalty_teaches_the_policy_to_finish(policy_dir, tmp_path):
    # A reward that says nothing: the only signal is the default penalty on answers cut at the cap.
    # (Alone it teaches answers to end at once, so the shrinking-length guard is off here.)
    reporter = MemoryReporter()
    config = small_config(
        steps=10,
        sampling=RolloutSampling(max_new_tokens=12),
        missing_eos_penalty=PPOConfig().missing_eos_penalty,
        guard_min_length_ratio=None,
    )
    result = train_ppo(
        policy_dir,
        None,
        lambda prompts, texts, ids: [0.0] * len(texts),
        PROMPTS,
        tmp_path / "o",
        tmp_path / "c",
        config,
        reporter,
    )
    assert result.rejected_reason is None
    eos = reporter.series("eos_share")
    assert sum(eos[-4:]) / 4 > sum(eos[:4]) / 4 + 0.2, eos


def test_a_run_whose_first_answers_already_ramble_keeps_training_and_says_why(
    policy_dir, the_reward, tmp_path, caplog
):
    # 4-token rollouts: hardly an answer ends from the first step, so there is no share to fall from;
    # the EOS-share guard stays off for the run (the unit tests show it firing when answers stop
    # ending) and the log says what to change.
    config = small_config(steps=4, sampling=RolloutSampling(max_new_tokens=4), guard_min_eos_share=0.5)
    with caplog.at_level("WARNING", logger="workers.training.ppo"):
        result = train_ppo(
            policy_dir, None, the_reward, PROMPTS, tmp_path / "o", tmp_path / "c", config, MemoryReporter()
        )
    assert result.rejected_reason is None or "ended before" not in result.rejected_reason
    assert "the EOS-share guard is off for this run" in caplog.text
    assert "policy.sampling.max_new_tokens" in caplog.text
