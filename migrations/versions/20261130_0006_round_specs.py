"""rounds store a round spec; trainer settings use one spelling; runs name their settings by section

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00.000000

A round's settings were a loose dict ({"auto_promote", "reward", "policy", "gate"}) checked only by
the worker; `rounds.config` now holds a RoundSpec (app/services/round_spec.py), which names its
algorithm and is checked when the round is asked for. The trainers spell the same idea one way now:
PPO's `policy_lr`/`critic_lr` and DPO's `lr` are `learning_rate`/`critic_learning_rate`, and the
reward model's `lora_r`/`lora_alpha`/`lora_dropout` are one `lora` setting as in PPO and DPO. A
reward or policy run carried its settings under "knobs"; it carries them under its section's name
("reward", "policy") as an evaluation run already did ("gate").

Rows are rewritten rather than read leniently forever, so that a round queued or running across the
upgrade resumes under the new code and old rounds read back in the spelling of today. A setting the
old code would have refused too is left as it is: the worker fails that round and names it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
rounds = sa.table('rounds', sa.column('id', sa.Integer), sa.column('algorithm', sa.String), sa.column('config', JSON))
runs = sa.table('runs', sa.column('id', sa.Integer), sa.column('kind', sa.String), sa.column('config', JSON))

LEARNING_RATES = {
    'ppo': {'policy_lr': 'learning_rate', 'critic_lr': 'critic_learning_rate'},
    'dpo': {'lr': 'learning_rate'},
}
# What the reward model's LoRA used for a spelling left out, before it shared LoraSettings.
OLD_REWARD_LORA = {'lora_alpha': 16, 'lora_dropout': 0.05}
# The evaluation run's settings that were read from the run itself before the gate held them.
OLD_EVALUATION_KEYS = {'prompts': 'eval_prompts', 'sampling': 'sampling'}


def _renamed(settings: dict, names: dict) -> dict:
    return {names.get(key, key): value for key, value in settings.items()}


def _reward_up(settings: dict) -> dict:
    settings = dict(settings)
    rank = settings.pop('lora_r', 0)
    alpha = settings.pop('lora_alpha', OLD_REWARD_LORA['lora_alpha'])
    dropout = settings.pop('lora_dropout', OLD_REWARD_LORA['lora_dropout'])
    if rank:
        settings['lora'] = {'r': rank, 'alpha': alpha, 'dropout': dropout}
    return settings


def _reward_down(settings: dict) -> dict:
    settings = dict(settings)
    lora = settings.pop('lora', None)
    if lora:
        settings.update(lora_r=lora.get('r', 16), lora_alpha=lora.get('alpha', 32), lora_dropout=lora.get('dropout', 0.0))
    return settings


def _round_up(config: dict, algorithm: str) -> dict:
    config = {'algorithm': algorithm, **config}
    if isinstance(config.get('reward'), dict):
        config['reward'] = _reward_up(config['reward'])
    if isinstance(config.get('policy'), dict):
        config['policy'] = _renamed(config['policy'], LEARNING_RATES[algorithm])
    return config


def _round_down(config: dict, algorithm: str) -> dict:
    config = {key: value for key, value in config.items() if key != 'algorithm'}
    if isinstance(config.get('reward'), dict):
        config['reward'] = _reward_down(config['reward'])
    if isinstance(config.get('policy'), dict):
        back = {new: old for old, new in LEARNING_RATES[algorithm].items()}
        policy = _renamed(config['policy'], back)
        if policy.get('lora') is None:
            policy.pop('lora', None)
        config['policy'] = policy
    if isinstance(config.get('gate'), dict):
        config['gate'] = {k: v for k, v in config['gate'].items() if k not in OLD_EVALUATION_KEYS}
    return config


def _run_up(config: dict, kind: str) -> dict:
    if 'knobs' not in config:
        return config
    config = dict(config)
    settings = config.pop('knobs') or {}
    if kind == 'reward':
        config['reward'] = _reward_up(settings)
    else:
        config['policy'] = _renamed(settings, LEARNING_RATES[kind])
    return config


def _run_down(config: dict, kind: str) -> dict:
    config = dict(config)
    if kind == 'reward' and 'reward' in config:
        config['knobs'] = _reward_down(config.pop('reward') or {})
    elif kind in LEARNING_RATES and 'policy' in config:
        back = {new: old for old, new in LEARNING_RATES[kind].items()}
        config['knobs'] = _renamed(config.pop('policy') or {}, back)
    elif kind == 'evaluate' and isinstance(config.get('gate'), dict):
        gate = dict(config['gate'])
        for new, old in OLD_EVALUATION_KEYS.items():
            if new in gate:
                config[old] = gate.pop(new)
        config['gate'] = gate
    return config


def _rewrite(convert_round, convert_run) -> None:
    bind = op.get_bind()
    for row in bind.execute(sa.select(rounds.c.id, rounds.c.algorithm, rounds.c.config)).all():
        if isinstance(row.config, dict) and row.algorithm in LEARNING_RATES:
            new = convert_round(row.config, row.algorithm)
            if new != row.config:
                bind.execute(rounds.update().where(rounds.c.id == row.id).values(config=new))
    kinds = ('reward', 'ppo', 'dpo', 'evaluate')
    for row in bind.execute(sa.select(runs.c.id, runs.c.kind, runs.c.config).where(runs.c.kind.in_(kinds))).all():
        if isinstance(row.config, dict):
            new = convert_run(row.config, row.kind)
            if new != row.config:
                bind.execute(runs.update().where(runs.c.id == row.id).values(config=new))


def upgrade() -> None:
    _rewrite(_round_up, _run_up)


def downgrade() -> None:
    _rewrite(_round_down, _run_down)
