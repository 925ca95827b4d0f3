"""The promotion gate: a candidate policy against the live one on held-out prompts, by a held-out judge.

The judge is a reward model the candidate was not optimised against (the round trains it on the
comparisons of a disjoint share of prompts, see workers/runs/judge.py): judging a candidate with the
reward model it was trained on would pass a reward-hacked policy by construction.

Both policies answer every eval prompt `samples_per_prompt` times, at the length the policy was
trained at, with the sampling annotators see and the same random stream (common random numbers:
where the two models agree they sample the same answer, so the comparison is less noisy). Sample i
of the candidate is compared with sample i of the live policy; the prompt is the unit of the
interval (app/common/win_rate.py). The candidate passes only when the lower confidence bound of its
win rate is above `min_win_rate` (0.5: better than the live policy beyond chance) and its drift and
answers look sane: KL to the live and to the base policy, length ratio, and the share of answers
that end with EOS (a truncated answer is re-rendered by the chat template as a finished turn, so
the judge cannot see truncation; the gate does). Every check is recorded with its figure and
threshold; every failed check is one line in `reasons`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.common.win_rate import INTERVALS, outcome
from app.common.win_rate import win_rate as win_rate_interval
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
from workers.training.reward import score

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]

GATE_MODES = ("judge", "human")


@dataclass
class GateConfig(TrainerConfig):
    """How the candidate and the live policy are compared, and what the candidate must reach."""

    # judge: the held-out judge's verdict promotes. human: the checks below must pass, then blind
    # arena tasks (candidate vs live) go to annotators, and their Bradley-Terry lower bound decides.
    mode: str = "judge"
    # Share of the round's prompts whose comparisons train the judge and not the policy's reward
    # model (DPO: not the policy either). Disjoint data makes the judge's errors independent of
    # the ones the policy could exploit.
    judge_share: float = 0.5
    prompts: int | None = None  # held-out prompts both policies answer; None = every eval prompt
    samples_per_prompt: int = 4  # k answers per prompt and policy
    # The task pool's sampling (what annotators see); the length is replaced by the training length
    # when `at_training_length` is on, so length and EOS checks see what the policy learnt.
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    at_training_length: bool = True
    confidence: float = 0.95
    interval: str = "wilson"  # or "bootstrap" (cluster bootstrap over prompts)
    min_win_rate: float | None = 0.5  # the lower bound of the win rate must be above this
    min_score_delta: float | None = None  # candidate mean judge score minus live mean score
    max_kl: float | None = 25.0  # nats per answer to the live policy: one round must not jump too far
    max_kl_to_base: float | None = 40.0  # nats per answer to the base policy: drift over all rounds
    max_length_ratio: float | None = 2.0  # candidate mean length vs live: length hacking
    min_length_ratio: float | None = 0.5  # ... or answers collapsing towards empty
    min_eos_share: float | None = None  # share of candidate answers that end on their own
    max_eos_share_drop: float | None = 0.1  # live EOS share minus the candidate's: truncation creeping in
    samples: int = 5  # prompts stored side by side for the admin
    # Human mode: arena tasks on this many held-out prompts; a verdict needs at least
    # `arena_min_votes` votes; with `arena_max_votes` and still no verdict, the candidate fails.
    arena_prompts: int = 48
    arena_min_votes: int = 20
    arena_max_votes: int = 200

    def __post_init__(self) -> None:
        if self.mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {', '.join(GATE_MODES)}, not {self.mode!r}")
        if self.interval not in INTERVALS:
            raise ValueError(f"gate interval must be one of {', '.join(INTERVALS)}, not {self.interval!r}")


@dataclass
class Check:
    """One rule of the gate: its figure, its threshold and whether the candidate met it."""

    name: str
    value: float
    threshold: float
    passed: bool
    reason: str  # what failed, in words (empty when passed)


@dataclass
class EvaluationReport:
    prompts: int
    samples_per_prompt: int
    max_new_tokens: int
    candidate_score: float  # mean raw judge score
    live_score: float
    win_rate: float  # candidate beats live on a sample: 1, tie: 0.5, loses: 0; mean over prompts
    win_rate_low: float
    win_rate_high: float
    confidence: float
    interval: str
    kl_to_live: float  # mean over candidate answers of the summed per-token KL(cand || live)
    kl_to_base: float | None  # the same to the base policy; None when no base was given
    candidate_length: float  # mean response tokens
    live_length: float
    candidate_eos_share: float
    live_eos_share: float
    judge: str = ""  # which judge scored, in words
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, live, candidate (+ scores)
    checks: list[dict[str, Any]] = field(default_factory=list)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The scalar part, for run_metrics / the registry row."""
        return {
            k: float(v)
            for k, v in asdict(self).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
        }


