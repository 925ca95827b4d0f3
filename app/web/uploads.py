"""Uploaded prompt-set files: reading an upload without holding more than its size limit.

The request body was already counted against PREFLOOP_MAX_UPLOAD_BYTES (plus multipart framing)
as it streamed in (app/web/body_limits.py); this checks the file itself.
"""

from __future__ import annotations

from fastapi import UploadFile


def read_within_limit(file: UploadFile, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than `limit` (only one byte over is read)."""
    data = file.file.read(limit + 1)
    return None if len(data) > limit else data
