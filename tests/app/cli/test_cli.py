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
    from app.data.models import ApiToken, User

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
    from app.data.models import Policy, PolicyAlias

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


def test_round_start_refuses_a_setting_the_trainers_do_not_have(settings, db):
    from app.data.models import Round

    runner = CliRunner()
    typo = runner.invoke(cli, ["round", "start", "--no-wait", "--set", "policy.lr=1e-5"])
    assert typo.exit_code == 2, typo.output
    assert "Invalid value for --set: policy.lr: Extra inputs are not permitted" in typo.output
    mistyped = runner.invoke(cli, ["round", "start", "--algorithm", "dpo", "--set", "reward.epochs=two"])
    assert mistyped.exit_code == 2 and "reward.epochs: Input should be a valid integer" in mistyped.output
    no_section = runner.invoke(cli, ["round", "start", "--set", "steps=4"])
    assert no_section.exit_code == 2 and "SECTION one of reward, policy, gate" in no_section.output
    assert db.query(Round).count() == 0


def test_round_start_stores_the_settings_it_was_given(settings, db, tiny_model_dir, monkeypatch):
    from app.data.models import Round
    from app.services.registry import init_base_policy
    from app.services.round_spec import RoundSpec
    from tests.world import World, marker_preferences

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=1)
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: None)
    args = [
        "--set",
        "policy.steps=4",
        "--set",
        "policy.sampling.max_new_tokens=48",
        "--set",
        "gate.max_kl=null",
    ]
    started = CliRunner().invoke(cli, ["round", "start", "--no-wait", "--no-auto-promote", *args])
    assert started.exit_code == 0, started.output
    spec = RoundSpec.model_validate(db.query(Round).one().config).root
    assert (spec.algorithm, spec.auto_promote, spec.policy.steps) == ("ppo", False, 4)
    assert spec.policy.sampling.max_new_tokens == 48 and spec.gate.max_kl is None


def test_round_settings_lists_every_setting_with_its_default():
    listing = CliRunner().invoke(cli, ["round", "settings", "--algorithm", "dpo"])
    assert listing.exit_code == 0, listing.output
    assert "policy.beta" in listing.output and "policy.steps" not in listing.output
    assert "(off unless set)" in listing.output and "gate.sampling.max_new_tokens" in listing.output


def test_the_round_profiles_hold_valid_round_specs_and_the_demo_loop_uses_the_cpu_one():
    from app.services.round_profiles import PROFILES, profile_for_device
    from app.services.round_spec import RoundSpec

    for profile in PROFILES.values():
        for algorithm in ("ppo", "dpo"):
            spec = RoundSpec.model_validate(profile.spec(algorithm)).root
            assert spec.algorithm == algorithm
        # PPO trains at the task pool's length, so the gate samples where the policy learnt.
        assert profile.spec("ppo")["policy"]["sampling"]["max_new_tokens"] == profile.max_new_tokens
    assert profile_for_device("cpu").name == "cpu" and profile_for_device("cuda:1").name == "gpu"
    assert PROFILES["cpu"].rankings <= 128
    usage = CliRunner().invoke(cli, ["demo-loop", "--help"])
    assert usage.exit_code == 0 and "--profile [cpu|gpu]" in usage.output and "[default: cpu]" in usage.output
