#!/usr/bin/env python3
"""The peer side by side: vllm-router in front of single-node tether backends vs one tether
cluster with the same number of shards, on the same 30-turn agent workload.

For each agent count (default 4 and 100):

* tether: one `tether dev --shards N` (its default workers), `tether-loadtest --mode
  ws,http-full,direct` with `--cpu-pid tether=PID`; `direct` (gRPC straight to a shard) is the
  floor, so the router's own CPU per turn is the process's CPU per turn minus `direct`'s.
* the peer, once per policy (round_robin, cache_aware, consistent_hash): N `tether dev --shards 1
  --workers 1` backends, `vllm-router --worker-urls ...` in front of them, `tether-loadtest
  --mode http-full` through the router with `--cpu-pid router=PID,backend0=PID,...`. The router
  forwards `POST /v1/responses` as is (a transparent proxy); `previous_response_id` would reach
  whichever backend the policy picks, which holds no such response, so only the stateless
  `http-full` mode (the whole history every turn, `prompt_cache_key`) can run through it.

Every process listens on 127.0.0.1 with an ephemeral port: tether on `--listen 127.0.0.1:0`
(the port is read from its stdout); vllm-router refuses `--port 0` ("Port must be > 0"), so its
ports are picked by the OS (bind to port 0, read, close) right before it starts, and a start that
loses the port to another process is retried with new ones. Every wait is bounded; every process
is stopped at the end (SIGTERM, then SIGKILL after 15 s).

    .venv-peer/bin/pip install vllm-router      # a wheel with the Rust router inside
    python3 loadtest/peer_router.py --tether target/release/tether \\
        --loadtest target/release/tether-loadtest --vllm-router .venv-peer/bin/vllm-router

Writes each run's JSON report and log to --out and prints the summary table (Markdown).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether_dev import start_dev

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0
POLICIES = ["round_robin", "cache_aware", "consistent_hash"]
# The 30-turn workflow of loadtest/README.md ("Agent workflows").
WORKLOAD = [
    "--turns", "30", "--tool-latency", "fixed:20ms", "--input-tokens", "2000",
    "--tool-output-bytes", "2000", "--output-tokens", "50", "--seed", "13730259289184017070",
]  # fmt: skip


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def start_tether(tether: Path, args: list[str], name: str, out: Path, run: str = "") -> tuple[Proc, str]:
    """Starts `tether dev` on an ephemeral port; returns it with the URL it printed."""
    log = out / f"{name}{run}.log"
    popen, url = start_dev(tether, args, log, START_TIMEOUT_S)
    proc = Proc(name, popen, log)
    if url is None:
        stop(proc)
        sys.exit(f"{name} did not start; see {log}")
    wait_ready(f"{url}/readyz", proc)
    return proc, url


def free_port() -> int:
    """A port the OS had free a moment ago (only for vllm-router, which refuses port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_vllm_router(
    binary: Path, policy: str, backends: list[str], name: str, out: Path, run: str
) -> tuple[Proc, str]:
    """Starts vllm-router in front of `backends`; up to three tries when a picked port was taken."""
    for attempt in range(3):
        port, metrics_port = free_port(), free_port()
        log = out / f"{name}{run}.log"
        args = [
            str(binary), "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--worker-urls", *backends, "--policy", policy,
            # consistent_hash logs three INFO lines per request; the peer should not pay for that.
            # Not "warning": vllm-router 0.1.17 offers it but parses it with tracing's Level,
            # which has no such name, and falls back to INFO.
            "--log-level", "error",
            "--worker-startup-check-interval", "1",
        ]  # fmt: skip
        popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
        proc = Proc(name, popen, log)
        url = f"http://127.0.0.1:{port}"
        if wait_ready(f"{url}/health", proc, fatal=False):
            children = child_pids(proc.pid)
            if children:
                print(f"warning: {name} has child processes {children}; their CPU is not counted", file=sys.stderr)
            return proc, url
        stop(proc)
        print(f"{name}: start {attempt + 1} failed (port {port} taken?); see {log}", file=sys.stderr)
    sys.exit(f"{name} did not start")


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            children.append(int(stat.parent.name))
    return children


def wait_ready(url: str, proc: Proc, fatal: bool = True) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.popen.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)  # poll interval; the deadline bounds the wait
    if fatal:
        stop(proc)
        sys.exit(f"{url} never answered 200; see {proc.log}")
    return False


def stop(proc: Proc) -> None:
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=15)


def run_loadtest(
    args: argparse.Namespace,
    url: str,
    modes: str,
    agents: int,
    cpu: list[Proc],
    name: str,
    workload: list[str] = WORKLOAD,
) -> dict[str, Any]:
    out: Path = args.out
    report = out / f"{name}.json"
    workflows = args.workflows_per_agent * agents
    command = [
        str(args.loadtest), "--url", url, "--mode", modes, "--agents", str(agents),
        "--workflows", str(workflows), "--duration", args.duration, "--request-timeout", "30s",
        *workload, "--cpu-pid", ",".join(f"{p.name}={p.pid}" for p in cpu),
        "--json", str(report), "--markdown", str(out / f"{name}.md"), "--quiet",
    ]  # fmt: skip
    print("$ " + " ".join(command), file=sys.stderr)
    # Each mode is bounded by --duration plus its warm-up and the 30 s request timeout.
    limit = len(modes.split(",")) * (parse_seconds(args.duration) * 2 + 60) + 60
    with (out / f"{name}.loadtest.log").open("wb") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=REPO)
    if not report.exists():
        sys.exit(f"{name}: no report (exit {result.returncode}); see {out / f'{name}.loadtest.log'}")
    return json.loads(report.read_text())


