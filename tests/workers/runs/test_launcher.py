"""The launcher's decisions without starting processes: what a spec asks of this host, the command
for one host and for several, and how torchrun's failure summary names the rank that died."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import Settings
from workers.runs.launcher import ProcessPlan, StageProcesses, _root_cause, plan_processes
from workers.training.reward import RewardConfig
from workers.training.stage import StageJob

KILLED = """\
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_16:38:10
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 8565)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 8565
============================================================
"""

RAISED = """\
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 8564)  (SIGTERM)
  traceback : RuntimeError: Connection reset by peer
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 8679)
  error_file: /tmp/torchelastic_gi3g1625/t1_tz0vunbd/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "r.py", line 11, in main
      raise ValueError("boom in rank one")
  ValueError: boom in rank one

============================================================
"""


def test_torchruns_summary_names_the_first_rank_that_failed_and_its_last_line():
    assert _root_cause(KILLED) == (1, -9, "Signal 9 (SIGKILL) received by PID 8565")
    assert _root_cause(RAISED) == (1, 1, "ValueError: boom in rank one")
    assert _root_cause("no summary at all") == (None, None, "")


def test_auto_takes_what_the_host_offers_and_more_is_refused():
    host = Settings(train_processes_per_host=4)
    assert plan_processes({}, host) == ProcessPlan(per_host=1, hosts=1)
    auto = plan_processes({"processes": {"per_host": "auto"}}, host)
    assert auto == ProcessPlan(per_host=4, hosts=1) and auto.world_size == 4
    with pytest.raises(ValueError, match="processes.per_host is 8 but this worker's host offers 4"):
        plan_processes({"processes": {"per_host": 8}}, host)
    with pytest.raises(ValueError, match="processes.hosts: Input should be greater than or equal to 1"):
        plan_processes({"processes": {"hosts": 0}}, host)
    # A CPU-only worker offers one process unless told otherwise.
    assert Settings(device="cpu").training_processes_per_host() == 1


def test_several_hosts_need_a_launcher_prefix_and_a_meeting_point(tmp_path: Path):
    asked = {"processes": {"per_host": 2, "hosts": 2}}
    with pytest.raises(ValueError, match="set PREFLOOP_TRAIN_LAUNCHER_PREFIX"):
        plan_processes(asked, Settings(train_processes_per_host=2))
    cluster = Settings(
        train_processes_per_host=2,
        train_launcher_prefix="srun --nodes=2 --ntasks-per-node=1",
        train_rdzv_endpoint="node-a:29500",
    )
    plan = plan_processes(asked, cluster)
    job = StageJob("reward", "base", "out", "checkpoints", RewardConfig())
    command = StageProcesses(job, plan, tmp_path, run_id=7, attempt=2, settings=cluster).command()
    assert command[:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]
    joined = " ".join(command)
    assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 2" in joined
    assert "--rdzv-endpoint node-a:29500 --rdzv-id run-7-2 --max-restarts 0" in joined
    assert joined.endswith(f"-m workers.training.launch {tmp_path}/launch/attempt-2/job.json")


def test_a_job_reads_back_from_json_as_it_was_written():
    from workers.training.data import Comparison

    job = StageJob(
        "reward",
        "base",
        "out",
        "checkpoints",
        RewardConfig(epochs=3, lora=None),
        comparisons=[Comparison(1, 2, 3, [{"role": "user", "content": "hi"}], "a", "b", 1.0)],
    )
    assert StageJob.from_json(json.loads(json.dumps(job.to_json()))) == job
