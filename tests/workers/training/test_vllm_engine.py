"""The vLLM rollout engine: the parts that run without vLLM.

`VLLMEngine` itself needs a GPU host with vLLM installed (benchmarks/gpu_scale.py exercises it there).
These tests cover what surrounds it: the SamplingConfig → SamplingParams mapping, the conversion of
vLLM's outputs into a Rollout, the weight names handed to vLLM, and the error when vLLM is missing.
The stand-in outputs below have exactly the attributes vLLM documents on `RequestOutput`,
`CompletionOutput` and `Logprob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.inference.sampling import SamplingConfig
from workers.training import vllm_engine
from workers.training.vllm_engine import (
    VLLMEngine,
    require_vllm,
    rollout_from_outputs,
    sampling_params_kwargs,
    vllm_installed,
    vllm_weight_names,
)


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    index: int = 0
    text: str = ""


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------- sampling settings


def test_sampling_maps_to_one_seeded_sample_with_the_sampled_tokens_logprob():
    kwargs = sampling_params_kwargs(
        SamplingConfig(max_new_tokens=48, temperature=0.7, top_p=0.85, repetition_penalty=1.2), seed=1234
    )
    assert kwargs == {
        "n": 1,
        "max_tokens": 48,
        "temperature": 0.7,
        "top_p": 0.85,
        "repetition_penalty": 1.2,
        "seed": 1234,
        "logprobs": 0,  # the sampled token's log-prob and no others
        "detokenize": False,
    }


def test_ppo_rollout_sampling_is_the_plain_distribution():
    # PPO samples at T=1, no nucleus, no penalty: vLLM's processed and raw log-probs then coincide.
    kwargs = sampling_params_kwargs(
        SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0), seed=0
    )
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["repetition_penalty"]) == (1.0, 1.0, 1.0)


def test_greedy_maps_to_temperature_zero_keeping_the_penalty():
    kwargs = sampling_params_kwargs(SamplingConfig(do_sample=False, repetition_penalty=1.3), seed=5)
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0
    assert kwargs["repetition_penalty"] == 1.3  # the built-in generator's greedy pick is after the penalty


def test_every_row_gets_its_own_seed():
    sampling = SamplingConfig()
    assert [sampling_params_kwargs(sampling, s)["seed"] for s in (7, 8, 9)] == [7, 8, 9]


# ---------------------------------------------------------------- outputs → Rollout


def _completion(ids: list[int], logprobs: list[float], finish: str) -> CompletionOutput:
    # vLLM lists the sampled token in each position's dict, with other top tokens when asked for more.
    entries = [
        {t: Logprob(lp, rank=1), t + 1: Logprob(lp - 1.0, rank=2)}
        for t, lp in zip(ids, logprobs, strict=True)
    ]
    return CompletionOutput(token_ids=ids, logprobs=entries, finish_reason=finish)


def test_outputs_become_a_rollout_in_the_callers_order(tokenizer):
    eos = tokenizer.eos_token_id
    hello = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    prompts = [[1, 2, 3], [4, 5]]
    outputs = [
        RequestOutput(prompts[0], [_completion(hello + [eos], [-0.5] * len(hello) + [-0.1], "stop")]),
        RequestOutput(prompts[1], [_completion([11, 12, 13], [-1.0, -2.0, -3.0], "length")]),
    ]
    rollout = rollout_from_outputs(prompts, outputs, tokenizer)
    assert rollout.prompt_ids == prompts
    assert rollout.response_ids == [hello + [eos], [11, 12, 13]]
    assert rollout.ended_with_eos == [True, False]  # cut at max_tokens is not a finished answer
    assert rollout.logprobs == [[-0.5] * len(hello) + [-0.1], [-1.0, -2.0, -3.0]]
    assert rollout.texts[0] == "Hello there"  # EOS skipped, decoded by our tokenizer
    assert all(len(lp) == len(ids) for lp, ids in zip(rollout.logprobs, rollout.response_ids, strict=True))


def test_the_sampled_tokens_logprob_is_picked_whatever_its_rank(tokenizer):
    # A sampled token outside the top-1 still comes with its own entry; we read that one, not the best.
    entry = {9: Logprob(-0.2, rank=1), 42: Logprob(-3.5, rank=7)}
    outputs = [RequestOutput([1], [CompletionOutput([42], [entry], "length")])]
    assert rollout_from_outputs([[1]], outputs, tokenizer).logprobs == [[-3.5]]


def test_greedy_picks_have_logprob_zero_like_the_builtin_generator(tokenizer):
    outputs = [RequestOutput([1], [CompletionOutput([5, 6], None, "length")])]
    assert rollout_from_outputs([[1]], outputs, tokenizer, greedy=True).logprobs == [[0.0, 0.0]]


def test_an_empty_response_did_not_end_with_eos(tokenizer):
    outputs = [RequestOutput([1], [CompletionOutput([], [], "stop")])]
    rollout = rollout_from_outputs([[1]], outputs, tokenizer)
    assert rollout.response_ids == [[]] and rollout.ended_with_eos == [False]


def test_missing_logprobs_are_refused_not_guessed(tokenizer):
    outputs = [RequestOutput([1], [CompletionOutput([5, 6], None, "length")])]
    with pytest.raises(ValueError, match="logprobs=0"):
        rollout_from_outputs([[1]], outputs, tokenizer)


def test_a_short_output_list_is_refused(tokenizer):
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        rollout_from_outputs(
            [[1], [2]], [RequestOutput([1], [CompletionOutput([5], None, "stop")])], tokenizer
        )


def test_logprobs_are_plain_floats(tokenizer):
    entry = {5: Logprob(torch.tensor(-0.25).item())}
    rollout = rollout_from_outputs(
        [[1]], [RequestOutput([1], [CompletionOutput([5], [entry], "stop")])], tokenizer
    )
    assert isinstance(rollout.logprobs[0][0], float) and math.isclose(rollout.logprobs[0][0], -0.25)


# ---------------------------------------------------------------- weight names


def test_a_plain_state_dict_keeps_its_hugging_face_names(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = model.state_dict()
    assert [name for name, _ in vllm_weight_names(state)] == list(state)


def test_merged_peft_names_map_back_to_the_base_models_names(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = set(base.state_dict())
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    )
    peft_model.merge_adapter()
    # What a trainer would hand over after merging: the wrapped names, LoRA factors left out.
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" not in k}
    names = [name for name, _ in vllm_weight_names(state)]
    assert set(names) == expected
    assert len(names) == len(set(names))  # modules_to_save: the trained copy only, not the original too


def test_wrapper_prefixes_are_stripped():
    tensor = torch.zeros(1)
    state = {
        "model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight": tensor,
        "_orig_mod.model.norm.weight": tensor,
        "model._fsdp_wrapped_module.embed_tokens.weight": tensor,
    }
    assert [n for n, _ in vllm_weight_names(state)] == [
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
    ]


def test_unmerged_lora_factors_are_refused_with_what_to_do():
    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="merge the adapter"):
        list(vllm_weight_names(state))


# ---------------------------------------------------------------- without vLLM


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")
def test_without_vllm_the_engine_says_what_to_install_and_what_to_use_instead(tiny_model_dir, tokenizer):
    with pytest.raises(ImportError, match=r"pip install 'vllm>=0.10'.*PREFLOOP_GENERATION_ENGINE=builtin"):
        require_vllm()
    with pytest.raises(ImportError, match="needs the `vllm` package"):
        VLLMEngine(str(tiny_model_dir), tokenizer)


def test_the_module_imports_without_vllm():
    # The module is imported by the worker on every host; only the engine's constructor needs vLLM.
    assert vllm_engine.VLLM_MISSING and callable(vllm_engine.sampling_params_kwargs)


def test_versions_compare_numerically():
    assert vllm_engine._version_tuple("0.10.1+cu128") == (0, 10, 1)
    assert vllm_engine._version_tuple("0.9.2") < vllm_engine.MIN_VLLM_VERSION
    assert vllm_engine._version_tuple("0.11.0rc1") >= vllm_engine.MIN_VLLM_VERSION


@pytest.mark.skipif(
    not (vllm_installed() and torch.cuda.is_available()), reason="needs a GPU host with vLLM installed"
)
def test_the_engine_samples_with_the_logprobs_of_the_sampling_distribution(tiny_model_dir, tokenizer):
    """On a GPU host: log-probs from vLLM match the policy's own under the same sampling settings."""
    from app.inference.sampling import SamplingConfig as Sampling
    from workers.training.lora import pack, response_logprobs

    engine = VLLMEngine(str(tiny_model_dir), tokenizer, dtype="float32", gpu_memory_utilization=0.2)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
    rollout = engine.generate_ids(prompts, sampling, row_seeds=[0, 1])
    again = engine.generate_ids(prompts, sampling, row_seeds=[0, 1])
    assert rollout.response_ids == again.response_ids  # seeded rows
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    batch = pack(rollout.prompt_ids, rollout.response_ids, tokenizer.pad_token_id or 0).to(
        torch.device("cuda")
    )
    with torch.no_grad():
        ours, _ = response_logprobs(model, batch)
    mask = batch.response_mask
    theirs = torch.zeros_like(ours)
    for row, lps in enumerate(rollout.logprobs):
        theirs[row, : len(lps)] = torch.tensor(lps)
    assert torch.allclose(ours * mask, theirs * mask, atol=1e-3)
    engine.close()


def test_dtypes_are_named_the_way_vllm_names_them():
    # PPO hands the engine a torch.dtype; the worker's generation a string.
    assert vllm_engine.vllm_dtype(torch.bfloat16) == "bfloat16"
    assert vllm_engine.vllm_dtype(torch.float32) == "float32"
    assert vllm_engine.vllm_dtype("float16") == "float16"
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        vllm_engine.vllm_dtype(torch.int8)


def test_the_engine_refuses_a_cpu_device_saying_what_to_do():
    with pytest.raises(ValueError, match="CUDA device, not cpu"):
        vllm_engine._cuda_device("cpu")


def test_the_engine_keeps_its_own_weights():
    # PPO then hands it the trained weights after every update (the rollout-engine contract).
    assert VLLMEngine.shares_training_weights is False
