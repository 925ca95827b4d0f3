"""The judge split: the comparisons of a round fall on two disjoint sides by prompt."""

from __future__ import annotations

from workers.runs.comparisons import comparisons_for_side, judge_holds
from workers.training.data import Comparison


def comparison(n: int, prompt_id: int) -> Comparison:
    return Comparison(
        comparison_id=n,
        prompt_id=prompt_id,
        group_id=n,
        prompt=[{"role": "user", "content": f"p{prompt_id}"}],
        chosen="a",
        rejected="b",
        margin=1.0,
    )


def test_the_two_sides_are_disjoint_by_prompt_and_cover_every_comparison():
    comparisons = [comparison(n, prompt_id=n // 3) for n in range(600)]  # three per prompt
    split = {"judge_share": 0.5, "seed": 7}
    policy = comparisons_for_side(comparisons, {**split, "side": "policy"})
    judge = comparisons_for_side(comparisons, {**split, "side": "judge"})
    assert len(policy) + len(judge) == 600
    assert not {c.prompt_id for c in policy} & {c.prompt_id for c in judge}
    assert 0.4 < len(judge) / 600 < 0.6
    # The same seed draws the same split (a redelivered stage); another seed another one.
    assert comparisons_for_side(comparisons, {**split, "side": "judge"}) == judge
    other = comparisons_for_side(comparisons, {"judge_share": 0.5, "seed": 8, "side": "judge"})
    assert {c.prompt_id for c in other} != {c.prompt_id for c in judge}


def test_the_share_sets_the_judges_part_and_no_split_keeps_everything():
    held = sum(judge_holds(prompt_id, 0.2, seed=1) for prompt_id in range(2000))
    assert 0.17 < held / 2000 < 0.23
    comparisons = [comparison(n, n) for n in range(5)]
    assert comparisons_for_side(comparisons, None) == comparisons
