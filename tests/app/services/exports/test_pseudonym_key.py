"""Annotator pseudonyms are keyed by a pseudonym key of their own: rotating the session secret keeps them,
an unset key is generated once into the data folder (private), production requires one, and every export
names the key's id in its dataset card and result."""

from __future__ import annotations

import json
import stat
import zipfile

import pytest
from fastapi.testclient import TestClient

from app.config import Settings, get_settings, reset_settings
from app.data.db import session_factory
from app.data.models import Run
from app.services.accounts import create_api_token
from app.services.exports import ExportSpec, pseudonym
from app.services.exports.jobs import create_export_run
from app.services.exports.pseudonym import KEY_FILE, key_id, pseudonym_key
from app.web.main import create_app
from tests.world import World, export_history
from workers.runs.export import run_export_job

LONG = "x" * 40


def streamed_annotators(settings: Settings, engine, token: str) -> set[str]:
    with TestClient(create_app(settings, engine)) as client:
        response = client.get(
            "/api/exports/stream",
            params={"format": "pairwise", "split_mode": "none"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    return {json.loads(line)["annotator"] for line in response.text.splitlines()}


def test_rotating_the_session_secret_keeps_every_pseudonym(settings, engine, db, monkeypatch):
    seeded = export_history(World(db))
    researcher = World(db).user("rotating-researcher", role="researcher")
    token = create_api_token(db, researcher, "test")
    db.commit()
    monkeypatch.delenv("PREFLOOP_PSEUDONYM_KEY")  # the embedded default: the key lives in the data folder
    reset_settings()
    before = Settings(**{**get_settings().model_dump(), "secret_key": "old-secret-" + "a" * 40})
    after = Settings(**{**before.model_dump(), "secret_key": "rotated-secret-" + "b" * 40})

    names_before = streamed_annotators(before, engine, token)
    names_after = streamed_annotators(after, engine, token)

    assert names_before == names_after and len(names_before) == 3
    stored = (settings.resolved_data_dir / KEY_FILE).read_text().strip()
    assert pseudonym(seeded.users["alice"], stored) in names_after
    assert pseudonym(seeded.users["alice"], after.secret_key) not in names_after


def test_an_unset_key_is_generated_once_and_kept_private(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", environment="development")
    first = pseudonym_key(settings)
    path = tmp_path / "data" / KEY_FILE
    assert len(first) >= 48 and path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pseudonym_key(settings) == first
    assert pseudonym_key(Settings(data_dir=tmp_path / "data", secret_key="another-" + LONG)) == first
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left behind
    assert pseudonym_key(Settings(data_dir=tmp_path / "data", pseudonym_key="set-" + LONG)) == "set-" + LONG


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("", "PREFLOOP_PSEUDONYM_KEY is unset"), ("short", "at least 32"), ("s" * 40, "must differ")],
)
def test_production_requires_a_pseudonym_key_of_its_own(key, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings(environment="production", secret_key="s" * 40, pseudonym_key=key)
    assert Settings(environment="production", secret_key="s" * 40, pseudonym_key="p" * 40).pseudonym_key


def test_an_export_names_its_pseudonym_key_id_in_the_card_and_result(settings, engine, db):
    export_history(World(db))
    run = create_export_run(db, ExportSpec(format="pairwise", split_mode="none"), None)
    sessions = session_factory(engine)
    assert run_export_job(run.id, sessions) == "succeeded"
    with sessions() as fresh:
        result = fresh.get(Run, run.id).result
    expected = key_id(settings.pseudonym_key)
    assert result["pseudonym_key_id"] == expected and len(expected) == 12
    assert expected not in settings.pseudonym_key
    with zipfile.ZipFile(result["path"]) as archive:
        card = archive.read("README.md").decode()
    assert f"Pseudonym key id: `{expected}`" in card
    assert key_id(settings.pseudonym_key) != key_id(settings.secret_key)
