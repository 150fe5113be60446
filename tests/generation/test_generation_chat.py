"""Chat prompts: the tokenizer's template when it has one, a plain transcript otherwise; message checks."""

from __future__ import annotations

import pytest
from toy_checkpoint import build_tokenizer

from jetmoe.generation.chat import chat_prompt_ids, chat_stop_strings, normalize_messages

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def test_chat_template_is_used_when_present():
    tokenizer = build_tokenizer(chat_template=True)
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert tokenizer.decode(ids) == "<s><|system|>Be brief.\n<|user|>Hi\n<|assistant|>"  # one bos, from the template
    assert chat_stop_strings(tokenizer) == ()


def test_plain_transcript_without_a_template():
    tokenizer = build_tokenizer(chat_template=False)
    ids = chat_prompt_ids(tokenizer, MESSAGES)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert chat_stop_strings(tokenizer) == ("\nUser:",)  # the model must not write the user's next turn


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text part"),
        (["hi"], "object"),
    ],
)
def test_bad_messages_raise_value_error(messages, message):
    with pytest.raises(ValueError, match=message):
        normalize_messages(messages)
