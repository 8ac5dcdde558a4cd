"""The OpenAI Agents SDK (`openai-agents`, pinned in requirements.txt) against tether, unchanged,
over both of its Responses transports: HTTP (JSON and SSE) and WebSocket mode (issue 12).

Each test builds its own `OpenAIProvider` on an `AsyncOpenAI` client pointed at the server, so the
SDK's global defaults are never touched; tracing export is off (nothing may leave the machine).
The sim model calls a tool once under `tool_choice="auto"` and then answers, so an agent with a
tool runs a real tool loop: model call, local tool, the tool's output back, final answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest
from agents import (
    Agent,
    ModelSettings,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from helpers import MODEL

set_tracing_disabled(True)

TRANSPORTS = ["http", "websocket"]
RUN_TIMEOUT_S = 60.0  # one whole agent run


async def _run_with(base_url: str, transport: str, body: Any) -> Any:
    """Runs `body(run_config)` with a provider for `transport`, then closes its connections."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)
    provider = OpenAIProvider(
        openai_client=client, use_responses=True, use_responses_websocket=transport == "websocket"
    )
    try:
        return await asyncio.wait_for(
            body(RunConfig(model_provider=provider, tracing_disabled=True)), RUN_TIMEOUT_S
        )
    finally:
        await provider.aclose()
        await client.close()


def run(base_url: str, transport: str, body: Any) -> Any:
    return asyncio.run(_run_with(base_url, transport, body))


def tool_calls(result: Any) -> list[Any]:
    """The function calls the model made during a run, as raw Responses items."""
    return [item.raw_item for item in result.new_items if item.type == "tool_call_item"]


def tool_outputs(result: Any) -> list[str]:
    return [str(item.output) for item in result.new_items if item.type == "tool_call_output_item"]


# --- tools the agents use ----------------------------------------------------------------------


@function_tool
def get_weather(city: str, days: int) -> str:
    """Returns the forecast for a city.

    Args:
        city: The city.
        days: How many days of forecast.
    """
    return f"sunny in {city} for {days} days"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str = Field(min_length=5, max_length=10)


class Parcel(BaseModel):
    weight_kg: float = Field(gt=0, le=30)
    fragile: bool
    to: Address
    tags: list[str]
    speed: Literal["standard", "express"]
    note: str | None = None


SHIPPED: list[Parcel] = []


@function_tool
def ship_parcel(parcel: Parcel) -> str:
    """Ships a parcel to an address.

    Args:
        parcel: What to ship and where.
    """
    SHIPPED.append(parcel)
    return f"shipped to {parcel.to.city}"


