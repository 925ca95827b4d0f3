"""Does a round make the policy better? Simulated annotators rank through the product; v1 vs v0.

After AlpacaFarm: simulated annotators with a standard of their own (benchmarks/simulated_annotators.py:
concise, structured, warm) and 25% of their pairwise verdicts flipped at random rank answers
through the public JSON API of the embedded stack (`prefloop serve` as a real server process with
its real worker, SQLite database and broker, in a folder of its own per leg). A round then runs with
the product's own defaults for the device (app/services/round_profiles.py: `cpu` or `gpu`), and
the candidate is compared with the base policy v0 on every held-out prompt of the demo set under
the annotator's standard (without noise): k samples per prompt, the win rate with a 95% Wilson
interval over prompts, KL to the base, mean length and EOS share. The gate's own verdict, by its
held-out judge, is set beside the annotator's: do they agree, and is the gate's win rate within
0.1 of the annotator's?

    python benchmarks/efficacy.py                         # cpu profile, PPO-max, all three standards
    python benchmarks/efficacy.py --standards structured  # one annotator (about 30 minutes on a CPU)
    python benchmarks/efficacy.py --rounds 2 --algorithms ppo,dpo
    python benchmarks/efficacy.py --profile gpu --out efficacy-gpu.json

Each (standard, algorithm) is one leg, run in its own process and data folder under --workdir, so
legs never share a policy or a comparison. Progress goes to the terminal; the figures go to the JSON
file named by --out (one entry per leg, one per round inside it).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import BENCH_CACHE, load_average, print_table, smollm2_dir  # noqa: E402
from benchmarks.simulated_annotators import STANDARDS, SimulatedAnnotator  # noqa: E402

# A profile for the benchmark's own smoke test on the tiny model: every stage, in seconds.
SMOKE_PROFILE = {
    "rankings": 8,
    "max_new_tokens": 8,
    "specs": {
        algorithm: {
            "algorithm": algorithm,
            # Eight rankings leave too few held-out pairs to beat chance: the check is off here only.
            "reward": {"epochs": 1, "max_length": 64, "max_pairs_per_batch": 6, "above_chance_alpha": None},
            "policy": (
                {"steps": 1, "rollout_batch_size": 2, "mini_batch_size": 2, "sampling": {"max_new_tokens": 8}}
                if algorithm == "ppo"
                else {"epochs": 1, "batch_size": 4, "max_length": 64}
            ),
            "gate": {"samples_per_prompt": 1, "prompts": 4},
        }
        for algorithm in ("ppo", "dpo")
    },
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- the orchestrator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Figures: per leg and round, the annotator's win rate of v_r over v0 with its 95% "
        "interval, KL to the base (nats per answer), mean length (tokens), EOS share, and the gate's "
        "verdict and win rate beside it. Targets on a 2-core CPU: v1 beats v0 on at least 75% of "
        "held-out prompts for every standard; the gate agrees within 0.1.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--profile",
        default="auto",
        help="round profile: cpu, gpu, or auto (gpu when CUDA is available) [auto]",
    )
    parser.add_argument(
        "--standards",
        default=",".join(STANDARDS),
        help=f"comma-separated simulated annotators: {', '.join(STANDARDS)} [all]",
    )
    parser.add_argument("--algorithms", default="ppo", help="comma-separated: ppo, dpo [ppo]")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per leg [the profile's: 1 cpu, 3 gpu]"
    )
    parser.add_argument(
        "--rankings", type=int, default=None, help="tasks ranked before each round [profile's]"
    )
    parser.add_argument("--noise", type=float, default=0.25, help="share of pairwise verdicts flipped [0.25]")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="k answers per held-out prompt [4]")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts compared [all]")
    parser.add_argument(
        "--base-model", default=None, help="a local HF folder instead of SmolLM2-135M-Instruct"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N [the product's auto]")
    parser.add_argument(
        "--workdir", default=None, help=f"where legs keep their data [{BENCH_CACHE}/efficacy-<time>]"
    )
    parser.add_argument("--out", default="efficacy.json", help="the JSON result file [efficacy.json]")
    parser.add_argument("--seed", type=int, default=0, help="annotator noise seed [0]")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds a stage may take [7200]")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run of every stage (tests)")
    parser.add_argument("--leg", help=argparse.SUPPRESS)  # internal: run one leg from this JSON
    return parser.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> dict[str, Any]:
    """The profile as plain data (name, rankings, max_new_tokens, rounds, specs) with the overrides."""
    if args.smoke:
        profile = {"name": "smoke", "rounds": 1, **json.loads(json.dumps(SMOKE_PROFILE))}
    else:
        from app.services.round_profiles import profile_for_device, profile_named

        chosen = (
            profile_for_device(args.device or "auto")
            if args.profile == "auto"
            else profile_named(args.profile)
        )
        profile = {
            "name": chosen.name,
            "rankings": chosen.rankings,
            "max_new_tokens": chosen.max_new_tokens,
            "rounds": chosen.rounds,
            "specs": {a: chosen.spec(a) for a in chosen.specs},
        }
    if args.rounds is not None:
        profile["rounds"] = args.rounds
    if args.rankings is not None:
        profile["rankings"] = args.rankings
    return profile


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.leg:
        # SIGTERM unwinds like an exception, so the stack's `with` block stops `prefloop serve` and its workers.
        from app.cli.supervisor import exit_once_on_sigterm

        signal.signal(signal.SIGTERM, exit_once_on_sigterm)
        result = run_leg(json.loads(args.leg))
        return 0 if result.get("error") is None else 1
    standards = [s.strip() for s in args.standards.split(",") if s.strip()]
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [s for s in standards if s not in STANDARDS] + [
        a for a in algorithms if a not in ("ppo", "dpo")
    ]
    if unknown:
        print(f"unknown standard or algorithm: {', '.join(unknown)}", file=sys.stderr)
        return 2
    profile = resolve_profile(args)
    base_model = str(smollm2_dir(args.base_model))
    workdir = Path(args.workdir or BENCH_CACHE / f"efficacy-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(
        f"profile {profile['name']}: {profile['rankings']} rankings per round at {profile['max_new_tokens']} "
        f"tokens, {profile['rounds']} round(s); standards {', '.join(standards)}; algorithms "
        f"{', '.join(algorithms)}; noise {args.noise:.0%}; load {load_average()}; data under {workdir}"
    )
    legs = []
    for algorithm in algorithms:
        for n, standard in enumerate(standards):
            leg = {
                "standard": standard,
                "algorithm": algorithm,
                "profile": profile,
                "noise": args.noise,
                "seed": args.seed + n,
                "samples_per_prompt": args.samples_per_prompt,
                "eval_prompts": args.eval_prompts,
                "base_model": base_model,
                "device": args.device,
                "timeout": args.timeout,
                "dir": str(workdir / f"{standard}-{algorithm}"),
            }
            log(f"leg {standard} / {algorithm}: starting")
            legs.append(run_leg_process(leg))
            write_results(args.out, profile, args, legs)
    summarise(legs)
    log(f"results written to {args.out}")
    return 0 if all(leg.get("error") is None for leg in legs) else 1


def run_leg_process(leg: dict[str, Any]) -> dict[str, Any]:
    """One leg in a process of its own, with the settings of its own data folder."""
    folder = Path(leg["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--leg", json.dumps(leg)]
    started = time.monotonic()
    child = subprocess.Popen(command, env=leg_environment(leg), cwd=str(Path(__file__).resolve().parents[1]))
    # A stop request (SIGTERM, or Ctrl-C) goes on to the leg, which stops its stack before it exits:
    # killing the leg outright would leave its `prefloop serve` and workers running.
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                child.wait()
                break
            except KeyboardInterrupt:
                child.send_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    done = subprocess.CompletedProcess(command, child.returncode)
    result_file = folder / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {
            "standard": leg["standard"],
            "algorithm": leg["algorithm"],
            "error": f"exit {done.returncode}",
        }
    result["leg_seconds"] = round(time.monotonic() - started, 1)
    return result


def leg_environment(leg: dict[str, Any]) -> dict[str, str]:
    """The embedded default in the leg's folder: SQLite database and broker, no Redis; the task pool
    refills only when asked (beat must not sample answers at another length meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFLOOP_")}
    env.update(
        PREFLOOP_ENVIRONMENT="development",
        PREFLOOP_DATA_DIR=leg["dir"],
        PREFLOOP_REFILL_BELOW="0",
        PREFLOOP_REFILL_PROMPTS=str(leg["profile"]["rankings"]),
        PREFLOOP_REFILL_MAX_NEW_TOKENS=str(leg["profile"]["max_new_tokens"]),
        PREFLOOP_SERVE_POLICY="false",
        PREFLOOP_TASK_OVERLAP="1",
        PREFLOOP_RESPONSES_PER_TASK="4",
    )
    if leg.get("device"):
        env["PREFLOOP_DEVICE"] = leg["device"]
    return env


def write_results(path: str, profile: dict, args: argparse.Namespace, legs: list[dict]) -> None:
    body = {
        "benchmark": "efficacy",
        "profile": profile,
        "noise": args.noise,
        "samples_per_prompt": args.samples_per_prompt,
        "load_average": load_average(),
        "legs": legs,
    }
    Path(path).write_text(json.dumps(body, indent=2))


def summarise(legs: list[dict[str, Any]]) -> None:
    rows = []
    for leg in legs:
        for r in leg.get("rounds", []):
            a, g = r.get("annotator") or {}, r.get("gate") or {}
            rows.append(
                [
                    leg["standard"],
                    leg["algorithm"],
                    r["round"],
                    r.get("status", ""),
                    _interval(a),
                    f"{a['kl_to_base']:.2f}" if a.get("kl_to_base") is not None else "",
                    f"{a.get('candidate_length', 0):.0f}/{a.get('base_length', 0):.0f}" if a else "",
                    f"{a.get('candidate_eos_share', 0):.2f}" if a else "",
                    _interval(g),
                    "yes" if r.get("verdicts_agree") else "no",
                    f"{r.get('round_seconds', 0):.0f}",
                ]
            )
        if leg.get("error"):
            rows.append(
                [leg["standard"], leg["algorithm"], "-", "error", leg["error"][:60], "", "", "", "", "", ""]
            )
    headers = [
        "standard",
        "algo",
        "round",
        "status",
        "annotator win",
        "KL",
        "len c/b",
        "EOS",
        "gate win",
        "agree",
        "s",
    ]
    print_table(headers, rows)


def _interval(figures: dict[str, Any]) -> str:
    if not figures or figures.get("win_rate") is None:
        return "—"
    return f"{figures['win_rate']:.2f} [{figures['win_rate_low']:.2f}, {figures['win_rate_high']:.2f}]"


# ---------------------------------------------------------------- one leg


class Stack:
    """`prefloop serve` (the web app, a worker and beat) as a child process on a free port."""

    def __init__(self, folder: Path):
        from app.web.server_thread import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "serve.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Stack:
        import httpx

        log_file = self.log_path.open("ab")
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 180
        try:  # a stop request while the stack starts must stop it too: `with` calls __exit__ only after this
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"prefloop serve exited ({self.process.returncode}); see {self.log_path}"
                    )
                try:
                    httpx.get(f"{self.url}/healthz", timeout=2)
                    return self
                except httpx.HTTPError:
                    time.sleep(0.5)
            raise RuntimeError(f"prefloop serve did not answer within 180 s; see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            from app.cli.supervisor import stop_children

            # Longer than serve's own grace for its workers (20 s): they run in sessions of their own,
            # so killing serve before it has killed them would leave a worker finishing its task.
            stop_children([self.process], timeout=45.0)


def _respecting_rate_limits(send: Callable[[], Any]) -> Any:
    """Send a request; on 429 wait as long as the product's Retry-After says, then send it again.

    The simulated annotator ranks far faster than a person, so it meets the per-annotator limits
    (60 task requests a minute by default); it waits them out as a well-behaved client would."""
    while True:
        response = send()
        if response.status_code != 429:
            return response
        wait = float(response.headers.get("Retry-After", "5"))
        log(f"  rate-limited by the product: waiting {wait:.0f} s")
        time.sleep(min(max(wait, 1.0), 120.0))


def run_leg(leg: dict[str, Any]) -> dict[str, Any]:
    """Set up the leg's data, run its rounds through the stack, then measure each candidate."""
    folder = Path(leg["dir"])
    result: dict[str, Any] = {
        "standard": leg["standard"],
        "algorithm": leg["algorithm"],
        "profile": leg["profile"]["name"],
        "rounds": [],
        "error": None,
    }
    try:
        tokens, base_version = prepare(leg)
        annotator = SimulatedAnnotator(leg["standard"], leg["noise"], leg["seed"])
        with Stack(folder) as stack:
            log(f"  {leg['standard']}: stack at {stack.url} (log {stack.log_path})")
            for number in range(1, leg["profile"]["rounds"] + 1):
                record = run_round(leg, stack.url, tokens, annotator, number)
                result["rounds"].append(record)
                (folder / "result.json").write_text(json.dumps(result, indent=2))
                if record.get("status") != "succeeded":
                    log(f"  round {number} {record.get('status')}: {record.get('error', '')[:200]}")
                    break
        result["annotator_noise"] = {
            "pairs": annotator.tally.pairs,
            "against_standard": round(annotator.tally.disagreement, 4),
            "standard_ties": annotator.tally.standard_ties,
        }
        measure(leg, result, annotator, base_version)
    except Exception as exc:  # the leg's result says what went wrong; the other legs still run
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    return result


def prepare(leg: dict[str, Any]) -> tuple[dict[str, str], int]:
    """Schema, the base policy v0, the demo prompts (over a hundred held out) and API tokens."""
    from app.config import get_settings
    from app.data.db import session_scope
    from app.data.migrate import run_migrations
    from app.services.accounts import create_api_token, create_user, user_named
    from app.services.demo import install_demo_prompt_set
    from app.services.registry import init_base_policy, live_policy

    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.sqlalchemy_url)
    with session_scope() as db:
        init_base_policy(db, base_model=Path(leg["base_model"]), progress=lambda m: log(f"  {m}"))
        install_demo_prompt_set(db)
        tokens = {}
        for name, role in (("efficacy-annotator", "annotator"), ("efficacy-admin", "admin")):
            user = user_named(db, name) or create_user(db, name, role, secrets.token_urlsafe(32))
            tokens[role] = create_api_token(db, user, "efficacy benchmark")
        db.commit()
        return tokens, live_policy(db).version


