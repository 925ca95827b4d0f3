"""The files through which a worker and the processes of its training stage talk.

One folder per attempt (under the run's folder, on storage every host of the stage sees):

    job.json        the StageJob every rank reads
    events.jsonl    rank 0's progress and metrics, one JSON object a line, appended as they happen
    cancel          present once the run was cancelled: rank 0's reporter says stop, every rank agrees
    result.json     rank 0's summary of the trainer's result (or that it stopped on cancel)
    ranks/N.pid     rank N's process id and host, written when it joins
    ranks/N.error   rank N's exception (type, message, traceback) when it failed with one
    torchrun.log    what torchrun printed, with its summary of the first rank that failed

Files, rather than a socket back to the worker, because the ranks may run on other hosts and the
worker may be restarted: anything a rank wrote stays readable.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageFiles:
    folder: Path

    @property
    def job(self) -> Path:
        return self.folder / "job.json"

    @property
    def events(self) -> Path:
        return self.folder / "events.jsonl"

    @property
    def cancel_flag(self) -> Path:
        return self.folder / "cancel"

    @property
    def result(self) -> Path:
        return self.folder / "result.json"

    @property
    def log(self) -> Path:
        return self.folder / "torchrun.log"

    @property
    def ranks(self) -> Path:
        return self.folder / "ranks"

    def pid_file(self, rank: int) -> Path:
        return self.ranks / f"{rank}.pid"

    def error_file(self, rank: int) -> Path:
        return self.ranks / f"{rank}.error"

    # -- written by the ranks ----------------------------------------------------------------------

    def write_pid(self, rank: int) -> None:
        self.ranks.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.pid_file(rank), {"pid": os.getpid(), "host": socket.gethostname()})

    def write_error(self, rank: int, exc: BaseException) -> None:
        self.ranks.mkdir(parents=True, exist_ok=True)
        write_json_atomically(
            self.error_file(rank),
            {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            },
        )

    # -- read by the worker ------------------------------------------------------------------------

    def rank_pids(self) -> dict[int, dict[str, Any]]:
        """Each rank's {"pid", "host"} as far as the ranks have written them."""
        out = {}
        for path in sorted(self.ranks.glob("*.pid")) if self.ranks.exists() else []:
            try:
                out[int(path.stem)] = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
        return out

    def rank_error(self, rank: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.error_file(rank).read_text())
        except (OSError, ValueError):
            return None


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON beside `path`, then rename it into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class EventFileReporter:
    """Rank 0's Reporter: progress and metrics go to the events file as JSON lines, and the run is
    cancelled once the cancel flag exists. Wrap it with `group.reporter(...)`, so every rank calls
    `should_stop` at the same step and all of them stop together."""

    def __init__(self, files: StageFiles) -> None:
        self.files = files

    def progress(self, done: int, total: int, message: str = "") -> None:
        self._append({"event": "progress", "done": done, "total": total, "message": message})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._append({"event": "metrics", "step": step, "values": {k: float(v) for k, v in values.items()}})

    def should_stop(self) -> bool:
        return self.files.cancel_flag.exists()

    def _append(self, event: dict[str, Any]) -> None:
        # One write of one whole line, so the worker reading the file meanwhile sees whole events.
        with self.files.events.open("a") as out:
            out.write(json.dumps(event) + "\n")


class EventTail:
    """Reads the events appended to an events file since the last call (a line still being written
    waits for the next call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as source:
                source.seek(self._offset)
                chunk = source.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
