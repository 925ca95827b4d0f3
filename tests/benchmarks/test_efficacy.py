"""The efficacy benchmark's pieces: the annotators' standards, their noise, the interval they are
measured with, and the command line."""

from __future__ import annotations

import random

import pytest

from app.common.win_rate import win_rate
from benchmarks.efficacy import parse_args, resolve_profile
from benchmarks.simulated_annotators import (
    NoiseTally,
    SimulatedAnnotator,
    concise,
    noisy_pair_wins,
    noisy_ranking,
    standard_named,
    structured,
    warm,
)

SHORT = "Drink a glass of water when you wake up and keep a bottle on your desk all day long, sipping it every hour or so until it runs out."
LONG = " ".join(["Water matters for many reasons and here is a very long ramble about it"] * 8) + "."
CUT = "Drink a glass of water when you wake up and keep a bottle on your desk all day long, sipping it every hour or so until it runs out and"
LIST = "Try these:\n1. Keep a bottle on your desk.\n2. Drink a glass with every meal.\n3. Set a reminder."
WALL = "Keep a bottle on your desk, drink a glass with every meal and set a reminder."
KIND = "Great question! I hope this helps you: keep a bottle on your desk, and good luck!"
FLAT = "Keep a bottle on the desk. Drink with meals. Set a reminder."


def test_each_standard_prefers_its_own_kind_of_answer():
    assert concise(SHORT) > concise(LONG) and concise(SHORT) > concise(CUT)  # short and finished
    assert structured(LIST) > structured(WALL)
    assert warm(KIND) > warm(FLAT)
    # The standards differ: the structured answer is not the warm one's favourite.
    assert warm(KIND) > warm(LIST) and structured(LIST) > structured(KIND)
    assert all(standard("") == -10.0 for standard in (concise, structured, warm))
    with pytest.raises(ValueError, match="unknown standard 'length'; choose concise, structured, warm"):
        standard_named("length")


def test_concise_by_hand():
    # 29 words, finished: 1.0. 47 words with no full stop: 0 for the ending, 2 words over 45 cost 2/15.
    assert concise(SHORT) == 1.0
    assert concise(" ".join(["word"] * 47)) == pytest.approx(-2 / 15)


def test_without_noise_the_ranking_follows_the_standard():
    rng = random.Random(0)
    scores = [0.2, 3.0, -1.0, 1.5]
    assert noisy_ranking(scores, 0.0, rng) == [1, 3, 0, 2]


def test_a_quarter_of_the_verdicts_are_flipped():
    rng = random.Random(1)
    flipped = sum(noisy_pair_wins([1.0, 0.0], 0.25, rng)[1][0] for _ in range(8000))
    assert flipped / 8000 == pytest.approx(0.25, abs=0.015)
    with pytest.raises(ValueError, match="noise must be between 0 and 0.5"):
        noisy_pair_wins([1.0, 0.0], 0.7, rng)


def test_the_tally_counts_pairs_against_the_standard_by_hand():
    tally = NoiseTally()
    # Scores 3, 2, 2 ranked [1, 0, 2]: pairs (1,0) against, (1,2) a standard tie, (0,2) with it.
    tally.add([1, 0, 2], [3.0, 2.0, 2.0])
    assert (tally.pairs, tally.against_standard, tally.standard_ties) == (3, 1, 1)
    assert tally.disagreement == 0.5


def test_a_noisy_annotator_disagrees_with_its_standard_about_as_often_as_its_noise():
    annotator = SimulatedAnnotator("concise", noise=0.25, seed=3)
    rng = random.Random(4)
    for _ in range(400):
        annotator.rank([" ".join(["w"] * rng.randint(5, 90)) + "." for _ in range(4)])
    # Copeland over flipped pairs undoes some flips, so a ranking disagrees a little less than 25%.
    assert 0.12 < annotator.tally.disagreement < 0.3
    judge = annotator.judge_fn()
    assert judge([], [SHORT, LONG], [[], []]) == [concise(SHORT), concise(LONG)]


def test_the_benchmark_interval_is_the_prompt_clustered_wilson():
    # 78 of 100 held-out prompts won, one sample each: the lower bound is well above 0.5.
    rate = win_rate([[1.0]] * 78 + [[0.0]] * 22)
    assert (round(rate.low, 3), round(rate.high, 3)) == (0.689, 0.85)


def test_the_command_line_reads_the_product_profile(capsys):
    args = parse_args(["--profile", "cpu", "--rounds", "2", "--standards", "warm"])
    profile = resolve_profile(args)
    assert (profile["name"], profile["rankings"], profile["rounds"]) == ("cpu", 128, 2)
    assert profile["specs"]["ppo"]["policy"]["sampling"]["max_new_tokens"] == profile["max_new_tokens"]
    assert resolve_profile(parse_args(["--smoke"]))["name"] == "smoke"
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "--samples-per-prompt" in shown and "After AlpacaFarm" in shown and "--algorithms" in shown
