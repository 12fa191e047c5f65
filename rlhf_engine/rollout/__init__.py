"""The generator: sample completions with the sampler's log-probs, take live weight updates.

- `Generator` (`generator.py`): `generate(prompts, sampling=None, seed=None) -> [Sample]`,
  `update_weights(version, named_tensors) -> bool`, `close()`; `make_generator(GeneratorConfig)`
  picks `VLLMGenerator` (`vllm_backend.py`) or `HFGenerator` (`hf_backend.py`).
- `GeneratorLoop` (`loop.py`): prompts in, rollouts out over the transport, weights between batches.
- `run_generator` (`process.py`): the body of a generator process.
- What an update carries (`rlhf_engine.transport.weights`): full weights, or with `GeneratorConfig.lora`
  (`model.lora.sync: adapters`) only the LoRA adapters on the frozen base (`vllm_adapters.py` in vLLM).

Names are imported lazily: the config loader imports `rollout.config` without torch or vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GeneratorConfig": "rlhf_engine.rollout.config",
    "SamplingConfig": "rlhf_engine.rollout.config",
    "Generator": "rlhf_engine.rollout.generator",
    "make_generator": "rlhf_engine.rollout.generator",
    "GeneratorLoop": "rlhf_engine.rollout.loop",
    "LoopStats": "rlhf_engine.rollout.loop",
    "run_generator": "rlhf_engine.rollout.process",
    "dir_fingerprint": "rlhf_engine.transport.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf_engine.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
