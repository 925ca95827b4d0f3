"""The next task for the calling annotator, with the app's settings: the API and the annotation page share it."""

from __future__ import annotations

from fastapi import Request

from app.services.assignment import TaskView, next_task


async def next_view(request: Request, user_id: int, kinds: list[str] | None = None) -> TaskView | None:
    """next_task with the app's settings, on the app's statements (opened by its lifespan)."""
    settings = request.app.state.settings
    return await next_task(
        request.app.state.statements, user_id, settings.assignment_ttl_seconds, kinds,
        gold_share=settings.gold_share,
    )  # fmt: skip
