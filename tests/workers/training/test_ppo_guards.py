"""PPO's collapse guards on hand-made step metrics: which threshold strikes, when, and what it says."""

from __future__ import annotations

import dataclasses

import pytest

from workers.training.ppo_guards import CollapseGuards, GuardSettings, max_length_allowed

OFF = GuardSettings(
    max_kl=None,
    max_length_ratio=None,
    min_length_ratio=None,
    length_headroom=None,
    max_mean_length=None,
    min_mean_length=None,
    min_eos_share=None,
    max_repetition=None,
    patience=1,
    max_new_tokens=128,
)


def step(
    length: float = 40.0, eos: float = 1.0, kl: float = 0.0, repetition: float = 0.0
) -> dict[str, float]:
    return {"response_length": length, "eos_share": eos, "kl_ref": kl, "repetition_rate": repetition}


def test_the_length_rise_guard_can_fire_below_the_cap_whatever_the_first_length():
    # First rollout 60 tokens of 128: 2.5x is 150, past the cap, so a ratio alone never fires.
    ratio_only = dataclasses.replace(OFF, max_length_ratio=2.5)
    assert max_length_allowed(ratio_only, 60.0) == 150.0
    guards = CollapseGuards(ratio_only)
    assert guards.reasons(step(60)) == [] and guards.reasons(step(127)) == []
    # With half the headroom to the cap: 60 + 0.5 * (128 - 60) = 94.
    both = dataclasses.replace(ratio_only, length_headroom=0.5)
    assert max_length_allowed(both, 60.0) == 94.0
    assert max_length_allowed(both, 20.0) == 50.0  # short first answers: 2.5x (50) < 20 + 54
    guards = CollapseGuards(both)
    assert guards.reasons(step(60)) == [] and guards.reasons(step(94)) == []
    (reason,) = guards.reasons(step(95))
    assert reason == "mean response length 95.0 > 94.0 (the first rollout's was 60.0)"


def test_the_length_rise_guard_is_off_when_the_first_rollout_leaves_no_room_to_rise():
    # 64-token cap: a first rollout of 60.2 tokens leaves 3.8 (< 10% of the cap). With the headroom
    # rule alone the ceiling would be 62.1, and 64.0 (every answer cut) would strike.
    settings = dataclasses.replace(OFF, max_length_ratio=2.5, length_headroom=0.5, max_new_tokens=64)
    assert max_length_allowed(settings, 60.2) == pytest.approx(62.1)
    crowded = CollapseGuards(settings)
    assert not crowded.length_guard_off  # no baseline yet
    assert crowded.reasons(step(60.2)) == [] and crowded.length_guard_off
    assert crowded.reasons(step(64.0)) == []
    # 57 of 64 leaves 7 tokens, more than 10%: the guard watches (ceiling 57 + 3.5 = 60.5).
    roomy = CollapseGuards(settings)
    assert roomy.reasons(step(57.0)) == [] and not roomy.length_guard_off
    (reason,) = roomy.reasons(step(61.0))
    assert reason == "mean response length 61.0 > 60.5 (the first rollout's was 57.0)"
    # The other length guards still watch a crowded run: answers shrinking towards nothing.
    shrinking = CollapseGuards(dataclasses.replace(settings, min_length_ratio=0.3))
    shrinking.reasons(step(62.0))
    assert shrinking.reasons(step(10.0)) == ["mean response length 10.0 < 0.3x the first 62.0"]


def test_the_eos_share_guard_says_what_to_change():
    guards = CollapseGuards(dataclasses.replace(OFF, min_eos_share=0.25))
    assert guards.reasons(step(eos=0.5)) == []  # the first rollout: half its answers end
    assert guards.reasons(step(eos=0.25)) == []
    (reason,) = guards.reasons(step(eos=0.125))
    assert reason.startswith("only 12% of responses ended before 128 tokens (at least 25% must")
    assert "policy.sampling.max_new_tokens" in reason


def test_a_guard_must_hold_patience_steps_in_a_row():
    guards = CollapseGuards(dataclasses.replace(OFF, max_kl=5.0, patience=2))
    assert guards.check(step(kl=6.0)) is None
    assert guards.check(step(kl=1.0)) is None  # the run of strikes is broken
    assert guards.check(step(kl=6.0)) is None
    assert guards.check(step(kl=7.0)) == "KL to reference 7.00 nats > 5.0 (2 steps in a row)"
    again = CollapseGuards(guards.settings)
    again.load_state_dict(guards.state_dict())
    assert again.strikes == 2 and again.baseline_length == 40.0


@pytest.mark.parametrize(
    ("metrics", "settings", "expected"),
    [
        (step(length=10), {"min_length_ratio": 0.3}, "mean response length 10.0 < 0.3x the first 40.0"),
        (step(length=50), {"max_mean_length": 45.0}, "mean response length 50.0 > 45.0"),
        (step(length=30), {"min_mean_length": 35.0}, "mean response length 30.0 < 35.0"),
        (step(repetition=0.6), {"max_repetition": 0.5}, "repetition rate 0.60 > 0.5"),
    ],
)
def test_each_guard_states_its_threshold(metrics, settings, expected):
    guards = CollapseGuards(dataclasses.replace(OFF, **settings))
    guards.reasons(step(40))  # the first rollout sets the baseline
    assert guards.reasons(metrics) == [expected]


def test_the_eos_share_guard_stays_off_when_the_first_rollout_already_rambles():
    """Nothing to fall from: a model that ends 2% of its answers at this length from the start is not
    stopped for it (the missing-EOS penalty and the gate's EOS check still apply)."""
    guards = CollapseGuards(dataclasses.replace(OFF, min_eos_share=0.2, patience=1))
    assert guards.check(step(eos=0.0)) is None and guards.eos_guard_off
    assert guards.check(step(eos=0.0)) is None
    resumed = CollapseGuards(guards.settings)
    resumed.load_state_dict(guards.state_dict())
    assert resumed.eos_guard_off and resumed.check(step(eos=0.0)) is None
    # A first rollout above the floor keeps the guard on.
    watched = CollapseGuards(dataclasses.replace(OFF, min_eos_share=0.2, patience=1))
    assert watched.check(step(eos=0.5)) is None and not watched.eos_guard_off
    assert watched.check(step(eos=0.1)).startswith("only 10% of responses ended")
