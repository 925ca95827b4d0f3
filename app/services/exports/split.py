"""Deterministic train/test split by prompt.

A prompt's split depends only on its content hash and the seed, so the same prompt lands in the same
split in every export with that seed, whichever prompt set or task it came from (no leakage of one
prompt into both splits), and adding data never moves an old prompt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from app.services.exports.source import PromptInfo
from app.services.exports.spec import ExportSpec

TRAIN, TEST = "train", "test"


def hash_unit(content_hash: str, seed: int) -> float:
    """A uniform number in [0, 1) from the prompt's content hash and the seed."""
    digest = hashlib.sha256(f"prefloop-split:{seed}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def splitter(spec: ExportSpec) -> Callable[[PromptInfo], str]:
    if spec.split_mode == "none" or (spec.split_mode == "hash" and spec.test_fraction == 0):
        return lambda prompt: TRAIN
    if spec.split_mode == "stored":
        # The prompt set's own split (made when the prompts were uploaded): eval prompts become test.
        return lambda prompt: TEST if prompt.split == "eval" else TRAIN
    fraction, seed = spec.test_fraction, spec.seed
    return lambda prompt: TEST if hash_unit(prompt.content_hash, seed) < fraction else TRAIN
