#!/usr/bin/env python3
"""Session affinity in front of real engine servers: follow-up TTFT and prefilled tokens with
tether's affinity vs round-robin over the same two llama-cpp-python replicas.

Starts two replicas (scripts/llama-cpp-server.py, one thread each; llama-cpp-python keeps the
KV of its last prompt only), then for each placement a `tether dev --engine openai --shards 2`
in front of them (`--shard-placement affinity|round-robin`), and runs the same workload: one
session per replica (new sessions until each replica served one), then TURNS-1 rounds of
follow-ups, the sessions' order alternating between rounds; the first message is about
PROMPT_TOKENS tokens long, each follow-up a short question. Streams over
HTTP with the official SDK; TTFT is the time to the first `response.output_text.delta`.
Reports per placement: follow-up TTFT (p50, mean, max), the tokens the engines prefilled for
follow-ups (from their `prefix-match hit, remaining N prompt tokens to eval` lines) and tether's reported cached tokens.

    python loadtest/openai_affinity.py --tether target/release/tether \\
        --model-file .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

Needs tests/python/requirements.txt and tests/python/engine-requirements.txt in the Python
that runs it. Every wait is bounded; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
# Printed by llama-cpp-python (verbose) at the start of each request that shares a prefix with
# the replica's previous prompt: M is what the engine prefills.
PROMPT_EVAL = re.compile(rb"Llama\.generate: \d+ prefix-match hit, remaining (\d+) prompt tokens to eval")
START_TIMEOUT_S = 120.0


def start(args: list[str], pattern: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Starts a process and returns it with the URL its stdout announces (bounded wait)."""
    stderr = log.open("wb")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
    found = threading.Event()
    box: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            match = re.search(pattern, raw.decode(errors="replace"))
            if match and not box:
                box.append(match.group(1))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(START_TIMEOUT_S) or not box:
        proc.kill()
        sys.exit(f"{args[:2]} did not start; see {log}")
    return proc, box[0]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def evals(log: Path) -> list[int]:
    return [int(n) for n in PROMPT_EVAL.findall(log.read_bytes())]


