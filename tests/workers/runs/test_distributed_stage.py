"""Training stages on two real processes (torchrun, gloo on CPU) through the run lifecycle: a reward
stage's events relayed to run_metrics and one registration, cancel reaching every rank, a rank killed
mid-run failing its attempt while the retry resumes from the last checkpoint, and a DPO stage
registering one candidate."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select

from app.config import reset_settings
from app.data.db import session_factory
from app.data.models import Comparison, RewardModel, Run, RunMetric
from app.services.registry import init_base_policy
from app.services.runs import create_run, request_cancel
from tests.world import World, marker_preferences
from workers.runs.training import execute_reward_run

# Small and quick, but enough steps that a cancel or a kill lands mid-run; a checkpoint every step
# so a retry has one to resume from.
FAST = {
    "epochs": 3,
    "max_pairs_per_batch": 2,
    "learning_rate": 3e-3,
    "eval_fraction": 0.25,
    "checkpoint_every": 1,
    "log_every": 1,
    "max_length": 64,
}
TWO = {"per_host": 2}

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def two_process_host(settings, monkeypatch):
    """A worker whose host offers two training processes, and a short grace after a cancel."""
    monkeypatch.setenv("PREFLOOP_TRAIN_PROCESSES_PER_HOST", "2")
    monkeypatch.setenv("PREFLOOP_TRAIN_CANCEL_GRACE_SECONDS", "30")
    monkeypatch.setenv("PREFLOOP_RUN_HEARTBEAT_SECONDS", "1")
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def comparisons(settings, db, tiny_model_dir) -> int:
    init_base_policy(db, base_model=tiny_model_dir, settings=settings)
    marker_preferences(World(db), n_prompts=12)
    return db.scalar(select(func.max(Comparison.id)))


def _reward_run(db, snapshot: int, processes: dict | None, **changes) -> int:
    config = {"comparison_snapshot": snapshot, "reward": FAST | changes}
    if processes is not None:
        config["processes"] = processes
    run = create_run(db, "reward", config)
    db.commit()
    return run.id


def _attempt(settings, run_id: int, attempt: int) -> Path:
    return settings.runs_dir / str(run_id) / "launch" / f"attempt-{attempt}"


def _rank_pids(folder: Path) -> dict[int, int]:
    pids = {}
    for path in (folder / "ranks").glob("*.pid"):
        try:
            pids[int(path.stem)] = json.loads(path.read_text())["pid"]
        except (ValueError, OSError):
            continue
    return pids


def _events(folder: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _training_processes(settings) -> list[psutil.Process]:
    """torchrun and the ranks of this test's stages still alive (their command lines name a job under
    its data dir)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "workers.training.launch" in cmdline and str(settings.runs_dir) in " ".join(cmdline):
            found.append(process)
    return found


def _in_background(run_id: int, engine) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def work() -> None:
        outcome["status"] = execute_reward_run(run_id, session_factory(engine))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, outcome


def test_a_two_process_reward_run_reports_and_registers_once(
    settings, engine, db, comparisons, two_process_host
):
    run_id = _reward_run(db, comparisons, TWO)
    assert execute_reward_run(run_id, session_factory(engine)) == "succeeded"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.status == "succeeded" and run.attempts == 1 and run.progress == 1.0, run.error
    # Rank 0's events reached run_metrics through the worker, one row per step and name.
    names = set(db.scalars(select(RunMetric.name).where(RunMetric.run_id == run_id)))
    assert {"train_loss", "val_accuracy"} <= names
    last_step = db.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == run_id))
    assert last_step == run.result["steps"]
    # One reward model, registered by the worker from rank 0's result.
    models = db.scalars(select(RewardModel).where(RewardModel.run_id == run_id)).all()
    assert len(models) == 1 and models[0].id == run.result["reward_model_id"]
    assert (Path(models[0].path) / "reward_stats.json").exists()
    # Nothing of the attempt is left: no processes, no launch folder, no checkpoints.
    assert not (settings.runs_dir / str(run_id) / "launch").exists()
    assert not (settings.runs_dir / str(run_id) / "checkpoints").exists()
    assert _training_processes(settings) == []

    # The same stage in one process (inside the worker) trains the same number of steps.
    single = _reward_run(db, comparisons, None)
    assert execute_reward_run(single, session_factory(engine)) == "succeeded"
    db.expire_all()
    assert db.get(Run, single).result["steps"] == run.result["steps"]


def test_a_host_asked_for_more_processes_than_it_has_fails_the_run_saying_what_it_has(
    settings, engine, db, comparisons, two_process_host
):
    run_id = _reward_run(db, comparisons, {"per_host": 3})
    assert execute_reward_run(run_id, session_factory(engine)) == "failed"
    db.expire_all()
    error = db.get(Run, run_id).error
    assert "processes.per_host is 3 but this worker's host offers 2 training processes" in error
    bad = _reward_run(db, comparisons, {"per_host": 0})
    assert execute_reward_run(bad, session_factory(engine)) == "failed"
    db.expire_all()
    assert "processes.per_host: must be a whole number of at least 1" in db.get(Run, bad).error


