"""What an export asks for: format, file format, filters, split and licence (one flat, validated model).

The same model is the body of `POST /api/exports`, the query of `GET /api/exports/stream`, the research
form and the options of `prefloop export`, and it is stored as the export run's config, so a run can be
repeated exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.services.row_ids import PolicyVersion, RowId

FormatName = Literal["pairwise", "pairwise_text", "rankings", "hh_rlhf", "arena"]
FileFormat = Literal["parquet", "jsonl"]
Layout = Literal["folder", "zip"]
SplitMode = Literal["hash", "stored", "none"]
TextTemplate = Literal["hh", "chat_template"]


def _as_utc(value: datetime | None) -> datetime | None:
    # Timestamps are stored in UTC; a naive bound is read as UTC so SQLite and Postgres agree.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: FormatName = Field(
        "pairwise",
        description="pairwise (TRL conversational prompt/chosen/rejected), pairwise_text (TRL standard text), "
        "rankings (raw per-annotator rankings), hh_rlhf (Anthropic transcripts), arena (model_a/model_b/winner).",
    )
    file_format: FileFormat = Field("parquet", description="parquet or jsonl")
    layout: Layout = Field("zip", description="A Hugging Face dataset folder, or the same folder zipped.")

    # ---- filters
    prompt_set_ids: list[RowId] = Field(
        default_factory=list, description="Only these prompt sets (empty: all)."
    )
    since: datetime | None = Field(None, description="Annotations submitted at or after this time (UTC).")
    until: datetime | None = Field(None, description="Annotations submitted before this time (UTC).")
    policy_versions: list[PolicyVersion] = Field(
        default_factory=list,
        description="Only responses of these policy versions (empty: all); rankings keep the others out.",
    )
    min_agreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Drop rows whose annotator agreement is below this share."
    )
    min_annotators: int = Field(
        1, ge=1, le=100, description="Drop rows judged by fewer annotators (2+ keeps overlapped items only)."
    )
    exclude_flagged: bool = Field(False, description="Drop annotations that carry any flag.")
    exclude_skipped: bool = Field(True, description="Drop skipped annotations (rankings format only).")

    # ---- split (by prompt, so a prompt never appears in two splits)
    split_mode: SplitMode = Field(
        "hash",
        description="hash: test share by a seeded hash of the prompt text; stored: the prompts' own "
        "train/eval split; none: everything in train.",
    )
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts in test (hash mode).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the hash split; recorded in the card.")

    # ---- presentation
    text_template: TextTemplate = Field(
        "hh",
        description="pairwise_text prompt rendering: hh ('\\n\\nHuman: …\\n\\nAssistant:') or chat_template "
        "(the tokenizer of chat_template_version).",
    )
    chat_template_version: PolicyVersion | None = Field(
        None, description="Policy version whose tokenizer chat template renders pairwise_text prompts."
    )
    license: str = Field(
        "other",
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9.\-]*$",
        description="Hub licence id for the card (e.g. cc-by-4.0); 'other' when the data owner has not chosen.",
    )
    name: str = Field("prefloop-preferences", min_length=1, max_length=100, description="Dataset name.")
    rows_per_shard: int | None = Field(
        None, ge=1000, description="Start a new data file every N rows (default: one file per split)."
    )

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return _as_utc(value)

    @field_validator("prompt_set_ids", "policy_versions")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> ExportSpec:
        if self.since and self.until and self.since >= self.until:
            raise ValueError("since must be earlier than until")
        if self.text_template == "chat_template" and self.chat_template_version is None:
            raise ValueError("text_template=chat_template needs chat_template_version (a policy version)")
        return self

    def filter_summary(self) -> dict[str, object]:
        """The filters as recorded in the dataset card and the run result."""
        return {
            "prompt_set_ids": self.prompt_set_ids,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "policy_versions": self.policy_versions,
            "min_agreement": self.min_agreement,
            "min_annotators": self.min_annotators,
            "exclude_flagged": self.exclude_flagged,
            "exclude_skipped": self.exclude_skipped,
        }

    def split_summary(self) -> dict[str, object]:
        return {"mode": self.split_mode, "test_fraction": self.test_fraction, "seed": self.seed}
