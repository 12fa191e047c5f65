"""The policy's LoRA adapter inside a `vllm.LLM`: each policy version is loaded as a new adapter.

A version's adapter tensors are written as a PEFT folder (`adapter_config.json` from the trainer's
`adapter_config_dict`, `adapter_model.safetensors`) under the generator's staging folder (shared
memory), loaded with `llm.llm_engine.add_lora(LoRARequest("policy-v<version>", <fresh id>, folder))`,
and the previous version's adapter is retired (`remove_lora`, folder deleted). Why not in place: see
`vllm_backend`'s module docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from rlhf_engine.models.lora import LoraConfig, adapter_config_dict
from rlhf_engine.transport.shm import owned_prefix

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM 0.32 accepts (`vllm.config.lora.MaxLoRARanks`)."""

SYNC_HINT = "set model.lora.sync: merged to send merged full weights instead"


def max_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `r`."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"vLLM cannot take LoRA adapters of rank model.lora.r ({r}) > {VLLM_LORA_RANKS[-1]} with "
                     f"model.lora.sync: adapters; {SYNC_HINT}")


class AdapterSlot:
    """The one adapter generation uses (`request`), replaced by `load` for each version.

    `load` of the first version (the generator's initial weights: all-zero adapters, i.e. the base)
    also checks that vLLM takes this adapter layout and applies every module of it, before any rollout.
    """

    def __init__(self, llm, lora: LoraConfig, model_dir: str, staging_dir: str) -> None:
        self.llm = llm
        self._config_json = json.dumps(adapter_config_dict(lora, model_dir), indent=2)
        parent = staging_dir if os.path.isdir(staging_dir) else None
        self._root = Path(tempfile.mkdtemp(prefix=owned_prefix("adapters"), dir=parent))
        self._next_id = 1
        self.request = None
        """The `LoRARequest` of the current version (None before the first `load`)."""

    def load(self, version: int, named_tensors: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """Make `named_tensors` (checked adapter tensors) the adapter of every later `generate`, as
        policy `version`; returns (folder write, load into the engine incl. retiring the old) seconds."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        folder = self._root / f"v{version}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(self._config_json)
        save_file({name: t.detach().contiguous() for name, t in named_tensors.items()},
                  str(folder / "adapter_model.safetensors"))
        request = LoRARequest(f"policy-v{version}", self._next_id, str(folder))
        t1 = time.perf_counter()
        try:
            self._add(request)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._next_id += 1
        previous, self.request = self.request, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return t1 - t0, time.perf_counter() - t1

    def _add(self, request) -> None:
        try:
            added = self.llm.llm_engine.add_lora(request)
        except Exception as e:
            if self.request is not None:  # the layout was taken before: not a capability problem
                raise
            raise ValueError(f"vLLM cannot take these LoRA adapters (model.lora.sync: adapters): {e}; "
                             f"{SYNC_HINT}") from e
        if not added:
            raise RuntimeError(f"vLLM did not load adapter {request.lora_name} (id {request.lora_int_id}) "
                               f"from {request.lora_path}")
        if self.request is None:  # the first adapter: does vLLM serve every module of this layout as peft does?
            refused = sorted({name for names in self.llm.collective_rpc("rlhf_lora_modules_not_linear",
                                                                        args=(request.lora_int_id,)) for name in names})
            if refused:
                self.llm.llm_engine.remove_lora(request.lora_int_id)
                raise ValueError(f"vLLM serves LoRA adapters on linear layers only, not on {refused} "
                                 f"(model.lora.target_modules) with model.lora.sync: adapters; {SYNC_HINT}")

    def close(self) -> None:
        """Delete the adapter folders (the engine is stopped by its owner). Idempotent."""
        self.request = None
        shutil.rmtree(self._root, ignore_errors=True)
