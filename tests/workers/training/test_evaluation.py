"""The candidate-vs-live evaluation and its promotion gate."""

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
        prompts=10,
        candidate_score=1.0,
        live_score=0.5,
        win_rate=0.7,
        kl_to_live=3.0,
        candidate_length=40.0,
        live_length=40.0,
        candidate_eos_share=0.9,
        live_eos_share=0.9,
    )
    base.update(values)
    return EvaluationReport(**base)


def test_gate_passes_a_clear_improvement():
    out = apply_gate(report(), GateConfig())
    assert out.passed and out.reasons == []


@pytest.mark.parametrize(
    ("values", "gate", "reason"),
    [
        ({"win_rate": 0.4}, GateConfig(), "win rate 0.400 < 0.5"),
        ({"kl_to_live": 30.0}, GateConfig(max_kl=25.0), "KL to live 30.00 nats > 25.0"),
        ({"candidate_length": 100.0}, GateConfig(), "length ratio 2.50 > 2.0"),
        ({"candidate_length": 10.0}, GateConfig(), "length ratio 0.25 < 0.5"),
        ({"candidate_score": 0.6}, GateConfig(min_score_delta=0.2), "score gain 0.100 < 0.2"),
        ({"candidate_eos_share": 0.3}, GateConfig(min_eos_share=0.5), "EOS share 0.30 < 0.5"),
    ],
)
def test_gate_fails_with_a_stated_reason(values, gate, reason):
    out = apply_gate(report(**values), gate)
    assert not out.passed
    assert out.reasons == [reason]


def test_gate_lists_every_failed_threshold():
    out = apply_gate(report(win_rate=0.1, kl_to_live=99.0), GateConfig(max_kl=1.0))
    assert len(out.reasons) == 2 and not out.passed


def test_candidate_identical_to_live_ties(tiny_model_dir):
    # Same weights and the same random stream: identical answers, every prompt a tie, zero KL.
    out = evaluate_candidate(
        tiny_model_dir, tiny_model_dir, token_parity_reward, PROMPTS, GateConfig(sampling=SAMPLING)
    )
    assert out.win_rate == 0.5
    assert out.kl_to_live == pytest.approx(0.0, abs=1e-5)
    assert out.candidate_score == out.live_score
    assert out.candidate_length == out.live_length
    assert out.passed, out.reasons
    assert len(out.samples) == 5
    assert {"prompt", "live", "candidate", "live_score", "candidate_score"} <= set(out.samples[0])
    assert out.samples[0]["prompt"] == "item 0"
    assert out.samples[0]["live"] == out.samples[0]["candidate"]

    strict = evaluate_candidate(
        tiny_model_dir,
        tiny_model_dir,
        token_parity_reward,
        PROMPTS,
        GateConfig(sampling=SAMPLING, min_win_rate=0.6),
    )
    assert not strict.passed and strict.reasons == ["win rate 0.500 < 0.6"]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    from app.inference.model_files import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("other-policy"), seed=1)


def test_different_candidate_is_measured_and_gated(tiny_model_dir, other_model_dir):
    out = evaluate_candidate(
        other_model_dir,
        tiny_model_dir,
        length_reward,
        PROMPTS,
        GateConfig(sampling=SAMPLING, min_win_rate=0.0, max_kl=1e-3),
    )
    assert out.kl_to_live > 1e-3
    assert out.reasons == [f"KL to live {out.kl_to_live:.2f} nats > 0.001"]
    # With score = length, the mean scores are the mean lengths and the win rate follows from them.
    assert out.candidate_score == pytest.approx(out.candidate_length)
    assert out.live_score == pytest.approx(out.live_length)
    assert 0.0 <= out.win_rate <= 1.0
    assert out.metrics()["kl_to_live"] == out.kl_to_live


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
        GateConfig(sampling=SAMPLING, min_win_rate=0.0, max_kl=None),
    )
    assert out.passed
    scores = [s["candidate_score"] for s in out.samples] + [s["live_score"] for s in out.samples]
    assert all(torch.isfinite(torch.tensor(scores)))
    assert len(set(scores)) > 1  # the reward model does look at the text
