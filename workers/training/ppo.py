"""PPO-max: the PPO recipe of MOSS-RLHF ("Secrets of RLHF in Large Language Models, Part I").

One *step* = sample a rollout batch from the current policy, score it, and make one PPO epoch over
that small on-policy buffer in mini-batches. Per step:

1. generate responses from the policy's own distribution at the rollout temperature (no top-p, no
   repetition penalty: see `RolloutSampling`), each row from its own seeded stream, with a rollout
   engine (`rollout_engines`: the batched KV-cache generator, or vLLM);
2. score each (prompt, response) with the reward model (or a Python reward function), standardise
   with the reward model's held-out statistics, subtract a penalty from responses that never emitted
   EOS (the reward model cannot see a cut-off answer: it re-renders the text through the chat
   template, which closes the turn), divide by the running std of all scores so far and clip to
   +-10 (MOSS `reward_scale` / `reward_clip`);
3. per-token reward = -beta * (log pi - log pi_ref) on every response token (k1 KL penalty), plus the
   score on the last real token;
4. GAE (gamma 1, lambda 0.95) on the critic's values, advantages whitened over the batch;
5. clipped policy loss (0.2) + clipped value loss (0.2) [- entropy bonus] [+ ptx LM loss on reference
   answers], one AdamW step per mini-batch with the global gradient norm clipped to 1.0.

Models: the policy starts from the live policy; the frozen reference is the base (SFT) policy; the
critic starts as the reward model (its score head on its backbone gives per-token values) with the
rewards' affine map folded into its head, and is warmed up alone for a few steps; with a reward
*function* the critic is the policy's backbone with a fresh zero value head. In LoRA mode the policy and the reference share one frozen base (reference =
adapters disabled), and the reward model and the critic share the reward model's frozen base
(critic = reward model + adapter + its own copy of the score head); with a reward function all of it
is one base. Full fine-tuning loads four separate models.

Collapse guards (MOSS §5.2: KL to the reference, response length and repetition move before the
reward does) stop the run and reject the candidate with the reason in `PPOResult.rejected_reason`.
Checkpoints every N steps; a rerun with the same checkpoint folder resumes bit-for-bit.

Under torch.distributed the same code runs on N processes (`PPORun` says how the work is split):
the trained models are sharded with FSDP2, each process samples and scores its share of the rows,
and everything computed over the whole batch is computed from the gathered buffer, so N processes
train as one does with the same global batch (docs/training.md, "PPO across processes").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from app.common.files import atomic_publish
from app.common.reporting import Reporter, RunCancelled
from app.inference.sampling import SamplingConfig
from workers.training import ppo_math as pm
from workers.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.training.config import RolloutEngineName, Sharding, TrainerConfig
from workers.training.distributed import (
    STRATEGIES,
    ProcessGroup,
    current_group,
    full_state_dict,
    grad_norm_value,
    shard_model,
)
from workers.training.lora import (
    LoraSettings,
    TokenBatch,
    TrainableState,
    activate_adapter,
    add_adapter,
    compute_context,
    disable_dropout,
    enable_gradient_checkpointing,
    freeze,
    hf_model,
    merged_causal_lm_state,
    pack,
    prompt_token_ids,
    resolve_dtype,
    response_hidden,
    response_logprobs,
    return_freed_memory_to_os,
    save_policy_folder,
)
from workers.training.ppo_guards import CollapseGuards, GuardSettings
from workers.training.reward import score
from workers.training.rollout_engines import (
    ENGINES,
    BuiltinEngine,
    RolloutEngine,
    load_generation_copy,
    make_rollout_engine,
)

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]


@dataclass
class RolloutSampling(TrainerConfig):
    """How PPO samples its rollouts: from the distribution it trains on, and nothing else.

    PPO's ratio, its k1 KL penalty and the KL guard all assume the responses were drawn from the
    distribution whose log-probs they use. Top-p and a repetition penalty reshape the sampling
    distribution in ways a forward pass does not reproduce, so rollouts keep neither (the task pool and
    the playground may). A temperature is kept as a knob because it is cheap to honour exactly: the
    policy, old-policy and reference logits are all divided by it, so PPO optimises the tempered
    policy it samples from, and the KL is measured between tempered distributions. MOSS-RLHF samples at
    T 0.8 / top-p 0.9 and scores at T 1, which makes the KL estimate biased (it can go negative).
    """

    max_new_tokens: int = 128  # long enough for a chat answer of a small model, short enough for CPU rollouts
    temperature: float = 1.0  # TRL's default: the policy as it is

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"the rollout temperature must be > 0, got {self.temperature}")

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=1.0,
            repetition_penalty=1.0,
            do_sample=True,
        )


@dataclass
class PPOConfig(TrainerConfig):
    """Every PPO-max setting with the MOSS-RLHF default (paper and released code) and why."""

    # --- schedule
    steps: int = 200  # rollout+update rounds; MOSS ran 1000 mini-batch updates, a round here does several
    rollout_batch_size: int = 32  # small on-policy buffer; paper 128, authors: smaller is more stable (#17)
    mini_batch_size: int = 8  # paper's 128:32 buffer-to-batch ratio, scaled down
    ppo_epochs: int = 1  # one pass over the buffer, then discard it (MOSS hard-codes 1)
    # Steps that train only the critic first (paper §5.4): even on the reward scale, the RM's head has
    # never predicted returns of partial answers; at most half the run, so a short run still trains
    # the policy.
    critic_warmup_steps: int = 2

    # --- optimiser (AdamW, MOSS: betas 0.9/0.95, eps 1e-6 policy / 1e-8 critic, no weight decay)
    learning_rate: float = 1e-5  # the policy's; MOSS 5e-7 is for 7B, a 135M model needs ~20x more
    critic_learning_rate: float = 3e-5  # keeps MOSS's 3:1 critic:actor ratio (1.5e-6 : 5e-7)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # MOSS
    policy_adam_eps: float = 1e-6  # MOSS
    critic_adam_eps: float = 1e-8  # MOSS
    lr_warmup_updates: int = 10  # MOSS: linear warm-up (floor 0.1) then inverse-sqrt decay; 100 of 1000
    max_grad_norm: float = 1.0  # global clip over policy and critic together (MOSS/DeepSpeed 1.0)

    # --- reward shaping
    kl_coef: float = 0.02  # token-level k1 KL penalty; MOSS config 0.02 (their runs: 0.01 en, 0.1 zh)
    reward_scaling: bool = True  # divide scores by their running std (MOSS use_reward_scaling)
    reward_clip: float | None = 10.0  # clip scaled scores to +-10 (MOSS reward_clip)
    # Subtracted from the standardised score of a response cut at max_new_tokens (TRL's
    # missing_eos_penalty): to the reward model a truncated answer looks finished. 1 = one RM std.
    missing_eos_penalty: float | None = 1.0
    use_reward_stats: bool = True  # standardise RM scores with its held-out mean/std before scaling

    # --- advantages and losses
    gamma: float = 1.0  # no discounting inside one response (MOSS)
    lam: float = 0.95  # GAE lambda (MOSS code; the paper's runs used 0.9)
    whiten_advantages: bool = True  # PPO-max table; zero-mean, unit-std advantages per buffer
    clip_ratio: float = 0.2  # PPO ratio clip (MOSS pg_clip)
    clip_value: float = 0.2  # value clip around the rollout values (MOSS value_clip)
    value_loss_coef: float = 1.0  # MOSS vf_loss_weight
    # loss -= entropy_coef * mean token entropy of the policy; off: the paper saw collapse from small
    # changes to it (App. B.3)
    entropy_coef: float = 0.0
    # PPO-ptx (InstructGPT): loss += ptx_coef * LM loss on reference answers (conversations ending with
    # the answer; a round takes them from the `reference` field of its train prompts); 0 = off (MOSS)
    ptx_coef: float = 0.0
    ptx_batch_size: int = 4  # reference answers per mini-batch update
    ptx_max_tokens: int = 512  # prompt + answer tokens; long prompts keep their end

    # --- rollouts
    sampling: RolloutSampling = field(default_factory=RolloutSampling)  # the distribution PPO trains on
    max_prompt_tokens: int = 512  # keep the last N prompt tokens (the assistant header must survive)
    forward_batch_size: int = 16  # rows per no-grad scoring pass

    # --- collapse guards (a guard must hold `guard_patience` steps in a row to stop the run)
    guard_max_kl: float | None = 20.0  # nats per response to the reference (sum of k1 over tokens)
    guard_max_length_ratio: float | None = 2.5  # mean length vs the first rollout: sudden rise (MOSS §5.2)
    # ... but never past this share of the way from the first rollout's length to max_new_tokens, so the
    # rise guard can fire at the training length (2.5x of 52 tokens is past a 128-token cap)
    guard_length_headroom: float | None = 0.5
    guard_min_length_ratio: float | None = 0.3  # ... or shrinking towards empty answers
    guard_max_mean_length: float | None = None  # absolute bounds in tokens, off unless set
    guard_min_mean_length: float | None = None
    # Share of responses that end with EOS within max_new_tokens: below it, answers are being cut off
    # (too short a cap, or a policy that learnt to ramble); the length guards alone miss it at the cap.
    guard_min_eos_share: float | None = 0.2
    guard_max_repetition: float | None = 0.5  # share of repeated 4-grams: "repeats a sentence" (MOSS #2)
    guard_patience: int = 3  # one noisy batch of a few samples must not kill a run

    # --- run
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"  # "auto": CUDA if present, else CPU
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 on CPU
    lora: LoraSettings | None = None  # None = full fine-tuning
    # Recompute the policy's and the critic's activations in the backward pass (about one more forward
    # pass per mini-batch) instead of keeping them: large models, long responses.
    gradient_checkpointing: bool = False
    # --- across processes (a single process ignores both)
    # FSDP2 sharding of the trained models: full_shard (ZeRO-3) or shard_grad_op (ZeRO-2: parameters
    # stay gathered between forward and backward; more memory, less communication)
    sharding: Sharding = "full_shard"
    # What samples the rollouts (workers/training/rollout_engines.py): "builtin", the project's batched
    # generator (on a copy of the policy when it is sharded), or "vllm" on GPU hosts that have it
    rollout_engine: RolloutEngineName = "builtin"

    def __post_init__(self) -> None:
        if self.sharding not in STRATEGIES:
            raise ValueError(f"unknown sharding {self.sharding!r}; known: {', '.join(STRATEGIES)}")
        if self.rollout_engine not in ENGINES:
            raise ValueError(f"unknown rollout engine {self.rollout_engine!r}; known: {', '.join(ENGINES)}")


@dataclass
class PPOResult:
    policy_path: Path | None  # the published folder; None when the candidate was rejected
    sha256: str | None
    steps_done: int
    rejected_reason: str | None
    final_metrics: dict[str, float]
    resumed_from_step: int | None = None


class CollapseDetected(RuntimeError):
    """A collapse guard tripped; the message is the stated reason."""


# --- models -----------------------------------------------------------------------------------


class TrainedModel(nn.Module):
    """One trained model (and the value head that reads it) as a module whose methods are its forward
    passes: the unit PPO shards over processes.

    Under FSDP2 the parameters outside the transformer blocks (embeddings, final norm, heads, the value
    bias) belong to the root module and are gathered by the root's forward hooks, so every pass must
    enter through the root: the critic's backbone-plus-head, the reference as the policy with its
    adapters off, the reward model as the critic's base. `FORWARDS` are registered as forward methods
    of the sharded root (`register_fsdp_forward_method`); in one process they are plain methods.
    """

    FORWARDS = ("logprobs", "reference_logprobs", "values", "reward_scores")

    def __init__(
        self,
        model: nn.Module,
        temperature: float,
        compute: Callable[[], Any],
        value_head: nn.Module | None = None,
        value_bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.value_bias = value_bias
        self.temperature = temperature
        self._compute = compute

    def logprobs(self, batch: TokenBatch, temperature: float | None = None) -> tuple[Tensor, Tensor]:
        """(response log-probs, logits) of the active adapter at the rollout temperature (or `temperature`)."""
        with self._compute():
            return response_logprobs(
                self.model, batch, self.temperature if temperature is None else temperature
            )

    def reference_logprobs(self, batch: TokenBatch) -> Tensor:
        """Log-probs with every adapter off: the base the LoRA policy started from."""
        with self.model.disable_adapter(), self._compute():
            return response_logprobs(self.model, batch, self.temperature)[0]

    def values(self, batch: TokenBatch) -> Tensor:
        head = self.value_head if self.value_head is not None else hf_model(self.model).score
        with self._compute():
            return head(response_hidden(self.model, batch)).squeeze(-1).float() + self.value_bias

    def reward_scores(self, tokenizer, messages: list[list[dict]], texts: list[str]) -> Tensor:
        """The reward model's raw scores: the critic's base with its adapter off (original score head)."""
        with self.model.disable_adapter():
            return score(self.model, tokenizer, messages, texts)


def _shard(root: TrainedModel, group: ProcessGroup, strategy: str) -> None:
    """Shard `root` over the group (a no-op in a group of one) with its methods as forward passes."""
    if not group.distributed:
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    shard_model(root, group, strategy)
    for name in TrainedModel.FORWARDS:
        register_fsdp_forward_method(root, name)


class PPOModels:
    """Policy, reference, critic and reward, with the LoRA adapter bookkeeping behind five methods.

    Across processes the trained models (the policy, the critic; in LoRA mode the base they sit on) are
    sharded with FSDP2, each behind one `TrainedModel` root. The frozen reference and reward model of
    full fine-tuning stay whole on every process: they take no gradients and no optimiser state, so
    sharding them would save only their weights while adding an all-gather to each of their forward
    passes, and whole they need no collective, so every process scores its own rows independently.
    """

    POLICY, CRITIC = "policy", "critic"

    def __init__(
        self,
        policy_path: Path,
        reference_path: Path | None,
        reward: RewardFn | Path,
        config: PPOConfig,
        device: torch.device,
        dtype: torch.dtype,
        group: ProcessGroup | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        group = group if group is not None else current_group()
        self.sharded = group.distributed
        self.device, self.lora, self.dtype = device, config.lora, dtype
        # Every log-prob PPO uses is of the tempered distribution the rollouts were drawn from.
        self.temperature = config.sampling.temperature
        self.tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.reward_fn: RewardFn | None = reward if callable(reward) else None
        self.reward_model = None
        self.reward_tokenizer = None
        self.reward_stats: dict[str, float] | None = None
        self.shared_base = False  # LoRA with a reward function: one base for everything
        self.value_head: nn.Module | None = None
        # The critic's output offset: the score heads have no bias, and the reward map has a shift.
        # One element rather than a scalar: FSDP2 shards along the first dimension.
        self.value_bias = nn.Parameter(torch.zeros(1, device=device))

        # Weights that full fine-tuning updates stay float32 (bf16 would round small updates away);
        # frozen weights, a LoRA base included, are held in the compute dtype.
        def causal_lm(path: Path, trained: bool = False) -> nn.Module:
            load = torch.float32 if trained else dtype
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=load).to(device)
            disable_dropout(model)
            return model.eval()

        def classifier(path: Path, trained: bool = False) -> nn.Module:
            load = torch.float32 if trained else dtype
            model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=load)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.tokenizer.pad_token_id
            disable_dropout(model)
            return model.to(device).eval()

        same_reference = (
            reference_path is None or Path(reference_path).resolve() == Path(policy_path).resolve()
        )
        policy = causal_lm(policy_path, trained=self.lora is None)
        if self.lora is None:
            self.policy = policy
            self.reference = freeze(causal_lm(reference_path or policy_path))
        else:
            self.policy = add_adapter(freeze(policy), self.lora, self.POLICY)
            # The reference is the policy's base with adapters off, unless it is a different model.
            self.reference = None if same_reference else freeze(causal_lm(reference_path))

        if self.reward_fn is None:
            rm_path = Path(reward)
            self.reward_tokenizer = AutoTokenizer.from_pretrained(str(rm_path))
            if self.reward_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(
                    "the critic starts from the reward model, so it must share the policy's tokenizer"
                )
            stats_file = rm_path / "reward_stats.json"
            if config.use_reward_stats and stats_file.exists():
                self.reward_stats = json.loads(stats_file.read_text())
            if self.lora is None:
                self.reward_model = freeze(classifier(rm_path))
                # value head = the RM's score head on its backbone
                self.critic = classifier(rm_path, trained=True)
            else:
                # Reward = this model with the adapter off (original score head); critic = adapter on
                # (its own trainable copy of the score head, starting equal to the RM's).
                self.critic = add_adapter(freeze(classifier(rm_path)), self.lora, self.CRITIC, ["score"])
                self.reward_model = self.critic
        elif self.lora is None:
            self.critic = classifier(policy_path, trained=True)
            nn.init.zeros_(self.critic.score.weight)  # a fresh head predicts 0 until the critic learns
        else:
            self.shared_base = True
            self.critic = add_adapter(self.policy, self.lora, self.CRITIC)
            hidden = hf_model(self.policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1, bias=False, device=device)
            nn.init.zeros_(self.value_head.weight)

        self._collect_trainable()
        for param in self.all_trainable():  # adapters and head copies train in float32
            param.data = param.data.float()
        if config.gradient_checkpointing:
            if self.shared_base:
                # Recomputation runs in the backward pass with whichever adapter is active then: the
                # policy's blocks would be recomputed with the critic's adapter, and the gradients be wrong.
                raise ValueError(
                    "policy.gradient_checkpointing does not work with LoRA and a reward function, where the "
                    "policy and the critic switch adapters on one base: train against a reward model, or "
                    "turn gradient checkpointing off"
                )
            for trained in (self.policy, self.critic):
                enable_gradient_checkpointing(trained)
        if self.reward_fn is None:
            self._fold_reward_map_into_critic()

        # The roots every forward pass of a trained model enters through (see `TrainedModel`).
        if self.shared_base:
            self.actor = self.critic_root = TrainedModel(
                self.policy, self.temperature, self.compute, self.value_head, self.value_bias
            )
        else:
            self.actor = TrainedModel(self.policy, self.temperature, self.compute)
            self.critic_root = TrainedModel(
                self.critic, self.temperature, self.compute, None, self.value_bias
            )
        for root in {id(r): r for r in (self.actor, self.critic_root)}.values():
            _shard(root, group, config.sharding)
        # Sharding replaces the parameters (DTensors on each process's share): collect them again.
        self._collect_trainable()
        self.value_bias = self.critic_params["critic.value_bias"]
        self.activate_policy()

    def _collect_trainable(self) -> None:
        # Keys carry the role: in full fine-tuning both models have a `model.embed_tokens.weight`.
        self.policy_params = {f"policy.{n}": p for n, p in self._trainable(self.policy, self.POLICY).items()}
        self.critic_params = {f"critic.{n}": p for n, p in self._trainable(self.critic, self.CRITIC).items()}
        if self.value_head is not None:
            self.critic_params["critic.value_head.weight"] = self.value_head.weight
        bias = getattr(self, "critic_root", None)
        self.critic_params["critic.value_bias"] = bias.value_bias if bias is not None else self.value_bias

    def _fold_reward_map_into_critic(self) -> None:
        """Put the critic on the scale of the rewards it predicts (MOSS-RLHF §5.4: a critic that starts
        far off the return scale sends noisy advantages into the first policy updates).

        Rewards are z-scored with the reward model's held-out statistics and divided by the running
        std; the critic starts as the reward model, so its head gets the same affine map: weight *
        scale, bias = shift. The running std at initialisation is 1 (nothing seen yet); a resumed run
        overwrites all of this with its checkpoint.
        """
        scale, shift = pm.reward_affine(self.reward_stats, running_std=1.0)
        head = [p for name, p in self.critic_params.items() if ".score." in name and name.endswith("weight")]
        if len(head) != 1:
            raise RuntimeError(f"expected one critic score head, found {len(head)}")
        with torch.no_grad():
            head[0].mul_(scale)
            self.value_bias.fill_(shift)

    def _trainable(self, model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
        if self.lora is None:
            return {n: p for n, p in model.named_parameters() if p.requires_grad}
        return {n: p for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")}

    def all_trainable(self) -> list[nn.Parameter]:
        return [*self.policy_params.values(), *self.critic_params.values()]

    def _kept_trainable(self) -> list[nn.Parameter]:
        """What must stay trainable across an adapter switch: the optimised parameters and, when the
        models are sharded, the same parameters as the modules hold them now (with `shard_grad_op`,
        FSDP2's gathered copies between forward and backward; those are what peft's switch freezes)."""
        kept = self.all_trainable()
        if not self.sharded:
            return kept
        names = {"model." + n.split(".", 1)[1] for n in self.policy_params}
        names |= {
            "model." + n.split(".", 1)[1] for n in self.critic_params if not n.startswith("critic.value_")
        }
        names |= {"value_head.weight", "value_bias"}
        roots = {id(r): r for r in (self.actor, self.critic_root)}.values()
        return kept + [p for root in roots for n, p in root.named_parameters() if n in names]

    def activate_policy(self) -> None:
        if self.lora is not None:
            activate_adapter(self.policy, self.POLICY, self._kept_trainable())

    def compute(self):
        """Autocast to the compute dtype where it is not float32 (GPU default: bf16)."""
        return compute_context(self.device, self.dtype)

    def policy_logprobs(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        self.activate_policy()
        return self.actor.logprobs(batch)

    def ptx_logprobs(self, batch: TokenBatch) -> Tensor:
        """Log-probs of reference answers under the plain LM (temperature 1), for the ptx loss."""
        self.activate_policy()
        return self.actor.logprobs(batch, temperature=1.0)[0]

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch) -> Tensor:
        if self.reference is not None:
            with self.compute():
                return response_logprobs(self.reference, batch, self.temperature)[0]
        return self.actor.reference_logprobs(batch)

    def values(self, batch: TokenBatch) -> Tensor:
        if self.shared_base:
            activate_adapter(self.critic, self.CRITIC, self._kept_trainable())
        values = self.critic_root.values(batch)
        if self.shared_base:
            self.activate_policy()
        return values

    @torch.no_grad()
    def scores(
        self, messages: list[list[dict]], prompt_texts: list[str], texts: list[str], ids: list[list[int]]
    ) -> Tensor:
        """Raw reward per response (the RM's score or the reward function's value)."""
        if self.reward_fn is not None:
            return torch.tensor([float(x) for x in self.reward_fn(prompt_texts, texts, ids)])
        if self.lora is not None:  # the critic's base: a sharded model, entered through its root
            raw = self.critic_root.reward_scores(self.reward_tokenizer, messages, texts)
        else:
            raw = score(self.reward_model, self.reward_tokenizer, messages, texts)
        return raw.detach().float().cpu()


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Experience:
    batch: TokenBatch
    ended: Tensor  # (B,) bool
    raw_scores: Tensor  # (B,) as the reward model / function gave them
    scores: Tensor  # (B,) after standardising, EOS penalty, running-std scaling and clipping
    ref_logprobs: Tensor  # (B, R)
    sampler_logprobs: Tensor  # (B, R) as the sampler drew the tokens (0 on padding)
    responses: list[list[int]]
    texts: list[str]
    generation_seconds: float


def invsqrt_with_warmup(warmup: int) -> Callable[[int], float]:
    """MOSS's schedule: linear warm-up with a 0.1 floor, then lr * sqrt(warmup / update)."""
    warmup = max(1, warmup)

    def factor(update: int) -> float:
        if update < warmup:
            return max(update / warmup, 0.1)
        return math.sqrt(warmup / update)

    return factor


