"""One router per area; create_app() includes every router listed here."""

from app.routes import api_rounds, auth, health, quality

ROUTERS = [health.router, auth.router, api_rounds.router, quality.router]
