"""The PPO update of one step: epochs over shuffled minibatches of an `Experience`, one optimizer step
per backward batch (`backward_batch_size` rows in micro-batches of `mini_batch_size`).

One device sync per optimizer step checks the gradient norm: a non-finite loss or gradient makes
it non-finite (a NaN loss gives NaN gradients), and the update stops without that optimizer step;
the optimizer steps already taken in this update are undone (from a copy of the parameters and
optimizer state made at the start, only when the update has more than one optimizer step), so a
skipped step leaves the weights exactly as they were.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_engine.models.value_head import AutoModelForCausalLMWithValueHead
from rlhf_engine.trainer import losses
from rlhf_engine.trainer.experience import Experience, forward_policy, forward_values
from rlhf_engine.trainer.ppo_config import PPOConfig


@dataclass
class UpdateResult:
    """What the PPO epochs did."""

    stats: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    """Per-micro-batch metrics (0-dim, detached) of the optimizer steps taken, and `ppo/grad_norm` per step."""
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
    params: list[nn.Parameter],
    exp: Experience,
    config: PPOConfig,
    shuffle: torch.Generator,
) -> UpdateResult:
    """`ppo_epochs` passes over `exp` in an order drawn from `shuffle`; see the module docstring."""
    result = UpdateResult()
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    steps_planned = config.ppo_epochs * (config.batch_size // config.backward_batch_size)
    saved = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())) if steps_planned > 1 else None
    for _epoch in range(config.ppo_epochs):
        order = torch.randperm(config.batch_size, generator=shuffle)
        for b_start in range(0, config.batch_size, config.backward_batch_size):
            optimizer.zero_grad(set_to_none=True)
            step_stats: dict[str, list[torch.Tensor]] = defaultdict(list)
            for m_start in range(b_start, b_start + config.backward_batch_size, config.mini_batch_size):
                rows = order[m_start : m_start + config.mini_batch_size]
                loss, mb_stats = minibatch_loss(model, critic, exp, rows, config)
                (loss / config.gradient_accumulation_steps).backward()
                for key, value in mb_stats.items():
                    step_stats[key].append(value)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            if not bool(torch.isfinite(grad_norm)):  # device sync, the one of this optimizer step
                result.non_finite = True
                break
            step_stats["ppo/grad_norm"].append(grad_norm.detach())
            optimizer.step()
            result.optimizer_steps += 1
            for key, values in step_stats.items():
                result.stats[key] += values
            mean_approxkl = torch.stack(step_stats["ppo/policy/approxkl"]).mean()
            if config.target_kl is not None and float(mean_approxkl) > config.target_kl:  # device sync
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


def minibatch_loss(
    model: nn.Module,
    critic: AutoModelForCausalLMWithValueHead | None,
    exp: Experience,
    rows: torch.Tensor,
    config: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of the experience's `rows` (policy loss + vf_coef * value loss - entropy_coef * entropy),
    with its detached metrics. Values come from `critic` when given, else from `model`'s value head."""
    mb = exp.batch.select(rows)
    width = mb.response_width
    mask = mb.response_mask
    shared_critic = config.uses_critic and critic is None
    out = forward_policy(
        model, mb, config.temperature, with_values=shared_critic, with_entropy=config.entropy_coef > 0
    )
    mb_is_weights = exp.is_weights[rows, :width] if exp.is_weights is not None else None
    pg_loss, pg_stats = losses.ppo_policy_loss(
        out.logp, exp.old_logp[rows, :width], exp.advantages[rows, :width], mask, config.cliprange, mb_is_weights
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
        values = out.values if shared_critic else forward_values(critic, mb)
        vf_loss, vf_stats = losses.value_loss(
            values, exp.values[rows, :width], exp.returns[rows, :width], mask, config.cliprange_value
        )
        loss = loss + config.vf_coef * vf_loss
        stats.update({
            "ppo/loss/value": vf_loss.detach(),
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/val/error": vf_stats["error"],
        })
    if config.entropy_coef > 0:
        entropy = losses.entropy_bonus(out.entropy, mask)
        loss = loss - config.entropy_coef * entropy
        stats["ppo/policy/entropy"] = entropy.detach()
    stats["ppo/loss/total"] = loss.detach()
    return loss, stats
