"""Every route declares who may call it; anonymous and wrong-role requests are refused everywhere."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute

from app.data.models import ROLES
from app.web.main import create_app


def _allowed_roles(route: APIRoute) -> frozenset[str] | None:
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        roles = getattr(dependant.call, "allowed_roles", None)
        if roles is not None:
            return roles
        stack.extend(dependant.dependencies)
    return None


def _routes(app) -> list[APIRoute]:
    """Every API route of the app. create_app() includes ROUTERS without a prefix, so paths are final."""
    from app.web.routes import ROUTERS

    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    routes += [r for r in app.routes if isinstance(r, APIRoute)]
    return routes


def _concrete_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_declares_its_roles(settings, engine):
    app = create_app(settings, engine)
    undeclared = [f"{sorted(r.methods)} {r.path}" for r in _routes(app) if _allowed_roles(r) is None]
    assert undeclared == []


def test_public_routes_are_only_the_expected_ones(settings, engine):
    app = create_app(settings, engine)
    public = {r.path for r in _routes(app) if _allowed_roles(r) == frozenset({"anonymous"})}
    assert public <= {"/", "/login", "/healthz", "/docs", "/redoc", "/favicon.ico"}


def test_anonymous_requests_are_refused(client):
    checked = 0
    for route in _routes(client.app):
        if _allowed_roles(route) == frozenset({"anonymous"}):
            continue
        for method in route.methods - {"HEAD"}:
            path = _concrete_path(route.path)
            api = client.request(method, path, headers={"Accept": "application/json"}, follow_redirects=False)
            assert api.status_code in (401, 403), (
                f"{method} {path} answered {api.status_code} to an anonymous client"
            )
            page = client.request(method, path, headers={"Accept": "text/html"}, follow_redirects=False)
            assert page.status_code in (303, 401, 403), f"{method} {path} answered {page.status_code}"
            if page.status_code == 303:
                assert page.headers["location"].startswith("/login")
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("role", ROLES)
def test_wrong_role_requests_are_refused(client, api_headers, role):
    headers = api_headers(role) | {"Accept": "application/json"}
    for route in _routes(client.app):
        allowed = _allowed_roles(route)
        if allowed is None or "anonymous" in allowed or role in allowed:
            continue
        for method in route.methods - {"HEAD"}:
            path = _concrete_path(route.path)
            response = client.request(method, path, headers=headers, follow_redirects=False)
            assert response.status_code == 403, f"{role} got {response.status_code} from {method} {path}"
            assert role in response.json()["detail"]
