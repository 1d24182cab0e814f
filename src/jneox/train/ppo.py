"""PPO from a reward model, InstructGPT-style (the way rinna made the card's PPO step, with trlx).

Every ``ppo_epochs`` trainer steps start with a rollout: the policy answers the step's prompts with
jneox's own KV-cache sampling at the card's settings (temperature 0.7, up to 128 new tokens), the
reward model scores each answer at its last token (minus ``missing_eos_penalty`` when the answer
never reached ``</s>``), and each answer token gets the penalty ``-kl_coef * (log π - log π_ref)``
against the reference (the starting model: with LoRA the adapters switched off, else a frozen copy).
Advantages come from GAE (``gamma``, ``lam``) over a value head on the policy's last hidden state,
whitened. The rollout is then trained on for ``ppo_epochs`` optimizer steps (one step per epoch: the
whole rollout is the minibatch) with the clipped ratio objective plus a clipped value loss. The
rollout is part of the checkpoint, so a resumed run continues exactly. Logged under TRL's names
(``objective/kl``, ``objective/scores``, ``objective/rlhf_reward``, ``policy/approxkl_avg``,
``policy/clipfrac_avg``, ``val/num_eos_tokens``, ...).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..chat import format_prompt
from ..loading import load_reward_model
from ..sampling import SamplingParams, sample_next
from . import distributed
from .data import IGNORE_INDEX, DataStats
from .distributed import Dist
from .finetune import start_fine_tuning
from .lora import adapters_off
from .loop import Objective, TrainConfig
from .preference import read_prompts, token_logps
from .reward import scores_at


@dataclass
class PPOConfig:
    kl_coef: float = 0.05
    ppo_epochs: int = 4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float = 1.0
    temperature: float = SamplingParams.temperature
    max_new_tokens: int = SamplingParams.max_new_tokens

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1:
            raise ValueError(f"ppo epochs must be at least 1, got {self.ppo_epochs}")
        if self.temperature <= 0:
            raise ValueError("PPO samples its rollouts: the temperature must be positive")


class PolicyWithValue(nn.Module):
    """The policy (a :class:`~jneox.model.GPTNeoX`) and a scalar value head on its final hidden state."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy, self.config = policy, policy.config
        self.value_head = nn.Linear(policy.config.hidden_size, 1, device=policy.embed.weight.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache=None,
                values: bool = True) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """(logits, values); with ``values=False`` the policy's logits alone, and ``input_pos``/``cache``
        as :class:`~jneox.model.GPTNeoX` takes them (sampling). Under FSDP this module is the sharded
        root, so the rollout's decoding goes through here rather than calling the policy directly."""
        if not values:
            return self.policy(idx, input_pos=input_pos, cache=cache)
        h = self.policy(idx, head=False)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()


