"""`python -m workers.training.launch JOB.json`: one rank of a training stage, as torchrun starts it.

Every rank joins the process group from torchrun's variables, reads the same StageJob and calls the
same `run_stage` the worker calls for a single-process stage. Rank 0 reports to the events file and
writes the result; every rank stops together when the cancel flag appears (see stage_files.py for
the folder). A rank that fails writes its exception beside its pid, and `record` leaves torchrun's
own error file, whose summary names the first rank that failed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from app.common.reporting import RunCancelled
from workers.training.distributed import join_from_environment, leave
from workers.training.stage import StageJob, run_stage
from workers.training.stage_files import EventFileReporter, StageFiles, write_json_atomically


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so a rank never outlives the torchrun
    agent that started it (or the agent the worker that started it): orphaned ranks would keep
    writing checkpoints a retry is reading. Elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


@record
def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.training.launch JOB.json", file=sys.stderr)
        return 2
    die_with_parent()
    job_path = Path(args[0])
    files = StageFiles(job_path.parent)
    group = join_from_environment()
    files.write_pid(group.rank)
    try:
        job = StageJob.from_json(json.loads(job_path.read_text()))
        reporter = group.reporter(EventFileReporter(files))
        try:
            summary = run_stage(job, reporter)
        except RunCancelled as exc:
            summary = {"cancelled": str(exc) or "cancelled on request"}
        if group.is_main:
            write_json_atomically(files.result, summary)
    except BaseException as exc:
        files.write_error(group.rank, exc)
        raise
    leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
