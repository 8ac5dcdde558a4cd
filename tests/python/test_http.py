"""HTTP JSON and SSE, through the official SDK (protocol §1.1, §1.2, §3, §4)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest
from openai import OpenAI

from helpers import (
    CLOCK_TOOL,
    MODEL,
    WEATHER_TOOL,
    as_dict,
    check_arguments,
    check_response_events,
    function_calls,
    output_text,
)


def check_usage(usage: Any) -> None:
    assert usage is not None, "usage missing"
    assert usage.input_tokens > 0, f"input_tokens {usage.input_tokens}"
    assert usage.output_tokens > 0, f"output_tokens {usage.output_tokens}"
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details is not None and usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details is not None


def test_create_retrieve_delete(client: OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="Say hello")
    assert resp.id.startswith("resp_"), resp.id
    assert resp.object == "response"
    assert resp.status == "completed"
    assert resp.model == MODEL
    assert resp.previous_response_id is None
    assert resp.output_text.strip(), "empty output_text"
    msgs = [i for i in resp.output if i.type == "message"]
    assert len(msgs) == 1 and msgs[0].role == "assistant" and msgs[0].status == "completed"
    check_usage(resp.usage)

    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id
    assert got.status == "completed"
    assert got.output_text == resp.output_text

    assert client.responses.delete(resp.id) is None  # the SDK casts the body to None
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve(resp.id)
    assert exc.value.status_code == 404


def test_retrieve_unknown_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve("resp_00000000000000000000000000000000")
    assert isinstance(exc.value.body, dict) and exc.value.body.get("message"), exc.value.body


def test_http_chain_previous_response_id(client: OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="Remember the number 7.")
    second = client.responses.create(model=MODEL, input="Which number?", previous_response_id=first.id)
    assert second.status == "completed"
    assert second.previous_response_id == first.id
    assert second.output_text.strip()
    # The child's context contains the parent's input and output.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_stream_event_sequence(client: OpenAI) -> None:
    events = []
    with client.responses.create(model=MODEL, input="Say hello", stream=True) as stream:
        for event in stream:
            events.append(event)
    final = check_response_events(events)
    deltas = "".join(as_dict(e)["delta"] for e in events if e.type == "response.output_text.delta")
    assert deltas, "no output_text.delta events"
    assert deltas == output_text(final), "deltas do not concatenate to the final text"
    assert events[-1].response.output_text == deltas
    check_usage(events[-1].response.usage)
    # A streamed store=true response is retrievable afterwards.
    assert client.responses.retrieve(final["id"]).output_text == deltas


def test_stream_helper_final_response(client: OpenAI) -> None:
    """`responses.stream()` enforces ordering itself (§3.6) and rebuilds the final response."""
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.output_text == text and text


def test_sse_framing_raw(base_url: str) -> None:
    """`event: <type>` equals the JSON `type`; no `[DONE]`; no top-level `error` key; body ends after terminal."""
    body = json.dumps({"model": MODEL, "input": "Say hello", "stream": True}).encode()
    req = urllib.request.Request(
        f"{base_url}/v1/responses",
        data=body,
        method="POST",
        headers={
            "Authorization": "Bearer sk-local",
            "Content-Type": "application/json",
            "Accept": "application/json",  # the SDK sends this even when streaming (§1.1)
        },
    )
    with urllib.request.urlopen(req, timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers.get_content_type() == "text/event-stream"
        raw = reply.read().decode("utf-8")
    blocks = [b for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    payloads: list[dict[str, Any]] = []
    for block in blocks:
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
        if "data" not in fields:
            continue
        data = "\n".join(fields["data"])
        assert data != "[DONE]", "the stream must not send [DONE]"
        obj = json.loads(data)
        assert isinstance(obj, dict) and "type" in obj, f"data is not an event object: {data[:200]}"
        assert not obj.get("error"), f"top-level error key in SSE data: {obj}"
        assert fields.get("event") == [obj["type"]], f"event line {fields.get('event')} != type {obj['type']}"
        payloads.append(obj)
    check_response_events(payloads)


def test_forced_tool_http(client: OpenAI) -> None:
    resp = client.responses.create(
        model=MODEL,
        input="What time is it in Tokyo?",
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "name": "get_time"},
    )
    assert resp.status == "completed"
    calls = function_calls(as_dict(resp))
    assert calls, f"forced tool_choice produced no function_call: {as_dict(resp)['output']}"
    for call in calls:
        assert call["name"] == "get_time"
        assert call["call_id"]
        check_arguments(call["arguments"], CLOCK_TOOL)
    assert resp.tool_choice is not None


def test_tool_choice_none_http(client: OpenAI) -> None:
    resp = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="none",
        metadata={"tether_sim_tool_calls": "3"},
    )
    assert resp.status == "completed"
    assert not function_calls(as_dict(resp)), "tool_choice='none' must not call a tool"
    assert resp.output_text.strip()


def test_unknown_previous_response_http(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(
            model=MODEL, input="hi", previous_response_id="resp_00000000000000000000000000000000"
        )
    assert exc.value.status_code == 400
    assert exc.value.code == "previous_response_not_found", exc.value.body
    assert exc.value.param == "previous_response_id", exc.value.body


def test_unknown_previous_response_http_stream(client: OpenAI) -> None:
    """A miss is found before the first event: a plain 400, not SSE (§1.2)."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(
            model=MODEL, input="hi", previous_response_id="resp_00000000000000000000000000000000", stream=True
        )
    assert exc.value.code == "previous_response_not_found", exc.value.body


def test_reply_headers(client: OpenAI) -> None:
    """JSON replies are `application/json` and carry `x-request-id` (the SDK's `_request_id`, §1.1)."""
    raw = client.responses.with_raw_response.create(model=MODEL, input="Say hello")
    assert raw.headers.get("content-type", "").startswith("application/json"), raw.headers
    resp = raw.parse()
    assert resp.status == "completed"
    assert resp._request_id, "no x-request-id reply header"
