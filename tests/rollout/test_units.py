"""Config validation, the staging-file layout, update checks and backend choice (no engine needed)."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.rollout.backends import resolve_backend
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.staging import ALIGN, StagingFile, layout, map_file, views
from rlhf_engine.transport.weights import WeightSpecs, dir_fingerprint, stored_params


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, r"n \(0\) must be >= 1"),
        ({"top_p": 0.0}, r"top_p \(0.0\) must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k \(-1\) must be >= 0"),
        ({"temperature": -0.5}, r"temperature \(-0.5\) must be >= 0"),
        ({"n": 2, "temperature": 0}, r"n \(2\) > 1 with temperature 0"),
        ({"stop": ("",)}, "stop strings must be non-empty"),
    ],
)
def test_sampling_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_generator_config_checks():
    with pytest.raises(ValueError, match=r"backend \('tpu'\)"):
        GeneratorConfig(model="m", backend="tpu")
    with pytest.raises(ValueError, match=r"max_new_tokens \(300\) must be < max_model_len \(256\)"):
        GeneratorConfig(model="m", max_model_len=256, sampling={"max_new_tokens": 300})
    with pytest.raises(ValueError, match="engine_process=False needs tensor_parallel_size 1"):
        GeneratorConfig(model="m", tensor_parallel_size=2, engine_process=False)
    # auto: vLLM inside the generator process (no spinning worker process), in processes for tensor parallelism
    assert GeneratorConfig(model="m").vllm_in_processes is False
    assert GeneratorConfig(model="m", tensor_parallel_size=2).vllm_in_processes is True
    assert GeneratorConfig(model="m", tensor_parallel_size=2).engine_process is None  # saved configs stay auto
    config = GeneratorConfig(model="m", sampling={"n": 4, "stop": ["\n"]})
    assert config.sampling == SamplingConfig(n=4, stop=("\n",))
    seeds = {config.batch_seed(b) for b in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert resolve_backend("transformers") == "transformers"


def test_staging_layout_round_trips(tmp_path):
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 2)}
    specs, size = layout(shapes, torch.bfloat16)
    # 15 bf16 = 30 bytes -> slot of 64; 7 -> 14 -> 64; 8 -> 16 -> 64
    assert [s[3] for s in specs] == [0, ALIGN, 2 * ALIGN] and size == 3 * ALIGN
    staging = StagingFile(shapes, torch.bfloat16, directory=str(tmp_path))
    try:
        tensors = {name: torch.randn(shape) for name, shape in shapes.items()}
        staging.write(tensors)
        read = dict(views(map_file(staging.path, staging.size), staging.specs))  # a second, independent mapping
        for name, t in tensors.items():
            assert torch.equal(read[name], t.to(torch.bfloat16))
        with pytest.raises(ValueError, match="outside the 192-byte file"):
            list(views(map_file(staging.path, staging.size), [("x", "float32", (100,), 0)]))
        with pytest.raises(ValueError, match="expected a float dtype"):
            list(views(map_file(staging.path, staging.size), [("x", "int64", (1,), 0)]))
    finally:
        staging.close()
    assert not (tmp_path / staging.path).exists()


def test_check_update_and_fingerprint(tiny_model_dir, hf_reference):
    from rlhf_engine.transport import model_fingerprint

    specs = WeightSpecs.of(stored_params(tiny_model_dir))
    state = {name: torch.zeros(shape) for name, shape in specs.shapes.items()}
    specs.check_update(state)
    specs.check_update({name: t.to(torch.bfloat16) for name, t in state.items()})  # any float dtype: backends convert
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        specs.check_update({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        specs.check_update({n: t for n, t in state.items() if n != "model.norm.weight"})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\), the model expects \(128,\)"):
        specs.check_update({**state, "model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="has dtype torch.int64"):
        specs.check_update({**state, "model.norm.weight": torch.zeros(128, dtype=torch.int64)})
    # the trainer's fingerprint of the loaded model equals the one computed from the folder
    assert dir_fingerprint(tiny_model_dir) == model_fingerprint(hf_reference.state_dict())
