"""The pairwise export formats: one row per comparison, as TRL messages, TRL text or HH-RLHF transcripts.

- pairwise: TRL's conversational preference format (explicit prompt): `prompt`, `chosen` and `rejected`
  are message lists; DPOTrainer and RewardTrainer take it as is, and RewardTrainer uses `margin`.
- pairwise_text: TRL's standard (text) preference format: `prompt`, `chosen`, `rejected` strings.
- hh_rlhf: Anthropic HH-RLHF transcripts, "\\n\\nHuman: …\\n\\nAssistant: …", differing in the last turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from app.services.exports.rows import (
    MESSAGES,
    TIMESTAMP,
    BuildContext,
    Format,
    Row,
    RowMeta,
    assistant_turn,
    distinct_versions,
)
from app.services.exports.source import AnnotationInfo, ComparisonInfo, ResponseInfo, TaskBundle

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


# ---------------------------------------------------------------- the comparisons a row is made of


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
    versions = distinct_versions(chosen.policy_version, rejected.policy_version)
    details = ("flagged",) if annotation.flagged else ()
    return RowMeta(bundle.prompt.id, annotation.user_id, versions, agreement, judges, details)


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


# ---------------------------------------------------------------- builders


def build_pairwise(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    prompt = bundle.prompt.messages
    for comparison, annotation, chosen, rejected, agreement, judges in _pairs(bundle, ctx):
        row = {
            "prompt": prompt,
            "chosen": assistant_turn(chosen.text),
            "rejected": assistant_turn(rejected.text),
        }
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


# ---------------------------------------------------------------- formats

PAIRWISE = Format(
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
)

PAIRWISE_TEXT = Format(
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
)

HH_RLHF = Format(
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
)
