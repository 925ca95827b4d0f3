"""The web process at start-up: what it loaded is frozen out of the garbage collector's way."""

from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from app.config import Settings
from app.web.main import create_app


def test_start_up_freezes_what_is_loaded_and_shutdown_gives_it_back(settings, engine):
    frozen_before = gc.get_freeze_count()
    app = create_app(Settings(**{**settings.model_dump(), "gc_freeze": True}), engine)
    with TestClient(app) as client:
        assert gc.get_freeze_count() > frozen_before  # full collections skip the app and its modules
        assert client.get("/login").status_code == 200
    assert gc.get_freeze_count() == 0


def test_gc_freeze_can_be_turned_off(settings, engine):
    assert settings.gc_freeze is False  # as the test settings say
    with TestClient(create_app(settings, engine)):
        assert gc.get_freeze_count() == 0
