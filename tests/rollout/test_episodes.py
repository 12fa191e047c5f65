"""EpisodeRunner: episodes of an environment on a real backend, token in, token out.

The trajectory is exactly the sampled ids and the template's observation deltas, the mask is True on the
sampled ones only, their log-probs are the model's; an environment that fails ends its own episode and no
other; a slow step holds up only its episode; without an environment the runner is `Generator.generate`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
import torch

from rlhf_engine.envs.protocol import EnvironmentConfig, StepResult
from rlhf_engine.envs.template import ChatTemplate
from rlhf_engine.models.tiny import TINY_CHAT_TEMPLATE, TinyLlamaSpec, make_tiny_model_dir
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.episodes import EpisodeRunner

BUDGET = 96
PROMPTS = [[1, 40, 41], [1, 50, 51, 52]]


class Echo:
    """Answers every turn with `turn <k>` (a user message) until `turns` turns; logs each call as a JSON line."""

    def __init__(self, log: str, turns: int = 3, fail: str = "", slow_target: int = -1, sleep_s: float = 0.0,
                 opening: bool = True) -> None:
        self.log, self.turns, self.fail, self.slow_target, self.sleep_s = Path(log), turns, fail, slow_target, sleep_s
        self.opening = opening
        self.k = 0
        self.target = None

    def _write(self, **entry) -> None:
        with self.log.open("a") as f:
            f.write(json.dumps({"id": id(self), "t": time.monotonic(), **entry}) + "\n")

    def reset(self, record):
        self.target = record.get("target")
        self._write(call="reset", target=self.target)
        first = self._first_of_target()
        if self.fail == "reset" or (self.fail == "reset_but_first" and not first):
            raise RuntimeError("reset failed on purpose")
        if self.fail == "opening_but_first" and not first:
            return [{"role": "user", "content": f"play {self.target} differently"}]
        return [{"role": "user", "content": f"play {self.target}"}] if self.opening else None

    def _first_of_target(self) -> bool:
        """Whether this is the first episode of its target to reset (atomic across the runner's threads)."""
        try:
            os.close(os.open(self.log.parent / f"first-{self.target}", os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def step(self, message):
        self.k += 1
        if self.target == self.slow_target:
            time.sleep(self.sleep_s)
        observations = [{"role": "user", "content": f"turn {self.k}"}]
        self._write(call="step", target=self.target, k=self.k, content=message["content"], observations=observations)
        if self.fail == "types":
            return {"not": "a step"}
        if self.fail == "never_done":
            return StepResult(observations)
        return StepResult(observations, reward=float(self.k), done=self.k >= self.turns,
                          info={"tool_calls": 1, "answer": self.k})

    def close(self):
        self._write(call="close", target=self.target)


class AsyncEcho(Echo):
    async def reset(self, record):
        await asyncio.sleep(0)
        return Echo.reset(self, record)

    async def step(self, message):
        await asyncio.sleep(0)
        return Echo.step(self, message)


class Odd:
    """Misbehaves in the way `mode` names (each call returns at once unless said otherwise)."""

    def __init__(self, mode: str, sleep_s: float = 0.0) -> None:
        self.mode, self.sleep_s = mode, sleep_s

    async def _tick(self):
        await asyncio.sleep(0.01)
        return 1

    def reset(self, record):
        if self.mode == "loop_state":  # a task on the loop, awaited by a later call
            async def start():
                self.task = asyncio.ensure_future(self._tick())
            return start()
        return None

    def step(self, message):
        time.sleep(self.sleep_s)
        if self.mode == "loop_state":
            async def finish():
                return StepResult(reward=float(await self.task), done=True)
            return finish()
        if self.mode == "exit":
            raise SystemExit(3)
        if self.mode == "huge_reward":
            return StepResult(reward=10 ** 400, done=True)
        if self.mode == "inf_count":
            return StepResult(done=True, info={"tool_calls": float("inf")})
        return StepResult(reward=1.0, done=True, info={"x": 10 ** 400} if self.mode == "huge_metric" else {})

    def close(self):
        pass


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("chat") / "tiny", TinyLlamaSpec(),
                                   chat_template=TINY_CHAT_TEMPLATE))


@pytest.fixture(scope="module")
def generator(chat_model_dir):
    from rlhf_engine.rollout.hf_backend import HFGenerator

    gen = HFGenerator(GeneratorConfig(model=chat_model_dir, backend="transformers", max_model_len=256,
                                      sampling=SamplingConfig(n=2, max_new_tokens=BUDGET)))
    yield gen
    gen.close()


def runner(generator, tmp_path, env=Echo, **kwargs) -> EpisodeRunner:
    bounds = {k: kwargs.pop(k) for k in ("max_turns", "max_turn_tokens", "step_timeout_s", "lockstep") if k in kwargs}
    bounds.setdefault("max_turn_tokens", 6)
    config = EnvironmentConfig(f"{__name__}:{env.__name__}", kwargs={"log": str(tmp_path / "log"), **kwargs},
                               **bounds)
    return EpisodeRunner(generator, config, max_prompt_tokens=128)


def test_without_an_environment_the_runner_is_generate(generator):
    single = EpisodeRunner(generator, EnvironmentConfig(), max_prompt_tokens=128)
    sampling = SamplingConfig(n=2, max_new_tokens=24)
    got = single.run(PROMPTS, None, sampling, seed=5)
    want = generator.generate(PROMPTS, sampling=sampling, seed=5)
    assert [s.sample_id for s in got] == [s.sample_id for s in want]
    for a, b in zip(got, want):
        assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.behaviour_logp, b.behaviour_logp) and torch.equal(a.policy_versions, b.policy_versions)
        assert a.loss_mask.all() and a.turn_starts.tolist() == [0] and a.reward is None
        assert a.finish_reason == b.finish_reason and a.episode.turns == 1


