"""The candidate-vs-live evaluation and its promotion gate: k samples per prompt, a held-out judge,
the lower bound of the win rate, KL to the live and the base policy, EOS share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.inference.sampling import SamplingConfig
from workers.training.evaluation import EvaluationReport, GateConfig, apply_gate, evaluate_candidate

PROMPTS = [
    [{"role": "system", "content": "Reply."}, {"role": "user", "content": f"item {i}"}] for i in range(6)
]
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def length_reward(prompt_texts, texts, ids):
    return [float(len(r)) for r in ids]


def token_parity_reward(prompt_texts, texts, ids):
    return [float(sum(t % 2 == 0 for t in r)) for r in ids]


def report(**values) -> EvaluationReport:
    base = dict(
        prompts=100,
        samples_per_prompt=4,
        max_new_tokens=128,
        candidate_score=1.0,
        live_score=0.5,
        win_rate=0.7,
        win_rate_low=0.6,
        win_rate_high=0.79,
        confidence=0.95,
        interval="wilson",
        kl_to_live=3.0,
        kl_to_base=6.0,
        candidate_length=40.0,
        live_length=40.0,
        candidate_eos_share=0.9,
        live_eos_share=0.9,
    )
    base.update(values)
    return EvaluationReport(**base)


def test_gate_passes_a_clear_improvement_and_records_every_check():
    out = apply_gate(report(), GateConfig())
    assert out.passed and out.reasons == []
    names = [c["name"] for c in out.checks]
    assert names == [
        "win_rate_lower_bound",
        "kl_to_live",
        "kl_to_base",
        "length_ratio_max",
        "length_ratio_min",
        "eos_share_drop",
    ]
    assert out.checks[0] == {
        "name": "win_rate_lower_bound",
        "value": 0.6,
        "threshold": 0.5,
        "passed": True,
        "reason": "",
    }


@pytest.mark.parametrize(
    ("values", "gate", "reason"),
    [
        # A tie, or a win rate above 0.5 whose lower bound is not, does not pass.
        (
            {"win_rate": 0.5, "win_rate_low": 0.4},
            GateConfig(),
            "win rate 0.500, its 95% lower bound 0.400 is not above 0.5 (100 prompts × 4)",
        ),
        (
            {"win_rate": 0.6, "win_rate_low": 0.5},
            GateConfig(),
            "win rate 0.600, its 95% lower bound 0.500 is not above 0.5 (100 prompts × 4)",
        ),
        ({"kl_to_live": 30.0}, GateConfig(max_kl=25.0), "KL to live 30.00 nats > 25.0"),
        ({"kl_to_base": 45.5}, GateConfig(), "KL to base 45.50 nats > 40.0"),
        ({"candidate_length": 100.0}, GateConfig(), "length ratio 2.50 > 2.0"),
        ({"candidate_length": 10.0}, GateConfig(), "length ratio 0.25 < 0.5"),
        ({"candidate_score": 0.6}, GateConfig(min_score_delta=0.2), "score gain 0.100 < 0.2"),
        (
            {"candidate_eos_share": 0.3},
            GateConfig(min_eos_share=0.5, max_eos_share_drop=None),
            "EOS share 0.30 < 0.5",
        ),
        # Live ends 90% of its answers, the candidate 75%: 0.15 more answers cut off.
        (
            {"candidate_eos_share": 0.75},
            GateConfig(),
            "EOS share fell 0.15 (live 0.90 → candidate 0.75) > 0.1",
        ),
    ],
)
def test_gate_fails_with_a_stated_reason(values, gate, reason):
    out = apply_gate(report(**values), gate)
    assert not out.passed
    assert out.reasons == [reason]
    failed = [c for c in out.checks if not c["passed"]]
    assert [c["reason"] for c in failed] == [reason]


def test_an_eos_share_that_falls_by_exactly_the_allowance_passes():
    assert apply_gate(report(candidate_eos_share=0.8), GateConfig()).passed


def test_gate_lists_every_failed_threshold():
    out = apply_gate(report(win_rate_low=0.1, kl_to_live=99.0), GateConfig(max_kl=1.0))
    assert len(out.reasons) == 2 and not out.passed


def test_in_human_mode_the_win_rate_is_left_to_the_votes_but_the_checks_still_apply():
    gate = GateConfig(mode="human")
    assert apply_gate(report(win_rate=0.45, win_rate_low=0.35), gate).passed
    drifted = apply_gate(report(win_rate_low=0.35, kl_to_base=80.0), gate)
    assert drifted.reasons == ["KL to base 80.00 nats > 40.0"]


def test_a_gate_refuses_an_unknown_mode_or_interval():
    with pytest.raises(ValueError, match="gate mode must be one of judge, human"):
        GateConfig(mode="vote")
    with pytest.raises(ValueError, match="gate interval must be one of wilson, bootstrap"):
        GateConfig(interval="normal")


def test_a_candidate_identical_to_live_ties_and_is_not_promoted(tiny_model_dir):
    # Same weights and the same random stream: identical answers, every comparison a tie, zero KL.
    # The old gate passed a tie (0.5 >= 0.5); a candidate the judge does not prefer must not pass.
    out = evaluate_candidate(
        tiny_model_dir,
        tiny_model_dir,
        token_parity_reward,
        PROMPTS,
        GateConfig(sampling=SAMPLING, samples_per_prompt=2),
        base_path=tiny_model_dir,
        judge_name="parity judge",
    )
    assert (out.prompts, out.samples_per_prompt, out.max_new_tokens) == (6, 2, 8)
    assert out.win_rate == 0.5 and out.win_rate_low < 0.5 < out.win_rate_high
    assert out.kl_to_live == pytest.approx(0.0, abs=1e-5)
    assert out.kl_to_base == pytest.approx(0.0, abs=1e-5)
    assert out.candidate_score == out.live_score
    assert out.candidate_length == out.live_length
    assert not out.passed
    assert out.reasons == [
        f"win rate 0.500, its 95% lower bound {out.win_rate_low:.3f} is not above 0.5 (6 prompts × 2)"
    ]
    assert out.judge == "parity judge"
    assert len(out.samples) == 5
    assert {"prompt", "live", "candidate", "live_score", "candidate_score"} <= set(out.samples[0])
    assert out.samples[0]["prompt"] == "item 0"
    assert out.samples[0]["live"] == out.samples[0]["candidate"]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    from app.inference.model_files import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other-policy"), seed=1)


def test_every_eval_prompt_k_times_by_default_and_the_kl_is_measured(tiny_model_dir, other_model_dir):
    out = evaluate_candidate(
        other_model_dir,
        tiny_model_dir,
        length_reward,
        PROMPTS,
        GateConfig(sampling=SAMPLING, samples_per_prompt=3, min_win_rate=None, max_kl=1e-3),
        base_path=tiny_model_dir,
    )
    assert out.prompts == len(PROMPTS) and out.samples_per_prompt == 3
    # The exact per-token KL between different models is positive, to the live and the base alike.
    assert out.kl_to_live > 1e-3 and out.kl_to_base == pytest.approx(out.kl_to_live, rel=1e-4)
    assert out.reasons == [f"KL to live {out.kl_to_live:.2f} nats > 0.001"]
    # With score = length, the mean scores are the mean lengths.
    assert out.candidate_score == pytest.approx(out.candidate_length)
    assert out.live_score == pytest.approx(out.live_length)
    assert 0.0 <= out.win_rate_low <= out.win_rate <= out.win_rate_high <= 1.0
    assert out.metrics()["kl_to_live"] == out.kl_to_live


def test_a_judge_that_prefers_the_live_answers_rejects_the_candidate(tiny_model_dir, other_model_dir):
    # First learn what each side says, then judge with a scorer that likes exactly the live answers.
    # One sample per prompt and the same seed: the second run draws exactly the same answers.
    gate = GateConfig(sampling=SAMPLING, samples_per_prompt=1, min_win_rate=None, max_kl=None, samples=6)
    seen = evaluate_candidate(other_model_dir, tiny_model_dir, length_reward, PROMPTS, gate)
    live_texts = {s["live"] for s in seen.samples} - {s["candidate"] for s in seen.samples}
    assert live_texts, "the two models answer differently"

    def likes_live(prompt_texts, texts, ids):
        return [1.0 if t.strip() in live_texts else 0.0 for t in texts]

    judged = evaluate_candidate(
        other_model_dir,
        tiny_model_dir,
        likes_live,
        PROMPTS,
        GateConfig(
            sampling=SAMPLING,
            samples_per_prompt=1,
            max_kl=None,
            max_length_ratio=None,
            min_length_ratio=None,
            max_eos_share_drop=None,
        ),
    )
    assert judged.win_rate < 0.5 and not judged.passed
    assert judged.reasons[0].startswith(f"win rate {judged.win_rate:.3f}, its 95% lower bound")


def test_reward_model_folder_scores_both_sides(tiny_model_dir, other_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")

    out = evaluate_candidate(
        other_model_dir,
        tiny_model_dir,
        tmp_path / "rm",
        PROMPTS,
        GateConfig(
            sampling=SAMPLING,
            samples_per_prompt=1,
            min_win_rate=None,
            max_kl=None,
            max_length_ratio=None,
            min_length_ratio=None,
            max_eos_share_drop=None,
        ),
    )
    assert out.passed
    scores = [s["candidate_score"] for s in out.samples] + [s["live_score"] for s in out.samples]
    assert all(torch.isfinite(torch.tensor(scores)))
    assert len(set(scores)) > 1  # the reward model does look at the text
