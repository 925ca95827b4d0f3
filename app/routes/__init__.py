"""One router per area; create_app() includes every router listed here."""

from app.routes import (
    admin,
    admin_prompts,
    annotate,
    api,
    api_rounds,
    auth,
    export,
    health,
    playground,
    quality,
)

ROUTERS = [
    health.router,
    auth.router,
    api_rounds.router,
    quality.router,
    admin.router,
    playground.router,
    annotate.router,
    api.router,
    admin_prompts.router,
    export.router,
]
