"""Shared helpers: bounded WebSocket receives and the event-sequence checker (protocol §3)."""

from __future__ import annotations

import json
import time
from typing import Any

from openai.resources.responses.responses import ResponsesConnection

MODEL = "tether-sim"
RECV_TIMEOUT_S = 15.0  # one event
RESPONSE_TIMEOUT_S = 45.0  # one whole response
TERMINAL_TYPES = {"response.completed", "response.failed", "response.incomplete"}

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city, with a forecast of some days.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer", "description": "Forecast days"},
            "metric": {"type": "boolean"},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}

CLOCK_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_time",
    "description": "Current time in a time zone.",
    "parameters": {
        "type": "object",
        "properties": {"tz": {"type": "string"}},
        "required": ["tz"],
        "additionalProperties": False,
    },
}

_JSON_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def as_dict(obj: Any) -> dict[str, Any]:
    """A parsed SDK model (or dict) as the dict of the fields the server actually sent."""
    if isinstance(obj, dict):
        return obj
    return obj.to_dict(exclude_unset=True)


def check_arguments(arguments: Any, tool: dict[str, Any]) -> dict[str, Any]:
    """`arguments` is a JSON *string* whose object has the schema's required props with the right types."""
    assert isinstance(arguments, str), f"function_call.arguments must be a JSON string, got {type(arguments)}"
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"function_call.arguments is not JSON: {arguments!r}") from exc
    assert isinstance(args, dict), f"arguments must encode an object: {arguments!r}"
    schema = tool["parameters"]
    for name in schema.get("required", []):
        assert name in args, f"required argument {name!r} missing from {arguments!r}"
    for name, value in args.items():
        prop = schema["properties"].get(name)
        if prop is None:
            assert schema.get("additionalProperties", True) is not False, f"unexpected argument {name!r}"
            continue
        check = _JSON_TYPES[prop["type"]]
        assert check(value), f"argument {name!r}={value!r} is not of type {prop['type']}"
    return args


def check_response_events(
    events: list[Any], *, stream_id: str | None = None, terminal: str = "response.completed"
) -> dict[str, Any]:
    """Check one response's events against protocol §3.1–3.3; return the terminal Response as a dict.

    Events may be SDK models (SSE or WS) or dicts. `stream_id=None` means the field must be absent.
    """
    evs = [as_dict(e) for e in events]
    types = [e.get("type") for e in evs]
    assert evs, "no events"
    assert types[0] == "response.created", f"first event must be response.created: {types}"
    assert len(types) >= 3 and types[1] == "response.in_progress", f"second must be response.in_progress: {types}"
    assert types[-1] == terminal, f"last event must be {terminal}: {types}"
    assert sum(t in TERMINAL_TYPES for t in types) == 1, f"exactly one terminal event: {types}"
    assert "error" not in types, f"error event inside a response stream: {evs}"
    seqs = [e.get("sequence_number") for e in evs]
    assert seqs == list(range(len(evs))), f"sequence_number must run 0..{len(evs) - 1}: {seqs}"
    for e in evs:
        if stream_id is None:
            assert "stream_id" not in e or e["stream_id"] is None, f"unexpected stream_id: {e}"
        else:
            assert e.get("stream_id") == stream_id, f"event does not echo stream_id {stream_id!r}: {e}"

    created, in_progress, final = evs[0]["response"], evs[1]["response"], evs[-1].get("response")
    assert final is not None, "terminal event must carry response"
    rid = created.get("id")
    assert isinstance(rid, str) and rid.startswith("resp_"), f"bad response id {rid!r}"
    for snap in (created, in_progress):
        assert snap.get("id") == rid, "lifecycle response id changed"
        assert snap.get("status") == "in_progress", f"lifecycle status {snap.get('status')!r}"
        assert snap.get("output") == [], f"created/in_progress output must be []: {snap.get('output')!r}"
        assert snap.get("usage") is None, "usage must be null before the terminal event"
        assert snap.get("object") == "response"
    assert final.get("id") == rid, "terminal response id differs from response.created"
    assert final.get("object") == "response"
    assert isinstance(final.get("output"), list), "terminal output must be a list"

    # Per-item state machine (§3.2 message, §3.3 function call).
    items: dict[int, dict[str, Any]] = {}  # output_index -> item state
    done_items: dict[int, dict[str, Any]] = {}
    for e in evs[2:-1]:
        t = e["type"]
        idx = e.get("output_index")
        if t == "response.output_item.added":
            assert isinstance(idx, int) and idx >= 0 and idx not in items, f"bad output_index in {e}"
            item = e["item"]
            assert item.get("status") == "in_progress", f"added item must be in_progress: {item}"
            if item["type"] == "message":
                assert item.get("content") == [], f"added message content must be []: {item}"
                assert item.get("role") == "assistant"
            elif item["type"] == "function_call":
                assert item.get("arguments") == "", f"added function_call arguments must be '': {item}"
                assert item.get("name") and item.get("call_id"), f"function_call needs name and call_id: {item}"
            items[idx] = {"item": item, "parts": {}, "args": "", "args_done": False}
            continue
        assert idx in items, f"{t} before output_item.added for index {idx}"
        st = items[idx]
        assert idx not in done_items, f"{t} after output_item.done for index {idx}"
        if "item_id" in e and st["item"].get("id") is not None:
            assert e["item_id"] == st["item"]["id"], f"item_id mismatch in {e}"
        if t == "response.content_part.added":
            ci = e["content_index"]
            assert ci not in st["parts"], f"content part {ci} added twice"
            assert e["part"].get("type") == "output_text" and e["part"].get("text") == "", f"bad part {e['part']}"
            st["parts"][ci] = {"text": "", "text_done": False, "part_done": False}
        elif t == "response.output_text.delta":
            part = st["parts"].get(e["content_index"])
            assert part is not None, "output_text.delta before content_part.added"
            assert not part["text_done"], "output_text.delta after output_text.done"
            assert isinstance(e.get("delta"), str)
            part["text"] += e["delta"]
        elif t == "response.output_text.done":
            part = st["parts"][e["content_index"]]
            assert e.get("text") == part["text"], f"output_text.done text {e.get('text')!r} != deltas {part['text']!r}"
            part["text_done"] = True
        elif t == "response.content_part.done":
            part = st["parts"][e["content_index"]]
            assert part["text_done"], "content_part.done before output_text.done"
            assert e["part"].get("text") == part["text"], "content_part.done text differs"
            part["part_done"] = True
        elif t == "response.function_call_arguments.delta":
            assert st["item"]["type"] == "function_call" and not st["args_done"]
            st["args"] += e["delta"]
        elif t == "response.function_call_arguments.done":
            assert e.get("arguments") == st["args"], "function_call_arguments.done differs from the deltas"
            st["args_done"] = True
        elif t == "response.output_item.done":
            item = e["item"]
            assert item.get("status") == "completed", f"done item must be completed: {item}"
            assert item.get("type") == st["item"]["type"] and item.get("id") == st["item"].get("id")
            if item["type"] == "message":
                assert all(p["part_done"] for p in st["parts"].values()), "item done before its parts"
                texts = [c.get("text") for c in item.get("content", [])]
                assert texts == [st["parts"][i]["text"] for i in sorted(st["parts"])], "item text != deltas"
            elif item["type"] == "function_call":
                assert st["args_done"], "function_call item done before arguments.done"
                assert item.get("arguments") == st["args"]
                assert item.get("call_id") == st["item"].get("call_id") and item.get("name") == st["item"]["name"]
            done_items[idx] = item
        else:
            raise AssertionError(f"unexpected event type {t!r} in a response stream")
    assert set(done_items) == set(items), f"items added but never done: {set(items) - set(done_items)}"
    if terminal == "response.completed":
        assert final.get("status") == "completed", f"terminal status {final.get('status')!r}"
        usage = final.get("usage")
        assert usage is not None, "completed response must carry usage"
        assert [done_items[i] for i in sorted(done_items)] == final["output"], (
            "terminal output must equal the output_item.done items in index order"
        )
    return final


