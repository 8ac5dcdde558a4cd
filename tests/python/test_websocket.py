"""WebSocket mode through `client.responses.connect()` (protocol §1.3–§3, §6)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.lib.responses_websocket import ResponsesWebSocketLimits, ResponsesWebSocketSession

from helpers import (
    CLOCK_TOOL,
    MODEL,
    RECV_TIMEOUT_S,
    RESPONSE_TIMEOUT_S,
    WEATHER_TOOL,
    WsConn,
    as_dict,
    check_arguments,
    check_response_events,
    function_calls,
    output_text,
)

UNKNOWN_ID = "resp_00000000000000000000000000000000"


def test_ws_simple_turn(ws: WsConn) -> None:
    resp = ws.turn(input="Say hello")
    assert output_text(resp).strip()
    assert resp["previous_response_id"] is None
    assert resp["usage"]["output_tokens"] > 0


def test_ws_accepts_fields_the_official_examples_send(client: OpenAI) -> None:
    """The examples send `stream: true`, `previous_response_id: null` and an OpenAI-Beta header (§2.1, §1.3)."""
    with client.responses.connect(extra_headers={"OpenAI-Beta": "responses_websockets=2026-02-06"}) as c:
        ws = WsConn(c)
        resp = ws.turn(input="Say hello", stream=True, previous_response_id=None, store=True)
        assert output_text(resp).strip()


def test_ws_tool_loop(ws: WsConn) -> None:
    """The guide's tool loop: 3 sim tool calls, one per turn, then a final message."""
    n_calls = 3
    parent: str | None = None
    call_ids: set[str] = set()
    responses: list[dict[str, Any]] = []
    pending_input: Any = "Plan a trip: check the weather in three cities."
    for turn in range(n_calls + 1):
        ws.create(
            input=pending_input,
            previous_response_id=parent,
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            metadata={"tether_sim_tool_calls": str(n_calls)},
        )
        events = ws.read_response()
        assert events[-1].type == "response.completed", f"turn {turn}: {as_dict(events[-1])}"
        resp = check_response_events(events)
        responses.append(resp)
        assert resp["previous_response_id"] == parent, f"turn {turn}: previous_response_id not echoed"
        # The guide's loop reads calls from output_item.done; they must match the terminal output.
        done_calls = [
            as_dict(e)["item"]
            for e in events
            if e.type == "response.output_item.done" and e.item.type == "function_call"
        ]
        calls = function_calls(resp)
        assert done_calls == calls
        if turn > 0:
            cached = resp["usage"]["input_tokens_details"]["cached_tokens"]
            assert cached > 0, f"turn {turn}: no cached_tokens reported on a continuation"
            assert cached <= resp["usage"]["input_tokens"]
        if turn < n_calls:
            assert len(calls) == 1, f"turn {turn}: expected one function_call, got {resp['output']}"
            call = calls[0]
            assert call["name"] == WEATHER_TOOL["name"]
            assert call["call_id"] and call["call_id"] not in call_ids, "call_id missing or reused"
            call_ids.add(call["call_id"])
            args = check_arguments(call["arguments"], WEATHER_TOOL)
            pending_input = [
                {
                    "type": "function_call_output",
                    "call_id": call["call_id"],
                    "output": json.dumps({"city": args["city"], "forecast": "sunny", "celsius": 21}),
                }
            ]
        else:
            assert not calls, f"expected a final message after {n_calls} calls, got {resp['output']}"
            assert output_text(resp).strip(), "final answer has no text"
        parent = resp["id"]
    assert len({r["id"] for r in responses}) == n_calls + 1, "response ids must be distinct"


def test_forced_tool_ws(ws: WsConn) -> None:
    resp = ws.turn(
        input="What time is it in Tokyo?",
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "name": "get_time"},
    )
    calls = function_calls(resp)
    assert calls, f"forced tool_choice produced no function_call: {resp['output']}"
    for call in calls:
        assert call["name"] == "get_time"
        check_arguments(call["arguments"], CLOCK_TOOL)
    # The guide's loop then answers with tool_choice="none": text, no call.
    after = ws.turn(
        previous_response_id=resp["id"],
        input=[{"type": "function_call_output", "call_id": c["call_id"], "output": "12:00"} for c in calls],
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice="none",
        metadata={"tether_sim_tool_calls": "3"},
    )
    assert not function_calls(after), "tool_choice='none' must not call a tool"
    assert output_text(after).strip()