def parse_seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    if not match:
        sys.exit(f"--duration {duration!r}: use e.g. 60s or 2m")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def cpu_per_turn(mode: dict[str, Any], label: str) -> float | None:
    for row in mode["cpu"]:
        if row["label"] == label:
            return row["cpu_ms_per_turn"]
    return None


def row(
    agents: int,
    router: str,
    policy: str,
    mode: dict[str, Any],
    router_cpu: float | None,
    total_cpu: float | None,
    floor: float | None,
) -> str:
    def fmt(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    workflow = mode.get("workflow_ms") or {}
    turn = mode.get("turn_ms") or {}
    cached = mode.get("cached_token_ratio")
    errors = ", ".join(f"{k} ×{v}" for k, v in mode["errors"].items()) or "0"
    return (
        f"| {agents} | {router} | {policy} | {mode['mode']} | {mode['workflows_per_s']:.2f} "
        f"| {fmt(workflow.get('p50'))} / {fmt(workflow.get('p99'))} | {fmt(turn.get('p99'), 1)} "
        f"| {'n/a' if cached is None else f'{cached * 100:.1f}%'} | {fmt(router_cpu, 2)} | {fmt(total_cpu, 2)} "
        f"| {fmt(None if total_cpu is None or floor is None or mode['mode'] == 'direct' else total_cpu - floor, 2)} "
        f"| {mode['workflows_ok']} / {mode['workflows_failed']} | {errors} |"
    )


def tether_rows(agents: int, report: dict[str, Any]) -> tuple[list[str], float | None]:
    """The tether run's rows and its floor: CPU per turn of the process in `direct`."""
    modes = {m["mode"]: m for m in report["modes"] if m.get("skipped") is None}
    floor = cpu_per_turn(modes["direct"], "tether") if "direct" in modes else None
    rows = []
    for name, mode in modes.items():
        total = cpu_per_turn(mode, "tether")
        own = None if floor is None or total is None or name == "direct" else total - floor
        rows.append(row(agents, "tether", "ring + affinity", mode, own, total, floor))
    return rows, floor


def peer_rows(agents: int, policy: str, report: dict[str, Any], backends: int, floor: float | None) -> list[str]:
    rows = []
    for mode in report["modes"]:
        if mode.get("skipped") is not None:
            continue
        router = cpu_per_turn(mode, "router")
        parts = [router] + [cpu_per_turn(mode, f"backend{i}") for i in range(backends)]
        total = None if any(p is None for p in parts) else sum(parts)
        rows.append(row(agents, "vllm-router", policy, mode, router, total, floor))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tether", type=Path, default=REPO / "target/release/tether")
    parser.add_argument("--loadtest", type=Path, default=REPO / "target/release/tether-loadtest")
    parser.add_argument("--vllm-router", type=Path, default=REPO / ".venv-peer/bin/vllm-router")
    parser.add_argument("--shards", type=int, default=2, help="shards of the tether cluster = peer backends")
    parser.add_argument("--agents", default="4,100", help="comma-separated agent counts")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--workflows-per-agent", type=int, default=3, help="workflows per mode = this × agents")
    parser.add_argument("--duration", default="60s", help="upper bound of each mode's measured phase")
    parser.add_argument("--out", type=Path, default=Path("peer-out"))
    parser.add_argument("--skip-tether", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    policies = [p for p in args.policies.split(",") if p]

    rows: list[str] = []
    running: list[Proc] = []
    try:
        for agents in [int(a) for a in args.agents.split(",")]:
            floor = None
            if not args.skip_tether:
                proc, url = start_tether(args.tether, ["--shards", str(args.shards)], "tether", args.out, f"-{agents}")
                running.append(proc)
                report = run_loadtest(args, url, "ws,http-full,direct", agents, [proc], f"tether-{agents}")
                tether, floor = tether_rows(agents, report)
                rows += tether
                stop(proc)
                running.remove(proc)
            for policy in policies:
                backends = []
                for index in range(args.shards):
                    proc, url = start_tether(
                        args.tether, ["--shards", "1", "--workers", "1"], f"backend{index}", args.out, f"-{policy}-{agents}"
                    )
                    running.append(proc)
                    backends.append((proc, url))
                router, url = start_vllm_router(
                    args.vllm_router, policy, [u for _, u in backends], "router", args.out, f"-{policy}-{agents}"
                )
                running.append(router)
                name = f"peer-{policy}-{agents}"
                report = run_loadtest(args, url, "http-full", agents, [router] + [p for p, _ in backends], name)
                rows += peer_rows(agents, policy, report, args.shards, floor)
                for proc in [router] + [p for p, _ in backends]:
                    stop(proc)
                    running.remove(proc)
            print("\n".join(rows[-(1 + len(policies)) :]), file=sys.stderr)
    finally:
        for proc in running:
            stop(proc)

    header = (
        "| agents | router | policy | mode | workflows/s | workflow p50 / p99 ms | turn p99 ms | cached "
        "| router CPU ms / turn | total CPU ms / turn | total − `direct` ms / turn | workflows ok / failed | errors |\n"
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    table = header + "\n" + "\n".join(rows)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
