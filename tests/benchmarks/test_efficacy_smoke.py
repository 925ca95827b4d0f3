"""The efficacy benchmark end to end on the tiny model: a real `prefloop serve` with its worker, a
simulated annotator ranking through the API, one round, and the candidate measured against v0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_smoke_run_ranks_through_the_api_runs_a_round_and_measures_the_candidate(tiny_model_dir, tmp_path):
    out = tmp_path / "efficacy.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "efficacy.py"),
        "--smoke",
        "--base-model",
        str(tiny_model_dir),
        "--standards",
        "concise",
        "--eval-prompts",
        "6",
        "--samples-per-prompt",
        "2",
        "--workdir",
        str(tmp_path / "legs"),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    (leg,) = json.loads(out.read_text())["legs"]
    assert leg["error"] is None, leg["error"]
    (round_,) = leg["rounds"]
    assert round_["rankings"] == 8 and round_["candidate_version"] == 1
    # Four held-out prompts can never clear the gate's lower bound: the round fails, saying why.
    assert round_["status"] == "failed" and "rejected by the gate" in round_["error"]
    assert round_["gate"]["prompts"] == 4 and round_["gate"]["win_rate_low"] < 0.5
    measured = round_["annotator"]
    assert (measured["prompts"], measured["samples_per_prompt"]) == (6, 2)
    assert 0 <= measured["win_rate_low"] <= measured["win_rate"] <= measured["win_rate_high"] <= 1
    assert measured["kl_to_base"] >= 0 and measured["candidate_length"] > 0
    assert leg["annotator_noise"]["pairs"] == 8 * 6  # eight tasks of four answers: six pairs each
    assert "annotator win" in done.stdout and "ranked 8 tasks" in done.stdout


def _serve_processes(marker: str) -> list[int]:
    """Pids of `prefloop serve` processes and their Celery workers whose environment names `marker`'s folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ and (b"app.cli" in cmdline or b"celery" in cmdline):
            found.append(int(entry.name))
    return found


def test_stopping_the_benchmark_stops_its_stack(tiny_model_dir, tmp_path):
    import signal
    import time

    legs = tmp_path / "legs"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "efficacy.py"),
        "--smoke",
        "--base-model",
        str(tiny_model_dir),
        "--standards",
        "concise",
        "--workdir",
        str(legs),
        "--out",
        str(tmp_path / "efficacy.json"),
    ]
    bench = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not _serve_processes(str(legs)) and time.monotonic() < deadline:
            assert bench.poll() is None, "the benchmark ended before its stack started"
            time.sleep(0.5)
        assert _serve_processes(str(legs)), "the stack never started"
        # To the benchmark and its leg at once, as `pkill -f efficacy.py` or a terminal's Ctrl-C does: the
        # leg then gets a second request from its parent while it stops the stack.
        os.killpg(bench.pid, signal.SIGTERM)
        bench.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _serve_processes(str(legs)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _serve_processes(str(legs)) == []
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _serve_processes(str(legs)):
            os.kill(pid, signal.SIGKILL)
