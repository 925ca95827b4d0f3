"""The API reference pages, /docs (Swagger UI) and /redoc (Redoc), served from vendored files.

FastAPI's own pages load both from a CDN, so they are blank without internet and need a script
source outside our own; these load static/vendor/ and start from static/api-docs.js (no inline
script). Like the OpenAPI schema they describe, they are public.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from app.web.security import public
from app.web.templating import render

router = APIRouter(tags=["docs"], include_in_schema=False, dependencies=[Depends(public)])

SWAGGER_UI = "vendor/swagger_ui_5_35_0"
REDOC = "vendor/redoc_2_5_4"


@router.get("/docs")
def swagger_ui(request: Request):
    return render(
        request, "docs/swagger.html", {"openapi_url": request.app.openapi_url, "vendor": SWAGGER_UI}
    )


@router.get("/redoc")
def redoc(request: Request):
    return render(request, "docs/redoc.html", {"openapi_url": request.app.openapi_url, "vendor": REDOC})


@router.get("/favicon.ico")
def favicon(request: Request) -> FileResponse:
    """Browsers ask for /favicon.ico whatever the page says; answer with the same icon."""
    icon = request.app.state.settings.static_dir / "favicon.svg"
    return FileResponse(icon, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})