def warm_up(url: str) -> None:
    """One request with the ChatML opening: every later prompt shares a prefix with the
    replica's last one, so the engine logs how many tokens it prefilled for each."""
    import json
    import urllib.request

    body = json.dumps({"model": MODEL, "prompt": "<|im_start|>system\n", "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200


def wait_ready(url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # poll interval; the deadline bounds the wait
    sys.exit(f"{url}/readyz never answered 200")


def streamed_turn(client: OpenAI, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One streamed turn: (TTFT in seconds, the final response)."""
    started = time.monotonic()
    ttft = None
    final = None
    with client.responses.create(stream=True, **body) as stream:
        for event in stream:
            if event.type == "response.output_text.delta" and ttft is None:
                ttft = time.monotonic() - started
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response.to_dict()
            if event.type in ("response.failed", "error"):
                sys.exit(f"turn failed: {event}")
    assert final is not None, "no terminal event"
    return (ttft if ttft is not None else time.monotonic() - started), final


def run_placement(args: argparse.Namespace, placement: str, upstreams: list[str], logs: list[Path], workdir: Path) -> dict[str, Any]:
    tether_args = [args.tether, "dev", "--listen", "127.0.0.1:0", "--workers", "1", "--shards", "2"]
    tether_args += ["--engine", "openai", "--model", MODEL, "--upstream", ",".join(upstreams)]
    tether_args += ["--openai-vocabulary", args.model_file, "--openai-context", str(args.context)]
    tether_args += ["--shard-placement", placement]
    proc, url = start(tether_args, r"tether listening on (http://127\.0\.0\.1:\d+)", workdir / f"tether-{placement}.log")
    try:
        wait_ready(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=300)
        filler = " ".join(f"Note {i}: shard {i % 5} keeps session {i % 7} warm for worker {i % 3}." for i in range(args.prompt_tokens // 16))
        follow_ttft: list[float] = []
        follow_prefilled: list[int] = []
        follow_cached: list[int] = []
        first_ttft: list[float] = []

        def run_turn(body: dict[str, Any]) -> tuple[float, dict[str, Any], list[int], int]:
            before = [len(evals(log)) for log in logs]
            ttft, response = streamed_turn(client, body)
            deadline = time.monotonic() + 15
            while True:  # the engine's log line follows the stream's end by a little
                after = [evals(log) for log in logs]
                served = [i for i in range(len(logs)) if len(after[i]) > before[i]]
                if served or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            return ttft, response, served, sum(after[i][-1] for i in served)

        # One session per replica: new sessions (named by `prompt_cache_key`) until each replica
        # served a first turn; a session whose replica is taken is dropped.
        sessions: list[dict[str, Any]] = []
        taken: set[int] = set()
        for key in range(4 * args.sessions):
            if len(sessions) == args.sessions:
                break
            body = {"model": MODEL, "temperature": 0, "max_output_tokens": args.output_tokens,
                    "prompt_cache_key": f"bench-{placement}-{key}",
                    "input": f"Session {placement}-{key}.\n{filler}\nSummarize note {key}."}
            ttft, response, served, prefilled = run_turn(body)
            first_ttft.append(ttft)
            print(f"{placement:12} first turn key {key}: ttft {ttft * 1000:7.0f} ms, engine prefilled {prefilled:5}, replica {served}", flush=True)
            if served and served[0] not in taken:
                taken.add(served[0])
                sessions.append(response)
        # Follow-ups, the sessions' turns in a different order each round (as agents' turns
        # arrive), so a placement that ignores the session cannot line up by accident.
        for turn in range(1, args.turns):
            order = list(range(len(sessions)))
            if turn % 2 == 0:
                order.reverse()
            for session in order:
                body = {"model": MODEL, "temperature": 0, "max_output_tokens": args.output_tokens,
                        "input": f"And note {turn * 3 + session}?", "previous_response_id": sessions[session]["id"]}
                ttft, response, served, prefilled = run_turn(body)
                cached = response["usage"]["input_tokens_details"]["cached_tokens"]
                follow_ttft.append(ttft)
                follow_prefilled.append(prefilled)
                follow_cached.append(cached)
                sessions[session] = response
                print(f"{placement:12} turn {turn} session {session}: ttft {ttft * 1000:7.0f} ms, engine prefilled {prefilled:5}, replica {served}, tether cached {cached}", flush=True)
        return {
            "placement": placement,
            "first_ttft_p50": statistics.median(first_ttft),
            "follow_ttft_p50": statistics.median(follow_ttft),
            "follow_ttft_mean": statistics.fmean(follow_ttft),
            "follow_ttft_max": max(follow_ttft),
            "follow_prefilled_mean": statistics.fmean(follow_prefilled),
            "follow_cached_mean": statistics.fmean(follow_cached),
            "follow_ups": len(follow_ttft),
        }
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tether", default=str(REPO / "target" / "release" / "tether"))
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--sessions", type=int, default=2, help="at most the replicas (one session each)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--placements", default="affinity,round-robin")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tether-affinity-"))
    print(f"logs in {workdir}", flush=True)
    replicas = []
    try:
        for index in range(2):
            log = workdir / f"replica-{index}.log"
            proc, url = start(
                [sys.executable, str(REPO / "scripts" / "llama-cpp-server.py"), "--model", args.model_file, "--alias", MODEL,
                 "--n-ctx", str(args.context), "--threads", "1"],
                r"listening on (http://127\.0\.0\.1:\d+)",
                log,
            )
            warm_up(url)
            replicas.append((proc, url, log))
        results = [
            run_placement(args, placement, [r[1] for r in replicas], [r[2] for r in replicas], workdir)
            for placement in args.placements.split(",")
        ]
    finally:
        for proc, _, _ in replicas:
            stop(proc)
    print()
    print("| placement | first-turn TTFT p50 | follow-up TTFT p50 | mean | max | engine-prefilled tokens per follow-up | tether cached tokens per follow-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['placement']} | {r['first_ttft_p50'] * 1000:.0f} ms | {r['follow_ttft_p50'] * 1000:.0f} ms | "
            f"{r['follow_ttft_mean'] * 1000:.0f} ms | {r['follow_ttft_max'] * 1000:.0f} ms | "
            f"{r['follow_prefilled_mean']:.0f} | {r['follow_cached_mean']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
