"""The arena export format: Chatbot-Arena battles between policy versions, `model_a`, `model_b`, `winner`."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations

import pyarrow as pa

from app.services.exports.rows import (
    MESSAGES,
    BuildContext,
    Format,
    Row,
    RowMeta,
    assistant_turn,
    distinct_versions,
)
from app.services.exports.source import TaskBundle

WINNERS = {"a": "model_a", "b": "model_b", "tie": "tie", "bothbad": "tie (bothbad)"}


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
                "conversation_a": [*prompt, *assistant_turn(a.text)],
                "conversation_b": [*prompt, *assistant_turn(b.text)],
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
                distinct_versions(a.policy_version, b.policy_version),
                agreement,
                judges,
                (f"winner: {row['winner']}",),
            )
            yield row, meta


ARENA = Format(
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
)
