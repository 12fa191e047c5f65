"""The PPO update of one step: epochs over shuffled minibatches of an `Experience`, one optimizer step
per backward batch (`backward_batch_size` rows in micro-batches of `mini_batch_size` rows, or of at most
`max_tokens_per_microbatch` tokens), on one rank or many.

pi_old's log-probs come from `old_policy.PiOld`, minibatch by minibatch (from the experience's policy pass,
or, with one optimizer step, from this update's own forward, detached: the ratio is then exactly 1).

Each optimizer step's loss is the mean over the global token count N of its minibatch: every micro-batch
on every rank adds sum(token losses) / N, so the update does not depend on how the minibatch is cut into
micro-batches or ranks (each rank takes an equal slice of every micro-batch). One all-reduce per optimizer
step gives every rank the minibatch's metrics, and with them the same non-finite and early-stop decisions;
the global gradient norm is the one device sync that checks the gradients (a NaN loss gives NaN
gradients), and the update stops without that optimizer step when it is not finite; the optimizer steps
already taken in this update are then undone (from a copy of the parameters and optimizer state made at the
start, only when the update has more than one optimizer step), so a skipped step leaves the weights exactly
as they were.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_engine.distributed import Comm, clip_grad_norm, reduce_gradients
from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer import losses
from rlhf_engine.trainer.passes.microbatch import rank_microbatches
from rlhf_engine.trainer.ppo.config import PPOConfig
from rlhf_engine.trainer.ppo.experience import Experience, PassLayout, forward_policy, forward_values
from rlhf_engine.trainer.ppo.old_policy import PiOld
from rlhf_engine.trainer.ppo.shaping import kl_penalty


@dataclass
class UpdateResult:
    """What the PPO epochs did."""

    stats: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    """Per-optimizer-step metrics (0-dim, detached; token means over the step's whole minibatch, equal on
    every rank) of the optimizer steps taken, and `ppo/grad_norm` per step."""
    optimizer_steps: int = 0
    early_stopped: bool = False
    """`target_kl` was exceeded: the epochs stopped after that optimizer step (a normal outcome)."""
    non_finite: bool = False
    """A loss or gradient was not finite: the update stopped, every optimizer step of it undone
    (`optimizer_steps` is then 0 and `stats` empty)."""


def ppo_update(
    model: nn.Module,
    critic: AutoModelForCausalLMWithValueHead | None,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    pi_old: PiOld,
    config: PPOConfig,
    shuffle: torch.Generator,
    comm: Comm,
    lengths: list[int],
    layout: PassLayout = PassLayout(),
) -> UpdateResult:
    """`ppo_epochs` passes over `exp` in an order drawn from `shuffle` (equal on every rank), pi_old from
    `pi_old`; see the module docstring. lengths: the real tokens of each sample (for the token budget)."""
    result = UpdateResult()
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    # the optimizer's own parameters: FSDP2 swaps a module's registered parameters between the sharded ones
    # (which the optimizer holds) and unsharded ones around forward and backward
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local_rows = config.mini_batch_size // comm.world_size
    mine = slice(comm.rank * local_rows, (comm.rank + 1) * local_rows)  # this rank's slice of a micro-batch
    steps_planned = config.ppo_epochs * (config.batch_size // config.backward_batch_size)
    saved = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())) if steps_planned > 1 else None
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(config.batch_size, generator=shuffle)
        for b_start in range(0, config.batch_size, config.backward_batch_size):
            optimizer.zero_grad(set_to_none=True)
            step_rows = order[b_start : b_start + config.backward_batch_size]
            # N, over all ranks' rows of this step; at least 1: a minibatch of dropped samples adds no gradient
            token_count = exp.batch.loss_mask[step_rows].sum().clamp(min=1)
            sums: dict[str, torch.Tensor] = {}
            if layout.attention_width:  # same step, micro-batches in which a group's samples share its prompt
                step_rows = torch.tensor(exp.batch.by_prompt(step_rows.tolist()))
            for rows in _step_microbatches(step_rows, lengths, config, comm, mine):
                loss, mb_stats = minibatch_loss(model, critic, exp, pi_old, rows, config, token_count, layout)
                (loss * comm.world_size).backward()  # gradients are averaged over ranks: scale back to a sum
                for key, value in mb_stats.items():
                    sums[key] = sums[key] + value if key in sums else value
            reduce_gradients(comm, params)  # replicated parameters; FSDP2 reduced in backward
            keys = sorted(sums)
            totals = comm.all_reduce_sum(torch.stack([sums[k] for k in keys]))  # [K], the step's token means
            grad_norm = clip_grad_norm(comm, params, max_norm)
            if not bool(torch.isfinite(grad_norm)):  # device sync, the one of this optimizer step
                result.non_finite = True
                break
            result.stats["ppo/grad_norm"].append(grad_norm.detach())
            for key, value in zip(keys, totals.unbind()):
                result.stats[key].append(value)
            optimizer.step()
            result.optimizer_steps += 1
            step_approxkl = totals[keys.index("ppo/policy/approxkl")]
            if config.target_kl is not None and float(step_approxkl) > config.target_kl:  # device sync
                result.early_stopped = True
                break
        if result.non_finite or result.early_stopped:
            break
    optimizer.zero_grad(set_to_none=True)
    if result.non_finite and result.optimizer_steps:  # undo the steps taken: nothing of this update stays
        with torch.no_grad():
            for p, old in zip(params, saved[0]):
                p.copy_(old)
        optimizer.load_state_dict(saved[1])
        result = UpdateResult(non_finite=True)
    return result


def _step_microbatches(step_rows: torch.Tensor, lengths: list[int], config: PPOConfig, comm: Comm,
                       mine: slice) -> list[torch.Tensor]:
    """This rank's micro-batches of an optimizer step's rows: its slice of every `mini_batch_size` slice, or,
    with a token budget, its share of the step planned by `rank_microbatches`."""
    if not config.max_tokens_per_microbatch:
        return [step_rows[m : m + config.mini_batch_size][mine]
                for m in range(0, config.backward_batch_size, config.mini_batch_size)]
    my_rows = step_rows[comm.shard(len(step_rows))].tolist()
    plan = rank_microbatches(my_rows, lengths, config.max_tokens_per_microbatch, 0, comm)
    return [torch.tensor(rows) for rows in plan]


def minibatch_loss(
    model: nn.Module,
    critic: AutoModelForCausalLMWithValueHead | None,
    exp: Experience,
    pi_old: PiOld,
    rows: torch.Tensor,
    config: PPOConfig,
    token_count: torch.Tensor | float | None = None,
    layout: PassLayout = PassLayout(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of the experience's `rows` (policy loss + vf_coef * value loss - entropy_coef * entropy, plus
    beta * KL to the reference when `kl_in_reward` is False),
    with its detached metrics; with `token_count`, each is these rows' share sum / token_count of a mean over
    a larger minibatch (see `losses`), over the tokens of `batch.loss_mask`. Values come from `critic` when
    given, else from `model`'s value head; pi_old's log-probs and importance weights from `pi_old`."""
    mb = exp.batch.select(rows)
    width = mb.response_width
    mask = mb.loss_mask
    shared_critic = config.uses_critic and critic is None
    out = forward_policy(model, mb, config.temperature, with_values=shared_critic,
                         with_entropy=config.entropy_coef > 0 or pi_old.needs_entropy, packed=layout.policy,
                         attention_width=layout.attention_width, from_hidden=layout.from_hidden,
                         compute_dtype=layout.compute_dtype)
    mb_old_logp, mb_is_weights = pi_old.minibatch(rows, mask, out.logp, out.entropy)
    pg_loss, pg_stats = losses.ppo_policy_loss(
        out.logp, mb_old_logp, exp.advantages[rows, :width], mask, config.cliprange, mb_is_weights, token_count,
    )
    loss = pg_loss
    stats = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/policy/clipfrac": pg_stats["clipfrac"],
        "ppo/policy/approxkl": pg_stats["approxkl"],
        "ppo/policy/approxkl_k3": pg_stats["approxkl_k3"],
        "ppo/policy/ratio": pg_stats["ratio"],
    }
    if config.uses_critic:
        values = out.values if shared_critic else forward_values(critic, mb, layout.critic, layout.attention_width,
                                                                         layout.compute_dtype)
        vf_loss, vf_stats = losses.value_loss(
            values, exp.values[rows, :width], exp.returns[rows, :width], mask, config.cliprange_value,
            token_count,
        )
        loss = loss + config.vf_coef * vf_loss
        stats.update({
            "ppo/loss/value": vf_loss.detach(),
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/val/error": vf_stats["error"],
        })
    if not config.kl_in_reward and exp.kl_coef > 0:  # beta * KL(pi || ref) as a loss term (GRPO's)
        kl = kl_penalty(config.kl_penalty, out.logp, exp.ref_logp[rows, :width], mask)
        kl_loss = losses.token_mean(kl, mask, token_count)
        loss = loss + exp.kl_coef * kl_loss
        stats["ppo/loss/kl"] = kl_loss.detach()
    if config.entropy_coef > 0:
        entropy = losses.entropy_bonus(out.entropy, mask, token_count)
        loss = loss - config.entropy_coef * entropy
        stats["ppo/policy/entropy"] = entropy.detach()
    stats["ppo/loss/total"] = loss.detach()
    return loss, stats
