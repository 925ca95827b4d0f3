"""create_app(): lifespan (engine, policy holder), static files, routers, error pages."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from urllib.parse import quote

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from sqlalchemy.exc import DataError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.broker import install_sender
from app.config import Settings, get_settings
from app.data.db import DATABASE_UNAVAILABLE_ERRORS, make_engine, session_factory
from app.data.statements import open_statements
from app.services.serving import PolicyHolder
from app.services.worker_status import WorkerReportCache
from app.web import openapi_errors
from app.web.body_limits import BodyLimits, BodySizeLimit
from app.web.exposure import LoopbackOnlyWithDefaultSecret, refuse_demo_accounts_in_production
from app.web.rate_limits import RateLimits
from app.web.routes import ROUTERS
from app.web.security import CSRF_COOKIE, PrincipalCache
from app.web.security_headers import SecurityHeaders
from app.web.templating import render

log = logging.getLogger(__name__)
DATABASE_DOWN_DETAIL = (
    "The database is unavailable right now (restarting or unreachable); try again in a few seconds."
)
DATABASE_RETRY_AFTER_SECONDS = 5
DATA_ERROR_DETAIL = "A value in the request is out of range for what it names (an id or a number too large)."


def _wants_html(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/api/", "/healthz")):
        return False
    return "text/html" in request.headers.get("accept", "")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    install_sender()  # routes enqueue rounds, refills and exports by name
    owns_engine = engine is None
    engine = engine or make_engine(settings.sqlalchemy_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await anyio.to_thread.run_sync(refuse_demo_accounts_in_production, settings, app.state.sessionmaker)
        if engine.dialect.name != "sqlite":
            # Handlers run in worker threads and nearly all of them use a pooled connection: with more
            # threads than pooled connections the extra threads queue on the pool instead, or open
            # overflow connections that are closed again on return (a new Postgres process each time).
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size
        # The annotators' next-task and submit statements (on Postgres, on hot connections of the loop).
        statements = await open_statements(engine, settings.db_hot_pool_size)
        app.state.statements = statements
        holder = PolicyHolder(app.state.sessionmaker, settings)
        app.state.policy_holder = holder
        holder.start()
        if settings.gc_freeze:
            # Everything loaded so far (modules, the app, its routes) lives as long as the process.
            # Left in the collector's generations, each full collection walks it all (about 130,000
            # objects: a pause of 70-160 ms in which the process answers nobody); frozen, it is not.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if settings.gc_freeze:
                gc.unfreeze()  # a process that goes on (tests, embedding) gets its memory back
            holder.stop()
            app.state.statements = None
            await statements.close()
            if owns_engine:
                engine.dispose()

    app = FastAPI(
        title="prefloop",
        description="Human-feedback loop: rank responses, train a reward model, run PPO-max, hot-load the policy.",
        version="0.1.0",
        lifespan=lifespan,
        # /docs and /redoc are app.web.routes.api_docs: vendored files instead of a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = session_factory(engine)
    app.state.principal_cache = PrincipalCache(settings.auth_cache_seconds)
    app.state.worker_reports = WorkerReportCache(settings.worker_status_cache_seconds)
    app.state.rate_limits = RateLimits(settings)
    app.state.policy_holder = None
    app.state.statements = None  # opened by the lifespan
    app.mount("/static", StaticFiles(directory=str(settings.static_dir)), name="static")
    for router in ROUTERS:
        app.include_router(router)
    openapi_errors.install(app)

    # Added innermost first: the security headers wrap every answer, refusals included.
    production = settings.environment == "production"
    app.add_middleware(CsrfCookieMiddleware, secure=production)
    app.add_middleware(BodySizeLimit, limits=BodyLimits.from_settings(settings))
    if settings.uses_default_secret:
        app.add_middleware(LoopbackOnlyWithDefaultSecret)
    app.add_middleware(SecurityHeaders, production=production)

    # Starlette's class: also the 404 of a path no route matches, which a person gets as a page too.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 401 and _wants_html(request):
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        if _wants_html(request) and exc.status_code in (403, 404, 409, 413, 429):
            detail = "There is no page at this address." if exc.detail == "Not Found" else exc.detail
            page = render(
                request,
                "error.html",
                {"status": exc.status_code, "detail": detail},
                status_code=exc.status_code,
            )
            page.headers.update(exc.headers or {})  # Retry-After of a 429
            return page
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def database_unavailable(request: Request, exc: Exception):
        # A down or restarting database is an outage, not a bug: one log line rather than a traceback,
        # and a 503 the client can retry (judgements are idempotent, so a retried submit is safe).
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, first_line)
        headers = {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}
        if _wants_html(request):
            context = {"status": 503, "detail": DATABASE_DOWN_DETAIL}
            response = render(request, "error.html", context, status_code=503)
            response.headers.update(headers)
            return response
        return JSONResponse({"detail": DATABASE_DOWN_DETAIL}, status_code=503, headers=headers)

    for error_class in DATABASE_UNAVAILABLE_ERRORS:
        app.add_exception_handler(error_class, database_unavailable)

    @app.exception_handler(DataError)
    async def value_out_of_range(request: Request, exc: DataError):
        # The API bounds ids at the edge; this catches a value a form or page passed on unchecked
        # (a number beyond the column's range): the request's fault, said as such, not a 500.
        log.info("value refused by the database on %s %s: %s", request.method, request.url.path, exc.orig)
        return JSONResponse({"detail": DATA_ERROR_DETAIL}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        # Say which field is wrong and why, in words a client can act on.
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "; ".join(problems), "errors": jsonable_errors(exc)}, status_code=422)

    return app


class CsrfCookieMiddleware:
    """Sets the CSRF cookie when a request minted a token (first page view of a browser).

    Plain ASGI rather than @app.middleware("http"): it only touches the response headers, and the
    wrapping of BaseHTTPMiddleware costs a noticeable share of a hot API request.
    """

    def __init__(self, app, *, secure: bool = False) -> None:
        self.app = app
        self.secure = secure  # production is served over HTTPS: never send the token in the clear

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                token = scope.get("state", {}).get("new_csrf_token")
                if token:
                    cookie = SimpleCookie()
                    cookie[CSRF_COOKIE] = token
                    cookie[CSRF_COOKIE]["path"] = "/"
                    cookie[CSRF_COOKIE]["samesite"] = "lax"
                    if self.secure:
                        cookie[CSRF_COOKIE]["secure"] = True
                    MutableHeaders(scope=message).append("set-cookie", cookie.output(header="").strip())
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def jsonable_errors(exc: RequestValidationError) -> list[dict]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
