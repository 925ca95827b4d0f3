"""The promotion gate: a candidate policy against the live one on held-out prompts.

Both policies answer every eval prompt with the same sampling settings and the same random stream
(common random numbers: where both models agree, they sample the same answer, so the comparison is
less noisy). The reward model (or a reward function) scores both answers; the report holds the
mean scores, the candidate's win rate (ties count half), the KL of the candidate to the live policy
on the candidate's own samples (sum over response tokens of log pi_cand - log pi_live, averaged),
mean lengths and EOS shares, and a few samples side by side for the admin to read. The gate's
thresholds decide `passed`; every failed threshold is one line in `reasons`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.inference.generator import BatchedGenerator
from app.inference.sampling import SamplingConfig
from workers.training.config import TrainerConfig
from workers.training.lora import (
    compute_context,
    freeze,
    pack,
    prompt_token_ids,
    resolve_device,
    resolve_dtype,
    response_logprobs,
)
from workers.training.ppo_math import masked_sum
from workers.training.reward import score

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]


def _gate_sampling() -> SamplingConfig:
    # The loop's own sampling, so the gate sees answers like those annotators will rank; short
    # answers keep the gate cheap.
    return SamplingConfig(max_new_tokens=64)


@dataclass
class GateConfig(TrainerConfig):
    """How the candidate and the live policy are compared, and what the candidate must reach."""

    prompts: int = 32  # held-out prompts both policies answer: the first of the eval split
    sampling: SamplingConfig = field(default_factory=_gate_sampling)
    min_win_rate: float = 0.5  # the candidate must at least tie the live policy under the reward model
    min_score_delta: float | None = None  # candidate mean score minus live mean score, off by default
    max_kl: float | None = 25.0  # nats per response to the live policy: one round must not jump too far
    max_length_ratio: float | None = 2.0  # candidate mean length vs live: length hacking
    min_length_ratio: float | None = 0.5  # ... or answers collapsing towards empty
    min_eos_share: float | None = None  # share of candidate answers that end on their own
    samples: int = 5  # prompts stored side by side for the admin


@dataclass
class EvaluationReport:
    prompts: int
    candidate_score: float  # mean raw reward-model score
    live_score: float
    win_rate: float  # candidate beats live on a prompt: 1, tie: 0.5, loses: 0
    kl_to_live: float  # mean over candidate samples of sum_t (log pi_cand - log pi_live)
    candidate_length: float  # mean response tokens
    live_length: float
    candidate_eos_share: float
    live_eos_share: float
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, live, candidate (+ scores)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The scalar part, for run_metrics / the registry row."""
        return {k: float(v) for k, v in asdict(self).items() if isinstance(v, int | float) and k != "passed"}


def apply_gate(report: EvaluationReport, gate: GateConfig) -> EvaluationReport:
    """Fill `passed` and `reasons` from the thresholds (pure; tests and admins can re-gate a report)."""
    reasons = []
    if report.win_rate < gate.min_win_rate:
        reasons.append(f"win rate {report.win_rate:.3f} < {gate.min_win_rate}")
    delta = report.candidate_score - report.live_score
    if gate.min_score_delta is not None and delta < gate.min_score_delta:
        reasons.append(f"score gain {delta:.3f} < {gate.min_score_delta}")
    if gate.max_kl is not None and report.kl_to_live > gate.max_kl:
        reasons.append(f"KL to live {report.kl_to_live:.2f} nats > {gate.max_kl}")
    ratio = report.candidate_length / max(report.live_length, 1e-9)
    if gate.max_length_ratio is not None and ratio > gate.max_length_ratio:
        reasons.append(f"length ratio {ratio:.2f} > {gate.max_length_ratio}")
    if gate.min_length_ratio is not None and ratio < gate.min_length_ratio:
        reasons.append(f"length ratio {ratio:.2f} < {gate.min_length_ratio}")
    if gate.min_eos_share is not None and report.candidate_eos_share < gate.min_eos_share:
        reasons.append(f"EOS share {report.candidate_eos_share:.2f} < {gate.min_eos_share}")
    report.reasons, report.passed = reasons, not reasons
    return report


