"""Test data made through the real services: the `World` builder and fixed scenarios built with it."""

from tests.world.builder import PASSWORD, PoolOrderError, World
from tests.world.scenarios import (
    DAY1,
    DAY2,
    DAY3,
    MARKER,
    USERNAMES,
    ExportHistory,
    GoldAnnotators,
    export_history,
    gold_annotators,
    marker_preferences,
)

__all__ = [
    "DAY1",
    "DAY2",
    "DAY3",
    "MARKER",
    "PASSWORD",
    "USERNAMES",
    "ExportHistory",
    "GoldAnnotators",
    "PoolOrderError",
    "World",
    "export_history",
    "gold_annotators",
    "marker_preferences",
]