def test_cancel_stops_every_rank_and_the_run_ends_cancelled(
    settings, engine, db, comparisons, two_process_host
):
    run_id = _reward_run(db, comparisons, TWO, epochs=40, checkpoint_every=1000)
    thread, outcome = _in_background(run_id, engine)
    attempt = _attempt(settings, run_id, 1)
    _wait_for(lambda: (attempt / "events.jsonl").exists(), 120, "the first step of rank 0")
    pids = _rank_pids(attempt)
    assert sorted(pids) == [0, 1]
    assert request_cancel(db, run_id)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert outcome["status"] == "cancelled"
    db.expire_all()
    run = db.get(Run, run_id)
    assert run.status == "cancelled" and run.attempts == 1
    # Both ranks stopped at the flag (a clean exit, no kill needed) and none is left running.
    assert json.loads((attempt / "result.json").read_text())["cancelled"]
    assert not any(psutil.pid_exists(pid) and _is_rank(pid) for pid in pids.values())
    assert _training_processes(settings) == []


def _is_rank(pid: int) -> bool:
    try:
        return "workers.training.launch" in psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def test_a_killed_rank_fails_the_attempt_and_the_retry_resumes_from_the_last_checkpoint(
    settings, engine, db, comparisons, two_process_host, caplog
):
    run_id = _reward_run(db, comparisons, TWO, epochs=5)
    thread, outcome = _in_background(run_id, engine)
    first, second = _attempt(settings, run_id, 1), _attempt(settings, run_id, 2)
    checkpoints = settings.runs_dir / str(run_id) / "checkpoints"
    _wait_for(lambda: any(checkpoints.glob("step-*")), 120, "the first checkpoint")
    killed = _rank_pids(first)[1]
    os.kill(killed, signal.SIGKILL)
    _wait_for(lambda: (second / "job.json").exists() or not thread.is_alive(), 120, "the second attempt")
    first_events = _events(first)  # read before the successful attempt removes every attempt's folder

    # The second attempt resumes: its rank 0 reports a first step past the first one.
    seen: list[dict] = []

    def second_attempt_reported() -> bool:
        try:
            lines = (second / "events.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return not thread.is_alive()
        seen[:] = [json.loads(line) for line in lines if line.strip()]
        return any(e["event"] == "progress" for e in seen)

    _wait_for(second_attempt_reported, 120, "the second attempt's first step")
    thread.join(timeout=180)
    assert not thread.is_alive()
    db.expire_all()
    run = db.get(Run, run_id)
    assert outcome["status"] == "succeeded" and run.status == "succeeded", run.error
    assert run.attempts == 2
    # The failed attempt is named by its rank and how it died.
    assert "training rank 1 of 2 failed (killed by SIGKILL)" in caplog.text
    assert seen, "the second attempt finished before its events could be read"
    first_progress = next(e["done"] for e in seen if e["event"] == "progress")
    assert first_progress > 1, "the retry started from the beginning instead of the last checkpoint"
    assert db.scalar(select(func.count()).select_from(RewardModel).where(RewardModel.run_id == run_id)) == 1
    assert not psutil.pid_exists(killed) or not _is_rank(killed)
    assert _training_processes(settings) == []

    # It ends at the step the first attempt planned, with every step's metrics recorded once.
    planned = {e["total"] for e in first_events if e["event"] == "progress"}
    assert planned == {run.result["steps"]}
    last_step = db.scalar(select(func.max(RunMetric.step)).where(RunMetric.run_id == run_id))
    assert last_step == run.result["steps"]


def test_a_dpo_stage_on_two_processes_registers_one_candidate(
    settings, engine, db, comparisons, two_process_host
):
    from app.data.models import Policy
    from workers.runs.training import execute_policy_run

    dpo = {"epochs": 1, "batch_size": 2, "max_length": 64, "learning_rate": 1e-4, "checkpoint_every": 2}
    run = create_run(
        db,
        "dpo",
        {"algorithm": "dpo", "comparison_snapshot": comparisons, "policy": dpo, "processes": TWO},
    )
    db.commit()
    assert execute_policy_run(run.id, session_factory(engine)) == "succeeded"
    db.expire_all()
    run = db.get(Run, run.id)
    assert run.status == "succeeded" and run.attempts == 1, run.error
    candidates = db.scalars(select(Policy).where(Policy.source == f"run:{run.id}")).all()
    assert len(candidates) == 1 and candidates[0].version == run.result["policy_version"]
    assert run.result["steps"] >= 1
    assert db.scalar(select(func.count()).select_from(RunMetric).where(RunMetric.run_id == run.id)) > 0
    assert _training_processes(settings) == []


def test_no_training_process_outlives_the_worker_that_started_it(settings, db, comparisons, two_process_host):
    """A worker killed outright (OOM killer, power to its container) takes its stage's torchrun and
    ranks with it, so the run taken over later never shares its checkpoints with orphans."""
    import subprocess
    import sys

    run_id = _reward_run(db, comparisons, TWO, epochs=40, checkpoint_every=1000)
    code = f"from workers.runs.training import execute_reward_run; execute_reward_run({run_id})"
    worker = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), start_new_session=True)
    try:
        attempt = _attempt(settings, run_id, 1)
        _wait_for(lambda: (attempt / "events.jsonl").exists(), 120, "the first step of rank 0")
        assert len(_training_processes(settings)) == 3  # torchrun and its two ranks
        worker.kill()
        worker.wait(timeout=30)
        _wait_for(lambda: _training_processes(settings) == [], 60, "the ranks to end with their worker")
    finally:
        if worker.poll() is None:
            worker.kill()
