"""Annotator pseudonyms: a keyed hash of the user id under the deployment's pseudonym key.

The pseudonym key is its own setting (PREFLOOP_PSEUDONYM_KEY), not the secret that signs sessions:
that secret is rotated after a leak, and rotating it must not rename every annotator in datasets
already published. So the same annotator gets the same pseudonym in every export of a deployment,
another deployment cannot link them, and nobody without the key can go from a pseudonym back to a
user id by hashing candidate ids. Usernames and emails never enter the hash or the output.

Outside production an unset key is generated once and kept in DATA_DIR/pseudonym.key (readable by
its owner only), so the embedded default needs no setting and keeps its pseudonyms across restarts.
Each export records the key's id (a short hash of it, which reveals nothing of the key), so readers
can tell whether two datasets' pseudonyms are comparable.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from app.config import Settings

log = logging.getLogger(__name__)

PREFIX = "annotator-"
KEY_FILE = "pseudonym.key"
# Domain separation: the pseudonym key is only ever used through this derivation.
_CONTEXT = b"prefloop/export/annotator-pseudonym/v1"
_KEY_ID_CONTEXT = b"prefloop/export/pseudonym-key-id/v1"


def key_id(key: str) -> str:
    """A short public name of a pseudonym key: equal ids mean comparable pseudonyms."""
    return hmac.new(key.encode(), _KEY_ID_CONTEXT, hashlib.sha256).hexdigest()[:12]


class Pseudonymizer:
    def __init__(self, key: str, length: int = 16):
        if not key:
            raise ValueError("a pseudonym key is required")
        self._key = hmac.new(key.encode(), _CONTEXT, hashlib.sha256).digest()
        self._length = length
        self._cache: dict[int, str] = {}  # one entry per annotator: bounded by the number of users
        self.key_id = key_id(key)

    def __call__(self, user_id: int) -> str:
        name = self._cache.get(user_id)
        if name is None:
            digest = hmac.new(self._key, str(int(user_id)).encode(), hashlib.sha256).hexdigest()
            name = self._cache[user_id] = PREFIX + digest[: self._length]
        return name


def pseudonym(user_id: int, key: str) -> str:
    """The pseudonym of one annotator (e.g. 'annotator-3f9c…')."""
    return Pseudonymizer(key)(user_id)


def pseudonym_key(settings: Settings) -> str:
    """The deployment's pseudonym key: the setting, else the one kept in the data folder (made once).

    Production settings refuse to load without the setting, so the file is an embedded and
    development convenience only.
    """
    if settings.pseudonym_key:
        return settings.pseudonym_key
    return _stored_key(settings.resolved_data_dir / KEY_FILE)


def _stored_key(path: Path) -> str:
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private temporary file, then linked into place: link fails when another
    # process got there first, so every process ends up reading the one key that won.
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
            log.info("generated the annotator pseudonym key in %s; keep it with the data", path)
        except FileExistsError:
            pass
    finally:
        temp.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> str:
    key = path.read_text(encoding="utf-8").strip()
    if not key:
        raise ValueError(
            f"{path} is empty; delete it to generate a new pseudonym key, or set PREFLOOP_PSEUDONYM_KEY"
        )
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; `chmod 600` it", path)
    return key
