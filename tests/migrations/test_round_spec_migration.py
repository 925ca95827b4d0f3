"""Migration 0006: rounds and runs stored before round specs read back as specs, and back again."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from app.data.models import JSONType
from app.services.round_spec import RoundSpec

rounds = sa.table(
    "rounds",
    *(sa.column(name) for name in ("id", "algorithm", "status", "stage", "trigger", "comparison_snapshot")),
    *(sa.column(name) for name in ("error", "created_at")),
    sa.column("config", JSONType),
)
runs = sa.table(
    "runs",
    *(sa.column(name) for name in ("id", "round_id", "kind", "status", "progress", "progress_message")),
    *(sa.column(name) for name in ("error", "attempts", "cancel_requested", "created_at")),
    sa.column("config", JSONType),
    sa.column("result", JSONType),
)

OLD_ROUNDS = {
    1: ("ppo", {"auto_promote": False, "policy": {"steps": 5, "policy_lr": 2e-5, "critic_lr": 6e-5}}),
    2: ("dpo", {"reward": {"epochs": 2, "lora_r": 4}, "policy": {"lr": 1e-6}, "gate": {"max_kl": None}}),
    3: ("ppo", {}),  # an automatic round: every default
}
OLD_RUNS = {
    10: ("reward", {"comparison_snapshot": 7, "round_id": 2, "knobs": {"learning_rate": 3e-5, "lora_r": 4}}),
    11: ("dpo", {"algorithm": "dpo", "round_id": 2, "knobs": {"lr": 1e-6, "epochs": 1}}),
    12: ("evaluate", {"candidate_version": 1, "round_id": 2, "gate": {"min_win_rate": 0.4}}),
}


def _seed_old_rows(engine) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for round_id, (algorithm, config) in OLD_ROUNDS.items():
            conn.execute(
                rounds.insert().values(
                    id=round_id,
                    algorithm=algorithm,
                    status="succeeded",
                    stage="succeeded",
                    trigger="manual",
                    comparison_snapshot=7,
                    error="",
                    created_at=now,
                    config=config,
                )
            )
        for run_id, (kind, config) in OLD_RUNS.items():
            conn.execute(
                runs.insert().values(
                    id=run_id,
                    round_id=2,
                    kind=kind,
                    status="succeeded",
                    progress=1.0,
                    progress_message="",
                    error="",
                    attempts=1,
                    cancel_requested=False,
                    created_at=now,
                    config=config,
                    result={},
                )
            )


def _configs(engine, table) -> dict[int, dict]:
    with engine.connect() as conn:
        return {row.id: row.config for row in conn.execute(sa.select(table.c.id, table.c.config))}


def test_old_rounds_and_runs_become_specs_and_come_back(alembic_runner, alembic_engine):
    alembic_runner.migrate_up_to("0005")
    _seed_old_rows(alembic_engine)
    alembic_runner.migrate_up_one()

    specs = {i: RoundSpec.model_validate(c).root for i, c in _configs(alembic_engine, rounds).items()}
    assert specs[1].algorithm == "ppo" and specs[1].auto_promote is False
    assert (specs[1].policy.learning_rate, specs[1].policy.critic_learning_rate) == (2e-5, 6e-5)
    assert specs[2].algorithm == "dpo" and specs[2].policy.learning_rate == 1e-6
    # The reward model's LoRA keeps the alpha and dropout it had by default before.
    assert (specs[2].reward.lora.r, specs[2].reward.lora.alpha, specs[2].reward.lora.dropout) == (4, 16, 0.05)
    assert specs[2].gate.max_kl is None and specs[3] == RoundSpec.model_validate({}).root

    run_configs = _configs(alembic_engine, runs)
    assert run_configs[10] == {
        "comparison_snapshot": 7,
        "round_id": 2,
        "reward": {"learning_rate": 3e-5, "lora": {"r": 4, "alpha": 16, "dropout": 0.05}},
    }
    assert run_configs[11] == {
        "algorithm": "dpo",
        "round_id": 2,
        "policy": {"learning_rate": 1e-6, "epochs": 1},
    }
    assert run_configs[12] == OLD_RUNS[12][1]  # the gate was already named so

    alembic_runner.migrate_down_one()
    old_reward_lora = {"epochs": 2, "lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.05}  # spelt out now
    assert _configs(alembic_engine, rounds) == {
        1: OLD_ROUNDS[1][1],
        2: {**OLD_ROUNDS[2][1], "reward": old_reward_lora},
        3: OLD_ROUNDS[3][1],
    }
    assert _configs(alembic_engine, runs)[11] == OLD_RUNS[11][1]
