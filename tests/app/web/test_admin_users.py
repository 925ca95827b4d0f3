"""The admin users page and the audit log: every action through a CSRF-protected form, effective at once
in this process, recorded with the admin as actor, names escaped; API tokens expire with a clear 401."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.data.models import ApiToken, AuditEntry, User
from app.services.accounts import authenticate, create_api_token

XSS_NAME = "<script>alert(1)</script>"


@pytest.fixture
def admin(login):
    return login("admin")


def bearer(db, user, **kw) -> dict[str, str]:
    token = create_api_token(db, user, "nb", **kw)
    db.commit()
    return {"Authorization": f"Bearer {token}"}


def test_the_users_page_lists_accounts_and_tokens_escaped(client, admin, db, make_user):
    victim, _ = make_user("annotator", username=XSS_NAME)
    bearer(db, victim)
    page = client.get("/admin/users")
    assert page.status_code == 200
    assert XSS_NAME not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert f'id="user-{victim.id}"' in page.text and 'data-state="live"' in page.text
    assert page.text.count('name="csrf_token"') >= 5  # every action form carries the token
    nav = client.get("/admin").text
    assert 'href="/admin/users"' in nav and 'href="/admin/audit"' in nav


def test_every_action_applies_at_once_and_is_audited(client, admin, db, make_user):
    user, password = make_user("researcher", username="rita")
    headers = bearer(db, user)
    assert client.get("/api/exports/formats", headers=headers).status_code == 200  # now cached (10 s)

    demoted = client.post(f"/admin/users/{user.id}/role", data={"role": "annotator"})
    assert demoted.status_code == 200 and "rita is now annotator (was researcher)" in demoted.text
    assert client.get("/api/exports/formats", headers=headers).status_code == 403

    assert client.post(f"/admin/users/{user.id}/deactivate").status_code == 200
    assert client.get("/api/tasks/next", headers=headers).status_code == 401
    assert client.post(f"/admin/users/{user.id}/reactivate").status_code == 200
    assert client.get("/api/tasks/next", headers=headers).status_code in (200, 204)

    reset = client.post(f"/admin/users/{user.id}/reset-password")
    assert reset.status_code == 200 and reset.headers["cache-control"] == "no-store"
    new_password = reset.text.split('<code id="new-password">', 1)[1].split("</code>", 1)[0]
    db.expire_all()
    assert authenticate(db, "rita", new_password) is not None and authenticate(db, "rita", password) is None

    token = db.scalar(select(ApiToken).where(ApiToken.user_id == user.id))
    revoked = client.post(f"/admin/tokens/{token.id}/revoke")
    assert revoked.status_code == 200 and 'data-state="live"' not in revoked.text
    assert client.get("/api/tasks/next", headers=headers).status_code == 401
    assert client.post(f"/admin/tokens/{token.id}/revoke").status_code == 409

    entries = db.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [e.action for e in entries] == [
        "role_changed",
        "deactivated",
        "reactivated",
        "password_reset",
        "token_revoked",
    ]
    assert {(e.actor, e.actor_id, e.target, e.target_user_id) for e in entries} == {
        (admin.username, admin.id, "rita", user.id)
    }
    assert new_password not in str([e.detail for e in entries])


def test_forms_without_the_csrf_token_are_refused(client, admin, db, make_user):
    user, _ = make_user("annotator")
    del client.headers["X-CSRF-Token"]
    for path in (f"/admin/users/{user.id}/deactivate", f"/admin/users/{user.id}/reset-password"):
        refused = client.post(path, data={"role": "admin"})
        assert refused.status_code == 403 and "CSRF" in refused.text
    db.expire_all()
    assert db.get(User, user.id).is_active and db.scalar(select(AuditEntry)) is None


def test_an_admin_cannot_lock_themselves_out(client, admin, db):
    for path, form in (
        (f"/admin/users/{admin.id}/deactivate", None),
        (f"/admin/users/{admin.id}/role", {"role": "researcher"}),
    ):
        refused = client.post(path, data=form)
        assert refused.status_code == 409 and "your own account" in refused.text
    assert client.post("/admin/users/9999/deactivate").status_code == 404
    bad_role = client.post(f"/admin/users/{admin.id}/role", data={"role": "owner"})
    assert bad_role.status_code == 409 and "unknown role" in bad_role.text


def test_admins_read_the_audit_log_on_a_page_and_through_the_api(client, admin, db, make_user, api_headers):
    user, _ = make_user("annotator", username=XSS_NAME)
    client.post(f"/admin/users/{user.id}/deactivate")
    page = client.get("/admin/audit")
    assert page.status_code == 200 and 'data-action="deactivated"' in page.text
    assert XSS_NAME not in page.text and "&lt;script&gt;" in page.text
    assert client.get("/admin/audit", params={"user": XSS_NAME}).status_code == 200

    entries = client.get("/api/audit", headers=api_headers("admin")).json()
    assert [(e["action"], e["target"], e["actor"]) for e in entries] == [
        ("deactivated", XSS_NAME, admin.username)
    ]
    assert (
        client.get("/api/audit", params={"user": "nobody"}, headers=api_headers("admin")).status_code == 404
    )
    for odd in ({"limit": 0}, {"before_id": 2**40}, {"user": "a\x00b"}, {"user": "x" * 65}):
        assert client.get("/api/audit", params=odd, headers=api_headers("admin")).status_code == 422, odd


@pytest.mark.parametrize("role", ["annotator", "researcher"])
def test_other_roles_cannot_manage_accounts_or_read_the_audit_log(client, api_headers, role, make_user):
    user, _ = make_user("annotator")
    headers = api_headers(role) | {"Accept": "application/json"}
    for method, path in (
        ("GET", "/admin/users"),
        ("GET", "/admin/audit"),
        ("GET", "/api/audit"),
        ("POST", f"/admin/users/{user.id}/deactivate"),
        ("POST", f"/admin/users/{user.id}/role"),
        ("POST", f"/admin/users/{user.id}/reset-password"),
        ("POST", "/admin/tokens/1/revoke"),
    ):
        assert client.request(method, path, headers=headers).status_code == 403, (method, path)


def test_an_expired_token_is_refused_with_a_message_that_says_so(client, db, make_user):
    user, _ = make_user("researcher", username="tom")
    headers = bearer(db, user, expires_in=timedelta(seconds=1))
    assert client.get("/api/exports/formats", headers=headers).status_code == 200  # cached for 10 s
    time.sleep(1.1)
    refused = client.get("/api/exports/formats", headers=headers)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    detail = refused.json()["detail"]
    assert "API token 'nb'" in detail and "expired on" in detail and "prefloop users token tom" in detail


def test_tokens_expire_after_the_configured_days_by_default(db, make_user, settings):
    user, _ = make_user("annotator")
    bearer(db, user)
    token = db.scalar(select(ApiToken))
    lifetime = token.expires_at.replace(tzinfo=None) - token.created_at.replace(tzinfo=None)
    assert (
        timedelta(days=settings.api_token_days) - timedelta(minutes=1)
        < lifetime
        <= timedelta(days=settings.api_token_days)
    )
