"""What an export format is: its documented fields and a builder that turns one task's bundle into rows.

A builder takes a TaskBundle and a BuildContext (the spec's filters and the pseudonymizer) and yields
rows (plain dicts in schema order), each with a small RowMeta the statistics and the dataset card read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from app.services.exports.pseudonym import Pseudonymizer
from app.services.exports.source import AnnotationInfo, TaskBundle
from app.services.exports.spec import ExportSpec

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)
TIMESTAMP = pa.timestamp("us", tz="UTC")


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
        # None: a single annotator, nothing to disagree with; min_annotators is the setting for that.
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


def assistant_turn(text: str) -> list[dict[str, str]]:
    """A response as the one-message assistant turn the conversational formats store."""
    return [{"role": "assistant", "content": text}]


def distinct_versions(a: int | None, b: int | None) -> tuple[int | None, ...]:
    return (a,) if a == b else (a, b)
