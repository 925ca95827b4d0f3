"""What the fuzzing of /openapi.json found, pinned: ids beyond the database's integers are a 422, not
a 500, and the document describes the error answers the app really gives."""

from __future__ import annotations

import pytest

from app.services.row_ids import MAX_ROW_ID

TOO_BIG = MAX_ROW_ID + 1
BEYOND_INT64 = 2**70


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        ("annotator", "POST", f"/api/tasks/{TOO_BIG}/annotation"),
        ("admin", "GET", f"/api/rounds/{TOO_BIG}"),
        ("admin", "POST", f"/api/rounds/{TOO_BIG}/cancel"),
        ("admin", "GET", f"/api/runs/{TOO_BIG}"),
        ("admin", "GET", f"/api/runs/{TOO_BIG}/metrics"),
        ("admin", "POST", f"/api/policies/{TOO_BIG}/promote"),
        ("researcher", "GET", f"/api/exports/{TOO_BIG}"),
        ("researcher", "GET", f"/api/exports/{TOO_BIG}/download"),
        ("researcher", "POST", f"/api/exports/{TOO_BIG}/cancel"),
        ("researcher", "GET", f"/api/exports/{TOO_BIG}/card"),
    ],
)
def test_an_id_beyond_the_database_integer_is_a_422_naming_it(client, api_headers, role, method, path):
    body = {"ranking": [[1]]} if method == "POST" and "annotation" in path else None
    response = client.request(method, path, json=body, headers=api_headers(role))
    assert response.status_code == 422, response.text
    assert "less than or equal to 2147483647" in response.json()["detail"]


def test_ranking_ids_beyond_the_database_integer_are_refused_before_the_database(client, api_headers):
    response = client.post(
        "/api/tasks/1/annotation", json={"ranking": [[BEYOND_INT64], [-4]]}, headers=api_headers("annotator")
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("ranking.0.0: Input should be less than or equal to")


def test_export_filters_beyond_the_database_integer_are_refused(client, api_headers):
    response = client.get(
        "/api/exports/stream",
        params={"prompt_set_ids": [str(-(2**40)), "3"], "format": "pairwise"},
        headers=api_headers("researcher"),
    )
    assert response.status_code == 422, response.text
    assert "prompt_set_ids" in response.json()["detail"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQLite's integers have no such bound
def test_a_page_given_an_id_beyond_the_database_integer_answers_422_not_500(client, login):
    login("admin")
    response = client.get(f"/admin/rounds/{TOO_BIG}", headers={"Accept": "text/html"})
    assert response.status_code == 422, response.text
    assert "out of range" in response.json()["detail"]


def test_the_document_gives_every_operation_its_error_answers(client):
    document = client.get("/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "503" in codes, (method, path)
            if path != "/healthz":
                assert {"401", "403"} <= codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if "requestBody" in operation:
                assert "400" in codes, (method, path)
    validation = document["components"]["schemas"]["HTTPValidationError"]
    assert validation["properties"]["detail"]["type"] == "string"  # one sentence, as the app sends it
    download = document["paths"]["/api/exports/{run_id}/download"]["get"]["responses"]["200"]
    assert set(download["content"]) == {"application/zip"}
    assert "404" in document["paths"]["/api/audit"]["get"]["responses"]  # an unknown `user` filter
    card = document["paths"]["/api/exports/{run_id}/card"]["get"]["responses"]["200"]
    assert "text/markdown" in card["content"]


def test_the_documented_validation_error_is_what_the_app_sends(client, api_headers):
    response = client.post(
        "/api/tasks/1/annotation", json={"ranking": "best"}, headers=api_headers("annotator")
    )
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"].startswith("ranking:")
    assert all({"loc", "msg", "type"} <= set(error) for error in body["errors"])
