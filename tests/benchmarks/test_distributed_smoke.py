"""benchmarks/distributed.py end to end on the tiny model: each trainer on one and on two gloo ranks,
rank 0's rate, each rank's peak memory, the scaling ratio and the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_smoke_run_measures_every_stage_on_one_and_two_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "distributed.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "distributed.py"),
        "--model",
        str(tiny_model_dir),
        "--steps",
        "1",
        "--response-tokens",
        "8",
        "--threads",
        "2",
        "--timeout",
        "400",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["stages"]) == {"rm", "dpo", "ppo"}
    for stage, runs in report["stages"].items():
        assert [r["processes"] for r in runs] == [1, 2], stage
        for run in runs:
            assert run["error"] is None, (stage, run.get("detail"))
            assert run["rate"] > 0 and run["measured_seconds"] > 0
            assert run["unit"] == ("response tokens/s" if stage == "ppo" else "pairs/s")
            assert len(run["peak_rss_gb_per_process"]) == run["processes"]
            assert all(0 < gb < 16 for gb in run["peak_rss_gb_per_process"])
            assert run["threads_per_process"] == 2 // run["processes"]
        assert runs[0]["scaling"] == 1.0 and runs[1]["scaling"] > 0
    assert "scaling" in done.stdout and "peak RSS" in done.stdout
