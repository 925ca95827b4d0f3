"""Annotator pseudonyms: a keyed hash of the user id, stable within one deployment.

The key is derived from the deployment's secret key, so the same annotator gets the same pseudonym in
every export of this deployment, another deployment cannot link them, and nobody without the secret can
go from a pseudonym back to a user id by hashing candidate ids. Usernames and emails never enter the hash
or the output.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "annotator-"
# Domain separation: the secret key also signs sessions and CSRF tokens; this key is only for pseudonyms.
_CONTEXT = b"prefloop/export/annotator-pseudonym/v1"


class Pseudonymizer:
    def __init__(self, secret_key: str, length: int = 16):
        self._key = hmac.new(secret_key.encode(), _CONTEXT, hashlib.sha256).digest()
        self._length = length
        self._cache: dict[int, str] = {}  # one entry per annotator: bounded by the number of users

    def __call__(self, user_id: int) -> str:
        name = self._cache.get(user_id)
        if name is None:
            digest = hmac.new(self._key, str(int(user_id)).encode(), hashlib.sha256).hexdigest()
            name = self._cache[user_id] = PREFIX + digest[: self._length]
        return name


def pseudonym(user_id: int, secret_key: str) -> str:
    """The pseudonym of one annotator (e.g. 'annotator-3f9c…')."""
    return Pseudonymizer(secret_key)(user_id)
