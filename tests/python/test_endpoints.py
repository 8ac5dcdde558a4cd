"""The SDK's own methods for the rest of the Responses API tether answers:
`client.responses.input_items.list` (pages, orders, auto-pagination over `has_more`) and
`client.responses.input_tokens.count` (the count the next create's usage reports)."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from helpers import MODEL, WEATHER_TOOL


def _chain(client: OpenAI) -> tuple[list, list[tuple]]:
    """A user turn answered by a tool call, the tool's output, and a follow-up; returns the
    responses and the gist of each context item, oldest first."""
    first = client.responses.create(
        model=MODEL,
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        metadata={"tether_sim_output_tokens": "6"},
    )
    call = next(item for item in first.output if item.type == "function_call")
    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temp": 21})}
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[output], tools=[WEATHER_TOOL],
        metadata={"tether_sim_output_tokens": "6"},
    )
    third = client.responses.create(
        model=MODEL, previous_response_id=second.id, input="And tomorrow?", metadata={"tether_sim_output_tokens": "6"}
    )
    context = [("message", "user", "Weather in Paris?")]
    context += [_gist(item) for item in first.output]
    context.append(("function_call_output", call.call_id, output["output"]))
    context += [_gist(item) for item in second.output]
    context.append(("message", "user", "And tomorrow?"))
    return [first, second, third], context


def _gist(item) -> tuple:
    if item.type == "message":
        return ("message", item.role, "".join(part.text for part in item.content))
    if item.type == "function_call":
        return ("function_call", item.call_id, item.name, item.arguments)
    if item.type == "function_call_output":
        return ("function_call_output", item.call_id, item.output)
    raise AssertionError(f"unexpected item {item!r}")


def test_input_items_list_the_context_in_pages(client: OpenAI) -> None:
    responses, context = _chain(client)
    third = responses[2].id

    page = client.responses.input_items.list(third, order="asc", limit=100)
    assert [_gist(item) for item in page.data] == context
    assert page.has_more is False
    ascending = [item.id for item in page.data]
    assert len(set(ascending)) == len(ascending), ascending
    call = next(item for item in responses[0].output if item.type == "function_call")
    assert call.id in ascending, "a function call keeps its id"

    # The default order is newest first.
    newest = client.responses.input_items.list(third)
    assert [item.id for item in newest.data] == ascending[::-1]

    # Auto-pagination follows `after` over `has_more`, a page of two at a time.
    for order, expected in (("asc", ascending), ("desc", ascending[::-1])):
        first_page = client.responses.input_items.list(third, order=order, limit=2)
        assert len(first_page.data) == 2 and first_page.has_more is True
        assert [item.id for item in first_page] == expected, order
        after = client.responses.input_items.list(third, order=order, limit=2, after=expected[1])
        assert [item.id for item in after.data] == expected[2:4], order

    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_items.list(third, limit=0)
    assert exc.value.body["param"] == "limit", exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_items.list(third, after="msg_unknown")
    assert exc.value.body["param"] == "after", exc.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_" + "0" * 48)


def test_input_tokens_count_is_the_next_creates_usage(client: OpenAI) -> None:
    cases = [
        {"input": "How warm is it in Paris?", "instructions": "Answer briefly."},
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": json.dumps({"city": "Oslo", "days": 1})},
                {"type": "function_call_output", "call_id": "call_1", "output": "-3 C"},
            ],
            "tools": [WEATHER_TOOL],
        },
    ]
    previous = None
    for body in cases:
        previous = _count_then_create(client, body)
    # With previous_response_id the chain's tokens count too.
    _count_then_create(client, {"previous_response_id": previous, "input": "And in Bergen?", "tools": [WEATHER_TOOL]})

    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_tokens.count(model=MODEL, input="x", previous_response_id="resp_" + "0" * 48)
    assert exc.value.body["code"] == "previous_response_not_found", exc.value.body


def _count_then_create(client: OpenAI, body: dict) -> str:
    count = client.responses.input_tokens.count(model=MODEL, **body)
    assert count.object == "response.input_tokens"
    response = client.responses.create(model=MODEL, **body)
    assert response.usage is not None
    assert count.input_tokens == response.usage.input_tokens > 0, body
    return response.id
