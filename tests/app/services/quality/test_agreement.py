"""Agreement: Krippendorff's alpha against textbook and hand-worked values; pairwise agreement by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.services.quality.agreement import (
    TaskRankings,
    agreement_report,
    compute_agreement,
    fractional_ranks,
    krippendorff_alpha,
)
from tests.world import World

N = None


def test_fractional_ranks_share_the_mean_position_of_a_tie_group():
    # [[7], [8, 9], [10]]: 7 takes position 1; 8 and 9 cover positions 2 and 3 -> 2.5; 10 is 4th.
    assert fractional_ranks([[7], [8, 9], [10]]) == {7: 1.0, 8: 2.5, 9: 2.5, 10: 4.0}
    # all tied: four responses share (1+2+3+4)/4 = 2.5
    assert fractional_ranks([[1, 2, 3, 4]]) == {1: 2.5, 2: 2.5, 3: 2.5, 4: 2.5}


def test_alpha_matches_krippendorffs_own_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 observers x 12 units
    # example with missing values. Published: nominal .743, ordinal .815, interval .849.
    data = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
        [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
    ]
    assert round(krippendorff_alpha(data, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(data, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(data, "interval"), 3) == 0.849


def test_alpha_on_a_hand_worked_two_coder_table():
    # Coders A = (1, 2, 3), B = (1, 3, 3) over three units.
    # Coincidences (each unit has m = 2 values, so each ordered pair weighs 1/(m-1) = 1):
    #   unit 1: (1,1) twice -> o11 = 2; unit 2: o23 = o32 = 1; unit 3: o33 = 2.
    #   marginals n1 = 2, n2 = 1, n3 = 3, n = 6.
    # Ordinal distances: delta(c,k) = sum_{g=c..k} n_g - (n_c + n_k)/2
    #   d12 = 1.5 -> 2.25, d23 = 2 -> 4, d13 = 1 + 1 + 1.5 = 3.5 -> 12.25.
    # Observed  sum o*d2 = 2 * 1 * 4 = 8.
    # Expected  sum_{c!=k} n_c n_k d2 = 2 * (2*1*2.25 + 1*3*4 + 2*3*12.25) = 180.
    # alpha = 1 - (n - 1) * 8 / 180 = 1 - 40/180 = 7/9.
    table = [[1, 2, 3], [1, 3, 3]]
    assert krippendorff_alpha(table, "ordinal") == pytest.approx(7 / 9)
    # Nominal: observed 2 mismatched pairs, expected 2 * (2*1 + 1*3 + 2*3) = 22 -> 1 - 5*2/22 = 6/11.
    assert krippendorff_alpha(table, "nominal") == pytest.approx(6 / 11)


def test_alpha_is_undefined_without_variation_and_one_for_perfect_agreement():
    assert math.isnan(krippendorff_alpha([[2, 2], [2, 2]]))
    assert krippendorff_alpha([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)


def _hand_tasks() -> list[TaskRankings]:
    # T1: A = r1 > r2 > r3, B = r1 > r3 > r2.   T2: A = (s1 = s2) > s3, B = s1 > s2 > s3.
    return [
        TaskRankings(1, 10, {1: fractional_ranks([[1], [2], [3]]), 2: fractional_ranks([[1], [3], [2]])}),
        TaskRankings(2, 20, {1: fractional_ranks([[4, 5], [6]]), 2: fractional_ranks([[4], [5], [6]])}),
    ]


def test_pairwise_agreement_and_alpha_by_hand():
    # Pairwise: T1 (r1,r2) same, (r1,r3) same, (r2,r3) opposite -> 2/3, all strict.
    #           T2 (s1,s2) tie vs better -> differ, not strict; (s1,s3), (s2,s3) same -> 2/3, strict 2/2.
    #   overall 4/6; strict 4/5.
    # Alpha, units = responses, values = fractional ranks:
    #   r1 (1,1) r2 (2,3) r3 (3,2) s1 (1.5,1) s2 (1.5,2) s3 (3,3)
    #   o11 = 2, o23 = o32 = 2, o1,1.5 = o1.5,1 = 1, o1.5,2 = o2,1.5 = 1, o33 = 2
    #   n(1) = 3, n(1.5) = 2, n(2) = 3, n(3) = 4, n = 12
    #   ordinal d2: (1,1.5) 2.5^2 = 6.25, (1.5,2) 6.25, (2,3) 3.5^2 = 12.25, (1,2) 5^2 = 25,
    #               (1.5,3) 6^2 = 36, (1,3) 8.5^2 = 72.25
    #   observed = 2*6.25 + 2*6.25 + 2*2*12.25 = 74
    #   expected = 2*(3*2*6.25 + 2*3*6.25 + 3*4*12.25 + 3*3*25 + 2*4*36 + 3*4*72.25) = 3204
    #   alpha = 1 - 11 * 74 / 3204 = 1 - 814/3204
    report = compute_agreement(_hand_tasks(), {10: "set X", 20: "set Y"}, {1: "ann", 2: "bob"}, n_boot=200)
    overall = report.overall
    assert (overall.tasks, overall.annotations, overall.annotators) == (2, 4, 2)
    assert (overall.judgements, overall.strict_judgements, overall.values) == (6, 5, 12)
    assert overall.agreement.value == pytest.approx(4 / 6)
    assert overall.strict_agreement.value == pytest.approx(4 / 5)
    assert overall.alpha.value == pytest.approx(1 - 814 / 3204)

    by_set = {row.label: row for row in report.by_prompt_set}
    assert by_set["set X"].agreement.value == pytest.approx(2 / 3)
    assert by_set["set Y"].strict_agreement.value == pytest.approx(1.0)
    assert by_set["set X"].tasks == by_set["set Y"].tasks == 1

    # With two annotators, each one's pairs are all the pairs: same figures as overall.
    for row in report.by_annotator:
        assert row.agreement.value == pytest.approx(4 / 6)
        assert row.alpha.value == pytest.approx(overall.alpha.value)


def test_each_annotator_against_the_others_by_hand():
    # One task, A = r1 > r2 > r3, B = r1 > r3 > r2, C = r3 > r2 > r1 (A reversed).
    #   A-B agree on 2/3 pairs, A-C on 0/3, B-C on 1/3 ((r2,r3): both r3 first).
    #   A: (2+0)/6 = 1/3, B: (2+1)/6 = 1/2, C: (0+1)/6 = 1/6; overall 3/9.
    task = TaskRankings(
        1,
        None,
        {
            1: fractional_ranks([[1], [2], [3]]),
            2: fractional_ranks([[1], [3], [2]]),
            3: fractional_ranks([[3], [2], [1]]),
        },
    )
    report = compute_agreement([task], usernames={1: "a", 2: "b", 3: "c"}, n_boot=0)
    rows = {r.label: r for r in report.by_annotator}
    assert rows["a"].agreement.value == pytest.approx(1 / 3)
    assert rows["b"].agreement.value == pytest.approx(1 / 2)
    assert rows["c"].agreement.value == pytest.approx(1 / 6)
    assert report.overall.agreement.value == pytest.approx(1 / 3)
    # The contrarian disagrees most, so its alpha is lowest; the value-weighted mean of the
    # annotators' observed disagreement is the overall one, so their alphas average to alpha.
    alphas = {k: r.alpha.value for k, r in rows.items()}
    assert alphas["c"] < alphas["a"] < alphas["b"]
    assert np.mean(list(alphas.values())) == pytest.approx(report.overall.alpha.value)


def test_bootstrap_intervals_bracket_the_estimate_and_shrink_with_data():
    rng = np.random.default_rng(1)

    def tasks(n):
        out = []
        for t in range(n):
            truth = rng.permutation(4)
            rankings = {}
            for user in range(3):
                noisy = truth + rng.normal(0, 1.0, 4)
                order = [int(i) + 10 * t for i in np.argsort(noisy)]
                rankings[user] = fractional_ranks([[r] for r in order])
            out.append(TaskRankings(t, 1, rankings))
        return out

    small = compute_agreement(tasks(20), n_boot=400, seed=3).overall
    large = compute_agreement(tasks(320), n_boot=400, seed=3).overall
    for row in (small, large):
        for est in (row.agreement, row.strict_agreement, row.alpha):
            assert est.low <= est.value <= est.high
    assert (large.alpha.high - large.alpha.low) < (small.alpha.high - small.alpha.low) / 2
    assert (large.agreement.high - large.agreement.low) < (small.agreement.high - small.agreement.low) / 2

    # no overlapped tasks: nothing to estimate, and no error
    empty = compute_agreement([], n_boot=10).overall
    assert empty.tasks == 0 and math.isnan(empty.agreement.value) and math.isnan(empty.alpha.value)


def test_agreement_from_the_database_uses_only_overlapped_usable_annotations(db):
    w = World(db)
    ann, bob, cat = w.user("ann"), w.user("bob"), w.user("cat")
    x1, lonely_prompt = w.prompt_set("set X", ["x one", "x two"])
    (y1,) = w.prompt_set("set Y", ["y one"])
    t1, t2 = w.task(3, prompt=x1, required=3), w.task(3, prompt=y1, required=3)
    w.judge(t1, ann, [[0], [1], [2]])
    w.judge(t1, bob, [[0], [2], [1]])
    w.skip(t1, cat)  # skipped: no ranking
    w.judge(t2, ann, [[0, 1], [2]])
    w.judge(t2, bob, [[0], [1], [2]])
    w.judge(t2, cat, [[2], [1], [0]], all_bad=True)  # all bad: not a ranking for training
    lonely = w.task(3, prompt=lonely_prompt)
    w.judge(lonely, ann, [[0], [1], [2]])  # overlap 1: no agreement to measure

    report = agreement_report(db, n_boot=50)
    assert report.overall.tasks == 2
    assert report.overall.agreement.value == pytest.approx(4 / 6)
    assert report.overall.alpha.value == pytest.approx(1 - 814 / 3204)
    assert [r.label for r in report.by_prompt_set] == ["set X", "set Y"]
    assert [r.label for r in report.by_annotator] == ["ann", "bob"]
    assert report.as_dict()["overall"]["tasks"] == 2
