"""Background work by name: the one table of task names and queues, and the sender services enqueue through.

Services never import Celery. Each process installs a sender once at start-up (the web app, the CLI,
the Celery worker: `app.broker.install_sender`); `enqueue` hands it a task name and ids. Call it
after the transaction that wrote the rows the task reads has committed.
"""

from __future__ import annotations

from collections.abc import Callable

TRAIN_REWARD_MODEL = "workers.tasks.train_reward_model"
TRAIN_POLICY = "workers.tasks.train_policy"
EVALUATE_POLICY = "workers.tasks.evaluate_policy"
GENERATE_RESPONSES = "workers.tasks.generate_responses"
RUN_ROUND = "workers.tasks.run_round"
EXPORT_DATASET = "workers.tasks.export_dataset"
PERIODIC_MAINTENANCE = "workers.tasks.periodic_maintenance"
CLEANUP_DISK = "workers.tasks.cleanup_disk"

# Generation and training hold a GPU; everything else shares the default queue.
QUEUE_OF = {
    TRAIN_REWARD_MODEL: "gpu",
    TRAIN_POLICY: "gpu",
    EVALUATE_POLICY: "gpu",
    GENERATE_RESPONSES: "gpu",
    RUN_ROUND: "gpu",
    EXPORT_DATASET: "default",
    PERIODIC_MAINTENANCE: "default",
    CLEANUP_DISK: "default",
}

# The task that executes a run row of each kind when it runs on its own (not as a round's stage).
TASK_FOR_RUN_KIND = {
    "reward": TRAIN_REWARD_MODEL,
    "ppo": TRAIN_POLICY,
    "dpo": TRAIN_POLICY,
    "evaluate": EVALUATE_POLICY,
    "generate": GENERATE_RESPONSES,
    "export": EXPORT_DATASET,
}

Sender = Callable[[str, list], None]
_sender: Sender | None = None


class NoSender(RuntimeError):
    """No sender was installed in this process."""


def install(sender: Sender | None) -> Sender | None:
    """Make `sender` the one `enqueue` uses; returns the previous one (tests put it back)."""
    global _sender
    previous, _sender = _sender, sender
    return previous


def enqueue(task_name: str, *args: int) -> None:
    """Send a task by name to its queue."""
    if task_name not in QUEUE_OF:
        raise ValueError(f"unknown task {task_name!r}; known: {', '.join(sorted(QUEUE_OF))}")
    if _sender is None:
        raise NoSender("no task sender in this process: call app.broker.install_sender() at start-up")
    _sender(task_name, list(args))


def enqueue_run(kind: str, run_id: int, round_id: int | None) -> None:
    """Send the task that executes a run: its round's task when it belongs to one."""
    if round_id is not None:
        enqueue(RUN_ROUND, round_id)
    else:
        enqueue(TASK_FOR_RUN_KIND[kind], run_id)
