"""The admin console: pages, polling fragments that stop with 286, metric charts, cancel, registry actions."""

from __future__ import annotations

import shutil
import uuid

import pytest
from sqlalchemy import select

from app.data.models import (
    Annotation,
    Comparison,
    Policy,
    PolicyAlias,
    Prompt,
    PromptSet,
    Response,
    Round,
    Run,
    RunMetric,
    Task,
)
from app.services.queue_status import queue_depths
from app.services.round_spec import RoundSpec, setting_fields
from app.web.admin_pages import flat_metrics
from app.web.metric_charts import chart_group, chart_layout, metric_label

XSS = "<script>alert('x')</script>"
HX = {"HX-Request": "true"}


@pytest.fixture
def admin(login):
    return login("admin")


def seed_round(db, *, status="running", run_status="running", progress=0.4) -> tuple[Round, Run]:
    round_ = Round(
        algorithm="ppo",
        status=status,
        stage="ppo",
        active=True if status in ("queued", "running") else None,
        config={"auto_promote": True, "policy": {"steps": 5}},
    )
    db.add(round_)
    db.flush()
    run = Run(
        kind="ppo",
        round_id=round_.id,
        status=run_status,
        progress=progress,
        progress_message="reward 0.120 kl 0.01",
    )
    db.add(run)
    db.commit()
    return round_, run


def seed_comparison(db, user) -> Comparison:
    prompt_set = PromptSet(name=f"set-{uuid.uuid4().hex[:6]}")
    db.add(prompt_set)
    db.flush()
    prompt = Prompt(
        prompt_set_id=prompt_set.id,
        content_hash=uuid.uuid4().hex,
        messages=[{"role": "user", "content": "Hi"}],
        text="Hi",
    )
    db.add(prompt)
    db.flush()
    first, second = (
        Response(prompt_id=prompt.id, text="Hello!"),
        Response(prompt_id=prompt.id, text="Go away."),
    )
    task = Task(prompt_id=prompt.id, required_annotations=2, annotation_count=1, claimed_count=1)
    db.add_all([first, second, task])
    db.flush()
    annotation = Annotation(
        task_id=task.id, user_id=user.id, ranking=[[first.id], [second.id]], payload_hash="x" * 64
    )
    db.add(annotation)
    db.flush()
    comparison = Comparison(
        annotation_id=annotation.id,
        prompt_id=prompt.id,
        chosen_response_id=first.id,
        rejected_response_id=second.id,
    )
    db.add(comparison)
    db.commit()
    return comparison


def publish_two_versions(db, settings, tiny_model_dir) -> tuple[Policy, Policy]:
    from app.services.registry import init_base_policy, publish_policy

    base, _ = init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    candidate = publish_policy(
        db,
        lambda d: shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True),
        kind="ppo",
        parent=base,
        status="candidate",
        metrics={"reward_raw": 0.25, "evaluation": {"win_rate": 0.6}},
        settings=settings,
    )
    return base, candidate


# ---------------------------------------------------------------- pages


def test_pages_render_for_admins_with_seeded_rows(client, admin, db, settings, tiny_model_dir):
    base, candidate = publish_two_versions(db, settings, tiny_model_dir)
    round_, run = seed_round(db)
    db.add(RunMetric(run_id=run.id, step=1, name="reward_raw", value=0.1))
    db.commit()
    pages = {
        "/admin": ["Live version", "v0", f"#{round_.id}", f"#{run.id}", "Start round"],
        "/admin/rounds": [f"#{round_.id}", "Start a round", "PPO"],
        f"/admin/rounds/{round_.id}": [f"Round #{round_.id}", "Cancel round", "ppo · run #"],
        "/admin/runs": [f"#{run.id}", "reward 0.120 kl 0.01"],
        f"/admin/runs/{run.id}": [f"Run #{run.id}", "Cancel run", f"/admin/runs/{run.id}/metrics.json"],
        "/admin/policies": ["v0", "v1", "Promote", "candidate"],
        f"/admin/policies/{candidate.version}": ["Policy v1", "v0", "reward_raw", "evaluation.win_rate"],
        "/admin/playground": ["Playground", "playground-form"],
    }
    for path, expected in pages.items():
        response = client.get(path)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
        assert response.headers["vary"] == "HX-Request"
        for text in expected:
            assert text in response.text, f"{path} lacks {text!r}"


