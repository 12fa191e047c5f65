"""Config-derived limits, weight specs, the byte-bounded queue and rate-limited drop logging."""

import logging
from collections import Counter

import pytest
import torch

from rlhf_engine.transport import GeneratorPort, PromptBatch, TrainerPort, TransportConfig, state_dict_specs
from rlhf_engine.transport.channel import BoundedQueue
from rlhf_engine.transport.config import CONTROL_LIMITS, prompt_limits, rollout_limits, rollout_memory_bound
from rlhf_engine.transport.iothread import DropLog, drop_counts
from rlhf_engine.transport.weights import WeightSpecs
from rlhf_engine.transport.wire import TensorSpec, WireError
from tests.helpers.peers import FINGERPRINT, fast_config, ipc_endpoint


def test_rollout_and_prompt_limits_follow_the_config():
    config = TransportConfig(max_prompt_tokens=100, max_response_tokens=50, max_batch_prompts=4)
    limits = rollout_limits(config)
    # a rollout: 100 + 50 int64 tokens (8 B), and per response token a float32 log-prob (4 B), an int64 policy
    # version (8 B), a bool loss mask (1 B) and at most one int64 turn start (8 B) = 1200 + 50 * 21 = 2250 bytes,
    # in 6 frames
    assert (limits.max_message_bytes, limits.max_tensor_bytes, limits.max_tensors) == (2250, 1200, 6)
    # prompts: 4 * 100 int64 tokens = 3200 bytes, offsets 5 * 8 = 40 bytes
    assert prompt_limits(config).max_message_bytes == 3240
    assert CONTROL_LIMITS.max_frame_bytes == 64 << 10 and CONTROL_LIMITS.max_tensors == 0


def test_the_memory_bound_formula():
    config = TransportConfig(max_prompt_tokens=100, max_response_tokens=50, rollout_queue_size=10,
                             rollout_queue_bytes=1 << 30, rollout_hwm=4)
    # queued: 10 * 2250; in flight per message: an 8192-byte header + 6 frames of at most the
    # socket's frame limit max(8192, 1200) = 57344; 2 generators * (4 + 1) messages + 1 in the IO thread = 11
    assert rollout_memory_bound(config, generators=2) == 10 * 2250 + 11 * 57344


def test_weight_specs_are_checked_exactly_on_both_sides():
    sd = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    specs = WeightSpecs.of(state_dict_specs(sd))
    assert specs.limits(1 << 20).max_tensor_bytes == 24 and specs.limits(1 << 20).max_message_bytes == 32
    specs.check_received([TensorSpec("a", "float32", (2, 3), 24)])
    with pytest.raises(WireError, match="bad_weights.*'a' float32\\[3, 2\\]"):
        specs.check_received([TensorSpec("a", "float32", (3, 2), 24)])
    with pytest.raises(WireError, match="no such tensor"):
        specs.check_received([TensorSpec("c", "float32", (1,), 4)])
    config = fast_config(ipc_endpoint())
    with TrainerPort(config, FINGERPRINT, weight_specs=state_dict_specs(sd)) as trainer, \
            GeneratorPort(config, FINGERPRINT, weight_specs=state_dict_specs(sd)) as gen:
        trainer.wait_for_generators(1)
        with pytest.raises(ValueError, match="missing \\['b'\\]"):
            trainer.publish_weights(1, {"a": sd["a"]})
        with pytest.raises(ValueError, match=r"tensor 'b' float32\[4\]: the model has bfloat16\[4\]"):
            trainer.publish_weights(1, {"a": sd["a"], "b": sd["b"].float()})
        trainer.publish_weights(1, sd)
        update = gen.wait_weights(1, timeout_s=10)
        assert sorted(update.tensors) == ["a", "b"]
        update.ack()


def test_prompt_batches_over_the_limits_are_refused_where_they_are_sent():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=3, max_batch_prompts=2)
    with TrainerPort(config, FINGERPRINT) as trainer:
        with pytest.raises(ValueError, match="a prompt of 4 tokens; transport.max_prompt_tokens is 3"):
            trainer.send_prompts(PromptBatch(0, [0], [[1, 2, 3, 4]]))
        with pytest.raises(ValueError, match="3 prompts; transport.max_batch_prompts is 2"):
            trainer.send_prompts(PromptBatch(0, [0, 1, 2], [[1], [2], [3]]))


def test_bounded_queue_holds_items_and_bytes_within_bounds():
    q = BoundedQueue(max_items=3, max_bytes=100)
    assert q.put("a", 60, 0) and not q.put("b", 60, 0)  # 120 bytes would exceed 100
    assert q.put("c", 40, 0) and not q.put("d", 1, 0.01)  # 100 bytes: full
    assert (len(q), q.nbytes) == (2, 100)
    assert q.get(0) == "a" and q.put("big", 1000, 0) is False
    assert q.get(0) == "c" and q.put("big", 1000, 0)  # alone, an oversized item still fits
    assert q.get(0) == "big" and q.get(0.01) is None and q.nbytes == 0


def test_drops_are_counted_every_time_and_logged_once_per_reason_per_interval(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("rlhf_engine.transport.iothread.time.monotonic", lambda: now[0])
    stats = Counter()
    drops = DropLog("chan", stats, interval_s=10.0)
    with caplog.at_level(logging.WARNING, logger="rlhf_engine.transport.iothread"):
        for i in range(100):
            drops.drop("bad_header", f"garbage {i}")
        drops.drop("duplicate", "d")
        now[0] += 11
        drops.drop("bad_header", "garbage last")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["chan: dropped a message (bad_header): garbage 0",
                     "chan: dropped a message (duplicate): d",
                     "chan: dropped 100 messages (bad_header) in the last 11 s; last: garbage last"]
    assert drop_counts(stats, Counter({"dropped.duplicate": 2, "received": 5})) == {"bad_header": 101, "duplicate": 3}