@torch.no_grad()
def sample_batch(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_id: int,
                 generator: torch.Generator | None = None, vocab_size: int | None = None, *,
                 forward: Callable | None = None, all_done: Callable[[bool], bool] | None = None) -> list[list[int]]:
    """Sampled answers (token ids, ``</s>`` included when reached) to a batch of prompts, decoded
    together with one KV cache: every row at its own position, as the server does.

    ``forward(ids, input_pos=, cache=)`` gives the logits (default: ``model`` itself). ``all_done(flag)``
    says whether every rank is done: under torchrun all ranks decode the same number of steps, since
    FSDP gathers each block's weights from all of them at every step."""
    forward = forward or model
    all_done = all_done or bool
    device = model.embed.weight.device
    B, lens = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    width = int(lens.max())
    total = min(width + params.max_new_tokens, model.config.max_position_embeddings)
    if width >= total:
        raise ValueError(f"a prompt of {width} tokens leaves no room to answer in the {total}-token window")
    ids = torch.full((B, width), eos_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.as_tensor(list(p), device=device)
    cache = model.new_cache(B, total)
    # right-padded prefill from position 0; each row's padding is overwritten by its own answer
    logits = forward(ids, input_pos=torch.arange(width, device=device), cache=cache)
    last = logits[torch.arange(B, device=device), lens - 1]
    pos, out = lens.clone(), [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(params.max_new_tokens):
        token = sample_next(last[:, :vocab_size], params, generator)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
        done |= (token == eos_id) | (pos + 1 >= total)
        if all_done(bool(done.all())):
            break
        step_pos = torch.where(done, pos - 1, pos)  # finished rows rewrite their own last slot, harmlessly
        last = forward(token[:, None], input_pos=step_pos[:, None], cache=cache)[:, -1]
        pos = torch.where(done, pos, pos + 1)
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over (B, R) answer tokens (``mask`` marks real ones)."""
    rewards, values = rewards * mask, values * mask
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def collate_prompts(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(right-padded prompt ids, lengths): a PPO step's prompts."""
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = torch.as_tensor(list(p))
    return ids, lens


class PPOObjective(Objective):
    """See the module docstring. ``model`` is the :class:`PolicyWithValue` being trained; ``reward_model``
    a reward model (``jneox.checkpoint.load_reward_model``) or a function ``(prompt ids, answer ids) ->
    score`` (a rule, e.g. a toy reward in a test); ``reference`` the frozen starting policy, or None
    with LoRA (the adapters are switched off instead); ``dist`` the torchrun ranks (each samples its own
    prompts with its own seed; the logged rollout figures cover all ranks)."""

    per_token = False

    def __init__(self, model: PolicyWithValue, reward_model: nn.Module | Callable, reference: nn.Module | None,
                 cfg: PPOConfig, eos_id: int, pad_id: int, vocab_size: int, seed: int = 0, dist: Dist = Dist()):
        self.model, self.reward_model, self.reference, self.cfg = model, reward_model, reference, cfg
        self.eos_id, self.pad_id, self.vocab_size, self.seed, self.dist = eos_id, pad_id, vocab_size, seed, dist
        self.params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
        self.rollout: list[tuple] = []
        self.metrics: dict = {}

    # ---- rollouts ---------------------------------------------------------------------------
    def prepare(self, step: int, batches: list, model: nn.Module) -> list:
        if step % self.cfg.ppo_epochs == 0 or not self.rollout:
            gen = torch.Generator(device=batches[0][0].device).manual_seed(
                (self.seed * 1_000_003 + step) * 1009 + self.dist.rank)
            parts = [self._rollout(ids, lens, gen) for ids, lens in batches]
            self.rollout = [p[0] for p in parts]
            self._set_metrics([p[1] for p in parts])
        return self.rollout

    @torch.no_grad()
    def _rollout(self, prompt_ids: torch.Tensor, lens: torch.Tensor, gen: torch.Generator) -> tuple[tuple, dict]:
        cfg, policy, device = self.cfg, self.model.policy, prompt_ids.device
        was_training = self.model.training
        self.model.eval()
        prompts = [prompt_ids[b, :int(lens[b])].tolist() for b in range(len(lens))]
        answers = sample_batch(policy, prompts, self.params, self.eos_id, gen, self.vocab_size,
                               forward=lambda *a, **k: self.model(*a, values=False, **k),
                               all_done=lambda flag: distributed.all_ranks(flag, self.dist, device))
        ended = torch.tensor([bool(a) and a[-1] == self.eos_id for a in answers], device=device)
        B, R = len(prompts), max(len(a) for a in answers)
        width = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1  # the last token is only a target
        ids = torch.full((B, width), self.pad_id, dtype=torch.long, device=device)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long, device=device)
        index = torch.zeros(B, R, dtype=torch.long, device=device)  # input position whose label is answer token r
        mask = torch.zeros(B, R, device=device)
        for b, (p, a) in enumerate(zip(prompts, answers)):
            seq = p + a
            ids[b, :len(seq) - 1] = torch.tensor(seq[:-1], device=device)
            labels[b, len(p) - 1:len(seq) - 1] = torch.tensor(a, device=device)
            index[b, :len(a)] = torch.arange(len(p) - 1, len(seq) - 1, device=device)
            mask[b, :len(a)] = 1
        logits, values = self.model(ids)
        old_logps = token_logps(logits, labels, cfg.temperature).gather(1, index) * mask
        values = values.gather(1, index) * mask
        if self.reference is None:
            with adapters_off(policy):
                ref_logits = self.model(ids, values=False)
        else:
            ref_logits = self.reference(ids)
        ref_logps = token_logps(ref_logits, labels, cfg.temperature).gather(1, index) * mask
        # the reward model reads the input whose next token is the answer's last (</s> when reached), as it
        # was trained; an answer cut at max_new_tokens is read one token early and pays the no-</s> penalty
        if isinstance(self.reward_model, nn.Module):
            scores = scores_at(self.reward_model(ids), labels)
        else:
            scores = torch.tensor([float(self.reward_model(p, a)) for p, a in zip(prompts, answers)], device=device)
        scores = scores - cfg.missing_eos_penalty * (~ended).float()
        kl = (old_logps - ref_logps) * mask
        rewards = -cfg.kl_coef * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(B, device=device), last] += scores
        advantages = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        returns = (advantages + values) * mask
        advantages = whiten(advantages, mask)
        self.model.train(was_training)
        metrics = {"objective/kl": kl.sum(1), "objective/scores": scores,
                   "objective/non_score_reward": rewards.sum(1) - scores,
                   "objective/rlhf_reward": scores - cfg.kl_coef * kl.sum(1),
                   "val/num_eos_tokens": ended.float(), "val/answer_length": mask.sum(1)}
        return (ids, labels, index, mask, old_logps, values, advantages, returns), metrics

    def _set_metrics(self, parts: list[dict]) -> None:
        """Each figure's mean over the rollout's answers on all ranks (``val/num_eos_tokens``: the count)."""
        names = list(parts[0])
        values = [torch.cat([p[name] for p in parts]) for name in names]
        sums = distributed.all_reduce_sum([float(v.sum()) for v in values] + [float(len(values[0]))],
                                          self.dist, values[0].device)
        self.metrics = {name: total if name == "val/num_eos_tokens" else total / sums[-1]
                        for name, total in zip(names, sums)}

    def step_metrics(self) -> dict:
        return dict(self.metrics)

    # ---- the loss -------------------------------------------------------------------------
    def count(self, batch) -> float:
        return float(batch[3].sum())

    def loss(self, call, batch):
        ids, labels, index, mask, old_logps, old_values, adv, returns = batch
        cfg = self.cfg
        logits, values = call(ids)
        logps = token_logps(logits, labels, cfg.temperature).gather(1, index)
        values = values.gather(1, index)
        v_clipped = old_values + (values - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        vf_loss = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
        log_ratio = (logps - old_logps) * mask
        ratio = log_ratio.exp()
        pg_losses = -adv * ratio
        pg_losses2 = -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
        pg_loss = torch.max(pg_losses, pg_losses2)
        loss = ((pg_loss + cfg.vf_coef * vf_loss) * mask).sum()
        metrics = {"policy/approxkl_avg": 0.5 * log_ratio ** 2, "policy/clipfrac_avg": (pg_losses2 > pg_losses).float(),
                   "loss/policy_avg": pg_loss, "loss/value_avg": vf_loss,
                   "val/clipfrac_avg": ((values - returns) ** 2 < (v_clipped - returns) ** 2).float()}
        return loss, {k: (v.detach() * mask).sum() for k, v in metrics.items()}

    def drop_rows(self, batch, keep):
        raise NotImplementedError("PPO has no held-out loss")

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self, model_state: dict) -> dict:
        """The value head (from the full state dict) and every rank's rollout, in rank order."""
        rollouts = distributed.gather_objects([[t.cpu() for t in part] for part in self.rollout], self.dist)
        return {"value_head": {k.removeprefix("value_head."): v for k, v in model_state.items()
                               if k.startswith("value_head.")},
                "rollouts": rollouts, "metrics": dict(self.metrics)}

    def load_state_dict(self, state: dict) -> None:
        """A rank takes its own rollout back; resumed with another number of ranks, the next step samples
        a new one."""
        if not state:
            return
        self.model.value_head.load_state_dict(state["value_head"])
        device = self.model.value_head.weight.device
        rollouts = state.get("rollouts", [state["rollout"]] if "rollout" in state else [])  # "rollout": before torchrun
        mine = rollouts[self.dist.rank] if len(rollouts) == self.dist.world_size else []
        self.rollout = [tuple(t.to(device) for t in part) for part in mine]
        self.metrics = dict(state["metrics"])

    def write_model(self, state, config, folder, tokenizer_file, dtype) -> None:
        policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        super().write_model(policy, config, folder, tokenizer_file, dtype)

    def read_model(self, folder) -> dict:
        policy = {f"policy.{k}": v for k, v in super().read_model(folder).items()}
        return {**policy, **{f"value_head.{k}": v for k, v in self.model.value_head.state_dict().items()}}


