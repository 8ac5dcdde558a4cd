#!/usr/bin/env python3
"""The router's own CPU per turn, three ways, on the 30-turn agent workload (loadtest/README.md):

* `dev-memory`: one `tether dev` process (edge, 3 workers, 2 sim shards; the nodes call each
  other's gRPC services in memory, `--links memory`, the default);
* `dev-tcp`: the same over loopback gRPC (`--links tcp`), as separate processes talk;
* `processes`: the edge, each worker and each shard as its own `tether edge|worker|shard`
  process (fixed membership), so the router's CPU (edge + workers) is read directly, per
  service, with no subtraction.

Each runs `tether-loadtest --mode ws,http-full,direct` with `--cpu-pid` on every process. For the
single process, the router's own CPU per turn is the process's minus `direct`'s (only the shard
works in `direct`). For `processes` it is edge + workers, and `direct` shows what the workers
and edge spend when no turn goes through them (idle: membership, probes, keep-alive pings).

    python3 loadtest/router_cpu.py --tether target/release/tether \\
        --loadtest target/release/tether-loadtest --out /tmp/router-cpu

The separate processes need their ports before they start (fixed membership lists them): the
OS picks them (bind to port 0, read, close) right before the processes start; a start that
loses one to another process fails and is reported, not retried. Every wait is bounded and
every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from peer_router import (
    REPO,
    WORKLOAD,
    Proc,
    cpu_per_turn,
    free_port,
    run_loadtest,
    start_tether,
    stop,
    wait_ready,
)

MODES = "ws,http-full,direct"


def start_processes(args: argparse.Namespace, out: Path) -> tuple[list[Proc], str]:
    """Starts the shards, the workers and an edge as separate processes; returns them and the
    edge's URL (`direct` finds a shard through the edge's `GET /v1/cluster`)."""
    shards = {f"shard-{i}": f"http://127.0.0.1:{free_port()}" for i in range(args.shards)}
    workers = {f"worker-{i}": f"http://127.0.0.1:{free_port()}" for i in range(args.workers)}
    edge_port = free_port()
    membership = [
        "--worker-peer", ",".join(f"{k}={v}" for k, v in workers.items()),
        "--shard-peer", ",".join(f"{k}={v}" for k, v in shards.items()),
    ]  # fmt: skip
    procs: list[Proc] = []

    def start(kind: str, name: str, listen: str, extra: list[str]) -> Proc:
        log = out / f"{name}.log"
        command = [str(args.tether), kind, "--listen", listen, *extra, *membership]
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
        proc = Proc(name, popen, log)
        procs.append(proc)
        return proc

    for name, addr in [*shards.items(), *workers.items()]:
        kind = name.split("-")[0]
        start(kind, name, addr.removeprefix("http://"), ["--id", name])
    edge = start("edge", "edge", f"127.0.0.1:{edge_port}", ["--auth", "open"])
    for proc in procs:
        addr = {**shards, **workers}.get(proc.name, f"http://127.0.0.1:{edge_port}")
        if not wait_ready(f"{addr}/readyz", proc, fatal=False):
            for other in procs:
                stop(other)
            sys.exit(f"{proc.name} never became ready (a port taken?); see {proc.log}")
    return [edge, *procs[:-1]], f"http://127.0.0.1:{edge_port}"


def summarize(setup: str, report: dict[str, Any], labels: list[str], router: list[str]) -> list[str]:
    modes = {mode["mode"]: mode for mode in report["modes"]}
    direct = modes.get("direct")
    rows = []
    for name in ["ws", "http-full", "direct"]:
        mode = modes.get(name)
        if mode is None:
            continue
        per = {label: cpu_per_turn(mode, label) for label in labels}
        if setup.startswith("dev"):
            whole = per["tether"]
            floor = cpu_per_turn(direct, "tether") if direct else None
            own = None if whole is None or floor is None or name == "direct" else whole - floor
            detail = f"tether {whole:.3f}" if whole is not None else "n/a"
        else:
            parts = [per[label] for label in router]
            own = sum(parts) if all(p is not None for p in parts) else None
            edge = per.get("edge") or 0.0
            workers = sum(per[label] or 0.0 for label in router if label != "edge")
            shards = sum(per[label] or 0.0 for label in labels if label.startswith("shard"))
            detail = f"edge {edge:.3f}, workers {workers:.3f}, shards {shards:.3f}"
        p50 = (mode.get("turn_ms") or {}).get("p50")
        overhead = (mode.get("router_overhead_ms") or {}).get("p50")
        own_text = f"**{own:.3f}**" if own is not None else "–"
        fmt = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
        rows.append(f"| {setup} | {name} | {mode['turns_ok']} | {detail} | {own_text} | {fmt(p50)} | {fmt(overhead)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tether", type=Path, required=True)
    parser.add_argument("--loadtest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--workflows-per-agent", type=int, default=4)
    parser.add_argument("--duration", default="240s")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--setups", default="dev-memory,dev-tcp,processes")
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=50,
        help="tokens of each workflow's final answer (the tool turns' calls are the sim's own length)",
    )
    parser.add_argument("--modes", default=MODES)
    args = parser.parse_args()
    workload = list(WORKLOAD)
    workload[workload.index("--output-tokens") + 1] = str(args.output_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[str] = []
    for setup in args.setups.split(","):
        if setup in ("dev-memory", "dev-tcp"):
            links = setup.removeprefix("dev-")
            dev_args = ["--links", links, "--workers", str(args.workers), "--shards", str(args.shards)]
            proc, url = start_tether(args.tether, dev_args, "tether", args.out, f"-{links}")
            try:
                report = run_loadtest(args, url, args.modes, args.agents, [proc], setup, workload)
            finally:
                stop(proc)
            rows += summarize(setup, report, ["tether"], [])
        elif setup == "processes":
            procs, url = start_processes(args, args.out)
            try:
                report = run_loadtest(args, url, args.modes, args.agents, procs, setup, workload)
            finally:
                for proc in procs:
                    stop(proc)
            labels = [p.name for p in procs]
            router = [label for label in labels if label == "edge" or label.startswith("worker")]
            rows += summarize(setup, report, labels, router)
        else:
            sys.exit(f"unknown setup {setup!r}")
    print("| setup | mode | turns | CPU ms / turn by process | router's own ms / turn | turn p50 ms | router overhead p50 ms |")
    print("|---|---|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
