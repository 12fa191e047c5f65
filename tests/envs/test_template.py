"""ChatTemplate: observation deltas rebuild the template's own rendering token for token; history rewriting is refused."""

import pytest

from rlhf_engine.envs.template import ChatTemplate, TemplateError
from rlhf_engine.models.tiny import TINY_CHAT_TEMPLATE  # append-only, `</s>` ends every turn

# ChatML as Qwen3 writes it: `<think>...</think>` is stripped from assistant turns before the last user message, so
# the rendering of a turn changes once a user message follows it.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and '</think>' in content and loop.index0 < ns.last_user -%}"
    "{%- set content = content.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

SYSTEM = {"role": "system", "content": "You play a guessing game."}
USER = {"role": "user", "content": "I picked a number from 1 to 100."}
A = {"role": "assistant", "content": "<think>halve it</think>Is it 50?"}
OBS = {"role": "user", "content": "higher"}
B = {"role": "assistant", "content": "Let me compute: 75."}
OBS2 = {"role": "tool", "content": "42"}


def _template_ids(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _rollout_matches_full_rendering(tokenizer, conversation):
    """Build the rollout as the generator would (prompt, sampled ids, observation deltas) and compare it with the
    template's rendering of the whole conversation. The sampled ids of each assistant turn are the template's own
    tokens of its content, read off the full rendering up to the next end-of-turn token."""
    template = ChatTemplate(tokenizer)
    eot = template.end_of_turn_id
    full = _template_ids(tokenizer, conversation)
    first_assistant = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    rollout = template.prompt_ids(conversation[:first_assistant])
    i = first_assistant
    while i < len(conversation):
        assert conversation[i]["role"] == "assistant"
        end = full.index(eot, len(rollout))
        sampled = full[len(rollout) : end]
        assert tokenizer.decode(sampled) == conversation[i]["content"]
        j = next((k for k in range(i + 1, len(conversation)) if conversation[k]["role"] == "assistant"), None)
        observation = conversation[i + 1 : j]
        rollout += sampled + [eot] + template.observation_ids(observation)
        i = len(conversation) if j is None else j
    assert rollout == full
    return template


@pytest.fixture(scope="module")
def smol_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


def _fresh_smol_tokenizer(real_model_dir, chat_template):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    tokenizer.chat_template = chat_template
    return tokenizer


def test_smollm2_deltas_rebuild_the_full_rendering(smol_tokenizer):
    template = _rollout_matches_full_rendering(smol_tokenizer, [SYSTEM, USER, A, OBS, B, OBS2])
    # eos of SmolLM2 is `<|im_end|>` = 2; `<|im_start|>` = 1; "\n" = 198.
    assert template.end_of_turn_id == 2 == smol_tokenizer.eos_token_id
    delta = template.observation_ids([OBS])
    assert smol_tokenizer.convert_ids_to_tokens(delta) == [
        "Ċ", "<|im_start|>", "user", "Ċ", "higher", "<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"
    ]  # fmt: skip
    assert delta == [198, 1, 4093, 198, 37600, 2, 198, 1, 520, 9531, 198]


def test_smollm2_default_system_prompt_stays_out_of_the_delta(smol_tokenizer):
    # Without a system message SmolLM2's template writes its own ("You are a helpful AI assistant named SmolLM...")
    # before the first message: it belongs to the prompt, never to an observation.
    template = _rollout_matches_full_rendering(smol_tokenizer, [USER, A, OBS, B, OBS2])
    default_system = smol_tokenizer.encode("You are a helpful AI assistant named SmolLM", add_special_tokens=False)
    assert template.prompt_ids([USER])[3 : 3 + len(default_system)] == default_system
    for observation in ([OBS], [OBS2], [OBS, OBS2]):
        delta = template.observation_ids(observation)
        assert delta.count(1) == len(observation) + 1  # one `<|im_start|>` per message and one for the reply
        assert smol_tokenizer.decode(delta).count("SmolLM") == 0


def test_turn_cut_by_token_limit_gets_the_end_of_turn_prepended(smol_tokenizer):
    template = ChatTemplate(smol_tokenizer)
    assert template.observation_ids([OBS], turn_ended=False) == [2, *template.observation_ids([OBS])]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        {"role": "user", "content": "x"},
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        [{"role": None, "content": "x"}],
        ["user: x"],
    ],
)
def test_malformed_messages_are_refused(smol_tokenizer, messages):
    template = ChatTemplate(smol_tokenizer)
    with pytest.raises(TemplateError, match="messages must be|message 0 must be"):
        template.observation_ids(messages)
    with pytest.raises(TemplateError, match="messages must be|message 0 must be"):
        template.prompt_ids(messages)


def test_tiny_tokenizer_without_a_template_is_refused_and_with_one_works():
    from rlhf_engine.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate(tokenizer)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    template = _rollout_matches_full_rendering(tokenizer, [SYSTEM, USER, A, OBS, B, OBS2])
    assert template.end_of_turn_id == tokenizer.convert_tokens_to_ids("</s>") == 2
    # Nothing follows `</s>` in this template: the delta starts with the observation's role.
    assert tokenizer.decode(template.observation_ids([OBS])) == "user:\nhigher</s>assistant:\n"


def test_history_rewriting_template_is_refused(real_model_dir):
    tokenizer = _fresh_smol_tokenizer(real_model_dir, QWEN3_LIKE_TEMPLATE)
    with pytest.raises(TemplateError, match="rewrites history.*append-only template"):
        ChatTemplate(tokenizer)


def test_generation_prompt_ending_in_a_space_is_refused(real_model_dir):
    # "assistant: " + "Is it 50?" tokenizes as "assistant", ":", " Is", ...: the prompt's trailing " " is not a
    # token of the rendered reply, so a model sampling after it would never produce the template's ids.
    tokenizer = _fresh_smol_tokenizer(
        real_model_dir, TINY_CHAT_TEMPLATE.replace(":\n", ": ").replace("</s>", "<|im_end|>")
    )
    with pytest.raises(TemplateError, match=r"generation prompt after \['user'\] is not a token prefix"):
        ChatTemplate(tokenizer)


def test_template_without_an_end_of_turn_token_is_refused(real_model_dir):
    tokenizer = _fresh_smol_tokenizer(
        real_model_dir, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    )
    with pytest.raises(TemplateError, match="no end-of-turn token"):
        ChatTemplate(tokenizer)


def test_template_change_after_construction_does_not_stale_the_deltas(real_model_dir):
    tokenizer = _fresh_smol_tokenizer(real_model_dir, TINY_CHAT_TEMPLATE.replace("</s>", "<|im_end|>"))
    template = ChatTemplate(tokenizer)
    before = template.observation_ids([OBS])
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    assert template.observation_ids([OBS]) == before
    assert tokenizer.decode(before) == "user:\nhigher<|im_end|>assistant:\n"
