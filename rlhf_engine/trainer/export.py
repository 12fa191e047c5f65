"""Models written as Hugging Face folders (safetensors + config + tokenizer), loadable by transformers and vLLM.

Two conventions, one per consumer:
- an offline stage's output (`save_stage_folder`) is a full model: a LoRA model is merged into its base (the
  next stage loads the folder as a plain model), its adapters beside it in `adapter/`;
- a PPO trainer's models (`save_gathered`) are gathered from every rank's shards and written by rank 0; a
  LoRA policy is written as its PEFT adapter folder (its base is the run's `model.policy`), a value-head
  model's head to its own file, never inside the causal LM's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from rlhf_engine.common.checkpoint import atomic_directory, interrupts_held
from rlhf_engine.distributed.comm import Comm
from rlhf_engine.distributed.weights import iter_full_state
from rlhf_engine.models.loading import causal_lm
from rlhf_engine.models.lora import is_lora, merged_state_dict
from rlhf_engine.models.value_head import VALUE_HEAD_FILE, AutoModelForCausalLMWithValueHead

LORA_ADAPTER_DIR = "adapter"
"""Sub-folder of a stage's saved folder that holds the LoRA adapters alone (PEFT format)."""


def save_stage_folder(model: nn.Module, tokenizer: Any, path: str | Path, *, atomic: bool) -> Path:
    """`save_pretrained` model and tokenizer into `path` (safetensors); a LoRA model as the merged HF folder
    plus its adapters in `path/adapter`. `atomic`: write a temp folder and rename it into place (for
    `checkpoint-<step>` folders; the final `output_dir` also holds the run's metrics and checkpoints, so it
    is written in place)."""
    path = Path(path)
    if atomic:
        with interrupts_held(), atomic_directory(path) as tmp:
            _write_stage_model(model, tokenizer, tmp)
    else:
        path.mkdir(parents=True, exist_ok=True)
        _write_stage_model(model, tokenizer, path)
    return path


def _write_stage_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    if is_lora(model):
        model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model), safe_serialization=True)
        model.save_pretrained(folder / LORA_ADAPTER_DIR)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_gathered(comm: Comm, model: nn.Module, path: Path, tokenizer: Any = None,
                  value_head_file: Path | None = None) -> None:
    """A model as an HF folder at `path`, gathered from the shards on every rank (a collective) and written by
    rank 0; a value-head model's head goes to `value_head_file` (default `path/value_head.safetensors`)."""
    lm = causal_lm(model)
    lm_state = {name: t.cpu().contiguous() for name, t in iter_full_state(lm)}
    head_state = None
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        head_state = {name: t.cpu().contiguous() for name, t in iter_full_state(model.v_head)}
    if not comm.is_main:
        return
    lm.save_pretrained(path, state_dict=lm_state)
    if head_state is not None:
        save_file(head_state, str(value_head_file if value_head_file is not None else Path(path) / VALUE_HEAD_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
