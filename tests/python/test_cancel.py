"""`client.responses.cancel(id)` on a response in flight (tether's extension: every response
can be cancelled while it runs; see docs/responses-protocol.md).

The streamed response is a long sim answer (30,000 tokens at the dev server's 1,000 tokens
per second: half a minute), cancelled as soon as its first delta arrives, so it is always
still in flight when the cancel lands.
"""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from helpers import MODEL, WsConn, as_dict

LONG = {"tether_sim_output_tokens": "30000"}


def test_cancel_ends_an_sse_stream_cleanly(client: OpenAI) -> None:
    stream = client.responses.create(model=MODEL, input="tell me everything", metadata=LONG, stream=True)
    events = []
    cancelled = None
    with stream:
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and cancelled is None:
                # Another connection of the same client: the stream keeps its own.
                cancelled = client.responses.cancel(events[0].response.id)
    assert cancelled is not None, [e.type for e in events]
    assert cancelled.status == "cancelled", cancelled
    assert cancelled.id == events[0].response.id
    assert cancelled.output_text, "what was generated before the cancel stays"

    # The stream ended on its own, with the terminal event carrying the cancelled response.
    last = events[-1]
    assert last.type == "response.incomplete", [e.type for e in events[-3:]]
    assert last.response.status == "cancelled"
    assert last.response.output_text == cancelled.output_text
    assert events[-1].sequence_number == len(events) - 1, "no event was lost or added"

    # Stored like any response; cancelling it again answers the same object.
    assert client.responses.retrieve(cancelled.id).status == "cancelled"
    assert client.responses.cancel(cancelled.id).status == "cancelled"

    # The conversation continues from it.
    after = client.responses.create(model=MODEL, input="and now?", previous_response_id=cancelled.id)
    assert after.status == "completed", after


def test_cancel_ends_a_websocket_turn(client: OpenAI, ws: WsConn) -> None:
    ws.create(input="tell me everything", metadata=LONG)
    created = ws.recv()
    assert created.type == "response.created", as_dict(created)
    while ws.recv().type != "response.output_text.delta":
        pass
    cancelled = client.responses.cancel(created.response.id)
    assert cancelled.status == "cancelled"
    events = ws.read_response()
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "cancelled"
    # The connection serves the next turn, chained from the cancelled one.
    after = ws.turn(input="go on", previous_response_id=cancelled.id)
    assert after["status"] == "completed", after


def test_cancel_errors(client: OpenAI) -> None:
    done = client.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(done.id)
    assert isinstance(exc.value.body, dict) and exc.value.body.get("code") == "response_not_cancellable", exc.value.body
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
