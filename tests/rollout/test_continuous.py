"""Continuous generation on a real vLLM CPU engine: `submit` / `step`, updates between decode steps (`keep`,
`recompute`), per-token versions, cache salts; and `ContinuousLoop` over a real transport."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from tests.helpers.rollout import prompts, run_checks, run_until

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_submissions_sample_what_generate_samples(vllm_generator, tokenizer):
    gen, batch = vllm_generator, prompts(tokenizer, 4)
    sampling = SamplingConfig(n=2, max_new_tokens=20, ignore_eos=True)
    budgets = [20, 3, 11, 7]
    whole = gen.generate(batch, sampling=sampling, seed=123, max_new_tokens=budgets)
    # the same prompts in two submissions (seeds offset by the first's prompts x n), stepped together
    gen.submit("a", batch[:1], sampling=sampling, seed=123, max_new_tokens=budgets[:1])
    gen.submit("b", batch[1:], sampling=sampling, seed=123 + 2, max_new_tokens=budgets[1:])
    assert gen.running == 8
    finished = run_until(gen)
    assert gen.running == 0
    stepped = {(("a" if tag == "a" else "b"), s.sample_id): s for tag, s in finished}
    assert len(stepped) == 8
    for s in whole:
        i, j = map(int, s.sample_id.split("/"))
        twin = stepped[("a", f"0/{j}")] if i == 0 else stepped[("b", f"{i - 1}/{j}")]
        assert torch.equal(twin.response_ids, s.response_ids)
        assert torch.allclose(twin.behaviour_logp, s.behaviour_logp, atol=1e-5)
        assert len(s.response_ids) == budgets[i] and s.finish_reason == "length"
        assert twin.policy_versions.tolist() == [gen.version] * budgets[i]
    # the short ones finished first: the 3-token group before the 20-token one
    order = [(tag, s.sample_id) for tag, s in finished]
    assert order.index(("b", "0/0")) < order.index(("a", "0/0"))


def test_updates_between_decode_steps(tiny_model_dir, tmp_path):
    """`keep`, `recompute` and cache salts on an in-process engine (`tests/rollout/inflight_checks.py`), in a
    child process: in process, vLLM takes over torch.set_num_threads. Its updates load the received tensors
    straight into the engine: nothing is staged."""
    output = run_checks("tests.rollout.inflight_checks", tiny_model_dir, str(tmp_path))
    assert output.strip().endswith("OK"), output[-3000:]
    for check in ("keep", "recompute", "salt", "eager"):
        assert f"{check}: ok" in output, output[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing staged


def test_recompute_needs_a_backend_that_can_and_max_inflight_a_group(tiny_model_dir):
    with pytest.raises(ValueError, match="below the group size"):
        GeneratorConfig(model=tiny_model_dir, sampling=SamplingConfig(n=4), max_inflight=3)
    with pytest.raises(ValueError, match="needs the vllm backend"):
        GeneratorConfig(model=tiny_model_dir, backend="transformers", max_inflight=8, inflight_update="recompute")
    with pytest.raises(ValueError, match="needs continuous generation"):
        GeneratorConfig(model=tiny_model_dir, inflight_update="keep")
    with pytest.raises(ValueError, match="engine in this process"):
        GeneratorConfig(model=tiny_model_dir, max_inflight=8, inflight_update="keep", engine_process=True)


class _Arrived:
    """`port`, with its first `count` prompt batches received up front and handed out in order before it is asked
    again."""

    def __init__(self, port, count: int) -> None:
        self._port = port
        self._arrived = [port.recv_prompts(timeout_s=30.0) for _ in range(count)]
        assert None not in self._arrived, "a prompt batch did not arrive within 30 s"

    def recv_prompts(self, timeout_s: float | None = None):
        return self._arrived.pop(0) if self._arrived else self._port.recv_prompts(timeout_s)

    def __getattr__(self, name: str):
        return getattr(self._port, name)


def _serve(gen, tmp_path, batches, n_rollouts, *, max_inflight=6, max_staleness=1):
    """Run a `ContinuousLoop` over `gen` on a real transport, hand it `batches`, collect `n_rollouts`; the
    rollouts in arrival order and the loop's stats. Every batch has crossed the transport before the loop starts
    (`_Arrived`): the orders the tests check do not depend on how many decode steps a loaded machine runs before
    the transport's threads deliver the second batch."""
    from rlhf_engine.rollout.continuous import ContinuousLoop
    from rlhf_engine.transport import GeneratorPort, ShutdownRequested, TrainerPort, TransportConfig
    from rlhf_engine.transport.weights import dir_fingerprint

    config = TransportConfig(endpoint=f"ipc://{tmp_path}/t", shm_dir=str(tmp_path))
    fingerprint = dir_fingerprint(gen.config.model)
    continuous = GeneratorConfig(model=gen.config.model, max_model_len=gen.config.max_model_len,
                                 max_inflight=max_inflight, sampling=SamplingConfig(n=2, max_new_tokens=48,
                                                                                    ignore_eos=True))
    saved, gen.config = gen.config, continuous
    try:
        with TrainerPort(config, fingerprint) as trainer, GeneratorPort(config, fingerprint) as port:
            for batch in batches:
                trainer.send_prompts(batch)
            loop = ContinuousLoop(gen, _Arrived(port, len(batches)), max_staleness=max_staleness)
            errors = []

            def serve():
                try:
                    loop.run()
                except ShutdownRequested:
                    pass
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    errors.append(e)

            thread = threading.Thread(target=serve)
            thread.start()
            got = []
            while len(got) < n_rollouts:
                got += trainer.recv_rollouts(n_rollouts, timeout_s=30.0)
            trainer.shutdown_generators("done")
            thread.join(timeout=30)
            assert not thread.is_alive() and not errors
    finally:
        gen.config = saved
    return got, loop.stats


