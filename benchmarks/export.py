"""Export throughput and memory: does memory stay flat as the export grows?

Builds scratch databases of synthetic annotation history (SQLite files, and a Postgres database when
--postgres is given) holding N comparisons — tasks of 4 responses, 2 annotators each, every annotation
a strict ranking (6 comparisons) — and exports them in a fresh process per measurement:

- prefloop: the streaming exporter (keyset pages of tasks → row builder → Parquet row groups / JSONL);
- peer:     the obvious alternative, materialise everything — the same rows from the same builders, but
            every task read in one page, every row kept in one list, then
            `datasets.Dataset.from_list(rows).to_parquet()` / `.to_json()`.

Each process reports rows/s, its peak RSS (ru_maxrss) and the peak above its RSS after imports. The
table shows both sizes (default 10k and 100k comparisons) so the growth of peak memory with rows can
be read off directly, and the ratio prefloop/peer at the largest size.

    python benchmarks/export.py                       # SQLite, 10k and 100k, parquet
    python benchmarks/export.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECRET = "benchmark-secret-key-0123456789-0123456789"
KEY = "benchmark-pseudonym-key-0123456789-0123456789"
RESPONSES_PER_TASK = 4
ANNOTATORS_PER_TASK = 2
COMPARISONS_PER_ANNOTATION = RESPONSES_PER_TASK * (RESPONSES_PER_TASK - 1) // 2
_SENTENCE = (
    "the model answers with a short list of steps and then explains why each step matters for the user "
    "who asked about cooking travel code history science money health poetry and careful reasoning"
)
WORDS = _SENTENCE.split(" ")


# ---------------------------------------------------------------- synthetic database


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def populate(url: str, comparisons: int, seed: int = 0, batch: int = 5000) -> dict[str, int]:
    """Create the schema and insert history holding about `comparisons` comparisons."""
    from sqlalchemy import insert

    from app.data.db import Base, make_engine
    from app.data.models import (
        Annotation,
        Comparison,
        Policy,
        Prompt,
        PromptSet,
        Response,
        Task,
        TaskResponse,
        User,
    )

    engine = make_engine(url, pool_size=2)
    Base.metadata.create_all(engine)
    rng = random.Random(seed)
    tasks = max(1, comparisons // (COMPARISONS_PER_ANNOTATION * ANNOTATORS_PER_TASK))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(User),
            [
                {
                    "id": i,
                    "username": f"annotator{i}",
                    "email": f"a{i}@example.org",
                    "password_hash": "x",
                    "role": "annotator",
                }
                for i in range(1, 51)
            ],
        )
        conn.execute(insert(PromptSet), [{"id": 1, "name": "synthetic"}])
        conn.execute(
            insert(Policy),
            [
                {
                    "id": v + 1,
                    "version": v,
                    "kind": "base" if v == 0 else "ppo",
                    "path": f"/dummy/{v}",
                    "sha256": "0" * 64,
                    "status": "approved",
                    "metrics": {},
                }
                for v in range(2)
            ],
        )

        def flush(table, rows: list[dict]) -> None:
            if rows:
                conn.execute(insert(table), rows)
                rows.clear()

        prompts, responses, task_rows, shown, annotations, pairs = [], [], [], [], [], []
        response_id = annotation_id = comparison_id = 0
        for t in range(1, tasks + 1):
            question = _text(rng, 12)
            prompts.append(
                {
                    "id": t,
                    "prompt_set_id": 1,
                    "content_hash": hashlib.sha256(question.encode()).hexdigest(),
                    "messages": [{"role": "user", "content": question}],
                    "text": question,
                    "split": "train",
                    "meta": {},
                }
            )
            task_rows.append(
                {
                    "id": t,
                    "prompt_id": t,
                    "kind": "rank",
                    "status": "done",
                    "required_annotations": ANNOTATORS_PER_TASK,
                    "annotation_count": ANNOTATORS_PER_TASK,
                }
            )
            ids = []
            for position in range(RESPONSES_PER_TASK):
                response_id += 1
                ids.append(response_id)
                responses.append(
                    {
                        "id": response_id,
                        "prompt_id": t,
                        "policy_id": 1 + position % 2,
                        "text": _text(rng, 60),
                        "sampling": {},
                        "token_count": 80,
                        "ended_with_eos": True,
                    }
                )
                shown.append({"task_id": t, "position": position, "response_id": response_id})
            users = rng.sample(range(1, 51), ANNOTATORS_PER_TASK)
            for user in users:
                order = ids[:]
                rng.shuffle(order)
                annotation_id += 1
                created = start + timedelta(seconds=annotation_id)
                annotations.append(
                    {
                        "id": annotation_id,
                        "task_id": t,
                        "user_id": user,
                        "ranking": [[r] for r in order],
                        "all_bad": False,
                        "skipped": False,
                        "skip_reason": "",
                        "flags": {},
                        "rationale": "",
                        "time_spent_ms": 9000,
                        "shown_order_unchanged": False,
                        "payload_hash": uuid.uuid4().hex,
                        "created_at": created,
                    }
                )
                for i in range(len(order)):
                    for j in range(i + 1, len(order)):
                        comparison_id += 1
                        pairs.append(
                            {
                                "id": comparison_id,
                                "annotation_id": annotation_id,
                                "prompt_id": t,
                                "chosen_response_id": order[i],
                                "rejected_response_id": order[j],
                                "margin": float(j - i),
                                "created_at": created,
                            }
                        )
            if len(pairs) >= batch:
                # Parents before children: the foreign keys are checked on insert.
                for table, rows in (
                    (Prompt, prompts),
                    (Task, task_rows),
                    (Response, responses),
                    (TaskResponse, shown),
                    (Annotation, annotations),
                    (Comparison, pairs),
                ):
                    flush(table, rows)
        for table, rows in (
            (Prompt, prompts),
            (Task, task_rows),
            (Response, responses),
            (TaskResponse, shown),
            (Annotation, annotations),
            (Comparison, pairs),
        ):
            flush(table, rows)
    engine.dispose()
    return {"tasks": tasks, "comparisons": comparison_id}


# ---------------------------------------------------------------- one measurement (child process)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child(url: str, method: str, file_format: str, out: Path) -> dict[str, float]:
    import datasets  # noqa: F401  (both methods pay the same imports, so baselines match)
    import pyarrow  # noqa: F401

    from app.data.db import make_engine, session_factory
    from app.services.exports import ExportSpec, export_dataset

    engine = make_engine(url, pool_size=1)
    baseline = rss_mb()
    started = time.perf_counter()
    with session_factory(engine)() as db:
        if method == "prefloop":
            spec = ExportSpec(format="pairwise", file_format=file_format, layout="folder", split_mode="none")
            rows = export_dataset(db, spec, out, pseudonym_key=KEY).stats.total_rows
        else:
            rows = materialise_everything(db, file_format, out)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"rows": rows, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak}


def materialise_everything(db, file_format: str, out: Path) -> int:
    """The peer: the same rows (same builders, same columns), but all of them built in memory at once
    (every task in one page, every row in one list) and handed to `datasets` to write."""
    import datasets

    from app.services.exports import ExportSpec, iter_rows

    spec = ExportSpec(format="pairwise", split_mode="none")
    rows = [row for _split, row, _meta in iter_rows(db, spec, pseudonym_key=KEY, page_size=10**9)]
    ds = datasets.Dataset.from_list(rows)
    (out / "data").mkdir(parents=True)
    if file_format == "parquet":
        ds.to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    else:
        ds.to_json(str(out / "data" / "train-00000-of-00001.jsonl"), force_ascii=False)
    return len(rows)


def measure(url: str, method: str, file_format: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="prefloop-export-bench-") as tmp:
        command = [sys.executable, __file__, "--child", url, method, file_format, str(Path(tmp) / "out")]
        env = os.environ | {"PREFLOOP_SECRET_KEY": SECRET, "HF_HUB_OFFLINE": "1", "PREFLOOP_DATA_DIR": tmp}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{method} {file_format} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def scratch_postgres(admin_url: str) -> tuple[str, callable]:
    from sqlalchemy import create_engine, text

    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="10000,100000", help="Comparisons per scratch database (comma list)."
    )
    parser.add_argument("--file-formats", default="parquet", help="parquet, jsonl or both (comma list).")
    parser.add_argument(
        "--postgres",
        default="",
        metavar="ADMIN_URL",
        help="Also measure on Postgres: a scratch database is created here and dropped after.",
    )
    parser.add_argument("--no-sqlite", action="store_true", help="Skip SQLite (with --postgres).")
    parser.add_argument("--no-peer", action="store_true", help="Measure only prefloop's exporter.")
    parser.add_argument(
        "--child", nargs=4, metavar=("URL", "METHOD", "FORMAT", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        url, method, file_format, out = args.child
        print(json.dumps(child(url, method, file_format, Path(out))))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    file_formats = args.file_formats.split(",")
    methods = ["prefloop"] + ([] if args.no_peer else ["peer"])
    backends = ([] if args.no_sqlite else ["sqlite"]) + (["postgres"] if args.postgres else [])
    print(f"export benchmark · pairwise · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[tuple, dict] = {}
    table = []
    with tempfile.TemporaryDirectory(prefix="prefloop-export-db-") as tmp:
        for backend in backends:
            for size in sizes:
                if backend == "sqlite":
                    url, drop = f"sqlite:///{tmp}/bench-{size}.db", (lambda: None)
                else:
                    url, drop = scratch_postgres(args.postgres)
                try:
                    t0 = time.perf_counter()
                    info = populate(url, size)
                    print(
                        f"{backend}: {info['comparisons']} comparisons in {info['tasks']} tasks "
                        f"populated in {time.perf_counter() - t0:.1f}s",
                        flush=True,
                    )
                    for file_format in file_formats:
                        for method in methods:
                            r = measure(url, method, file_format)
                            results[(backend, size, file_format, method)] = r
                            table.append(
                                [
                                    backend,
                                    file_format,
                                    method,
                                    r["rows"],
                                    f"{r['seconds']:.1f}",
                                    f"{r['rows'] / r['seconds']:,.0f}",
                                    f"{r['baseline_mb']:.0f}",
                                    f"{r['peak_mb']:.0f}",
                                    f"{r['peak_mb'] - r['baseline_mb']:.0f}",
                                ]
                            )
                            print("  " + " ".join(map(str, table[-1])), flush=True)
                finally:
                    drop()
    print()
    print_table(
        [
            "db",
            "file",
            "method",
            "rows",
            "s",
            "rows/s",
            "RSS after imports MB",
            "peak RSS MB",
            "peak - imports MB",
        ],
        table,
    )
    print()
    small, large = min(sizes), max(sizes)
    for backend in backends:
        for file_format in file_formats:
            for method in methods:
                a, b = (
                    results[(backend, small, file_format, method)],
                    results[(backend, large, file_format, method)],
                )
                growth = (b["peak_mb"] - b["baseline_mb"]) - (a["peak_mb"] - a["baseline_mb"])
                print(
                    f"{backend} {file_format} {method}: peak above imports grows {growth:+.0f} MB from "
                    f"{a['rows']} to {b['rows']} rows ({growth * 1024 / max(1, b['rows'] - a['rows']):.2f} kB/row)"
                )
            if "peer" in methods:
                ours, peer = (
                    results[(backend, large, file_format, "prefloop")],
                    results[(backend, large, file_format, "peer")],
                )
                print(
                    f"{backend} {file_format} at {large}: prefloop/peer rows/s "
                    f"{(ours['rows'] / ours['seconds']) / (peer['rows'] / peer['seconds']):.2f}x, "
                    f"peak RSS {ours['peak_mb'] / peer['peak_mb']:.2f}x, peak above imports "
                    f"{(ours['peak_mb'] - ours['baseline_mb']) / max(1, peer['peak_mb'] - peer['baseline_mb']):.2f}x"
                )


if __name__ == "__main__":
    main()
