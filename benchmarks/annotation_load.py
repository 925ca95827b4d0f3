"""Annotation load: N simulated annotators loop next task → submit over HTTP against a real server.

By default the script builds everything itself on 127.0.0.1: a scratch Postgres database (created,
migrated, seeded with annotators and rank tasks of 4 responses, dropped at the end) and a uvicorn
server with the production app on a free port. With --url it drives a server you started instead
(give the annotators' API tokens with --tokens).

Every simulated annotator holds one keep-alive HTTP/1.1 connection (a small asyncio client, so the
load generator itself stays cheap) and, until the time is up, repeats:

    GET  /api/tasks/next                  → 200 task (204: pool empty)
    POST /api/tasks/{id}/annotation        → 201, a random ranking with a tie now and then

It prints submits/s, the latency percentiles of both requests and of the whole loop, and the error
count (any non-2xx answer, a refusal the UI shows in place, or a broken connection). The first
--warmup seconds are not counted. `--modes browser` drives the annotation page's own htmx requests
instead (a form post per judgement, answered with the next task's HTML block).

Each mode runs flat out (a loop starts the moment the last one ends: the server's capacity) and at an
offered rate (Poisson arrivals, 300 submits/s by default: the latency annotators see at that load).
Flat out, latency says little: with N annotators and no pause, Little's law fixes the mean loop time
at N / throughput (100 annotators at 300/s wait 333 ms on average whatever the server does), so a
latency target only means something at a given load below capacity.

`--history 10,10000` measures every run once per level: before each level the annotators are given
that many stored judgements each (old tasks, dated yesterday, inserted in bulk), so the rows show
whether a request costs more for an annotator with a long history.

`--peer label-studio` measures Label Studio 1.23.2 side by side in the same run: installed in its own
virtual environment (once, cached), gunicorn with 4 workers, a scratch database of the same Postgres,
a pairwise project of as many tasks, one account per simulated annotator, driven through its
next-task + submit loop by the same clients at the same rates (benchmarks/label_studio_peer.py);
the table prints both and each prefloop row's ratio to it. Without it the table quotes the figure
measured on this 2-core machine earlier: about 10 submits/s with p99 near 10 s at 100 clients.

    python benchmarks/annotation_load.py                         # 100 annotators, 20 s, 2 workers
    python benchmarks/annotation_load.py --rates 0,200,300,400 --modes piggyback
    python benchmarks/annotation_load.py --modes browser --rates 0,200
    python benchmarks/annotation_load.py --modes browser --history 10,10000
    python benchmarks/annotation_load.py --modes browser --peer label-studio
    python benchmarks/annotation_load.py --annotators 20 --duration 10
    python benchmarks/annotation_load.py --url http://127.0.0.1:8000 --tokens tokens.txt

The server this script starts has the per-annotator rate limits off (PREFLOOP_TASK_REQUEST_RATE_LIMIT
and PREFLOOP_SUBMISSION_RATE_LIMIT; set either in the environment to measure with a limit). A server
given with --url must be started with them raised or off, or the simulated annotators get 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import load_average, print_table  # noqa: E402
from benchmarks.label_studio_peer import choice_body  # noqa: E402

SECRET = "annotation-load-benchmark-secret-0123456789"
PEER = ("Label Studio 1.23.2 (quoted in the issue)", 10.0)
LABEL_STUDIO = "label-studio"  # the peer measured here (--peer label-studio)
K = 4


# ---------------------------------------------------------------- the scratch database


def create_database(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    name = f"prefloop_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_database(admin_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def seed(url: str, annotators: int, tasks: int, overlap: int) -> list[int]:
    """Annotators and rank tasks, inserted in bulk; returns the annotators' user ids."""
    from sqlalchemy import insert, select

    from app.data.db import make_engine
    from app.data.migrate import run_migrations
    from app.data.models import Prompt, PromptSet, Response, Task, TaskResponse, User, utcnow
    from app.services.accounts import hash_password
    from app.services.prompt_uploads import content_hash

    run_migrations(url)
    engine = make_engine(url, pool_size=2)
    rng = random.Random(0)
    words = [
        "the",
        "model",
        "answers",
        "with",
        "a",
        "list",
        "of",
        "steps",
        "and",
        "explains",
        "why",
        "each",
        "one",
        "matters",
        "to",
        "the",
        "user",
    ]
    now = utcnow()
    with engine.begin() as conn:
        password = hash_password("load-test-password")
        conn.execute(
            insert(User),
            [
                {"username": f"load-{i}", "role": "annotator", "password_hash": password, "created_at": now}
                for i in range(annotators)
            ],
        )
        user_ids = list(conn.scalars(select(User.id).order_by(User.id)))
        set_id = conn.scalar(
            insert(PromptSet).values(name="load", description="", created_at=now).returning(PromptSet.id)
        )
        for start in range(0, tasks, 2000):
            n = min(2000, tasks - start)
            prompts = []
            for i in range(start, start + n):
                messages = [{"role": "user", "content": f"Question {i}: how do I get better at cooking?"}]
                prompts.append(
                    {
                        "prompt_set_id": set_id,
                        "content_hash": content_hash(messages),
                        "messages": messages,
                        "text": messages[0]["content"],
                        "meta": {},
                        "split": "train",
                        "created_at": now,
                    }
                )
            prompt_ids = list(
                conn.scalars(insert(Prompt).returning(Prompt.id, sort_by_parameter_order=True), prompts)
            )
            responses = [
                {
                    "prompt_id": pid,
                    "text": " ".join(rng.choice(words) for _ in range(40)),
                    "sampling": {},
                    "token_count": 40,
                    "ended_with_eos": True,
                    "created_at": now,
                }
                for pid in prompt_ids
                for _ in range(K)
            ]
            response_ids = list(
                conn.scalars(insert(Response).returning(Response.id, sort_by_parameter_order=True), responses)
            )
            task_rows = [
                {
                    "prompt_id": pid,
                    "kind": "rank",
                    "status": "open",
                    "required_annotations": overlap,
                    "annotation_count": 0,
                    "claimed_count": 0,
                    "is_gold": False,
                    "created_at": now,
                }
                for pid in prompt_ids
            ]
            task_ids = list(
                conn.scalars(insert(Task).returning(Task.id, sort_by_parameter_order=True), task_rows)
            )
            links = [
                {"task_id": tid, "position": p, "response_id": response_ids[i * K + p]}
                for i, tid in enumerate(task_ids)
                for p in range(K)
            ]
            conn.execute(insert(TaskResponse), links)
        # Statistics for the seeded tables only. An ANALYZE of the still-empty annotation tables would
        # record them as empty, and the plans Postgres caches for foreign-key checks (comparisons →
        # annotations) would then scan the whole table on every insert until autovacuum analyzes it
        # again; left unanalyzed, as in a fresh deployment, they get index lookups from the start.
        conn.exec_driver_sql("ANALYZE users, prompt_sets, prompts, responses, tasks, task_responses")
    engine.dispose()
    return user_ids


