"""An OpenAI Agents SDK agent against tether, over WebSocket mode, with a typed tool and a typed
final output.

Run `tether dev` first, then: pip install openai-agents==0.24.0 && python examples/agents_sdk.py
"""
import asyncio

from agents import Agent, RunConfig, Runner, function_tool, set_tracing_disabled
from agents.models.openai_provider import OpenAIProvider
from openai import AsyncOpenAI
from pydantic import BaseModel

set_tracing_disabled(True)  # nothing is sent anywhere but tether


class TestRun(BaseModel):
    path: str
    failed: int


@function_tool
def run_tests(path: str) -> str:
    """Runs the project's tests under a path."""
    return '{"failed": 0}'


class Verdict(BaseModel):
    summary: str
    runs: list[TestRun]


async def main() -> None:
    client = AsyncOpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-local")
    provider = OpenAIProvider(openai_client=client, use_responses=True, use_responses_websocket=True)
    agent = Agent(name="ci-doctor", instructions="Find out why the build is red.", model="tether-sim",
                  tools=[run_tests], output_type=Verdict)
    result = await Runner.run(agent, "The build is red.", run_config=RunConfig(model_provider=provider))
    print(result.final_output)           # a validated Verdict
    follow_up = await Runner.run(agent, "And now?", run_config=RunConfig(model_provider=provider),
                                 previous_response_id=result.last_response_id)  # only the new turn is sent
    print(follow_up.final_output)
    await provider.aclose()


asyncio.run(main())
