"""Row builders, one per export format, each with its schema and field documentation.

A builder turns one TaskBundle into rows (plain dicts in schema order) plus a small RowMeta the
statistics read. Formats:

- pairwise: TRL's conversational preference format (explicit prompt): `prompt`, `chosen` and `rejected`
  are message lists; DPOTrainer and RewardTrainer take it as is, and RewardTrainer uses `margin`.
- pairwise_text: TRL's standard (text) preference format: `prompt`, `chosen`, `rejected` strings.
- rankings: one row per annotation, the raw ranking with tie groups, all-bad, skip and flags.
- hh_rlhf: Anthropic HH-RLHF transcripts, "\\n\\nHuman: …\\n\\nAssistant: …", differing in the last turn.
- arena: Chatbot-Arena battles between policy versions: `model_a`, `model_b`, `winner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import pyarrow as pa

from app.exports.pseudonym import Pseudonymizer
from app.exports.source import AnnotationInfo, ComparisonInfo, ResponseInfo, TaskBundle
from app.exports.spec import ExportSpec

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
TIMESTAMP = pa.timestamp("us", tz="UTC")
WINNERS = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}


@dataclass(frozen=True, slots=True)
class RowMeta:
    """What the dataset card counts, independent of each format's column names."""

    prompt_id: int
    user_id: int
    versions: tuple[int | None, ...]  # distinct policy versions in the row
    agreement: float | None
    judges: int
    details: tuple[str, ...] = ()  # extra counters for the card (winner, all_bad, skipped, flagged)


@dataclass
class BuildContext:
    spec: ExportSpec
    pseudonym: Pseudonymizer
    # Renders a prompt's messages as the text prompt of pairwise_text (set by the exporter).
    text_prompt: Callable[[list[dict[str, str]]], tuple[str, str]] | None = None

    def version_ok(self, version: int | None) -> bool:
        return not self.spec.policy_versions or version in self.spec.policy_versions

    def annotation_ok(self, annotation: AnnotationInfo, *, allow_skipped: bool = False) -> bool:
        spec = self.spec
        if annotation.skipped and not allow_skipped:
            return False
        if spec.since is not None and annotation.created_at < spec.since:
            return False
        if spec.until is not None and annotation.created_at >= spec.until:
            return False
        return not (spec.exclude_flagged and annotation.flagged)

    def agreement_ok(self, agreement: float | None, judges: int) -> bool:
        if judges < self.spec.min_annotators:
            return False
        # None: a single annotator, nothing to disagree with; min_annotators is the knob for that.
        return self.spec.min_agreement is None or agreement is None or agreement >= self.spec.min_agreement


Row = tuple[dict[str, Any], RowMeta]


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    description: str
    fields: tuple[tuple[str, pa.DataType, str], ...]
    build: Callable[[TaskBundle, BuildContext], Iterator[Row]]
    needs_comparisons: bool
    usage: str

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(name, dtype) for name, dtype, _ in self.fields])

    @property
    def columns(self) -> list[str]:
        return [name for name, _, _ in self.fields]


# ---------------------------------------------------------------- text rendering


def hh_transcript(messages: list[dict[str, str]]) -> str:
    """A conversation as HH-RLHF text. HH has no system turn: system text opens the next Human turn."""
    parts: list[str] = []
    pending_system: list[str] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending_system.append(content)
        elif role == "assistant":
            parts.append("\n\nAssistant: " + content)
        else:
            parts.append("\n\nHuman: " + "\n\n".join([*pending_system, content]))
            pending_system = []
    if pending_system:
        parts.append("\n\nHuman: " + "\n\n".join(pending_system))
    return "".join(parts)


