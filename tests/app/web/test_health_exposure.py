"""/healthz reuses its checks for a few seconds (anyone may call it), and tells only admins why a
service is down: exception text names hosts, users and paths."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.config import Settings
from app.web.main import create_app

DOWN_BROKER = "redis://unreachable-broker-host.invalid:6379/0"


def test_anonymous_callers_see_down_without_the_reason_and_admins_see_it(settings, engine):
    app = create_app(Settings(**{**settings.model_dump(), "broker_url": DOWN_BROKER}), engine)
    with TestClient(app) as client:
        anonymous = client.get("/healthz")
        assert anonymous.status_code == 503
        assert anonymous.json()["broker"] == "down"
        assert "unreachable-broker-host" not in anonymous.text

        app.state.policy_holder.last_error = "OSError: /secret/registry/policies/3 is unreadable"
        assert client.get("/healthz").json()["policy_error"] == "hidden: details for admins"

        admin = client.get("/healthz", headers=_admin_headers(app, engine))
        assert admin.json()["broker"].startswith("down: ") and len(admin.json()["broker"]) > len("down: ")
        assert admin.json()["policy_error"].startswith("OSError: /secret/registry")


def _admin_headers(app, engine) -> dict[str, str]:
    from app.data.db import session_factory
    from app.services.accounts import create_api_token, create_user

    with session_factory(engine)() as db:
        user = create_user(db, "health-admin", "admin", "health-admin-password")
        token = create_api_token(db, user, "health")
        db.commit()
    return {"Authorization": f"Bearer {token}"}


def test_checks_are_reused_within_the_cache_window(settings, engine, monkeypatch):
    from app.web.routes import health

    calls = []
    real = health.check_broker

    def counting(url, timeout=2.0):
        calls.append(url)
        return real(url, timeout)

    monkeypatch.setattr(health, "check_broker", counting)
    cached = create_app(Settings(**{**settings.model_dump(), "health_cache_seconds": 60}), engine)
    with TestClient(cached) as client:
        for _ in range(5):
            assert client.get("/healthz").json()["broker"] == "ok"
    assert len(calls) == 1

    uncached = create_app(Settings(**{**settings.model_dump(), "health_cache_seconds": 0}), engine)
    with TestClient(uncached) as client:
        for _ in range(3):
            client.get("/healthz")
    assert len(calls) == 4


def test_a_signed_in_caller_gets_the_health_answer_while_the_database_is_down(settings):
    from sqlalchemy import create_engine

    broken = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with TestClient(create_app(settings, broken)) as client:
        client.cookies.set("prefloop_session", "a-cookie-the-database-would-be-asked-about")
        response = client.get("/healthz", headers={"Authorization": "Bearer some-token"})
    assert response.status_code == 503 and response.json()["database"] == "down"


def test_detail_is_hidden_in_nested_sections_too():
    from app.web.routes.health import HIDDEN, without_detail

    body = {"worker": {"alive": False, "error": "ConnectionError: redis://:pw@host"}, "broker": "down: x"}
    assert without_detail(body) == {"worker": {"alive": False, "error": HIDDEN}, "broker": "down"}
