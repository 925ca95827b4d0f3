"""How the CLI prints settings: database and broker URLs without the password they may carry."""

from __future__ import annotations


def redact(url: str) -> str:
    """The URL with its user and password replaced by ***, for printing."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