def test_non_admins_get_403_pages(client, login):
    login("annotator")
    response = client.get("/admin", headers={"Accept": "text/html"})
    assert response.status_code == 403
    assert "admin role" in response.text


def test_missing_rows_are_404(client, admin):
    for path in (
        "/admin/rounds/999",
        "/admin/runs/999",
        "/admin/policies/999",
        "/admin/runs/999/metrics.json",
    ):
        assert client.get(path).status_code == 404, path


# ---------------------------------------------------------------- polling fragments


def test_run_fragment_polls_while_running_and_stops_with_286(client, admin, db):
    _, run = seed_round(db, progress=0.25)
    fragment = client.get(f"/admin/runs/{run.id}", headers=HX)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text  # only the block, not the page
    assert f'hx-get="/admin/runs/{run.id}"' in fragment.text and "every 2s" in fragment.text
    assert 'aria-valuenow="25"' in fragment.text

    run.status, run.progress = "succeeded", 1.0
    db.commit()
    done = client.get(f"/admin/runs/{run.id}", headers=HX)
    assert done.status_code == 286
    assert "hx-get" not in done.text and "succeeded" in done.text
    assert client.get(f"/admin/runs/{run.id}").status_code == 200  # the full page is a normal 200


def test_round_fragment_stops_when_the_round_ended(client, admin, db):
    round_, run = seed_round(db)
    running = client.get(f"/admin/rounds/{round_.id}", headers=HX)
    assert running.status_code == 200 and f'hx-get="/admin/rounds/{round_.id}"' in running.text
    assert f"run #{run.id}" in running.text

    round_.status, round_.active, round_.error = "failed", None, f"ppo run {run.id} failed: {XSS}"
    db.commit()
    ended = client.get(f"/admin/rounds/{round_.id}", headers=HX)
    assert ended.status_code == 286
    assert "hx-get" not in ended.text
    assert XSS not in ended.text and "&lt;script&gt;" in ended.text


def test_dashboard_live_panel_fragment(client, admin, db, settings, tiny_model_dir):
    publish_two_versions(db, settings, tiny_model_dir)
    fragment = client.get("/admin", headers=HX)
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'id="live-panel"' in fragment.text
    assert "v0" in fragment.text


# ---------------------------------------------------------------- metrics


def test_metrics_json_has_every_series_grouped_for_charts(client, admin, db):
    _, run = seed_round(db)
    rows = {
        ("reward_raw", 1): 0.1,
        ("reward_raw", 2): 0.3,
        ("kl_ref", 1): 0.01,
        ("kl_ref", 2): 0.02,
        ("response_length", 2): 41.0,
        ("loss_policy", 1): 1.5,
        ("value_loss", 1): 0.7,
        ("val_accuracy", 2): 0.65,
        ("entropy", 1): float("inf"),
    }
    # Inserted out of step order: the endpoint must sort by step.
    for (name, step), value in sorted(rows.items(), key=lambda kv: -kv[0][1]):
        db.add(RunMetric(run_id=run.id, step=step, name=name, value=value))
    db.commit()

    body = client.get(f"/admin/runs/{run.id}/metrics.json").json()
    assert body["finished"] is False and body["status"] == "running"
    assert body["series"]["reward_raw"] == [[1, 0.1], [2, 0.3]]
    assert body["series"]["kl_ref"] == [[1, 0.01], [2, 0.02]]
    assert body["series"]["entropy"] == [[1, None]]  # inf and NaN are not JSON: a gap
    charts = {c["title"]: sorted(c["names"]) for c in body["charts"]}
    assert charts == {
        "Losses": ["loss_policy", "value_loss"],
        "Accuracy": ["val_accuracy"],
        "KL": ["kl_ref"],
        "Length": ["response_length"],
        "Reward": ["reward_raw"],
        "entropy": ["entropy"],
    }
    assert [c["title"] for c in body["charts"]][:5] == ["Reward", "KL", "Length", "Accuracy", "Losses"]
    assert body["labels"]["kl_ref"] == "KL to the reference"


