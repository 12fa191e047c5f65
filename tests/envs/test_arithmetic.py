"""The calculator environment: tool calls run sandboxed and come back as observations; a failing, slow or
flooding tool is an observation and a count, never an exception; the answer is rewarded."""

from rlhf_engine.envs.arithmetic import Arithmetic


def play(env, turns):
    """Step through scripted assistant turns; returns the step results."""
    return [env.step({"role": "assistant", "content": t}) for t in turns]


def test_a_tool_call_then_the_right_answer():
    env = Arithmetic()
    opening = env.reset({"question": "What is 37 * 12?", "answer": 444})
    assert [m["role"] for m in opening] == ["system", "user"] and opening[1]["content"] == "What is 37 * 12?"
    calc, answer = play(env, ["Let me compute. <calc>37 * 12</calc>", "Answer: 444"])
    env.close()
    assert calc.observations == [{"role": "tool", "content": "444"}] and not calc.done and calc.reward is None
    assert calc.info == {"tool_calls": 1, "tool_errors": 0, "tool_timeouts": 0}
    assert answer.done and answer.reward == 1.0 and answer.info == {"correct": 1.0}


def test_wrong_answer_and_no_action_end_with_zero():
    env = Arithmetic()
    env.reset({"prompt": "What is 2 + 2?", "answer": 4})
    (wrong,) = play(env, ["Answer: 5"])
    env.reset({"prompt": "What is 2 + 2?", "answer": 4})
    (nothing,) = play(env, ["I do not know."])
    env.close()
    assert (wrong.done, wrong.reward, nothing.done, nothing.reward) == (True, 0.0, True, 0.0)


def test_tool_failures_are_observations(tmp_path):
    env = Arithmetic(max_tool_calls=4, wall_s=1.0, output_bytes=2048)
    env.reset({"question": "q", "answer": 1})
    marker = tmp_path / "child.pid"
    error, slow, flood, fork = play(env, [
        "<calc>1 / 0</calc>",
        "<calc>sum(range(10 ** 12))</calc>",
        "<calc>'x' * 10 ** 8</calc>",
        f"<calc>(__import__('os').fork() or open({str(marker)!r}, 'w').write(str(__import__('os').getpid())))</calc>",
    ])
    (over,) = play(env, ["<calc>1 + 1</calc>"])
    env.close()
    assert error.observations[0]["content"] == "error: ZeroDivisionError: division by zero"
    assert error.info["tool_errors"] == 1 and error.info["tool_timeouts"] == 0
    assert slow.info == {"tool_calls": 1, "tool_errors": 1, "tool_timeouts": 1}
    assert flood.info["tool_errors"] == 1 and flood.observations[0]["content"].startswith("error: output_limit")
    # one process per run (SandboxLimits.max_processes): the fork fails, no child ever wrote
    assert fork.info["tool_errors"] == 1 and not marker.exists()
    assert "BlockingIOError" in fork.observations[0]["content"]
    assert all(not r.done for r in (error, slow, flood, fork))
    assert "No more calculator calls" in over.observations[0]["content"]


def test_tool_bonus_rewards_calls_that_ran():
    env = Arithmetic(tool_bonus=0.25)
    env.reset({"question": "What is 6 * 7?", "answer": 42})
    ok, bad = play(env, ["<calc>6 * 7</calc>", "<calc>6 *</calc>"])
    env.close()
    assert (ok.reward, bad.reward) == (0.25, None)
