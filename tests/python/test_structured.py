"""Structured outputs and Pydantic tool arguments through the official SDK.

`client.responses.parse(text_format=Model)` (HTTP, and streamed with `client.responses.stream`)
sends the model's strict JSON schema as `text.format`; the sim engine answers with JSON that
validates, so the SDK's own parsing returns a model instance. Over WebSocket
(`client.responses.connect()`) the same `text.format` gets the same answer. A function tool
whose parameters are a nested model (`openai.pydantic_function_tool`'s strict schema, with
`$defs`/`$ref`) gets arguments that `Model.model_validate_json` accepts.
"""

from __future__ import annotations

import datetime
import enum
from typing import Literal, Optional

import openai
import pytest
from openai import OpenAI
from openai.lib._parsing._responses import type_to_text_format_param
from pydantic import BaseModel, Field

from helpers import MODEL, WsConn, as_dict, function_calls, output_text


class Color(str, enum.Enum):
    red = "red"
    green = "green"


class Address(BaseModel):
    street: str
    city: str
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(min_length=2, max_length=40)
    age: int = Field(ge=0, le=130)
    favourite: Color
    status: Literal["active", "retired"]
    address: Address
    previous: list[Address]
    nickname: Optional[str]
    born: datetime.date


class Step(BaseModel):
    explanation: str
    output: str


class MathReasoning(BaseModel):
    steps: list[Step]
    final_answer: str


def test_parse_returns_a_model(client: OpenAI) -> None:
    for prompt in ["Describe a person", "Another person, please", "A third"]:
        resp = client.responses.parse(model=MODEL, input=prompt, text_format=Person)
        assert resp.status == "completed"
        assert isinstance(resp.output_parsed, Person), resp.output_text
        assert Person.model_validate_json(resp.output_text) == resp.output_parsed
        assert resp.text.format.type == "json_schema"


def test_stream_with_text_format_parses(client: OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Solve 8x + 7 = -23", text_format=MathReasoning) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1, "the JSON answer streams token by token"
    assert isinstance(final.output_parsed, MathReasoning)
    assert "".join(deltas) == final.output_text


def test_websocket_text_format_answers_with_valid_json(client: OpenAI) -> None:
    with client.responses.connect() as connection:
        ws = WsConn(connection)
        resp = ws.turn(input="Describe a person", text={"format": type_to_text_format_param(Person)})
        Person.model_validate_json(output_text(resp))
        follow = ws.turn(
            input="And the maths", previous_response_id=resp["id"],
            text={"format": type_to_text_format_param(MathReasoning)},
        )
        MathReasoning.model_validate_json(output_text(follow))


def test_a_nested_model_tool_gets_valid_arguments(client: OpenAI) -> None:
    tool = openai.pydantic_function_tool(Person, name="save_person")
    responses_tool = {"type": "function", **tool["function"]}
    assert "$defs" in responses_tool["parameters"], "the nested model is referenced through $defs"
    for prompt in ["Save someone", "Save another"]:
        resp = client.responses.create(model=MODEL, input=prompt, tools=[responses_tool], tool_choice="required")
        calls = function_calls(as_dict(resp))
        assert len(calls) == 1
        Person.model_validate_json(calls[0]["arguments"])


def test_parse_with_a_pydantic_tool_parses_its_arguments(client: OpenAI) -> None:
    tool = openai.pydantic_responses_function_tool(Person, name="save_person")
    resp = client.responses.parse(model=MODEL, input="Save someone", tools=[tool], tool_choice="required")
    call = next(item for item in resp.output if item.type == "function_call")
    assert isinstance(call.parsed_arguments, Person)


def test_a_malformed_text_format_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=MODEL, input="hi", text={"format": {"type": "json_schema", "schema": {"type": "object"}}},  # type: ignore[typeddict-item]
        )
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "text.format.name"  # type: ignore[index]


def test_an_agents_sdk_agent_with_output_type_gets_its_model(base_url: str) -> None:
    """An Agents SDK agent with `output_type=` sends `text.format` json_schema and parses the answer."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    openai_client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=openai_client)
    agent = agents.Agent(name="solver", instructions="Solve it step by step.", model=model, output_type=MathReasoning)
    result = agents.Runner.run_sync(agent, "Solve 8x + 7 = -23")
    assert isinstance(result.final_output, MathReasoning)
