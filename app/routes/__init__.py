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

# Requests are matched against the routers in this order: the annotation API and pages, which take
# nearly all of the traffic, come first.
ROUTERS = [
    api.router,
    annotate.router,
    health.router,
    auth.router,
    api_rounds.router,
    quality.router,
    admin.router,
    playground.router,
    admin_prompts.router,
    export.router,
]