def test_chart_groups_and_flat_metrics():
    assert chart_group("reward/normalised") == "Reward"
    assert chart_group("rm_loss") == "Losses"
    assert chart_group("eval_acc") == "Accuracy"
    assert chart_group("kl_ref_per_token") == "KL"
    assert chart_group("clipfrac") == "clipfrac"
    rows = flat_metrics({"b": 0.123456, "a": {"win": 3}, "ok": True, "skip": [1, 2]})
    assert rows == [("a.win", "3"), ("b", "0.1235"), ("ok", "True")]


# ---------------------------------------------------------------- cancel


def test_cancel_marks_the_run(client, admin, db):
    _, running = seed_round(db)
    queued = Run(kind="reward", status="queued")
    db.add(queued)
    db.commit()

    response = client.post(f"/admin/runs/{running.id}/cancel", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/admin/runs/{running.id}"
    response = client.post(f"/admin/runs/{queued.id}/cancel", follow_redirects=False)
    assert response.status_code == 303
    db.expire_all()
    assert db.get(Run, running.id).cancel_requested and db.get(Run, running.id).status == "running"
    assert db.get(Run, queued.id).status == "cancelled"
    assert "cancelling" in client.get(f"/admin/runs/{running.id}").text

    again = client.post(f"/admin/runs/{queued.id}/cancel", headers={"Accept": "text/html"})
    assert again.status_code == 409 and "already ended" in again.text


def test_cancel_without_csrf_token_is_refused(client, admin, db):
    _, run = seed_round(db)
    response = client.post(f"/admin/runs/{run.id}/cancel", headers={"X-CSRF-Token": ""})
    assert response.status_code == 403
    db.expire_all()
    assert not db.get(Run, run.id).cancel_requested


def test_cancel_round_frees_the_slot(client, admin, db):
    round_, run = seed_round(db)
    response = client.post(f"/admin/rounds/{round_.id}/cancel", follow_redirects=False)
    assert response.status_code == 303
    db.expire_all()
    assert db.get(Round, round_.id).status == "cancelled" and db.get(Round, round_.id).active is None
    assert db.get(Run, run.id).cancel_requested


# ---------------------------------------------------------------- registry


def test_promote_and_roll_back_move_the_live_alias(client, admin, db, settings, tiny_model_dir):
    base, candidate = publish_two_versions(db, settings, tiny_model_dir)

    response = client.post(f"/admin/policies/{candidate.version}/promote", follow_redirects=False)
    assert response.status_code == 303
    db.expire_all()
    alias = db.get(PolicyAlias, "live")
    assert (alias.policy_id, alias.previous_policy_id) == (candidate.id, base.id)
    page = client.get(response.headers["location"])
    assert "v1 is now live" in page.text and "Roll back to v0" in page.text

    response = client.post("/admin/policies/rollback", follow_redirects=False)
    assert response.status_code == 303
    db.expire_all()
    assert db.get(PolicyAlias, "live").policy_id == base.id
    assert "v0 is live again" in client.get(response.headers["location"]).text


def test_rollback_refills_the_pool_with_the_version_live_again(client, admin, db, settings, tiny_model_dir):
    import json

    from app.services.prompt_sets import create_prompt_set

    base, candidate = publish_two_versions(db, settings, tiny_model_dir)
    data = "\n".join(json.dumps({"prompt": f"question {i}?"}) for i in range(4)).encode()
    create_prompt_set(db, name="pool", data=data, filename="pool.jsonl", eval_fraction=0.0)
    assert client.post(f"/admin/policies/{candidate.version}/promote").status_code == 200
    assert client.post("/admin/policies/rollback").status_code == 200
    db.expire_all()
    refills = db.scalars(select(Run).where(Run.kind == "generate").order_by(Run.id)).all()
    assert [r.config["policy_version"] for r in refills] == [candidate.version, base.version]
    assert refills[-1].config["arena_versions"] == []  # nothing against the version taken down


def test_promoting_a_rejected_version_shows_why(client, admin, db, settings, tiny_model_dir):
    base, candidate = publish_two_versions(db, settings, tiny_model_dir)
    candidate.status = "rejected"
    db.commit()
    response = client.post(f"/admin/policies/{candidate.version}/promote")
    assert response.status_code == 409
    assert "rejected by its evaluation gate" in response.text
    db.expire_all()
    assert db.get(PolicyAlias, "live").policy_id == base.id
    assert client.post("/admin/policies/7/promote").status_code == 404


def test_rollback_without_a_previous_version_is_409(client, admin, db, settings, tiny_model_dir):
    from app.services.registry import init_base_policy

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    response = client.post("/admin/policies/rollback")
    assert response.status_code == 409 and "no previous live version" in response.text


# ---------------------------------------------------------------- untrusted text


def test_samples_and_errors_are_escaped(client, admin, db, settings, tiny_model_dir):
    base, candidate = publish_two_versions(db, settings, tiny_model_dir)
    round_, run = seed_round(db, status="awaiting_approval", run_status="failed")
    run.error = f"ValueError: bad {XSS}\n\nTraceback ..."
    candidate.round_id = round_.id
    evaluation = Run(
        kind="evaluate",
        round_id=round_.id,
        status="succeeded",
        config={"candidate_version": candidate.version, "baseline_version": base.version},
        result={
            "passed": True,
            "samples": [
                {
                    "prompt": f"Say {XSS}",
                    "live": f"live {XSS}",
                    "candidate": f"cand {XSS}",
                    "candidate_reward": 0.5,
                }
            ],
        },
    )
    db.add(evaluation)
    db.commit()
    for path in (
        f"/admin/rounds/{round_.id}",
        f"/admin/policies/{candidate.version}",
        f"/admin/runs/{evaluation.id}",
    ):
        page = client.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text, path
        assert "cand &lt;script&gt;" in page.text and "live &lt;script&gt;" in page.text, path
    round_page = client.get(f"/admin/rounds/{round_.id}").text
    assert "Promote v1" in round_page  # the candidate waits for an admin
    run_page = client.get(f"/admin/runs/{run.id}").text
    assert XSS not in run_page and "bad &lt;script&gt;" in run_page
    assert "Traceback" not in run_page  # a traceback belongs in the log, never on a page


# ---------------------------------------------------------------- starting a round


def test_start_round_form_starts_one_and_enqueues_it(client, admin, db, settings, tiny_model_dir):
    from app.services.registry import init_base_policy

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    seed_comparison(db, admin)
    form = {
        "csrf_token": client.cookies.get("prefloop_csrf"),
        "algorithm": "ppo",
        "policy.steps": "3",
        "policy.learning_rate": "2e-5",
        "policy.kl_coef": "",
        "policy.sampling.max_new_tokens": "48",
        "gate.max_kl": "null",
        "auto_promote": "on",
    }
    response = client.post("/admin/rounds", data=form, follow_redirects=False)
    assert response.status_code == 303, response.text
    round_ = db.scalar(select(Round))
    assert response.headers["location"] == f"/admin/rounds/{round_.id}"
    expected = {
        "policy": {"steps": 3, "learning_rate": 2e-5, "sampling": {"max_new_tokens": 48}},
        "gate": {"max_kl": None},
    }
    assert round_.config == RoundSpec.model_validate({"algorithm": "ppo", **expected}).to_json()
    assert round_.started_by == admin.id and round_.algorithm == "ppo"

    dashboard = client.get("/admin").text
    assert 'id="queue-gpu">1 waiting' in dashboard  # the round's message waits on the gpu queue
    assert 'id="count-active-today">1 ' in dashboard

    second = client.post("/admin/rounds", data=form)
    assert second.status_code == 409
    assert f'href="/admin/rounds/{round_.id}"' in second.text and "still running" in second.text


def test_start_round_form_explains_bad_input(client, admin, db, settings, tiny_model_dir):
    csrf = client.cookies.get("prefloop_csrf")
    bad = client.post("/admin/rounds", data={"csrf_token": csrf, "algorithm": "ppo", "policy.steps": "-2"})
    assert bad.status_code == 422 and "policy.steps: Input should be greater than or equal to 1" in bad.text
    assert 'value="-2"' in bad.text  # what was typed stays in the form
    other = client.post("/admin/rounds", data={"csrf_token": csrf, "algorithm": "dpo", "policy.steps": "3"})
    assert other.status_code == 422 and "policy.steps: Extra inputs are not permitted" in other.text
    wrong = client.post("/admin/rounds", data={"csrf_token": csrf, "algorithm": "sft"})
    assert wrong.status_code == 422 and "algorithm" in wrong.text

    from app.services.registry import init_base_policy

    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    empty = client.post("/admin/rounds", data={"csrf_token": csrf, "algorithm": "dpo"})
    assert empty.status_code == 422 and "no comparisons yet" in empty.text
    assert db.scalar(select(Round)) is None


# ---------------------------------------------------------------- queue depths


def test_queue_depths_on_the_sqlalchemy_broker(settings):
    from kombu import Connection

    assert queue_depths(settings.celery_broker_url) == {"gpu": 0, "default": 0}
    with Connection(settings.celery_broker_url) as conn:
        queue = conn.SimpleQueue("gpu")
        queue.put({"hello": 1})
        queue.put({"hello": 2})
        queue.close()
    assert queue_depths(settings.celery_broker_url) == {"gpu": 2, "default": 0}


def test_queue_depths_on_redis(redis_url):
    import redis

    name = f"prefloop-test-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    try:
        client.rpush(name, "a", "b", "c")
        assert queue_depths(redis_url, queues=(name, "nothing-" + name)) == {name: 3, "nothing-" + name: 0}
    finally:
        client.delete(name)
        client.close()


def test_queue_depths_unknown_when_the_broker_is_down():
    assert queue_depths("redis://127.0.0.1:1/0") == {"gpu": None, "default": None}
    assert queue_depths("amqp://nowhere") == {"gpu": None, "default": None}


def test_dashboard_says_unknown_when_the_broker_is_down(settings, engine, make_user, monkeypatch):
    from fastapi.testclient import TestClient

    from app.config import get_settings, reset_settings
    from app.web.main import create_app

    monkeypatch.setenv("PREFLOOP_BROKER_URL", "redis://127.0.0.1:1/0")
    reset_settings()
    user, password = make_user("admin")
    with TestClient(create_app(get_settings(), engine)) as client:
        client.get("/login")
        csrf = client.cookies.get("prefloop_csrf")
        client.post("/login", data={"username": user.username, "password": password, "csrf_token": csrf})
        page = client.get("/admin")
    assert page.status_code == 200
    assert 'id="queue-gpu"><span class="muted">unknown' in page.text


def test_round_form_has_an_input_for_every_setting_of_the_spec(client, admin):
    for algorithm in ("ppo", "dpo"):
        names = [f.name for f in setting_fields(algorithm)]
        page = client.get("/admin/rounds").text if algorithm == "ppo" else None
        fragment = client.get("/admin/rounds/settings", params={"algorithm": algorithm}, headers=HX).text
        for html in filter(None, (page, fragment)):
            assert all(f'name="{name}"' in html for name in names)
        assert ("policy.beta" in fragment) == (algorithm == "dpo")
    # The defaults show as placeholders, the gate's own sampling length included.
    assert 'name="gate.sampling.max_new_tokens" placeholder="128"' in fragment
    # Switching the algorithm keeps the settings typed so far.
    kept = client.get(
        "/admin/rounds/settings",
        params={"algorithm": "dpo", "reward.epochs": "2", "policy.steps": "9"},
        headers=HX,
    ).text
    assert 'name="reward.epochs" placeholder="1" value="2"' in kept and 'value="9"' not in kept


def test_unrelated_scales_get_their_own_axis_or_panel_and_names_read_as_words():
    steps = [1, 2, 3]
    series = {
        "policy_loss": [[s, 0.02 * s] for s in steps],
        "value_loss": [[s, 0.05 * s] for s in steps],  # same size as policy_loss: same axis
        "rm_loss": [[s, 3.0] for s in steps],  # 60x larger: the second axis
        "ptx_loss": [[s, 900.0] for s in steps],  # a third size: a panel of its own
        "lr": [[s, 1.1e-5] for s in steps],
        "entropy": [[1, None]],
    }
    charts = {c["title"]: c for c in chart_layout(series)}
    losses = charts["Losses"]
    assert losses["axes"] == {"policy_loss": "y", "value_loss": "y", "rm_loss": "y1"}
    assert charts["Losses: ptx_loss"]["names"] == ["ptx_loss"]
    assert charts["lr"]["label"] == "Learning rate" and charts["entropy"]["axes"] == {"entropy": "y"}
    assert metric_label("kl_ref") == "KL to the reference"
    assert metric_label("val_accuracy") == "Validation accuracy"
    assert metric_label("value_loss") == "Value loss"
