"""PPO step throughput and peak memory: prefloop's PPO-max (full and LoRA) against TRL 0.29.1's PPOTrainer.

Same model (SmolLM2-135M-Instruct, fp32), same reward/value model (a one-label classifier on the same
backbone with a seeded random head), same prompts, batch and response length, same device. Each side
runs in its own subprocess so peak RSS is its own; TRL runs in a virtual environment of its own
(created on first use: `python -m venv` + `pip install torch==2.13.0 trl==0.29.1`), because 0.29.1 is the
last TRL release that ships PPO and it wants its own transformers.

Per step, a side samples `--batch` responses of up to `--response-tokens` tokens, scores them, and
makes one PPO update. Response tokens/s = response tokens / step wall time, over the measured steps
(the first step is a warm-up and not counted). TRL generates exactly `--response-tokens` tokens per row
(no stop token, its default); prefloop stops a row at EOS, so its count is of real tokens only.
TRL runs twice: side `trl` with the same recipe as ours (one PPO epoch, one mini-batch, no gradient
checkpointing), the like-for-like comparison; side `trl-defaults` with TRL's own defaults (4 epochs,
gradient checkpointing), what a TRL user gets out of the box.

    python benchmarks/ppo_step.py                  # all four sides, 2 measured steps each
    python benchmarks/ppo_step.py --sides ours-lora,trl --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path("/tmp/prefloop-bench")
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==0.29.1"]
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a busy market in a coastal town, with sights, sounds and smells.",
    "Write a detailed travel guide for a weekend in a mountain village.",
    "Tell a long story about a robot learning to paint.",
    "Explain, with examples, why the sky is blue and sunsets are red.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a long letter from a sailor to his family back home.",
    "Explain how bread is made, from flour to loaf, in detail.",
    "Describe a thunderstorm over a city at night in vivid detail.",
    "Write a detailed history of an imaginary kingdom.",
    "Explain how a computer runs a program, step by step.",
    "Tell a long story about two friends crossing a desert.",
    "Describe a day in the life of a beekeeper in detail.",
    "Write a detailed recipe for vegetable soup with tips.",
    "Explain how rivers shape the land over thousands of years.",
]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


# --- shared setup (parent process) --------------------------------------------------------------


def ensure_models(bench_dir: Path) -> tuple[Path, Path]:
    """The SmolLM2 policy folder (converted once from the GGUF) and a reward-model folder on it."""
    sys.path.insert(0, str(ROOT))
    policy = bench_dir / "smollm2"
    if not (policy / "config.json").exists():
        from app.inference.model_files import convert_gguf

        tmp = Path(tempfile.mkdtemp(dir=bench_dir))
        convert_gguf(tmp / "model", progress=lambda m: print(f"  convert: {m}", flush=True))
        os.replace(tmp / "model", policy)
        shutil.rmtree(tmp, ignore_errors=True)
    reward = bench_dir / "smollm2-rm"
    if not (reward / "config.json").exists():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
        torch.nn.init.normal_(model.score.weight, std=0.02)
        tokenizer = AutoTokenizer.from_pretrained(str(policy))
        model.config.pad_token_id = tokenizer.pad_token_id
        tmp = Path(tempfile.mkdtemp(dir=bench_dir))
        model.save_pretrained(str(tmp / "rm"))
        tokenizer.save_pretrained(str(tmp / "rm"))
        (tmp / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
        os.replace(tmp / "rm", reward)
        shutil.rmtree(tmp, ignore_errors=True)
    return policy, reward


def ensure_trl_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import trl, sys; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)",
    ]
    if python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == "0.29.1":
        return python
    print(f"creating {venv} with {' '.join(TRL_REQUIREMENTS)} ...", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return python


# --- workers (child processes) ------------------------------------------------------------------


def worker_ours(args, lora: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from app.common.reporting import MemoryReporter
    from workers.training.lora import LoraSettings
    from workers.training.ppo import PPOConfig, RolloutSampling, train_ppo

    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    config = PPOConfig(
        steps=args.steps + 1,
        rollout_batch_size=args.batch,
        mini_batch_size=args.batch,
        sampling=RolloutSampling(max_new_tokens=args.response_tokens),
        critic_warmup_steps=0,  # every measured step is a full policy + critic update, as TRL's
        guard_patience=10**9,  # a throughput run is measured, not stopped (TRL has no guards)
        checkpoint_every=10**9,
        device=args.device,
        lora=LoraSettings() if lora else None,
    )
    reporter = MemoryReporter()
    with tempfile.TemporaryDirectory(dir=args.bench_dir) as tmp:
        result = train_ppo(
            args.policy,
            args.policy,
            args.reward,
            prompts,
            Path(tmp) / "out",
            Path(tmp) / "ckpt",
            config,
            reporter,
        )
    seconds = reporter.series("step_seconds")[1:]
    tokens = reporter.series("response_tokens")[1:]
    out = {
        "step_seconds": seconds,
        "tokens": tokens,
        "mean_response_length": sum(tokens) / (len(tokens) * args.batch),
        "generation_share": sum(reporter.series("generation_seconds")[1:]) / sum(seconds),
        "rejected": result.rejected_reason,
        "threads": torch.get_num_threads(),
        # The sampling contract on the real model: the sampler's log-probs against the trainer's.
        "sampler_ratio_max_dev": max(reporter.series("sampler_ratio_max_dev")),
        "kl_ref_first": reporter.series("kl_ref")[0],
    }
    if torch.cuda.is_available() and args.device != "cpu":
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        ).input_ids
        for p in PROMPTS
    ]
    dataset = Dataset.from_dict({"input_ids": ids})
    fp32 = torch.float32
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=fp32)
    reference = AutoModelForCausalLM.from_pretrained(args.policy, dtype=fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=fp32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=fp32)

    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    defaults = args.worker == "trl-defaults"  # TRL's own recipe; side "trl" runs ours
    with tempfile.TemporaryDirectory(dir=args.bench_dir) as tmp:
        config = PPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=1,
            local_rollout_forward_batch_size=args.batch,
            total_episodes=args.batch * (args.steps + 1),
            response_length=args.response_tokens,
            temperature=1.0,  # as our rollouts: the distribution both sides train on
            learning_rate=1e-5,
            kl_coef=0.02,
            num_ppo_epochs=4 if defaults else 1,
            gradient_checkpointing=defaults,
            bf16=False,
            fp16=False,
            use_cpu=on_cpu,
            num_sample_generations=0,
            save_strategy="no",
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=reference,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            eval_dataset=dataset,
            callbacks=[Timer()],
        )
        trainer.train()
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)][1:]
    out = {
        "step_seconds": seconds,
        "tokens": [args.batch * args.response_tokens] * len(seconds),
        "mean_response_length": float(args.response_tokens),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available() and not on_cpu:
        out["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def run_worker(args) -> None:
    started = time.perf_counter()
    out = (
        worker_trl(args)
        if args.worker.startswith("trl")
        else worker_ours(args, lora=args.worker == "ours-lora")
    )
    out["peak_rss_gb"] = peak_rss_gb()
    out["wall_seconds"] = time.perf_counter() - started
    print("RESULT " + json.dumps(out), flush=True)


# --- parent -------------------------------------------------------------------------------------


def launch(side: str, python: str, args, policy: Path, reward: Path) -> dict:
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--policy",
        str(policy),
        "--reward",
        str(reward),
        "--bench-dir",
        str(args.bench_dir),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--response-tokens",
        str(args.response_tokens),
        "--device",
        args.device,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if side.startswith("trl"):
        env.pop("PYTHONPATH", None)
    if side == "trl-mmap":
        # TRL with the allocator setting prefloop's trainer applies to itself (see
        # workers/training/lora.return_freed_memory_to_os), to show what that setting alone is worth.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    print(f"running {side} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{side} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sides",
        default="ours-full,ours-lora,trl,trl-defaults",
        help="comma list of ours-full, ours-lora, trl (TRL with our recipe: 1 epoch, no gradient "
        "checkpointing), trl-defaults (TRL's own defaults: 4 epochs, gradient checkpointing)",
    )
    parser.add_argument("--steps", type=int, default=2, help="measured PPO steps per side (plus one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bench-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--trl-venv", type=Path, default=None, help="default: BENCH_DIR/trl-venv")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per side")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads per side (0: torch default); 1 is steadier on a busy box",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    args.bench_dir.mkdir(parents=True, exist_ok=True)
    policy, reward = ensure_models(args.bench_dir)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {}
    for side in sides:
        python = sys.executable
        if side.startswith("trl"):
            python = str(ensure_trl_venv(args.trl_venv or args.bench_dir / "trl-venv"))
        results[side] = launch(side, python, args, policy, reward)

    trl = results.get("trl")
    print()
    print(
        f"PPO step, SmolLM2-135M fp32, batch {args.batch}, {args.response_tokens}-token responses, "
        f"device {args.device}, {args.steps} measured steps, {results[sides[0]]['threads']} threads"
        + " (trl: 1 epoch, no grad ckpt; trl-defaults: 4 epochs, grad ckpt)"
    )
    header = f"{'side':<10} {'resp tok/s':>10} {'s/step':>7} {'mean len':>8} {'peak RSS GB':>11} {'x TRL tok/s':>11} {'x TRL RSS':>9}"
    print(header)
    print("-" * len(header))
    for side, r in results.items():
        tps = sum(r["tokens"]) / sum(r["step_seconds"])
        r["tokens_per_s"] = tps
        step = sum(r["step_seconds"]) / len(r["step_seconds"])
        ratio_t = ratio_m = "-"
        if trl is not None and side != "trl":  # every other side, trl-mmap included, against plain TRL
            trl_tps = sum(trl["tokens"]) / sum(trl["step_seconds"])
            ratio_t = f"{tps / trl_tps:.2f}"
            ratio_m = f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}"
        print(
            f"{side:<10} {tps:>10.1f} {step:>7.2f} {r['mean_response_length']:>8.1f} {r['peak_rss_gb']:>11.2f} "
            f"{ratio_t:>11} {ratio_m:>9}"
        )
    trl_own = results.get("trl-defaults")
    if trl_own is not None:
        own_tps = sum(trl_own["tokens"]) / sum(trl_own["step_seconds"])
        for side, r in results.items():
            if side.startswith("ours"):
                print(
                    f"{side} / trl-defaults (TRL's own recipe: 4 epochs, grad ckpt): "
                    f"{r['tokens_per_s'] / own_tps:.2f}x tokens/s, "
                    f"{r['peak_rss_gb'] / trl_own['peak_rss_gb']:.2f}x peak RSS"
                )
    for side, r in results.items():
        if "sampler_ratio_max_dev" in r:
            print(
                f"{side}: max |exp(old - sampler) - 1| {r['sampler_ratio_max_dev']:.2e}, "
                f"KL to the reference at step 1 {r['kl_ref_first']:.2e} nats (both 0 when on-policy)"
            )
        if "cuda_peak_gb" in r:
            print(f"{side}: CUDA peak allocated {r['cuda_peak_gb']:.2f} GB")
    print("targets: ours-lora >= 1.5x TRL tokens/s, ours-lora <= 0.6x TRL peak RSS")


if __name__ == "__main__":
    main()
