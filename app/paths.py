"""Where the files that ship beside the code live: templates, static files and database migrations.

A source checkout keeps them in top-level folders next to app/; a built wheel carries the same
folders inside the package, under app/_assets/ (setup.py maps them there). Looking in the package
first means an installed copy never picks up a checkout that happens to sit beside it.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_BUNDLED_DIR = _PACKAGE_DIR / "_assets"
_CHECKOUT_DIR = _PACKAGE_DIR.parent


def shipped_folder(name: str) -> Path:
    """The folder `name` (templates, static, migrations) of this copy of prefloop."""
    bundled = _BUNDLED_DIR / name
    return bundled if bundled.is_dir() else _CHECKOUT_DIR / name


TEMPLATES_DIR = shipped_folder("templates")
STATIC_DIR = shipped_folder("static")
MIGRATIONS_DIR = shipped_folder("migrations")
