"""The export formats by name: pairwise, pairwise_text, rankings, hh_rlhf and arena.

Each format lives with its row builder and field documentation in its family's module: pairwise
(pairwise, pairwise_text, hh_rlhf), rankings and arena; rows holds what they share.
"""

from __future__ import annotations

from app.services.exports.arena import ARENA
from app.services.exports.pairwise import HH_RLHF, PAIRWISE, PAIRWISE_TEXT
from app.services.exports.rankings import RANKINGS
from app.services.exports.rows import Format

FORMATS: dict[str, Format] = {f.name: f for f in (PAIRWISE, PAIRWISE_TEXT, RANKINGS, HH_RLHF, ARENA)}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}") from None
