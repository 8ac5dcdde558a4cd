"""The real model through the official SDK (issue 6): `tether dev --engine llama` on
SmolLM2-135M-Instruct, a multi-turn conversation over HTTP and over WebSocket mode.

Runs when `TETHER_LLAMA_MODEL` names the GGUF file (CI sets it after `scripts/fetch-model.sh`)
and then fails, never skips, if the file or the binary's llama engine is missing. Without the
variable the module is skipped: the default build has no llama engine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from openai import OpenAI

from conftest import Server, _stop, start_dev
from helpers import WsConn, as_dict, check_response_events, output_text

MODEL_PATH = os.environ.get("TETHER_LLAMA_MODEL")
MODEL = "smollm2-135m-instruct"  # the shard's default name for SmolLM2-135M-Instruct.Q4_1.gguf
TIMEOUT_S = 120.0  # one turn on 2 CPU cores, with room for a loaded CI machine

pytestmark = pytest.mark.skipif(not MODEL_PATH, reason="TETHER_LLAMA_MODEL is not set (scripts/fetch-model.sh)")


@pytest.fixture(scope="module")
def llama_server() -> Iterator[Server]:
    assert MODEL_PATH is not None
    assert Path(MODEL_PATH).is_file(), f"TETHER_LLAMA_MODEL={MODEL_PATH} is not a file: run scripts/fetch-model.sh"
    server = start_dev(
        *["--workers", "1", "--shards", "1"],
        *["--engine", "llama", "--model", MODEL_PATH, "--llama-context", "4096", "--llama-sequences", "4"],
    )
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def llama(llama_server: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{llama_server.url}/v1", api_key="sk-local", max_retries=0, timeout=TIMEOUT_S) as c:
        yield c


def assert_real_text(text: str) -> None:
    assert sum(c.isalpha() for c in text) >= 3, f"expected real text, got {text!r}"
    assert "<|im_" not in text, f"chat markup leaked: {text!r}"


def test_models_lists_the_llama_model(llama: OpenAI) -> None:
    assert MODEL in [m.id for m in llama.models.list().data]


def test_multi_turn_http_reuses_the_kv_cache(llama: OpenAI) -> None:
    first = llama.responses.create(
        model=MODEL, input="What is the capital of France? Answer briefly.", temperature=0, max_output_tokens=32
    )
    assert first.status in ("completed", "incomplete"), first.status
    assert_real_text(first.output_text)
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 0

    second = llama.responses.create(
        model=MODEL, previous_response_id=first.id, input="And of Germany?", temperature=0, max_output_tokens=32
    )
    assert_real_text(second.output_text)
    assert second.usage is not None
    held = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == held, second.usage
    assert second.usage.input_tokens - held < 30, "only the new message is prefilled"


def test_streamed_turns_over_websocket_mode(llama: OpenAI) -> None:
    with llama.responses.connect() as connection:
        ws = WsConn(connection)
        previous = None
        for question in ("Name a primary color.", "Name another one."):
            body = {"model": MODEL, "input": question, "temperature": 0, "max_output_tokens": 64}
            if previous is not None:
                body["previous_response_id"] = previous["id"]
            ws.create(**body)
            events = ws.read_response(timeout=TIMEOUT_S)
            assert events[-1].type != "error", events[-1]
            if events[-1].type == "response.completed":
                response = check_response_events(events)
            else:  # cut by max_output_tokens: the checker wants completed items
                assert events[-1].type == "response.incomplete", events[-1]
                response = as_dict(events[-1])["response"]
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert_real_text(deltas)
            assert deltas == output_text(response)
            if previous is not None:
                held = previous["usage"]["input_tokens"] + previous["usage"]["output_tokens"]
                assert response["usage"]["input_tokens_details"]["cached_tokens"] == held, response["usage"]
            previous = response
