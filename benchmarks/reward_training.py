"""Reward-model training speed and memory: our trainer against TRL's RewardTrainer, same pairs.

    python benchmarks/reward_training.py                 # rankings of 4 responses (the loop's data)
    python benchmarks/reward_training.py --data pairs    # independent pairs, one per prompt
    python benchmarks/reward_training.py --data both --steps 10

Both trainers see the same synthetic training pairs (generated here, no downloads), the same
held-out pairs, SmolLM2-135M-Instruct, fp32 on CPU (bf16 autocast on CUDA), AdamW with the same
learning rate, linear warmup/decay, grad clip 1.0, no gradient checkpointing. TRL takes batches of
`--batch-pairs` pairs; ours takes whole rankings up to that many pairs per batch, so both make one
pass over the same pairs and throughput is compared in pairs per second. Each trainer runs in its
own subprocess so that its peak RSS is its own. The first training step (allocator warm-up) and
our last one (which includes the end-of-epoch evaluation) are not timed. Held-out accuracy is
computed for both with the same scorer (`workers.training.reward.score`).

The synthetic preference: a response that says "certainly" more often is better. Prompts and
responses are plain sentences sized so that a formatted prompt + response is ~120 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, print_table, smollm2_dir  # noqa: E402

TRL_REFERENCE = "TRL 1.16 RewardTrainer on this machine (issue 4): 0.49 pairs/s, 6.5 GB peak RSS"
LEARNING_RATE = 2e-5
EVAL_FRACTION = 0.2
SEED = 0

SUBJECTS = [
    "the river",
    "the old library",
    "a small garden",
    "the city council",
    "my neighbour",
    "the market",
]
VERBS = ["explains", "remembers", "changes", "describes", "protects", "questions", "improves"]
OBJECTS = ["the plan", "every morning", "a quiet street", "the long report", "our budget", "the bridge"]
TAILS = [
    "before noon.",
    "without much noise.",
    "for the whole week.",
    "as it did last year.",
    "in simple words.",
]


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
    )


def _prompt(rng: random.Random, index: int) -> list[dict]:
    text = (
        f"Question {index}: "
        + " ".join(_sentence(rng) for _ in range(2))
        + " What should I do next? Please answer briefly."
    )
    return [{"role": "user", "content": text}]


def _response(rng: random.Random, markers: int) -> str:
    sentences = [_sentence(rng) for _ in range(5)]
    for _ in range(markers):
        at = rng.randrange(len(sentences))
        sentences[at] = "Certainly, " + sentences[at][0].lower() + sentences[at][1:]
    return " ".join(sentences)


def make_comparisons(kind: str, n_pairs: int, seed: int = SEED) -> list:
    """`rankings`: each prompt gets 4 responses with 0-3 markers, fully ranked → 6 pairs per ranking.
    `pairs`: each prompt gets one pair (1 marker vs 0)."""
    from workers.training.data import Comparison

    rng = random.Random(seed)
    out: list = []
    index = 0
    while len(out) < n_pairs:
        prompt = _prompt(rng, index)
        if kind == "rankings":
            responses = [_response(rng, m) for m in range(4)]  # markers 0..3: best has 3
            for better in range(3, -1, -1):
                for worse in range(better - 1, -1, -1):
                    out.append(
                        Comparison(
                            len(out),
                            index,
                            index,
                            prompt,
                            responses[better],
                            responses[worse],
                            better - worse,
                        )
                    )
        else:
            out.append(Comparison(len(out), index, index, prompt, _response(rng, 1), _response(rng, 0), 1.0))
        index += 1
    return out


# ---------------------------------------------------------------------------------------------
# measuring


class PeakRSS:
    """Samples this process's resident set every 20 ms; `peak` is the largest value seen (bytes)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * self._page)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _process_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rate(step_times: list[float], step_pairs: list[int], skip_last: bool) -> tuple[float, int]:
    """Pairs per second over the timed steps: all but the first (and our last, which evaluates)."""
    times, pairs = step_times[1:], step_pairs[1:]
    if skip_last:
        times, pairs = times[:-1], pairs[:-1]
    return sum(pairs) / sum(times), len(times)


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_ours(data: dict, args) -> dict:
    import torch

    from app.common.reporting import MemoryReporter
    from workers.training.data import Comparison, group_batches, split_by_prompt
    from workers.training.reward import RewardConfig, train_reward_model

    comparisons = [Comparison(**c) for c in data["comparisons"]]
    device = _device(args.device)
    config = RewardConfig(
        learning_rate=LEARNING_RATE,
        epochs=1,
        max_pairs_per_batch=args.batch_pairs,
        max_length=512,
        warmup_ratio=0.1,
        eval_fraction=EVAL_FRACTION,
        seed=SEED,
        checkpoint_every=10**9,  # one checkpoint at the end, after the timed steps
        log_every=10**9,
        share_prompt=not args.no_share_prompt,
        device=device,
    )
    train, _ = split_by_prompt(comparisons, EVAL_FRACTION, SEED)
    step_pairs = [len(b) for b in group_batches(train, args.batch_pairs, SEED, 0)]

    class Clock(MemoryReporter):
        def __init__(self) -> None:
            super().__init__()
            self.marks = [time.perf_counter()]
            self.cpu = [time.process_time()]

        def progress(self, done: int, total: int, message: str = "") -> None:
            self.marks.append(time.perf_counter())
            self.cpu.append(time.process_time())

    work = Path(tempfile.mkdtemp(prefix="rm-bench-ours-"))
    clock = Clock()
    with PeakRSS() as rss:
        clock.marks, clock.cpu = [time.perf_counter()], [time.process_time()]
        result = train_reward_model(Path(args.model), comparisons, work / "out", work / "ckpt", config, clock)
    step_times = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    # The first interval also holds model loading and tokenisation: it is the untimed warm-up step.
    rate, timed = _rate(step_times, step_pairs, skip_last=True)
    cpu_rate, _ = _rate(
        [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)], step_pairs, skip_last=True
    )
    return {
        "pairs_per_s": rate,
        "pairs_per_cpu_s": cpu_rate,
        "timed_steps": timed,
        "steps": result.steps,
        "pairs_per_step": sum(step_pairs) / len(step_pairs),
        "peak_rss": rss.peak,
        "process_peak_rss": _process_peak_rss(),
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else 0,
        "val_accuracy": result.metrics.get("val_accuracy", float("nan")),
    }


