"""What keeps one client from hurting the others: request size and time limits, the API key, connection caps."""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from serving_helpers import API_KEY, MODEL, wait_until

from jetmoe.serving.auth import is_loopback


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- one huge request does not stall the others ----------------------------------------------------------------
def test_huge_requests_are_refused_while_a_stream_keeps_going(server):
    """A 20 MB body is over the default size limit (413); a 3 MB prompt is refused by its length before it is
    tokenised (400). A stream running meanwhile carries on with the right tokens."""
    prompt = "Servers answer"
    expected = (
        server.client()
        .completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        .choices[0]
        .text
    )
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
        chunks = (json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {"))
        text = next(chunks)["choices"][0]["text"]  # the stream is running

        huge = json.dumps({"model": MODEL, "prompt": "word " * 4_000_000}).encode()
        error = error_of(httpx.post(server.url + "/v1/completions", content=huge, timeout=120), 413)
        assert error["code"] == "request_too_large" and str(4 * 2**20) in error["message"]

        large = {"model": MODEL, "prompt": "word " * 600_000}
        error = error_of(httpx.post(server.url + "/v1/completions", json=large, timeout=120), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        assert server.health()["running"] == 1

        while len(text) < len(expected):
            text += next(chunks)["choices"][0]["text"]
    assert text.startswith(expected)


def test_the_size_limit_counts_bodies_sent_without_a_length(guarded_server):
    def pieces():  # chunked transfer: no Content-Length to refuse up front
        yield b'{"model": "toy", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(guarded_server.url + "/v1/completions", content=pieces(), headers=headers, timeout=60)
    assert error_of(response, 413)["code"] == "request_too_large"
    assert response.headers["connection"] == "close"


# ---- API key ---------------------------------------------------------------------------------------------------
def test_the_openai_client_needs_the_key(guarded_server):
    with guarded_server.client(api_key="sk-wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    with guarded_server.client() as client:  # the right key
        assert [m.id for m in client.models.list().data] == [MODEL]
        result = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "method, path, headers",
    [
        ("GET", "/v1/models", {}),
        ("GET", f"/v1/models/{MODEL}", {"Authorization": "Bearer nope"}),
        ("POST", "/v1/completions", {"Authorization": f"Basic {API_KEY}"}),
        ("POST", "/v1/chat/completions", {"Authorization": API_KEY}),
    ],
)
def test_v1_routes_answer_401_without_the_key(guarded_server, method, path, headers):
    response = httpx.request(method, guarded_server.url + path, headers=headers, json={}, timeout=30)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_key(guarded_server):
    assert httpx.get(guarded_server.url + "/health", timeout=30).json()["status"] == "ok"


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.org"))


# ---- slow and numerous clients ---------------------------------------------------------------------------------
def test_a_client_that_sends_half_a_body_is_answered_408_and_disconnected(guarded_server):
    headers = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 200\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", guarded_server.port), timeout=60) as slow:
        slow.sendall(headers.encode() + b'{"model": "toy", "prompt": "')  # ... and nothing more
        assert guarded_server.health()["status"] == "ok"  # the server answers others meanwhile
        received = b""
        while chunk := slow.recv(65536):  # until the server closes the connection
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_connections_beyond_the_cap_are_refused(guarded_server):
    idle = [socket.create_connection(("127.0.0.1", guarded_server.port), timeout=30) for _ in range(6)]
    try:
        assert httpx.get(guarded_server.url + "/health", timeout=30).status_code == 503
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: httpx.get(guarded_server.url + "/health", timeout=30).status_code == 200, what="a free place")
