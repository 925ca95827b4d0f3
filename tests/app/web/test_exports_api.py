"""The export API, the research page, the export run on the default queue, and `prefloop export`."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from app.data.models import Run
from tests.app.web.test_route_roles import _allowed_roles, _concrete_path, _routes
from tests.world import USERNAMES, World, export_history
from workers.runs.export import run_export_job

EXPORT_ENDPOINTS = [
    ("GET", "/research"),
    ("GET", "/research/exports"),
    ("POST", "/research/exports"),
    ("GET", "/api/exports/formats"),
    ("GET", "/api/exports/stream"),
    ("GET", "/api/exports"),
    ("POST", "/api/exports"),
    ("GET", "/api/exports/1"),
    ("GET", "/api/exports/1/download"),
    ("GET", "/api/exports/1/card"),
    ("POST", "/api/exports/1/cancel"),
]


def load_zip(content: bytes, tmp_path):
    import datasets

    folder = tmp_path / "unzipped"
    zipfile.ZipFile(io.BytesIO(content)).extractall(folder)
    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf"))


def test_researcher_queues_an_export_and_downloads_the_dataset(client, api_headers, db, tmp_path):
    export_history(World(db))
    headers = api_headers("researcher")
    queued = client.post("/api/exports", json={"format": "pairwise", "split_mode": "none"}, headers=headers)
    assert queued.status_code == 202, queued.text
    body = queued.json()
    assert body["status"] == "queued" and body["download_url"] is None
    assert body["spec"]["layout"] == "zip"
    assert client.get(f"/api/exports/{body['id']}/download", headers=headers).status_code == 409

    # What the worker on the default queue does with the message:
    assert run_export_job(body["id"], client.app.state.sessionmaker) == "succeeded"
    assert (
        run_export_job(body["id"], client.app.state.sessionmaker) is None
    )  # a redelivery does nothing twice

    done = client.get(body["status_url"], headers=headers).json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["result"]["total_rows"] == 13 and done["result"]["rows"] == {"train": 13}
    download = client.get(done["download_url"], headers=headers)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    ds = load_zip(download.content, tmp_path)
    assert ds["train"].num_rows == 13
    card = client.get(f"/api/exports/{body['id']}/card", headers=headers)
    assert card.status_code == 200 and "configs:" in card.text and "## Agreement" in card.text
    listed = client.get("/api/exports", headers=headers).json()
    assert [run["id"] for run in listed] == [body["id"]]


def test_stream_gives_jsonl_rows_with_their_split(client, api_headers, db):
    seeded = export_history(World(db))
    headers = api_headers("researcher")
    response = client.get(
        "/api/exports/stream", params={"format": "arena", "split_mode": "stored"}, headers=headers
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 9 and {row["split"] for row in lines} == {"train", "test"}
    assert all(row["model_a"] != row["model_b"] for row in lines)
    limited = client.get("/api/exports/stream", params={"format": "pairwise", "limit": 2}, headers=headers)
    assert len(limited.text.splitlines()) == 2
    only_safety = client.get(
        "/api/exports/stream",
        params={"format": "hh_rlhf", "prompt_set_ids": [seeded.sets["safety"]]},
        headers=headers,
    )
    assert [json.loads(x)["chosen"] for x in only_safety.text.splitlines()] == [
        "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that."
    ]
    for blob in (response.content, limited.content):
        assert not any(name.encode() in blob for name in USERNAMES)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"format": "csv"}, "format"),
        ({"min_agreement": 2}, "min_agreement"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "since must be earlier"),
        (
            {"format": "pairwise_text", "text_template": "chat_template", "chat_template_version": 99},
            "no policy",
        ),
        ({"limit": 0}, "limit"),
    ],
)
def test_bad_export_requests_get_a_422_that_says_what_to_fix(client, api_headers, db, params, fragment):
    export_history(World(db))
    response = client.get("/api/exports/stream", params=params, headers=api_headers("researcher"))
    assert response.status_code == 422 and fragment in response.json()["detail"]


def test_cancel_an_export_run(client, api_headers, db):
    headers = api_headers("admin")
    run_id = client.post("/api/exports", json={}, headers=headers).json()["id"]
    cancelled = client.post(f"/api/exports/{run_id}/cancel", headers=headers)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"/api/exports/{run_id}/cancel", headers=headers).status_code == 409
    assert run_export_job(run_id, client.app.state.sessionmaker) is None  # a cancelled run is never claimed
    assert client.get("/api/exports/999", headers=headers).status_code == 404


def test_annotators_cannot_export_and_anonymous_users_must_log_in(client, api_headers):
    annotator = api_headers("annotator") | {"Accept": "application/json"}
    for method, path in EXPORT_ENDPOINTS:
        refused = client.request(method, path, headers=annotator)
        assert refused.status_code == 403, (method, path, refused.status_code)
        assert "researcher or admin" in refused.json()["detail"]
        anonymous = client.request(method, path, headers={"Accept": "application/json"})
        assert anonymous.status_code == 401, (method, path)


def test_researchers_cannot_reach_admin_routes(client, api_headers):
    headers = api_headers("researcher") | {"Accept": "application/json"}
    checked = 0
    for route in _routes(client.app):
        allowed = _allowed_roles(route)
        if allowed is None or "anonymous" in allowed or "researcher" in allowed:
            continue
        for method in route.methods - {"HEAD"}:
            path = _concrete_path(route.path)
            assert client.request(method, path, headers=headers).status_code == 403, (method, path)
            checked += 1
    admin_only = [r.path for r in _routes(client.app) if _allowed_roles(r) == frozenset({"admin"})]
    assert checked >= len(admin_only) >= 1


def test_research_page_queues_from_the_form_and_polls_progress(client, login, db):
    seeded = export_history(World(db))
    login("researcher")
    page = client.get("/research")
    assert page.status_code == 200 and "Research exports" in page.text and "safety" in page.text
    assert "Vary" in page.headers and 'hx-trigger="every 2s"' not in page.text  # nothing to poll yet
    form = {
        "format": "rankings",
        "file_format": "jsonl",
        "prompt_set_ids": [str(seeded.sets["general"])],
        "min_agreement": "",
        "min_annotators": "1",
        "exclude_skipped": "on",
        "split_mode": "hash",
        "test_fraction": "0.2",
        "seed": "5",
        "license": "cc-by-4.0",
        "name": "from the form",
    }
    fragment = client.post("/research/exports", data=form, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "queued" in fragment.text
    assert 'hx-trigger="every 2s"' in fragment.text and "<html" not in fragment.text
    run = db.query(Run).filter(Run.kind == "export").one()
    assert run.config["format"] == "rankings" and run.config["seed"] == 5
    assert run.config["prompt_set_ids"] == [seeded.sets["general"]] and run.config["exclude_flagged"] is False
    assert run_export_job(run.id, client.app.state.sessionmaker) == "succeeded"
    finished = client.get("/research/exports", headers={"HX-Request": "true"})
    assert "Download zip" in finished.text and 'hx-trigger="every 2s"' not in finished.text

    bad = client.post("/research/exports", data=form | {"min_agreement": "2"}, headers={"HX-Request": "true"})
    assert bad.status_code == 200 and "Not queued" in bad.text and "min_agreement" in bad.text
    plain = client.post("/research/exports", data=form, follow_redirects=False)
    assert plain.status_code == 303 and plain.headers["location"] == "/research"


def test_export_task_runs_on_the_default_queue():
    import workers.tasks  # noqa: F401  (registers the task)
    from workers.celery_app import celery_app

    assert "workers.tasks.export_dataset" in celery_app.tasks
    assert celery_app.amqp.router.route({}, "workers.tasks.export_dataset")["queue"].name == "default"


def test_prefloop_export_command(settings, db, tmp_path):
    import datasets
    from click.testing import CliRunner

    from app.cli import main

    export_history(World(db))
    out = tmp_path / "hh"
    result = CliRunner().invoke(
        main,
        [
            "export",
            str(out),
            "--format",
            "hh_rlhf",
            "--file-format",
            "jsonl",
            "--prompt-set",
            "general",
            "--split",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "12 rows" in result.output and "split seed 0" in result.output
    assert datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))["train"].num_rows == 12
    again = CliRunner().invoke(main, ["export", str(out)])
    assert again.exit_code != 0 and "exists already" in again.output
    zipped = CliRunner().invoke(
        main, ["export", str(tmp_path / "a.zip"), "--min-annotators", "2", "--seed", "4"]
    )
    assert zipped.exit_code == 0, zipped.output
    assert zipfile.is_zipfile(tmp_path / "a.zip")
    unknown = CliRunner().invoke(main, ["export", str(tmp_path / "b"), "--prompt-set", "nope"])
    assert unknown.exit_code == 2 and "no prompt set 'nope'" in unknown.output