def ppo(model: str | os.PathLike, reward_model: str | os.PathLike | Callable, data: list[str], cfg: TrainConfig,
        ppo_cfg: PPOConfig = PPOConfig(), *, max_len: int = 1024, epochs: float = 1.0, max_steps: int | None = None,
        lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False) -> dict:
    """PPO of the checkpoint ``model`` against the reward model ``reward_model`` on the prompts of
    ``data`` (preference pairs, ``{"prompt"}`` lines or conversations); writes ``cfg.out`` as a plain
    causal-LM checkpoint. Without ``max_steps``, ``epochs`` passes over the prompts, counting each
    rollout's prompts once."""

    def examples(tokenizer, max_len, trainer):
        prompts = [tokenizer.encode(format_prompt(p)) for p in read_prompts(data, skip_bad_lines, DataStats())]
        budget = max_len - ppo_cfg.max_new_tokens
        long = sum(len(p) > budget for p in prompts)
        prompts = [p[-budget:] for p in prompts]  # keep the end of over-long prompts (the question being answered)
        if long:
            trainer.print(f"ppo: cut {long} prompts longer than {budget} tokens to their last {budget}")
        return prompts, []

    run = start_fine_tuning("ppo", model, cfg, max_len, examples, epochs, max_steps,
                            items_per_pass=lambda prompts: len(prompts) * ppo_cfg.ppo_epochs)
    trainer, tokenizer, net, prompts = run.trainer, run.tokenizer, run.net, run.train
    reference = None if lora_rank else copy.deepcopy(net).requires_grad_(False).eval().to(trainer.device)
    run.add_lora(lora_rank, lora_alpha, reread_base=False)
    policy = PolicyWithValue(net)  # after LoRA: the value head trains in full
    if callable(reward_model):
        rm = reward_model
    else:
        rm = load_reward_model(reward_model).requires_grad_(False).eval().to(trainer.device)
    if cfg.fsdp and trainer.dist.enabled:  # the frozen models too: each rank holds its shard only
        if reference is not None:
            reference = distributed.shard(reference)
        if isinstance(rm, nn.Module):
            rm = distributed.shard(rm)
    objective = PPOObjective(policy, rm, reference, ppo_cfg, tokenizer.eos_id, run.pad_id, tokenizer.vocab_size,
                             seed=cfg.seed, dist=trainer.dist)
    return trainer.fit(policy, prompts, [], collate_prompts, tokenizer_file=tokenizer.path, objective=objective)
