"""Running statistics of an export for its dataset card, in memory that does not grow with the rows."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from app.services.exports.rows import RowMeta


class IdBitmap:
    """A set of small non-negative ids as one bit each (1M prompts cost 125 kB, not ~60 MB of Python ints)."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def add(self, value: int) -> None:
        byte, bit = divmod(value, 8)
        if byte >= len(self._bits):
            grown = max(byte + 1, len(self._bits) * 3 // 2)  # amortised growth
            self._bits.extend(bytes(grown - len(self._bits)))
        mask = 1 << bit
        if not self._bits[byte] & mask:
            self._bits[byte] |= mask
            self._count += 1

    def __len__(self) -> int:
        return self._count


@dataclass
class ExportStats:
    rows: Counter[str] = field(default_factory=Counter)
    prompts: dict[str, IdBitmap] = field(default_factory=dict)
    all_prompts: IdBitmap = field(default_factory=IdBitmap)
    annotators: set[int] = field(default_factory=set)  # bounded by the number of users
    rows_by_version: Counter[int | None] = field(default_factory=Counter)
    agreement_sum: float = 0.0
    agreement_rows: int = 0
    overlap_rows: int = 0
    overlap_agreement_sum: float = 0.0
    unanimous_overlap_rows: int = 0
    details: Counter[str] = field(default_factory=Counter)
    tasks_seen: int = 0
    excluded_annotators: int = 0  # left out by the gold-task quality gate

    def add(self, split: str, meta: RowMeta) -> None:
        self.rows[split] += 1
        bitmap = self.prompts.get(split)
        if bitmap is None:
            bitmap = self.prompts[split] = IdBitmap()
        bitmap.add(meta.prompt_id)
        self.all_prompts.add(meta.prompt_id)
        self.annotators.add(meta.user_id)
        for version in meta.versions:
            self.rows_by_version[version] += 1
        if meta.agreement is not None:
            self.agreement_sum += meta.agreement
            self.agreement_rows += 1
            if meta.judges >= 2:
                self.overlap_rows += 1
                self.overlap_agreement_sum += meta.agreement
                self.unanimous_overlap_rows += meta.agreement >= 1.0
        for detail in meta.details:
            self.details[detail] += 1

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def agreement_summary(self) -> dict[str, Any]:
        return {
            "rows_with_agreement": self.agreement_rows,
            "mean_agreement": _ratio(self.agreement_sum, self.agreement_rows),
            "rows_judged_by_2_or_more": self.overlap_rows,
            "mean_agreement_2_or_more": _ratio(self.overlap_agreement_sum, self.overlap_rows),
            "unanimous_share_2_or_more": _ratio(self.unanimous_overlap_rows, self.overlap_rows),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": dict(self.rows),
            "total_rows": self.total_rows,
            "prompts": {split: len(bitmap) for split, bitmap in self.prompts.items()},
            "total_prompts": len(self.all_prompts),
            "annotators": len(self.annotators),
            "rows_by_policy_version": {
                ("none" if v is None else str(v)): n
                for v, n in sorted(
                    self.rows_by_version.items(), key=lambda item: (item[0] is None, item[0] or 0)
                )
            },
            "agreement": self.agreement_summary(),
            "details": dict(sorted(self.details.items())),
            "tasks_seen": self.tasks_seen,
            "excluded_annotators": self.excluded_annotators,
        }


def _ratio(numerator: float, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None
