"""The web app on a background thread of this process, on a free local port (demo loop, benchmarks, tests)."""

from __future__ import annotations

import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServerThread:
    """`with WebServerThread() as server:` serves create_app() at server.url until the block ends."""

    def __init__(self, port: int | None = None, ready_timeout: float = 120.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready_timeout = ready_timeout
        self._server = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WebServerThread:
        import uvicorn

        config = uvicorn.Config(
            "app.web.main:create_app", factory=True, host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)  # on a thread, uvicorn leaves signal handling alone
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the web app did not answer at {self.url} within {self._ready_timeout:.0f}s")

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