def _answer_tokens(tokenizer, conversation: list[dict], max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a chat that ends with an assistant turn, split where the prompt with
    the assistant header open stops agreeing with the whole chat; the answer keeps the end-of-turn
    tokens, so the ptx loss also teaches when to stop."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("a ptx conversation must end with the reference answer as an assistant turn")
    prompt = prompt_token_ids(tokenizer, conversation[:-1])
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    full = tokenizer(text, add_special_tokens=False).input_ids
    common = 0
    for a, b in zip(prompt, full, strict=False):
        if a != b:
            break
        common += 1
    head, answer = full[:common], full[common:]
    answer = answer[: max(1, max_tokens // 2)] if len(head) + len(answer) > max_tokens else answer
    head = head[-max(1, max_tokens - len(answer)) :]
    return head, answer


def rollout_row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of row `row` of step `step`'s global rollout batch: a function of the three
    alone, so a row draws the same response in one process or many, and after a resume."""
    digest = hashlib.blake2b(f"ppo-rollout:{seed}:{step}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63


class PPORun:
    """One PPO-max run, the same code in one process and in many.

    Across N processes: each takes a contiguous 1/N share of every step's rollout rows (generation,
    scoring, the no-grad passes), then the step's whole buffer is gathered onto every process
    (token ids, sampler log-probs, scores; small next to the models), so every number that depends
    on the whole batch (the running reward moments, GAE, advantage whitening, the rollout metrics the
    guards read) is computed from the same data in the same order on every process, exactly as one
    process computes it. Mini-batches are drawn from one seeded permutation of the global buffer, the
    same as in one process; each process trains on its contiguous share of every mini-batch, with its
    loss divided by the mini-batch's global token count and multiplied by N (FSDP2 averages gradients),
    so the summed update is the one-process update.
    """

    def __init__(
        self,
        policy_path: Path,
        reference_path: Path | None,
        reward: RewardFn | Path,
        prompts: list[list[dict]],
        config: PPOConfig,
        reporter: Reporter,
        ptx_conversations: list[list[dict]] | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        if config.ptx_coef > 0 and not ptx_conversations:
            raise ValueError(
                f"ptx_coef is {config.ptx_coef} but there are no reference answers to compute the ptx loss "
                "on: give prompts a 'reference' answer, or set ptx_coef to 0"
            )
        self.group = group if group is not None else current_group()
        # Every process runs the same number of forward passes on the sharded models (a pass is a
        # collective under FSDP2), so every share of every batch must be the same size.
        self.group.require_divisible(config.rollout_batch_size, "policy.rollout_batch_size")
        self.group.require_divisible(config.mini_batch_size, "policy.mini_batch_size")
        if config.ptx_coef > 0:
            self.group.require_divisible(config.ptx_batch_size, "policy.ptx_batch_size")
        self.config, self.reporter = config, reporter
        self.device = self.group.device(config.device)
        return_freed_memory_to_os(self.device)
        torch.manual_seed(config.seed)
        dtype = resolve_dtype(config.dtype, self.device)
        self.policy_path = Path(policy_path)
        # vLLM checks at start-up that its share of the GPU is free, so it comes before the models; the
        # builtin engine generates with the policy itself (one process) or a copy of it.
        engine_first = config.rollout_engine != "builtin"
        if engine_first:
            self.engine = self._make_engine(None, dtype)
        self.models = PPOModels(
            Path(policy_path),
            Path(reference_path) if reference_path else None,
            reward,
            config,
            self.device,
            dtype,
            self.group,
        )
        tok = self.models.tokenizer
        if not engine_first:
            self.engine = self._make_engine(self.models.policy, dtype)
        self.prompts = prompts
        self.prompt_ids = [prompt_token_ids(tok, m, config.max_prompt_tokens) for m in prompts]
        self.prompt_texts = [tok.decode(ids) for ids in self.prompt_ids]
        self.ptx = (
            [_answer_tokens(tok, c, config.ptx_max_tokens) for c in ptx_conversations or []]
            if config.ptx_coef > 0
            else []
        )
        # This process's rows of every rollout batch (global row indices, contiguous).
        self.rows = self.group.shard(list(range(config.rollout_batch_size)))

        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": list(self.models.policy_params.values()),
                    "lr": self._lr(config.learning_rate),
                    "eps": config.policy_adam_eps,
                },
                {
                    "params": list(self.models.critic_params.values()),
                    "lr": self._lr(config.critic_learning_rate),
                    "eps": config.critic_adam_eps,
                },
            ],
            betas=config.adam_betas,
            weight_decay=0.0,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, invsqrt_with_warmup(config.lr_warmup_updates)
        )
        self.trainables = TrainableState({**self.models.policy_params, **self.models.critic_params})
        self.running = pm.RunningMoments()
        self.guards = CollapseGuards(
            GuardSettings(
                max_kl=config.guard_max_kl,
                max_length_ratio=config.guard_max_length_ratio,
                min_length_ratio=config.guard_min_length_ratio,
                length_headroom=config.guard_length_headroom,
                max_mean_length=config.guard_max_mean_length,
                min_mean_length=config.guard_min_mean_length,
                min_eos_share=config.guard_min_eos_share,
                max_repetition=config.guard_max_repetition,
                patience=config.guard_patience,
                max_new_tokens=config.sampling.max_new_tokens,
            )
        )
        self.updates = 0

    def _make_engine(self, policy: nn.Module | None, dtype: torch.dtype) -> RolloutEngine:
        from transformers import AutoTokenizer

        tokenizer = (
            AutoTokenizer.from_pretrained(str(self.policy_path)) if policy is None else self.models.tokenizer
        )
        # The builtin copy holds the policy as it is trained (full fine-tuning in float32, a LoRA base
        # in the compute dtype); vLLM generates in the compute dtype.
        builtin_full = self.config.rollout_engine == "builtin" and self.config.lora is None
        return make_rollout_engine(
            self.config.rollout_engine,
            policy=policy,
            tokenizer=tokenizer,
            model_path=self.policy_path,
            device=self.device,
            dtype=torch.float32 if builtin_full else dtype,
            group=self.group,
        )

    def _lr(self, lr: float) -> float:
        return lr * self.config.lora.lr_scale if self.config.lora is not None else lr

    # -- data order is a pure function of (seed, step), so a resumed run sees the same prompts

    def _prompt_indices(self, step: int) -> list[int]:
        n, size = len(self.prompts), self.config.rollout_batch_size
        orders: dict[int, list[int]] = {}
        out = []
        for k in range(step * size, (step + 1) * size):
            epoch, pos = divmod(k, n)
            if epoch not in orders:  # each pass over the prompts has its own seeded order
                orders[epoch] = list(range(n))
                random.Random(self.config.seed * 7919 + epoch).shuffle(orders[epoch])
            out.append(orders[epoch][pos])
        return out

    # -- 1-2: rollout and scores

    def refresh_engine(self) -> None:
        """Give a separate generation engine the policy's current weights (a collective: every process
        gathers the full policy, merges LoRA into it, and loads it into its own engine)."""
        if self.engine.shares_training_weights:
            return
        state = full_state_dict(self.models.actor, self.group)
        prefix = "model."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        adapter = PPOModels.POLICY if self.config.lora is not None else None
        self.engine.load_weights(merged_causal_lm_state(state, self.config.lora, adapter))

    @torch.no_grad()
    def rollout(self, step: int) -> Experience:
        cfg, models, tok, group = self.config, self.models, self.models.tokenizer, self.group
        idx = self._prompt_indices(step)
        mine = [idx[r] for r in self.rows]
        self.refresh_engine()
        started = time.perf_counter()
        models.activate_policy()
        out = self.engine.generate_ids(
            [self.prompt_ids[i] for i in mine],
            cfg.sampling.sampling_config(),
            row_seeds=[rollout_row_seed(cfg.seed, step, r) for r in self.rows],
        )
        generation_seconds = time.perf_counter() - started
        responses = [list(r) for r in out.response_ids]
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        raw = models.scores(
            [self.prompts[i] for i in mine], [self.prompt_texts[i] for i in mine], texts, responses
        )
        # The whole step's buffer on every process, in global row order (shares are contiguous).
        shares = group.gather_objects(
            (
                responses,
                [bool(e) for e in out.ended_with_eos],
                [list(lp) for lp in out.logprobs],
                raw.tolist(),
            )
        )
        responses = [r for share in shares for r in share[0]]
        ended = torch.tensor([e for share in shares for e in share[1]])
        sampled = [lp for share in shares for lp in share[2]]
        raw = torch.tensor([x for share in shares for x in share[3]], dtype=torch.float32)
        texts = tok.batch_decode(responses, skip_special_tokens=True)

        scale, shift = pm.reward_affine(models.reward_stats)
        scores = raw * scale + shift
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - cfg.missing_eos_penalty)
        if cfg.reward_scaling:
            scores = pm.scale_rewards(scores, self.running, cfg.reward_clip)
        elif cfg.reward_clip:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)

        batch = pack([self.prompt_ids[i] for i in idx], responses, tok.pad_token_id).to(self.device)
        ref = self._chunked(models.reference_logprobs, batch)
        width = batch.response_width
        sampler = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in sampled], device=self.device)
        return Experience(
            batch, ended, raw, scores.to(self.device), ref, sampler, responses, texts, generation_seconds
        )

    def _chunked(self, fn: Callable[[TokenBatch], Tensor], batch: TokenBatch) -> Tensor:
        """`fn` over this process's rows of the global `batch` in chunks of `forward_batch_size`, then
        every process's results in global row order (the same number of chunks on every process)."""
        size, rows = self.config.forward_batch_size, self.rows
        parts = [fn(batch.select(rows[i : i + size])) for i in range(0, len(rows), size)]
        return self.group.cat(torch.cat(parts))

    # -- 3-4: rewards, GAE, whitening

    def advantages(
        self, exp: Experience, old_logprobs: Tensor, old_values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cfg, mask = self.config, exp.batch.response_mask
        kl = pm.kl_k1(old_logprobs, exp.ref_logprobs)
        rewards = pm.token_rewards(exp.scores, kl, mask, cfg.kl_coef)
        advantages, returns = pm.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = pm.whiten(advantages, mask)
        return advantages, returns, kl

    # -- 5: the PPO epoch

    def update(self, exp: Experience, step: int) -> dict[str, float]:
        cfg, models, mask, group = self.config, self.models, exp.batch.response_mask, self.group
        train_policy = step >= min(cfg.critic_warmup_steps, cfg.steps // 2)
        rows = mask.shape[0]
        mine = torch.tensor(self.rows, dtype=torch.long, device=self.device)
        tokens = mask.sum().item()
        stats: list[dict[str, float]] = []
        # With one epoch and one mini-batch the rollout-time log-probs and values are exactly those of
        # the training forward pass (same weights, no dropout), so one pass serves both.
        single_pass = cfg.ppo_epochs == 1 and cfg.mini_batch_size >= rows
        if single_pass:
            local = exp.batch.select(mine)
            with torch.set_grad_enabled(train_policy):
                logprobs, logits = models.policy_logprobs(local)
            values = models.values(local)
            old_logprobs, old_values = group.cat(logprobs.detach()), group.cat(values.detach())
            entropy_sum = pm.masked_sum(pm.entropy_from_logits(logits.detach()), local.response_mask)
            entropy = group.sum(entropy_sum.reshape(1)).item() / max(tokens, 1.0)
            if cfg.entropy_coef <= 0:
                del logits  # (B, R, V): only the entropy bonus needs it
                logits = None
            advantages, returns, kl = self.advantages(exp, old_logprobs, old_values)
            stats.append(
                self._optimise(
                    exp,
                    mine,
                    logprobs,
                    logits,
                    values,
                    old_logprobs[mine],
                    old_values[mine],
                    advantages[mine],
                    returns[mine],
                    train_policy,
                )
            )
        else:
            with torch.no_grad():
                entropy_sum = torch.zeros(1, device=self.device)

                def old_policy(part: TokenBatch) -> Tensor:
                    nonlocal entropy_sum
                    lp, logits = models.policy_logprobs(part)
                    entropy_sum += pm.masked_sum(pm.entropy_from_logits(logits), part.response_mask)
                    return lp

                old_logprobs = self._chunked(old_policy, exp.batch)
                entropy = group.sum(entropy_sum).item() / max(tokens, 1.0)
                old_values = self._chunked(models.values, exp.batch)
            advantages, returns, kl = self.advantages(exp, old_logprobs, old_values)
            # One permutation of the global buffer, as in one process; each process trains on its
            # contiguous share of every mini-batch (equal shares: both sizes divide by the process count).
            gen = torch.Generator().manual_seed(cfg.seed * 31 + step)
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(rows, generator=gen)
                for start in range(0, rows, cfg.mini_batch_size):
                    minibatch = order[start : start + cfg.mini_batch_size].to(self.device)
                    sel = torch.stack(group.shard(minibatch))
                    mb = exp.batch.select(sel)
                    with torch.set_grad_enabled(train_policy):
                        logprobs, logits = models.policy_logprobs(mb)
                    values = models.values(mb)
                    stats.append(
                        self._optimise(
                            exp,
                            sel,
                            logprobs,
                            logits if cfg.entropy_coef > 0 else None,
                            values,
                            old_logprobs[sel],
                            old_values[sel],
                            advantages[sel],
                            returns[sel],
                            train_policy,
                            mask[minibatch].sum().item(),
                        )
                    )
        merged = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        # PPO's ratio at the first mini-batch of the first epoch: 1 while old = the sampling policy.
        merged["ratio_first_minibatch"] = stats[0]["ratio_mean"]
        merged.update(self._rollout_metrics(exp, old_logprobs, old_values, returns, kl, entropy))
        return merged

    def _optimise(
        self,
        exp: Experience,
        rows: Tensor,
        logprobs: Tensor,
        logits: Tensor | None,
        values: Tensor,
        old_logprobs: Tensor,
        old_values: Tensor,
        advantages: Tensor,
        returns: Tensor,
        train_policy: bool,
        minibatch_tokens: float | None = None,
    ) -> dict[str, float]:
        """One optimiser step on this process's `rows` of a mini-batch with `minibatch_tokens` response
        tokens in all (default: the whole buffer's). Every term is this process's share of the
        mini-batch mean; the shares' sum over processes is the one-process loss, and the reported
        numbers are those sums, the same on every process."""
        cfg, world = self.config, self.group.world_size
        mask = exp.batch.response_mask[rows]
        count = exp.batch.response_mask.sum().item() if minibatch_tokens is None else minibatch_tokens
        policy = pm.clipped_policy_loss(logprobs, old_logprobs, advantages, mask, cfg.clip_ratio, count)
        value = pm.clipped_value_loss(values, old_values, returns, mask, cfg.clip_value, count)
        loss = cfg.value_loss_coef * value.loss
        names = ["policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "ratio_mean"]
        parts = [policy.loss, value.loss, policy.clip_fraction, value.clip_fraction, policy.approx_kl]
        parts.append(policy.ratio_mean)
        if train_policy:
            loss = loss + policy.loss
            if cfg.entropy_coef > 0 and logits is not None:
                entropy = pm.share_of_mean(pm.entropy_from_logits(logits), mask, count)
                loss = loss - cfg.entropy_coef * entropy
                names.append("entropy_bonus")
                parts.append(entropy)
            if cfg.ptx_coef > 0:
                ptx = self._ptx_loss()
                loss = loss + cfg.ptx_coef * ptx
                names.append("ptx_loss")
                parts.append(ptx)
        names.append("loss")
        parts.append(loss)
        totals = self.group.sum(torch.stack([p.detach().float().reshape(()) for p in parts])).tolist()
        out = dict(zip(names, totals, strict=True))
        if not math.isfinite(out["loss"]):
            raise CollapseDetected(f"non-finite loss ({out['loss']}) at update {self.updates}")
        self.optimizer.zero_grad(set_to_none=True)
        # FSDP2 averages gradients over the processes; the shares must add up, so undo the average.
        (loss * world if world > 1 else loss).backward()
        grad_norm = grad_norm_value(
            torch.nn.utils.clip_grad_norm_(self.models.all_trainable(), cfg.max_grad_norm)
        )
        if not math.isfinite(grad_norm):
            raise CollapseDetected(f"non-finite gradient norm at update {self.updates}")
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1
        out["grad_norm"] = grad_norm
        return out

    def _ptx_loss(self) -> Tensor:
        """LM loss (mean negative log-likelihood) of a few reference answers given their prompts
        (PPO-ptx), cycling through them in a seeded order; the prompt tokens are not predicted. Each
        process scores its share of the picked answers; the result is its share of the mean."""
        cfg = self.config
        order = list(range(len(self.ptx)))
        random.Random(cfg.seed + 17).shuffle(order)
        start = self.updates * cfg.ptx_batch_size
        picked = [self.ptx[order[(start + j) % len(order)]] for j in range(cfg.ptx_batch_size)]
        count = sum(len(a) for _, a in picked)
        mine = self.group.shard(picked)
        batch = pack([p for p, _ in mine], [a for _, a in mine], self.models.tokenizer.pad_token_id)
        batch = batch.to(self.device)
        logprobs = self.models.ptx_logprobs(batch)
        return -pm.share_of_mean(logprobs, batch.response_mask, count)

    def _rollout_metrics(
        self,
        exp: Experience,
        old_logprobs: Tensor,
        old_values: Tensor,
        returns: Tensor,
        kl: Tensor,
        entropy: float,
    ) -> dict[str, float]:
        mask = exp.batch.response_mask
        lengths = mask.sum(1)
        repetition = [pm.repeated_ngram_share(r) for r in exp.responses]
        # The sampling contract: the log-probs PPO trains on are those of the distribution that drew the
        # tokens, so exp(old - sampler) is 1 on every token (up to float noise of the two code paths).
        sampler_ratio = torch.exp(old_logprobs - exp.sampler_logprobs)
        sampler_dev = ((sampler_ratio - 1.0).abs() * mask).max().item() if mask.any() else 0.0
        return {
            "sampler_ratio_max_dev": sampler_dev,
            "reward_raw": exp.raw_scores.mean().item(),
            "reward_raw_std": exp.raw_scores.std().item() if len(exp.raw_scores) > 1 else 0.0,
            "reward_normalised": exp.scores.mean().item(),
            "kl_ref": pm.masked_sum(kl, mask, dim=1).mean().item(),
            "kl_ref_per_token": pm.masked_mean(kl, mask).item(),
            "response_length": lengths.mean().item(),
            "response_length_max": lengths.max().item(),
            "eos_share": exp.ended.float().mean().item(),
            "repetition_rate": sum(repetition) / len(repetition),
            "ppl_policy": math.exp(-pm.masked_mean(old_logprobs, mask).item()),
            "ppl_reference": math.exp(-pm.masked_mean(exp.ref_logprobs, mask).item()),
            "entropy": entropy,
            "values_mean": pm.masked_mean(old_values, mask).item(),
            "returns_mean": pm.masked_mean(returns, mask).item(),
            "lr_policy": self.optimizer.param_groups[0]["lr"],
            "response_tokens": lengths.sum().item(),
        }

    # -- checkpoints

    def state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "updates": self.updates,
            "running": self.running.state_dict(),
            **self.guards.state_dict(),
        }

    def load_state(self, extra: dict[str, Any]) -> int:
        self.updates = int(extra["updates"])
        self.running.load_state_dict(extra["running"])
        self.guards.load_state_dict(extra)
        return int(extra["step"])

    def publish(self, output_dir: Path) -> str | None:
        """Write the policy as one plain Hugging Face folder (LoRA merged in), atomically; returns its
        sha256 on every process. Across processes every one gathers the full policy (a collective) and
        the first alone writes; the others wait for it at a barrier."""
        adapter = PPOModels.POLICY if self.config.lora is not None else None
        self.models.activate_policy()
        if not self.group.distributed:

            def build(folder: Path) -> None:
                save_policy_folder(self.models.policy, self.models.tokenizer, folder, adapter=adapter)

            return atomic_publish(build, Path(output_dir))

        state = full_state_dict(self.models.actor, self.group)
        sha = None
        if self.group.is_main:
            prefix = "model."
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            weights = merged_causal_lm_state(state, self.config.lora, adapter)
            dtype = torch.float32 if self.config.lora is None else self.models.dtype
            plain = load_generation_copy(self.policy_path, torch.device("cpu"), dtype)
            BuiltinEngine(plain, self.models.tokenizer, torch.device("cpu"), False).load_weights(weights)

            def build(folder: Path) -> None:
                save_policy_folder(plain, self.models.tokenizer, folder)

            sha = atomic_publish(build, Path(output_dir))
        self.group.barrier()
        return self.group.broadcast_object(sha)


def train_ppo(
    policy_path: str | Path,
    reference_path: str | Path | None,
    reward_fn_or_model: RewardFn | str | Path,
    prompts: list[list[dict]],
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    config: PPOConfig,
    reporter: Reporter,
    ptx_conversations: list[list[dict]] | None = None,
) -> PPOResult:
    """Run PPO-max from the live policy and publish the new policy folder to `output_dir`.

    `reward_fn_or_model` is a published reward-model folder or `reward_fn(prompt_texts, response_texts,
    response_ids) -> scores`, where prompt_texts are the chat-templated prompts the policy saw.
    `ptx_conversations` are chats that end with a reference answer (an assistant turn), for the ptx
    loss; required when `config.ptx_coef` > 0.
    A rerun with the same `checkpoint_dir` resumes from its latest checkpoint. A tripped collapse guard
    returns a result with `rejected_reason` set and publishes nothing.

    Under torch.distributed (`current_group()` of several processes) every process calls this with the
    same arguments; the first reports and publishes, and every process returns the same result.
    """
    group = current_group()
    reporter = group.reporter(reporter)
    reward = reward_fn_or_model if callable(reward_fn_or_model) else Path(reward_fn_or_model)
    run = PPORun(
        Path(policy_path), reference_path, reward, prompts, config, reporter, ptx_conversations, group
    )
    checkpoint_dir = Path(checkpoint_dir)
    start = 0
    resumed = None
    last = latest_checkpoint(checkpoint_dir, group)
    if last is not None:
        extra = load_checkpoint(last, run.trainables, run.optimizer, run.scheduler, group)
        start = resumed = run.load_state(extra)

    metrics: dict[str, float] = {}
    step = start
    rejected = None
    try:
        for step in range(start, config.steps):
            if reporter.should_stop():
                raise RunCancelled(f"cancelled before step {step + 1}")
            started = time.perf_counter()
            exp = run.rollout(step)
            metrics = run.update(exp, step)
            seconds = time.perf_counter() - started
            metrics["step_seconds"] = seconds
            metrics["generation_seconds"] = exp.generation_seconds
            metrics["tokens_per_s"] = metrics["response_tokens"] / max(seconds, 1e-9)
            reporter.metrics(step + 1, metrics)
            reporter.progress(
                step + 1, config.steps, f"reward {metrics['reward_raw']:.3f} kl {metrics['kl_ref']:.2f}"
            )
            first_check = run.guards.baseline_length is None
            reason = run.guards.check(metrics)
            if reason is not None:
                raise CollapseDetected(reason)
            if first_check:  # the first rollout sets the baselines, and may turn guards off
                for notice in run.guards.off_notices():
                    log.warning(notice)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(
                    checkpoint_dir,
                    step + 1,
                    run.trainables,
                    run.optimizer,
                    run.scheduler,
                    run.state(step + 1),
                    group,
                )
        step = config.steps
    except CollapseDetected as exc:
        rejected = f"collapse guard at step {step + 1}: {exc}"

    if rejected is not None:
        return PPOResult(None, None, step + 1, rejected, metrics, resumed)
    sha = run.publish(Path(output_dir))
    return PPOResult(Path(output_dir), sha, config.steps, None, metrics, resumed)
