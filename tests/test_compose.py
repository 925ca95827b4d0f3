"""docker-compose.yml: the production stack (docs/architecture.md, Processes), and every command it runs exists in the CLI."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import yaml

from app.cli import main as cli

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())


def _prefloop_invocations(command) -> list[list[str]]:
    """Each `prefloop …` call in a service command (list form or `sh -c "a && b"`)."""
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:2] == ["sh", "-c"]:
        calls = []
        for part in command[2].replace("&&", ";").split(";"):
            words = shlex.split(part)
            if words and words[0] == "prefloop":
                calls.append(words)
        return calls
    return [command] if command and command[0] == "prefloop" else []


def _parse_with_cli(args: list[str]) -> None:
    """Resolve subcommands and parse options exactly as the CLI would, without running anything."""
    ctx = cli.make_context("prefloop", list(args), resilient_parsing=False)
    group, rest = cli, ctx.protected_args + ctx.args
    while rest:
        name, command, rest = group.resolve_command(ctx, rest)
        assert command is not None, f"unknown command {name}"
        ctx = command.make_context(name, rest, parent=ctx)
        if isinstance(command, click.Group):
            group, rest = command, ctx.protected_args + ctx.args
        else:
            rest = []


def test_compose_has_the_whole_stack():
    services = COMPOSE["services"]
    assert {"postgres", "redis", "migrate", "web", "worker-gpu", "worker-default", "beat"} <= set(services)
    assert services["postgres"]["healthcheck"] and services["redis"]["healthcheck"]
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert gpu["command"][2:] == ["--queues", "gpu", "--concurrency", "1"]
    assert {"pgdata", "registry"} <= set(COMPOSE["volumes"])


def test_migrate_waits_for_the_database_then_upgrades():
    command = " ".join(COMPOSE["services"]["migrate"]["command"])
    assert "pg_isready" in command and "prefloop migrate" in command


@pytest.mark.parametrize("service", sorted(COMPOSE["services"]))
def test_every_prefloop_command_exists_in_the_cli(service):
    spec = COMPOSE["services"][service]
    for args in _prefloop_invocations(spec.get("command", [])):
        _parse_with_cli(args[1:])


def test_an_unknown_command_would_be_caught():
    with pytest.raises((click.UsageError, AssertionError)):
        _parse_with_cli(["no-such-command"])


PREFLOOP_SERVICES = sorted(
    name
    for name, spec in COMPOSE["services"].items()
    if spec.get("image") in ("prefloop:latest", "prefloop-gpu:latest")
)


def test_the_prefloop_services_are_web_workers_beat_and_migrate():
    assert PREFLOOP_SERVICES == ["beat", "migrate", "web", "worker-default", "worker-gpu"]


@pytest.mark.parametrize("service", PREFLOOP_SERVICES)
def test_every_prefloop_service_runs_in_production_with_a_required_secret(service):
    environment = COMPOSE["services"][service]["environment"]
    assert environment["PREFLOOP_ENVIRONMENT"] == "production"
    # `${VAR:?message}`: compose stops with the message instead of starting with an empty value.
    assert environment["PREFLOOP_SECRET_KEY"].startswith("${PREFLOOP_SECRET_KEY:?set PREFLOOP_SECRET_KEY")
    assert environment["PREFLOOP_PSEUDONYM_KEY"].startswith(
        "${PREFLOOP_PSEUDONYM_KEY:?set PREFLOOP_PSEUDONYM_KEY"
    )


def test_the_image_runs_in_production():
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    env_lines = " ".join(
        line for line in dockerfile.replace("\\\n", " ").splitlines() if line.startswith("ENV ")
    )
    assert "PREFLOOP_ENVIRONMENT=production" in env_lines.split()


# ---------------------------------------------------------------- the GPU worker (docs/scale-out.md)

GPU_WORKER = COMPOSE["services"]["worker-gpu"]


def _bytes(size: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    size = size.lower().removesuffix("b")
    return int(float(size[:-1]) * units[size[-1]]) if size[-1] in units else int(size)


def test_the_gpu_worker_takes_every_gpu_of_its_host():
    (devices,) = GPU_WORKER["deploy"]["resources"]["reservations"]["devices"]
    assert devices == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}


def test_the_gpu_worker_has_shared_memory_for_nccl_and_unlimited_locked_memory():
    # Docker's 64 MB /dev/shm is too small for NCCL's intra-host transport and torch's loaders.
    assert GPU_WORKER.get("ipc") == "host" or _bytes(GPU_WORKER["shm_size"]) >= 8 * 2**30
    assert GPU_WORKER["ulimits"]["memlock"] == -1


def test_the_gpu_worker_passes_the_training_process_settings():
    environment = GPU_WORKER["environment"]
    for name in (
        "PREFLOOP_TRAIN_PROCESSES_PER_HOST",
        "PREFLOOP_TRAIN_RDZV_ENDPOINT",
        "PREFLOOP_TRAIN_LAUNCHER_PREFIX",
    ):
        # `${NAME:-default}`: settable from the host's shell or .env, a default otherwise.
        assert environment[name].startswith(f"${{{name}:-"), name
    assert environment["PREFLOOP_TRAIN_PROCESSES_PER_HOST"].endswith(":-0}")  # one per visible GPU


def test_the_gpu_worker_passes_nccl_settings_through_only_when_set():
    environment = GPU_WORKER["environment"]
    assert environment["NCCL_DEBUG"] == "${NCCL_DEBUG:-WARN}"
    # No value: compose copies the host's variable when it is set and leaves it unset otherwise; an
    # empty NCCL_SOCKET_IFNAME would not mean "any interface" to NCCL.
    assert environment["NCCL_SOCKET_IFNAME"] is None and environment["NCCL_IB_DISABLE"] is None


def test_the_gpu_worker_keeps_the_shared_settings_and_registry():
    shared = COMPOSE["services"]["web"]["environment"]
    assert {k: GPU_WORKER["environment"][k] for k in shared} == shared
    assert "registry:/data" in GPU_WORKER["volumes"]


def test_the_gpu_image_is_built_with_vllm():
    assert GPU_WORKER["build"]["args"]["EXTRAS"] == "vllm"
    dockerfile = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    assert 'ARG EXTRAS=""' in dockerfile and "${EXTRAS:+[$EXTRAS]}" in dockerfile
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'vllm = ["vllm>=0.10"]' in pyproject


def test_the_engine_setting_the_gpu_worker_passes_is_one_the_worker_accepts():
    from app.config import Settings

    default = GPU_WORKER["environment"]["PREFLOOP_GENERATION_ENGINE"].split(":-")[1].rstrip("}")
    assert Settings(generation_engine=default).generation_engine == "auto"
