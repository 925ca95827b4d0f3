"""PPO's ptx texts: the reference answers that a prompt set's train prompts carry, and a round that
asks for ptx without any."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import update

from app.data.models import Prompt
from app.services.prompt_sets import create_prompt_set, reference_answers
from app.services.registry import init_base_policy
from app.services.round_spec import RoundSpec
from app.services.rounds import RoundError, start_round
from tests.world import World, marker_preferences


def test_train_prompts_with_a_reference_become_chats_that_end_with_it(db):
    rows = [
        {"prompt": "Name a colour.", "reference": "  Blue.  "},
        {"prompt": "Name a fruit.", "metadata": {"reference": "A pear."}},
        {"prompt": "Name a tree."},  # no reference: not a ptx text
        {"prompt": "Name a bird.", "reference": ""},
    ]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    create_prompt_set(db, name="with references", data=data, filename="p.jsonl", eval_fraction=0.0)
    db.commit()
    assert sorted(reference_answers(db), key=str) == [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}],
    ]


def test_held_out_prompts_keep_their_references_out_of_training(db):
    data = json.dumps({"prompt": "Name a colour.", "reference": "Blue."}).encode()
    create_prompt_set(db, name="held out", data=data, filename="p.jsonl", eval_fraction=0.0)
    db.execute(update(Prompt).values(split="eval"))
    db.commit()
    assert reference_answers(db) == []


def test_a_ppo_round_with_ptx_but_no_reference_answers_is_refused_when_asked_for(
    settings, db, tiny_model_dir
):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=2, eval_prompts=0)
    spec = RoundSpec.model_validate({"algorithm": "ppo", "policy": {"ptx_coef": 0.5}})
    with pytest.raises(RoundError, match="policy.ptx_coef is 0.5 but no train prompt carries a reference"):
        start_round(db, spec, enqueue=False)
    assert start_round(db, RoundSpec.model_validate({"algorithm": "ppo"}), enqueue=False).id
