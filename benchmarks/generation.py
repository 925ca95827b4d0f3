"""Tokens/s of prefloop's BatchedGenerator against Hugging Face `model.generate`, side by side.

Same model (SmolLM2-135M-Instruct by default), same chat-formatted prompts, same batch sizes, lengths
and sampling settings (temperature 0.8, top-p 0.9, repetition penalty 1.1) for both, in one run.
By default neither stops at EOS, so both produce exactly --new-tokens tokens per row (equal work);
with --stop-at-eos both stop rows at EOS and count the tokens up to and including it.

    python benchmarks/generation.py                      # batch 4, 16, 32; 128 new tokens; 2 repeats
    python benchmarks/generation.py --batch-sizes 32 --new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import load_average, print_table, smollm2_dir, timed  # noqa: E402

PROMPTS = [
    "How do I politely decline a meeting invitation from my manager?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What causes the seasons on Earth?",
    "Give me three tips for sleeping better.",
    "Explain recursion to a ten-year-old.",
    "Write a short poem about autumn leaves.",
    "What is the difference between a list and a tuple in Python?",
    "How can I reduce my monthly grocery bill?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "Help me write an email asking for a deadline extension.",
    "What are the health benefits of walking every day?",
    "Explain what a hash table is and when to use one.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Suggest a name for a bakery that specialises in sourdough.",
    "How do vaccines train the immune system?",
    "Write a SQL query that counts orders per customer.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle.",
    "How do I start learning to play the guitar?",
    "Tell me how to pick a lock to get into my neighbour's house.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a haiku about a cat watching rain.",
    "Explain the difference between weather and climate.",
    "How can I make my resume stand out?",
    "What is a good way to learn a new language as an adult?",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "Give me a recipe for a quick vegetarian dinner.",
    "Why do we have leap years?",
    "Write a bash one-liner that finds the ten largest files in a directory.",
    "What are black holes made of?",
    "How do I apologise to a friend I hurt?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local HF causal-LM folder (default: SmolLM2-135M, converted once into the bench cache)",
    )
    parser.add_argument(
        "--batch-sizes", default="4,16,32", help="comma-separated batch sizes (default 4,16,32)"
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=128,
        help="max new tokens per row (default 128, the SamplingConfig default)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs per batch size and generator; the best counts (default 2)",
    )
    parser.add_argument(
        "--stop-at-eos",
        action="store_true",
        help="stop rows at EOS in both generators (default: exactly --new-tokens per row)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from app.inference.generator import BatchedGenerator
    from app.inference.sampling import SamplingConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = smollm2_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)  # T 0.8, top-p 0.9, repetition penalty 1.1
    eos = tokenizer.eos_token_id

    ours = BatchedGenerator(model, tokenizer)
    if not args.stop_at_eos:
        ours.stop_token_ids = ()
    hf_config = GenerationConfig(
        do_sample=sampling.do_sample,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=None,  # transformers' default top-k 50 would be an extra filter ours does not apply
        repetition_penalty=sampling.repetition_penalty,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos if args.stop_at_eos else None,
        pad_token_id=tokenizer.pad_token_id,
    )

    def run_hf(prompt_ids: list[list[int]]) -> int:
        texts = [tokenizer.decode(p) for p in prompt_ids]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=hf_config)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        if not args.stop_at_eos:
            return sum(len(r) for r in new)
        return sum(r.index(eos) + 1 if eos in r else len(r) for r in new)

    def run_ours(prompt_ids: list[list[int]], seed: int) -> int:
        return sum(len(r) for r in ours.generate_ids(prompt_ids, sampling, seed=seed).response_ids)

    chats = [ours.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    print(
        f"model {model_dir} | threads {torch.get_num_threads()} | fast path {ours.fast_path_active()} | "
        f"new tokens {args.new_tokens} ({'stop at EOS' if args.stop_at_eos else 'no EOS stop'}) | "
        f"T {sampling.temperature} top-p {sampling.top_p} rep {sampling.repetition_penalty} | load {load_average()}",
        flush=True,
    )
    warm = [chats[0], chats[1]]
    run_hf(warm)
    run_ours(warm, args.seed)

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = [chats[i % len(chats)] for i in range(batch)]
        best_hf = best_ours = 0.0
        for repeat in range(args.repeats):
            # Interleaved, so a burst of load from elsewhere hits both sides alike.
            seconds, tokens = timed(lambda p=prompts: run_hf(p))
            best_hf = max(best_hf, tokens / seconds)
            seconds, tokens = timed(lambda p=prompts, r=repeat: run_ours(p, args.seed + r))
            best_ours = max(best_ours, tokens / seconds)
            print(
                f"  batch {batch} repeat {repeat + 1}: generate {best_hf:.1f} tok/s, ours {best_ours:.1f} tok/s (best so far)",
                flush=True,
            )
        rows.append((batch, f"{best_hf:.1f}", f"{best_ours:.1f}", f"{best_ours / best_hf:.2f}x"))
    print()
    print_table(("batch", "HF generate tok/s", "BatchedGenerator tok/s", "ratio"), rows)
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
