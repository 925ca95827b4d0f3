"""`prefloop serve` refuses to expose the public development secret, and production refuses demo accounts."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from app.cli import main as cli
from app.config import reset_settings
from app.data.models import User
from app.services.accounts import create_user


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """Stands in for uvicorn: records the host the web app would have been served on."""
    hosts: list[str] = []

    class RecordingServer:
        def __init__(self, config) -> None:
            self.host = config.host

        def run(self) -> None:
            hosts.append(self.host)

    # `app.cli.serve` as a dotted name would be the command the package exports, not the module.
    monkeypatch.setattr(importlib.import_module("app.cli.serve"), "_QuietServer", RecordingServer)
    return hosts


@pytest.fixture
def default_secret(settings, monkeypatch):
    """The test settings, but with the development secret from the source."""
    monkeypatch.delenv("PREFLOOP_SECRET_KEY")
    monkeypatch.setenv("PREFLOOP_ENVIRONMENT", "development")
    reset_settings()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "prefloop.example.org"])
def test_serve_refuses_the_default_secret_on_a_network_address(default_secret, started, host):
    result = CliRunner().invoke(cli, ["serve", "--no-worker", "--host", host])
    assert result.exit_code != 0
    assert "PREFLOOP_SECRET_KEY" in result.output and "secrets.token_urlsafe" in result.output
    assert started == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_serve_allows_the_default_secret_on_loopback(default_secret, started, host):
    result = CliRunner().invoke(cli, ["serve", "--no-worker", "--host", host])
    assert result.exit_code == 0, result.output
    assert started == [host]


def test_production_refuses_to_start_until_demo_accounts_are_deactivated(settings, db, started, monkeypatch):
    create_user(db, "admin", "admin", "admin-demo")
    create_user(db, "demo-admin-bot", "admin", "demo-admin-bot-unused-password")
    create_user(db, "alice", "admin", "a-real-password-1")
    db.commit()
    monkeypatch.setenv("PREFLOOP_ENVIRONMENT", "production")
    reset_settings()
    runner = CliRunner()

    refused = runner.invoke(cli, ["serve", "--no-worker", "--host", "0.0.0.0"])
    assert refused.exit_code != 0 and started == []
    assert "admin, demo-admin-bot" in refused.output and "alice" not in refused.output
    assert "prefloop users deactivate demo-admin-bot" in refused.output

    for name in ("admin", "demo-admin-bot"):
        deactivated = runner.invoke(cli, ["users", "deactivate", name])
        assert deactivated.exit_code == 0, deactivated.output
    listing = runner.invoke(cli, ["users", "list"]).output.splitlines()
    assert [line.split()[2] for line in listing if line.startswith("demo-admin-bot")] == ["no"]

    allowed = runner.invoke(cli, ["serve", "--no-worker", "--host", "0.0.0.0"])
    assert allowed.exit_code == 0, allowed.output
    assert started == ["0.0.0.0"]


def test_users_deactivate_names_a_missing_user(settings, db):
    result = CliRunner().invoke(cli, ["users", "deactivate", "nobody"])
    assert result.exit_code != 0 and "nobody" in result.output


def test_init_demo_is_refused_in_production(settings, db, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PREFLOOP_ENVIRONMENT", "production")
    reset_settings()
    result = CliRunner().invoke(cli, ["init", "--demo", "--base-model", str(tiny_model_dir)])
    assert result.exit_code != 0 and "--demo" in result.output and "production" in result.output
    assert db.query(User).count() == 0
