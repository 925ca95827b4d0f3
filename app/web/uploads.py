"""Uploaded prompt-set files: the size limit, and reading an upload without holding more than it."""

from __future__ import annotations

from fastapi import UploadFile

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a few hundred thousand prompts; larger sets go in several files


def read_within_limit(file: UploadFile) -> bytes | None:
    """The file's bytes, or None when it is larger than MAX_UPLOAD_BYTES (only one byte over is read)."""
    data = file.file.read(MAX_UPLOAD_BYTES + 1)
    return None if len(data) > MAX_UPLOAD_BYTES else data
