"""Chat prompts: messages -> token ids, with the tokenizer's chat template when it has one.

Without a template (base models such as the bundled tiny one) a plain transcript is used, and generation
stops where the model would start the user's next turn.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "developer", "tool")
FALLBACK_STOP = ("\nUser:",)
_FALLBACK_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def normalize_messages(messages) -> list[dict[str, str]]:
    """Validate OpenAI-style messages; content may be a string or a list of {"type": "text", "text": ...} parts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        result.append({"role": role, "content": content})
    return result


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """Token ids of the conversation, ending where the assistant's reply starts."""
    messages = normalize_messages(messages)
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens (bos etc.) itself.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    transcript = "".join(f"{_FALLBACK_NAMES[m['role']]}: {m['content']}\n" for m in messages)
    return tokenizer(transcript + "Assistant:")["input_ids"]


def chat_stop_strings(tokenizer) -> tuple[str, ...]:
    """Extra stop strings the chat format needs (templates end turns with the eos token instead)."""
    return () if has_chat_template(tokenizer) else FALLBACK_STOP
