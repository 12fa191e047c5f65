"""The wire format: round trips, every validation rule, and fuzzed garbage against a live receiver."""

import dataclasses
import warnings

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_engine.data.samples import EpisodeInfo
from rlhf_engine.transport import GeneratorPort, PromptBatch, TrainerPort
from rlhf_engine.transport.endpoints import channel_endpoint
from rlhf_engine.transport.messages import sample_from_wire, sample_to_wire
from rlhf_engine.transport.wire import (
    PROTOCOL_VERSION,
    HeartbeatHeader,
    RolloutHeader,
    TensorSpec,
    WeightsRelayedHeader,
    WeightsReleaseHeader,
    WireError,
    WireLimits,
    decode,
    encode,
    tensor_spec,
)
from tests.helpers.peers import FINGERPRINT, fast_config, ipc_endpoint, make_rollout
from tests.helpers.waiting import wait_until

LIMITS = WireLimits(max_header_bytes=4096, max_tensor_bytes=1 << 20, max_message_bytes=2 << 20, max_tensors=8)


def _roundtrip(header, tensors, limits=LIMITS):
    frames = [bytearray(f) for f in encode(header, tensors)]  # writable, like ZeroMQ frames
    return decode(frames, limits)


def test_rollout_round_trip_is_exact_and_typed():
    r = make_rollout(3, 7, 5, 9)
    header, tensors = _roundtrip(*sample_to_wire(r, "gen-a", 41))
    assert isinstance(header, RolloutHeader)
    assert (header.sender, header.seq, header.version) == ("gen-a", 41, PROTOCOL_VERSION)
    back = sample_from_wire(header, tensors)
    assert back.sample_id == "g3-7" and back.policy_version == 3 and back.finish_reason == "length"
    assert torch.equal(back.prompt_ids, r.prompt_ids)
    assert torch.equal(back.response_ids, r.response_ids)
    assert torch.equal(back.behaviour_logp, r.behaviour_logp)


