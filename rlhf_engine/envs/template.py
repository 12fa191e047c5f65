"""The tokenizer's chat template for multi-turn rollouts: token in, token out.

A rollout keeps the ids the generator sampled unchanged and appends each environment observation as the template's
*delta*, rendered once and never decoded and re-encoded:

    ids = prompt_ids(first messages) + sampled_1 + observation_ids(obs_1) + sampled_2 + observation_ids(obs_2) + ...

where each `sampled_k` ends with `end_of_turn_id` (or is cut by a token limit: `turn_ended=False`). For an append-only
template this equals `apply_chat_template(whole conversation, add_generation_prompt=True)`, token for token.

The delta of observation messages `m` is taken against a fixed base conversation `[system?, user, assistant]`:

    delta(m) = ids(base + m, add_generation_prompt=True)[len(cut(base)):]

where `cut` keeps the rendering up to and including the end-of-turn token that closes the base's assistant message, so
whatever the template writes after that token (ChatML's newline after `<|im_end|>`) belongs to the delta, as it does
after a sampled turn that stopped on that token. Templates that rewrite history (Qwen3 strips `<think>` from earlier
assistant turns) break the prefix property this relies on and are rejected at construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2


class TemplateError(ValueError):
    """The chat template cannot be used for token-in, token-out multi-turn rollouts, or a conversation is malformed."""


_SYSTEM = {"role": "system", "content": "Answer briefly."}
_USER = {"role": "user", "content": "Guess my number."}
_ASSISTANT = {"role": "assistant", "content": "Is it 50?"}
_THINK = {"role": "assistant", "content": "<think>x</think>y"}
_OBS_USER = {"role": "user", "content": "higher"}
_TOOL = {"role": "tool", "content": "42"}

# (conversation ending with an assistant message, messages appended to it): the cut rendering of the first must be a
# token prefix of the rendering of both with a generation prompt. A probe whose roles the template rejects is skipped;
# the first one (no system, no tool role) must be accepted.
_PROBES = (
    ([_USER, _ASSISTANT], [_OBS_USER]),
    ([_SYSTEM, _USER, _THINK], [_OBS_USER]),
    ([_SYSTEM, _USER, _THINK], [_TOOL]),
    ([_USER, _THINK], [_OBS_USER, _ASSISTANT, _TOOL]),
    ([_SYSTEM, _USER, _ASSISTANT, _TOOL, _THINK], [_OBS_USER]),
)


class ChatTemplate:
    """The tokenizer's chat template, used for multi-turn rollouts.

    The template text is read once at construction and passed explicitly on every rendering, so a later change of
    `tokenizer.chat_template` cannot make the precomputed base ids stale.
    """

    def __init__(self, tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(f"{type(tokenizer).__name__} has no chat template (tokenizer.chat_template is not set)")
        self._tokenizer = tokenizer
        self._template: str = tokenizer.get_chat_template()
        self.end_of_turn_id: int = self._find_end_of_turn()
        for i, (conversation, appended) in enumerate(_PROBES):
            if i and not self._accepts(conversation + appended):
                continue
            cut = self._cut_after_assistant(conversation)
            longer = self._ids(conversation + appended, add_generation_prompt=True)
            if longer[: len(cut)] != cut:
                raise TemplateError(
                    f"the chat template rewrites history: rendering {_roles(conversation)} is not a token prefix of "
                    f"rendering it with {_roles(appended)} appended (first difference at token "
                    f"{_first_difference(cut, longer)}); multi-turn rollouts need an append-only template"
                )
        base = [_SYSTEM, _USER, _ASSISTANT] if self._accepts([_SYSTEM, _USER, _ASSISTANT]) else [_USER, _ASSISTANT]
        self._base = base

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation start rendered with the generation prompt, as token ids."""
        _check_messages(messages)
        return self._ids(messages, add_generation_prompt=True)

    def observation_ids(self, messages: list[dict], *, turn_ended: bool = True) -> list[int]:
        """The ids to append after a sampled assistant turn: the template's rendering of `messages` and of the next
        generation prompt. `turn_ended=False` (the turn was cut by a token limit, without its end-of-turn token):
        the end-of-turn id comes first."""
        _check_messages(messages)
        # the base is rendered again each time: a template may render the date (`strftime_now`), which can change
        base = self._cut_after_assistant(self._base)
        full = self._ids(self._base + messages, add_generation_prompt=True)
        if full[: len(base)] != base:
            raise TemplateError(
                f"the chat template rewrites history: appending {_roles(messages)} changes the conversation before "
                f"them (first difference at token {_first_difference(base, full)}); multi-turn rollouts "
                "need an append-only template"
            )
        delta = full[len(base) :]
        return delta if turn_ended else [self.end_of_turn_id, *delta]

    def _find_end_of_turn(self) -> int:
        """The added token that the template writes right after an assistant message's content."""
        try:
            text = self._tokenizer.apply_chat_template(
                [_USER, _ASSISTANT], chat_template=self._template, tokenize=False
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template rejects a user message and an assistant reply: {e}") from e
        content = _ASSISTANT["content"]
        if content not in text:
            raise TemplateError(f"the chat template does not render assistant content {content!r} verbatim: {text!r}")
        after = text[text.rindex(content) + len(content) :]
        added = {token.content: int(i) for i, token in self._tokenizer.added_tokens_decoder.items()}
        candidates = [token for token in added if token and after.startswith(token)]
        if not candidates:
            raise TemplateError(
                f"no end-of-turn token found: the template follows an assistant message with {after[:40]!r}, "
                "which does not start with a special (added) token"
            )
        return added[max(candidates, key=len)]

    def _cut_after_assistant(self, conversation: list[dict]) -> list[int]:
        """Rendering of `conversation` (ending with an assistant message) up to and including the end-of-turn token
        that closes that message. Checks that the generation prompt for it is a prefix of that rendering."""
        prompt = self._ids(conversation[:-1], add_generation_prompt=True)
        full = self._ids(conversation, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            i = _first_difference(prompt, full)
            raise TemplateError(
                f"the chat template's generation prompt after {_roles(conversation[:-1])} is not a token prefix of "
                f"the rendered assistant reply: from token {i} the prompt has "
                f"{self._tokenizer.convert_ids_to_tokens(prompt[i : i + 3])}, the reply "
                f"{self._tokenizer.convert_ids_to_tokens(full[i : i + 3])}; sampled ids would not match the template"
            )
        try:
            end = full.index(self.end_of_turn_id, len(prompt))
        except ValueError:
            raise TemplateError(
                f"the end-of-turn token {self.end_of_turn_id} does not follow the assistant message rendered after "
                f"{_roles(conversation[:-1])}"
            ) from None
        return full[: end + 1]

    def _accepts(self, messages: list[dict]) -> bool:
        """Whether the template renders these roles at all (some reject a system or tool message)."""
        try:
            self._tokenizer.apply_chat_template(messages, chat_template=self._template, tokenize=False)
        except jinja2.TemplateError:
            return False
        return True

    def _ids(self, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
        try:
            out = self._tokenizer.apply_chat_template(
                messages, chat_template=self._template, tokenize=True, add_generation_prompt=add_generation_prompt
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:  # a message the template cannot render
            raise TemplateError(f"the chat template rejects a conversation with roles {_roles(messages)}: "
                                f"{type(e).__name__}: {e}") from e
        if isinstance(out, Mapping):  # transformers >= 5 returns a BatchEncoding by default
            out = out["input_ids"]
        return [int(i) for i in out]


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} must be a dict with str 'role' and str 'content', got {m!r}")


def _roles(messages: list[dict]) -> list[str]:
    return [m["role"] for m in messages]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