def test_warmup_generate_false(ws: WsConn) -> None:
    ws.create(generate=False, instructions="You are terse.", tools=[WEATHER_TOOL], input=[])
    events = ws.read_response()
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.completed"], [
        as_dict(e) for e in events
    ]
    warm = check_response_events(events)
    assert warm["output"] == []
    assert warm["usage"]["output_tokens"] == 0
    nxt = ws.turn(previous_response_id=warm["id"], input="Say hello", instructions="You are terse.")
    assert nxt["previous_response_id"] == warm["id"]
    assert output_text(nxt).strip()


def test_lanes_with_sdk_session(ws: WsConn) -> None:
    """Two named lanes on one connection through the SDK's lane helper (§6.4)."""
    limits = ResponsesWebSocketLimits(
        max_lanes=4, max_events_per_lane=4096, max_events=8192, max_bytes_per_lane=1 << 24, max_bytes=1 << 25
    )
    lane_ids = ["alpha", "beta.2-x_y"]
    with ResponsesWebSocketSession(ws.conn, limits=limits) as session:
        lanes = {sid: session.lane(sid) for sid in lane_ids}

        def run_all(previous: dict[str, str | None]) -> dict[str, dict[str, Any]]:
            for sid, lane in lanes.items():  # both in flight before reading either
                lane.send(
                    {
                        "type": "response.create",
                        "model": MODEL,
                        "input": f"Say hello from lane {sid}",
                        "previous_response_id": previous[sid],
                    }
                )
            finals = {}
            for sid, lane in lanes.items():
                events = []
                while not events or events[-1].type not in {"response.completed", "response.failed", "error"}:
                    events.append(lane.recv(timeout=RESPONSE_TIMEOUT_S))
                finals[sid] = check_response_events(events, stream_id=sid)
                assert lane.get_final_response(timeout=RECV_TIMEOUT_S).id == finals[sid]["id"]
            return finals

        first = run_all({sid: None for sid in lane_ids})
        assert first["alpha"]["id"] != first["beta.2-x_y"]["id"]
        # Continue each lane from its own previous response.
        second = run_all({sid: first[sid]["id"] for sid in lane_ids})
        for sid in lane_ids:
            assert second[sid]["previous_response_id"] == first[sid]["id"]
        # Nothing leaked onto the default lane (events without, or with a foreign, stream_id).
        try:
            stray = session.default.recv(timeout=0)
        except TimeoutError:
            pass
        else:
            pytest.fail(f"unexpected event on the default lane: {as_dict(stray)}")


def test_lanes_interleaved_raw(ws: WsConn) -> None:
    """The same with plain `connection.response.create(stream_id=...)` and one reader."""
    ws.create(input="First lane, please.", stream_id="one")
    ws.create(input="Second lane, please.", stream_id="two")
    per_lane: dict[str, list[Any]] = {"one": [], "two": []}
    done: set[str] = set()
    while done != {"one", "two"}:
        event = ws.recv()
        sid = as_dict(event).get("stream_id")
        assert sid in per_lane, f"event without a known stream_id: {as_dict(event)}"
        per_lane[sid].append(event)
        if event.type in {"response.completed", "response.failed", "response.incomplete", "error"}:
            done.add(sid)
    for sid, events in per_lane.items():
        check_response_events(events, stream_id=sid)


def test_previous_response_not_found_ws(ws: WsConn) -> None:
    ws.create(input="hi", previous_response_id=UNKNOWN_ID)
    err = ws.expect_error("previous_response_not_found")
    assert err["error"].get("param") == "previous_response_id", err
    assert err.get("stream_id") is None, f"default-lane error must not carry stream_id: {err}"
    # On a named lane the error echoes the lane.
    ws.create(input="hi", previous_response_id=UNKNOWN_ID, stream_id="lane-7")
    err = ws.expect_error("previous_response_not_found")
    assert err.get("stream_id") == "lane-7", f"named-lane error must echo stream_id: {err}"
    # The connection still works.
    assert output_text(ws.turn(input="Say hello")).strip()


