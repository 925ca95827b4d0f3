"""Training throughput on 1 and 2 processes: reward-model and DPO pairs/s, PPO response tokens/s.

    python benchmarks/distributed.py                    # SmolLM2-135M-Instruct, 3 measured steps each
    python benchmarks/distributed.py --tiny --steps 2   # a tiny random model: a quick check of the wiring
    python benchmarks/distributed.py --stages ppo --processes 1,2,4 --out result.json

Each stage runs the real trainer (`train_reward_model`, `train_dpo`, `train_ppo`) with the same global
batch on 1 and on 2 processes, joined by torch.distributed over gloo (CPU) the way torchrun joins them:
every rank is a fresh interpreter with RANK / WORLD_SIZE / MASTER_ADDR set, and calls
`workers.training.distributed.join_from_environment`. The processes share the machine's cores equally
(`--threads` in all, split between them), so the scaling ratio says what splitting the same CPUs into
more ranks buys, not what more hardware buys; on GPU hosts each rank has its own device.

Rates are taken from rank 0's reporter: the time between the report of the first step (a warm-up:
allocator, first kernels) and that of the last measured one. The reward trainer evaluates inside its
last step, so it runs one step more than it measures. Peak memory is each rank's own peak RSS.

A trainer that does not know about process groups yet would train the whole batch in every rank: the
JSON says `rank_aware: false` for it, and its 2-process figure is then two independent copies of the
1-process work (each rank writes its own output folder so the copies do not collide).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, print_table, smollm2_dir  # noqa: E402

STAGES = ("rm", "dpo", "ppo")
TRAINER_MODULES = {
    "rm": "workers.training.reward",
    "dpo": "workers.training.dpo",
    "ppo": "workers.training.ppo",
}
RM_PAIRS_PER_STEP = 12  # two rankings of four responses (six pairs each): one ranking per rank on two
DPO_PAIRS_PER_STEP = 8
PPO_ROLLOUTS_PER_STEP = 8
PPO_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "Describe a busy market in a coastal town.",
    "Tell a story about a robot learning to paint.",
    "Explain why the sky is blue.",
    "Describe the life cycle of a butterfly.",
    "Write a letter from a sailor to his family.",
    "Explain how bread is made.",
]


# --------------------------------------------------------------------------------------------- ranks


class StepClock:
    """A reporter that notes when each step was reported (rank 0's; the others report nothing)."""

    def __init__(self) -> None:
        self.step_times: dict[int, float] = {}
        self.rows: dict[tuple[int, str], float] = {}

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.step_times.setdefault(done, time.perf_counter())

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows[(step, name)] = float(value)

    def should_stop(self) -> bool:
        return False

    def series(self, name: str) -> list[float]:
        return [v for (_, n), v in sorted(self.rows.items()) if n == name]


def is_rank_aware(stage: str) -> bool:
    """Whether the stage's trainer takes its share of the batch from the current process group."""
    return hasattr(importlib.import_module(TRAINER_MODULES[stage]), "current_group")


def peak_rss_gb() -> float:
    """This process's peak resident set. VmHWM belongs to the process image: unlike getrusage's
    ru_maxrss it does not start from the RSS of the parent that forked the rank before exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # not Linux: an upper bound


def _comparisons(kind: str, n_pairs: int) -> list:
    from benchmarks.reward_training import make_comparisons

    return make_comparisons(kind, n_pairs)[:n_pairs]


def _length_reward(prompt_texts, response_texts, response_ids) -> list[float]:
    """A cheap stand-in reward (longer answers up to 40 tokens score higher): the benchmark measures
    the PPO step, not a reward model."""
    return [min(len(ids), 40) / 40.0 for ids in response_ids]


def run_stage(stage: str, model: str, steps: int, work: Path, tokens: int) -> dict:
    """Train one stage in this process (a rank of the group, or a group of one); rank 0's timings."""
    from workers.training.distributed import current_group

    group = current_group()
    aware = is_rank_aware(stage)
    # Independent copies (a trainer that ignores the group) must not publish into the same folder.
    out = work / ("out" if aware else f"out-rank{group.rank}")
    ckpt = work / ("ckpt" if aware else f"ckpt-rank{group.rank}")
    clock = StepClock()
    if stage == "rm":
        from workers.training.reward import RewardConfig, train_reward_model

        total = steps + 2  # a warm-up step, the measured ones, and the step that evaluates
        config = RewardConfig(
            max_pairs_per_batch=RM_PAIRS_PER_STEP, eval_fraction=0.0, checkpoint_every=10**9, log_every=1
        )
        train_reward_model(
            Path(model), _comparisons("rankings", RM_PAIRS_PER_STEP * total), out, ckpt, config, clock
        )
        first, last, per_step = 1, total - 1, RM_PAIRS_PER_STEP
    elif stage == "dpo":
        from workers.training.dpo import DPOConfig, train_dpo

        total = steps + 1
        config = DPOConfig(
            batch_size=DPO_PAIRS_PER_STEP,
            epochs=1,
            eval_fraction=0.0,
            eval_every=10**9,
            checkpoint_every=10**9,
        )
        train_dpo(model, _comparisons("pairs", DPO_PAIRS_PER_STEP * total), out, ckpt, config, clock)
        first, last, per_step = 1, total, DPO_PAIRS_PER_STEP
    else:
        from workers.training.ppo import PPOConfig, RolloutSampling, train_ppo

        total = steps + 1
        config = PPOConfig(
            steps=total,
            rollout_batch_size=PPO_ROLLOUTS_PER_STEP,
            mini_batch_size=PPO_ROLLOUTS_PER_STEP,
            sampling=RolloutSampling(max_new_tokens=tokens),
            critic_warmup_steps=0,  # every measured step updates policy and critic
            guard_patience=10**9,  # a throughput run is measured, not stopped
            checkpoint_every=10**9,
        )
        prompts = [[{"role": "user", "content": p}] for p in PPO_PROMPTS]
        train_ppo(model, model, _length_reward, prompts, out, ckpt, config, clock)
        first, last, per_step = 1, total, None
    result = {"rank": group.rank, "peak_rss_gb": peak_rss_gb()}
    if not clock.step_times:
        return result  # not rank 0 of a rank-aware trainer: nothing was reported here
    seconds = clock.step_times[last] - clock.step_times[first]
    if per_step is not None:
        result.update(unit="pairs/s", rate=per_step * (last - first) / seconds, seconds=seconds)
    else:
        measured = clock.series("response_tokens")[first:last]
        step_seconds = clock.series("step_seconds")[first:last]
        result.update(
            unit="response tokens/s", rate=sum(measured) / sum(step_seconds), seconds=sum(step_seconds)
        )
    return result


def _rank_main(rank: int, world: int, port: int, threads: int, job: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    try:
        import torch

        torch.set_num_threads(threads)
        from workers.training.distributed import join_from_environment, leave

        join_from_environment(timeout_s=600)
        try:
            queue.put(("ok", rank, run_stage(*job)))
        finally:
            leave()
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_processes(stage: str, processes: int, args, model: str, work: Path) -> dict:
    """One stage on `processes` fresh ranks, bounded by --timeout; the ranks' results merged."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    threads = max(1, args.threads // processes)
    job = (stage, model, args.steps, work, args.response_tokens)
    port = _free_port()
    ranks = [
        context.Process(target=_rank_main, args=(r, processes, port, threads, job, queue))
        for r in range(processes)
    ]
    for process in ranks:
        process.start()
    results, errors = {}, []
    deadline = time.monotonic() + args.timeout
    while len(results) + len(errors) < processes and time.monotonic() < deadline:
        try:
            status, rank, value = queue.get(timeout=1.0)
        except Exception:  # queue.Empty: check the ranks are still alive
            if any(p.exitcode not in (None, 0) for p in ranks) and queue.empty():
                errors.append("a rank exited without reporting (killed?)")
            continue
        if status == "ok":
            results[rank] = value
        else:
            errors.append(value)
    for process in ranks:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
    if errors or len(results) < processes:
        reason = errors[0] if errors else f"timed out after {args.timeout:.0f} s"
        return {"processes": processes, "error": reason.strip().splitlines()[-1], "detail": reason}
    main = results[0]
    return {
        "processes": processes,
        "threads_per_process": threads,
        "rank_aware": is_rank_aware(stage),
        "unit": main.get("unit"),
        "rate": main.get("rate"),
        "measured_seconds": main.get("seconds"),
        "peak_rss_gb_per_process": [round(results[r]["peak_rss_gb"], 3) for r in range(processes)],
        "error": None,
    }


# --------------------------------------------------------------------------------------------- main


def tiny_model(dest: Path) -> str:
    from app.inference.model_files import make_tiny_model

    if not (dest / "config.json").exists():
        make_tiny_model(dest, seed=0)
    return str(dest)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M")
    parser.add_argument("--model", help="a Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: rm, dpo, ppo")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per stage (after one warm-up)")
    parser.add_argument("--response-tokens", type=int, default=32, help="PPO: most tokens per response")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads, split over ranks"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds one stage on N processes may take"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}: choose from {', '.join(STAGES)}")
    args.processes = [int(p) for p in args.processes.split(",")]
    if args.steps < 1 or any(p < 1 for p in args.processes):
        parser.error("--steps and every --processes count must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefloop-dist-bench-") as tmp:
        root = Path(tmp)
        if args.model:
            model, model_name = args.model, args.model
        elif args.tiny:
            model, model_name = tiny_model(root / "tiny"), "tiny random Llama (tests' shape)"
        else:
            model, model_name = str(smollm2_dir()), "SmolLM2-135M-Instruct"
        report = {
            "model": model_name,
            "steps": args.steps,
            "threads": args.threads,
            "load_average_before": load_average(),
            "stages": {},
        }
        for stage in args.stages:
            runs = []
            for processes in args.processes:
                work = root / f"{stage}-{processes}"
                work.mkdir()
                print(f"{stage}: {processes} process{'es' if processes > 1 else ''} ...", flush=True)
                runs.append(run_processes(stage, processes, args, model, work))
            base = next((r["rate"] for r in runs if r["processes"] == 1 and r.get("rate")), None)
            for run in runs:
                run["scaling"] = round(run["rate"] / base, 3) if base and run.get("rate") else None
            report["stages"][stage] = runs
        report["load_average_after"] = load_average()

    rows = []
    for stage, runs in report["stages"].items():
        for run in runs:
            rate = f"{run['rate']:.2f} {run['unit']}" if run.get("rate") else f"error: {run['error']}"
            rss = max(run["peak_rss_gb_per_process"]) if run.get("peak_rss_gb_per_process") else None
            rows.append(
                [
                    stage,
                    run["processes"],
                    rate,
                    "" if run.get("scaling") is None else f"{run['scaling']:.2f}x",
                    "" if rss is None else f"{rss:.2f}",
                    {True: "yes", False: "no (copies)"}.get(run.get("rank_aware"), ""),
                ]
            )
    print(f"\n{report['model']}, {args.steps} measured steps, {args.threads} threads in all")
    print_table(["stage", "processes", "rate", "scaling", "peak RSS GB/process", "rank-aware"], rows)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
