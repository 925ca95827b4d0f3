"""No `async def` route blocks the event loop with the sync database session or a broker send.

An async handler runs on the event loop, so a query through the sync session or a Celery send there
stalls every other request. Such work must go through a worker thread (`run_in_threadpool`,
`anyio.to_thread.run_sync`); the check reads each async endpoint's source, and that of the async
functions of the same module it awaits, with `ast`.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing

from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.web.main import create_app

THREAD_RUNNERS = {"run_in_threadpool", "run_sync"}
BLOCKING_CALLS = {"start_round", "enqueue", "create_export_run", "enqueue_export"}
BLOCKING_MODULES = {"dispatch"}


def _routes(app) -> list[APIRoute]:
    from app.web.routes import ROUTERS

    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    return routes + [r for r in app.routes if isinstance(r, APIRoute)]


def _session_params(function) -> set[str]:
    """Parameters typed as the sync session (`DbSession` or `Session`)."""
    hints = typing.get_type_hints(function, include_extras=True)
    names = set()
    for name, hint in hints.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if base is Session:
            names.add(name)
    return names


def _callee_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _inside_thread_runner(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Call) and _callee_name(node) in THREAD_RUNNERS:
            return True
    return False


def _blocking_calls(function, seen: set) -> list[str]:
    """Calls on the event loop that use the session or send work; follows awaited async helpers."""
    if function in seen:
        return []
    seen.add(function)
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    sessions = _session_params(function)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    where = f"{function.__module__}.{function.__qualname__}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or _inside_thread_runner(node, parents):
            continue
        func, name = node.func, _callee_name(node)
        line = f"{where}: {ast.unparse(node)}"
        uses_session = any(
            isinstance(arg, ast.Name) and arg.id in sessions
            for arg in [*node.args, *(k.value for k in node.keywords)]
        )
        receiver = (
            func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        )
        on_session = receiver in sessions
        sends = name in BLOCKING_CALLS or receiver in BLOCKING_MODULES
        callee = function.__globals__.get(func.id) if isinstance(func, ast.Name) else None
        if uses_session and isinstance(parents.get(node), ast.Await) and inspect.iscoroutinefunction(callee):
            found += _blocking_calls(callee, seen)  # an async helper: judged by what it does itself
        elif on_session or uses_session or sends:
            found.append(line)
    return found


def test_async_routes_keep_sync_work_off_the_event_loop(settings, engine):
    app = create_app(settings, engine)
    endpoints = {r.endpoint for r in _routes(app) if inspect.iscoroutinefunction(r.endpoint)}
    assert endpoints, "the app has async routes; the check must see them"
    blocking = [line for endpoint in endpoints for line in _blocking_calls(endpoint, set())]
    assert not blocking, "sync work on the event loop:\n" + "\n".join(sorted(blocking))
