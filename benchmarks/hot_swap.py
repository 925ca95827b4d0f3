"""Hot swap: time from a promote to the first response served by the new version, and failed requests.

Embedded setup (SQLite database, no Redis: holders follow the alias by polling, and the promote
route wakes its own holder at once) with SmolLM2-135M-Instruct. While clients keep calling
GET /api/tasks/next and streaming from the playground, the script promotes v1, v0, v1, … and
measures, for each promote, the seconds until a playground answer comes from the new version.
Target (issue): ≤ 5 s and 0 failed requests.

    python benchmarks/hot_swap.py --swaps 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import load_average, print_table, smollm2_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="HF causal-LM folder (default: SmolLM2-135M-Instruct, converted once)"
    )
    parser.add_argument("--swaps", type=int, default=4, help="promotes to measure (alternating v1, v0, …)")
    parser.add_argument("--clients", type=int, default=4, help="threads calling /api/tasks/next")
    args = parser.parse_args()

    model = smollm2_dir(args.model)
    data = Path(tempfile.mkdtemp(prefix="prefloop-hotswap-"))
    os.environ.update(
        {
            "PREFLOOP_DATA_DIR": str(data),
            "PREFLOOP_ENVIRONMENT": "development",
            "PREFLOOP_DEVICE": "cpu",
            "PREFLOOP_SERVE_POLICY": "true",
        }
    )
    for key in ("PREFLOOP_DATABASE_URL", "PREFLOOP_BROKER_URL", "PREFLOOP_REDIS_URL"):
        os.environ.pop(key, None)

    from app.config import get_settings, reset_settings
    from app.data.db import session_scope
    from app.data.migrate import run_migrations
    from app.data.models import User
    from app.services.accounts import create_api_token, hash_password
    from app.services.registry import init_base_policy, publish_policy
    from app.web.server_thread import WebServerThread

    reset_settings()
    settings = get_settings()
    run_migrations(settings.sqlalchemy_url)
    with session_scope() as db:
        base, _ = init_base_policy(db, base_model=model, settings=settings)
        publish_policy(
            db, lambda d: shutil.copytree(base.path, d, dirs_exist_ok=True), kind="ppo", settings=settings
        )
        tokens = {}
        for role in ("admin", "annotator"):
            user = User(username=f"bench-{role}", role=role, password_hash=hash_password("bench-password"))
            db.add(user)
            db.flush()
            tokens[role] = {"Authorization": f"Bearer {create_api_token(db, user, 'bench')}"}

    statuses: Counter = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def tasks_client() -> None:
        with httpx.Client(base_url=server.url, headers=tokens["annotator"], timeout=30) as client:
            while not stop.is_set():
                try:
                    code = client.get("/api/tasks/next").status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                statuses[code] += 1
                if not isinstance(code, int) or code >= 500:
                    failures.append(f"tasks/next: {code}")

    def ask(client: httpx.Client) -> str | None:
        response = client.post("/admin/playground/stream", json={"prompt": "Say hi.", "max_new_tokens": 4})
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"playground: {response.status_code} {response.text[:100]}")
            return None
        return response.headers.get("X-Policy-Version")

    rows = []
    with WebServerThread() as server:
        admin = httpx.Client(base_url=server.url, headers=tokens["admin"], timeout=120)
        while httpx.get(f"{server.url}/healthz").json().get("served_policy_version") != 0:
            time.sleep(0.2)
        threads = [threading.Thread(target=tasks_client, daemon=True) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for n in range(args.swaps):
            target = 1 if n % 2 == 0 else 0
            started = time.perf_counter()
            response = admin.post(f"/api/policies/{target}/promote")
            assert response.status_code == 200, response.text
            promoted = time.perf_counter()
            version = None
            while version != str(target):
                version = ask(admin)
            rows.append(
                (n + 1, f"v{target}", f"{promoted - started:.2f}", f"{time.perf_counter() - promoted:.2f}")
            )
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    print(
        f"\nhot swap with {model.name} on {settings.torch_device()}, embedded setup, load average {load_average()}"
    )
    print_table(["swap", "to", "promote call s", "promote → first answer s"], rows)
    seconds = [float(r[3]) for r in rows]
    print(f"\nmedian {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s (target ≤ 5 s)")
    print(f"requests: {dict(statuses)}; failed: {len(failures)} (target 0)")
    for failure in failures[:10]:
        print("  ", failure)
    shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
