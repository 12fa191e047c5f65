"""The generator backend a config names: vLLM where it is installed, transformers otherwise."""

from __future__ import annotations

import importlib.util

from rlhf_engine.rollout.config import GeneratorConfig
from rlhf_engine.rollout.generator import Generator


def resolve_backend(backend: str) -> str:
    """`auto` -> `vllm` when vLLM is importable, else `transformers`; others unchanged."""
    if backend != "auto":
        return backend
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def make_generator(config: GeneratorConfig) -> Generator:
    """Build the backend that `config.backend` names (see `resolve_backend`)."""
    backend = resolve_backend(config.backend)
    if backend == "transformers" and config.inflight_update != "off":
        raise ValueError(f"generator.inflight_update {config.inflight_update!r} needs the vllm backend, which is not "
                         "installed (the transformers backend cannot update or re-prefill mid-sequence)")
    if backend == "vllm":
        from rlhf_engine.rollout.vllm_backend import VLLMGenerator

        return VLLMGenerator(config)
    from rlhf_engine.rollout.hf_backend import HFGenerator

    return HFGenerator(config)
