"""A round executed inline: each stage gets its section of the stored spec; a bad stored spec fails at once."""

from __future__ import annotations

from sqlalchemy import select

from app.data.models import Policy, Round, Run
from app.services.registry import init_base_policy, live_policy
from app.services.round_spec import RoundSpec
from app.services.rounds import active_round, start_round
from app.services.runs import claim_run, create_run
from tests.world import World, marker_preferences
from workers.runs.rounds import execute_round

# Seconds on a CPU; the gate is opened wide so a tiny random model can pass it.
QUICK_DPO_ROUND = {
    "algorithm": "dpo",
    "reward": {"epochs": 1, "max_pairs_per_batch": 4, "max_length": 64, "learning_rate": 1e-3},
    "policy": {"epochs": 1, "batch_size": 4, "max_length": 64, "learning_rate": 1e-4},
    "gate": {
        "prompts": 2,
        "samples_per_prompt": 1,
        "sampling": {"max_new_tokens": 8},
        "at_training_length": False,
        "min_win_rate": None,
        "max_kl": None,
        "max_kl_to_base": None,
        "max_length_ratio": None,
        "min_length_ratio": None,
        "max_eos_share_drop": None,
    },
}


def test_a_round_hands_each_stage_its_section_and_goes_live(
    settings, engine, db, tiny_model_dir, monkeypatch
):
    from app.data.db import session_factory

    sent = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: sent.append((name, args)))
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=3)
    spec = RoundSpec.model_validate(QUICK_DPO_ROUND)
    round_id = start_round(db, spec).id

    assert execute_round(round_id, session_factory(engine)) == "succeeded"
    db.expire_all()
    runs = {run.kind: run for run in db.scalars(select(Run).where(Run.round_id == round_id))}
    assert set(runs) == {"reward", "judge", "dpo", "evaluate"}
    assert runs["reward"].config["reward"] == spec.root.reward.model_dump(mode="json")
    # The policy's reward model and DPO see one side of the prompts, the judge the other.
    split = {"judge_share": 0.5, "seed": round_id}
    assert runs["reward"].config["comparison_split"] == {**split, "side": "policy"}
    assert runs["dpo"].config["comparison_split"] == {**split, "side": "policy"}
    assert runs["judge"].config["comparison_split"] == {**split, "side": "judge"}
    assert runs["evaluate"].config["judge_model_id"] == runs["judge"].result["reward_model_id"]
    assert runs["evaluate"].config["judge_model_id"] != runs["reward"].result["reward_model_id"]
    assert runs["reward"].result["comparisons"] + runs["judge"].result["comparisons"] == 8
    assert runs["dpo"].config["policy"] == spec.root.policy.model_dump(mode="json")
    # Every training stage runs on the processes the spec asks for (one, by default: inside the worker).
    processes = spec.root.processes.model_dump(mode="json")
    assert runs["reward"].config["processes"] == runs["judge"].config["processes"] == processes
    assert runs["dpo"].config["processes"] == processes
    assert runs["evaluate"].config["gate"] == spec.root.gate.model_dump(mode="json")
    assert runs["evaluate"].result["prompts"] == 2  # the gate's own prompt count, out of three held out
    assert live_policy(db).round_id == round_id and db.get(Round, round_id).status == "succeeded"
    gate = db.get(Round, round_id).gate  # what the admin reads
    assert gate["mode"] == "judge" and gate["judge"]["passed"] and gate["judge"]["prompts"] == 2
    assert gate["judge"]["judge"].startswith(f"reward model #{runs['judge'].result['reward_model_id']}")
    refill = db.scalar(select(Run).where(Run.kind == "generate"))
    assert ("workers.tasks.generate_responses", [refill.id]) in sent


def test_the_gate_rejects_a_candidate_its_judge_does_not_prefer_beyond_chance(
    settings, engine, db, tiny_model_dir, monkeypatch
):
    """With the default rule (lower 95% bound above 0.5) three held-out prompts can never promote:
    even three wins out of three have a Wilson lower bound of 0.44. The round fails, the candidate is
    rejected, the live policy stays, and the round records the figures and the reason."""
    from app.data.db import session_factory

    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: None)
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=3)
    gate = {
        key: value for key, value in QUICK_DPO_ROUND["gate"].items() if key not in ("min_win_rate", "prompts")
    }
    spec = RoundSpec.model_validate({**QUICK_DPO_ROUND, "gate": gate})
    round_id = start_round(db, spec).id

    assert execute_round(round_id, session_factory(engine)) == "failed"
    db.expire_all()
    round_ = db.get(Round, round_id)
    judged = round_.gate["judge"]
    assert judged["prompts"] == 3 and not judged["passed"]
    assert judged["win_rate_low"] < 0.5
    assert round_.error.startswith("candidate v1 rejected by the gate: win rate ")
    assert "lower bound" in round_.error and "is not above 0.5 (3 prompts × 1)" in round_.error
    assert live_policy(db).id == base.id
    assert db.scalar(select(Policy).where(Policy.round_id == round_id)).status == "rejected"


def test_in_human_mode_a_candidate_that_passed_the_checks_waits_for_arena_votes(
    settings, engine, db, tiny_model_dir, monkeypatch
):
    from app.data.db import session_factory

    sent = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: sent.append((name, args)))
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=3)
    gate = {**QUICK_DPO_ROUND["gate"], "mode": "human", "arena_prompts": 2}
    round_id = start_round(db, RoundSpec.model_validate({**QUICK_DPO_ROUND, "gate": gate})).id

    assert execute_round(round_id, session_factory(engine)) == "awaiting_votes"
    db.expire_all()
    round_ = db.get(Round, round_id)
    assert round_.status == round_.stage == "awaiting_votes" and round_.active is True
    assert round_.gate["mode"] == "human" and round_.gate["judge"]["passed"]
    arena = db.get(Run, round_.gate["human"]["arena_run_id"])
    assert arena.kind == "generate" and len(arena.config["arena_prompt_ids"]) == 2
    assert arena.config["arena_versions"] == [1, 0]
    assert ("workers.tasks.generate_responses", [arena.id]) in sent
    candidate = db.scalar(select(Policy).where(Policy.round_id == round_id))
    assert candidate.status == "candidate" and live_policy(db).id == base.id
    # A redelivered round message leaves the waiting round alone.
    assert execute_round(round_id, session_factory(engine)) == "awaiting_votes"


