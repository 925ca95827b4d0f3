"""Login, logout, sessions, CSRF and API tokens."""

from __future__ import annotations

import time

from app.services.accounts import hash_token


def test_login_sets_session_and_redirects_by_role(client, login):
    login("researcher")
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/research"


def test_wrong_password_is_refused_with_a_message(client, make_user):
    user, _ = make_user("annotator")
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    response = client.post("/login", data={"username": user.username, "password": "nope", "csrf_token": csrf})
    assert response.status_code == 400
    assert "wrong password" in response.text
    assert "prefloop_session" not in response.cookies


def test_login_without_csrf_token_is_refused(client, make_user):
    user, password = make_user("annotator")
    client.get("/login")
    response = client.post("/login", data={"username": user.username, "password": password})
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]


def test_logout_invalidates_the_session_cookie(client, login):
    login("admin")
    cookie = client.cookies.get("prefloop_session")
    response = client.post("/logout", follow_redirects=False)
    assert response.status_code == 303
    client.cookies.set("prefloop_session", cookie)  # replaying the old cookie must not work
    again = client.get("/", follow_redirects=False)
    assert again.headers["location"] == "/login"


def test_session_post_without_csrf_header_is_refused(client, login):
    login("admin")
    del client.headers["X-CSRF-Token"]
    response = client.post("/logout", follow_redirects=False)
    assert response.status_code == 403


def test_open_redirect_after_login_is_ignored(client, make_user):
    user, password = make_user("annotator")
    client.get("/login")
    csrf = client.cookies.get("prefloop_csrf")
    response = client.post(
        "/login",
        data={
            "username": user.username,
            "password": password,
            "csrf_token": csrf,
            "next": "//evil.example/x",
        },
        follow_redirects=False,
    )
    assert response.headers["location"] == "/annotate"


def test_api_tokens_are_stored_hashed_and_revocable(client, db, make_user):
    from datetime import UTC, datetime

    from app.data.models import ApiToken
    from app.services.accounts import create_api_token

    user, _ = make_user("admin")
    token = create_api_token(db, user, "ci")
    db.commit()
    row = db.query(ApiToken).one()
    assert row.token_hash == hash_token(token) and token not in (row.token_hash, row.prefix + "x")
    response = client.post("/logout", headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
    assert response.status_code == 303  # a bearer request needs no CSRF token
    row.revoked_at = datetime.now(UTC)
    db.commit()
    refused = client.post("/logout", headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]


def test_passwords_are_argon2_hashed(db, make_user):
    from app.services.accounts import verify_password

    user, password = make_user("annotator")
    assert user.password_hash.startswith("$argon2")
    assert verify_password(password, user.password_hash)
    assert not verify_password(password + "x", user.password_hash)


def test_a_change_made_outside_the_app_applies_once_the_principal_cache_lapses(client, login, db, app):
    """Verified logins are trusted for auth_cache_seconds; a deactivation by the CLI or SQL (which this
    process cannot see) shuts the session out as soon as that window has passed."""
    from sqlalchemy import update

    from app.data.models import User

    app.state.principal_cache.ttl = 0.3
    user = login("annotator")
    assert client.get("/api/tasks/next").status_code in (200, 204)
    db.execute(update(User).where(User.id == user.id).values(is_active=False))
    db.commit()
    cached = client.get("/api/tasks/next")
    assert cached.status_code in (200, 204)  # within the window: still trusted
    time.sleep(0.35)
    assert client.get("/api/tasks/next").status_code == 401


def test_with_the_principal_cache_off_every_request_reads_the_user(client, login, db, app):
    from sqlalchemy import update

    from app.data.models import User

    user = login("annotator")
    assert client.get("/api/tasks/next").status_code in (200, 204)
    app.state.principal_cache.ttl = 0
    app.state.principal_cache.forget_user(user.id)
    db.execute(update(User).where(User.id == user.id).values(role="researcher"))
    db.commit()
    refused = client.get("/api/tasks/next")
    assert refused.status_code == 403
    assert "you are signed in as researcher" in refused.json()["detail"]


def test_principal_cache_entries_expire_and_are_bounded():
    from app.web.security import Principal, PrincipalCache

    cache = PrincipalCache(ttl=60, max_entries=3)
    alice = Principal(id=1, username="alice", role="annotator", via_token=False)
    bob = Principal(id=2, username="bob", role="admin", via_token=True)
    cache.put(("session", 1, 0), alice)
    cache.put(("token", "t"), bob)
    assert cache.get(("session", 1, 0)) == alice
    assert cache.get(("session", 1, 1)) is None  # a newer generation is another credential
    cache.forget_user(1)
    assert cache.get(("session", 1, 0)) is None
    assert cache.get(("token", "t")) == bob
    for i in range(5):
        cache.put(("session", 10 + i, 0), alice)
    assert len(cache._entries) <= 3
    cache.ttl = -1  # already lapsed when stored: never stored
    cache.put(("session", 99, 0), alice)
    assert cache.get(("session", 99, 0)) is None