class Forecast(BaseModel):
    city: str
    days: int = Field(ge=1, le=14)
    summary: str
    risk: Literal["low", "medium", "high"]
    temperatures: list[float]


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_runner_run_with_a_tool_loop(base_url: str, transport: str) -> None:
    agent = Agent(name="weather", instructions="Answer weather questions.", model=MODEL, tools=[get_weather])

    async def body(config: RunConfig) -> Any:
        return await Runner.run(agent, "Weather in Paris for 3 days?", run_config=config)

    result = run(base_url, transport, body)
    calls = tool_calls(result)
    assert len(calls) == 1 and calls[0].name == "get_weather", result.new_items
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int), arguments
    assert tool_outputs(result) == [f"sunny in {arguments['city']} for {arguments['days']} days"]
    assert isinstance(result.final_output, str) and result.final_output.strip(), result.final_output
    assert result.last_response_id and result.last_response_id.startswith("resp_")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tool_taking_a_nested_pydantic_model_runs(base_url: str, transport: str) -> None:
    # The SDK sends this tool's schema with `$defs`/`$ref`, `anyOf` with null, an enum, bounds and
    # string lengths, in strict mode; the tool runs only if the arguments validate.
    SHIPPED.clear()
    agent = Agent(name="shipping", instructions="Ship parcels.", model=MODEL, tools=[ship_parcel])

    async def body(config: RunConfig) -> Any:
        return await Runner.run(agent, "Ship my books to Lyon.", run_config=config)

    result = run(base_url, transport, body)
    assert len(tool_calls(result)) == 1, result.new_items
    assert len(SHIPPED) == 1, tool_outputs(result)  # a validation failure reports an error instead
    parcel = SHIPPED[0]
    assert 0 < parcel.weight_kg <= 30 and 5 <= len(parcel.to.zip_code) <= 10, parcel
    assert tool_outputs(result) == [f"shipped to {parcel.to.city}"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_output_type_gives_a_validated_model(base_url: str, transport: str) -> None:
    agent = Agent(name="forecaster", instructions="Forecast.", model=MODEL, output_type=Forecast)

    async def body(config: RunConfig) -> Any:
        return await Runner.run(agent, "Forecast for Oslo", run_config=config)

    result = run(base_url, transport, body)
    forecast = result.final_output
    assert isinstance(forecast, Forecast), forecast
    assert 1 <= forecast.days <= 14 and forecast.risk in ("low", "medium", "high")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_output_type_after_a_tool_loop(base_url: str, transport: str) -> None:
    agent = Agent(
        name="weather-report", instructions="Report.", model=MODEL, tools=[get_weather], output_type=Forecast
    )

    async def body(config: RunConfig) -> Any:
        return await Runner.run(agent, "Weather in Rome for 2 days?", run_config=config)

    result = run(base_url, transport, body)
    assert [call.name for call in tool_calls(result)] == ["get_weather"]
    assert isinstance(result.final_output, Forecast), result.final_output


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_run_streamed_delivers_events_and_the_final_output(base_url: str, transport: str) -> None:
    agent = Agent(name="weather", instructions="Answer weather questions.", model=MODEL, tools=[get_weather])

    async def body(config: RunConfig) -> tuple[Any, list[str], str]:
        result = Runner.run_streamed(agent, "Weather in Madrid for 5 days?", run_config=config)
        kinds: list[str] = []
        text = ""
        async for event in result.stream_events():
            kinds.append(event.type)
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
                text += event.data.delta
        return result, kinds, text

    result, kinds, text = run(base_url, transport, body)
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds, set(kinds)
    assert result.is_complete
    assert len(tool_calls(result)) == 1
    assert isinstance(result.final_output, str) and result.final_output == text, (result.final_output, text)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_continuation_with_previous_response_id(base_url: str, transport: str) -> None:
    agent = Agent(name="chat", instructions="Chat.", model=MODEL)

    async def body(config: RunConfig) -> tuple[Any, Any]:
        first = await Runner.run(agent, "My name is Ada.", run_config=config)
        second = await Runner.run(
            agent, "What is my name?", run_config=config, previous_response_id=first.last_response_id
        )
        return first, second

    first, second = run(base_url, transport, body)
    assert second.last_response_id != first.last_response_id
    assert isinstance(second.final_output, str) and second.final_output.strip()
    # The second turn sent only its new item; the server resolved the rest from the chain, so its
    # input usage counts the first turn's tokens too.
    assert second.context_wrapper.usage.input_tokens > first.context_wrapper.usage.input_tokens


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_eight_concurrent_agents(base_url: str, transport: str) -> None:
    agent = Agent(
        name="weather",
        instructions="Answer weather questions.",
        model=MODEL,
        tools=[get_weather],
        model_settings=ModelSettings(metadata={"tether_sim_tool_calls": "2"}),
    )

    async def body(config: RunConfig) -> list[Any]:
        cities = ["Paris", "Lyon", "Oslo", "Rome", "Kyiv", "Lima", "Pune", "Nice"]
        return list(
            await asyncio.gather(*(Runner.run(agent, f"Weather in {c}?", run_config=config) for c in cities))
        )

    results = run(base_url, transport, body)
    assert len(results) == 8
    for result in results:
        assert len(tool_calls(result)) == 2, result.new_items
        assert isinstance(result.final_output, str) and result.final_output.strip()
    assert len({result.last_response_id for result in results}) == 8
