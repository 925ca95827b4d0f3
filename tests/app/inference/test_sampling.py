"""Next-token sampling on toy distributions, against probabilities computed here by hand.

The expected values come straight from the definitions: softmax with temperature, the smallest
nucleus whose mass reaches top_p, the CTRL repetition penalty.
"""

from __future__ import annotations

import math

import pytest
import torch

from app.inference.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    draw_next_tokens,
    sample_next_tokens,
    top_p_candidates,
)


def nucleus_by_hand(logits: list[float], temperature: float, top_p: float) -> dict[int, float]:
    """Renormalised nucleus probabilities straight from the definitions, in plain Python."""
    exps = [math.exp(x / temperature) for x in logits]
    total = sum(exps)
    probs = sorted(((e / total, i) for i, e in enumerate(exps)), reverse=True)
    kept, mass = [], 0.0
    for p, i in probs:
        kept.append((p, i))
        mass += p
        if mass >= top_p:
            break
    return {i: p / mass for p, i in kept}


def empirical(logits: list[float], sampling: SamplingConfig, draws: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    batch = torch.tensor(logits).expand(draws, -1)
    tokens = sample_next_tokens(batch, sampling, rng)
    return torch.bincount(tokens, minlength=len(logits)).double() / draws


def test_config_rejects_invalid_settings():
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingConfig(repetition_penalty=0.0)
    assert SamplingConfig(temperature=0.0, do_sample=False).temperature == 0.0


def test_repetition_penalty_matches_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.2], [2.0, -1.0, 0.5, 3.0, -0.2]])
    previous = torch.tensor([[0, 1, 1], [4, 3, 4]])  # repeats count once
    out = apply_repetition_penalty(logits, previous, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.2], [2.0, -1.0, 0.5, 1.5, -0.4]])
    torch.testing.assert_close(out, expected)
    assert logits[0, 0] == 2.0  # the input is left alone


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    greedy = SamplingConfig(do_sample=False, repetition_penalty=2.0)
    assert sample_next_tokens(logits, greedy).tolist() == [0]
    # Token 0 seen before: 3.0 / 2 = 1.5 < 2.0, so token 1 wins.
    assert sample_next_tokens(logits, greedy, previous_tokens=torch.tensor([[0]])).tolist() == [1]


def test_top_p_keeps_exactly_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15], [0.9, 0.02, 0.03, 0.04, 0.01]])
    weights, ids = top_p_candidates(probs, 0.8)
    kept = [
        sorted(i for w, i in zip(wr, ir, strict=True) if w > 0)
        for wr, ir in zip(weights.tolist(), ids.tolist(), strict=True)
    ]
    # Row 0: 0.5 + 0.2 = 0.7 < 0.8, adding 0.15 reaches 0.85 -> {1, 3, 4}. Row 1: 0.9 alone reaches it.
    assert kept == [[1, 3, 4], [0]]
    for row, kept_ids in enumerate(kept):
        for w, i in zip(weights[row].tolist(), ids[row].tolist(), strict=True):
            assert w == pytest.approx(probs[row, i].item() if i in kept_ids else 0.0)


def test_top_p_widens_the_search_when_the_nucleus_is_larger_than_the_first_look():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000) * 0.3  # flat rows: the nucleus has hundreds of tokens
    logits[1, 7] = 20.0  # a peaked row: the nucleus is one token, inside the first look
    probs = torch.softmax(logits, dim=-1)
    weights, ids = top_p_candidates(probs, 0.9, first_k=4)
    sizes = []
    for row in range(4):
        ordered = probs[row].sort(descending=True)
        before = ordered.values.cumsum(0) - ordered.values
        expected = set(ordered.indices[before < 0.9].tolist())
        got = {i for w, i in zip(weights[row].tolist(), ids[row].tolist(), strict=True) if w > 0}
        assert got == expected
        sizes.append(len(expected))
    assert sizes[1] == 1 and min(sizes[0], sizes[2], sizes[3]) > 100


@pytest.mark.parametrize(("temperature", "top_p"), [(0.8, 0.9), (1.0, 1.0), (2.0, 0.75), (0.5, 1.0)])
def test_sampling_frequencies_match_the_renormalised_nucleus(temperature, top_p):
    logits = [2.0, 1.5, 1.0, 0.2, -0.5, -3.0]
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, repetition_penalty=1.0)
    draws = 200_000
    freq = empirical(logits, sampling, draws)
    expected = nucleus_by_hand(logits, temperature, top_p)
    for token in range(len(logits)):
        p = expected.get(token, 0.0)
        if p == 0.0:
            assert freq[token] == 0.0, f"token {token} is outside the nucleus but was drawn"
        else:
            sigma = math.sqrt(p * (1 - p) / draws)
            assert abs(freq[token].item() - p) < 5 * sigma + 1e-9, (token, freq[token].item(), p)


