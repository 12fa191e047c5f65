"""Turn raw records into text segments: which text is a prompt (not trained on) and which is trained.

Supported SFT records (the first matching rule wins):
  {"prompt": str, "completion": str}                     prompt masked, completion + EOS trained
  {"prompt": [messages], "completion": [messages]}       conversational prompt/completion
  {"messages": [{"role": ..., "content": ...}, ...]}     every assistant turn trained, the rest masked
  {"text": str}                                          every token trained (+ EOS)
Preference records: {"prompt"?, "chosen", "rejected", "margin"?} with strings or message lists; without
a prompt, message lists are split at their common prefix and strings are scored whole.

Conversations are rendered with the tokenizer's chat template when it has one. Without one the
fallback format is, per message, `"{role}: {content}\\n"`, and for an assistant message
`"assistant: {content}{eos_token}"`; the generation prompt is `"assistant: "`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_engine.data.records import DataError, Record

SFT_FORMATS = "'prompt'+'completion', 'messages' or 'text'"


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text and whether its tokens carry a training label."""

    text: str
    trained: bool


@dataclass(frozen=True)
class TextExample:
    """An SFT example as segments. `rendered` is True when a chat template (or the fallback chat
    format) produced the text: then no special tokens are added and no EOS is appended."""

    segments: tuple[Segment, ...]
    rendered: bool
    where: str


@dataclass(frozen=True)
class PreferenceText:
    """A preference pair: a shared prompt and two continuations, `margin` from the record or None."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None
    rendered: bool
    where: str


def sft_example(record: Record, tokenizer) -> TextExample:
    """Segments of one SFT record (formats in the module docstring); raises `DataError` on bad fields."""
    f, where = record.fields, record.where
    if "prompt" in f or "completion" in f:
        prompt, completion = _field(record, "prompt"), _field(record, "completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            _nonempty(prompt, where, "prompt")
            _nonempty(completion, where, "completion")
            return TextExample((Segment(prompt, False), Segment(completion, True)), rendered=False, where=where)
        if isinstance(prompt, list) and isinstance(completion, list):
            p_msgs = _messages(prompt, where, "prompt")
            c_msgs = _messages(completion, where, "completion")
            head = render_chat(tokenizer, p_msgs, add_generation_prompt=True)
            full = render_chat(tokenizer, p_msgs + c_msgs, add_generation_prompt=False)
            tail = _suffix(full, head, where)
            return TextExample((Segment(head, False), Segment(tail, True)), rendered=True, where=where)
        raise DataError(f"{where}: fields 'prompt' and 'completion' must both be strings or both message lists,"
                        f" got {type(prompt).__name__} and {type(completion).__name__}")
    if "messages" in f:
        return TextExample(_conversation_segments(record, tokenizer), rendered=True, where=where)
    if "text" in f:
        text = _field(record, "text")
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        _nonempty(text, where, "text")
        return TextExample((Segment(text, True),), rendered=False, where=where)
    raise DataError(f"{where}: no SFT fields; expected {SFT_FORMATS}, found {sorted(f) or 'none'}")


def preference_example(record: Record, tokenizer) -> PreferenceText:
    """The prompt/chosen/rejected texts of one preference record; raises `DataError` on bad fields."""
    f, where = record.fields, record.where
    chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    margin = f.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}")
    margin = None if margin is None else float(margin)
    prompt = f.get("prompt")
    if all(isinstance(x, str) for x in (chosen, rejected)) and (prompt is None or isinstance(prompt, str)):
        if prompt is not None:
            _nonempty(prompt, where, "prompt")
        _nonempty(chosen, where, "chosen")
        _nonempty(rejected, where, "rejected")
        return PreferenceText(prompt or "", chosen, rejected, margin, rendered=False, where=where)
    if all(isinstance(x, list) for x in (chosen, rejected)) and (prompt is None or isinstance(prompt, list)):
        c_msgs, r_msgs = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        if prompt is None:  # implicit prompt: the common prefix of both conversations
            n = 0
            while n < min(len(c_msgs), len(r_msgs)) - 1 and c_msgs[n] == r_msgs[n]:
                n += 1
            p_msgs, c_msgs, r_msgs = c_msgs[:n], c_msgs[n:], r_msgs[n:]
        else:
            p_msgs = _messages(prompt, where, "prompt")
        head = render_chat(tokenizer, p_msgs, add_generation_prompt=True) if p_msgs else ""
        c_text = _suffix(render_chat(tokenizer, p_msgs + c_msgs, add_generation_prompt=False), head, where)
        r_text = _suffix(render_chat(tokenizer, p_msgs + r_msgs, add_generation_prompt=False), head, where)
        return PreferenceText(head, c_text, r_text, margin, rendered=True, where=where)
    kinds = ", ".join(f"{k}={type(v).__name__}" for k, v in (("prompt", prompt), ("chosen", chosen),
                                                               ("rejected", rejected)))
    raise DataError(f"{where}: 'prompt', 'chosen' and 'rejected' must all be strings or all message lists"
                    f" (prompt may be absent); got {kinds}")


def render_chat(tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's chat template, or the fallback format (module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    parts = [f"assistant: {m['content']}{eos}" if m["role"] == "assistant" else f"{m['role']}: {m['content']}\n"
             for m in messages]
    if add_generation_prompt:
        parts.append("assistant: ")
    return "".join(parts)


def _conversation_segments(record: Record, tokenizer) -> tuple[Segment, ...]:
    msgs = _messages(_field(record, "messages"), record.where, "messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{record.where}: field 'messages' has no assistant message to train on")
    segments, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render_chat(tokenizer, msgs[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        segments.append(Segment(_suffix(head, done, record.where), False))
        segments.append(Segment(_suffix(full, head, record.where), True))
        done = full
    return tuple(s for s in segments if s.text)


def _suffix(full: str, head: str, where: str) -> str:
    if not full.startswith(head):
        raise DataError(f"{where}: the chat template does not render conversations prefix-stably (the rendering of"
                        " the first turns is not a prefix of the whole); cannot tell prompt from completion tokens")
    return full[len(head):]


def _field(record: Record, name: str) -> Any:
    if name not in record.fields:
        raise DataError(f"{record.where}: missing field {name!r} (fields present: {sorted(record.fields)})")
    if record.fields[name] is None:
        raise DataError(f"{record.where}: field {name!r} is null")
    return record.fields[name]


def _nonempty(text: str, where: str, name: str) -> None:
    if not text.strip():
        raise DataError(f"{where}: field {name!r} is an empty string")


def _messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages, got {value!r:.80}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: field {name!r}[{i}] must be a mapping with 'role' and 'content',"
                            f" got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {name!r}[{i}] is missing {key!r}")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field {name!r}[{i}].{key} must be a string, got {type(m[key]).__name__}")
        if not m["content"].strip():
            raise DataError(f"{where}: field {name!r}[{i}].content is an empty string")
        out.append({"role": m["role"], "content": m["content"]})
    return out