def test_continuous_loop_sends_each_group_as_it_finishes(tmp_path, vllm_generator, tokenizer):
    """Two batches over a real transport: every prompt gets its n samples, sent group by group as they finish
    (a long group does not hold up the short ones), with the trainer's prompt ids; the loop ends on shutdown.
    Room for every group at once: the engine decodes in its own process, so with less room the order would also
    depend on how soon the loop refills it, i.e. on the machine's load."""
    from rlhf_engine.transport import PromptBatch

    gen, batch = vllm_generator, prompts(tokenizer, 4)
    got, stats = _serve(gen, tmp_path, [PromptBatch(0, [10, 11, 12, 13], batch, gen.version, max_new_tokens=[48, 4, 4, 4]),
                                        PromptBatch(1, [20, 21], batch[:2], gen.version, max_new_tokens=[4, 4])], 12,
                        max_inflight=12)
    assert sorted(r.prompt_id for r in got) == sorted([10, 11, 12, 13, 20, 21] * 2)
    assert len({r.sample_id for r in got}) == 12
    arrival = [r.prompt_id for r in got]
    # prompt 10 (48 tokens) started first, yet every 4-token group came before it, batch 1's included
    assert arrival[-2:] == [10, 10]
    assert all(len(r.response_ids) == (48 if r.prompt_id == 10 else 4) for r in got)
    assert stats.batches == 2 and stats.rollouts == 12


def test_a_due_batch_runs_alone_until_it_is_done(tmp_path, vllm_generator, tokenizer, tiny_model_dir):
    """Batch 0 was handed out max_staleness versions ago: the trainer waits for it, so batch 1's prompts do not
    start while batch 0's sequences run (fewer sequences per decode step); with room left they would (above)."""
    from safetensors.torch import load_file

    from rlhf_engine.transport import PromptBatch

    gen, batch = vllm_generator, prompts(tokenizer, 3)
    same = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    if gen.version == 0:  # a version the batch can be due against
        assert gen.update_weights(1, same)
    v = gen.version
    got, _ = _serve(gen, tmp_path, [PromptBatch(0, [10, 11], batch[:2], v - 1, max_new_tokens=[48, 4]),
                                    PromptBatch(1, [20], batch[2:], v, max_new_tokens=[4])], 6)
    assert [r.prompt_id for r in got] == [11, 11, 10, 10, 20, 20]
