"""Run a function in N real processes joined by torch.distributed (gloo on CPU), as `torchrun` would.

`spawn_group(fn, nprocs, *args)` starts fresh interpreters (the `spawn` start method: no forked torch
state), sets the variables torchrun sets, joins the group through the same
`workers.training.distributed.join_from_environment` the launcher uses, calls `fn(*args)` in each and
returns each rank's return value in rank order. `fn` must be a module-level function.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, nprocs: int, port: int, fn, args: tuple, results) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch

    torch.set_num_threads(1)
    from workers.training.distributed import join_from_environment, leave

    join_from_environment(timeout_s=300)
    try:
        results[rank] = ("ok", fn(*args))
    except BaseException:
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        leave()


def spawn_group(fn, nprocs: int, *args: Any) -> list[Any]:
    """`fn(*args)` in `nprocs` ranks; their results in rank order. A failing rank raises with its traceback."""
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    try:
        mp.start_processes(
            _rank_main, args=(nprocs, free_port(), fn, args, results), nprocs=nprocs, start_method="spawn"
        )
    except Exception as exc:
        failures = [v[1] for v in results.values() if v[0] == "error"]
        raise AssertionError("a rank failed:\n" + "\n".join(failures or [str(exc)])) from exc
    return [results[r][1] for r in range(nprocs)]
