"""One router per area; create_app() includes every router listed here."""

from app.routes import auth, health

ROUTERS = [health.router, auth.router]
