"""`prefloop users`: account management without SQL, each change recorded in the audit log as the CLI,
taking effect in a running web app within the principal cache window."""

from __future__ import annotations

import time

from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.cli import main as cli
from app.data.models import ApiToken, AuditEntry, User
from app.services.accounts import authenticate

PASSWORD = "long-password-1"


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["users", *args], input=input)


def create(name: str, role: str):
    result = invoke("create", name, "--role", role, "--password", PASSWORD)
    assert result.exit_code == 0, result.output


def test_the_whole_account_lifecycle_from_the_shell_is_audited(settings, db):
    create("boss", "admin")
    create("ann", "annotator")

    assert invoke("role", "ann", "researcher").output.strip() == "ann: annotator -> researcher"
    assert invoke("deactivate", "ann").exit_code == 0
    assert authenticate(db, "ann", PASSWORD) is None
    again = invoke("deactivate", "ann")
    assert again.exit_code != 0 and "already deactivated" in again.output
    assert invoke("reactivate", "ann").exit_code == 0
    db.expire_all()
    assert authenticate(db, "ann", PASSWORD) is not None

    reset = invoke("reset-password", "ann", "--generate")
    assert reset.exit_code == 0, reset.output
    generated = reset.stdout.strip().splitlines()[0]
    db.expire_all()
    assert authenticate(db, "ann", PASSWORD) is None and authenticate(db, "ann", generated) is not None
    typed = invoke("reset-password", "ann", input="another-password-2\nanother-password-2\n")
    assert typed.exit_code == 0, typed.output
    db.expire_all()
    assert authenticate(db, "ann", "another-password-2") is not None

    issued = invoke("token", "ann", "--name", "notebook", "--days", "7")
    assert issued.exit_code == 0 and issued.stdout.startswith("pfl_") and "expires" in issued.stderr
    token = db.scalar(select(ApiToken))
    listed = invoke("tokens", "ann").output
    assert "notebook" in listed and token.prefix in listed and "live" in listed
    assert issued.stdout.strip() not in listed
    assert invoke("revoke-token", str(token.id)).output.strip() == f"revoked token {token.id} of ann"
    assert "notebook" not in invoke("tokens").output and "revoked" in invoke("tokens", "--all").output
    assert invoke("revoke-token", "999").exit_code != 0

    entries = db.scalars(select(AuditEntry).order_by(AuditEntry.id)).all()
    assert [(e.action, e.target) for e in entries] == [
        ("user_created", "boss"),
        ("user_created", "ann"),
        ("role_changed", "ann"),
        ("deactivated", "ann"),
        ("reactivated", "ann"),
        ("password_reset", "ann"),
        ("password_reset", "ann"),
        ("token_issued", "ann"),
        ("token_revoked", "ann"),
    ]
    assert all(e.actor.startswith("cli:") and e.actor_id is None for e in entries)
    assert entries[2].detail == {"from": "annotator", "to": "researcher"}
    assert generated not in str([e.detail for e in entries]) and PASSWORD not in str(
        [e.detail for e in entries]
    )
    audit = invoke("audit", "--user", "ann").output
    assert "role_changed" in audit and "boss" not in audit.split("detail", 1)[1]


def test_the_last_active_admin_cannot_be_deactivated_or_demoted(settings, db):
    create("only-admin", "admin")
    for args in (("deactivate", "only-admin"), ("role", "only-admin", "annotator")):
        refused = invoke(*args)
        assert refused.exit_code != 0 and "last active admin" in refused.output
    create("second-admin", "admin")
    assert invoke("role", "only-admin", "annotator").exit_code == 0
    missing = invoke("deactivate", "nobody")
    assert missing.exit_code != 0 and "no user 'nobody'" in missing.output


def test_a_cli_change_reaches_a_running_web_app_within_the_cache_window(settings, engine, db):
    from app.web.main import create_app

    create("reader", "researcher")
    token = invoke("token", "reader").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    app = create_app(settings, engine)
    app.state.principal_cache.ttl = 0.3
    with TestClient(app) as client:
        assert client.get("/api/exports/formats", headers=headers).status_code == 200
        assert invoke("role", "reader", "annotator").exit_code == 0
        time.sleep(0.35)
        demoted = client.get("/api/exports/formats", headers=headers)
        assert demoted.status_code == 403 and "signed in as annotator" in demoted.json()["detail"]
        assert invoke("deactivate", "reader").exit_code == 0
        time.sleep(0.35)
        assert client.get("/api/exports/formats", headers=headers).status_code == 401
        assert invoke("reactivate", "reader").exit_code == 0
        time.sleep(0.35)
        assert client.get("/api/tasks/next", headers=headers).status_code in (200, 204)
    assert db.scalar(select(User.is_active).where(User.username == "reader")) is True
