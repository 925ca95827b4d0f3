"""A built wheel, installed away from the checkout, carries everything: it migrates, loads the demo, serves.

The wheel is built from a copy of the working tree (a build in place would write build/ into the
checkout), installed with --target into a folder put first on PYTHONPATH, and every command runs from
an unrelated directory, so nothing can be read from the checkout by accident.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.web.server_thread import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Top-level folders that are not part of the source: environments, build output, local data.
NOT_SOURCE = {".git", ".venv", "var", "build", "dist", "test-artifacts", ".pytest_cache", ".ruff_cache"}
# Folders kept at the top of the repository and shipped inside the package as app/_assets/<folder>.
ASSET_FOLDERS = ("templates", "static", "migrations")


@dataclass
class Installed:
    wheel: Path
    site: Path


def _copy_source(dest: Path) -> None:
    def skip(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == ROOT
        return {
            name
            for name in names
            if name == "__pycache__" or name.endswith((".pyc", ".egg-info")) or (top and name in NOT_SOURCE)
        }

    shutil.copytree(ROOT, dest, ignore=skip)


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def _source_files(folder: Path) -> list[Path]:
    return [
        path
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    _copy_source(work / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(work / "dist"),
            str(work / "src"),
        ]
    )
    (wheel,) = (work / "dist").glob("prefloop-*.whl")
    _run([*pip, "install", "--no-deps", "-q", "--target", str(work / "site"), str(wheel)])
    return Installed(wheel=wheel, site=work / "site")


def test_the_wheel_carries_the_code_templates_static_files_migrations_and_demo_data(installed: Installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {
        f"app/_assets/{folder}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder in ASSET_FOLDERS
        for path in _source_files(ROOT / folder)
    }
    expected |= {
        path.relative_to(ROOT).as_posix()
        for package in ("app", "workers")
        for path in _source_files(ROOT / package)
    }
    assert "app/_assets/templates/login.html" in expected and "app/_assets/migrations/env.py" in expected
    assert "app/services/demo/prompts.jsonl" in expected
    assert sorted(expected - names) == []
    # Only prefloop's own packages land at the top of site-packages.
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"app", "workers"}


@pytest.fixture
def away_from_the_checkout(installed: Installed, tmp_path: Path, tiny_model_dir: Path) -> dict:
    """subprocess arguments of a deployment: the installed copy first on the path, fresh settings, a
    working directory that is not the checkout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFLOOP_")}
    env |= {
        "PYTHONPATH": str(installed.site),
        "PREFLOOP_DATA_DIR": str(tmp_path / "data"),
        "PREFLOOP_ENVIRONMENT": "development",
        "PREFLOOP_DEVICE": "cpu",
        # A folder as the base policy: no GGUF conversion of SmolLM2.
        "PREFLOOP_BASE_MODEL": str(tiny_model_dir),
    }
    return {"env": env, "cwd": tmp_path}


def test_an_installed_wheel_migrates_loads_the_demo_and_serves_pages(
    installed: Installed, away_from_the_checkout: dict
):
    show_paths = (
        "import app, app.paths as p; print(app.__file__, p.TEMPLATES_DIR, p.STATIC_DIR, p.MIGRATIONS_DIR)"
    )
    where = _run([sys.executable, "-c", show_paths], **away_from_the_checkout).stdout.split()
    assert all(Path(path).is_relative_to(installed.site) for path in where), where

    # The console script pip wrote from the entry point: what users run, whichever module it names.
    prefloop = str(installed.site / "bin" / "prefloop")
    assert "latest schema" in _run([prefloop, "migrate"], **away_from_the_checkout).stdout
    init = _run([prefloop, "init", "--demo"], **away_from_the_checkout).stdout
    assert "base policy v0 registered" in init
    assert "demo users: admin, annotator, researcher" in init and "demo prompt set: " in init

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = away_from_the_checkout["cwd"] / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [prefloop, "serve", "--no-worker", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            **away_from_the_checkout,
        )
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{base}/healthz"):
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)

        with httpx.Client(base_url=base, follow_redirects=False) as browser:
            page = browser.get("/login")
            assert page.status_code == 200 and "Log in" in page.text
            for path in _source_files(ROOT / "static"):
                shipped = browser.get(f"/static/{path.relative_to(ROOT / 'static').as_posix()}")
                assert shipped.status_code == 200 and shipped.content == path.read_bytes(), path
            login = browser.post(
                "/login",
                data={
                    "username": "annotator",
                    "password": "annotator-demo",
                    "csrf_token": browser.cookies["prefloop_csrf"],
                },
            )
            assert login.status_code == 303 and login.headers["location"] == "/annotate"
            assert browser.get("/annotate").status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