def _client(url: str, token: str):
    import httpx

    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _wait(fetch, label: str, timeout: float, done=lambda body: body["status"] not in ("queued", "running")):
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        body = fetch()
        line = f"{label}: {body.get('stage', body.get('status'))} {body.get('progress_message', '')}".strip()
        if "runs" in body:
            current = next((r for r in body["runs"] if r["status"] == "running"), None)
            if current:
                line += f" · {current['kind']} {current['progress']:.0%} {current['progress_message'][:60]}"
        if line != last:
            log(f"  {line}")
            last = line
        if done(body):
            return body
        time.sleep(2)
    raise TimeoutError(f"{label} did not finish within {timeout:.0f} s")


def run_round(
    leg: dict[str, Any], url: str, tokens: dict[str, str], annotator: SimulatedAnnotator, number: int
):
    """Tasks from the live policy, rankings through the API, one round with the profile's spec."""
    from app.broker import install_sender
    from app.data.db import session_scope
    from app.services.tasks_pool import request_refill

    profile, timeout = leg["profile"], leg["timeout"]
    admin, bot = _client(url, tokens["admin"]), _client(url, tokens["annotator"])
    started = time.monotonic()
    install_sender()
    with session_scope() as db:
        run_id = request_refill(db, n_prompts=profile["rankings"], max_new_tokens=profile["max_new_tokens"])
    if run_id is None:
        raise RuntimeError("no tasks could be generated: the demo prompt set has no train prompts")
    log(f"  round {number}: generating answers of the live policy for {profile['rankings']} prompts")
    run = _wait(lambda: admin.get(f"/api/runs/{run_id}").json(), "generation", timeout)
    if run["status"] != "succeeded":
        raise RuntimeError(f"generation {run['status']}: {run['error']}")

    ranked = 0
    while ranked < profile["rankings"]:
        task = _respecting_rate_limits(lambda: bot.get("/api/tasks/next"))
        if task.status_code == 204:  # no task left for this annotator
            break
        if task.status_code != 200:
            raise RuntimeError(f"the API refused a task request: {task.status_code} {task.text}")
        body = task.json()
        order = annotator.rank([r["text"] for r in body["responses"]])
        ranking = [[body["responses"][i]["id"]] for i in order]
        url, payload = f"/api/tasks/{body['id']}/annotation", {"ranking": ranking, "time_spent_ms": 4000}
        sent = _respecting_rate_limits(lambda url=url, payload=payload: bot.post(url, json=payload))
        if sent.status_code not in (200, 201):
            raise RuntimeError(f"the API refused a ranking: {sent.status_code} {sent.text}")
        ranked += 1
        if ranked % 16 == 0:
            log(f"  ranked {ranked}/{profile['rankings']} tasks")
    log(
        f"  ranked {ranked} tasks ({annotator.tally.disagreement:.0%} of decided pairs against the standard so far)"
    )

    round_started = time.monotonic()
    response = admin.post("/api/rounds", json=profile["specs"][leg["algorithm"]])
    if response.status_code != 201:
        raise RuntimeError(f"the round did not start: {response.status_code} {response.text}")
    round_id = response.json()["id"]
    body = _wait(
        lambda: admin.get(f"/api/rounds/{round_id}").json(),
        f"round {round_id}",
        timeout,
        done=lambda b: b["status"] not in ("queued", "running"),
    )
    policies = admin.get("/api/policies").json()
    candidate = next((p for p in policies if p["round_id"] == round_id), None)
    return {
        "round": number,
        "round_id": round_id,
        "rankings": ranked,
        "status": body["status"],
        "error": body["error"],
        "candidate_version": candidate["version"] if candidate else None,
        "gate": (body.get("gate") or {}).get("judge"),
        "round_seconds": round(time.monotonic() - round_started, 1),
        "seconds_with_ranking": round(time.monotonic() - started, 1),
    }