def hh_text_prompt(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(prompt, completion prefix) in the HH layout: prompt + prefix + response is the HH transcript."""
    return hh_transcript(messages) + "\n\nAssistant:", " "


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- pairwise family


def _pairs(
    bundle: TaskBundle, ctx: BuildContext
) -> Iterator[tuple[ComparisonInfo, AnnotationInfo, ResponseInfo, ResponseInfo, float, int]]:
    for comparison in bundle.comparisons:
        annotation = bundle.annotation(comparison.annotation_id)
        if annotation is None or not ctx.annotation_ok(annotation):
            continue
        chosen, rejected = bundle.response(comparison.chosen), bundle.response(comparison.rejected)
        if chosen is None or rejected is None:
            continue
        if not (ctx.version_ok(chosen.policy_version) and ctx.version_ok(rejected.policy_version)):
            continue
        agreement, judges = bundle.pair_agreement(annotation.id, chosen.id, rejected.id, "a")
        if not ctx.agreement_ok(agreement, judges):
            continue
        yield comparison, annotation, chosen, rejected, agreement, judges


def _pair_meta(
    bundle: TaskBundle,
    annotation: AnnotationInfo,
    chosen: ResponseInfo,
    rejected: ResponseInfo,
    agreement: float,
    judges: int,
) -> RowMeta:
    versions = _distinct(chosen.policy_version, rejected.policy_version)
    details = ("flagged",) if annotation.flagged else ()
    return RowMeta(bundle.prompt.id, annotation.user_id, versions, agreement, judges, details)


def _distinct(a: int | None, b: int | None) -> tuple[int | None, ...]:
    return (a,) if a == b else (a, b)


_PAIR_TAIL: tuple[tuple[str, pa.DataType, str], ...] = (
    (
        "margin",
        pa.float64(),
        "Preference margin of the comparison (RewardTrainer subtracts it inside the loss).",
    ),
    (
        "score_chosen",
        pa.float64(),
        "Consensus score of the chosen response in [0, 1]: its mean normalised Borda "
        "score over the task's rankings (share of other responses it beat, ties half); null if never ranked.",
    ),
    ("score_rejected", pa.float64(), "The same consensus score for the rejected response."),
    (
        "agreement",
        pa.float64(),
        "Share of the task's annotators who judged this pair and preferred the same "
        "response (1.0 when only one did).",
    ),
    ("num_annotators", pa.int32(), "How many annotators judged this pair."),
    ("annotator", pa.string(), "Pseudonymous annotator id (keyed hash; stable within this deployment)."),
    ("prompt_id", pa.int64(), "Prompt id in this deployment; rows of one prompt share a split."),
    ("prompt_set", pa.string(), "Name of the prompt set."),
    ("task_id", pa.int64(), "Ranking task the comparison comes from."),
    ("annotation_id", pa.int64(), "Annotation the comparison was derived from (see the rankings format)."),
    ("comparison_id", pa.int64(), "Comparison id."),
    ("chosen_response_id", pa.int64(), "Response id of the chosen response."),
    ("rejected_response_id", pa.int64(), "Response id of the rejected response."),
    ("chosen_policy_version", pa.int64(), "Policy version that generated the chosen response."),
    ("rejected_policy_version", pa.int64(), "Policy version that generated the rejected response."),
    ("created_at", TIMESTAMP, "When the annotation was submitted (UTC)."),
)


def _pair_tail(
    bundle: TaskBundle,
    ctx: BuildContext,
    comparison: ComparisonInfo,
    annotation: AnnotationInfo,
    chosen: ResponseInfo,
    rejected: ResponseInfo,
    agreement: float,
    judges: int,
) -> dict[str, Any]:
    return {
        "margin": comparison.margin,
        "score_chosen": bundle.scores.get(chosen.id),
        "score_rejected": bundle.scores.get(rejected.id),
        "agreement": agreement,
        "num_annotators": judges,
        "annotator": ctx.pseudonym(annotation.user_id),
        "prompt_id": bundle.prompt.id,
        "prompt_set": bundle.prompt.prompt_set,
        "task_id": bundle.task_id,
        "annotation_id": annotation.id,
        "comparison_id": comparison.id,
        "chosen_response_id": chosen.id,
        "rejected_response_id": rejected.id,
        "chosen_policy_version": chosen.policy_version,
        "rejected_policy_version": rejected.policy_version,
        "created_at": annotation.created_at,
    }


def build_pairwise(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    prompt = bundle.prompt.messages
    for comparison, annotation, chosen, rejected, agreement, judges in _pairs(bundle, ctx):
        row = {"prompt": prompt, "chosen": _assistant(chosen.text), "rejected": _assistant(rejected.text)}
        row |= _pair_tail(bundle, ctx, comparison, annotation, chosen, rejected, agreement, judges)
        yield row, _pair_meta(bundle, annotation, chosen, rejected, agreement, judges)


def build_pairwise_text(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    render = ctx.text_prompt or hh_text_prompt
    prompt, lead = render(bundle.prompt.messages)
    for comparison, annotation, chosen, rejected, agreement, judges in _pairs(bundle, ctx):
        row = {"prompt": prompt, "chosen": lead + chosen.text, "rejected": lead + rejected.text}
        row |= _pair_tail(bundle, ctx, comparison, annotation, chosen, rejected, agreement, judges)
        yield row, _pair_meta(bundle, annotation, chosen, rejected, agreement, judges)


def build_hh(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    prefix = hh_transcript(bundle.prompt.messages) + "\n\nAssistant: "
    for comparison, annotation, chosen, rejected, agreement, judges in _pairs(bundle, ctx):
        row = {
            "chosen": prefix + chosen.text,
            "rejected": prefix + rejected.text,
            "margin": comparison.margin,
            "agreement": agreement,
            "num_annotators": judges,
            "annotator": ctx.pseudonym(annotation.user_id),
            "prompt_id": bundle.prompt.id,
            "comparison_id": comparison.id,
            "chosen_policy_version": chosen.policy_version,
            "rejected_policy_version": rejected.policy_version,
        }
        yield row, _pair_meta(bundle, annotation, chosen, rejected, agreement, judges)


# ---------------------------------------------------------------- rankings


def build_rankings(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    responses = [r for r in bundle.shown if ctx.version_ok(r.policy_version)]
    if not responses:
        return
    kept = {r.id for r in responses}
    agreement = bundle.task_agreement([r.id for r in responses])
    judges = len(bundle.judgements)
    if not ctx.agreement_ok(agreement, judges):
        return
    response_rows = [
        {"response_id": r.id, "policy_version": r.policy_version, "position": r.position, "text": r.text}
        for r in responses
    ]
    versions = tuple(sorted({r.policy_version for r in responses}, key=lambda v: (v is None, v or 0)))
    for annotation in bundle.annotations:
        if not ctx.annotation_ok(annotation, allow_skipped=not ctx.spec.exclude_skipped):
            continue
        ranking = [[rid for rid in group if rid in kept] for group in annotation.ranking]
        row = {
            "prompt": bundle.prompt.messages,
            "responses": response_rows,
            "ranking": [group for group in ranking if group],
            "all_bad": annotation.all_bad,
            "skipped": annotation.skipped,
            "skip_reason": annotation.skip_reason,
            "flags": annotation.flag_names,
            "flag_details": _json(annotation.flags),
            "rationale": annotation.rationale,
            "time_spent_ms": annotation.time_spent_ms,
            "shown_order_unchanged": annotation.shown_order_unchanged,
            "agreement": agreement,
            "num_annotators": judges,
            "annotator": ctx.pseudonym(annotation.user_id),
            "task_id": bundle.task_id,
            "task_kind": bundle.kind,
            "annotation_id": annotation.id,
            "prompt_id": bundle.prompt.id,
            "prompt_set": bundle.prompt.prompt_set,
            "created_at": annotation.created_at,
        }
        details = tuple(
            name
            for name, on in (
                ("all_bad", annotation.all_bad),
                ("skipped", annotation.skipped),
                ("flagged", annotation.flagged),
            )
            if on
        )
        yield row, RowMeta(bundle.prompt.id, annotation.user_id, versions, agreement, judges, details)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ---------------------------------------------------------------- arena


def build_arena(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    prompt = bundle.prompt.messages
    turns = sum(1 for m in prompt if m["role"] == "user") or 1
    pairs = [
        (a, b)
        for a, b in combinations(bundle.shown, 2)
        if a.policy_version is not None
        and b.policy_version is not None
        and a.policy_version != b.policy_version
        and ctx.version_ok(a.policy_version)
        and ctx.version_ok(b.policy_version)
    ]
    if not pairs:
        return
    for annotation in bundle.annotations:
        judgement = bundle.judgement(annotation.id)
        if judgement is None or not ctx.annotation_ok(annotation):
            continue
        for a, b in pairs:
            outcome = judgement.outcome(a.id, b.id)
            if outcome is None:
                continue
            agreement, judges = bundle.pair_agreement(annotation.id, a.id, b.id, outcome)
            if not ctx.agreement_ok(agreement, judges):
                continue
            row = {
                "question_id": bundle.prompt.id,
                "model_a": f"policy-v{a.policy_version}",
                "model_b": f"policy-v{b.policy_version}",
                "winner": WINNERS[outcome],
                "judge": ctx.pseudonym(annotation.user_id),
                "conversation_a": [*prompt, *_assistant(a.text)],
                "conversation_b": [*prompt, *_assistant(b.text)],
                "turn": turns,
                "anony": True,
                "tstamp": annotation.created_at.timestamp(),
                "policy_version_a": a.policy_version,
                "policy_version_b": b.policy_version,
                "response_id_a": a.id,
                "response_id_b": b.id,
                "agreement": agreement,
                "num_annotators": judges,
                "task_id": bundle.task_id,
                "task_kind": bundle.kind,
                "annotation_id": annotation.id,
                "prompt_set": bundle.prompt.prompt_set,
            }
            meta = RowMeta(
                bundle.prompt.id,
                annotation.user_id,
                _distinct(a.policy_version, b.policy_version),
                agreement,
                judges,
                (f"winner: {row['winner']}",),
            )
            yield row, meta


# ---------------------------------------------------------------- registry of formats

_RESPONSE = pa.struct(
    [
        ("response_id", pa.int64()),
        ("policy_version", pa.int64()),
        ("position", pa.int32()),
        ("text", pa.string()),
    ]
)

FORMATS: dict[str, Format] = {
    "pairwise": Format(
        name="pairwise",
        title="Pairwise preferences, TRL conversational",
        description="One row per comparison (a pair one annotator ordered; ties give none). `prompt`, `chosen` "
        "and `rejected` are message lists, TRL's conversational preference format with an explicit prompt.",
        fields=(
            ("prompt", MESSAGES, "The conversation before the response: [{role, content}, …]."),
            ("chosen", MESSAGES, "The preferred response as [{role: 'assistant', content}]."),
            ("rejected", MESSAGES, "The other response as [{role: 'assistant', content}]."),
            *_PAIR_TAIL,
        ),
        build=build_pairwise,
        needs_comparisons=True,
        usage="trl.DPOTrainer(model, args=DPOConfig(...), train_dataset=ds['train'], processing_class=tokenizer)\n"
        "trl.RewardTrainer(model, args=RewardConfig(...), train_dataset=ds['train'], processing_class=tokenizer)",
    ),
    "pairwise_text": Format(
        name="pairwise_text",
        title="Pairwise preferences, TRL standard text",
        description="One row per comparison as plain strings, TRL's standard preference format with an explicit "
        "prompt. `prompt + chosen` is the full text the model is trained on.",
        fields=(
            ("prompt", pa.string(), "The rendered prompt, ending where the response starts."),
            ("chosen", pa.string(), "The preferred response text."),
            ("rejected", pa.string(), "The other response text."),
            *_PAIR_TAIL,
        ),
        build=build_pairwise_text,
        needs_comparisons=True,
        usage="trl.DPOTrainer(model, args=DPOConfig(...), train_dataset=ds['train'], processing_class=tokenizer)",
    ),
    "rankings": Format(
        name="rankings",
        title="Raw per-annotator rankings",
        description="One row per annotation, unaggregated: the responses as shown, the ranking best→worst as tie "
        "groups of response ids, all-bad, skip and flags.",
        fields=(
            ("prompt", MESSAGES, "The conversation before the responses."),
            ("responses", pa.list_(_RESPONSE), "The task's responses in the order shown to the annotator."),
            ("ranking", pa.list_(pa.list_(pa.int64())), "Tie groups of response ids, best group first."),
            ("all_bad", pa.bool_(), "The annotator marked every response as bad."),
            ("skipped", pa.bool_(), "The annotator skipped the task (no ranking)."),
            ("skip_reason", pa.string(), "Why the task was skipped."),
            ("flags", pa.list_(pa.string()), "Names of the flags the annotator raised."),
            ("flag_details", pa.string(), "The flags exactly as submitted, as JSON."),
            ("rationale", pa.string(), "The annotator's optional free-text rationale."),
            ("time_spent_ms", pa.int64(), "Time spent on the task in milliseconds."),
            ("shown_order_unchanged", pa.bool_(), "The submitted order was the shown order."),
            (
                "agreement",
                pa.float64(),
                "Task-level pairwise percent agreement of its annotators (null below 2).",
            ),
            ("num_annotators", pa.int32(), "Non-skipped annotations of the task."),
            (
                "annotator",
                pa.string(),
                "Pseudonymous annotator id (keyed hash; stable within this deployment).",
            ),
            ("task_id", pa.int64(), "Task id."),
            ("task_kind", pa.string(), "rank or arena."),
            ("annotation_id", pa.int64(), "Annotation id."),
            ("prompt_id", pa.int64(), "Prompt id."),
            ("prompt_set", pa.string(), "Name of the prompt set."),
            ("created_at", TIMESTAMP, "When the annotation was submitted (UTC)."),
        ),
        build=build_rankings,
        needs_comparisons=False,
        usage="ds['train'][0]['ranking']  # [[best ids…], [next…], …]",
    ),
    "hh_rlhf": Format(
        name="hh_rlhf",
        title="Anthropic HH-RLHF transcripts",
        description="One row per comparison as two full transcripts in the HH-RLHF layout "
        "('\\n\\nHuman: …\\n\\nAssistant: …') that share the conversation and differ in the last Assistant turn.",
        fields=(
            ("chosen", pa.string(), "Transcript ending with the preferred response."),
            ("rejected", pa.string(), "Transcript ending with the other response."),
            ("margin", pa.float64(), "Preference margin of the comparison."),
            ("agreement", pa.float64(), "Share of annotators who judged this pair and agreed."),
            ("num_annotators", pa.int32(), "How many annotators judged this pair."),
            ("annotator", pa.string(), "Pseudonymous annotator id."),
            ("prompt_id", pa.int64(), "Prompt id; rows of one prompt share a split."),
            ("comparison_id", pa.int64(), "Comparison id."),
            ("chosen_policy_version", pa.int64(), "Policy version of the chosen response."),
            ("rejected_policy_version", pa.int64(), "Policy version of the rejected response."),
        ),
        build=build_hh,
        needs_comparisons=True,
        usage="ds['train'][0]['chosen']  # '\\n\\nHuman: …\\n\\nAssistant: …'",
    ),
    "arena": Format(
        name="arena",
        title="Arena battles between policy versions",
        description="One row per annotation and pair of responses from two different policy versions, in the "
        "layout of lmsys/chatbot_arena_conversations. Sides follow the shown order, which is shuffled per task.",
        fields=(
            ("question_id", pa.int64(), "Prompt id."),
            ("model_a", pa.string(), "Policy version on side A, as 'policy-vN'."),
            ("model_b", pa.string(), "Policy version on side B."),
            (
                "winner",
                pa.string(),
                "model_a, model_b, tie, or 'tie (bothbad)' when the annotator marked all bad.",
            ),
            ("judge", pa.string(), "Pseudonymous annotator id."),
            ("conversation_a", MESSAGES, "Prompt plus side A's response."),
            ("conversation_b", MESSAGES, "Prompt plus side B's response."),
            ("turn", pa.int32(), "User turns in the conversation."),
            ("anony", pa.bool_(), "Versions were hidden from the annotator (always true)."),
            ("tstamp", pa.float64(), "Submission time, Unix seconds."),
            ("policy_version_a", pa.int64(), "Policy version on side A."),
            ("policy_version_b", pa.int64(), "Policy version on side B."),
            ("response_id_a", pa.int64(), "Response id on side A."),
            ("response_id_b", pa.int64(), "Response id on side B."),
            (
                "agreement",
                pa.float64(),
                "Share of annotators who judged this pair and gave the same outcome.",
            ),
            ("num_annotators", pa.int32(), "How many annotators judged this pair."),
            ("task_id", pa.int64(), "Task id."),
            ("task_kind", pa.string(), "arena, or rank when a ranking task mixed versions."),
            ("annotation_id", pa.int64(), "Annotation id."),
            ("prompt_set", pa.string(), "Name of the prompt set."),
        ),
        build=build_arena,
        needs_comparisons=False,
        usage="ds['train'].to_pandas().groupby(['model_a', 'model_b', 'winner']).size()",
    ),
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}") from None
