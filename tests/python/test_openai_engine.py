"""The openai engine in front of a real third-party engine server (issue 13): two
llama-cpp-python replicas serving SmolLM2-135M-Instruct, each behind its own shard
(`tether dev --engine openai --shards 2 --upstream A,B`), driven by the official SDK over
WebSocket: chained turns, a tool loop, and session affinity visible in the engines' own prompt
processing (a follow-up on its replica evaluates only its new tokens).

llama-cpp-python keeps only its last prompt's KV and reports no cached tokens; with `verbose`
it prints, per request that shares a prefix with its previous prompt, `N prefix-match hit,
remaining M prompt tokens to eval`: M is what the engine prefilled. Each replica is first
given a prompt every ChatML prompt starts with, so every later request prints that line.

Runs when `TETHER_LLAMA_MODEL` names the GGUF file (CI sets it after `scripts/fetch-model.sh`)
and then fails, never skips, if llama-cpp-python (tests/python/engine-requirements.txt) or the
binary's GGUF vocabulary loader (the `llama` feature) is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from openai import OpenAI

from conftest import REPO, STARTUP_TIMEOUT_S, Server, _stop, start_dev
from helpers import WsConn, as_dict, check_response_events, function_calls, output_text

MODEL_PATH = os.environ.get("TETHER_LLAMA_MODEL")
MODEL = "smollm2-135m-instruct"
TIMEOUT_S = 120.0  # one turn on a loaded 2-core machine
CONTEXT = 2048
ENGINE_LISTEN = re.compile(r"llama-cpp-server listening on (http://127\.0\.0\.1:\d+)")
# Printed by llama-cpp-python (verbose) at the start of each request that shares a prefix with
# the replica's previous prompt: M is what the engine prefills.
PROMPT_EVAL = re.compile(rb"Llama\.generate: \d+ prefix-match hit, remaining (\d+) prompt tokens to eval")
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}

pytestmark = pytest.mark.skipif(not MODEL_PATH, reason="TETHER_LLAMA_MODEL is not set (scripts/fetch-model.sh)")


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def prompt_evals(self) -> list[int]:
        """Prompt tokens the engine evaluated, one entry per request since the warm-up."""
        return [int(n) for n in PROMPT_EVAL.findall(self.stderr_path.read_bytes())]


def start_replica() -> Replica:
    assert MODEL_PATH is not None
    stderr = tempfile.NamedTemporaryFile(prefix="llama-cpp-server-", suffix=".stderr.log", delete=False)
    args = [sys.executable, str(REPO / "scripts" / "llama-cpp-server.py"), "--model", MODEL_PATH]
    args += ["--alias", MODEL, "--n-ctx", str(CONTEXT), "--threads", "1"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
    stderr.close()
    lines: list[str] = []
    found = threading.Event()
    box: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            lines.append(line)
            match = ENGINE_LISTEN.search(line)
            if match and not box:
                box.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(STARTUP_TIMEOUT_S) or not box:
        proc.kill()
        proc.wait(timeout=10)
        log = Path(stderr.name).read_bytes()[-5000:].decode(errors="replace")
        pytest.fail(f"llama-cpp-server did not start (pip install -r tests/python/engine-requirements.txt)\n{log}")
    replica = Replica(url=box[0], proc=proc, stderr_path=Path(stderr.name))
    warm_up(replica.url)
    return replica


def warm_up(url: str) -> None:
    """One request with the ChatML opening, so every later prompt shares a prefix with the
    replica's last one (and the engine logs how much it reused)."""
    body = json.dumps({"model": MODEL, "prompt": "<|im_start|>system\n", "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
        assert reply.status == 200


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for _ in range(2):
            started.append(start_replica())
        yield started
    finally:
        for replica in started:
            replica.proc.kill()
            replica.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(replicas: list[Replica]) -> Iterator[Server]:
    assert MODEL_PATH is not None
    server = start_dev(
        *["--workers", "1", "--shards", "2"],
        *["--engine", "openai", "--model", MODEL, "--upstream", ",".join(r.url for r in replicas)],
        *["--openai-vocabulary", MODEL_PATH, "--openai-context", str(CONTEXT)],
    )
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def client(cluster: Server) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{cluster.url}/v1", api_key="sk-local", max_retries=0, timeout=TIMEOUT_S) as c:
        yield c


def turn(ws: WsConn, **body: Any) -> dict[str, Any]:
    """One streamed turn; the checked response (completed, or cut by max_output_tokens)."""
    body.setdefault("model", MODEL)
    body.setdefault("temperature", 0)
    ws.create(**body)
    events = ws.read_response(timeout=TIMEOUT_S)
    assert events[-1].type != "error", as_dict(events[-1])
    if events[-1].type == "response.completed":
        return check_response_events(events)
    assert events[-1].type == "response.incomplete", events[-1]
    return as_dict(events[-1])["response"]


def held(response: dict[str, Any]) -> int:
    return response["usage"]["input_tokens"] + response["usage"]["output_tokens"]


def served_by(replicas: list[Replica], before: list[int]) -> list[int]:
    """The replicas that logged a request since `before` (their log lines follow the stream's
    end by a little: polled, bounded)."""
    deadline = time.monotonic() + 15.0
    while True:
        grown = [i for i, r in enumerate(replicas) if len(r.prompt_evals()) > before[i]]
        if grown or time.monotonic() > deadline:
            return grown
        time.sleep(0.05)  # poll interval; the deadline bounds the wait


def assert_real_text(text: str) -> None:
    assert sum(c.isalpha() for c in text) >= 2, f"expected real text, got {text!r}"
    assert "<|im_" not in text, f"chat markup leaked: {text!r}"


def test_models_lists_the_served_model(client: OpenAI) -> None:
    assert MODEL in [m.id for m in client.models.list().data]


def test_chained_turns_and_a_tool_loop_over_websocket(client: OpenAI) -> None:
    with client.responses.connect() as connection:
        ws = WsConn(connection)
        first = turn(ws, input="What is the weather in Paris?", tools=[TOOL], max_output_tokens=32)
        calls = function_calls(first)
        if calls and calls[0].get("status") == "completed":
            # The model called the tool: answer it.
            call_id = calls[0]["call_id"]
            tool_input: list[dict[str, Any]] = []
        else:
            # SmolLM2-135M rarely writes a call: the client reports one it made itself.
            assert_real_text(output_text(first))
            call_id = "call_client_1"
            tool_input = [{"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": '{"city": "Paris"}'}]
        tool_input.append({"type": "function_call_output", "call_id": call_id, "output": '{"sky": "sunny", "celsius": 21}'})
        second = turn(ws, previous_response_id=first["id"], input=tool_input, tools=[TOOL], max_output_tokens=32)
        assert second["usage"]["input_tokens_details"]["cached_tokens"] == held(first), second["usage"]
        assert second["usage"]["input_tokens"] > held(first), "the tool output was prefilled"
        third = turn(ws, previous_response_id=second["id"], input="Is that warm? One word.", tools=[TOOL], max_output_tokens=16)
        assert third["usage"]["input_tokens_details"]["cached_tokens"] == held(second), third["usage"]
        for response in (second, third):
            assert function_calls(response) or output_text(response), response


def test_a_follow_up_prefills_only_its_new_tokens_on_its_replica(client: OpenAI, replicas: list[Replica]) -> None:
    """Session affinity, seen from the engines: each session's follow-up goes to the replica
    that holds its prefix, which evaluates only the new message (llama-cpp-python's
    longest-prefix reuse), while a first turn evaluates the whole prompt."""
    filler = " ".join(f"Note {i}: shard {i % 5} keeps session {i % 7} warm." for i in range(40))
    last_on: dict[int, tuple[dict[str, Any], int]] = {}
    # New sessions (a WebSocket connection is one; their first words differ, so one shares only
    # the system prompt with another) until each replica served one. The last first turn a
    # replica served is the prompt it holds.
    for index in range(12):
        with client.responses.connect() as connection:
            before = [len(r.prompt_evals()) for r in replicas]
            first = turn(WsConn(connection), input=f"Session {index} of the test.\n{filler}\nSummarize note {index}.", max_output_tokens=4)
        grown = served_by(replicas, before)
        assert len(grown) == 1, f"one engine request per turn, got replicas {grown}"
        evaluated = replicas[grown[0]].prompt_evals()[-1]
        assert evaluated > 300, f"a first turn prefills its whole prompt: {evaluated}"
        last_on[grown[0]] = (first, evaluated)
        if len(last_on) == len(replicas):
            break
    assert len(last_on) == len(replicas), "twelve sessions all landed on one replica"
    with client.responses.connect() as connection:
        ws = WsConn(connection)
        for replica_index, (first, cold) in last_on.items():
            before = [len(r.prompt_evals()) for r in replicas]
            started = time.monotonic()
            follow = turn(ws, previous_response_id=first["id"], input="And note 3?", max_output_tokens=4)
            elapsed = time.monotonic() - started
            grown = served_by(replicas, before)
            assert grown == [replica_index], f"the follow-up went to replica {grown}, its prefix is on {replica_index}"
            warm = replicas[replica_index].prompt_evals()[-1]
            new_tokens = follow["usage"]["input_tokens"] - held(first)
            print(f"replica {replica_index}: first turn evaluated {cold} tokens, follow-up {warm} ({new_tokens} new), {elapsed:.2f}s")
            assert warm <= new_tokens + 8, f"the follow-up re-evaluated {warm} tokens; {new_tokens} were new"
            assert follow["usage"]["input_tokens_details"]["cached_tokens"] == held(first)