def gate_checks(report: EvaluationReport, gate: GateConfig, win_rate_decides: bool = True) -> list[Check]:
    """Every rule the gate applies to `report`, passed or not (pure). `win_rate_decides=False`
    leaves the win-rate rule out: in human mode the arena votes decide whether it is better."""
    checks: list[Check] = []

    def add(name: str, value: float, threshold: float, ok: bool, reason: str) -> None:
        checks.append(Check(name, float(value), float(threshold), bool(ok), "" if ok else reason))

    low, conf = report.win_rate_low, report.confidence
    if gate.min_win_rate is not None and win_rate_decides:
        add(
            "win_rate_lower_bound",
            low,
            gate.min_win_rate,
            low > gate.min_win_rate,
            f"win rate {report.win_rate:.3f}, its {conf:.0%} lower bound {low:.3f} is not above "
            f"{gate.min_win_rate} ({report.prompts} prompts × {report.samples_per_prompt})",
        )
    delta = report.candidate_score - report.live_score
    if gate.min_score_delta is not None:
        add(
            "score_delta",
            delta,
            gate.min_score_delta,
            delta >= gate.min_score_delta,
            f"score gain {delta:.3f} < {gate.min_score_delta}",
        )
    if gate.max_kl is not None:
        add(
            "kl_to_live",
            report.kl_to_live,
            gate.max_kl,
            report.kl_to_live <= gate.max_kl,
            f"KL to live {report.kl_to_live:.2f} nats > {gate.max_kl}",
        )
    if gate.max_kl_to_base is not None and report.kl_to_base is not None:
        add(
            "kl_to_base",
            report.kl_to_base,
            gate.max_kl_to_base,
            report.kl_to_base <= gate.max_kl_to_base,
            f"KL to base {report.kl_to_base:.2f} nats > {gate.max_kl_to_base}",
        )
    ratio = report.candidate_length / max(report.live_length, 1e-9)
    if gate.max_length_ratio is not None:
        add(
            "length_ratio_max",
            ratio,
            gate.max_length_ratio,
            ratio <= gate.max_length_ratio,
            f"length ratio {ratio:.2f} > {gate.max_length_ratio}",
        )
    if gate.min_length_ratio is not None:
        add(
            "length_ratio_min",
            ratio,
            gate.min_length_ratio,
            ratio >= gate.min_length_ratio,
            f"length ratio {ratio:.2f} < {gate.min_length_ratio}",
        )
    if gate.min_eos_share is not None:
        add(
            "eos_share",
            report.candidate_eos_share,
            gate.min_eos_share,
            report.candidate_eos_share >= gate.min_eos_share,
            f"EOS share {report.candidate_eos_share:.2f} < {gate.min_eos_share}",
        )
    drop = report.live_eos_share - report.candidate_eos_share
    if gate.max_eos_share_drop is not None:
        add(
            "eos_share_drop",
            drop,
            gate.max_eos_share_drop,
            drop <= gate.max_eos_share_drop + 1e-12,
            f"EOS share fell {drop:.2f} (live {report.live_eos_share:.2f} → candidate "
            f"{report.candidate_eos_share:.2f}) > {gate.max_eos_share_drop}",
        )
    return checks


def apply_gate(report: EvaluationReport, gate: GateConfig) -> EvaluationReport:
    """Fill `checks`, `passed` and `reasons` (pure; tests and admins can re-gate a report)."""
    checks = gate_checks(report, gate, win_rate_decides=gate.mode == "judge")
    report.checks = [asdict(c) for c in checks]
    report.reasons = [c.reason for c in checks if not c.passed]
    report.passed = not report.reasons
    return report


def _scorer(judge: RewardFn | str | Path, device: torch.device, dtype: torch.dtype):
    """A function (messages, prompt_texts, texts, ids) -> list of raw scores."""
    if callable(judge):
        return lambda _messages, prompt_texts, texts, ids: [float(x) for x in judge(prompt_texts, texts, ids)]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(judge)
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