def test_episode_round_trip_and_lies_about_it():
    mask = torch.tensor([1, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    r = dataclasses.replace(make_rollout(1, 2, 3, 8), loss_mask=mask, turn_starts=torch.tensor([0, 4, 7]), reward=0.5,
                            behaviour_logp=torch.where(mask, -0.5, 0.0),
                            episode=EpisodeInfo(turns=3, tool_calls=2, tool_errors=1, tool_timeouts=1, env_seconds=0.25,
                                                truncated="max_turns", metrics={"solved": 1.0}))
    back = sample_from_wire(*_roundtrip(*sample_to_wire(r, "gen-a", 1)))
    assert torch.equal(back.loss_mask, mask) and back.turn_starts.tolist() == [0, 4, 7]
    assert back.reward == 0.5 and back.episode == r.episode
    header, tensors = sample_to_wire(r, "gen-a", 2)
    bad_starts = {  # not at 0; not increasing; inside a sampled run; past the end
        "turn_starts": [torch.tensor([1, 4, 7]), torch.tensor([0, 4, 4]), torch.tensor([0, 5, 7]), torch.tensor([0, 4, 9])]}
    names = [t.name for t in header.tensors]
    for starts in bad_starts["turn_starts"]:
        lied = list(tensors)
        lied[names.index("turn_starts")] = starts
        lied_header = msgspec.structs.replace(header, tensors=tuple(tensor_spec(n, t) for n, t in zip(names, lied)))
        with pytest.raises(WireError, match="turn"):
            sample_from_wire(*_roundtrip(lied_header, lied))
    for fields in ({"reward": float("nan")}, {"turns": -1}, {"turns": 2}, {"env_seconds": float("inf")},
                   {"metrics": {f"m{i}": 1.0 for i in range(17)}}, {"truncated": "x" * 300},
                   {"truncated": "made_up"}):
        with pytest.raises(WireError) as info:
            sample_from_wire(*_roundtrip(msgspec.structs.replace(header, **fields), tensors))
        assert info.value.reason in ("bad_rollout", "bad_header"), fields


def test_prompt_batch_records_round_trip():
    batch = PromptBatch(5, [100, 101], [[1, 2, 3], [9]], records=[{"prompt": "a", "target": 3}, {"answer": [1, 2]}])
    assert PromptBatch.from_wire(*_roundtrip(*batch.to_wire("trainer", 0))) == batch
    header, tensors = batch.to_wire("trainer", 1)
    with pytest.raises(WireError, match="bad_prompts|records|Expecting"):
        PromptBatch.from_wire(*_roundtrip(msgspec.structs.replace(header, records=("{not json", "{}")), tensors))


def test_prompt_batch_round_trip_with_empty_prompt():
    batch = PromptBatch(5, [100, 101, 102], [[1, 2, 3], [], [9]], min_policy_version=4)
    assert PromptBatch.from_wire(*_roundtrip(*batch.to_wire("trainer", 0))) == batch


def test_prompt_batch_budgets_round_trip_and_lies_are_refused():
    batch = PromptBatch(5, [100, 101], [[1, 2, 3], [9]], max_new_tokens=[512, 7])
    back = PromptBatch.from_wire(*_roundtrip(*batch.to_wire("trainer", 0)))
    assert back == batch and back.max_new_tokens == [512, 7]
    assert PromptBatch.from_wire(*_roundtrip(*PromptBatch(5, [1], [[1]]).to_wire("t", 0))).max_new_tokens is None
    header, tensors = batch.to_wire("trainer", 1)
    for lie in [(512,), (512, 7, 3), (0, 7), (-4, 7)]:  # wrong count, a budget below one
        with pytest.raises(WireError, match="max_new_tokens"):
            PromptBatch.from_wire(*_roundtrip(msgspec.structs.replace(header, max_new_tokens=lie), tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])
def test_any_allowed_dtype_and_0d_or_empty_shape_round_trips(dtype):
    tensors = [torch.ones(3, 5, dtype=dtype), torch.zeros((), dtype=dtype), torch.ones(0, 4, dtype=dtype)]
    header = HeartbeatHeader(sender="s", seq=0, tensors=tuple(tensor_spec(f"t{i}", t) for i, t in enumerate(tensors)))
    _, back = _roundtrip(header, tensors)
    assert all(b.dtype == dtype and torch.equal(b, t) for b, t in zip(back, tensors))


def test_received_tensors_own_their_memory(tmp_path):
    """A tensor decoded from received frames (here `bytes`, read-only) is writable without a warning, and writing
    to it changes neither the frame nor a second decode of the same frames."""
    r = make_rollout(3, 7, 5, 9)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"ipc://{tmp_path}/owned")
        b.connect(f"ipc://{tmp_path}/owned")
        a.send_multipart(encode(*sample_to_wire(r, "gen-a", 1)), copy=False)
        frames = b.recv_multipart()
        assert memoryview(frames[1]).readonly  # what a tensor over the frame would alias
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns for a tensor over a read-only buffer
            _, first = decode(frames, LIMITS)
            _, second = decode(frames, LIMITS)
            first[0].fill_(-1)
        assert torch.equal(second[0], r.prompt_ids)
        assert torch.equal(sample_from_wire(*decode(frames, LIMITS)).prompt_ids, r.prompt_ids)
        assert int(first[0].sum()) == -first[0].numel()
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def _rollout_frames():
    return [bytearray(f) for f in encode(*sample_to_wire(make_rollout(0, 0, 4, 3), "s", 0))]


def _with_spec(spec: TensorSpec, frame: bytes):
    header = HeartbeatHeader(sender="s", seq=0, tensors=(spec,))
    return [msgspec.msgpack.encode(header), frame]


def _weights_header(kind: int, **fields) -> bytes:
    return msgspec.msgpack.encode({"kind": kind, "version": PROTOCOL_VERSION, "sender": "s", "seq": 0,
                                   "weight_version": 1} | fields)


def test_relay_headers_round_trip():
    relayed = WeightsRelayedHeader(sender="g", seq=3, weight_version=4, shm_path="/dev/shm/rlhf-engine-1-relay-a",
                                   shm_size=4096)
    release = WeightsReleaseHeader(sender="t", seq=5, weight_version=4, shm_path=relayed.shm_path)
    refused = WeightsRelayedHeader(sender="g", seq=4, weight_version=5, reason="all 2 relay buffers are held")
    for header in (relayed, release, refused):
        assert _roundtrip(header, []) == (header, [])
    with pytest.raises(WireError, match="shm_path of 4097 characters > 4096"):
        decode([_weights_header(10, shm_path="/" * 4097, shm_size=64)], WireLimits())


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "no_frames"),
        ([b"\x93\x01"], "bad_header"),  # truncated msgpack
        ([b"x" * 5000], "header_too_large"),
        ([msgspec.msgpack.encode({"kind": 99, "version": PROTOCOL_VERSION})], "unknown_kind"),
        ([msgspec.msgpack.encode({"kind": 4, "version": PROTOCOL_VERSION + 1, "sender": "s", "seq": 0})], "bad_version"),
        ([msgspec.msgpack.encode({"kind": 4, "version": PROTOCOL_VERSION, "sender": "s", "seq": 0, "evil": 1})], "bad_header"),
        ([msgspec.msgpack.encode({"kind": 4, "version": PROTOCOL_VERSION, "sender": "s", "seq": -1})], "bad_header"),
        (_rollout_frames()[:-1], "frame_count"),
        (_rollout_frames() + [b"extra"], "frame_count"),
        (_rollout_frames()[:-1] + [b"\0" * 9], "frame_length"),  # turn_starts: one int64, 8 bytes
        (_with_spec(TensorSpec("t", "object", (2,), 16), b"\0" * 16), "bad_dtype"),
        (_with_spec(TensorSpec("t", "float32", (2,), 12), b"\0" * 12), "bad_nbytes"),
        (_with_spec(TensorSpec("t", "float32", (-2, -2), 16), b"\0" * 16), "bad_shape"),
        (_with_spec(TensorSpec("t", "uint8", (1 << 21,), 1 << 21), b""), "tensor_too_large"),
        (_with_spec(TensorSpec("t", "float32", (1 << 40,), 1 << 42), b""), "tensor_too_large"),
        (_with_spec(TensorSpec("t", "float32", (1 << 40,), 16), b"\0" * 16), "bad_nbytes"),
        # relay: a relay request carries frames; a relayed header names a file with its size, or neither
        ([_weights_header(7, bucket=0, num_buckets=1, relay=True, shm_path="/dev/shm/x", shm_size=64)], "bad_header"),
        ([_weights_header(7, bucket=0, num_buckets=1, weight_version=-1)], "bad_header"),
        ([_weights_header(10, shm_path="/dev/shm/x")], "bad_header"),
        ([_weights_header(10, shm_size=64)], "bad_header"),
        ([_weights_header(10, shm_size=-64)], "bad_header"),
        ([_weights_header(10, reason="x" * 2000)], "bad_header"),
        ([_weights_header(10, shm_path="/dev/shm/x", shm_size=64, tensors=[["t", "uint8", [64], 64]])], "bad_header"),
        ([_weights_header(11, weight_version=-3, shm_path="/dev/shm/x")], "bad_header"),
        ([_weights_header(8, applied=True, refused=True)], "bad_header"),
    ],
)
def test_malformed_messages_are_rejected_with_their_reason(frames, reason):
    with pytest.raises(WireError) as info:
        decode(frames, LIMITS)
    assert info.value.reason == reason


