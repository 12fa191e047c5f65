"""The PPO update of one step: epochs over shuffled minibatches of an `Experience`, one optimizer step
per backward batch (`backward_batch_size` rows in micro-batches of `mini_batch_size` rows, or of at most
`max_tokens_per_microbatch` tokens), on one rank or many.

With one optimizer step the experience may come without old log-probs (`Experience.old_logp` None), fresh or
stale samples alike: the update's own forward, detached, is pi_old (the ratio is exactly 1), and the update
returns it for the metrics.

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
from rlhf_engine.trainer.ppo.experience import Experience, ForwardOut, PassLayout, forward_policy, forward_values
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
    policy_logp: torch.Tensor | None = None
    """[B, T] the update's own detached log-probs (and `entropy`), when the experience had no old log-probs."""
    entropy: torch.Tensor | None = None


def ppo_update(
    model: nn.Module,
    critic: AutoModelForCausalLMWithValueHead | None,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    config: PPOConfig,
    shuffle: torch.Generator,
    comm: Comm,
    lengths: list[int],
    layout: PassLayout = PassLayout(),
) -> UpdateResult:
    """`ppo_epochs` passes over `exp` in an order drawn from `shuffle` (equal on every rank); see the module
    docstring. lengths: the real tokens of each sample (for the token budget)."""
    result = UpdateResult()
    if exp.old_logp is None:
        if not config.one_optimizer_step or comm.distributed:
            raise ValueError("an experience without old log-probs needs one optimizer step on one rank, got "
                             f"ppo_epochs={config.ppo_epochs}, backward_batch_size={config.backward_batch_size}, "
                             f"batch_size={config.batch_size}, world_size={comm.world_size}")
        result.policy_logp = torch.zeros_like(exp.batch.response_mask)
        result.entropy = torch.zeros_like(exp.batch.response_mask)
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
            token_count = exp.batch.response_mask[step_rows].sum().clamp(min=1)
            sums: dict[str, torch.Tensor] = {}
            if layout.attention_width:  # same step, micro-batches in which a group's samples share its query
                step_rows = torch.tensor(exp.batch.by_query(step_rows.tolist()))
            for rows in _step_microbatches(step_rows, lengths, config, comm, mine):
                loss, mb_stats, out = minibatch_loss(model, critic, exp, rows, config, token_count, layout)
                (loss * comm.world_size).backward()  # gradients are averaged over ranks: scale back to a sum
                if result.policy_logp is not None:
                    width = out.logp.shape[1]
                    result.policy_logp[rows, :width] = out.logp.detach()
                    result.entropy[rows, :width] = out.entropy.detach()
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


def old_logp_from_update(config: PPOConfig, reward_kl_coef: float, comm: Comm) -> bool:
    """Whether pi_old can be the update's own forward (detached) instead of a separate policy pass.

    pi_old is the trainer's policy at experience time. When the update is one optimizer step (`ppo_epochs == 1`
    and `backward_batch_size == batch_size`), the update's forward runs with exactly those weights, so it gives
    the same log-probs as a separate pass would, for fresh and stale samples alike (a stale sample's distance
    to its sampler is corrected by the importance weights pi_old / pi_behaviour, computed from that forward
    too). The pass stays when something needs pi_old first: a later optimizer step (the weights moved by
    then), KL-shaped rewards (`reward_kl_coef > 0`, or the `full` KL from logits), or several ranks (each would
    only see its own rows of the update)."""
    return config.one_optimizer_step and reward_kl_coef == 0 and config.kl_penalty != "full" and not comm.distributed


def off_policy_weights(config: PPOConfig, old_logp: torch.Tensor | None, behaviour_logp: torch.Tensor | None,
                       mask: torch.Tensor) -> torch.Tensor | None:
    """The truncated importance weights min(pi_old / pi_behaviour, tis_cap) [B, T], 0 on padding, when the step
    has the sampler's log-probs and `off_policy_correction` is `tis`; else None."""
    if old_logp is None or behaviour_logp is None or config.off_policy_correction != "tis":
        return None
    return losses.truncated_importance_weights(old_logp, behaviour_logp, config.tis_cap) * mask


def adopt_update_logp(exp: Experience, update: UpdateResult, config: PPOConfig) -> None:
    """Fill the experience's pi_old metrics (log-probs, entropy, KL, importance weights) from the update's own
    forward, for an experience that had no separate policy pass."""
    mask = exp.batch.response_mask
    exp.old_logp, exp.entropy = update.policy_logp, update.entropy
    exp.kl = kl_penalty(config.kl_penalty, exp.old_logp, exp.ref_logp, mask, None, None, config.temperature)
    exp.is_weights = off_policy_weights(config, exp.old_logp, exp.behaviour_logp, mask)


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
    rows: torch.Tensor,
    config: PPOConfig,
    token_count: torch.Tensor | float | None = None,
    layout: PassLayout = PassLayout(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor], ForwardOut]:
    """Total loss of the experience's `rows` (policy loss + vf_coef * value loss - entropy_coef * entropy, plus
    beta * KL to the reference when `kl_in_reward` is False),
    with its detached metrics and the policy pass; with `token_count`, each is these rows' share
    sum / token_count of a mean over a larger minibatch (see `losses`). Values come from `critic` when
    given, else from `model`'s value head. Without old log-probs in `exp`, pi_old is this pass, detached."""
    mb = exp.batch.select(rows)
    width = mb.response_width
    mask = mb.response_mask
    shared_critic = config.uses_critic and critic is None
    own_old_logp = exp.old_logp is None
    out = forward_policy(model, mb, config.temperature, with_values=shared_critic,
                         with_entropy=config.entropy_coef > 0 or own_old_logp, packed=layout.policy,
                         attention_width=layout.attention_width, from_hidden=layout.from_hidden)
    mb_old_logp = out.logp.detach() if own_old_logp else exp.old_logp[rows, :width]
    if own_old_logp:  # the weights against the sampler from this forward, as pi_old
        behaviour = exp.behaviour_logp[rows, :width] if exp.behaviour_logp is not None else None
        mb_is_weights = off_policy_weights(config, mb_old_logp, behaviour, mask)
    else:
        mb_is_weights = exp.is_weights[rows, :width] if exp.is_weights is not None else None
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
        values = out.values if shared_critic else forward_values(critic, mb, layout.critic, layout.attention_width)
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
    return loss, stats, out