def measure(
    leg: dict[str, Any], result: dict[str, Any], annotator: SimulatedAnnotator, base_version: int
) -> None:
    """Each round's candidate against v0 under the annotator's standard, outside the product."""
    from app.data.db import session_scope
    from app.inference.sampling import SamplingConfig
    from app.services.registry import policy_by_version
    from workers.runs.comparisons import load_prompts
    from workers.training.evaluation import GateConfig, evaluate_candidate

    with session_scope() as db:
        prompts = load_prompts(db, "eval", limit=leg.get("eval_prompts"))
        base_path = policy_by_version(db, base_version).path
        paths = {
            r["round"]: policy_by_version(db, r["candidate_version"]).path
            for r in result["rounds"]
            if r.get("candidate_version") is not None
        }
    gate = GateConfig(
        samples_per_prompt=leg["samples_per_prompt"],
        sampling=SamplingConfig(max_new_tokens=leg["profile"]["max_new_tokens"]),
        max_eos_share_drop=None,
        max_kl=None,
        max_kl_to_base=None,
        max_length_ratio=None,
        min_length_ratio=None,
    )
    for record in result["rounds"]:
        path = paths.get(record["round"])
        if path is None:
            continue
        log(
            f"  measuring v{record['candidate_version']} against v{base_version} on {len(prompts)} held-out prompts"
        )
        report = evaluate_candidate(
            path,
            base_path,
            annotator.judge_fn(),
            prompts,
            gate,
            base_path=base_path,
            judge_name=f"the {leg['standard']} standard, without noise",
            device=leg.get("device") or "auto",
            seed=1000 + record["round"],
        )
        figures = {
            "prompts": report.prompts,
            "samples_per_prompt": report.samples_per_prompt,
            "win_rate": report.win_rate,
            "win_rate_low": report.win_rate_low,
            "win_rate_high": report.win_rate_high,
            "kl_to_base": report.kl_to_base,
            "candidate_length": report.candidate_length,
            "base_length": report.live_length,
            "candidate_eos_share": report.candidate_eos_share,
            "base_eos_share": report.live_eos_share,
        }
        record["annotator"] = figures
        prefers = report.win_rate_low > 0.5
        gate_figures = record.get("gate") or {}
        if gate_figures:
            record["gate_win_rate_gap"] = round(abs(gate_figures["win_rate"] - report.win_rate), 4)
        record["annotator_prefers_candidate"] = prefers
        record["verdicts_agree"] = bool(gate_figures) and bool(gate_figures.get("passed")) == prefers
        log(
            f"  v{record['candidate_version']} vs v{base_version} under {leg['standard']}: win rate "
            f"{report.win_rate:.2f} [{report.win_rate_low:.2f}, {report.win_rate_high:.2f}], KL to base "
            f"{report.kl_to_base:.2f}, length {report.candidate_length:.0f} (v0 {report.live_length:.0f}), "
            f"EOS {report.candidate_eos_share:.2f} (v0 {report.live_eos_share:.2f})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
