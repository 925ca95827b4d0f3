"""The playground: an admin types a prompt and watches the live policy answer, streamed.

`POST /admin/playground/stream` answers with chunked `text/plain`: each chunk is the next piece of the
response as the model produces it (BatchedGenerator.stream_chat). The page reads it with fetch and a
stream reader and appends text nodes, so model output is never parsed as HTML.

The handler reads `policy_holder.current` once: a promote that swaps the model mid-answer does not
disturb this answer, which finishes on the version it started with (named in `X-Policy-Version`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.web.admin_pages import live_state
from app.web.deps import DbSession
from app.web.security import Admin
from app.web.templating import render

log = logging.getLogger(__name__)

router = APIRouter(tags=["playground"])

NOT_LOADED = (
    "The live policy is not loaded in this web process, so the playground cannot answer. "
    "Serving is off (PREFLOOP_SERVE_POLICY=false), no policy is registered yet (`prefloop init`), "
    "or it is still loading: check the live version on the admin dashboard and try again."
)


class PlaygroundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=8000, description="The user turn.")
    system: str = Field("", max_length=4000, description="Optional system turn.")
    max_new_tokens: int = Field(256, ge=1, le=2048)
    temperature: float = Field(0.8, ge=0, le=2, description="0 means greedy decoding.")
    top_p: float = Field(0.9, gt=0, le=1)
    repetition_penalty: float = Field(1.1, ge=1, le=2)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Fix it to repeat a sampled answer.")


@router.get("/admin/playground", include_in_schema=False)
def playground_page(request: Request, principal: Admin, db: DbSession):
    return render(request, "admin/playground.html", {"live": live_state(request, db)})


@router.post(
    "/admin/playground/stream",
    summary="Stream the live policy's answer to a prompt as chunked text",
    response_class=StreamingResponse,
    responses={503: {"description": "No policy is loaded in this web process."}},
)
def playground_stream(body: PlaygroundRequest, request: Request, principal: Admin) -> StreamingResponse:
    holder = request.app.state.policy_holder
    loaded = holder.current if holder is not None else None  # read once: a swap must not change it mid-answer
    if loaded is None or loaded.generator is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, NOT_LOADED)
    # Imported here: app.inference loads torch, which the web process holds only once a policy is loaded.
    from app.inference.sampling import SamplingConfig

    sampling = SamplingConfig(
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature if body.temperature > 0 else 1.0,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        do_sample=body.temperature > 0,
    )
    conversation = [{"role": "system", "content": body.system}] if body.system.strip() else []
    conversation.append({"role": "user", "content": body.prompt})
    generator = loaded.generator

    def pieces() -> Iterator[str]:
        try:
            yield from generator.stream_chat(conversation, sampling, seed=body.seed)
        except Exception as exc:  # headers are gone already: say it in the stream
            log.exception("playground generation with v%s failed", loaded.version)
            yield f"\n\n[generation failed: {type(exc).__name__}: {exc}]"

    headers = {
        "X-Policy-Version": str(loaded.version),
        "Cache-Control": "no-store",
        # Proxies such as nginx would otherwise buffer the answer and deliver it all at the end.
        "X-Accel-Buffering": "no",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(pieces(), media_type="text/plain; charset=utf-8", headers=headers)
