"""Human confirmation: arena votes on a candidate against the live version decide, by the
Bradley-Terry lower bound; the round waits, promotes or fails, and says why."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.data.models import Policy, Round, Run, Task
from app.services.human_gate import arena_verdict, open_arena, settle_rounds_awaiting_votes
from app.services.quality.leaderboard import Battle
from app.services.registry import live_policy, set_live
from app.services.round_spec import RoundSpec
from app.services.rounds import cancel_round
from tests.world import World

LIVE, CANDIDATE = (1, 0), (2, 1)  # (policy id, version)


def battles(candidate_wins: int, live_wins: int, ties: int = 0) -> list[Battle]:
    # Policy ids 1 (live) < 2 (candidate): outcome 1 means the live version won.
    return [Battle(1, 2, 0.0)] * candidate_wins + [Battle(1, 2, 1.0)] * live_wins + [Battle(1, 2, 0.5)] * ties


def verdict(candidate_wins: int, live_wins: int, ties: int = 0, **kw):
    options = {"min_votes": 20, "max_votes": 200, "n_boot": 300} | kw
    return arena_verdict(battles(candidate_wins, live_wins, ties), CANDIDATE, LIVE, **options)


def test_too_few_votes_wait_and_say_how_many_are_needed():
    out = verdict(4, 1)
    assert out.decision == "wait" and (out.votes, out.wins, out.losses, out.ties) == (5, 4, 1, 0)
    assert (
        out.reason
        == "waiting for votes: 5 votes: 4 for the candidate, 1 for the live policy, 0 ties; a verdict needs at least 20"
    )


def test_a_clear_human_preference_promotes():
    out = verdict(24, 4, ties=2)
    assert out.decision == "promote"
    assert out.elo_gain_low > 0 and out.elo_gain_low < out.elo_gain < out.elo_gain_high
    assert out.reason.startswith(
        "humans prefer the candidate: 30 votes: 24 for the candidate, 4 for the live"
    )
    assert "lower bound above 0" in out.reason


def test_a_human_preference_for_the_live_policy_rejects():
    out = verdict(3, 25)
    assert out.decision == "reject" and out.elo_gain_high < 0
    assert out.reason.startswith("humans prefer the live policy: 28 votes")


def test_an_even_split_waits_until_the_vote_limit_then_rejects():
    assert verdict(15, 15).decision == "wait"
    assert verdict(15, 15).reason.startswith("no verdict yet: 30 votes")
    done = verdict(100, 100)
    assert done.decision == "reject"
    assert done.reason.startswith("not shown better after 200 votes: 200 votes")


def test_with_every_arena_task_judged_the_candidate_is_not_left_waiting():
    assert verdict(15, 15, tasks_left=False).reason.startswith(
        "not shown better with every arena task judged"
    )
    short = verdict(3, 1, tasks_left=False)
    assert short.decision == "reject" and "fewer than the 20 a verdict needs" in short.reason


def test_battles_of_other_versions_do_not_count():
    other = [Battle(1, 3, 0.0)] * 30  # a third version beat the live one: not this candidate's votes
    out = arena_verdict(other + battles(2, 0), CANDIDATE, LIVE, min_votes=20, max_votes=200)
    assert out.votes == 2


# ---------------------------------------------------------------- the round's side


HUMAN_SPEC = {"algorithm": "ppo", "gate": {"mode": "human", "arena_min_votes": 6, "arena_prompts": 3}}


def _waiting_round(db, w: World, n_tasks: int) -> tuple[Round, Policy, Policy, list[Task]]:
    live, candidate = w.policy(0, "base"), w.policy(1, "ppo")
    set_live(db, 0)
    round_ = Round(
        algorithm="ppo",
        status="awaiting_votes",
        stage="awaiting_votes",
        active=True,
        base_policy_id=live.id,
        config=RoundSpec.model_validate(HUMAN_SPEC).to_json(),
        gate={"mode": "human", "human": {"arena_run_id": None, "decision": "wait"}},
    )
    db.add(round_)
    db.flush()
    candidate.round_id, candidate.status = round_.id, "candidate"
    tasks = [w.task(2, kind="arena", versions=[0, 1], required=2) for _ in range(n_tasks)]  # 0 = v0, 1 = v1
    db.commit()
    return round_, live, candidate, tasks


def test_votes_for_the_candidate_promote_it_and_finish_the_round(db, settings, monkeypatch):
    sent = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: sent.append(name))
    w = World(db, settings)
    round_, _live, candidate, tasks = _waiting_round(db, w, n_tasks=5)
    fans = [w.user(), w.user()]
    for task in tasks[:2]:
        for fan in fans:
            w.judge(task, fan, [[1], [0]])  # v1 first
    assert settle_rounds_awaiting_votes(db, settings) == {round_.id: "wait"}
    db.refresh(round_)
    assert round_.status == "awaiting_votes" and round_.gate["human"]["votes"] == 4
    assert round_.gate["human"]["reason"].startswith("waiting for votes: 4 votes: 4 for the candidate")

    for task in tasks[2:5]:
        for fan in fans:
            w.judge(task, fan, [[1], [0]])
    assert settle_rounds_awaiting_votes(db, settings) == {round_.id: "promote"}
    db.expire_all()
    round_ = db.get(Round, round_.id)
    assert round_.status == "succeeded" and round_.active is None
    assert round_.gate["human"]["decision"] == "promote" and round_.gate["human"]["wins"] == 10
    assert live_policy(db).id == candidate.id
    assert "workers.tasks.generate_responses" in sent  # the pool refills with the new version


def test_votes_for_the_live_policy_reject_the_candidate_and_close_its_arena(db, settings, monkeypatch):
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: None)
    w = World(db, settings)
    round_, live, candidate, tasks = _waiting_round(db, w, n_tasks=5)
    voters = [w.user(), w.user()]
    for task in tasks[:4]:
        for voter in voters:
            w.judge(task, voter, [[0], [1]])  # v0 first
    assert settle_rounds_awaiting_votes(db, settings) == {round_.id: "reject"}
    db.expire_all()
    round_ = db.get(Round, round_.id)
    assert round_.status == "failed" and round_.active is None
    assert round_.error.startswith("candidate v1 rejected by the arena votes: humans prefer the live policy")
    assert db.get(Policy, candidate.id).status == "rejected"
    assert live_policy(db).id == live.id
    assert db.get(Task, tasks[4].id).status == "closed"  # no more votes are asked for


def test_opening_the_arena_asks_for_blind_tasks_on_held_out_prompts(db, settings, monkeypatch):
    sent = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: sent.append((name, args)))
    w = World(db, settings)
    held_out = w.prompt_set(None, ["a", "b", "c", "d", "e"], held_out=range(4))
    round_, live, candidate, _ = _waiting_round(db, w, n_tasks=0)
    round_.status = "running"
    db.commit()

    run_id = open_arena(db, round_, candidate, live, {"arena_prompts": 3}, 96, settings)
    run = db.get(Run, run_id)
    eval_ids = {p.id for p in held_out if p.split == "eval"}
    assert len(eval_ids) == 4
    assert set(run.config["arena_prompt_ids"]) <= eval_ids and len(run.config["arena_prompt_ids"]) == 3
    assert run.config["arena_versions"] == [1, 0] and run.config["sampling"] == {"max_new_tokens": 96}
    assert round_.status == "awaiting_votes" and round_.active is True
    assert round_.gate["human"]["arena_run_id"] == run_id
    assert sent == [("workers.tasks.generate_responses", [run_id])]


def test_an_admin_can_cancel_a_round_waiting_for_votes(db, settings):
    w = World(db, settings)
    round_, _live, _candidate, tasks = _waiting_round(db, w, n_tasks=2)
    assert cancel_round(db, round_.id)
    db.expire_all()
    assert db.get(Round, round_.id).status == "cancelled"
    assert {db.get(Task, t.id).status for t in tasks} == {"closed"}


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_only_rounds_waiting_for_votes_are_settled(db, settings, status):
    w = World(db, settings)
    round_, *_ = _waiting_round(db, w, n_tasks=1)
    round_.status, round_.active = status, None
    db.commit()
    assert settle_rounds_awaiting_votes(db, settings) == {}
    assert db.scalar(select(Round.status).where(Round.id == round_.id)) == status
