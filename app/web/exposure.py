"""Refusals that keep a reachable web app from running insecurely, however it was started.

`prefloop serve` checks the same before it starts; these cover uvicorn or another server pointed
at the app factory directly.
"""

from __future__ import annotations

import ipaddress
import logging

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, default_secret_refusal
from app.services.demo import active_demo_accounts, demo_accounts_refusal

log = logging.getLogger(__name__)


class DemoAccountsActive(RuntimeError):
    """Production start-up found demo accounts that anyone could log in with."""


def refuse_demo_accounts_in_production(settings: Settings, factory: sessionmaker[Session]) -> None:
    """Raise DemoAccountsActive in production while a demo account is active (run at start-up)."""
    if settings.environment != "production":
        return
    with factory() as db:
        names = active_demo_accounts(db)
    if names:
        raise DemoAccountsActive(demo_accounts_refusal(names))


def _reached_over_the_network(scope) -> str | None:
    """The local address a request arrived on when it is a network interface, not loopback."""
    server = scope.get("server")
    if not server:
        return None  # a Unix socket: only this machine can connect
    try:
        address = ipaddress.ip_address(server[0])
    except ValueError:
        return None  # not a socket address (an in-process test client)
    return None if address.is_loopback else str(address)


class LoopbackOnlyWithDefaultSecret:
    """With the public development secret, answers 503 to every request that came in over a network
    interface, since anyone there could sign an admin's session cookie."""

    def __init__(self, app) -> None:
        self.app = app
        self._logged = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            address = _reached_over_the_network(scope)
            if address is not None:
                message = default_secret_refusal(address)
                if not self._logged:
                    log.error(message)
                    self._logged = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await send({"type": "http.response.body", "body": message.encode()})
                return
        await self.app(scope, receive, send)
