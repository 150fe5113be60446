"""Concurrency and queue limits (429, 503) and disconnects freeing slots, on a one-slot server."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from serving_helpers import MODEL, wait_until

LONG = {"model": MODEL, "prompt": "Servers answer", "max_tokens": 29000, "ignore_eos": True}


def open_long_stream(server):
    """Start a long streaming request and read until it is running; returns the open stream context.

    The line iterator is kept with it: dropping that iterator would close the response (a disconnect)."""
    context = httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=120)
    response = context.__enter__()
    assert response.status_code == 200
    context.lines = response.iter_lines()
    next(line for line in context.lines if line.startswith("data: "))
    return context


def test_queue_full_is_429_and_waiting_too_long_is_503(tight_server):
    client = tight_server.client()
    holder = open_long_stream(tight_server)  # takes the only slot
    try:
        waiting = {}

        def wait_in_queue():
            try:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            except openai.APIStatusError as error:
                waiting["error"] = error

        thread = threading.Thread(target=wait_in_queue)
        thread.start()
        wait_until(lambda: tight_server.health()["waiting"] == 1, what=f"the second request to queue ({waiting})")
        with pytest.raises(openai.RateLimitError) as caught:  # slot busy, queue full
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert caught.value.status_code == 429
        assert caught.value.body["type"] == "rate_limit_error" and "capacity" in caught.value.body["message"]
        thread.join(timeout=60)
        error = waiting["error"]  # it waited more than --queue-timeout (4 s) for the slot
        assert error.status_code == 503 and "retry" in error.body["message"]
        assert tight_server.health() == {**tight_server.health(), "running": 1, "waiting": 0}
    finally:
        holder.__exit__(None, None, None)  # the client goes away
    wait_until(lambda: tight_server.health()["running"] == 0, what="the slot of the closed stream to free")
    done = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 3


def test_a_disconnected_streaming_client_frees_its_slot(tight_server):
    holder = open_long_stream(tight_server)
    assert tight_server.health()["running"] == 1
    holder.__exit__(None, None, None)
    wait_until(lambda: tight_server.health()["running"] == 0, what="the slot to free after the disconnect")
    result = tight_server.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert result.choices[0].finish_reason in ("length", "stop")


def test_a_disconnected_non_streaming_client_frees_its_slot(tight_server):
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 29000 tokens
        httpx.post(tight_server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=1.5))
    wait_until(lambda: tight_server.health()["running"] == 0, what="the slot to free after the client timed out")
    result = tight_server.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert result.usage.completion_tokens >= 1
