"""Load and freeze the models of an RLHF run: policy, reference, critic (reward models: `reward_scoring.py`),
with or without LoRA adapters (`rlhf_engine.models.lora`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from rlhf_engine.models.lora import LoraConfig, adapters_disabled, apply_lora, is_lora
from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead

ADAPTER_CONFIG = "adapter_config.json"
"""The file that makes a folder a PEFT adapter folder (with `adapter_model.safetensors`)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' | torch.bfloat16 | None -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def freeze(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Make `model` frozen in place: no gradients, eval mode, optionally cast to `dtype`. Returns it."""
    model.requires_grad_(False)
    model.eval()
    dtype = resolve_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    return model


def frozen_copy(model: nn.Module, dtype: str | torch.dtype | None = None) -> nn.Module:
    """A frozen deep copy of `model` (the reference policy when none is given)."""
    return freeze(copy.deepcopy(model), dtype)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (unwraps `AutoModelForCausalLMWithValueHead`)."""
    return model.pretrained_model if isinstance(model, AutoModelForCausalLMWithValueHead) else model


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = None, frozen: bool = False) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` in `dtype` (default: as saved), frozen if asked."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": resolve_dtype(dtype)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return freeze(model) if frozen else model


class AdaptersDisabled(nn.Module):
    """The frozen base of a LoRA causal LM, as a causal LM of its own: each forward runs `lm` with its adapters
    disabled. It holds no weights of its own (it shares `lm`'s): the reference policy of a LoRA run without a
    second copy of the model. Do not train, cast or move it (that would act on `lm`)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        if not is_lora(lm):
            raise TypeError(f"AdaptersDisabled needs a peft LoRA model, got {type(lm).__name__}")
        self.lm = lm

    @property
    def config(self):
        return self.lm.config

    def get_output_embeddings(self) -> nn.Module:
        """The LM head (shared with `lm`; `models.lm_head` runs log-probs from hidden states through it)."""
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool = False):
        with adapters_disabled(self.lm):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           logits_to_keep=logits_to_keep, use_cache=use_cache)


def reference_model(policy: nn.Module, ref_model: nn.Module | None, dtype: str | torch.dtype | None) -> nn.Module:
    """The frozen reference of a PPO run: `ref_model` frozen (cast to `dtype`); without one, the policy's own
    base with adapters disabled when the policy has LoRA adapters (`AdaptersDisabled`, no copy, `dtype`
    does not apply), else a frozen copy of the initial policy."""
    if ref_model is not None:
        return freeze(causal_lm(ref_model), dtype)
    lm = causal_lm(policy)
    return AdaptersDisabled(lm) if is_lora(lm) else frozen_copy(lm, dtype)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` is a PEFT adapter folder (holds `adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_lora_model(base_path: str | Path, config: LoraConfig, adapters: str | Path | None = None,
                    *, value_head: bool = True, value_head_file: Path | None = None, seed: int = 0) -> nn.Module:
    """The causal LM of the HF folder `base_path` (loaded from its absolute path, which the saved adapters
    name as their base) with trainable LoRA adapters on a frozen base: fresh ones from `config` (A drawn from
    `seed`, torch's global RNG untouched), or those of the PEFT folder `adapters` (e.g. a checkpoint's
    `policy/`, whose rank and alpha must match `config`).
    `value_head`: wrapped in an `AutoModelForCausalLMWithValueHead` whose head comes from `value_head_file`
    (a checkpoint's policy head, beside its `policy/`), else `adapters/value_head.safetensors` (a critic's),
    else `base_path`'s, else starts at zero; it trains fully."""
    from peft import PeftModel

    base_path = Path(base_path).expanduser().resolve()
    lm = load_causal_lm(base_path)
    if adapters is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lm = apply_lora(lm, config)
    else:
        _check_saved_adapters(Path(adapters), config)
        lm = PeftModel.from_pretrained(lm, str(adapters), is_trainable=True)
    if not value_head:
        return lm
    model = AutoModelForCausalLMWithValueHead(lm)
    candidates = [value_head_file] if value_head_file is not None else []
    candidates += [Path(adapters) / VALUE_HEAD_FILE] if adapters is not None else []
    for head_file in [*candidates, base_path / VALUE_HEAD_FILE]:
        if model.load_value_head(head_file):
            break
    return model


def _check_saved_adapters(folder: Path, config: LoraConfig) -> None:
    if not is_adapter_folder(folder):
        raise ValueError(f"{folder} holds no LoRA adapters ({ADAPTER_CONFIG} is missing) but model.lora is set: "
                         "resume a LoRA run from a LoRA checkpoint")
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    if (saved.get("r"), saved.get("lora_alpha")) != (config.r, config.alpha):
        raise ValueError(f"{folder}: the saved adapters have r={saved.get('r')}, alpha={saved.get('lora_alpha')}; "
                         f"model.lora has r={config.r}, alpha={config.alpha}")


def export_merged(policy_dir: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Write the policy of `policy_dir` as a plain HF folder `out` (no value head): a PEFT adapter folder is
    merged into its base (`base`, default the base folder its `adapter_config.json` names), W + scale * B @ A;
    a full-weight folder is written as is. The tokenizer found in `policy_dir` (or the base) goes along."""
    from transformers import AutoTokenizer

    policy_dir, out = Path(policy_dir), Path(out)
    if not is_adapter_folder(policy_dir) and not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is neither a checkpoint nor a model folder (no {ADAPTER_CONFIG}, "
                                "no config.json)")
    if is_adapter_folder(policy_dir):
        from peft import PeftModel

        base = base if base is not None else json.loads((policy_dir / ADAPTER_CONFIG).read_text())[
            "base_model_name_or_path"]
        if base is None or not Path(base).is_dir():
            raise FileNotFoundError(f"{policy_dir}/{ADAPTER_CONFIG} names base model {base!r}, which is not a "
                                    "folder here: pass the base model folder (--base)")
        lm = PeftModel.from_pretrained(load_causal_lm(base), str(policy_dir)).merge_and_unload()
    else:
        lm, base = load_causal_lm(policy_dir), policy_dir
    lm.save_pretrained(out)
    tokenizer_dir = policy_dir if (policy_dir / "tokenizer_config.json").is_file() else Path(base)
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
