"""`Arithmetic`: a question answered with a calculator tool (a built-in example environment).

The model may call the tool by writing `<calc>expression</calc>` (a run stops at `</calc>` when the sampling's
`stop` has it); the expression runs as Python in a `Sandbox` (`print((expression))`, the limits from the
config), and its output, or its error, comes back as a `tool` message. The episode ends at `Answer: <number>`
(reward 1 when it is the record's `answer`, else 0), at a turn with neither a tool call nor an answer (reward 0),
or when the tool calls are used up and the model still does not answer (the runner's `max_turns`). `tool_bonus`
adds a reward for each tool call that ran without an error (at most `max_tool_calls` of them): a shaping term
for a model that first has to find the tool.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_engine.envs.protocol import Message, StepResult
from rlhf_engine.envs.sandbox import Sandbox, SandboxLimits

SYSTEM_PROMPT = ("To compute, write <calc>expression</calc>, for example <calc>3 * 4</calc>: you get the result. "
                 "Then reply 'Answer: <number>'.")
_CALL = re.compile(r"<calc>(.*?)(?:</calc>|$)", re.DOTALL)
_ANSWER = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)")


class Arithmetic:
    """The record's `question` (or `prompt`) and integer `answer`; a sandboxed calculator (see the module)."""

    def __init__(self, max_tool_calls: int = 2, wall_s: float = 2.0, cpu_s: int = 1, memory_mb: int = 256,
                 output_bytes: int = 512, system_prompt: str = SYSTEM_PROMPT, tool_bonus: float = 0.0) -> None:
        if max_tool_calls < 0:
            raise ValueError(f"Arithmetic: max_tool_calls ({max_tool_calls}) must be >= 0")
        if not 0.0 <= tool_bonus <= 1.0:
            raise ValueError(f"Arithmetic: tool_bonus ({tool_bonus}) must be in [0, 1]")
        self.tool_bonus = tool_bonus
        self.limits = SandboxLimits(wall_s=wall_s, cpu_s=cpu_s, memory_bytes=memory_mb << 20,
                                    output_bytes=output_bytes, max_concurrent=1)
        self.max_tool_calls = max_tool_calls
        self.system_prompt = system_prompt
        self.answer: float | None = None
        self.calls = 0
        self._sandbox: Sandbox | None = None  # started at the first tool call

    def reset(self, record: dict[str, Any]) -> list[Message]:
        question = record.get("question", record.get("prompt"))
        answer = record.get("answer")
        if not isinstance(question, str) or isinstance(answer, bool) or not isinstance(answer, (int, float)):
            raise ValueError(f"Arithmetic: a record needs a string 'question' and a number 'answer', got "
                             f"{sorted(record)}")
        self.answer, self.calls = float(answer), 0
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    def step(self, message: Message) -> StepResult:
        text = message["content"]
        answer = _ANSWER.search(text)
        if answer is not None:
            correct = float(answer.group(1)) == self.answer
            return StepResult(reward=float(correct), done=True, info={"correct": float(correct)})
        call = _CALL.search(text)
        if call is None:
            return StepResult(reward=0.0, done=True, info={"correct": 0.0})
        if self.calls >= self.max_tool_calls:
            return StepResult([{"role": "user", "content": "No more calculator calls: give 'Answer: <number>'."}])
        self.calls += 1
        if self._sandbox is None:
            self._sandbox = Sandbox(self.limits)
        result = self._sandbox.run_python(f"print(({call.group(1).strip()}))")
        info = {"tool_calls": 1, "tool_errors": int(result.status != "ok"),
                "tool_timeouts": int(result.status == "timeout")}
        if result.status == "ok":
            output = result.output.strip()
        elif result.status in ("error", "memory"):  # the traceback's last line: the exception
            output = f"error: {(result.output.strip().splitlines() or [result.detail])[-1]}"
        else:  # timeout, output_limit, failed: why the run was ended
            output = f"error: {result.status} ({result.detail})"
        reward = self.tool_bonus if result.status == "ok" and self.tool_bonus else None
        return StepResult([{"role": "tool", "content": output[: self.limits.output_bytes]}], reward=reward, info=info)

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()
