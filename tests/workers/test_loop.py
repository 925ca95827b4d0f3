"""The closed loop with real parts: a web server, a Celery worker on Redis, Postgres, a tiny model.

A round started through the API ends with a new live version; the web process hot-loads it while a
client hammers the task API and the playground without seeing an error; the annotation pool refills
with responses of the new version; a candidate that fails the gate is not promoted; roll back
restores the previous version everywhere.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from app.data.models import Policy, Response, Round, Run
from app.services.registry import init_base_policy, live_policy
from app.web.server_thread import WebServerThread
from tests.world import World, marker_preferences

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]

# Small enough for seconds on a CPU; the gate is opened wide so a tiny random model can pass it.
QUICK_ROUND = {
    "algorithm": "dpo",
    "reward": {"epochs": 1, "max_pairs_per_batch": 4, "max_length": 64, "learning_rate": 1e-3},
    "policy": {"epochs": 1, "batch_size": 4, "max_length": 64, "learning_rate": 1e-4},
    "gate": {
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


def _wait_round(client: httpx.Client, round_id: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/rounds/{round_id}").json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.5)
    raise AssertionError(f"round {round_id} did not finish: {body}")


def _wait_served(base: str, version: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/healthz", timeout=5).json().get("served_policy_version") == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"the web process never served v{version}")


class Hammer:
    """Clients that keep calling the task API and the playground and count every status code."""

    def __init__(self, base: str, annotator_headers: dict, admin_headers: dict):
        self.base, self.annotator, self.admin = base, annotator_headers, admin_headers
        self.statuses: Counter = Counter()
        self.versions: Counter = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._tasks), threading.Thread(target=self._playground)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _tasks(self) -> None:
        with httpx.Client(base_url=self.base, headers=self.annotator, timeout=30) as client:
            while not self._stop.is_set():
                response = client.get("/api/tasks/next")
                self.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    self.errors.append(f"tasks/next {response.status_code}: {response.text[:200]}")
                time.sleep(0.05)

    def _playground(self) -> None:
        with httpx.Client(base_url=self.base, headers=self.admin, timeout=60) as client:
            while not self._stop.is_set():
                response = client.post(
                    "/admin/playground/stream", json={"prompt": "Say hello.", "max_new_tokens": 8}
                )
                self.statuses[response.status_code] += 1
                self.versions[response.headers.get("X-Policy-Version")] += 1
                if response.status_code >= 500:
                    self.errors.append(f"playground {response.status_code}: {response.text[:200]}")
                time.sleep(0.2)  # leave the CPU to the worker's training


def test_a_round_goes_live_without_errors_and_rollback_restores(
    settings, db, tiny_model_dir, celery_worker, api_headers, monkeypatch
):
    from app.config import get_settings, reset_settings

    monkeypatch.setenv("PREFLOOP_SERVE_POLICY", "true")
    monkeypatch.setenv("PREFLOOP_RESPONSES_PER_TASK", "2")
    monkeypatch.setenv("PREFLOOP_REFILL_PROMPTS", "4")
    monkeypatch.setenv("PREFLOOP_REFILL_MAX_NEW_TOKENS", "16")
    reset_settings()
    base_policy, _ = init_base_policy(db, base_model=tiny_model_dir, settings=get_settings())
    marker_preferences(World(db), n_prompts=12, eval_prompts=3)
    celery_worker("gpu,default")  # inherits the PREFLOOP_* settings above
    admin = api_headers("admin")
    annotator = api_headers("annotator")

    with WebServerThread() as server:
        _wait_served(server.url, 0)
        client = httpx.Client(base_url=server.url, headers=admin, timeout=30)
        with Hammer(server.url, annotator, admin) as hammer:
            started = client.post("/api/rounds", json=QUICK_ROUND)
            assert started.status_code == 201, started.text
            round_ = _wait_round(client, started.json()["id"])
            assert round_["status"] == "succeeded", round_
            assert [r["kind"] for r in round_["runs"]] == ["reward", "judge", "dpo", "evaluate"]
            db.expire_all()
            new = live_policy(db)
            assert new.version == 1 and new.kind == "dpo" and new.parent_id == base_policy.id
            _wait_served(server.url, 1)
            time.sleep(1.0)  # a few more requests on the new version
        assert hammer.errors == []
        assert {"0", "1"} <= set(hammer.versions), hammer.versions
        assert hammer.statuses[200] > 0

        # The pool refills with responses of the new version, and annotators get those tasks.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            db.expire_all()
            generated = db.scalar(select(Run).where(Run.kind == "generate").order_by(Run.id.desc()))
            if generated is not None and generated.status not in ("queued", "running"):
                break
            time.sleep(0.5)
        assert generated is not None and generated.status == "succeeded", generated and generated.error
        assert db.scalar(select(Response.id).where(Response.policy_id == new.id)) is not None
        page = httpx.get(f"{server.url}/healthz").json()
        assert page["live_policy_version"] == 1

        # A candidate that fails the gate is not promoted.
        failing = QUICK_ROUND | {"gate": {"min_win_rate": 1.01}}
        second = client.post("/api/rounds", json=failing)
        assert second.status_code == 201, second.text
        ended = _wait_round(client, second.json()["id"])
        assert ended["status"] == "failed" and "gate" in ended["error"]
        db.expire_all()
        assert live_policy(db).version == 1
        rejected = db.scalar(select(Policy).where(Policy.round_id == ended["id"]))
        assert rejected.status == "rejected"
        assert client.post(f"/api/policies/{rejected.version}/promote").status_code == 409

        # Roll back: the alias, the web process and the playground all return to v0.
        back = client.post("/api/policies/rollback")
        assert back.status_code == 200 and back.json()["version"] == 0
        _wait_served(server.url, 0)
        answer = client.post("/admin/playground/stream", json={"prompt": "Hi", "max_new_tokens": 4})
        assert answer.headers["X-Policy-Version"] == "0"
        db.expire_all()
        assert db.get(Round, ended["id"]).active is None
