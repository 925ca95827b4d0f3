"""Jinja2 setup: one template serves a page and its htmx fragment (a named block)."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from jinja2.runtime import Context
from markupsafe import Markup

from app.common.errors import public_error
from app.config import get_settings
from app.web.markdown import render_markdown
from app.web.security import CSRF_FIELD, CSRF_HEADER, csrf_token_for

_templates: Jinja2Templates | None = None

# The admin sub-navigation, in order; a link shows only where the app installs that page's route.
ADMIN_NAV = (
    ("/admin", "Dashboard"),
    ("/admin/rounds", "Rounds"),
    ("/admin/runs", "Runs"),
    ("/admin/policies", "Policies"),
    ("/admin/playground", "Playground"),
    ("/admin/prompts", "Prompts"),
    ("/admin/quality", "Quality"),
    ("/admin/users", "Users"),
    ("/admin/audit", "Audit log"),
)


@pass_context
def admin_nav_links(context: Context) -> list[tuple[str, str]]:
    """The admin sub-navigation links whose pages the app serving this request has installed."""
    request: Request = context["request"]
    paths = _route_paths(request.app.routes)
    return [(href, label) for href, label in ADMIN_NAV if href in paths]


def _route_paths(routes: list[Any]) -> set[str]:
    """Paths of these routes and of the routers included among them (FastAPI keeps an included
    router as one entry holding the original; create_app includes them without a prefix)."""
    paths: set[str] = set()
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            paths |= _route_paths(included.routes)
        elif (path := getattr(route, "path", None)) is not None:
            paths.add(path)
    return paths


def templates() -> Jinja2Templates:
    global _templates
    if _templates is None:
        # autoescape is on for .html: every model output and prompt is untrusted text.
        _templates = Jinja2Templates(directory=str(get_settings().templates_dir))
        env = _templates.env
        env.globals["csrf_field_name"] = CSRF_FIELD
        env.globals["csrf_header_name"] = CSRF_HEADER
        # templates/admin/_nav.html calls this, so any admin page can include the navigation.
        env.globals["admin_nav_links"] = admin_nav_links
        env.filters["markdown"] = lambda text: Markup(render_markdown(text or ""))
        # Run, round and export errors: the first line (message and error id), never a traceback.
        env.filters["public_error"] = public_error
    return _templates


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    block: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """Render a page, or only `block` of it when htmx asks (same template, same context)."""
    ctx = {"request": request, "principal": getattr(request.state, "principal", None)}
    ctx["csrf_token"] = csrf_token_for(request)
    ctx.update(context or {})
    if block and is_htmx(request):
        template = templates().env.get_template(name)
        body = "".join(template.blocks[block](template.new_context(ctx)))
        response = HTMLResponse(body, status_code=status_code)
    else:
        response = templates().TemplateResponse(request, name, ctx, status_code=status_code)
    response.headers["Vary"] = "HX-Request"
    if ctx["principal"] is not None:
        # A signed-in page names its user and shows their work: never kept by the browser, so Back
        # after logging out asks the server again (and meets the login form).
        response.headers["Cache-Control"] = "no-store"
    return response
