"""Which forward passes of a PPO trainer run how, decided once per trainer from its configuration and what
each model supports (probed by behaviour): padded or packed (`packing`), queries shared among their samples
(`prompt_sharing`), log-probs from the hidden states (`models.lm_head`)."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from rlhf_engine.models.lm_head import check_plain_lm_head
from rlhf_engine.trainer.passes.packing import isolates
from rlhf_engine.trainer.passes.prompt_sharing import attention_width, shares_prompts


@dataclass(frozen=True)
class PassLayout:
    """How the forward passes run, decided once per trainer: which run packed (True) or padded (False), and
    whether the causal LMs' log-probs come from their hidden states (`PPOConfig.logprobs_from_hidden`)."""

    policy: bool = False
    ref: bool = False
    critic: bool = False
    reward: bool = False
    attention_width: int = 0
    """> 0: the packed passes share each query among its samples where that is cheaper, by this width (the
    policy's `prompt_sharing.attention_width`); 0: one query per sample."""
    from_hidden: bool = False
    compute_dtype: torch.dtype | None = None
    """The dtype the passes compute in under `torch.autocast` (`PPOConfig.bf16`); None: the models' own."""


class PackingSupport:
    """Whether a model honours packed `position_ids` (checked once per model, by behaviour), with a one-time
    warning per model class that falls back to padding. Owned by one trainer: no process-level state."""

    def __init__(self) -> None:
        self._checked: dict[int, bool] = {}
        self._warned: set[str] = set()

    def __call__(self, model: nn.Module) -> bool:
        key = id(model)
        if key not in self._checked:
            ok = _accepts_position_ids(model) and _packing_isolates(model)
            self._checked[key] = ok
            name = type(model).__name__
            if not ok and name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"{name} does not support packed sequences (position_ids that restart per "
                              "sequence without an attention mask); its forward passes fall back to padding",
                              RuntimeWarning, stacklevel=3)
        return self._checked[key]


def _accepts_position_ids(model: nn.Module) -> bool:
    if hasattr(model, "get_base_model"):  # a peft model passes position_ids on to its base model
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params


def _packing_isolates(model: nn.Module) -> bool:
    """Probe: the output at token c of the packed row [a b | c] (positions restarting) equals that of [c] alone
    (no special (pad) token: classifiers pool at the last non-pad)."""
    return isolates(model, [4, 5, 6], [0, 1, 0], alone=[2])


def pass_layout(packing: bool, policy: nn.Module, ref_model: nn.Module, critic: nn.Module | None,
                 reward_model: nn.Module | None, from_hidden: bool = False, share_prompts: bool = False,
                 compute_dtype: torch.dtype | None = None) -> PassLayout:
    """Which passes run packed: all when `packing` and each model supports it (`PackingSupport`); with
    `share_prompts`, the packed passes share queries when every packed model takes the 4D mask it needs
    (`prompt_sharing.shares_prompts`; else a warning naming the model class that does not).
    policy, ref_model: causal LMs; critic: an `AutoModelForCausalLMWithValueHead`; reward_model: a
    sequence classifier (packed only with a `score` head, see `packed_scores`). `from_hidden`: log-probs from
    hidden states; ValueError naming `ppo.logprobs_from_hidden` when a causal LM post-processes its logits.
    `compute_dtype`: the autocast dtype of every pass (None: none)."""
    if from_hidden:
        for model in (policy, ref_model):
            check_plain_lm_head(model, "ppo.logprobs_from_hidden")
    if not packing:
        return PassLayout(from_hidden=from_hidden, compute_dtype=compute_dtype)
    supports = PackingSupport()
    layout = PassLayout(
        policy=supports(policy),
        ref=supports(ref_model),
        critic=critic is not None and supports(critic.pretrained_model),
        reward=reward_model is not None and hasattr(reward_model, "score") and supports(reward_model),
        from_hidden=from_hidden,
        compute_dtype=compute_dtype,
    )
    if not share_prompts:
        return layout
    packed = [m for m, on in ((policy, layout.policy), (ref_model, layout.ref),
                              (critic.pretrained_model if critic is not None else None, layout.critic),
                              (reward_model, layout.reward)) if on]
    refused = next((m for m in packed if not shares_prompts(m)), None)
    if refused is not None:
        warnings.warn(f"{type(refused).__name__} does not take a custom 4D attention mask (e.g. not sdpa "
                      "attention); the packed passes keep one query per sample (ppo.share_prompts)",
                      RuntimeWarning, stacklevel=2)
    return replace(layout, attention_width=attention_width(policy) if refused is None and packed else 0)
