"""Batched decoding on the tiny Llama: the generator and its decoders against Hugging Face's own forward
and greedy `generate`.
"""

from __future__ import annotations

import pytest
import torch

from app.inference.generator import BatchedGenerator
from app.inference.sampling import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=12, do_sample=False, repetition_penalty=1.1)
LONGER = SamplingConfig(max_new_tokens=24, do_sample=False, repetition_penalty=1.1)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about rain on a tin roof in the early morning."}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Hi"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sharpen(model)
    return model, tokenizer


def sharpen(model) -> None:
    """At its initial scale the tiny model (tied embeddings, small weights) greedily repeats the last prompt
    token forever, which would make greedy comparisons trivial; larger weights give varied tokens."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8.0)


def hf_greedy(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Reference: transformers' greedy `generate` on the same left-padded prompts, cut after EOS."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=False,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
    )
    responses = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        responses.append(row)
    return responses


def test_the_stop_token_is_the_tokenizers_eos(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(generator.stop_token_ids)) == ["<|im_end|>"]


def test_prefill_groups_keep_padding_under_a_quarter():
    from app.inference.decoders import _length_groups

    # 18 and 15 are at least 0.75 * 20; 12 starts a group of width 12, and 6 < 9 starts another.
    assert _length_groups([20, 18, 15, 12, 6]) == [(3, 20), (1, 12), (1, 6)]
    assert _length_groups([7]) == [(1, 7)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("shared", [False, True])
def test_fast_path_logits_match_the_transformers_forward(tiny, packed, shared):
    """Prefill and two decode steps against one full transformers forward over the same layout. With
    `shared`, the prompts' common prefix runs once and a duplicated prompt's remainder runs once."""
    from app.inference.decoders import LlamaDecoder
    from app.inference.generator import _common_prefix_length

    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    assert generator.fast_path_active()
    chats = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[0], CONVERSATIONS[3]]
    prompts = [generator.chat_prompt_ids(c) for c in chats]
    prefix = _common_prefix_length(prompts) if shared else 0
    assert prefix > 10 or not shared  # the default system turn of the chat template
    rest = max(len(p) for p in prompts) - prefix
    ids = torch.tensor([p[:prefix] + [0] * (rest - len(p) + prefix) + p[prefix:] for p in prompts])
    valid = torch.tensor(
        [[1] * prefix + [0] * (rest - len(p) + prefix) + [1] * (len(p) - prefix) for p in prompts]
    )
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    width = ids.shape[1]
    extra = torch.randint(0, len(tokenizer), (len(prompts), 3), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        decoder = LlamaDecoder(model, len(prompts), width + 3, torch.device("cpu"), packed=packed)
        ours = [decoder.prefill(ids, valid, positions, prefix)]
        for step in range(2):
            ours.append(decoder.step(extra[:, step], positions[:, -1] + step + 1, width + step))
        full_ids = torch.cat([ids, extra[:, :2]], 1)
        full_mask = torch.cat([valid, torch.ones_like(extra[:, :2])], 1)
        full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        reference = model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos).logits
    for step, logits in enumerate(ours):
        torch.testing.assert_close(logits, reference[:, width - 1 + step], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["fast-packed", "fast-plain", "generic"])
@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize("chats", ["varied", "shared-system-and-duplicate"])
def test_greedy_equals_transformers_greedy_generate(tiny, path, penalty, chats):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    generator.use_fast_path = path != "generic"
    generator.fast_path_packed = path == "fast-packed"
    sampling = SamplingConfig(max_new_tokens=12, do_sample=False, repetition_penalty=penalty)
    if chats == "varied":
        conversations = CONVERSATIONS
    else:  # a long common prefix (the template's system turn) and a repeated prompt
        conversations = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[0], CONVERSATIONS[3]]
    prompts = [generator.chat_prompt_ids(c) for c in conversations]
    rollout = generator.generate_ids(prompts, sampling)
    assert len({t for r in rollout.response_ids for t in r}) > 20  # a real comparison, not a repeated token
    assert rollout.response_ids == hf_greedy(model, tokenizer, prompts, sampling)
    assert rollout.prompt_ids == prompts
    assert rollout.texts == tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)


def test_rows_stop_at_eos_and_the_others_go_on(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    free = BatchedGenerator(model, tokenizer)
    free.stop_token_ids = ()
    unstopped = free.generate_ids(prompts, LONGER).response_ids
    assert all(len(r) == LONGER.max_new_tokens for r in unstopped)
    # Make a token that row 0 first emits at step j > 0 the stop token: row 0 must end right there, with
    # the stop token included, and every row is its unstopped self cut after its first stop token.
    row0 = unstopped[0]
    j = next(j for j in range(1, len(row0)) if row0[j] not in row0[:j])
    stop = row0[j]
    generator.stop_token_ids = (stop,)
    rollout = generator.generate_ids(prompts, LONGER)
    for row, full in zip(rollout.response_ids, unstopped, strict=True):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert row == expected
    assert rollout.response_ids[0] == row0[: j + 1]
    assert any(len(r) > j + 1 for r in rollout.response_ids)  # other rows went on
    assert rollout.ended_with_eos == [stop in full for full in unstopped]


@pytest.mark.parametrize("fast", [True, False])
def test_stopped_rows_leave_the_batch_without_changing_the_others(tiny, fast):
    from app.inference.generator import _Decoding, _inference

    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    generator.use_fast_path = fast
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    free = BatchedGenerator(model, tokenizer)
    free.stop_token_ids = ()
    unstopped = free.generate_ids(prompts, LONGER).response_ids
    # Stop rows 0 and 1 after their second token (a token neither emitted before).
    stops = set()
    for row in unstopped[:2]:
        stops.add(next(t for j, t in enumerate(row) if j >= 1 and t not in row[:j]))
    generator.stop_token_ids = tuple(stops)
    with _inference(model):
        decoding = _Decoding(generator, prompts, LONGER, seed=None)
        steps = [decoding.advance() for _ in range(LONGER.max_new_tokens) if not decoding.done]
    assert decoding.active.numel() < len(prompts)  # the stopped rows were dropped from the batch
    tokens = torch.stack([t for t, _, _ in steps], 1).tolist()
    emitted = torch.stack([e for _, e, _ in steps], 1).tolist()
    for row, full in enumerate(unstopped):
        got = [t for t, e in zip(tokens[row], emitted[row], strict=True) if e]
        cut = next((j for j, t in enumerate(full) if t in stops), None)
        assert got == (full if cut is None else full[: cut + 1])


def test_decoding_ends_when_every_row_has_stopped(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    free = BatchedGenerator(model, tokenizer)
    free.stop_token_ids = ()
    unstopped = free.generate_ids(prompts, LONGER).response_ids
    # Every row's first token as a stop token: all rows finish at once, after one token each.
    generator.stop_token_ids = tuple({r[0] for r in unstopped})
    rollout = generator.generate_ids(prompts, LONGER)
    assert rollout.response_ids == [r[:1] for r in unstopped]
    assert all(rollout.ended_with_eos)


def test_seed_makes_sampling_reproducible(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = generator.generate_ids(prompts, sampling, seed=11)
    b = generator.generate_ids(prompts, sampling, seed=11)
    c = generator.generate_ids(prompts, sampling, seed=12)
    assert a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["full", "nucleus"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_row_seeds_make_a_rows_sample_independent_of_its_batch(tiny, top_p, fast):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    generator.use_fast_path = fast
    # Eight prompts of different lengths (and a shared system turn for the fast path to share).
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS * 2]
    seeds = [1000 + 7 * i for i in range(len(prompts))]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=top_p, repetition_penalty=1.0)
    whole = generator.generate_ids(prompts, sampling, row_seeds=seeds)
    halves = [
        generator.generate_ids(prompts[:4], sampling, row_seeds=seeds[:4]),
        generator.generate_ids(prompts[4:], sampling, row_seeds=seeds[4:]),
    ]
    reversed_order = generator.generate_ids(prompts[::-1], sampling, row_seeds=seeds[::-1])
    generator.max_batch_size = 3  # other chunks, other length sorting
    chunked = generator.generate_ids(prompts, sampling, row_seeds=seeds)

    split = [r for half in halves for r in half.response_ids]
    assert split == whole.response_ids
    assert reversed_order.response_ids[::-1] == whole.response_ids
    assert chunked.response_ids == whole.response_ids
    # The same prompt twice (rows i and i + 4) with different seeds: different samples.
    assert whole.response_ids[:4] != whole.response_ids[4:]
    # Log-probs agree to float32 rounding: other batch shapes sum in another order, and a log-prob
    # near -10 carries about 1e-5 of it (seen: 1.24e-5 apart, 1.2e-6 relative).
    split_logprobs = [lp for half in halves for lp in half.logprobs]
    for a, b, c in zip(whole.logprobs, split_logprobs, chunked.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(a), torch.tensor(c), rtol=1e-5, atol=1e-5)


def test_row_seeds_must_match_the_prompts(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    with pytest.raises(ValueError, match="4 prompts but 3 row seeds"):
        generator.generate_ids(prompts, SamplingConfig(max_new_tokens=2), row_seeds=[1, 2, 3])


def test_chunked_batches_give_the_same_greedy_tokens_in_order(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    whole = generator.generate_ids(prompts, GREEDY)
    generator.max_batch_size = 3
    assert generator.generate_ids(prompts, GREEDY).response_ids == whole.response_ids


def test_training_flags_are_restored(tiny):
    model, tokenizer = tiny
    model.train()
    model.model.layers[0].eval()  # a frozen part stays in eval mode
    try:
        BatchedGenerator(model, tokenizer).generate_chat(CONVERSATIONS[:1], SamplingConfig(max_new_tokens=3))
        assert model.training and model.model.layers[1].training
        assert not model.model.layers[0].training
    finally:
        model.eval()


def test_generate_chat_returns_k_responses_per_conversation(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    out = generator.generate_chat(
        CONVERSATIONS[:3], SamplingConfig(max_new_tokens=6), num_return_sequences=4, seed=0
    )
    assert [len(group) for group in out] == [4, 4, 4]
    assert all(isinstance(text, str) for group in out for text in group)
    assert len(set(out[0])) > 1  # independent samples, not copies


def test_stream_pieces_join_to_the_full_response_and_leave_grad_mode_alone(tiny):
    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=16)
    conversation = CONVERSATIONS[1]
    pieces = []
    for piece in generator.stream_chat(conversation, sampling, seed=5):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        pieces.append(piece)
    assert len(pieces) > 1 and all(pieces)
    whole = generator.generate_ids([generator.chat_prompt_ids(conversation)], sampling, seed=5)
    assert "".join(pieces) == whole.texts[0]


@pytest.mark.parametrize("packed", [True, False])
def test_lora_policy_uses_current_adapter_weights(tiny_model_dir, packed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sharpen(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = BatchedGenerator(model, tokenizer)
    generator.fast_path_packed = packed  # adapters merged into a packed copy, or applied on the fly
    assert generator.fast_path_active()
    reference = BatchedGenerator(model, tokenizer)
    reference.use_fast_path = False  # peft's own forward
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    sampling = SamplingConfig(max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    before = generator.generate_ids(prompts, sampling).response_ids
    with torch.no_grad():  # what an optimiser step does: change the adapter weights in place
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0, generator=torch.Generator().manual_seed(len(name)))
    after = generator.generate_ids(prompts, sampling).response_ids
    assert after != before
    assert after == reference.generate_ids(prompts, sampling).response_ids


def test_float32_adapters_over_a_bfloat16_base_decode_like_peft(tiny_model_dir):
    """LoRA keeps its trainable weights in float32 over a half-precision base; the fast path computes
    them in their own dtype (as peft does) instead of failing on the mix."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.inference.decoders import LlamaDecoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
                if "lora_B" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    generator = BatchedGenerator(model, tokenizer)
    assert generator.fast_path_active()
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS[:2]]
    ids = torch.tensor([prompts[0][-12:], prompts[1][-12:]])
    valid = torch.ones_like(ids)
    positions = torch.arange(12).expand(2, -1)
    with torch.inference_mode():
        decoder = LlamaDecoder(model, 2, 13, torch.device("cpu"))
        ours = decoder.prefill(ids, valid, positions)
        reference = model(input_ids=ids, attention_mask=valid, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(ours.float(), reference.float(), rtol=0.05, atol=0.05)
    sampling = SamplingConfig(max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
    assert all(len(r) == 4 for r in generator.generate_ids(prompts, sampling).response_ids)


def test_other_architectures_take_the_generic_path(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = tiny
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    generator = BatchedGenerator(model, tokenizer)
    assert not generator.fast_path_active()
    prompts = [generator.chat_prompt_ids(c) for c in CONVERSATIONS]
    rollout = generator.generate_ids(prompts, GREEDY)
    assert rollout.response_ids == hf_greedy(model, tokenizer, prompts, GREEDY)