def run_trl(data: dict, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RewardConfig as TRLConfig
    from trl import RewardTrainer

    from workers.training.data import Comparison, split_by_prompt
    from workers.training.reward import score

    comparisons = [Comparison(**c) for c in data["comparisons"]]
    train, held_out = split_by_prompt(comparisons, EVAL_FRACTION, SEED)
    device = _device(args.device)
    rows = [
        {
            "prompt": c.prompt,
            "chosen": [{"role": "assistant", "content": c.chosen}],
            "rejected": [{"role": "assistant", "content": c.rejected}],
        }
        for c in train
    ]
    dataset = Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp(prefix="rm-bench-trl-"))
    steps = math.ceil(len(train) / args.batch_pairs)
    trl_config = TRLConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_pairs,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a float is a ratio of the total steps (transformers 5)
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=device == "cuda",  # same precision as ours: fp32 on CPU, bf16 autocast on CUDA
        use_cpu=device == "cpu",
        max_length=512,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, *a, **k):
            self._began = time.perf_counter()
            self._began_cpu = time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._began)
            self.cpu.append(time.process_time() - self._began_cpu)

    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with PeakRSS() as rss:
        trainer = RewardTrainer(
            model=args.model,
            args=trl_config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
        trainer.save_model(str(work / "final"))
    step_pairs = [args.batch_pairs] * len(timer.times)
    step_pairs[-1] = len(train) - args.batch_pairs * (len(timer.times) - 1)
    rate, timed = _rate(timer.times, step_pairs, skip_last=False)
    cpu_rate, _ = _rate(timer.cpu, step_pairs, skip_last=False)
    model = trainer.model
    model.config.reward_max_length = 512
    chosen = score(model, tokenizer, [c.prompt for c in held_out], [c.chosen for c in held_out])
    rejected = score(model, tokenizer, [c.prompt for c in held_out], [c.rejected for c in held_out])
    return {
        "pairs_per_s": rate,
        "pairs_per_cpu_s": cpu_rate,
        "timed_steps": timed,
        "steps": len(timer.times),
        "pairs_per_step": len(train) / len(timer.times),
        "peak_rss": rss.peak,
        "process_peak_rss": _process_peak_rss(),
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else 0,
        "val_accuracy": (chosen > rejected).float().mean().item(),
    }


# ---------------------------------------------------------------------------------------------
# driver


def _child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = json.loads(Path(args.data_file).read_text())
    # Checkpoints and trained models (~2 GB) go to a folder that is removed when the child ends.
    with tempfile.TemporaryDirectory(prefix=f"rm-bench-{args.worker}-") as scratch:
        tempfile.tempdir = scratch
        result = run_ours(data, args) if args.worker == "ours" else run_trl(data, args)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(worker: str, data_file: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        worker,
        "--data-file",
        str(data_file),
        "--model",
        str(args.model),
        "--device",
        args.device,
        "--batch-pairs",
        str(args.batch_pairs),
    ]
    if args.no_share_prompt:
        cmd.append("--no-share-prompt")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{worker} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def _mean_tokens(comparisons: list, model_dir: Path) -> float:
    from transformers import AutoTokenizer

    from workers.training.data import format_conversation

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [format_conversation(tokenizer, c.prompt, c.chosen) for c in comparisons[:50]]
    texts += [format_conversation(tokenizer, c.prompt, c.rejected) for c in comparisons[:50]]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)


