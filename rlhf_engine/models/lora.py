"""LoRA adapters on a frozen base (with `peft`, the optional extra `[lora]`).

    model.lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}

`apply_lora` wraps a transformers model in a `peft.PeftModel` whose base weights are frozen; only the
adapters (and, for a sequence classifier, its score head) train. The frozen base is the reference policy:
`adapters_disabled(model)` runs it without a second copy of the weights. Names follow peft:
`adapter_state_dict` is what `adapter_model.safetensors` holds, `merged_state_dict` the base model's own
HF names with W + scale * B @ A folded in (what a backend without adapters loads).
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    import peft

LORA_EXTRA = "pip install 'rlhf-engine[lora]'"


@dataclass
class LoraConfig:
    """LoRA adapters of a model (YAML `model.lora`, or `lora` in a stage config)."""

    r: int = 16
    """Adapter rank: each adapted weight W [out, in] gets B [out, r] @ A [r, in]."""
    alpha: float = 32.0
    """Scale of the update: W + (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (0: none; PPO runs its models in eval mode)."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Linear layers that get adapters, peft semantics: module names (a name matches every module whose
    dotted path ends in it) or `all-linear` (every linear layer but the output head)."""
    sync: Literal["adapters", "merged"] = "adapters"
    """What the trainer sends to the generators each version: the adapter tensors only, or the merged full
    weights (for a backend that cannot take adapters)."""
    critic: bool = False
    """A separate critic (`model.value_model`) also trains LoRA adapters (its value head trains fully)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"model.lora.r ({self.r!r}) must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha ({self.alpha}) must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout ({self.dropout}) must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                raise ValueError(f"model.lora.target_modules ({self.target_modules!r}) must be a list of module "
                                 "names or 'all-linear'")
        elif not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"model.lora.target_modules ({self.target_modules!r}) must be a non-empty list of "
                             "module names or 'all-linear'")
        if self.sync not in ("adapters", "merged"):
            raise ValueError(f"model.lora.sync ({self.sync!r}) must be 'adapters' or 'merged'")


def _peft():
    """The `peft` module, or a one-line ImportError naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA needs the peft package: {LORA_EXTRA}") from None
    return peft


def peft_config(config: LoraConfig, task_type: str = "CAUSAL_LM", base_model_path: str | None = None):
    """The `peft.LoraConfig` of `config` (`task_type` CAUSAL_LM or SEQ_CLS)."""
    peft = _peft()
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                           task_type=task_type, base_model_name_or_path=base_model_path)


def is_lora(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (False, without importing peft, when it is not installed)."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def apply_lora(model: nn.Module, config: LoraConfig) -> "peft.PeftModel":
    """Wrap `model` (a transformers causal LM or one-label sequence classifier) in a `peft.PeftModel` with
    LoRA adapters on `config.target_modules`; every base weight is frozen (a classifier's score head trains
    fully and is saved with the adapters). The model's linear layers are changed in place.

    Raises ValueError naming `model.lora.target_modules` when no linear layer matches and `model.lora.r`
    when r exceeds min(in, out) of a matched layer; ImportError when peft is missing.
    """
    peft = _peft()
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    pconfig = peft_config(config, task)
    for name, shape in _matched_layers(model, pconfig, config.target_modules).items():
        if config.r > min(shape):
            raise ValueError(f"model.lora.r ({config.r}) exceeds the rank of {name} ({shape[0]} x {shape[1]}): "
                             f"choose r <= {min(shape)}")
    return peft.get_peft_model(model, pconfig)


def _linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer (nn.Linear, transformers' Conv1D) of `model`: dotted name -> weight shape."""
    from transformers.pytorch_utils import Conv1D

    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _matched_layers(model: nn.Module, pconfig, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    """The linear layers peft will adapt (by peft's own matching), checked before the model is changed;
    `targets`: the configured `target_modules` (for the error)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    linear = _linear_layers(model)
    pconfig = _maybe_include_all_linear_layers(copy.copy(pconfig), model)  # 'all-linear' -> layer names
    # True or a regex match: adapted; False, None or peft's exclusion marker: not
    matched = {name: shape for name, shape in linear.items()
               if (found := check_target_module_exists(pconfig, name)) is True or isinstance(found, re.Match)}
    if not matched:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"model.lora.target_modules ({targets!r}) matches no linear layer of "
                         f"{type(model).__name__}; its linear layers are named {leaves}")
    return matched


def adapter_state_dict(model: "peft.PeftModel") -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's saved names (what `adapter_model.safetensors` holds, e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), detached fp32 tensors (aliasing the
    live fp32 parameters: copy them before the next optimizer step). Weight sync takes them through its one
    accessor, `transport.weights.policy_weights(model, adapters=True)`."""
    peft = _peft()
    return {name: t.detach().float() for name, t in peft.get_peft_model_state_dict(model).items()}


def merged_state_dict(model: "peft.PeftModel") -> dict[str, torch.Tensor]:
    """The base model's weights under its own HF names with every adapter folded in, W + scale * B @ A,
    computed beside the live model (which is not changed). Tensors of layers without adapters alias the
    live parameters (detached). Equals `merge_and_unload()` of a copy."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():  # peft's wrapper names -> the base model's own
        if ".lora_" in name or ".original_module." in name:  # adapters; the frozen twin of a trained module
            continue
        out[name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")] = tensor.detach()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            out[f"{name}.weight"] = module.get_base_layer().weight.detach() + module.get_delta_weight(adapter).detach()
    return out


def adapter_config_dict(config: LoraConfig, base_model_path: str) -> dict:
    """The `adapter_config.json` of a PEFT folder for adapters of `config` on the causal LM at
    `base_model_path` (as `PeftModel.save_pretrained` writes it: inference mode, sets as sorted lists;
    `all-linear` stays as is, see `model_adapter_config` for the layer names a model resolved it to)."""
    return _config_json(peft_config(config, "CAUSAL_LM", str(base_model_path)))


def model_adapter_config(model: "peft.PeftModel") -> dict:
    """The `adapter_config.json` that `model.save_pretrained` writes now (its live peft config, with
    `target_modules` as the layer names peft matched, sorted)."""
    return _config_json(copy.copy(model.peft_config[model.active_adapter]))


def _config_json(pconfig) -> dict:
    pconfig.inference_mode = True
    out = pconfig.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    return json.loads(json.dumps(out))


@contextmanager
def adapters_disabled(model: "peft.PeftModel") -> Iterator[None]:
    """Run `model` as its frozen base inside the block (the reference policy): adapters off, back on after."""
    with model.disable_adapter():
        yield
