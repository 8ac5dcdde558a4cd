"""`tether dev --links memory` (the default: the nodes call each other's gRPC services inside the
process) and `--links tcp` (loopback gRPC, as separate processes talk) serve the same responses.

The same agent loop (a tool call, the tool's output back over WebSocket with
`previous_response_id`, then the stored chain continued over HTTP by a new client) runs against
both; the sim's output depends only on the prompt, so texts, calls, arguments and usage must be
equal. Each response is also read back (`GET /v1/responses/{id}`): the state stored through
either kind of link is the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from conftest import Server, _stop, start_dev
from helpers import MODEL, WEATHER_TOOL, WsConn, as_dict, function_calls, output_text


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[Server]:
    server = start_dev("--links", "tcp")
    try:
        yield server
    finally:
        _stop(server)


def _shape(response: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on the links: the output and usage, not ids or times."""
    return {
        "status": response["status"],
        "text": output_text(response),
        "calls": [(c["name"], json.loads(c["arguments"])) for c in function_calls(response)],
        "usage": {k: response["usage"][k] for k in ("input_tokens", "output_tokens", "total_tokens")},
    }


def _agent_loop(base_url: str) -> list[dict[str, Any]]:
    shapes = []
    with OpenAI(base_url=f"{base_url}/v1", api_key="sk-local", max_retries=0, timeout=30.0) as client:
        with client.responses.connect() as connection:
            ws = WsConn(connection)
            first = ws.turn(
                input="What is the weather in Lisbon for the next 3 days?",
                tools=[WEATHER_TOOL],
                tool_choice="required",
            )
            calls = function_calls(first)
            assert calls, f"the sim was asked for a call: {first['output']}"
            second = ws.turn(
                previous_response_id=first["id"],
                input=[{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": '{"temp_c": 21}'}],
                tools=[WEATHER_TOOL],
            )
            shapes += [_shape(first), _shape(second)]
        # A new client continues the stored chain over HTTP.
        third = as_dict(client.responses.create(model=MODEL, previous_response_id=second["id"], input="Thanks."))
        shapes.append(_shape(third))
        for response in (first, second, third):
            stored = as_dict(client.responses.retrieve(response["id"]))
            assert _shape(stored) == _shape(response), "the stored response is the one sent"
    return shapes


def test_memory_and_tcp_links_serve_the_same_agent_loop(tether: Server, tcp_server: Server) -> None:
    memory = _agent_loop(tether.url)
    tcp = _agent_loop(tcp_server.url)
    assert memory == tcp
    assert memory[0]["calls"] and memory[1]["text"] and memory[2]["text"]
    assert memory[1]["usage"]["input_tokens"] > memory[0]["usage"]["input_tokens"], "the chain grew"
