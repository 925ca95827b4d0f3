"""Helpers shared by the benchmark scripts: the cached base model, timing, load and a plain table."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_CACHE = Path(os.environ.get("PREFLOOP_BENCH_CACHE", "/tmp/prefloop-bench"))


def smollm2_dir(path: str | Path | None = None) -> Path:
    """A float32 Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    if path is not None:
        return Path(path)
    dest = BENCH_CACHE / "smollm2"
    if not (dest / "config.json").exists():
        from app.inference.model_files import convert_gguf

        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        staging = BENCH_CACHE / f"smollm2.tmp{os.getpid()}"
        print(f"converting SmolLM2-135M-Instruct into {dest} (once)", flush=True)
        convert_gguf(staging)
        staging.rename(dest)
    return dest


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def load_average() -> str:
    """The 1-minute load average, to tell a quiet run from one that shared the CPU with others."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
