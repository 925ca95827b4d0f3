"""Split, batching and packing of comparisons for the reward model."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from workers.training.data import (
    Comparison,
    TokenCache,
    format_conversation,
    format_prompt,
    group_batches,
    pack_comparisons,
    pack_sequences,
    split_by_prompt,
)


def _comparisons(n_prompts: int, groups_per_prompt: int = 2, pairs_per_group: int = 3, seed: int = 0):
    """Several annotations (groups) per prompt, a few pairs each, in a shuffled order."""
    rng = random.Random(seed)
    out, cid = [], 0
    for p in range(n_prompts):
        prompt = [{"role": "user", "content": f"question {p}"}]
        for g in range(groups_per_prompt):
            group_id = p * 100 + g
            for k in range(rng.randint(1, pairs_per_group)):
                out.append(Comparison(cid, p, group_id, prompt, f"good {p} {g} {k}", f"bad {p} {g} {k}"))
                cid += 1
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


# ---------------------------------------------------------------------------------------------
# split


def test_split_never_puts_a_prompt_on_both_sides():
    items = _comparisons(200)
    train, held_out = split_by_prompt(items, eval_fraction=0.2, seed=3)
    train_prompts = {c.prompt_id for c in train}
    eval_prompts = {c.prompt_id for c in held_out}
    assert not train_prompts & eval_prompts
    assert sorted(c.comparison_id for c in train + held_out) == sorted(c.comparison_id for c in items)
    # roughly the requested share of prompts (200 prompts, hash split: a wide but real band)
    assert 20 <= len(eval_prompts) <= 60


def test_split_is_deterministic_and_depends_on_seed():
    items = _comparisons(100)
    first = split_by_prompt(items, 0.2, seed=1)
    again = split_by_prompt(list(reversed(items)), 0.2, seed=1)
    other = split_by_prompt(items, 0.2, seed=2)
    assert {c.prompt_id for c in first[1]} == {c.prompt_id for c in again[1]}
    assert {c.prompt_id for c in first[1]} != {c.prompt_id for c in other[1]}


def test_split_keeps_a_prompts_side_when_data_grows():
    small = _comparisons(50)
    grown = small + [
        Comparison(10_000 + i, 50 + i, 50_000 + i, [{"role": "user", "content": "new"}], "a", "b")
        for i in range(50)
    ]
    eval_small = {c.prompt_id for c in split_by_prompt(small, 0.2, seed=0)[1]}
    eval_grown = {c.prompt_id for c in split_by_prompt(grown, 0.2, seed=0)[1]}
    assert eval_small == {p for p in eval_grown if p < 50}


def test_split_leaves_neither_side_empty_with_two_prompts():
    items = _comparisons(2)
    train, held_out = split_by_prompt(items, 0.01, seed=0)
    assert train and held_out
    train, held_out = split_by_prompt(items, 0.99, seed=0)
    assert train and held_out
    train, held_out = split_by_prompt(items, 0.0, seed=0)
    assert held_out == [] and len(train) == len(items)


# ---------------------------------------------------------------------------------------------
# batches


def test_batches_keep_groups_together_and_cover_everything_once():
    items = _comparisons(40, groups_per_prompt=3, pairs_per_group=6)
    batches = group_batches(items, max_pairs_per_batch=8, seed=0, epoch=0)
    seen = Counter(c.comparison_id for batch in batches for c in batch)
    assert set(seen) == {c.comparison_id for c in items} and set(seen.values()) == {1}
    group_home = {}
    for b, batch in enumerate(batches):
        for c in batch:
            assert group_home.setdefault(c.group_id, b) == b
        assert len(batch) <= 8


def test_a_group_larger_than_the_limit_is_its_own_batch():
    big = [Comparison(i, 1, 7, [{"role": "user", "content": "x"}], f"a{i}", f"b{i}") for i in range(10)]
    small = [Comparison(100 + i, 2, 8 + i, [{"role": "user", "content": "y"}], "a", "b") for i in range(3)]
    batches = group_batches(big + small, max_pairs_per_batch=4, seed=0, epoch=0)
    big_batches = [b for b in batches if any(c.group_id == 7 for c in b)]
    assert len(big_batches) == 1 and len(big_batches[0]) == 10


def test_batch_order_is_deterministic_per_seed_and_epoch():
    items = _comparisons(60)

    def ids(batches):
        return [[c.comparison_id for c in b] for b in batches]

    base = ids(group_batches(items, 8, seed=0, epoch=0))
    assert base == ids(group_batches(list(reversed(items)), 8, seed=0, epoch=0))
    assert base != ids(group_batches(items, 8, seed=0, epoch=1))
    assert base != ids(group_batches(items, 8, seed=1, epoch=0))


# ---------------------------------------------------------------------------------------------
# text and packing


def test_format_conversation_uses_the_chat_template(tokenizer):
    prompt = [{"role": "user", "content": "Hi there"}]
    text = format_conversation(tokenizer, prompt, "Hello!")
    assert text == tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert text.index("Hi there") < text.index("Hello!")


def test_packing_scores_each_distinct_response_once_behind_one_prompt(tokenizer):
    prompt = [{"role": "user", "content": "Rank these"}]
    # one ranking of three responses: a > b > c gives three pairs over three responses
    ranking = [
        Comparison(1, 1, 1, prompt, "alpha", "beta"),
        Comparison(2, 1, 1, prompt, "alpha", "gamma"),
        Comparison(3, 1, 1, prompt, "beta", "gamma"),
    ]
    cache = TokenCache(tokenizer, max_length=256)
    batch = pack_comparisons(ranking, cache, tokenizer.pad_token_id)
    assert batch.num_pairs == 3 and batch.num_sequences == 3
    assert batch.input_ids.shape[0] == 1  # one row: the prompt once, three responses after it
    assert batch.chosen_index.tolist() == [0, 0, 1] and batch.rejected_index.tolist() == [1, 2, 2]

    prefix_len = len(cache.prompt_ids(prompt))
    suffixes = [cache.encode(prompt, r).suffix for r in ("alpha", "beta", "gamma")]
    assert batch.num_tokens == prefix_len + sum(len(s) for s in suffixes)
    allowed = batch.allowed[0]
    a_start = prefix_len
    b_start = a_start + len(suffixes[0])
    # "beta" sees the prompt and itself, never "alpha"
    assert allowed[b_start, :prefix_len].all()
    assert not allowed[b_start, a_start:b_start].any()
    assert allowed[b_start, b_start] and not allowed[b_start, b_start + 1]
    # positions continue from the prompt for each response, as in the unpacked sequence
    assert batch.position_ids[0, b_start].item() == prefix_len
    assert batch.score_col.tolist()[1] == b_start + len(suffixes[1]) - 1
    # the token ids of prompt + response are those of the whole formatted conversation
    full = tokenizer(format_conversation(tokenizer, prompt, "beta"), add_special_tokens=False)["input_ids"]
    row = batch.input_ids[0].tolist()
    assert row[:prefix_len] + row[b_start : b_start + len(suffixes[1])] == full


def test_without_prompt_sharing_each_response_is_its_own_row(tokenizer):
    prompt = [{"role": "user", "content": "Rank these"}]
    items = [(prompt, "alpha"), (prompt, "beta"), (prompt, "alpha")]
    cache = TokenCache(tokenizer, max_length=256)
    batch, index = pack_sequences(items, cache, tokenizer.pad_token_id, share_prompt=False)
    assert index == [0, 1, 0]
    assert batch.input_ids.shape[0] == 2
    # padding attends only to itself and is never scored
    lengths = [batch.score_col[i].item() + 1 for i in range(2)]
    short = min(range(2), key=lambda i: lengths[i])
    if lengths[short] < batch.input_ids.shape[1]:
        pad_pos = lengths[short]
        assert batch.input_ids[short, pad_pos].item() == tokenizer.pad_token_id
        assert batch.allowed[short, pad_pos].sum().item() == 1


def test_truncation_keeps_rows_within_max_length(tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 200}]
    cache = TokenCache(tokenizer, max_length=64)
    short = cache.encode(long_prompt, "ok")
    long = cache.encode(long_prompt, "answer " * 100)
    for encoded in (short, long):
        assert len(encoded.prefix) + len(encoded.suffix) <= 64
    # the prompt is cut the same way for both, so they still share one row
    assert short.prefix == long.prefix
    batch, _ = pack_sequences([(long_prompt, "ok"), (long_prompt, "answer " * 100)], cache, 0)
    assert batch.input_ids.shape[0] == 1


def test_a_boundary_merge_falls_back_to_a_standalone_sequence(tokenizer):
    prompt = [{"role": "user", "content": "Say something"}]
    cache = TokenCache(tokenizer, max_length=256)
    encoded = cache.encode(prompt, "\n\nleading newlines")
    full = tokenizer(format_conversation(tokenizer, prompt, "\n\nleading newlines"), add_special_tokens=False)
    # SmolLM2's BPE merges the template's "\n" with the response's "\n\n": the prompt tokens are
    # not a prefix of the conversation tokens, so the response is scored as a whole sequence.
    prompt_only = cache.prompt_ids(prompt)
    assert tuple(full["input_ids"][: len(prompt_only)]) != prompt_only
    assert encoded.prefix == () and list(encoded.suffix) == full["input_ids"]
    batch, _ = pack_sequences([(prompt, "\n\nleading newlines"), (prompt, "plain")], cache, 0)
    assert batch.num_sequences == 2
    assert torch.equal(batch.allowed.sum(-1) > 0, torch.ones_like(batch.input_ids, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# answers cut off at the length limit


def test_a_cut_off_answer_keeps_its_turn_open(tokenizer):
    prompt = [{"role": "user", "content": "Tell me about rivers"}]
    finished = format_conversation(tokenizer, prompt, "Rivers flow.")
    cut = format_conversation(tokenizer, prompt, "Rivers flow", ended=False)
    assert cut == format_prompt(tokenizer, prompt) + "Rivers flow"
    assert cut.endswith("Rivers flow")  # no end-of-turn: the text stops where the sampler stopped
    assert finished.rstrip().endswith(tokenizer.eos_token)


def test_the_reward_model_reads_every_answer_at_its_closing_token(tokenizer):
    """Cut off or not, the reward model scores an answer with its turn closed: the score is read on
    the same closing token for every answer (see `Comparison`)."""
    prompt = [{"role": "user", "content": "Say something"}]
    cache = TokenCache(tokenizer, max_length=256)
    both = [Comparison(1, 1, 1, prompt, "Done.", "Not done", chosen_ended=True, rejected_ended=False)]
    batch = pack_comparisons(both, cache, tokenizer.pad_token_id)
    closed = format_conversation(tokenizer, prompt, "Not done")
    last = [batch.input_ids[r, c].item() for r, c in zip(batch.score_row, batch.score_col, strict=True)]
    assert last[0] == last[1] == tokenizer(closed, add_special_tokens=False)["input_ids"][-1]