def _token_kl(policy, other, batch, rows: int = 4) -> list[float]:
    """Per answer, the sum over its tokens of KL(policy || other) between the full next-token
    distributions: exact at each position, never negative, whatever distribution drew the answer."""
    out: list[float] = []
    for start in range(0, batch.input_ids.shape[0], rows):
        part = batch.select(list(range(start, min(start + rows, batch.input_ids.shape[0]))))
        logp = torch.log_softmax(response_logprobs(policy, part)[1].float(), -1)
        logq = torch.log_softmax(response_logprobs(other, part)[1].float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # float error only below 0
        out += (kl * part.response_mask.to(kl.dtype)).sum(1).tolist()
    return out


def _load_policy(path: str | Path, dev: torch.device, dt: torch.dtype):
    from transformers import AutoModelForCausalLM

    return freeze(AutoModelForCausalLM.from_pretrained(str(path), dtype=dt).to(dev))


@torch.no_grad()
def evaluate_candidate(
    candidate_path: str | Path,
    live_path: str | Path,
    judge: RewardFn | str | Path,
    eval_prompts: list[list[dict]],
    gate: GateConfig,
    base_path: str | Path | None = None,
    judge_name: str = "",
    seed: int = 0,
    batch_size: int = 16,
    max_prompt_tokens: int = 512,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int, str], None] | None = None,
) -> EvaluationReport:
    """Sample both policies k times on the eval prompts (the first `gate.prompts`, or all), judge,
    compare and gate. `judge` is a reward-model folder or `judge(prompt_texts, texts, ids)`; with
    `base_path` the candidate's KL to the base policy is measured too. `gate.sampling` is used as
    given: the caller sets its length to the training length."""
    from transformers import AutoTokenizer

    if gate.prompts is not None:
        eval_prompts = eval_prompts[: gate.prompts]
    if not eval_prompts:
        raise ValueError("evaluation needs at least one prompt")
    k = max(1, gate.samples_per_prompt)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(str(candidate_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    candidate = _load_policy(candidate_path, dev, dt)
    live = _load_policy(live_path, dev, dt)
    # In a first round the live policy is the base: its KL is the one already measured.
    base_is_live = base_path is not None and Path(base_path).resolve() == Path(live_path).resolve()
    base = _load_policy(base_path, dev, dt) if base_path is not None and not base_is_live else None
    score_responses = _scorer(judge, dev, dt)

    # Prompt i's samples are rows i*k .. i*k+k-1 of every list below.
    conversations = [m for m in eval_prompts for _ in range(k)]
    prompt_ids = [prompt_token_ids(tokenizer, m, max_prompt_tokens) for m in conversations]
    prompt_texts = [tokenizer.decode(p) for p in prompt_ids]
    results: dict[str, tuple[list, list, list, list]] = {
        "candidate": ([], [], [], []),
        "live": ([], [], [], []),
    }
    kls_live: list[float] = []
    kls_base: list[float] = []
    total = len(prompt_ids)
    for start in range(0, total, batch_size):
        chunk = slice(start, start + batch_size)
        for name, model in (("candidate", candidate), ("live", live)):
            out = BatchedGenerator(model, tokenizer, dev).generate_ids(
                prompt_ids[chunk], gate.sampling, seed=seed + start
            )
            ids, ended, scores, texts = results[name]
            ids += out.response_ids
            ended += out.ended_with_eos
            texts += out.texts
            scores += score_responses(conversations[chunk], prompt_texts[chunk], out.texts, out.response_ids)
            if name == "candidate":
                batch = pack(prompt_ids[chunk], out.response_ids, tokenizer.pad_token_id).to(dev)
                with compute_context(dev, dt):
                    kls_live += _token_kl(candidate, live, batch)
                    if base is not None:
                        kls_base += _token_kl(candidate, base, batch)
                    elif base_is_live:
                        kls_base = kls_live
        if progress is not None:
            progress(min(start + batch_size, total), total, "sampling and judging both policies")

    cand_ids, cand_ended, cand_scores, cand_texts = results["candidate"]
    live_ids, live_ended, live_scores, live_texts = results["live"]
    n = len(eval_prompts)
    outcomes = [[outcome(cand_scores[i * k + j], live_scores[i * k + j]) for j in range(k)] for i in range(n)]
    rate = win_rate_interval(outcomes, gate.confidence, gate.interval, seed=seed)
    samples = [
        {
            "prompt": _user_text(eval_prompts[i]),
            "live": live_texts[i * k].strip(),
            "candidate": cand_texts[i * k].strip(),
            "live_score": live_scores[i * k],
            "candidate_score": cand_scores[i * k],
        }
        for i in range(min(gate.samples, n))
    ]
    m = len(cand_ids)
    report = EvaluationReport(
        prompts=n,
        samples_per_prompt=k,
        max_new_tokens=gate.sampling.max_new_tokens,
        candidate_score=sum(cand_scores) / m,
        live_score=sum(live_scores) / m,
        win_rate=rate.value,
        win_rate_low=rate.low,
        win_rate_high=rate.high,
        confidence=rate.confidence,
        interval=rate.method,
        kl_to_live=sum(kls_live) / m,
        kl_to_base=sum(kls_base) / m if base_path is not None else None,
        candidate_length=sum(len(r) for r in cand_ids) / m,
        live_length=sum(len(r) for r in live_ids) / m,
        candidate_eos_share=sum(cand_ended) / m,
        live_eos_share=sum(live_ended) / m,
        judge=judge_name,
        samples=samples,
    )
    return apply_gate(report, gate)
