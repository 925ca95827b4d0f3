"""The web process at start-up: what it loaded is frozen out of the garbage collector's way, and it
refuses to run exposed with the public secret or, in production, with demo accounts."""

from __future__ import annotations

import gc

import pytest
from fastapi.testclient import TestClient

from app.config import DEFAULT_SECRET, Settings
from app.services.accounts import create_user, deactivate_user
from app.web.exposure import DemoAccountsActive
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


def test_with_the_default_secret_only_loopback_requests_are_served(settings, engine):
    app = create_app(Settings(**{**settings.model_dump(), "secret_key": DEFAULT_SECRET}), engine)
    with TestClient(app, base_url="http://10.1.2.3:8000") as client:
        refused = client.get("/login")
        assert refused.status_code == 503 and "PREFLOOP_SECRET_KEY" in refused.text
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/login").status_code == 200
    with TestClient(create_app(settings, engine), base_url="http://10.1.2.3:8000") as client:
        assert client.get("/login").status_code == 200  # a secret of its own may be served anywhere


def test_production_start_up_is_refused_while_demo_accounts_are_active(settings, engine, db):
    create_user(db, "researcher", "researcher", "researcher-demo")
    create_user(db, "demo-bot", "annotator", "demo-bot-unused-password")
    db.commit()
    production = Settings(**{**settings.model_dump(), "environment": "production"})
    with (
        pytest.raises(DemoAccountsActive, match="demo-bot, researcher"),
        TestClient(create_app(production, engine)),
    ):
        pass
    for name in ("demo-bot", "researcher"):
        deactivate_user(db, name)
    db.commit()
    with TestClient(create_app(production, engine)) as client:
        assert client.get("/login").status_code == 200
