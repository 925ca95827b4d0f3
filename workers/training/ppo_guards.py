"""PPO's collapse guards: the step metrics that move before the reward does, read after every step.

MOSS-RLHF (§5.2) saw collapse show first in the KL to the reference, the response length and
repetition. A guard that holds `patience` steps in a row stops the run and rejects the candidate with
the stated reason. The thresholds are settings of PPOConfig (`guard_*`); the state (the first rollout's
length, the strikes so far) goes into checkpoints so a resumed run guards the same way.

The EOS-share guard watches for answers that stop ending. It needs something to fall from: when the
first rollout already ends less often than `min_eos_share` (a small model rambling past a short
`max_new_tokens`: SmolLM2-135M at temperature 1 ends 2% of its answers within 64 tokens and 6% within
96), the guard stays off for the run and says so once; the missing-EOS penalty still marks every
cut-off answer, and the gate compares the candidate's EOS share with the live policy's.

The length-rise guard likewise needs room to rise: when the first rollout already averages within
`LENGTH_ROOM_FLOOR` of `max_new_tokens` (SmolLM2-135M averages about 60 of 64 tokens), nearly every
answer is cut at the cap, a "rise" can only be a few more answers cut, and the guard would fire on the
noise of eight samples. It stays off for the run and says so once; the missing-EOS penalty and the
gate's EOS-share and length checks watch those answers instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The share of max_new_tokens the first rollout must leave free for the length-rise guard to watch.
LENGTH_ROOM_FLOOR = 0.1


@dataclass
class GuardSettings:
    max_kl: float | None  # nats per response to the reference
    max_length_ratio: float | None  # mean length vs the first rollout's
    min_length_ratio: float | None
    length_headroom: float | None  # share of the way from the first length to max_new_tokens
    max_mean_length: float | None  # absolute bounds in tokens
    min_mean_length: float | None
    min_eos_share: float | None  # share of responses that ended with EOS
    max_repetition: float | None
    patience: int
    max_new_tokens: int  # the rollout cap: no mean length can exceed it


def max_length_allowed(settings: GuardSettings, baseline: float) -> float | None:
    """The mean length above which the rise guard strikes: `max_length_ratio` x the first rollout's,
    but never beyond `length_headroom` of the way from there to `max_new_tokens`.

    A ratio alone cannot fire once the first rollout averages more than cap / ratio (2.5x of 52
    tokens is above a 128-token cap); the headroom keeps the guard live at the training length.
    """
    bounds = []
    if settings.max_length_ratio is not None:
        bounds.append(settings.max_length_ratio * baseline)
    if settings.length_headroom is not None:
        bounds.append(baseline + settings.length_headroom * max(settings.max_new_tokens - baseline, 0.0))
    return min(bounds) if bounds else None


class CollapseGuards:
    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.baseline_length: float | None = None
        self.baseline_eos_share: float | None = None
        self.strikes = 0

    def off_notices(self) -> list[str]:
        """One line per guard the first rollout turned off, with what keeps it on (logged once)."""
        max_new_tokens = self.settings.max_new_tokens
        notices = []
        if self.length_guard_off:
            notices.append(
                f"the first rollout's answers averaged {self.baseline_length:.1f} of {max_new_tokens} "
                "tokens: too close to the cap to see them grow, so the length-rise guard is off for this "
                "run (raise policy.sampling.max_new_tokens to keep it on)"
            )
        if self.eos_guard_off:
            notices.append(
                f"only {100 * self.baseline_eos_share:.0f}% of the first rollout's answers ended within "
                f"{max_new_tokens} tokens: the EOS-share guard is off for this run (raise "
                "policy.sampling.max_new_tokens to keep it on)"
            )
        return notices

    @property
    def length_guard_off(self) -> bool:
        """True when the first rollout left too little room below the cap to see a rise."""
        if self.baseline_length is None:
            return False
        cap = self.settings.max_new_tokens
        return cap - self.baseline_length < LENGTH_ROOM_FLOOR * cap

    @property
    def eos_guard_off(self) -> bool:
        """True when the first rollout already ended less often than the guard's floor."""
        floor = self.settings.min_eos_share
        return floor is not None and self.baseline_eos_share is not None and self.baseline_eos_share < floor

    def reasons(self, metrics: dict[str, float]) -> list[str]:
        """Every threshold this step's metrics cross (the first call sets the baseline length)."""
        cfg = self.settings
        length = metrics["response_length"]
        if self.baseline_length is None:
            self.baseline_length = length
        if self.baseline_eos_share is None:
            self.baseline_eos_share = metrics["eos_share"]
        base = max(self.baseline_length, 1.0)
        out = []
        if cfg.max_kl is not None and metrics["kl_ref"] > cfg.max_kl:
            out.append(f"KL to reference {metrics['kl_ref']:.2f} nats > {cfg.max_kl}")
        ceiling = None if self.length_guard_off else max_length_allowed(cfg, base)
        if ceiling is not None and length > ceiling:
            out.append(
                f"mean response length {length:.1f} > {ceiling:.1f} (the first rollout's was {base:.1f})"
            )
        if cfg.min_length_ratio is not None and length < cfg.min_length_ratio * base:
            out.append(f"mean response length {length:.1f} < {cfg.min_length_ratio}x the first {base:.1f}")
        if cfg.max_mean_length is not None and length > cfg.max_mean_length:
            out.append(f"mean response length {length:.1f} > {cfg.max_mean_length}")
        if cfg.min_mean_length is not None and length < cfg.min_mean_length:
            out.append(f"mean response length {length:.1f} < {cfg.min_mean_length}")
        if (
            cfg.min_eos_share is not None
            and not self.eos_guard_off
            and metrics["eos_share"] < cfg.min_eos_share
        ):
            out.append(
                f"only {metrics['eos_share']:.0%} of responses ended before {cfg.max_new_tokens} tokens "
                f"(at least {cfg.min_eos_share:.0%} must; raise policy.sampling.max_new_tokens if the "
                "answers need more room)"
            )
        if cfg.max_repetition is not None and metrics["repetition_rate"] > cfg.max_repetition:
            out.append(f"repetition rate {metrics['repetition_rate']:.2f} > {cfg.max_repetition}")
        return out

    def check(self, metrics: dict[str, float]) -> str | None:
        """The reason to stop, once some threshold has been crossed `patience` steps in a row."""
        reasons = self.reasons(metrics)
        self.strikes = self.strikes + 1 if reasons else 0
        if self.strikes >= max(1, self.settings.patience):
            return "; ".join(reasons) + f" ({self.strikes} steps in a row)"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_length": self.baseline_length,
            "baseline_eos_share": self.baseline_eos_share,
            "strikes": self.strikes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline_length = state["baseline_length"]
        self.baseline_eos_share = state.get("baseline_eos_share")  # absent from older checkpoints
        self.strikes = int(state["strikes"])
