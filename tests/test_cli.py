"""The prefloop CLI: every command explains itself; users and tokens; init is idempotent."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from app.cli import main as cli


def _all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


@pytest.mark.parametrize(
    "path", [p for p, _ in _all_commands(cli)] + [()], ids=lambda p: " ".join(p) or "prefloop"
)
def test_every_command_has_a_help_that_explains(path):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command = cli
    for name in path:
        command = command.commands[name]
    assert command.help and len(command.help.split()) >= 5, f"{' '.join(path)} needs a real --help text"
    assert "Usage:" in result.output


def test_users_create_token_and_list(settings, db):
    from app.models import ApiToken, User

    runner = CliRunner()
    created = runner.invoke(
        cli, ["users", "create", "maria", "--role", "researcher", "--password", "long-password-1"]
    )
    assert created.exit_code == 0, created.output
    token = runner.invoke(cli, ["users", "token", "maria", "--name", "notebook"])
    assert token.exit_code == 0 and token.output.startswith("pfl_")
    listing = runner.invoke(cli, ["users", "list"])
    assert "maria" in listing.output and "researcher" in listing.output
    assert db.query(User).filter_by(username="maria").one().role == "researcher"
    assert db.query(ApiToken).one().token_hash not in token.output


def test_users_create_refuses_duplicates_and_short_passwords(settings, db):
    runner = CliRunner()
    assert (
        runner.invoke(
            cli, ["users", "create", "ann", "--role", "annotator", "--password", "long-password-1"]
        ).exit_code
        == 0
    )
    again = runner.invoke(
        cli, ["users", "create", "ann", "--role", "annotator", "--password", "long-password-1"]
    )
    assert again.exit_code != 0 and "exists" in again.output
    short = runner.invoke(cli, ["users", "create", "bob", "--role", "annotator", "--password", "short"])
    assert short.exit_code != 0 and "8 characters" in short.output


def test_init_registers_version_zero_once(settings, db, tiny_model_dir):
    from app.models import Policy, PolicyAlias

    runner = CliRunner()
    first = runner.invoke(cli, ["init", "--demo", "--base-model", str(tiny_model_dir)])
    assert first.exit_code == 0, first.output
    assert "v0 registered" in first.output
    policy = db.query(Policy).one()
    folder_listing = sorted(p.name for p in (settings.registry_dir / "policies" / "0").iterdir())
    second = runner.invoke(cli, ["init", "--demo", "--base-model", str(tiny_model_dir)])
    assert second.exit_code == 0 and "already present" in second.output
    db.expire_all()
    assert db.query(Policy).count() == 1
    assert db.get(PolicyAlias, "live").policy_id == policy.id
    assert sorted(p.name for p in (settings.registry_dir / "policies" / "0").iterdir()) == folder_listing
    assert "model.safetensors" in folder_listing and "tokenizer.json" in folder_listing
    assert len(policy.sha256) == 64