def _bench(kind: str, args) -> list[list[object]]:
    from dataclasses import asdict

    from workers.training.data import split_by_prompt

    # Enough pairs that TRL makes `steps` steps over the training share, plus the held-out prompts.
    comparisons = make_comparisons(kind, int(args.steps * args.batch_pairs / (1 - EVAL_FRACTION)))
    train, held_out = split_by_prompt(comparisons, EVAL_FRACTION, SEED)
    tokens = _mean_tokens(comparisons, Path(args.model))
    print(
        f"\n[{kind}] {len(train)} training pairs, {len(held_out)} held-out pairs, "
        f"{tokens:.0f} tokens per prompt+response, batch {args.batch_pairs} pairs, device {_device(args.device)}, "
        f"threads {args.threads or 'default'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "data.json"
        data_file.write_text(json.dumps({"comparisons": [asdict(c) for c in comparisons]}))
        results = {}
        for worker in ("trl", "ours"):
            print(f"  running {worker} (load average {load_average()})", flush=True)
            results[worker] = _spawn(worker, data_file, args)
    rows = []
    for worker, label in (("trl", "TRL RewardTrainer"), ("ours", "prefloop")):
        r = results[worker]
        rows.append(
            [
                kind,
                label,
                f"{r['pairs_per_s']:.2f}",
                f"{r['pairs_per_cpu_s']:.3f}",
                f"{r['pairs_per_step']:.1f}",
                r["timed_steps"],
                f"{r['peak_rss'] / 2**30:.2f}",
                f"{r['process_peak_rss'] / 2**30:.2f}",
                f"{r['cuda_peak'] / 2**30:.2f}" if r["cuda_peak"] else "-",
                f"{r['val_accuracy']:.3f}",
            ]
        )
    speed = results["ours"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
    cpu_speed = results["ours"]["pairs_per_cpu_s"] / results["trl"]["pairs_per_cpu_s"]
    memory = results["ours"]["peak_rss"] / results["trl"]["peak_rss"]
    rows.append(
        [kind, "ours / TRL", f"{speed:.2f}x", f"{cpu_speed:.2f}x", "", "", f"{memory:.2f}x", "", "", ""]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=["rankings", "pairs", "both"], default="rankings")
    parser.add_argument(
        "--steps", type=int, default=20, help="TRL steps per run (ours covers the same pairs)"
    )
    parser.add_argument(
        "--batch-pairs", type=int, default=8, help="pairs per batch (ours: at most, whole rankings)"
    )
    parser.add_argument(
        "--model", default=None, help="HF folder; default: SmolLM2-135M-Instruct converted once"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--no-share-prompt", action="store_true", help="ours without prompt sharing (ablation)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per trainer (0: torch's default); 1 is steadiest on a busy CPU",
    )
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _child(args)
        return
    args.model = str(smollm2_dir(args.model))
    kinds = ["rankings", "pairs"] if args.data == "both" else [args.data]
    rows = []
    for kind in kinds:
        rows += _bench(kind, args)
    print()
    print_table(
        [
            "data",
            "trainer",
            "pairs/s",
            "pairs/CPU-s",
            "pairs/step",
            "timed steps",
            "peak RSS GB",
            "process RSS GB",
            "CUDA GB",
            "val acc",
        ],
        rows,
    )
    print(f"\nfor scale: {TRL_REFERENCE}; target ≥ 1.2x TRL's pairs/s at ≤ its memory")
    print(
        "pairs/CPU-s divides by the CPU time of the trainer's own process: steadier than wall time on a shared CPU"
    )
    print(f"load average at the end: {load_average()} (the CPU is shared; figures are noisy when it is high)")


if __name__ == "__main__":
    main()
