"""After a route moved the live policy: wake this process's policy holder so it swaps right away."""

from __future__ import annotations

from fastapi import Request


def wake_local_policy_holder(request: Request) -> None:
    """Other processes learn of the move from the pub/sub wake-up or their next poll of the alias;
    this one need not wait."""
    holder = getattr(request.app.state, "policy_holder", None)
    if holder is not None:
        holder.wake()
