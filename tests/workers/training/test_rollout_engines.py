"""The rollout-engine interface: the builtin engine on the policy itself or on a refreshed copy, the
LoRA merge a copy loads, and a clear refusal where vLLM is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from app.inference.sampling import SamplingConfig
from workers.training.distributed import ProcessGroup
from workers.training.lora import LoraSettings, add_adapter, merged_causal_lm_state
from workers.training.rollout_engines import (
    BuiltinEngine,
    RolloutEngine,
    load_generation_copy,
    make_rollout_engine,
)

SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False).input_ids for text in ("hello there", "a b c d", "x")]


def test_one_process_generates_with_the_training_policy_itself(tiny, tiny_model_dir):
    model, tokenizer = tiny
    engine = make_rollout_engine(
        "builtin",
        policy=model,
        tokenizer=tokenizer,
        model_path=tiny_model_dir,
        device=torch.device("cpu"),
        dtype=torch.float32,
        group=ProcessGroup(),
    )
    assert isinstance(engine, RolloutEngine) and engine.shares_training_weights
    assert engine.model is model
    with pytest.raises(RuntimeError, match="nothing to load"):
        engine.load_weights({})
    rollout = engine.generate_ids(prompts(tokenizer), SAMPLING, row_seeds=[1, 2, 3])
    assert len(rollout.response_ids) == 3
    assert [len(lp) for lp in rollout.logprobs] == [len(r) for r in rollout.response_ids]


def test_a_copy_loaded_with_merged_lora_weights_samples_as_the_lora_policy(tiny_model_dir, tiny):
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    settings = LoraSettings(r=4, alpha=8)
    policy = add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings, "policy")
    policy = add_adapter(policy, settings, "critic")  # a second adapter on the same base stays out
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    policy.set_adapter("policy")
    copy = load_generation_copy(tiny_model_dir, torch.device("cpu"), torch.float32)
    engine = BuiltinEngine(copy, tokenizer, torch.device("cpu"), shares_training_weights=False)
    engine.load_weights(merged_causal_lm_state(policy.state_dict(), settings, "policy"))

    ids = torch.tensor([prompts(tokenizer)[1]])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        before = load_generation_copy(tiny_model_dir, torch.device("cpu"), torch.float32)(
            input_ids=ids
        ).logits
        merged = copy(input_ids=ids).logits
    assert (expected - before).abs().max() > 1e-3  # the adapter does change the policy
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    # The same seeds draw the same responses from the copy as from the LoRA policy itself.
    own = BuiltinEngine(policy, tokenizer, torch.device("cpu"), shares_training_weights=True)
    a = own.generate_ids(prompts(tokenizer), SAMPLING, row_seeds=[5, 6, 7])
    b = engine.generate_ids(prompts(tokenizer), SAMPLING, row_seeds=[5, 6, 7])
    assert a.response_ids == b.response_ids


def test_weights_that_do_not_fit_the_copy_are_refused(tiny, tiny_model_dir):
    _, tokenizer = tiny
    copy = load_generation_copy(tiny_model_dir, torch.device("cpu"), torch.float32)
    engine = BuiltinEngine(copy, tokenizer, torch.device("cpu"), shares_training_weights=False)
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({"critic.value_head.weight": torch.zeros(1, 8)})


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_says_what_to_do(tiny, tiny_model_dir):
    model, tokenizer = tiny
    with pytest.raises(RuntimeError, match="pip install vllm.*or set policy.rollout_engine to 'builtin'"):
        make_rollout_engine(
            "vllm",
            policy=model,
            tokenizer=tokenizer,
            model_path=tiny_model_dir,
            device=torch.device("cpu"),
            dtype=torch.float32,
            group=ProcessGroup(),
        )


def test_an_unknown_engine_is_refused(tiny, tiny_model_dir):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="unknown rollout engine 'hf'; known: builtin, vllm"):
        make_rollout_engine(
            "hf",
            policy=model,
            tokenizer=tokenizer,
            model_path=tiny_model_dir,
            device=torch.device("cpu"),
            dtype=torch.float32,
            group=ProcessGroup(),
        )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_ppo_asking_for_vllm_without_it_stops_before_loading_its_models(tiny_model_dir, tmp_path):
    from app.common.reporting import MemoryReporter
    from workers.training.ppo import PPOConfig, train_ppo

    prompts = [[{"role": "user", "content": "hi"}]]
    with pytest.raises(RuntimeError, match="policy.rollout_engine is 'vllm' but vLLM is not installed"):
        train_ppo(
            tiny_model_dir,
            None,
            lambda prompt_texts, texts, ids: [0.0] * len(texts),
            prompts,
            tmp_path / "out",
            tmp_path / "ckpt",
            PPOConfig(steps=1, rollout_batch_size=1, mini_batch_size=1, rollout_engine="vllm", device="cpu"),
            MemoryReporter(),
        )
