"""Starting rounds through the API: validation, one at a time (409 with the running id), cancel."""

from __future__ import annotations

from app.data.models import Round
from app.services.registry import init_base_policy
from tests.world import World, marker_preferences


def _ready(db, settings, tiny_model_dir):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=3, eval_prompts=1)


def test_a_round_needs_comparisons_first(client, db, settings, tiny_model_dir, api_headers):
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    response = client.post("/api/rounds", json={"algorithm": "ppo"}, headers=api_headers("admin"))
    assert response.status_code == 422
    assert "no comparisons" in response.json()["detail"]


def test_bad_round_input_gets_a_clear_422(client, api_headers):
    response = client.post("/api/rounds", json={"algorithm": "sft"}, headers=api_headers("admin"))
    assert response.status_code == 422
    assert "algorithm" in response.json()["detail"]
    unknown = client.post("/api/rounds", json={"steps": 3}, headers=api_headers("admin"))
    assert unknown.status_code == 422 and "steps" in unknown.json()["detail"]


def test_a_misspelt_or_mistyped_setting_is_a_422_naming_it(client, api_headers):
    headers = api_headers("admin")
    typo = client.post("/api/rounds", json={"algorithm": "ppo", "policy": {"lr_typo": 1e-5}}, headers=headers)
    assert typo.status_code == 422
    assert typo.json()["detail"] == "policy.lr_typo: Extra inputs are not permitted"
    assert typo.json()["errors"][0]["loc"] == ["body", "policy", "lr_typo"]
    # A setting of the other algorithm is a typo too: DPO has a beta, PPO does not.
    other = client.post("/api/rounds", json={"algorithm": "ppo", "policy": {"beta": 0.1}}, headers=headers)
    assert other.status_code == 422 and "policy.beta" in other.json()["detail"]
    nested = client.post(
        "/api/rounds",
        json={"algorithm": "dpo", "gate": {"sampling": {"max_new_tokens": "many"}}},
        headers=headers,
    )
    assert nested.status_code == 422 and "gate.sampling.max_new_tokens" in nested.json()["detail"]


def test_a_started_round_stores_its_whole_spec(
    client, db, settings, tiny_model_dir, api_headers, monkeypatch
):
    from app.services.round_spec import RoundSpec

    _ready(db, settings, tiny_model_dir)
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: None)
    body = {"algorithm": "dpo", "auto_promote": False, "policy": {"learning_rate": 1e-6, "lora": {"r": 4}}}
    response = client.post("/api/rounds", json=body, headers=api_headers("admin"))
    assert response.status_code == 201, response.text
    db.expire_all()
    stored = db.get(Round, response.json()["id"]).config
    assert stored == RoundSpec.model_validate(body).to_json() == response.json()["config"]
    spec = RoundSpec.model_validate(stored).root
    assert spec.algorithm == "dpo" and spec.auto_promote is False
    assert spec.policy.learning_rate == 1e-6 and spec.policy.lora.r == 4 and spec.reward.epochs == 1


def test_one_round_at_a_time(client, db, settings, tiny_model_dir, api_headers, monkeypatch):
    _ready(db, settings, tiny_model_dir)
    sent = []
    monkeypatch.setattr("app.services.dispatch._sender", lambda name, args: sent.append((name, args)))
    headers = api_headers("admin")
    first = client.post("/api/rounds", json={"algorithm": "dpo", "policy": {"epochs": 1}}, headers=headers)
    assert first.status_code == 201, first.text
    round_id = first.json()["id"]
    assert sent == [("workers.tasks.run_round", [round_id])]
    second = client.post("/api/rounds", json={"algorithm": "ppo"}, headers=headers)
    assert second.status_code == 409
    assert second.json()["round_id"] == round_id and "still running" in second.json()["detail"]

    cancelled = client.post(f"/api/rounds/{round_id}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    db.expire_all()
    assert db.get(Round, round_id).active is None
    third = client.post("/api/rounds", json={"algorithm": "ppo"}, headers=headers)
    assert third.status_code == 201


def test_round_status_and_registry_are_readable(client, db, settings, tiny_model_dir, api_headers):
    _ready(db, settings, tiny_model_dir)
    policies = client.get("/api/policies", headers=api_headers("researcher"))
    assert policies.status_code == 200
    assert policies.json()[0]["version"] == 0 and policies.json()[0]["live"] is True
    assert client.get("/api/rounds/999", headers=api_headers("admin")).status_code == 404
