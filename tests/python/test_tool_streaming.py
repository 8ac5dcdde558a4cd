"""Streamed tool calls through the official SDK: a function call's arguments arrive in several
`response.function_call_arguments.delta` events as the model writes them (protocol §3.3),
over HTTP (`responses.stream`, `create(stream=True)`) and over `responses.connect()`."""

from __future__ import annotations

import json
from typing import Any

from openai import OpenAI

from helpers import MODEL, WsConn, as_dict, check_arguments, check_response_events, function_calls

# A strict tool with many properties: the SDK's own accumulator parses its arguments with
# `json.loads` at the end, and the call is long (about 100 tokens). The sim sends the tokens
# that are due together as one piece when it runs behind its clock (1,000 tokens a second in
# `tether dev`), so a short call on a loaded machine could come as one piece.
REPORT_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "file_report",
    "description": "Files a weather report.",
    "parameters": {
        "type": "object",
        "properties": {
            **{f"station_{n}": {"type": "string"} for n in range(10)},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
        },
        "required": [f"station_{n}" for n in range(10)] + ["days", "metric"],
        "additionalProperties": False,
    },
    "strict": True,
}
TURN: dict[str, Any] = {
    "model": MODEL,
    "input": "File the weather report for the stations.",
    "tools": [REPORT_TOOL],
    "tool_choice": "required",
}


def check_streamed_call(events: list[Any], *, raw: bool = True) -> str:
    """The call streamed in deltas whose concatenation is its final arguments.

    A client that keeps up gets one delta per decoded piece; deltas that are ready together
    while the client is behind are coalesced (a loaded machine can merge a whole short call into
    one), so several deltas are not required here: the worker's coalescing has its own test.

    `raw`: the events are the wire's (not the stream helper's, whose terminal Response
    carries parsed items), so the protocol checker runs on them too."""
    types = [event.type for event in events]
    deltas = [event for event in events if event.type == "response.function_call_arguments.delta"]
    assert deltas, f"the arguments stream in deltas: {types}"
    added = types.index("response.output_item.added")
    first = types.index("response.function_call_arguments.delta")
    done = types.index("response.function_call_arguments.done")
    assert added < first < done, types
    streamed = "".join(event.delta for event in deltas)
    if len(deltas) > 1:
        assert len(deltas[0].delta) < len(streamed), "the first delta came before the whole call"
    assert events[done].arguments == streamed
    [item_done] = [event.item for event in events if event.type == "response.output_item.done"]
    assert item_done.arguments == streamed and item_done.status == "completed"
    assert events[-1].type == "response.completed"
    [call] = [item for item in events[-1].response.output if item.type == "function_call"]
    assert call.arguments == streamed
    check_arguments(streamed, REPORT_TOOL)
    if raw:
        response = check_response_events(events)
        assert function_calls(response)[0]["arguments"] == streamed
    return streamed


def test_stream_helper_accumulates_streamed_arguments(client: OpenAI) -> None:
    with client.responses.stream(**TURN) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_streamed_call(events, raw=False)
    # The SDK's snapshot events carry the arguments accumulated so far, growing to the whole.
    snapshots = [event.snapshot for event in events if event.type == "response.function_call_arguments.delta"]
    assert all(a != b and b.startswith(a) for a, b in zip(snapshots, snapshots[1:])), snapshots
    [call] = [item for item in final.output if item.type == "function_call"]
    assert snapshots[-1] == call.arguments
    assert call.parsed_arguments == json.loads(call.arguments), "the strict tool's arguments parse"


def test_create_stream_delivers_argument_deltas(client: OpenAI) -> None:
    events = list(client.responses.create(**TURN, stream=True))
    check_streamed_call(events)


def test_websocket_delivers_argument_deltas(ws: WsConn) -> None:
    ws.create(**TURN)
    events = ws.read_response()
    assert events[-1].type == "response.completed", as_dict(events[-1])
    check_streamed_call(events)


def test_a_call_cut_mid_arguments_is_closed_incomplete(client: OpenAI) -> None:
    whole = client.responses.create(**TURN)
    assert whole.usage is not None
    with client.responses.stream(**TURN, max_output_tokens=whole.usage.output_tokens - 6) as stream:
        events = list(stream)
    # The SDK accepts the stream: every added item is done, and the terminal event is incomplete.
    assert events[-1].type == "response.incomplete", [event.type for event in events]
    response = events[-1].response
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    [call] = response.output
    assert call.type == "function_call" and call.status == "incomplete", call
    streamed = "".join(event.delta for event in events if event.type == "response.function_call_arguments.delta")
    assert streamed and call.arguments == streamed
    wire = json.dumps([as_dict(event) for event in events])
    assert "<tool_call" not in wire and "tool_call>" not in wire, "no markup leaks"
