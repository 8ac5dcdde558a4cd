"""The rest of the API surface, through the SDK's own methods (issue 12; protocol §1.1, §5.1, §5.2)."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from helpers import MODEL, WEATHER_TOOL


def test_models_retrieve(client: OpenAI) -> None:
    listed = {model.id for model in client.models.list()}
    assert MODEL in listed
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-nope")
    assert isinstance(exc.value.body, dict) and exc.value.body.get("code") == "model_not_found", exc.value.body


def test_tool_without_parameters_gets_json_arguments(client: OpenAI) -> None:
    tool = {"type": "function", "name": "ping", "description": "Pings the service"}
    resp = client.responses.create(model=MODEL, input="ping it", tools=[tool], tool_choice="required")
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1, resp.output
    assert isinstance(json.loads(calls[0].arguments), dict), calls[0].arguments


def test_tool_call_cut_by_max_output_tokens(client: OpenAI) -> None:
    resp = client.responses.create(
        model=MODEL, input="weather?", tools=[WEATHER_TOOL], tool_choice="required", max_output_tokens=4
    )
    assert resp.status == "incomplete"
    assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
    assert "tool_call" not in resp.output_text
    assert all(item.type == "function_call" for item in resp.output), resp.output


def test_retrieve_stream_replays_the_response(client: OpenAI) -> None:
    resp = client.responses.create(model=MODEL, input="Say hello")
    events = list(client.responses.retrieve(resp.id, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert events[-1].response.output_text == resp.output_text
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == resp.output_text


def test_image_input_is_refused_with_its_param(client: OpenAI) -> None:
    content = [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"},
    ]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": content}])
    body = exc.value.body
    assert isinstance(body, dict) and body.get("param") == "input[0].content[1]", body
    assert "not supported" in str(body.get("message")), body


def test_compact_answers_an_error_object(client: OpenAI) -> None:
    # The served models do not summarize: compaction is refused, not faked (input_tokens is
    # implemented: see test_endpoints.py).
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.compact(model=MODEL, input="hi")
    assert exc.value.status_code == 501
    assert isinstance(exc.value.body, dict) and exc.value.body.get("code") == "unsupported_endpoint", exc.value.body
    assert exc.value.response.headers.get("x-should-retry") == "false"