def _scorer(reward: RewardFn | str | Path, device: torch.device, dtype: torch.dtype):
    """A function (messages, prompt_texts, texts, ids) -> list of raw scores."""
    if callable(reward):
        return lambda _messages, prompt_texts, texts, ids: [
            float(x) for x in reward(prompt_texts, texts, ids)
        ]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(reward)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = freeze(model.to(device))
    return lambda messages, _prompt_texts, texts, _ids: (
        score(model, tokenizer, messages, texts).float().tolist()
    )


def _user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else json.dumps(messages, ensure_ascii=False)


@torch.no_grad()
def evaluate_candidate(
    candidate_path: str | Path,
    live_path: str | Path,
    reward: RewardFn | str | Path,
    eval_prompts: list[list[dict]],
    gate: GateConfig,
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    device: str = "auto",
    dtype: str = "auto",
) -> EvaluationReport:
    """Sample both policies on the first `gate.prompts` of `eval_prompts`, score, compare and gate.
    `reward` is a reward-model folder or `reward_fn(prompt_texts, response_texts, response_ids)` as in PPO."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eval_prompts = eval_prompts[: gate.prompts]
    if not eval_prompts:
        raise ValueError("evaluation needs at least one prompt")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(str(candidate_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    candidate = freeze(AutoModelForCausalLM.from_pretrained(str(candidate_path), dtype=dt).to(dev))
    live = freeze(AutoModelForCausalLM.from_pretrained(str(live_path), dtype=dt).to(dev))
    score_responses = _scorer(reward, dev, dt)

    prompt_ids = [prompt_token_ids(tokenizer, m, max_prompt_tokens) for m in eval_prompts]
    prompt_texts = [tokenizer.decode(p) for p in prompt_ids]
    results = {"candidate": ([], [], []), "live": ([], [], [])}  # ids, ended, scores
    kls: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = slice(start, start + batch_size)
        for name, model in (("candidate", candidate), ("live", live)):
            out = BatchedGenerator(model, tokenizer, dev).generate_ids(
                prompt_ids[chunk], gate.sampling, seed=seed + start
            )
            ids, ended, scores = results[name]
            ids += out.response_ids
            ended += out.ended_with_eos
            scores += score_responses(eval_prompts[chunk], prompt_texts[chunk], out.texts, out.response_ids)
            if name == "candidate":
                batch = pack(prompt_ids[chunk], out.response_ids, tokenizer.pad_token_id).to(dev)
                with compute_context(dev, dt):
                    kl = response_logprobs(candidate, batch)[0] - response_logprobs(live, batch)[0]
                kls += masked_sum(kl, batch.response_mask, dim=1).tolist()

    cand_ids, cand_ended, cand_scores = results["candidate"]
    live_ids, live_ended, live_scores = results["live"]
    wins = [1.0 if c > v else 0.5 if c == v else 0.0 for c, v in zip(cand_scores, live_scores, strict=True)]
    n = len(eval_prompts)
    samples = [
        {
            "prompt": _user_text(eval_prompts[i]),
            "live": tokenizer.decode(live_ids[i], skip_special_tokens=True),
            "candidate": tokenizer.decode(cand_ids[i], skip_special_tokens=True),
            "live_score": live_scores[i],
            "candidate_score": cand_scores[i],
        }
        for i in range(min(gate.samples, n))
    ]
    report = EvaluationReport(
        prompts=n,
        candidate_score=sum(cand_scores) / n,
        live_score=sum(live_scores) / n,
        win_rate=sum(wins) / n,
        kl_to_live=sum(kls) / n,
        candidate_length=sum(len(r) for r in cand_ids) / n,
        live_length=sum(len(r) for r in live_ids) / n,
        candidate_eos_share=sum(cand_ended) / n,
        live_eos_share=sum(live_ended) / n,
        samples=samples,
    )
    return apply_gate(report, gate)