def test_trajectory_is_sampled_ids_and_observation_deltas(generator, tmp_path):
    samples = runner(generator, tmp_path).run(PROMPTS, [{"target": 1}, {"target": 2}], generator.config.sampling, 3)
    template = ChatTemplate(generator.tokenizer)
    steps = [e for e in read_log(tmp_path / "log") if e["call"] == "step"]
    assert len(samples) == 4
    for s in samples:
        assert s.prompt_ids.tolist() == template.prompt_ids([{"role": "user", "content": f"play {s.prompt_id + 1}"}])
        ids, mask = s.response_ids.tolist(), s.loss_mask.tolist()
        assert len(ids) == len(mask) == s.behaviour_logp.numel() == s.policy_versions.numel()
        starts = s.turn_starts.tolist() + [len(ids)]
        assert s.episode.turns == len(starts) - 1 == 3 and s.episode.truncated == "" and s.reward == 1.0 + 2.0 + 3.0
        assert s.episode.tool_calls == 3 and s.episode.metrics == {"answer": 3.0}
        mine = [e for e in steps if e["target"] == s.prompt_id + 1]
        rebuilt = []
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            turn = [t for t, m in zip(ids[a:b], mask[a:b]) if m]
            assert mask[a:a + len(turn)] == [True] * len(turn)  # the sampled run comes first in its span
            rebuilt += turn
            if k + 1 < s.episode.turns:  # an observation follows: the template's delta, exactly
                ended = turn[-1] == template.end_of_turn_id
                rebuilt += template.observation_ids([{"role": "user", "content": f"turn {k + 1}"}], turn_ended=ended)
            # the environment read the turn decoded
            assert any(e["k"] == k + 1 and e["content"] == generator.tokenizer.decode(turn, skip_special_tokens=True)
                       for e in mine)
        assert rebuilt == ids
        assert all(lp == 0.0 for lp, m in zip(s.behaviour_logp.tolist(), mask) if not m)


def test_sampled_logprobs_are_the_models_under_the_whole_trajectory(generator, tmp_path, chat_model_dir):
    from transformers import AutoModelForCausalLM

    samples = runner(generator, tmp_path).run(PROMPTS, [{"target": 1}, {"target": 2}], generator.config.sampling, 4)
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
    for s in samples:
        ids = torch.cat([s.prompt_ids, s.response_ids])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        p = s.prompt_ids.numel()
        got = logp[p - 1:].gather(-1, s.response_ids[:, None])[:, 0]
        assert (got - s.behaviour_logp)[s.loss_mask].abs().max() <= 1e-4


def test_failing_environments_end_only_their_episode(generator, tmp_path):
    records = [{"target": 1}, {"target": 2}]
    sampling = generator.config.sampling
    for fail, reason in (("reset", "env_error"), ("types", "env_error"), ("never_done", "max_turns")):
        log = tmp_path / fail
        log.mkdir()
        samples = runner(generator, log, fail=fail, max_turns=2).run(PROMPTS, records, sampling, 1)
        assert [s.episode.truncated for s in samples] == [reason] * 4, fail
        assert all(s.response_ids.numel() >= 1 and s.episode.failed == (reason == "env_error") for s in samples)
        entries = read_log(log / "log")
        # every episode's environment closed once (and the one the runner built to check the kwargs: target None)
        assert sum(e["call"] == "close" and e["target"] is not None for e in entries) == 4
        if fail == "reset":  # the trainer's prompt and one turn, nothing more
            assert [s.prompt_ids.tolist() for s in samples[::2]] == PROMPTS and all(s.episode.turns == 1 for s in samples)


@pytest.mark.parametrize("fail", ["reset_but_first", "opening_but_first"])
def test_a_group_opens_alike_whatever_its_environments_do(generator, tmp_path, fail):
    """The n episodes of a prompt are one GRPO group: one whose reset failed, or opened otherwise, gets the
    group's opening and ends after its first turn as an environment error."""
    samples = runner(generator, tmp_path, fail=fail).run(PROMPTS, [{"target": 1}, {"target": 2}],
                                                         generator.config.sampling, 9)
    for group in (samples[:2], samples[2:]):
        assert torch.equal(group[0].prompt_ids, group[1].prompt_ids)
        assert sorted(s.episode.truncated for s in group) == ["", "env_error"]
        assert [s.episode.turns for s in group if s.episode.failed] == [1]