def add_history(url: str, user_ids: list[int], per_annotator: int) -> None:
    """Give every annotator `per_annotator` stored judgements in all (old tasks, dated yesterday).

    Bulk rows straight into the tables, with triggers off for speed; the annotators' progress rows
    (where the schema keeps them) are then recounted from what is stored.
    """
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        have = conn.exec_driver_sql(
            "SELECT count(*) FROM annotations WHERE user_id = %(u)s AND created_at < now() - interval '12 hours'",
            {"u": user_ids[0]},
        ).scalar()
        more = per_annotator - have
        if more <= 0:
            return
        prompt_id = conn.exec_driver_sql("SELECT min(id) FROM prompts").scalar()
        conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # no triggers, no FK checks
        task_ids = list(
            conn.exec_driver_sql(
                "INSERT INTO tasks (prompt_id, kind, status, required_annotations, annotation_count, "
                "claimed_count, is_gold, created_at) SELECT %(p)s, 'rank', 'done', 1, 0, 0, false, "
                "now() - interval '1 day' FROM generate_series(1, %(n)s) RETURNING id",
                {"p": prompt_id, "n": more},
            ).scalars()
        )
        conn.exec_driver_sql(
            "INSERT INTO annotations (task_id, user_id, ranking, all_bad, skipped, skip_reason, flags, "
            "rationale, time_spent_ms, shown_order_unchanged, payload_hash, created_at) "
            "SELECT t, u, '[]', false, false, '', '{}', '', 5000, false, md5(t::text || '-' || u::text), "
            "now() - interval '1 day' FROM unnest(%(t)s::bigint[]) t CROSS JOIN unnest(%(u)s::bigint[]) u",
            {"t": task_ids, "u": user_ids},
        )
        if conn.exec_driver_sql("SELECT to_regclass('annotator_progress') IS NOT NULL").scalar():
            conn.exec_driver_sql("DELETE FROM annotator_progress")
            conn.exec_driver_sql(
                "INSERT INTO annotator_progress (user_id, judged_total, judged_day, judged_on_day) "
                "SELECT user_id, count(*), max((created_at AT TIME ZONE 'UTC')::date), "
                "count(*) FILTER (WHERE created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') "
                "FROM annotations WHERE NOT skipped GROUP BY user_id"
            )
    engine.dispose()
    vacuum(url)


