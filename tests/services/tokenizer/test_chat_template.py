"""Chat templates render in a sandbox; messages are validated with OpenAI param names."""

from __future__ import annotations

import pytest

from headrace.services.tokenizer.chat import (
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateSecurityError,
    validate_messages,
)
from headrace.services.tokenizer.errors import RequestError

SIMPLE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


def test_model_template_matches_transformers(hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 世界 🎉"}]
    template = ChatTemplate(hf_tokenizer.chat_template, hf_tokenizer.special_tokens_map)
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert template.render(validate_messages(messages)) == expected


def test_text_parts_and_developer_role_are_normalised():
    messages = validate_messages([
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "2", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
    ])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    # A tool-calling turn's missing content renders as "" (templates without tool support concatenate it).
    assert messages[1]["content"] == "a\nb" and messages[2]["content"] == ""
    # Arguments reach templates as an object (they write them with tojson), not as JSON text.
    assert messages[4]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert messages[3]["tool_call_id"] == "1"


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages.[0]"),
    ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "messages.[1].role"),
    ([{"content": "no role"}], "messages.[0].role"),
    ([{"role": "user", "content": 5}], "messages.[0].content"),
    ([{"role": "user", "content": None}], "messages.[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.[0].content.[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages.[0].content.[0]"),
])
def test_bad_messages_name_the_param(messages, param):
    with pytest.raises(RequestError) as e:
        validate_messages(messages)
    assert e.value.param == param and e.value.code == 400


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__ }}",
    "{{ raise_exception.__globals__ }}",
    "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
])
def test_sandbox_blocks_python_internals(source):
    with pytest.raises(ChatTemplateSecurityError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert e.value.code == 500


def test_sandbox_is_immutable():
    template = ChatTemplate("{% set _ = messages.append({'role': 'system'}) %}{{ messages | length }}")
    with pytest.raises(ChatTemplateSecurityError):
        template.render([{"role": "user", "content": "x"}])


def test_template_errors_become_request_errors():
    template = ChatTemplate("{% if messages[0].role != 'system' %}{{ raise_exception('first must be system') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="first must be system") as e:
        template.render([{"role": "user", "content": "x"}])
    assert e.value.param == "messages" and e.value.code == 400
    broken = ChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(ChatTemplateError):
        broken.render([{"role": "user", "content": "x"}])


def test_hf_template_helpers():
    template = ChatTemplate("{% generation %}{{ messages | tojson }}{% endgeneration %}"
                            "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}"
                            "{% endfor %}{{ strftime_now('%Y') | length }}{{ bos_token }}", {"bos_token": "<s>"})
    out = template.render([{"role": "user", "content": "é"}, {"role": "user", "content": "x"}])
    assert out == '[{"role": "user", "content": "é"}, {"role": "user", "content": "x"}]x4<s>'


def test_generation_prompt_continue_final_and_kwargs():
    template = ChatTemplate(SIMPLE + "{{ suffix }}")
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]
    assert template.render(messages[:1], kwargs={"suffix": "!"}) == "[user]q[assistant]!"
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True,
                           kwargs={"suffix": "!"}) == "[user]q[assistant]The answer is"
    with pytest.raises(RequestError) as e:
        template.render(messages, add_generation_prompt=True, continue_final_message=True)
    assert e.value.param == "continue_final_message"
    with pytest.raises(RequestError) as e:
        template.render(messages, kwargs={"messages": []})
    assert e.value.param == "chat_template_kwargs"