def test_token_budget_ends_the_episode_within_it(generator, tmp_path):
    samples = runner(generator, tmp_path, turns=50, max_turns=50).run(PROMPTS, [{"target": 1}, {"target": 2}],
                                                                      generator.config.sampling, 2)
    for s in samples:
        assert s.episode.truncated == "token_budget" and s.response_ids.numel() <= BUDGET


def test_a_slow_step_holds_up_only_its_episode(generator, tmp_path):
    run = runner(generator, tmp_path, slow_target=1, sleep_s=20.0, step_timeout_s=1.0)
    samples = run.run(PROMPTS, [{"target": 1}, {"target": 2}], generator.config.sampling, 6)
    # the run is back while the slow steps still sleep (they log a step only once they return): nothing waited
    # for them, their threads (daemons) were given up
    assert not [e for e in read_log(tmp_path / "log") if e["call"] == "step" and e["target"] == 1]
    slow, fast = samples[:2], samples[2:]
    assert all(s.episode.truncated == "step_timeout" and s.episode.failed for s in slow)
    assert all(s.episode.truncated == "" and s.episode.turns == 3 for s in fast)  # played out meanwhile


def test_lockstep_waits_for_every_step_and_reproduces(generator, tmp_path):
    records = [{"target": 1}, {"target": 2}]
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run = runner(generator, tmp_path / name, slow_target=1, sleep_s=0.3, lockstep=True)
        runs.append(run.run(PROMPTS, records, generator.config.sampling, 8))
        steps = [e for e in read_log(tmp_path / name / "log") if e["call"] == "step"]
        # every turn k + 1 of the fast episodes starts after the slow episodes' step k returned
        for k in (1, 2):
            slow_done = max(e["t"] for e in steps if e["target"] == 1 and e["k"] == k)
            assert min(e["t"] for e in steps if e["target"] == 2 and e["k"] == k + 1) > slow_done
    for a, b in zip(*runs):
        assert a.episode.truncated == "" and torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.behaviour_logp, b.behaviour_logp)


def test_async_environment_and_dataset_opening(generator, tmp_path):
    samples = runner(generator, tmp_path, env=AsyncEcho, opening=False).run(
        PROMPTS, [{"target": 1}, {"target": 2}], generator.config.sampling, 7)
    assert [s.prompt_ids.tolist() for s in samples[::2]] == PROMPTS  # reset returned None: the trainer's prompt
    assert all(s.episode.truncated == "" and s.reward == 6.0 for s in samples)


def odd(generator, mode, **config) -> EpisodeRunner:
    return EpisodeRunner(generator, EnvironmentConfig(f"{__name__}:Odd", kwargs={"mode": mode, **config.pop("kw", {})},
                                                      **config), max_prompt_tokens=128)


@pytest.mark.parametrize("mode", ["exit", "huge_reward", "inf_count", "huge_metric"])
def test_what_an_environment_returns_never_escapes(generator, mode):
    samples = odd(generator, mode).run(PROMPTS, None, generator.config.sampling, 1)
    assert [s.episode.truncated for s in samples] == ["env_error"] * 4, mode


def test_async_state_lives_on_one_loop_and_queued_calls_do_not_time_out(generator):
    samples = odd(generator, "loop_state").run(PROMPTS, None, generator.config.sampling, 2)
    assert all(s.episode.truncated == "" and s.reward == 1.0 for s in samples)
    # one thread, four steps of 0.3 s each under a 0.5 s limit: each waits for the thread, none overruns
    slow = odd(generator, "plain", kw={"sleep_s": 0.3}, concurrency=1, step_timeout_s=0.5)
    samples = slow.run(PROMPTS, None, generator.config.sampling, 3)
    assert all(s.episode.truncated == "" and s.reward == 1.0 for s in samples)


def test_kwargs_that_do_not_fit_stop_the_generator_at_start(generator):
    with pytest.raises(ValueError, match="Odd.*unexpected keyword argument 'mod'"):
        EpisodeRunner(generator, EnvironmentConfig(f"{__name__}:Odd", kwargs={"mod": "x"}), max_prompt_tokens=128)
    with pytest.raises(ValueError, match="finite"):
        EnvironmentConfig(step_timeout_s=float("inf"))


def test_an_import_path_that_does_not_resolve_is_a_config_error(generator):
    with pytest.raises(ValueError, match="does not resolve"):
        EpisodeRunner(generator, EnvironmentConfig("no_such_module:Env"), max_prompt_tokens=128)
    with pytest.raises(ValueError, match="must look like"):
        EnvironmentConfig("no_colon")
