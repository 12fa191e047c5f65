"""What a weight update carries: full weights, or only the policy's LoRA adapters.

With `model.lora.sync: adapters` the generators load the frozen base from `model.policy` once and
every version brings only the adapter tensors, under peft's saved names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in], `...lora_B.weight`
[out, r]), fp32. Their names and shapes are computed here from the base folder and the
`LoraConfig` by wrapping a meta-device copy of the model with the trainer's own `apply_lora`
(no weights are read or allocated), so both ends agree by construction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rlhf_engine.models.lora import LoraConfig
from rlhf_engine.rollout.config import GeneratorConfig
from rlhf_engine.rollout.params import dir_fingerprint, stored_params
from rlhf_engine.transport import model_fingerprint

SpecRow = tuple[str, tuple[int, ...], str]
"""(name, shape, dtype name) of one tensor of a weight update."""


def adapter_specs(model_dir: str | Path, lora: LoraConfig) -> list[SpecRow]:
    """(name, shape, dtype) of every adapter tensor of `lora` on the causal LM in `model_dir`, exactly
    as `models.lora.adapter_state_dict` gives them for that model (peft names, fp32).

    Raises the `apply_lora` errors (ValueError naming `model.lora.target_modules` or `model.lora.r`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_engine.models.lora import adapter_state_dict, apply_lora

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # shapes only: no weights read, nothing allocated
        model = apply_lora(AutoModelForCausalLM.from_config(config), lora)
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in adapter_state_dict(model).items()]


def weight_specs(model_dir: str | Path, lora: LoraConfig | None) -> list[SpecRow]:
    """The tensors every weight update carries: the adapters of `lora`, or (None) all of `model_dir`'s
    stored weights in their stored dtype (`params.stored_params`)."""
    return adapter_specs(model_dir, lora) if lora is not None else stored_params(model_dir)


def sync_fingerprint(model_dir: str | Path, lora: LoraConfig | None) -> str:
    """The transport's model fingerprint of a run: the base weights in `model_dir` and, with adapter
    sync, the adapter tensors too, so a generator set up for the other kind of update is refused at
    the handshake. Without `lora` it equals `params.dir_fingerprint(model_dir)`."""
    if lora is None:
        return dir_fingerprint(model_dir)
    return model_fingerprint(stored_params(model_dir) + adapter_specs(model_dir, lora))


def run_generator_config(generator: GeneratorConfig, model_lora: LoraConfig | None) -> GeneratorConfig:
    """The generator config a run with `model.lora` = `model_lora` starts its generators with: `lora`
    set when `model_lora.sync` is `adapters`, else None (merged or no LoRA: full weights)."""
    lora = model_lora if model_lora is not None and model_lora.sync == "adapters" else None
    if generator.lora is not None and generator.lora != lora:
        raise ValueError(f"generator.lora ({generator.lora}) follows model.lora ({model_lora}) and model.lora.sync; "
                         "leave it out of the generator section")
    return dataclasses.replace(generator, lora=lora)
