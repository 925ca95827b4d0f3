"""The promotion gate on the round page and in the API: the judge's figures, checks and reasons,
and in human mode the arena votes coming in and why the candidate passed, failed or waits."""

from __future__ import annotations

from app.data.models import Round
from app.services.registry import set_live
from app.services.round_spec import RoundSpec
from tests.world import World

HX = {"HX-Request": "true"}

JUDGED = {
    "mode": "judge",
    "judge_comparisons": 310,
    "policy_comparisons": 290,
    "judge": {
        "prompts": 123,
        "samples_per_prompt": 4,
        "max_new_tokens": 128,
        "candidate_score": 0.41,
        "live_score": 0.38,
        "win_rate": 0.52,
        "win_rate_low": 0.432,
        "win_rate_high": 0.607,
        "confidence": 0.95,
        "interval": "wilson",
        "kl_to_live": 2.5,
        "kl_to_base": 2.5,
        "candidate_length": 60.2,
        "live_length": 58.0,
        "candidate_eos_share": 0.55,
        "live_eos_share": 0.8,
        "judge": "reward model #7 held out from the policy's training, held-out accuracy 0.81",
        "checks": [
            {
                "name": "win_rate_lower_bound",
                "value": 0.432,
                "threshold": 0.5,
                "passed": False,
                "reason": "win rate 0.520, its 95% lower bound 0.432 is not above 0.5 (123 prompts × 4)",
            },
            {
                "name": "eos_share_drop",
                "value": 0.25,
                "threshold": 0.1,
                "passed": False,
                "reason": "EOS share fell 0.25 (live 0.80 → candidate 0.55) > 0.1",
            },
            {"name": "kl_to_base", "value": 2.5, "threshold": 40.0, "passed": True, "reason": ""},
        ],
        "passed": False,
        "reasons": ["win rate 0.520 ...", "EOS share fell 0.25 ..."],
    },
}


def test_the_round_page_shows_the_judges_figures_and_why_it_rejected(client, login, db, api_headers):
    round_ = Round(
        algorithm="ppo", status="failed", stage="failed", gate=JUDGED, error="rejected by the gate"
    )
    db.add(round_)
    db.commit()
    login("admin")
    page = client.get(f"/admin/rounds/{round_.id}").text
    assert "Promotion gate" in page and "held-out judge" in page
    assert "Win rate <strong>0.520</strong>" in page and "[0.432, 0.607]" in page
    assert "123 held-out prompts × 4 samples at 128 tokens" in page
    assert "reward model #7 held out from the policy&#39;s training" in page
    assert "its 95% lower bound 0.432 is not above 0.5" in page
    assert "EOS share fell 0.25 (live 0.80 → candidate 0.55) &gt; 0.1" in page
    assert page.count('status-failed">fail</span>') == 2 and page.count('status-succeeded">pass</span>') == 1
    assert "EOS share 0.55 (live 0.80)" in page and "KL to live 2.50 nats, to base 2.50 nats" in page

    api = client.get(f"/api/rounds/{round_.id}", headers=api_headers("admin")).json()
    assert api["gate"]["judge"]["win_rate_low"] == 0.432 and api["gate"]["mode"] == "judge"


def test_the_admin_sees_the_votes_come_in_while_the_round_waits(client, login, db, settings):
    w = World(db, settings)
    live, candidate = w.policy(0, "base"), w.policy(1, "ppo")
    set_live(db, 0)
    spec = RoundSpec.model_validate({"gate": {"mode": "human", "arena_min_votes": 4}})
    round_ = Round(
        algorithm="ppo",
        status="awaiting_votes",
        stage="awaiting_votes",
        active=True,
        base_policy_id=live.id,
        config=spec.to_json(),
        gate={"mode": "human", "human": {"arena_run_id": None}},
    )
    db.add(round_)
    db.flush()
    candidate.round_id = round_.id
    tasks = [w.task(2, kind="arena", versions=[0, 1], required=1) for _ in range(3)]
    db.commit()
    voter = w.user()
    w.judge(tasks[0], voter, [[1], [0]])  # the candidate first

    login("admin")
    page = client.get(f"/admin/rounds/{round_.id}").text
    assert "human confirmation" in page and "Arena votes" in page
    assert "1 votes: 1 for the candidate, 0 for the live policy, 0 ties" in page
    assert "waiting for votes" in page and "a verdict needs at least 4" in page
    assert f'hx-get="/admin/rounds/{round_.id}?part=gate"' in page

    w.judge(tasks[1], voter, [[0], [1]])
    fragment = client.get(f"/admin/rounds/{round_.id}?part=gate", headers=HX)
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert "2 votes: 1 for the candidate, 1 for the live policy" in fragment.text

    round_.status, round_.active = "failed", None
    round_.gate = {**round_.gate, "human": {"decision": "reject", "reason": "humans prefer the live policy"}}
    db.commit()
    ended = client.get(f"/admin/rounds/{round_.id}?part=gate", headers=HX)
    assert ended.status_code == 286 and "hx-get" not in ended.text
    assert "humans prefer the live policy" in ended.text
