"""PPO on one GPU at 0.5B and 1.5B parameters: response tokens/s and peak GPU memory, vLLM rollouts on
and off, beside TRL 0.29.1's PPOTrainer on the same model, batch and lengths.

    python benchmarks/gpu_scale.py                          # both sizes, every side, ~10 minutes on an H100
    python benchmarks/gpu_scale.py --sizes 0.5b --sides rollout-builtin,rollout-vllm
    python benchmarks/gpu_scale.py --budget 300 --out gpu_scale.json

Prepared for a GPU host (CUDA, and vLLM and a TRL 0.29.1 virtual environment where they are wanted);
nothing here has been measured on this project's CI, which has no GPU.

Models: randomly initialised Llama-architecture models with SmolLM2's tokenizer (49,152 tokens), built
once into --bench-dir and saved in bf16. Sizes (tied embeddings, full multi-head attention):

    0.5b: hidden 1024, 28 layers, MLP 4096, 16 heads   -> 0.52 B parameters
    1.5b: hidden 2048, 28 layers, MLP 5632, 16 heads   -> 1.54 B parameters

(the script prints the exact count). A random model never emits EOS on purpose, so every response
runs to --response-tokens; the rates are for full-length responses. The reward model and critic start
from a one-label classifier on the same backbone with a seeded random head (as benchmarks/ppo_step.py).

Sides, each in a subprocess of its own (its peak memory is its own):

- rollout-builtin / rollout-vllm: sampling only, --batch prompts x --response-tokens, the built-in
  batched generator vs `VLLMEngine`; for vLLM also the largest gap between its log-probs and the
  policy's own forward pass on the sampled tokens (the sampling contract; ~1e-2 in bf16 is float noise).
- ppo-builtin / ppo-vllm: `train_ppo` (full fine-tune, bf16 autocast) with `rollout_engine` builtin or
  vllm; tokens/s over the measured steps (the first is a warm-up).
- ppo-fp32 / trl: ours and TRL's PPOTrainer (1 PPO epoch, 1 mini-batch, no gradient checkpointing: the
  recipe ours uses) both in fp32, the like-for-like pair (benchmarks/ppo_step.py's TRL worker, which
  runs fp32). TRL runs in the virtual environment benchmarks/ppo_step.py creates.

Peak GPU memory is the device's used memory sampled every 20 ms (vLLM's memory pool is not in torch's
allocator statistics), less what was in use before the side started; torch's own peak is shown too.
--budget bounds the whole run: sides that would start after it are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # name: (hidden, layers, intermediate, heads)
    "0.5b": (1024, 28, 4096, 16),
    "1.5b": (2048, 28, 5632, 16),
}
SIDES = ("rollout-builtin", "rollout-vllm", "ppo-builtin", "ppo-vllm", "ppo-fp32", "trl")
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a busy market in a coastal town, with sights, sounds and smells.",
    "Write a detailed travel guide for a weekend in a mountain village.",
    "Tell a long story about a robot learning to paint.",
    "Explain, with examples, why the sky is blue and sunsets are red.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a long letter from a sailor to his family back home.",
]


# --------------------------------------------------------------------------------------------- models


def parameter_count(hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    """Parameters of a Llama with tied embeddings and full multi-head attention (norms included)."""
    attention = 4 * hidden * hidden
    mlp = 3 * hidden * intermediate
    norms = 2 * hidden
    return vocab * hidden + layers * (attention + mlp + norms) + hidden


def ensure_models(bench_dir: Path, size: str) -> tuple[Path, Path, int]:
    """(policy folder, reward-model folder, parameter count) for a size, built once on the GPU."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from app.inference.model_files import load_gguf_tokenizer

    policy, reward = bench_dir / f"llama-{size}", bench_dir / f"llama-{size}-rm"
    hidden, layers, intermediate, heads = SIZES[size]
    tokenizer = load_gguf_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    count = parameter_count(hidden, layers, intermediate, len(tokenizer))
    if not (policy / "config.json").exists():
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(dir=bench_dir))
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        os.replace(tmp / "model", policy)
        del model
    if not (reward / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
        torch.nn.init.normal_(model.score.weight, std=0.02)
        model.config.pad_token_id = tokenizer.pad_token_id
        tmp = Path(tempfile.mkdtemp(dir=bench_dir))
        model.save_pretrained(tmp / "rm")
        tokenizer.save_pretrained(tmp / "rm")
        (tmp / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
        os.replace(tmp / "rm", reward)
        del model
    return policy, reward, count


# --------------------------------------------------------------------------------------------- sides


class DevicePeak:
    """The device's used memory, sampled every 20 ms; `peak_gb` is the largest rise over the start."""

    def __init__(self) -> None:
        import torch

        self._torch = torch
        free, total = torch.cuda.mem_get_info()
        self.start = total - free
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = self._torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            self._stop.wait(0.02)

    def __enter__(self) -> DevicePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return (self.peak - self.start) / 1024**3


def _prompt_ids(tokenizer, batch: int) -> list[list[int]]:
    ids = []
    for i in range(batch):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def side_rollout(args, engine: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.inference.generator import BatchedGenerator
    from app.inference.sampling import SamplingConfig

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    prompts = _prompt_ids(tokenizer, args.batch)
    sampling = SamplingConfig(
        max_new_tokens=args.response_tokens, temperature=1.0, top_p=1.0, repetition_penalty=1.0
    )
    seeds = list(range(args.batch))
    out: dict = {}
    with DevicePeak() as peak:
        if engine == "vllm":
            from workers.training.vllm_engine import VLLMEngine

            sampler = VLLMEngine(args.policy, tokenizer, gpu_memory_utilization=0.4, dtype="bfloat16")
            generate = lambda: sampler.generate_ids(prompts, sampling, seeds)  # noqa: E731
        else:
            model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.bfloat16).cuda().eval()
            sampler = BatchedGenerator(model, tokenizer, device="cuda")
            generate = lambda: sampler.generate_ids(prompts, sampling, seed=0)  # noqa: E731
        generate()  # warm-up: first kernels, CUDA graphs
        rates = []
        for _ in range(args.steps):
            torch.cuda.synchronize()
            started = time.perf_counter()
            rollout = generate()
            torch.cuda.synchronize()
            rates.append(sum(len(r) for r in rollout.response_ids) / (time.perf_counter() - started))
    out.update(tokens_per_s=sum(rates) / len(rates), peak_gpu_gb=peak.peak_gb)
    out["torch_peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    if engine == "vllm":
        out["logprob_max_dev"] = _logprob_gap(args.policy, tokenizer, rollout)
    return out


def _logprob_gap(policy: str, tokenizer, rollout) -> float:
    """Largest |vLLM log-prob - the policy's own log-prob| over the sampled tokens (T=1, no top-p)."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.training.lora import pack, response_logprobs

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.bfloat16).cuda().eval()
    batch = pack(rollout.prompt_ids, rollout.response_ids, tokenizer.pad_token_id).to(torch.device("cuda"))
    with torch.no_grad():
        ours, _ = response_logprobs(model, batch)
    theirs = torch.zeros_like(ours)
    for row, values in enumerate(rollout.logprobs):
        theirs[row, : len(values)] = torch.tensor(values, device=theirs.device)
    return float(((ours - theirs).abs() * batch.response_mask).max())


def side_ppo(args, engine: str, dtype: str) -> dict:
    import dataclasses

    import torch

    from app.common.reporting import MemoryReporter
    from workers.training.ppo import PPOConfig, RolloutSampling, train_ppo

    extra = {}
    if engine != "builtin":
        if "rollout_engine" not in {f.name for f in dataclasses.fields(PPOConfig)}:
            return {
                "error": "this build's PPOConfig has no rollout_engine setting (vLLM rollouts not wired in)"
            }
        extra["rollout_engine"] = engine
    config = PPOConfig(
        steps=args.steps + 1,
        rollout_batch_size=args.batch,
        mini_batch_size=args.batch,
        sampling=RolloutSampling(max_new_tokens=args.response_tokens),
        critic_warmup_steps=0,  # every measured step updates policy and critic, as TRL's
        guard_patience=10**9,  # measured, not stopped (a random model trips the EOS guard)
        checkpoint_every=10**9,
        device="cuda",
        dtype=dtype,
        **extra,
    )
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    reporter = MemoryReporter()
    with DevicePeak() as peak, tempfile.TemporaryDirectory(dir=args.bench_dir) as tmp:
        train_ppo(
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
    return {
        "tokens_per_s": sum(tokens) / sum(seconds),
        "step_seconds": seconds,
        "generation_share": sum(reporter.series("generation_seconds")[1:]) / sum(seconds),
        "peak_gpu_gb": peak.peak_gb,
        "torch_peak_gb": torch.cuda.max_memory_allocated() / 1024**3,
    }


def run_worker(args) -> None:
    started = time.perf_counter()
    side = args.worker
    if side.startswith("rollout-"):
        out = side_rollout(args, side.removeprefix("rollout-"))
    elif side == "ppo-fp32":
        out = side_ppo(args, "builtin", "float32")
    else:
        out = side_ppo(args, side.removeprefix("ppo-"), "bfloat16")
    out["wall_seconds"] = time.perf_counter() - started
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------- parent


def launch(side: str, args, policy: Path, reward: Path, timeout: float) -> dict:
    common = [
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--response-tokens",
        str(args.response_tokens),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if side == "trl":
        from benchmarks.ppo_step import ensure_trl_venv

        python = str(ensure_trl_venv(args.trl_venv or args.bench_dir / "trl-venv"))
        env.pop("PYTHONPATH", None)
        command = [python, str(ROOT / "benchmarks" / "ppo_step.py"), "--worker", "trl", "--device", "cuda"]
        command += ["--policy", str(policy), "--reward", str(reward), "--bench-dir", str(args.bench_dir)]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", side]
        command += ["--policy", str(policy), "--reward", str(reward), "--bench-dir", str(args.bench_dir)]
    try:
        done = subprocess.run(command + common, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:300]}"}
    out = json.loads(lines[-1][len("RESULT ") :])
    if side == "trl":  # ppo_step's worker reports per-step times and token counts, and torch's peak only
        out["tokens_per_s"] = sum(out["tokens"]) / sum(out["step_seconds"])
        out["torch_peak_gb"] = out.get("cuda_peak_gb")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="0.5b,1.5b", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (plus one warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument(
        "--budget", type=float, default=600.0, help="seconds for the whole run; later sides are skipped"
    )
    parser.add_argument("--side-timeout", type=float, default=300.0, help="seconds one side may take")
    parser.add_argument("--bench-dir", type=Path, default=Path("/tmp/prefloop-bench"))
    parser.add_argument("--trl-venv", type=Path, default=None, help="default: BENCH_DIR/trl-venv")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_scale.py measures GPU runs: no CUDA device is visible here")
    started = time.monotonic()
    args.bench_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "device": torch.cuda.get_device_name(0),
        "batch": args.batch,
        "response_tokens": args.response_tokens,
        "steps": args.steps,
        "sizes": {},
    }
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        policy, reward, count = ensure_models(args.bench_dir, size)
        print(f"{size}: {count / 1e9:.2f} B parameters ({SIZES[size]})", flush=True)
        results = {}
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            left = args.budget - (time.monotonic() - started)
            if left < 30:
                results[side] = {"error": "skipped: --budget spent"}
                continue
            print(f"  {side} ...", flush=True)
            results[side] = launch(side, args, policy, reward, min(args.side_timeout, left))
        report["sizes"][size] = {"parameters": count, "sides": results}

    print(
        f"\n{report['device']}: batch {args.batch}, {args.response_tokens}-token responses, {args.steps} measured steps"
    )
    header = f"{'size':<5} {'side':<16} {'tokens/s':>9} {'peak GPU GB':>11} {'torch GB':>8}  note"
    print(header)
    print("-" * len(header))
    for size, entry in report["sizes"].items():
        for side, r in entry["sides"].items():
            if r.get("error"):
                print(f"{size:<5} {side:<16} {'-':>9} {'-':>11} {'-':>8}  {r['error']}")
                continue
            note = f"logprob gap {r['logprob_max_dev']:.1e}" if "logprob_max_dev" in r else ""
            gpu = r.get("peak_gpu_gb")
            torch_gb = r.get("torch_peak_gb")
            print(
                f"{size:<5} {side:<16} {r['tokens_per_s']:>9.1f} "
                f"{'-' if gpu is None else f'{gpu:.1f}':>11} {'-' if torch_gb is None else f'{torch_gb:.1f}':>8}  {note}"
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