def session_credentials(user_ids: list[int]) -> list[dict[str, str]]:
    """Browser-session cookies and CSRF headers, minted with the server's secret (no login round trip)."""
    from app.config import Settings
    from app.data.models import User
    from app.web.security import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE, make_session_cookie, new_csrf_token

    settings = Settings(secret_key=SECRET, environment="test")
    out = []
    for uid in user_ids:
        cookie = make_session_cookie(User(id=uid, session_generation=0), settings)
        csrf = new_csrf_token(settings)
        out.append({"Cookie": f"{SESSION_COOKIE}={cookie}; {CSRF_COOKIE}={csrf}", CSRF_HEADER: csrf})
    return out


def token_credentials(url: str, user_ids: list[int]) -> list[dict[str, str]]:
    from app.data.db import make_engine, session_factory
    from app.data.models import User
    from app.services.accounts import create_api_token

    engine = make_engine(url, pool_size=1)
    with session_factory(engine)() as db:
        tokens = [create_api_token(db, db.get(User, uid), "load") for uid in user_ids]
        db.commit()
    engine.dispose()
    return [{"Authorization": f"Bearer {t}"} for t in tokens]


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, workers: int, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFLOOP_ENVIRONMENT": "test",
        "PREFLOOP_DATABASE_URL": url,
        "PREFLOOP_DATA_DIR": str(data_dir),
        "PREFLOOP_SECRET_KEY": SECRET,
        "PREFLOOP_SERVE_POLICY": "false",
        # Simulated annotators loop flat out, far above what a person does: the per-annotator limits
        # would answer 429. Measuring the limits' own cost: set these to a high rate instead of off.
        "PREFLOOP_TASK_REQUEST_RATE_LIMIT": os.environ.get("PREFLOOP_TASK_REQUEST_RATE_LIMIT", "off"),
        "PREFLOOP_SUBMISSION_RATE_LIMIT": os.environ.get("PREFLOOP_SUBMISSION_RATE_LIMIT", "off"),
    }
    command = [
        sys.executable, "-m", "uvicorn",
        "app.web.main:create_app",
        "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - the server writes to it until it stops
    process = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/1.1 200"):
                    return process, base
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not answer within 90 s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---------------------------------------------------------------- the load


def machine_cpu() -> float:
    """CPU seconds every process on this machine has used so far, kernel time included.

    Postgres starts a process per connection and those exit with their counters, so its share is
    read as what is left of the machine's total after the server and the load generator.
    """
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its children (uvicorn's workers)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        total = 0.0
        for proc in [parent, *parent.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


@dataclass
class Stats:
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    loop_ms: list[float] = field(default_factory=list)
    submits: int = 0
    empty: int = 0
    errors: int = 0
    server_cpu: float = 0.0  # CPU seconds of the server processes during warm-up and measurement
    machine_cpu: float = 0.0  # of the whole machine (Postgres, kernel networking, anything else)
    client_cpu: float = 0.0  # of this load generator
    wall: float = 0.0
    window: float = 0.0  # the measured seconds (after the warm-up)
    requests: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message)


class Connection:
    """One keep-alive HTTP/1.1 connection; enough of the protocol for this app's JSON answers."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.fixed = f"Host: {host}:{port}\r\nAccept: application/json\r\n{extra}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, form: bool = False, htmx: bool = False
    ) -> tuple[int, bytes]:
        """(status, body); a refusal the UI shows in place (HX-Retarget) comes back as status 422."""
        if self.writer is None:
            await self.open()
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed}"
        if htmx:
            head += "HX-Request: true\r\n"
        if body is not None:
            kind = "application/x-www-form-urlencoded" if form else "application/json"
            head += f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
            elif name == b"hx-retarget":
                status = 422
        if chunked:
            data = b""
            while True:
                size = int((await self.reader.readline()).strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    break
                data += await self.reader.readexactly(size)
                await self.reader.readline()
        else:
            data = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


_TASK_ID = re.compile(rb'data-task-id="(\d+)"')
_RESPONSE_ID = re.compile(rb'data-response-id="(\d+)"')


def task_of_html(html: bytes) -> dict | None:
    """The task in the annotation page's task block (what the page's script reads), or None."""
    found = _TASK_ID.search(html)
    if found is None:
        return None
    return {"id": int(found.group(1)), "responses": [{"id": int(i)} for i in _RESPONSE_ID.findall(html)]}


def next_task_of(body: bytes, browser: bool, piggyback: bool) -> dict | None:
    """The next task a submit answered with (browser, piggyback), or None (fetch it)."""
    if browser:
        return task_of_html(body)
    return json.loads(body).get("next_task") if piggyback else None


def judgement(task: dict, rng: random.Random) -> bytes:
    """A random strict ranking, with a tie on top one time in five."""
    ids = [r["id"] for r in task["responses"]]
    rng.shuffle(ids)
    ranking = [[i] for i in ids]
    if rng.random() < 0.2:
        ranking = [ids[:2], *ranking[2:]]
    return json.dumps({"ranking": ranking, "time_spent_ms": rng.randint(2000, 60000)}).encode()


async def annotator(
    conn: Connection,
    seed: int,
    warm_until: float,
    stop_at: float,
    stats: Stats,
    mode: str,
    interval: float,
    project: int = 0,
):
    """next → submit until the time is up. With piggyback the submit also returns the next task
    (`?next=true`), so a loop is one request instead of two. browser does what the annotation page
    does: htmx requests to the UI routes, a form post per judgement answered with the next task's
    HTML block (parsed here for its task and response ids).

    interval 0: the next loop starts as soon as the last one ends (closed loop: measures capacity;
    latency is then mostly queueing, N / throughput by Little's law). interval > 0: loops start on a
    Poisson schedule with that mean gap (open loop: measures latency at a given load); a late loop
    counts its latency from when it was due, so a slow server cannot hide its backlog.
    """
    rng = random.Random(seed)
    browser, piggyback = mode == "browser", mode in ("piggyback", "browser")
    label_studio = mode == LABEL_STUDIO  # the peer's labeling stream (benchmarks/label_studio_peer.py)
    task = None
    due = time.perf_counter() + (rng.expovariate(1 / interval) if interval else 0.0)
    while True:
        if interval:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            t0 = due
            due += rng.expovariate(1 / interval)
        else:
            t0 = time.perf_counter()
        # A server far behind the offered rate leaves loops due inside the window still unsent when it
        # closes; they could not finish inside it (so never count) and would keep the run going.
        if t0 >= stop_at or time.perf_counter() >= stop_at:
            break
        counted = t0 >= warm_until
        fetched = task is None
        if fetched:
            stats.requests += 1
            try:
                if browser:
                    status, body = await conn.request("GET", "/annotate/next", htmx=True)
                    task = task_of_html(body)
                    status = 204 if status == 200 and task is None else status
                else:
                    path = f"/api/projects/{project}/next" if label_studio else "/api/tasks/next"
                    status, body = await conn.request("GET", path)
                    status = 204 if label_studio and status == 404 else status  # its empty queue
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                stats.error(f"next: {type(exc).__name__}: {exc}")
                await conn.close()
                continue
            if status == 204:
                stats.empty += 1
                await asyncio.sleep(0.05)
                continue
            if status != 200:
                stats.error(f"next: HTTP {status}: {body[:200]!r}")
                continue
            task = task if browser else json.loads(body)
        t1 = time.perf_counter()
        stats.requests += 1
        try:
            if browser:
                form = b"payload=" + quote_from_bytes(judgement(task, rng)).encode()
                status, body = await conn.request(
                    "POST", f"/annotate/tasks/{task['id']}", form, form=True, htmx=True
                )
            elif label_studio:
                path = f"/api/tasks/{task['id']}/annotations/?project={project}"
                status, body = await conn.request("POST", path, choice_body(task, rng))
            else:
                path = f"/api/tasks/{task['id']}/annotation" + ("?next=true" if piggyback else "")
                status, body = await conn.request("POST", path, judgement(task, rng))
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            stats.error(f"submit: {type(exc).__name__}: {exc}")
            await conn.close()
            task = None
            continue
        t2 = time.perf_counter()
        if status not in (200, 201):
            stats.error(f"submit: HTTP {status}: {body[:200]!r}")
            task = None
            continue
        task = None if label_studio else next_task_of(body, browser, piggyback)
        if counted and t2 <= stop_at:
            stats.submits += 1
            if fetched:
                stats.next_ms.append((t1 - t0) * 1000)
                stats.submit_ms.append((t2 - t1) * 1000)
            else:
                stats.submit_ms.append((t2 - t0) * 1000)
            stats.loop_ms.append((t2 - t0) * 1000)


async def run_load(
    base: str,
    credentials: list[dict[str, str]],
    duration: float,
    warmup: float,
    mode: str = "two-requests",
    rate: float = 0.0,
    project: int = 0,
) -> Stats:
    """Drive the server with one simulated annotator per credential; rate: total loops/s (0: flat out)."""
    parts = urlsplit(base)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("this benchmark only drives a server on this machine (127.0.0.1)")
    conns = [Connection(host, port, headers) for headers in credentials]
    await asyncio.gather(*(c.open() for c in conns))
    stats = Stats(window=duration)
    interval = len(conns) / rate if rate > 0 else 0.0
    start = time.perf_counter()
    warm_until, stop_at = start + warmup, start + warmup + duration
    await asyncio.gather(
        *(annotator(c, i, warm_until, stop_at, stats, mode, interval, project) for i, c in enumerate(conns))
    )
    await asyncio.gather(*(c.close() for c in conns))
    return stats


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49]:.1f} / {q[94]:.1f} / {q[98]:.1f}"


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotators", type=int, default=100, help="simulated annotators (connections)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (at most 300)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument(
        "--workers", type=int, default=2, help="uvicorn worker processes of the started server"
    )
    parser.add_argument(
        "--tasks", type=int, default=0,
        help="rank tasks seeded; default: enough for every run at up to 600 submits/s (or its rate)",
    )  # fmt: skip
    parser.add_argument("--overlap", type=int, default=1, help="annotations each seeded task asks for")
    parser.add_argument(
        "--peer",
        choices=("quoted", "label-studio"),
        default="quoted",
        help="quoted: print the peer's figure from the issue; label-studio: install Label Studio in its own "
        "environment (cached), serve it with gunicorn on a scratch database of the same Postgres with a "
        "pairwise project of as many tasks, and drive it at the same rates with the same clients",
    )
    parser.add_argument("--peer-workers", type=int, default=4, help="gunicorn workers of Label Studio")
    parser.add_argument(
        "--peer-duration",
        type=float,
        default=60.0,
        help="measured seconds per Label Studio run: its loops take seconds each under load, and only "
        "those finished inside the window count",
    )
    parser.add_argument("--peer-warmup", type=float, default=15.0, help="Label Studio's warm-up seconds")
    parser.add_argument(
        "--history",
        default="",
        help="stored judgements each annotator has before the runs, comma-separated levels (e.g. 10,10000): "
        "every run is measured once per level, in increasing order",
    )
    parser.add_argument("--auth", choices=("session", "token"), default="session",
                        help="browser-session cookies (as the UI) or API bearer tokens")  # fmt: skip
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get(
            "PREFLOOP_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a Postgres URL allowed to create and drop the scratch database",
    )
    parser.add_argument("--url", help="drive this running server instead of starting one (127.0.0.1 only)")
    parser.add_argument("--tokens", type=Path, help="with --url: a file of annotator API tokens, one a line")
    parser.add_argument("--keep-database", action="store_true", help="do not drop the scratch database")
    parser.add_argument(
        "--modes",
        default="two-requests,piggyback",
        help="two-requests: GET next then POST submit; piggyback: POST submit?next=true returns the next "
        "task; browser: the annotation page's htmx requests (form post, next task's HTML block back) "
        "task (one request per loop); comma-separated, each measured in turn on the same server",
    )
    parser.add_argument(
        "--rates",
        default="0,300",
        help="total submits/s the annotators aim at, comma-separated, each run per mode: 0 = flat out "
        "(closed loop, capacity), R > 0 = Poisson arrivals at R/s (open loop, latency at that load)",
    )
    args = parser.parse_args()
    duration = min(args.duration, 300.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"two-requests", "piggyback", "browser"}:
        raise SystemExit("--modes takes two-requests, piggyback and/or browser")
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise SystemExit("--rates takes numbers, e.g. 0,300") from None
    if any(r < 0 for r in rates):
        raise SystemExit("--rates must be 0 (flat out) or positive")
    try:
        histories = sorted({int(h) for h in args.history.split(",") if h.strip()}) or [None]
    except ValueError:
        raise SystemExit("--history takes whole numbers, e.g. 10,10000") from None
    runs = [(mode, rate) for rate in rates for mode in modes]
    tasks = args.tasks or tasks_needed(runs * len(histories), duration + args.warmup, args.overlap)

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    if args.url:
        if not args.tokens:
            raise SystemExit("--url needs --tokens (annotators' API tokens, one a line)")
        tokens = [t.strip() for t in args.tokens.read_text().splitlines() if t.strip()]
        credentials = [{"Authorization": f"Bearer {t}"} for t in tokens[: args.annotators]]
        results = {}
        for mode, rate in runs:
            results[run_label(mode, rate)] = asyncio.run(
                run_load(args.url.rstrip("/"), credentials, duration, args.warmup, mode, rate)
            )
        report(args, results, duration, "external server")
        return

    url = create_database(args.pg_admin_url)
    server = None
    peer_results: dict[str, Stats] = {}
    try:
        t = time.perf_counter()
        user_ids = seed(url, args.annotators, tasks, args.overlap)
        print(f"seeded {tasks} tasks and {args.annotators} annotators in {time.perf_counter() - t:.1f}s")
        credentials = (
            session_credentials(user_ids) if args.auth == "session" else token_credentials(url, user_ids)
        )
        with tempfile.TemporaryDirectory(prefix="prefloop-load-") as data_dir:
            server, base = start_server(url, args.workers, Path(data_dir))
            print(f"server at {base} ({args.workers} uvicorn workers); load average {load_average()}")
            results = {}
            planned = [(history, mode, rate) for history in histories for mode, rate in runs]
            for i, (history, mode, rate) in enumerate(planned):
                if history is not None and (i == 0 or planned[i - 1][0] != history):
                    t = time.perf_counter()
                    add_history(url, user_ids, history)
                    print(f"{history} stored judgements per annotator ({time.perf_counter() - t:.1f}s)")
                elif i:  # (not before the first: see seed() on analyzing still-empty tables)
                    vacuum(url)
                before = (
                    process_tree_cpu(server.pid),
                    machine_cpu(),
                    time.process_time(),
                    time.perf_counter(),
                )
                stats = asyncio.run(run_load(base, credentials, duration, args.warmup, mode, rate))
                stats.server_cpu = process_tree_cpu(server.pid) - before[0]
                stats.machine_cpu = machine_cpu() - before[1]
                stats.client_cpu = time.process_time() - before[2]
                stats.wall = time.perf_counter() - before[3]
                label = run_label(mode, rate)
                results[label if history is None else f"{label}, history {history}"] = stats
            stop_server(server)
            server = None
            server_log = (Path(data_dir) / "server.log").read_text(errors="replace")
            if args.peer == LABEL_STUDIO:
                peer_results = measure_label_studio(args, tasks, rates, Path(data_dir))
        failures = server_log.count("Traceback")
        if failures:
            last = [line for line in server_log.splitlines() if line.strip()][-1]
            print(f"the server logged {failures} exceptions; the last: {last}")
        report(args, results, duration, f"{args.workers} uvicorn workers, {args.auth} auth", peer_results)
    finally:
        if server is not None:
            stop_server(server)
        if not args.keep_database:
            drop_database(args.pg_admin_url, url)


def measure_label_studio(args, tasks: int, rates: list[float], data_dir: Path) -> dict[str, Stats]:
    """Label Studio driven at the same rates by as many clients, after prefloop's server has stopped
    (for --peer-duration seconds each: its loops are slow, and only those ending in the window count)."""
    from benchmarks import label_studio_peer

    ls = label_studio_peer.start(
        args.pg_admin_url, args.annotators, tasks, args.peer_workers, data_dir, free_port()
    )
    results = {}
    try:
        credentials = [{"Authorization": f"Token {token}"} for token in ls.tokens]
        print(
            f"Label Studio at {ls.url} ({args.peer_workers} gunicorn workers); load average {load_average()}"
        )
        for rate in rates:
            before = (
                process_tree_cpu(ls.process.pid),
                machine_cpu(),
                time.process_time(),
                time.perf_counter(),
            )
            stats = asyncio.run(
                run_load(
                    ls.url, credentials, args.peer_duration, args.peer_warmup, LABEL_STUDIO, rate, ls.project
                )
            )
            stats.server_cpu = process_tree_cpu(ls.process.pid) - before[0]
            stats.machine_cpu = machine_cpu() - before[1]
            stats.client_cpu = time.process_time() - before[2]
            stats.wall = time.perf_counter() - before[3]
            results[run_label(LABEL_STUDIO, rate)] = stats
    finally:
        label_studio_peer.stop(ls, args.pg_admin_url, args.keep_database)
    return results


def tasks_needed(runs: list[tuple[str, float]], seconds: float, overlap: int) -> int:
    """Tasks enough for every run: flat out counted at 600 submits/s, above what this machine does."""
    submits = sum((rate if rate > 0 else 600.0) * seconds for _mode, rate in runs)
    return max(1000, int(submits * 1.1 / overlap))


def vacuum(url: str) -> None:
    """Vacuum the tables the last run churned, as autovacuum does in a deployment.

    Every claim and judgement rewrites a task row; the dead row versions stay in the table and its
    indexes until a vacuum, and the claim's index scan walks past them. Autovacuum would clean up
    continuously (some test machines have it off); each run starts from a vacuumed table instead
    of inheriting the last run's debris.
    """
    from sqlalchemy import create_engine

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) tasks, assignments, annotations, comparisons")
    engine.dispose()


def run_label(mode: str, rate: float) -> str:
    return f"{mode}, {'flat out' if rate <= 0 else f'{rate:.0f}/s offered'}"


def report(
    args, results: dict[str, Stats], duration: float, setup: str, peer: dict[str, Stats] | None = None
) -> None:
    """The table: every prefloop run, then Label Studio's (measured here, or the quoted figure), and
    the ratio of each prefloop run to the peer at the same offered rate."""
    print()
    print(f"{args.annotators} annotators, {duration:.0f}s measured per run after {args.warmup:.0f}s warm-up, "
          f"{setup}; load average {load_average()}")  # fmt: skip
    if peer:
        print(f"Label Studio {label_studio_version()}: {args.peer_duration:.0f}s measured per run after "
              f"{args.peer_warmup:.0f}s warm-up, {args.peer_workers} gunicorn workers, same Postgres")  # fmt: skip
    rows = []
    measured = {f"prefloop {label}": stats for label, stats in results.items()}
    measured |= {
        f"Label Studio {label_studio_version()}, {label.split(', ', 1)[1]}": stats
        for label, stats in (peer or {}).items()
    }
    for system, stats in measured.items():
        cpu = f"{stats.server_cpu * 1000 / stats.requests:.2f}" if stats.server_cpu and stats.requests else ""
        rows.append(
            [system, f"{stats.submits / (stats.window or duration):.1f}", percentiles(stats.next_ms),
             percentiles(stats.submit_ms), percentiles(stats.loop_ms), stats.errors, cpu]
        )  # fmt: skip
    if not peer:
        rows.append([PEER[0], f"{PEER[1]:.0f}", "", "", "p99 ~10000", "", ""])
    print_table(
        ["system", "submits/s", "next p50/p95/p99 ms", "submit p50/p95/p99 ms", "loop p50/p95/p99 ms",
         "errors", "server CPU ms/request"],
        rows,
    )  # fmt: skip
    for mode, stats in results.items():
        rate_part = mode.split(", ")[1]
        peer_stats = next((s for label, s in (peer or {}).items() if label.endswith(rate_part)), None)
        if peer_stats is not None and peer_stats.submits:
            ratio = (stats.submits / stats.window) / (peer_stats.submits / peer_stats.window)
            print(f"ratio prefloop {mode} / Label Studio at {rate_part}: {ratio:.1f}x submits/s")
        elif not peer:
            print(
                f"ratio prefloop {mode} / peer (quoted): {stats.submits / duration / PEER[1]:.0f}x submits/s"
            )
    for mode, stats in measured.items():
        if stats.empty:
            print(f"note ({mode}): {stats.empty} times the pool was empty (seed more --tasks)")
        if stats.wall:
            rest = stats.machine_cpu - stats.server_cpu - stats.client_cpu
            print(
                f"CPU cores busy ({mode}): {stats.machine_cpu / stats.wall:.2f} of {os.cpu_count()}: server "
                f"{stats.server_cpu / stats.wall:.2f}, load generator {stats.client_cpu / stats.wall:.2f}, "
                f"Postgres and kernel {rest / stats.wall:.2f}"
            )
        for sample in stats.error_samples:
            print(f"error ({mode}): {sample}")


def label_studio_version() -> str:
    from benchmarks.label_studio_peer import VERSION

    return VERSION


if __name__ == "__main__":
    main()
