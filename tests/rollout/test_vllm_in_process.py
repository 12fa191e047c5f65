"""vLLM inside the generator's process (the default, `engine_process` auto) loads a weight update straight
from the received tensors: its sampler log-probs then equal transformers' under the new weights, and the
update leaves no staging file. Run in a child process: in process, vLLM takes over torch.set_num_threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.vllm_backend import VLLMGenerator
from tests.helpers.rollout import perturbed_state, prompts, reference_logprobs

model_dir, staging = sys.argv[1], sys.argv[2]
reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
batch = prompts(AutoTokenizer.from_pretrained(model_dir), 6)
sampling = SamplingConfig(max_new_tokens=16, ignore_eos=True)
config = GeneratorConfig(model=model_dir, backend="vllm", max_model_len=256, kv_cache_bytes=1 << 26,
                         staging_dir=staging)
assert not config.vllm_in_processes
with VLLMGenerator(config) as gen:
    new = perturbed_state(reference, scale=0.05, seed=1)
    assert gen.update_weights(gen.version + 1, new)
    assert gen.last_update_s[0] == 0.0  # no staging copy
    reference.load_state_dict(new, strict=False)
    out = gen.generate(batch, sampling=sampling)
    diff = max((reference_logprobs(reference, c) - c.behaviour_logp).abs().max().item() for c in out)
    print("max logprob diff", diff)
    assert diff <= 1e-4, diff
print("OK")
"""


def test_in_process_engine_loads_the_received_tensors(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHILD, tiny_model_dir, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]
    assert list(tmp_path.iterdir()) == []  # nothing staged
