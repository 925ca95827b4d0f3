"""Shared fixtures. Service-backed fixtures skip with a reason unless PREFLOOP_REQUIRE_SERVICES=1,
under which a missing service fails the run instead (CI sets it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("PREFLOOP_REQUIRE_SERVICES") == "1"


def service_unavailable(reason: str) -> None:
    """Skip for a missing service, or fail when CI demands every service."""
    message = f"service unavailable: {reason}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (PREFLOOP_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, built once per test session."""
    from app.basemodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-policy"), seed=0)
