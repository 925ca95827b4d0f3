"""The process-group primitives on two real gloo processes, and the single-process group they reduce to."""

from __future__ import annotations

import torch

from tests.distributed_harness import spawn_group
from workers.training.distributed import ProcessGroup, current_group


def test_a_group_of_one_is_the_identity():
    group = ProcessGroup()
    assert group.is_main and not group.distributed
    assert group.shard([1, 2, 3]) == [1, 2, 3]
    assert torch.equal(group.sum(torch.tensor([2.0])), torch.tensor([2.0]))
    assert group.any(True) and not group.any(False)
    assert group.gather_objects("x") == ["x"]


def test_shards_cover_the_batch_in_order_and_differ_by_at_most_one():
    items = list(range(7))
    shards = [ProcessGroup(world_size=3, rank=r).shard(items) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]


def _collectives() -> dict:
    group = current_group()
    flag = group.any(group.rank == 1)  # only rank 1 raises it
    return {
        "rank": group.rank,
        "sum": group.sum(torch.tensor([float(group.rank + 1)])).item(),
        "any": flag,
        "cat": group.cat(torch.tensor([group.rank, group.rank])).tolist(),
        "shard": group.shard(list(range(6))),
        "broadcast": group.broadcast_object({"from": group.rank}),
    }


def test_collectives_on_two_gloo_processes():
    first, second = spawn_group(_collectives, 2)
    assert (first["rank"], second["rank"]) == (0, 1)
    assert first["sum"] == second["sum"] == 3.0
    assert first["any"] and second["any"]
    assert first["cat"] == second["cat"] == [0, 0, 1, 1]
    assert first["shard"] == [0, 1, 2] and second["shard"] == [3, 4, 5]
    assert first["broadcast"] == second["broadcast"] == {"from": 0}
