"""GET /healthz reports the database, the broker and the live policy; 503 when one is down."""

from __future__ import annotations

from app.web.main import create_app


def test_healthz_ok_with_embedded_broker(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["database"] == "ok" and body["broker"] == "ok"
    assert body["live_policy_version"] is None  # nothing registered yet


def test_healthz_503_when_broker_is_down(settings, engine, monkeypatch):
    from fastapi.testclient import TestClient

    from app.config import get_settings, reset_settings

    monkeypatch.setenv("PREFLOOP_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    reset_settings()
    with TestClient(create_app(get_settings(), engine)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["broker"].startswith("down")


def test_healthz_503_when_database_is_down(settings, engine):
    from fastapi.testclient import TestClient
    from sqlalchemy import create_engine

    broken = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings, broken)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["database"].startswith("down")


def test_healthz_shows_live_policy_version(settings, engine, db, tiny_model_dir):
    from fastapi.testclient import TestClient

    from app.services.registry import init_base_policy

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    app = create_app(settings, engine)
    with TestClient(app) as client:
        app.state.policy_holder.check_now()
        body = client.get("/healthz").json()
    assert body["live_policy_version"] == 0
    assert body["served_policy_version"] == 0