class WsConn:
    """A `client.responses.connect()` connection with bounded receives.

    The SDK's `recv()` has no timeout; this reads from the same underlying `websockets`
    connection the SDK's `recv_bytes()` uses (`connection._connection`), with a timeout, and
    parses with the SDK's own `parse_event()`.
    """

    def __init__(self, connection: ResponsesConnection) -> None:
        self.conn = connection

    def create(self, **params: Any) -> None:
        params.setdefault("model", MODEL)
        self.conn.response.create(**params)

    def send_raw(self, data: str) -> None:
        self.conn.send_raw(data)

    def recv(self, timeout: float = RECV_TIMEOUT_S) -> Any:
        try:
            data = self.conn._connection.recv(timeout=timeout, decode=False)
        except TimeoutError:
            raise AssertionError(f"no WebSocket event within {timeout}s") from None
        assert isinstance(json.loads(data), dict), f"server message is not one JSON object: {data[:200]!r}"
        return self.conn.parse_event(data)

    def read_response(self, timeout: float = RESPONSE_TIMEOUT_S) -> list[Any]:
        """Events up to and including the first terminal or `error` event."""
        deadline = time.monotonic() + timeout
        events: list[Any] = []
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no terminal event within {timeout}s; got {[e.type for e in events]}"
            event = self.recv(min(RECV_TIMEOUT_S, remaining))
            events.append(event)
            if event.type in TERMINAL_TYPES or event.type == "error":
                return events

    def turn(self, *, stream_id: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one create, read and check its events, return the completed Response dict."""
        if stream_id is not None:
            params["stream_id"] = stream_id
        self.create(**params)
        events = self.read_response()
        assert events[-1].type != "error", f"create failed: {as_dict(events[-1])}"
        return check_response_events(events, stream_id=stream_id)

    def expect_error(self, code: str, *, timeout: float = RECV_TIMEOUT_S) -> dict[str, Any]:
        """The next event is one nested WS `error` with this code and status 400."""
        event = as_dict(self.recv(timeout))
        assert event.get("type") == "error", f"expected an error event ({code}), got {event}"
        err = event.get("error")
        assert isinstance(err, dict), f"WS error must be nested under 'error': {event}"
        assert err.get("code") == code, f"error.code {err.get('code')!r} != {code!r}: {event}"
        assert event.get("status") == 400, f"error status must be 400: {event}"
        assert err.get("type") == "invalid_request_error", f"error.type: {event}"
        assert isinstance(err.get("message"), str) and err["message"], f"error.message: {event}"
        return event


def function_calls(response: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in response["output"] if i.get("type") == "function_call"]


def output_text(response: dict[str, Any]) -> str:
    return "".join(
        c.get("text", "")
        for i in response["output"]
        if i.get("type") == "message"
        for c in i.get("content", [])
        if c.get("type") == "output_text"
    )