def test_temperature_scales_logits_as_hand_computed():
    # logits 0, ln 2, ln 4: at T = 1 probabilities 1/7, 2/7, 4/7; at T = 0.5 they square: 1/21, 4/21, 16/21.
    logits = [0.0, math.log(2), math.log(4)]
    draws = 200_000
    for temperature, expected in [(1.0, [1 / 7, 2 / 7, 4 / 7]), (0.5, [1 / 21, 4 / 21, 16 / 21])]:
        freq = empirical(
            logits, SamplingConfig(temperature=temperature, top_p=1.0, repetition_penalty=1.0), draws
        )
        for f, p in zip(freq.tolist(), expected, strict=True):
            assert abs(f - p) < 5 * math.sqrt(p * (1 - p) / draws)


def test_same_seed_same_draws():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3))
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    a = sample_next_tokens(logits, sampling, torch.Generator().manual_seed(7))
    b = sample_next_tokens(logits, sampling, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (0.8, 0.9), (2.0, 0.75)])
def test_each_draw_comes_with_its_log_prob_under_the_distribution_that_drew_it(temperature, top_p):
    logits = [2.0, 1.5, 1.0, 0.2, -0.5, -3.0]
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, repetition_penalty=1.0)
    batch = torch.tensor(logits).expand(64, -1)
    tokens, logprobs = draw_next_tokens(batch, sampling, torch.Generator().manual_seed(1))
    expected = nucleus_by_hand(logits, temperature, top_p)
    for token, logprob in zip(tokens.tolist(), logprobs.tolist(), strict=True):
        assert logprob == pytest.approx(math.log(expected[token]), abs=1e-5)
    # The same draws as the plain sampler with the same seed.
    assert torch.equal(tokens, sample_next_tokens(batch, sampling, torch.Generator().manual_seed(1)))


def test_a_greedy_pick_has_log_prob_zero_and_the_penalty_counts():
    logits = torch.tensor([[3.0, 2.0, -1.0]])
    tokens, logprobs = draw_next_tokens(logits, SamplingConfig(do_sample=False))
    assert tokens.tolist() == [0] and logprobs.tolist() == [0.0]
    # penalty 2 on token 0 (3 -> 1.5), then T = 1: log-prob of what was drawn, by hand
    penalised = SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=2.0)
    tokens, logprobs = draw_next_tokens(
        logits, penalised, torch.Generator().manual_seed(0), previous_tokens=torch.tensor([[0]])
    )
    total = math.exp(1.5) + math.exp(2.0) + math.exp(-1.0)
    by_hand = [1.5, 2.0, -1.0][tokens.item()] - math.log(total)
    assert logprobs.item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.8, 0.9), (2.0, 0.75)])
def test_per_row_streams_draw_from_the_renormalised_nucleus(temperature, top_p):
    # One row per stream, each seeded differently: the frequencies over the rows are the nucleus's.
    logits = [2.0, 1.5, 1.0, 0.2, -0.5, -3.0]
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, repetition_penalty=1.0)
    draws = 20_000
    batch = torch.tensor(logits).expand(draws, -1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(draws)]
    tokens, logprobs = draw_next_tokens(batch, sampling, row_generators=generators)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / draws
    expected = nucleus_by_hand(logits, temperature, top_p)
    for token in range(len(logits)):
        p = expected.get(token, 0.0)
        assert abs(freq[token].item() - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-9, (token, p)
    for token, logprob in zip(tokens[:64].tolist(), logprobs[:64].tolist(), strict=True):
        assert logprob == pytest.approx(math.log(expected[token]), abs=1e-5)


def test_a_rows_draw_depends_on_its_own_stream_and_logits_only():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.0)

    def streams(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together, _ = draw_next_tokens(logits, sampling, row_generators=streams(range(6)))
    # Row 4 alone, and the rows in another order, draw the same tokens as in the full batch.
    alone, _ = draw_next_tokens(logits[4:5], sampling, row_generators=streams([4]))
    flipped, _ = draw_next_tokens(logits.flip(0), sampling, row_generators=streams(range(5, -1, -1)))
    assert alone.item() == together[4].item()
    assert torch.equal(flipped.flip(0), together)
    with pytest.raises(ValueError, match="6 rows but 2 row generators"):
        draw_next_tokens(logits, sampling, row_generators=streams([0, 1]))
