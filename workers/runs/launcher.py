"""A training stage on several processes: the worker starts torchrun, relays, cancels, diagnoses.

A run row's `processes` section (the round spec's) says how many processes per host, on how many
hosts; the worker's settings say what its host offers. One process
trains inside the worker (`run_stage` directly). More: the worker writes the StageJob into a fresh
attempt folder under the run's folder and starts

    [PREFLOOP_TRAIN_LAUNCHER_PREFIX] python -m torch.distributed.run --nnodes H --nproc-per-node P
        --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id run-<id>-<attempt> --max-restarts 0
        -m workers.training.launch <attempt folder>/job.json

in a session of its own. While it runs the worker relays rank 0's events to the run's reporter
(progress and metrics reach run_metrics; the lifecycle's heartbeat keeps beating meanwhile), and a
cancel request becomes the cancel flag every rank obeys at its next step; ranks that have not
stopped after PREFLOOP_TRAIN_CANCEL_GRACE_SECONDS are killed. A rank that dies fails the attempt
with RetryableRunError naming the rank and its last error line, and the lifecycle starts the run
again from its checkpoints. torchrun restarts nothing itself (`--max-restarts 0`): the retry is the
run's, counted on its row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.common.reporting import Reporter, RunCancelled
from app.config import Settings
from app.services.round_spec import ProcessesSection, describe_problems
from app.services.runs import RetryableRunError
from workers.training.stage import StageJob, run_stage
from workers.training.stage_files import EventTail, StageFiles, write_json_atomically

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# After SIGTERM, how long torchrun gets to stop its ranks before everything is SIGKILLed.
TERMINATE_SECONDS = 10.0
# Exceptions a rank raises for its inputs or settings: the same on every attempt, so not retried.
NOT_RETRIED = ("ValueError", "TypeError", "KeyError", "FileNotFoundError")


@dataclass(frozen=True)
class ProcessPlan:
    """How many processes a stage trains on: per host, and hosts."""

    per_host: int = 1
    hosts: int = 1

    @property
    def world_size(self) -> int:
        return self.per_host * self.hosts

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def plan_processes(config: dict[str, Any], settings: Settings) -> ProcessPlan:
    """The run row's `processes` section resolved against what this worker's host offers.

    Raises ValueError naming the setting when the section is malformed, when one host is asked for
    more processes than it offers, or when several hosts are asked of a worker that cannot reach them.
    """
    try:
        section = ProcessesSection.model_validate(config.get("processes") or {})
    except ValidationError as exc:
        raise ValueError(describe_problems(exc, prefix="processes")) from None
    offered = settings.training_processes_per_host()
    per_host = offered if section.per_host == "auto" else section.per_host
    if section.hosts == 1 and per_host > offered:
        source = (
            "PREFLOOP_TRAIN_PROCESSES_PER_HOST"
            if settings.train_processes_per_host
            else "one per CUDA device; set PREFLOOP_TRAIN_PROCESSES_PER_HOST to change it"
        )
        raise ValueError(
            f"processes.per_host is {per_host} but this worker's host offers {offered} training "
            f'process{"es" if offered != 1 else ""} ({source}): ask for at most {offered}, or "auto"'
        )
    if section.hosts > 1 and not (settings.train_launcher_prefix and settings.train_rdzv_endpoint):
        raise ValueError(
            f"processes.hosts is {section.hosts} but this worker cannot start processes on other hosts: "
            "set PREFLOOP_TRAIN_LAUNCHER_PREFIX (e.g. `srun --nodes=2 --ntasks-per-node=1`) and "
            "PREFLOOP_TRAIN_RDZV_ENDPOINT (host:port the hosts meet at), or ask for processes.hosts=1"
        )
    return ProcessPlan(per_host=per_host, hosts=section.hosts)


def train(
    job: StageJob,
    plan: ProcessPlan,
    reporter: Reporter,
    workdir: Path,
    run_id: int,
    attempt: int,
    settings: Settings,
) -> dict[str, Any]:
    """Run the stage: in this process for a plan of one, else on the plan's processes (see above)."""
    if not plan.distributed:
        return run_stage(job, reporter)
    return StageProcesses(job, plan, workdir, run_id, attempt, settings).run(reporter)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_with_parent() -> None:
    """Run in the child before torchrun starts: it gets SIGTERM (and stops its ranks) when the worker
    that started it dies, so no training outlives its run's worker."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StageProcesses:
    """One attempt of a stage on several processes: its folder, its torchrun, and its outcome."""

    def __init__(
        self, job: StageJob, plan: ProcessPlan, workdir: Path, run_id: int, attempt: int, settings: Settings
    ) -> None:
        self.job, self.plan, self.settings = job, plan, settings
        self.run_id, self.attempt = run_id, attempt
        self.files = StageFiles(workdir / "launch" / f"attempt-{attempt}")
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        endpoint = self.settings.train_rdzv_endpoint or f"127.0.0.1:{_free_port()}"
        prefix = shlex.split(self.settings.train_launcher_prefix) if self.plan.hosts > 1 else []
        return [
            *prefix,
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(self.plan.hosts),
            "--nproc-per-node",
            str(self.plan.per_host),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            f"run-{self.run_id}-{self.attempt}",
            "--max-restarts",
            "0",
            "-m",
            "workers.training.launch",
            str(self.files.job),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Each rank is one of per_host on this host's cores: without a limit every rank starts a
        # thread per core and they fight over them (torchrun's own default is one thread a rank).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.plan.per_host)))
        env["PYTHONUNBUFFERED"] = "1"
        # The ranks import the code this worker runs, installed or from a checkout.
        code_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [code_root, env.get("PYTHONPATH")]))
        return env

    def run(self, reporter: Reporter) -> dict[str, Any]:
        shutil.rmtree(self.files.folder, ignore_errors=True)  # an attempt with this number that died early
        self.files.folder.mkdir(parents=True)
        write_json_atomically(self.files.job, self.job.to_json())
        command = self.command()
        log.info("run %s attempt %s: %s", self.run_id, self.attempt, shlex.join(command))
        with self.files.log.open("w") as out:
            self.process = subprocess.Popen(
                command,
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_kill_with_parent,
            )
        try:
            cancelled = self._watch(reporter)
        finally:
            # Whatever ended the watch (an exception included), no process of the attempt lives on.
            self._stop_everything()
        returncode = self.process.returncode
        if cancelled:
            raise RunCancelled("cancelled on request")
        if returncode != 0:
            raise self._failure(returncode)
        summary = json.loads(self.files.result.read_text())
        if "cancelled" in summary:  # the ranks saw a flag this worker did not write: still a cancel
            raise RunCancelled(summary["cancelled"])
        shutil.rmtree(self.files.folder.parent, ignore_errors=True)  # every attempt's folder: done with
        return summary

    def _watch(self, reporter: Reporter) -> bool:
        """Relay events until torchrun exits; True when the run was cancelled."""
        tail = EventTail(self.files.events)
        cancel_deadline: float | None = None
        while self.process.poll() is None:
            self._relay(tail, reporter)
            if cancel_deadline is None and reporter.should_stop():
                self.files.cancel_flag.touch()
                cancel_deadline = time.monotonic() + self.settings.train_cancel_grace_seconds
                log.info(
                    "run %s: cancel requested; the training processes stop at their next step", self.run_id
                )
            if cancel_deadline is not None and time.monotonic() > cancel_deadline:
                log.warning(
                    "run %s: training processes did not stop after a cancel; killing them", self.run_id
                )
                break
            time.sleep(POLL_SECONDS)
        self._relay(tail, reporter)
        return cancel_deadline is not None

    @staticmethod
    def _relay(tail: EventTail, reporter: Reporter) -> None:
        for event in tail.read_new():
            if event["event"] == "progress":
                reporter.progress(event["done"], event["total"], event.get("message", ""))
            elif event["event"] == "metrics":
                reporter.metrics(event["step"], event["values"])

    def _stop_everything(self) -> None:
        """End torchrun (SIGTERM: it stops its ranks), then SIGKILL whatever of the attempt is left:
        torchrun's session, and each rank of this host by the pid it wrote (ranks run in sessions of
        their own, so a signal to torchrun's group does not reach them)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=TERMINATE_SECONDS)
        _signal_group(process.pid, signal.SIGKILL)
        here = socket.gethostname()
        for info in self.files.rank_pids().values():
            if info.get("host") == here:
                _kill_rank(int(info["pid"]))
        process.wait()

    def _failure(self, returncode: int) -> Exception:
        """The attempt's error: the first rank that failed and its last error line, from torchrun's
        summary and the rank's own error file. Retryable unless the rank refused its inputs."""
        log_text = self.files.log.read_text(errors="replace") if self.files.log.exists() else ""
        rank, exitcode, last_line = _root_cause(log_text)
        error = self.files.rank_error(rank) if rank is not None else None
        if error is not None:
            last_line = f"{error['type']}: {error['message']}".strip()
        who = f"rank {rank} of {self.plan.world_size}" if rank is not None else "a training process"
        how = f"exit code {exitcode}" if exitcode is not None else f"torchrun exit code {returncode}"
        if exitcode is not None and exitcode < 0:
            how = (
                f"killed by {signal.Signals(-exitcode).name}" if -exitcode in signal.valid_signals() else how
            )
        if not last_line:
            last_line = _last_line(log_text) or "no error was written; see torchrun.log in the run's folder"
        message = f"training {who} failed ({how}): {last_line}"
        if error is not None and error["type"] in NOT_RETRIED:
            return RuntimeError(message)
        return RetryableRunError(message)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_rank(pid: int) -> None:
    """SIGKILL a rank still alive; a pid already reused by another program is left alone."""
    import psutil

    try:
        process = psutil.Process(pid)
        if "workers.training.launch" in process.cmdline():
            process.kill()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        pass


_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):(.*?)(?:={20,}|\Z)", re.S)


def _root_cause(log_text: str) -> tuple[int | None, int | None, str]:
    """(rank, exit code, last line of its traceback) from torchrun's failure summary, where present."""
    match = _ROOT_CAUSE.search(log_text)
    if not match:
        return None, None, ""
    block = match.group(1)
    rank = re.search(r"rank\s*:\s*(\d+)", block)
    exitcode = re.search(r"exitcode\s*:\s*(-?\d+)", block)
    return (
        int(rank.group(1)) if rank else None,
        int(exitcode.group(1)) if exitcode else None,
        _last_line(block.split("traceback :", 1)[-1]) if "traceback :" in block else "",
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