def test_a_round_whose_stored_settings_are_not_a_spec_fails_naming_them(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    base = db.scalar(select(Policy))
    round_ = Round(
        algorithm="ppo",
        status="queued",
        stage="queued",
        active=True,
        base_policy_id=base.id,
        config={"algorithm": "ppo", "policy": {"policy_lr": 1e-5}},  # a spelling from before round specs
    )
    db.add(round_)
    db.commit()
    assert execute_round(round_.id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Round, round_.id)
    assert failed.error == (
        "the round's stored settings are not a valid round spec: policy.policy_lr: Extra inputs are not permitted"
    )
    assert failed.active is None and db.scalar(select(Run).where(Run.round_id == round_.id)) is None


def test_a_round_whose_promotion_raises_ends_failed_and_frees_the_slot(
    settings, engine, db, tiny_model_dir, monkeypatch
):
    from app.data.db import session_factory

    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: None)
    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=3)
    spec = RoundSpec.model_validate(QUICK_DPO_ROUND)
    round_id = start_round(db, spec).id

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("app.services.promotion.set_live", disk_full)
    assert execute_round(round_id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Round, round_id)
    assert failed.status == "failed" and failed.active is None
    assert failed.error.startswith("promoting v") and "no space left on device" in failed.error.lower()
    assert live_policy(db).id == base.id
    assert start_round(db, spec).id != round_id  # the next round is not refused


def test_a_second_delivery_leaves_a_stage_held_by_a_live_worker_alone(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    round_ = start_round(db, RoundSpec.model_validate(QUICK_DPO_ROUND), enqueue=False)
    round_.status = "running"
    run = create_run(db, "reward", {}, round_id=round_.id)
    db.commit()
    assert claim_run(db, run.id)  # a live worker is training the reward model

    assert execute_round(round_.id, session_factory(engine)) == "running"
    db.expire_all()
    assert active_round(db).id == round_.id and db.get(Round, round_.id).error == ""
    assert db.get(Run, run.id).status == "running"


def test_a_stage_whose_recorded_result_is_corrupt_ends_the_round_with_the_reason(
    settings, engine, db, tiny_model_dir
):
    """A reward run of the round recorded as succeeded but without its reward model (written by a
    broken earlier delivery): the policy stage cannot start, and the round ends instead of staying
    active and refusing every later round."""
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    spec = RoundSpec.model_validate(QUICK_DPO_ROUND)
    round_ = start_round(db, spec, enqueue=False)
    reward = create_run(db, "reward", {}, round_id=round_.id)
    reward.status, reward.result = "succeeded", {"comparisons": 3}
    db.commit()

    assert execute_round(round_.id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Round, round_.id)
    assert failed.status == "failed" and failed.active is None
    # The corrupt result is read once the judge has run too, when the policy stage is configured.
    assert failed.error.startswith("the round stopped at ")
    assert failed.error.endswith(": KeyError: 'reward_model_id'")
    assert start_round(db, spec, enqueue=False).id != round_.id  # the next round is not refused


def test_a_round_whose_start_policy_was_removed_ends_failed(settings, engine, db, tiny_model_dir):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    round_ = start_round(db, RoundSpec.model_validate(QUICK_DPO_ROUND), enqueue=False)
    round_.base_policy_id = None  # what ON DELETE SET NULL leaves when the policy row goes
    db.commit()

    assert execute_round(round_.id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Round, round_.id)
    assert failed.active is None
    assert "the policy the round starts from is no longer registered" in failed.error


def test_a_ppo_round_whose_reward_model_is_no_better_than_chance_stops_before_the_policy(
    settings, engine, db, tiny_model_dir
):
    from app.data.db import session_factory

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=8, eval_prompts=0)  # a held-out prompt or two: too few pairs
    spec = RoundSpec.model_validate({**QUICK_DPO_ROUND, "algorithm": "ppo", "policy": {"steps": 1}})
    round_id = start_round(db, spec, enqueue=False).id

    assert execute_round(round_id, session_factory(engine)) == "failed"
    db.expire_all()
    failed = db.get(Round, round_id)
    assert "PPO was not started" in failed.error and "Collect more comparisons" in failed.error
    assert failed.error.startswith("the reward model ")
    kinds = {run.kind for run in db.scalars(select(Run).where(Run.round_id == round_id))}
    assert kinds == {"reward"}  # the policy stage never ran
    assert live_policy(db).version == 0


def test_a_dpo_round_gates_at_the_length_its_answers_were_sampled_at(db):
    from app.data.models import Comparison, Response
    from workers.runs.rounds import answers_length

    marker_preferences(World(db), n_prompts=3, eval_prompts=0)
    snapshot = db.scalar(select(Comparison.id).order_by(Comparison.id.desc()))
    assert answers_length(db, snapshot) is None  # unknown: the round falls back to the pool's setting
    responses = db.scalars(select(Response).order_by(Response.id)).all()
    for n, response in enumerate(responses):
        response.sampling = {"max_new_tokens": 64 if n % 2 else 48, "temperature": 0.8}
    db.commit()
    assert answers_length(db, snapshot) == 64
