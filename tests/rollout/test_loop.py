"""The generator loop over a real transport (sockets + shared memory), on the shared vLLM engine."""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_engine.rollout.loop import GeneratorLoop
from rlhf_engine.transport import GeneratorPort, PromptBatch, TrainerPort, TransportConfig
from rlhf_engine.transport.weights import dir_fingerprint
from tests.helpers.rollout import perturbed_state, prompts, reference_logprobs

pytestmark = pytest.mark.vllm


@pytest.fixture
def ports(tmp_path, tiny_model_dir):
    config = TransportConfig(endpoint=f"ipc://{tmp_path}/ep", heartbeat_interval_s=0.1, heartbeat_timeout_s=5.0)
    fingerprint = dir_fingerprint(tiny_model_dir)
    with TrainerPort(config, fingerprint) as trainer, GeneratorPort(config, fingerprint) as generator:
        trainer.wait_for_generators(1)
        yield trainer, generator


def test_update_over_transport_reaches_the_engine(ports, vllm_generator, hf_reference, tiny_model_dir):
    from transformers import AutoTokenizer

    trainer, port = ports
    gen = vllm_generator
    version = gen.version + 1
    new = perturbed_state(hf_reference, scale=0.05, seed=11)
    trainer.publish_weights(version, new)
    batch = prompts(AutoTokenizer.from_pretrained(tiny_model_dir), 4)
    # the batch demands the new version: the loop must wait for it and sample with it
    trainer.send_prompts(PromptBatch(batch_id=7, prompt_ids=[70, 71, 72, 73], prompts=batch, min_policy_version=version))
    loop = GeneratorLoop(gen, port, max_staleness=1)
    loop.run(max_batches=1)

    rollouts = []
    while len(rollouts) < 4 * gen.config.sampling.n:
        rollouts += trainer.recv_rollouts(16, timeout_s=10.0)
    assert trainer.wait_for_acks(version, timeout_s=10.0) == {port.sender_id: True}
    assert sorted(r.prompt_id for r in rollouts) == [70, 71, 72, 73]
    assert {r.policy_version for r in rollouts} == {version}
    assert loop.stats.updates_applied == 1 and loop.stats.batches == 1
    hf_reference.load_state_dict(new, strict=False)
    for r in rollouts:
        completion = type("C", (), {"prompt_ids": r.prompt_ids, "response_ids": r.response_ids})
        assert (reference_logprobs(hf_reference, completion) - r.behaviour_logp).abs().max().item() <= 1e-4


def test_stale_and_partial_updates_are_acked_unapplied(ports, vllm_generator, hf_reference):
    trainer, port = ports
    gen = vllm_generator
    loop = GeneratorLoop(gen, port)
    current = gen.version

    # a version the generator already has: not applied, acknowledged as such
    trainer.publish_weights(current, perturbed_state(hf_reference, scale=0.5, seed=12))
    loop.apply(port.wait_weights(current, timeout_s=10.0))
    assert trainer.wait_for_acks(current, timeout_s=10.0) == {port.sender_id: False}

    # an update missing a tensor is refused whole: the generator keeps its version
    partial = perturbed_state(hf_reference, scale=0.5, seed=13)
    del partial["model.layers.1.mlp.down_proj.weight"]
    trainer.publish_weights(current + 1, partial)
    with pytest.raises(ValueError, match="missing"):
        loop.apply(port.wait_weights(current + 1, timeout_s=10.0))
    assert trainer.wait_for_acks(current + 1, timeout_s=10.0) == {port.sender_id: False}
    assert gen.version == current
    assert (loop.stats.updates_applied, loop.stats.updates_ignored) == (0, 1)


def test_waiting_for_weights_is_timed(ports, vllm_generator, hf_reference, tiny_model_dir):
    trainer, port = ports
    gen = vllm_generator
    version = gen.version + 1
    trainer.send_prompts(PromptBatch(batch_id=8, prompt_ids=[0], prompts=[[1, 20, 30]], min_policy_version=version))
    new = {k: v.clone() for k, v in perturbed_state(hf_reference, scale=0.0, seed=0).items()}
    timer = threading.Timer(0.5, trainer.publish_weights, args=(version, new))
    timer.start()
    try:
        loop = GeneratorLoop(gen, port)
        loop.run(max_batches=1)
    finally:
        timer.join()
    assert loop.stats.wait_weights_s >= 0.4
    (rollout,) = trainer.recv_rollouts(1, timeout_s=10.0)
    assert rollout.policy_version == version
    assert torch.equal(rollout.prompt_ids, torch.tensor([1, 20, 30]))