def test_store_false_not_continuable_elsewhere(client: OpenAI, ws: WsConn) -> None:
    a = ws.turn(input="Remember the number 7.", store=False)
    # Same connection: the connection-local cache serves it.
    b = ws.turn(input="Which number?", previous_response_id=a["id"], store=False)
    assert b["previous_response_id"] == a["id"]
    # Over HTTP, not the same connection: not found, and not retrievable.
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input="And now?", previous_response_id=b["id"])
    assert exc.value.code == "previous_response_not_found", exc.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(b["id"])
    # From another WebSocket connection: not found either.
    with client.responses.connect() as other:
        other_ws = WsConn(other)
        other_ws.create(input="And now?", previous_response_id=b["id"])
        other_ws.expect_error("previous_response_not_found")


def test_store_true_continuable_from_new_connection(client: OpenAI) -> None:
    with client.responses.connect() as c1:
        a = WsConn(c1).turn(input="Remember the number 7.")
    with client.responses.connect() as c2:
        b = WsConn(c2).turn(input="Which number?", previous_response_id=a["id"])
    assert b["previous_response_id"] == a["id"]
    assert client.responses.retrieve(a["id"]).id == a["id"]


@pytest.mark.parametrize(
    ("frame", "codes", "param"),
    [
        ("not json", {"invalid_json"}, None),
        ("[1, 2, 3]", {"invalid_json", "invalid_event_type"}, None),
        ('"response.create"', {"invalid_json", "invalid_event_type"}, None),
        ('{"type": "bogus"}', {"invalid_event_type"}, "type"),
        ('{"model": "tether-sim", "input": "no type"}', {"invalid_event_type"}, "type"),
    ],
    ids=["not-json", "json-array", "json-string", "bogus-type", "missing-type"],
)
def test_malformed_frames(ws: WsConn, frame: str, codes: set[str], param: str | None) -> None:
    ws.send_raw(frame)
    event = as_dict(ws.recv())
    assert event.get("type") == "error", f"expected an error event, got {event}"
    assert event.get("status") == 400, event
    err = event.get("error") or {}
    assert err.get("code") in codes, f"error.code {err.get('code')!r} not in {codes}: {event}"
    assert err.get("type") == "invalid_request_error", event
    assert err.get("message"), event
    assert "stream_id" not in event, event
    if param == "type":
        assert err.get("param") == "type", event
    # Exactly one error per bad frame, and the connection stays usable.
    assert output_text(ws.turn(input="Say hello")).strip()


def test_bad_frames_in_a_row_keep_connection(ws: WsConn) -> None:
    for frame in ("not json", "[]", '{"type":"bogus"}'):
        ws.send_raw(frame)
    for _ in range(3):
        event = as_dict(ws.recv())
        assert event.get("type") == "error" and event.get("status") == 400, event
    assert output_text(ws.turn(input="Say hello")).strip()


@pytest.mark.parametrize(
    "stream_id",
    ["", "bad id", "bad/slash", "\u00fcnicode", "x" * 257, 123],
    ids=["empty", "space", "slash", "non-ascii", "too-long", "number"],
)
def test_invalid_stream_id(ws: WsConn, stream_id: Any) -> None:
    # Sent raw so that the SDK's lane helper (which validates ids itself) is out of the way.
    ws.send_raw(json.dumps({"type": "response.create", "model": MODEL, "input": "hi", "stream_id": stream_id}))
    err = ws.expect_error("invalid_stream_id")
    assert err["error"].get("param") == "stream_id", err
    assert err.get("stream_id") is None, f"an invalid id must not be echoed: {err}"
    assert output_text(ws.turn(input="Say hello")).strip()


def test_invalid_stream_id_via_sdk_create(ws: WsConn) -> None:
    """`connection.response.create(stream_id="")` goes out unchanged and is rejected."""
    ws.create(input="hi", stream_id="")
    ws.expect_error("invalid_stream_id")
    assert output_text(ws.turn(input="Say hello")).strip()


def test_longest_valid_stream_id(ws: WsConn) -> None:
    sid = "A-z_0.9" * 36 + "abcd"  # 256 characters
    assert len(sid) == 256
    assert output_text(ws.turn(input="Say hello", stream_id=sid)).strip()


def test_lane_fifo_same_lane(ws: WsConn) -> None:
    """Two creates on one lane run FIFO without overlap (§6.4)."""
    ws.create(input="First.", stream_id="fifo")
    ws.create(input="Second.", stream_id="fifo")
    first = ws.read_response()
    second = ws.read_response()
    check_response_events(first, stream_id="fifo")
    check_response_events(second, stream_id="fifo")