def test_rollout_with_wrong_layout_is_rejected():
    r = make_rollout(0, 0, 4, 3)
    header, tensors = sample_to_wire(r, "s", 0)
    sent = tensors[:2] + [tensors[1]] + tensors[3:]  # behaviour_logp sent as int64
    frames = [bytearray(f) for f in encode(header, sent)]
    frames[0] = msgspec.msgpack.encode(msgspec.structs.replace(
        header, tensors=header.tensors[:2] + (tensor_spec("behaviour_logp", tensors[1]),) + header.tensors[3:]))
    with pytest.raises(WireError, match="bad_rollout"):
        sample_from_wire(*decode(frames, LIMITS))


def test_decode_never_executes_or_unpickles():
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    with pytest.raises(WireError):
        decode([pickle.dumps(Boom())], LIMITS)


garbage_frame = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda kind, version, seq, specs: msgspec.msgpack.encode(
        {"kind": kind, "version": version, "sender": "x", "seq": seq, "tensors": specs,
         "sample_id": "evil", "prompt_id": 0, "finish_reason": "", "generation_time": 0.0}),
        st.integers(0, 12), st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, 0]), st.integers(-2, 3),
        st.lists(st.tuples(st.sampled_from(["prompt_ids", "response_ids", "behaviour_logp", "policy_versions", "loss_mask", "x"]),
                           st.sampled_from(["int64", "float32", "bfloat16", "object", ""]),
                           st.lists(st.integers(-1, 5), max_size=3), st.integers(-8, 64)), max_size=4)),
)


@pytest.fixture(scope="module")
def live_pair():
    config = fast_config(ipc_endpoint(), max_prompt_tokens=4096, max_response_tokens=4096)
    with TrainerPort(config, FINGERPRINT) as trainer, GeneratorPort(config, FINGERPRINT) as gen:
        ctx = zmq.Context()
        raw = ctx.socket(zmq.PUSH)
        raw.linger = 0
        raw.connect(channel_endpoint(config.endpoint, "rollouts"))
        yield trainer, gen, raw
        raw.close()
        ctx.term()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.lists(garbage_frame, min_size=1, max_size=5), min_size=1, max_size=4))
