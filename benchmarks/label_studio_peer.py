"""Label Studio as the peer of benchmarks/annotation_load.py: installed in a virtual environment of
its own (cached under PREFLOOP_BENCH_CACHE), on a scratch database of the same Postgres, served by
gunicorn, with a pairwise project of the same number of tasks and one account per simulated
annotator. The load generator drives its labeling stream as an annotator's browser does:

    GET  /api/projects/{id}/next                   → 200 the next task (locked for this annotator)
    POST /api/tasks/{id}/annotations/?project={id} → 201, a pairwise choice (left or right)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import BENCH_CACHE

VERSION = "1.23.2"
LABEL_CONFIG = """<View>
  <Header value="$prompt"/>
  <Text name="left" value="$left"/>
  <Text name="right" value="$right"/>
  <Pairwise name="choice" toName="left,right"/>
</View>"""

# Run inside Label Studio's environment (django set up): the organization, the accounts with their
# API tokens, the pairwise project and its tasks, in bulk. Prints {"project": id, "tokens": [...]}.
SETUP = r"""
import json, random, sys
import django
django.setup()
from django.db import transaction
from organizations.models import Organization
from projects.models import Project
from rest_framework.authtoken.models import Token
from tasks.models import Task
from users.models import User

annotators, tasks, label_config = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
words = "the model answers with a list of steps and explains why each one matters to the user".split()
rng = random.Random(0)
with transaction.atomic():
    owner = User.objects.create_user(email="owner@load.test", password="load-test-password")
    org = Organization.create_organization(created_by=owner, title="load", legacy_api_tokens_enabled=True)
    owner.active_organization = org
    owner.save(update_fields=["active_organization"])
    users = []
    for i in range(annotators):
        user = User.objects.create_user(email=f"load-{i}@load.test", password="load-test-password")
        org.add_user(user)
        user.active_organization = org
        user.save(update_fields=["active_organization"])
        users.append(user)
    tokens = [Token.objects.get_or_create(user=u)[0].key for u in users]
    project = Project.objects.create(
        title="pairwise load", label_config=label_config, created_by=owner, organization=org,
        maximum_annotations=1, sampling=Project.SEQUENCE, show_skip_button=True,
    )
    text = lambda: " ".join(rng.choice(words) for _ in range(40))
    Task.objects.bulk_create(
        [Task(project=project, data={"prompt": f"Question {i}: how do I get better at cooking?",
                                     "left": text(), "right": text()})
         for i in range(tasks)],
        batch_size=2000,
    )
print(json.dumps({"project": project.id, "tokens": tokens}))
"""


@dataclass
class LabelStudio:
    url: str
    project: int
    tokens: list[str]
    process: subprocess.Popen
    database: str


def venv(version: str = VERSION) -> Path:
    """Label Studio's virtual environment, made (pip install label-studio, gunicorn) the first time."""
    folder = BENCH_CACHE / f"label-studio-{version}"
    python = folder / "bin" / "python"
    if not (folder / "bin" / "gunicorn").exists():
        print(f"installing Label Studio {version} into {folder} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                f"label-studio=={version}",
                "gunicorn",
                "psycopg2-binary",
            ],
            check=True,
        )
    return folder


def _package_dir(folder: Path) -> Path:
    found = list((folder / "lib").glob("python3*/site-packages/label_studio"))
    if not found:
        raise SystemExit(f"no label_studio package in {folder}")
    return found[0]


def _env(database: str, pg_url: str, data_dir: Path) -> dict[str, str]:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFLOOP_", "PYTHON"))},
        # Its modules are found from the package folder, the working directory of every command.
        "DJANGO_SETTINGS_MODULE": "core.settings.label_studio",
        "DJANGO_DB": "default",
        "POSTGRE_NAME": database,
        "POSTGRE_USER": url.username or "postgres",
        "POSTGRE_PASSWORD": url.password or "",
        "POSTGRE_HOST": url.host or "127.0.0.1",
        "POSTGRE_PORT": str(url.port or 5432),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "SECRET_KEY": "label-studio-load-benchmark-secret",
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        "SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }


def start(
    pg_admin_url: str, annotators: int, tasks: int, workers: int, data_dir: Path, port: int
) -> LabelStudio:
    """A migrated scratch database with the project, and gunicorn serving Label Studio on `port`."""
    from sqlalchemy import create_engine, text

    folder = venv()
    package = _package_dir(folder)
    database = f"ls_load_{random.randrange(16**8):08x}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    env = _env(database, pg_admin_url, data_dir)
    python = str(folder / "bin" / "python")
    t = time.perf_counter()
    subprocess.run(
        [python, str(package / "manage.py"), "migrate", "--noinput", "-v", "0"],
        env=env,
        cwd=package,
        check=True,
    )
    made = subprocess.run(
        [python, "-c", SETUP, str(annotators), str(tasks), LABEL_CONFIG],
        env=env, check=True, capture_output=True, text=True, cwd=package,
    )  # fmt: skip
    setup = json.loads(made.stdout.strip().splitlines()[-1])
    print(f"Label Studio {VERSION}: migrated and seeded {tasks} tasks in {time.perf_counter() - t:.1f}s")
    log = open(data_dir / "label-studio.log", "wb")  # noqa: SIM115 - gunicorn writes to it until it stops
    process = subprocess.Popen(
        [str(folder / "bin" / "gunicorn"), "core.wsgi:application", "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--chdir", str(package), "--log-level", "warning"],
        env=env, cwd=package, start_new_session=True, stdout=log, stderr=log,
    )  # fmt: skip
    ls = LabelStudio(f"http://127.0.0.1:{port}", setup["project"], setup["tokens"], process, database)
    _wait_until_up(ls)
    return ls


def _wait_until_up(ls: LabelStudio, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Token {ls.tokens[0]}"}
    while time.monotonic() < deadline:
        if ls.process.poll() is not None:
            raise SystemExit("Label Studio's gunicorn exited during start-up")
        try:
            if (
                httpx.get(f"{ls.url}/api/projects/{ls.project}", headers=headers, timeout=5).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("Label Studio did not answer within 120 s")


def stop(ls: LabelStudio, pg_admin_url: str, keep_database: bool = False) -> None:
    from sqlalchemy import create_engine, text

    if ls.process.poll() is None:
        os.killpg(ls.process.pid, signal.SIGTERM)
        try:
            ls.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ls.process.pid, signal.SIGKILL)
            ls.process.wait()
    if not keep_database:
        admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{ls.database}" WITH (FORCE)'))
        admin.dispose()


def choice_body(task: dict, rng: random.Random) -> bytes:
    """A pairwise judgement of `task`, as Label Studio's labeling interface submits it."""
    result = [
        {
            "from_name": "choice",
            "to_name": "left,right",
            "type": "pairwise",
            "value": {"selected": rng.choice(("left", "right"))},
        }
    ]
    return json.dumps({"result": result, "lead_time": rng.uniform(2, 60), "task": task["id"]}).encode()
