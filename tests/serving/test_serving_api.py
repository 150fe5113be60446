"""The OpenAI API of a real `jetmoe serve` process, driven by the official openai client."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from serving_helpers import MODEL, wait_until

GREEDY = dict(max_tokens=12, temperature=0, ignore_eos=True)


def test_health_and_models(server):
    assert server.health()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_completion_with_usage(server, model_dir):
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(model_dir)("The Python language")["input_ids"])
    client = server.client()
    result = client.completions.create(
        model=MODEL, prompt="The Python language", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion" and result.model == MODEL
    choice = result.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert result.usage.completion_tokens == 8
    assert result.usage.prompt_tokens == prompt_tokens
    assert result.usage.total_tokens == prompt_tokens + 8
    again = client.completions.create(
        model=MODEL, prompt="The Python language", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_completion_of_several_prompts(server):
    result = server.client().completions.create(
        model=MODEL, prompt=["Hello", "A mixture"], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert result.usage.completion_tokens == 8


def test_chat_completion(server):
    result = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        max_tokens=6,
        temperature=0.8,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert result.object == "chat.completion"
    message = result.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert result.usage.completion_tokens == 6 and result.usage.prompt_tokens > 6


def test_streaming_completion_equals_the_plain_one(server):
    client = server.client()
    plain = client.completions.create(
        model=MODEL, prompt="Hello world", extra_body={"ignore_eos": True}, max_tokens=12, temperature=0
    )
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="Hello world",
            stream=True,
            max_tokens=12,
            temperature=0,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_streaming_chat_ends_with_done(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 10
    # the same through the openai client
    stream = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=10, stream=True, temperature=0
    )
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in stream)


def test_stop_strings_over_http(server):
    client = server.client()
    free = (
        client.completions.create(
            model=MODEL, prompt="Hello world", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(free[i : i + 2] for i in range(3, len(free) - 2) if "\ufffd" not in free[i : i + 2])
    cut = client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    ).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.index(stop)]


def test_concurrent_requests_share_the_batch(server):
    """A short request sent while a long one streams finishes first: it joined the running batch."""
    client = server.client()
    expected = {
        p: client.completions.create(
            model=MODEL,
            prompt=p,
            **{k: v for k, v in GREEDY.items() if k != "ignore_eos"},
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for p in ("Hello", "A mixture", "The quick")
    }
    body = {"model": MODEL, "prompt": "Servers answer", "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as long_stream:
        lines = long_stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the long request is running
        results = {}

        def ask(prompt):
            results[prompt] = (
                client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
                )
                .choices[0]
                .text
            )

        threads = [threading.Thread(target=ask, args=(p,)) for p in expected]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == expected  # batched with others, each still gets its own greedy tokens
        assert server.health()["running"] == 1  # the long one is still going
    wait_until(lambda: server.health()["running"] == 0, what="the disconnected stream to free its slot")


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD_REQUESTS = [
    ("malformed json", b'{"model": "toy", "prompt": ', "invalid_json", None),
    ("not an object", b"[1, 2, 3]", "invalid_json", None),
    ("invalid utf-8", b'{"model": "toy", "prompt": "\xff\xfe"}', "invalid_encoding", None),
    ("missing model", {"prompt": "hi"}, "missing_field", "model"),
    ("missing prompt", {"model": MODEL}, "missing_field", "prompt"),
    ("prompt wrong type", {"model": MODEL, "prompt": 5}, "invalid_type", "prompt"),
    ("max_tokens as string", {"model": MODEL, "prompt": "hi", "max_tokens": "10"}, "invalid_type", "max_tokens"),
    ("max_tokens as bool", {"model": MODEL, "prompt": "hi", "max_tokens": True}, "invalid_type", "max_tokens"),
    ("temperature as string", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, "invalid_type", "temperature"),
    ("temperature too high", {"model": MODEL, "prompt": "hi", "temperature": 3}, "invalid_value", "temperature"),
    ("stream as string", {"model": MODEL, "prompt": "hi", "stream": "yes"}, "invalid_type", "stream"),
    ("stop wrong type", {"model": MODEL, "prompt": "hi", "stop": 7}, "invalid_type", "stop"),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, "model_not_found", "model"),
    ("max_tokens zero", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "invalid_value", "max_tokens"),
    ("max_tokens negative", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, "invalid_value", "max_tokens"),
    ("max_tokens over limit", {"model": MODEL, "prompt": "hi", "max_tokens": 4001}, "invalid_value", "max_tokens"),
    ("prompt longer than context", {"model": MODEL, "prompt": "word " * 5000}, "context_length_exceeded", "prompt"),
    (
        "prompt plus output over context",
        {"model": MODEL, "prompt": "hello " * 1500, "max_tokens": 3000},
        "context_length_exceeded",
        "prompt",
    ),
    ("token id outside vocabulary", {"model": MODEL, "prompt": [1, 99999]}, "invalid_value", "prompt"),
    ("n > 1", {"model": MODEL, "prompt": "hi", "n": 2}, "unsupported", "n"),
    ("seed over 64 bits", {"model": MODEL, "prompt": "hi", "seed": 2**70}, "invalid_value", "seed"),
    ("top_k overflow", {"model": MODEL, "prompt": "hi", "top_k": 10**30}, "invalid_value", "top_k"),
    ("top_k below -1", {"model": MODEL, "prompt": "hi", "top_k": -2}, "invalid_value", "top_k"),
    ("json nested 100000 deep", b'{"model": "toy", "prompt": ' + nested(100_000) + b"}", "invalid_json", None),
    ("json nested 100 deep", b'{"model": "toy", "prompt": "hi", "x": ' + nested(100) + b"}", "invalid_json", None),
    ("5000-digit integer", b'{"model": "toy", "prompt": "hi", "seed": 1' + b"0" * 4999 + b"}", "invalid_json", None),
    (
        "response_format json_object",
        {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}},
        "unsupported",
        "response_format",
    ),
    ("tool_choice auto", {"model": MODEL, "prompt": "hi", "tool_choice": "auto"}, "unsupported", "tool_choice"),
]
BAD_CHAT = [
    ("missing messages", {"model": MODEL}, "missing_field", "messages"),
    ("messages not a list", {"model": MODEL, "messages": "hi"}, "invalid_value", "messages"),
    ("content wrong type", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "invalid_value", "messages"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value", "messages"),
    (
        "chat max_tokens zero",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        "invalid_value",
        "max_tokens",
    ),
    (
        "chat prompt longer than context",
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]},
        "context_length_exceeded",
        "messages",
    ),
    (
        "chat response_format json_schema",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        },
        "unsupported",
        "response_format",
    ),
    (
        "chat tool_choice function",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        "unsupported",
        "tool_choice",
    ),
    (
        "chat seed under 64 bits",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1},
        "invalid_value",
        "seed",
    ),
]


def post(server, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


@pytest.mark.parametrize(
    "path, case",
    [("/v1/completions", c) for c in BAD_REQUESTS] + [("/v1/chat/completions", c) for c in BAD_CHAT],
    ids=[c[0] for c in BAD_REQUESTS + BAD_CHAT],
)
def test_bad_input_is_a_400_with_an_openai_error_body(server, path, case):
    _, body, code, param = case
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] == param
    assert error["message"]
    # ... and the server keeps serving
    ok = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_the_openai_client_sees_a_bad_request_error(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="not-this-one", prompt="hi")
    assert caught.value.status_code == 400
    assert caught.value.body["code"] == "model_not_found"


def test_unknown_route_is_an_openai_style_404(server):
    response = httpx.get(server.url + "/v1/nothing-here", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_plain_text_response_format_is_accepted(server):
    result = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        response_format={"type": "text"},
        extra_body={"ignore_eos": True},
    )
    assert result.usage.completion_tokens == 3


def test_a_refused_seed_keeps_the_connection_alive(server):
    """Seeds outside 64 bits were a 500 that reset the keep-alive connection; now a 400 on a connection kept open."""

    def client_address(response):
        return response.extensions["network_stream"].get_extra_info("client_addr")

    with httpx.Client(base_url=server.url, timeout=60) as client:
        bad = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "seed": 2**70})
        bad_address = client_address(bad)
        good = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "seed": 2**64 - 1})
        good_address = client_address(good)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
    assert good.status_code == 200
    assert bad_address == good_address  # the same connection served both
