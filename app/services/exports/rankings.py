"""The rankings export format: one row per annotation, the raw ranking with tie groups, all-bad, skip and flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from app.services.exports.rows import MESSAGES, TIMESTAMP, BuildContext, Format, Row, RowMeta
from app.services.exports.source import TaskBundle


def build_rankings(bundle: TaskBundle, ctx: BuildContext) -> Iterator[Row]:
    responses = [r for r in bundle.shown if ctx.version_ok(r.policy_version)]
    if not responses:
        return
    kept = {r.id for r in responses}
    agreement = bundle.mean_outcome_agreement([r.id for r in responses])
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
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


_RESPONSE = pa.struct(
    [
        ("response_id", pa.int64()),
        ("policy_version", pa.int64()),
        ("position", pa.int32()),
        ("text", pa.string()),
    ]
)

RANKINGS = Format(
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
)