def test_fuzzed_garbage_is_dropped_while_good_traffic_continues(live_pair, messages):
    trainer, gen, raw = live_pair
    before = sum(v for k, v in trainer.stats()["rollouts"].items() if k.startswith("dropped."))
    received_before = trainer.stats()["rollouts"].get("received", 0)
    for frames in messages:
        raw.send_multipart(frames)
    good = make_rollout(9, received_before, 4, 4)
    gen.send_rollout(good, timeout_s=5)
    got = trainer.recv_rollout(timeout_s=5)
    assert got is not None and got.sample_id == good.sample_id
    assert torch.equal(got.behaviour_logp, good.behaviour_logp)
    def dropped() -> int:
        return sum(v for k, v in trainer.stats()["rollouts"].items() if k.startswith("dropped.")) - before

    # the raw socket's messages may still be on their way (another connection than the generator's)
    wait_until(lambda: dropped() >= len(messages), 5, interval_s=0.01, message=f"{len(messages)} messages dropped")
    assert dropped() == len(messages)
    assert trainer.recv_rollout(timeout_s=0) is None


fuzz_spec = st.tuples(st.sampled_from(["prompt_ids", "response_ids", "behaviour_logp", "policy_versions", "loss_mask",
                                       "tokens", "offsets", "w"]),
                      st.sampled_from(["int64", "float32", "bfloat16", "bool", "complex64"]),
                      st.lists(st.integers(0, 6), max_size=2))


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([5, 6, 7]), specs=st.lists(fuzz_spec, max_size=4), data=st.data())
def test_structurally_valid_but_hostile_messages_only_ever_raise_wire_error(kind, specs, data):
    """Headers that pass decoding, with consistent frames, must still be refused cleanly by the
    record builders (Sample, PromptBatch, weight staging), never with another exception."""
    from rlhf_engine.transport.weights import Staging
    from rlhf_engine.transport.wire import ALLOWED_DTYPES

    tensors_spec, frames = [], []
    for name, dtype, shape in specs:
        itemsize = ALLOWED_DTYPES[dtype].itemsize if dtype in ALLOWED_DTYPES else 8
        nbytes = itemsize * int(torch.tensor(shape, dtype=torch.int64).prod())
        tensors_spec.append([name, dtype, shape, nbytes])
        frames.append(bytearray(data.draw(st.binary(min_size=nbytes, max_size=nbytes))))
    fields = {"kind": kind, "version": PROTOCOL_VERSION, "sender": "x", "seq": 0, "tensors": tensors_spec}
    fields.update({5: {"sample_id": data.draw(st.text(max_size=300)), "prompt_id": 0,
                       "finish_reason": "", "generation_time": 0.0},
                   6: {"batch_id": 0, "prompt_ids": data.draw(st.lists(st.integers(-5, 5), max_size=3)),
                       "min_policy_version": 0},
                   7: {"weight_version": 1, "bucket": data.draw(st.integers(-1, 2)),
                       "num_buckets": data.draw(st.integers(-1, 2))}}[kind])
    try:
        header, tensors = decode([msgspec.msgpack.encode(fields), *frames], LIMITS)
        if kind == 5:
            sample_from_wire(header, tensors)
        elif kind == 6:
            PromptBatch.from_wire(header, tensors)
        else:
            Staging(max_buckets=4).add(header, tensors)
    except WireError:
        pass


def test_evaluation_batches_and_rollouts_keep_their_tag():
    batch = PromptBatch(-2, [0, 1], [[1, 2], [3]], min_policy_version=4, eval_samples=3, eval_temperature=0.7)
    back = PromptBatch.from_wire(*_roundtrip(*batch.to_wire("trainer", 0)))
    assert back == batch and back.is_eval and not PromptBatch(0, [0], [[1]]).is_eval
    r = make_rollout(3, 7, 5, 9)
    r.eval = True
    assert sample_from_wire(*_roundtrip(*sample_to_wire(r, "gen-a", 1))).eval is True
    assert sample_from_wire(*_roundtrip(*sample_to_wire(make_rollout(3, 7, 5, 9), "gen-a", 2))).eval is False
    # a hostile evaluation request is refused as data
    header, tensors = batch.to_wire("trainer", 1)
    with pytest.raises(WireError, match="bad_prompts: batch -2: eval_samples \\(-1\\) must be >= 0"):
        PromptBatch.from_wire(*_roundtrip(msgspec.structs.replace(header, eval_samples=-1), tensors))
