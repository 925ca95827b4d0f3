"""One router per area; create_app() includes every router listed here."""

from app.web.routes import (
    admin_dashboard,
    admin_policies,
    admin_prompts,
    admin_rounds,
    admin_users,
    annotate,
    api,
    api_docs,
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
    admin_dashboard.router,
    admin_rounds.router,
    admin_policies.router,
    playground.router,
    admin_prompts.router,
    admin_users.router,
    export.router,
    api_docs.router,
]
