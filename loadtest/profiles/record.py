#!/usr/bin/env python3
"""CPU profiles of `tether dev` under the agent workload, one per mode, as flamegraphs.

Starts `tether dev` (release) on an ephemeral port, then for each mode (default `ws`,
`http-full`, `direct`) runs `perf record` on the process (cpu-clock, DWARF call graphs) while
`tether-loadtest --mode MODE` drives the 30-turn workload of loadtest/README.md, folds the
stacks with `inferno-collapse-perf`, renders `MODE.svg` with `inferno-flamegraph`, and prints
where the samples go:

* by component: the nearest frame, from the leaf up, that names a tether crate or its gRPC
  service (`shard_server` → shard, `worker_server` / `shard_client` → worker, `worker_client`
  → edge); samples with no such frame (runtime, kernel, unattributed I/O) are "other";
* by kind of work, from the leaf frame (self time): JSON, gRPC/HTTP framing, WebSocket,
  allocation, memcpy, tokenization, ring/cache, tracing, tokio, kernel, the sim engine;
* the top self-time functions.

    apt-get install linux-perf; cargo install inferno --root <dir>
    python3 loadtest/profiles/record.py --tether target/release/tether \\
        --loadtest target/release/tether-loadtest --inferno <dir>/bin --out /tmp/profiles

Writes `MODE.svg`, `MODE.folded` and `MODE.txt` (the breakdown) to --out. Every wait is
bounded; tether and perf are stopped at the end.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
from tether_dev import start_dev  # noqa: E402  (a sibling script's module, found through the path above)
WORKLOAD = [
    "--turns", "30", "--tool-latency", "fixed:20ms", "--input-tokens", "2000",
    "--tool-output-bytes", "2000", "--output-tokens", "50", "--seed", "13730259289184017070",
]  # fmt: skip

# From the leaf up, the first frame matching one of these names the component.
COMPONENTS = [
    ("shard", re.compile(r"tether_shard|shard_server")),
    ("worker", re.compile(r"tether_worker|worker_server|shard_client|tether_vocabulary")),
    ("edge", re.compile(r"tether_edge|worker_client")),
    ("common", re.compile(r"tether_common|tether_proto")),
]
# The leaf frame's kind of work; the first match wins.
KINDS = [
    ("kernel", re.compile(r"_\[k\]$|\[kernel|^(entry_SYSCALL|__x64_sys|do_syscall|tcp_|__tcp|ip_|__ip|skb|__skb|sock_|__sock|"
                          r"__netif|net_rx|__napi|ep_|do_epoll|__schedule|schedule|finish_task_switch|_raw_spin|"
                          r"copy_user|_copy_|rep_movs|__softirq|irq|futex|__futex|syscall_|exit_to_user)")),
    ("allocation", re.compile(r"malloc|free|realloc|calloc|_int_|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_|"
                              r"alloc::alloc|tcache|arena_|sysmalloc|systrim|__default_morecore|brk|mmap|munmap|"
                              r"RawVec|raw_vec|drop_in_place|core::ptr::drop")),
    ("memcpy/memmove", re.compile(r"memcpy|memmove|memset|__memcmp|memcmp|bcmp|__memchr|memchr")),
    ("JSON (serde_json)", re.compile(r"serde_json|serde::|_serde::|Serialize|Deserialize|itoa|ryu|format_escaped_str")),
    ("tokenization", re.compile(r"tiktoken|bpe|Bpe|fancy_regex|regex|aho_corasick|tokeniz|tether_vocabulary|render")),
    ("WebSocket (tungstenite)", re.compile(r"tungstenite|WebSocket|websocket")),
    ("gRPC/HTTP framing (h2, hyper, tonic, prost)", re.compile(r"h2::|hyper|tonic|prost|http::|http_body|bytes::|httparse|"
                                                               r"tower|axum|encode_varint|decode_varint")),
    ("ring/cache", re.compile(r"ring::|hashring|lru|siphash|SipHasher|Hasher|hash_one|hashbrown|session::cache|cache::|"
                              r"placement|Ring")),
    ("tracing/metrics", re.compile(r"tracing|metrics|prometheus|opentelemetry")),
    ("tokio runtime/sync", re.compile(r"tokio::|parking_lot|futures_util|futures_core|std::sync|crossbeam|mio::|"
                                      r"event_listener|core::task|std::thread")),
    ("sim engine", re.compile(r"engine::sim|Sim|rand|tether_shard")),
    ("utf8/string", re.compile(r"str::|String|from_utf8|core::fmt|alloc::fmt|char::")),
]


def start_tether(tether: Path, out: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc, url = start_dev(tether, [], out / "tether.log", 60)
    if url is None:
        stop(proc)
        sys.exit(f"tether did not start; see {out / 'tether.log'}")
    return proc, url


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def record(args: argparse.Namespace, pid: int, url: str, mode: str) -> Path:
    out: Path = args.out
    data = out / f"{mode}.perf.data"
    perf = subprocess.Popen(
        ["perf", "record", "-e", "cpu-clock", "-F", str(args.frequency), "--call-graph", "dwarf,32768",
         "-p", str(pid), "-o", str(data)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(out / f"{mode}.perf.log").open("wb"),
    )  # fmt: skip
    command = [
        str(args.loadtest), "--url", url, "--mode", mode, "--agents", str(args.agents),
        "--workflows", str(args.workflows), "--duration", args.duration, "--warmup", "4", *WORKLOAD,
        "--cpu-pid", f"tether={pid}", "--markdown", str(out / f"{mode}.loadtest.md"), "--quiet",
    ]  # fmt: skip
    print("$ " + " ".join(command), file=sys.stderr)
    with (out / f"{mode}.loadtest.log").open("wb") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=600, cwd=REPO)
    stop(perf, signal.SIGINT)
    return data


def fold(args: argparse.Namespace, data: Path, mode: str) -> Path:
    out: Path = args.out
    folded = out / f"{mode}.folded"
    script = subprocess.Popen(["perf", "script", "-i", str(data)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    with folded.open("wb") as sink:
        subprocess.run([str(args.inferno / "inferno-collapse-perf"), "--all"], stdin=script.stdout, stdout=sink,
                       check=True, timeout=1800)  # fmt: skip
    script.wait(timeout=60)
    with (out / f"{mode}.svg").open("wb") as svg, folded.open("rb") as source:
        title = f"tether dev (release), {mode}, {args.agents} agents, 30-turn workload"
        subprocess.run([str(args.inferno / "inferno-flamegraph"), "--title", title, "--minwidth", "0.2"],
                       stdin=source, stdout=svg, check=True, timeout=600)  # fmt: skip
    return folded


def component_of(frames: list[str]) -> str:
    """The nearest shard/worker/edge frame from the leaf up; failing that, `tether_common`
    (the serving loops of the gRPC servers, shard's and worker's alike); else other."""
    common = False
    for frame in reversed(frames):
        hit = next((name for name, pattern in COMPONENTS if pattern.search(frame)), None)
        if hit == "common":
            common = True
        elif hit:
            return hit
    return "common: gRPC serving loops (shard or worker)" if common else "other (runtime, kernel, no tether frame)"


def breakdown(folded: Path, top: int) -> str:
    components: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    by_component_kind: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        total += samples
        leaf = frames[-1]
        component = component_of(frames)
        kind = next((name for name, pattern in KINDS if pattern.search(leaf)), "other")
        components[component] += samples
        kinds[kind] += samples
        by_component_kind[(component, kind)] += samples
        leaves[leaf] += samples
    if total == 0:
        return "no samples\n"
    pct = lambda n: f"{100.0 * n / total:5.1f}%"  # noqa: E731
    lines = [f"CPU sampled: {total / 1e9:.2f} s", "", "by component (nearest tether frame from the leaf up):"]
    lines += [f"  {pct(n)}  {name}" for name, n in components.most_common()]
    lines += ["", "by kind of work (leaf frame, self time):"]
    lines += [f"  {pct(n)}  {name}" for name, n in kinds.most_common()]
    lines += ["", "component × kind (≥ 1%):"]
    lines += [f"  {pct(n)}  {c} / {k}" for (c, k), n in by_component_kind.most_common() if n * 100 >= total]
    lines += ["", f"top {top} self-time functions:"]
    lines += [f"  {pct(n)}  {name[:160]}" for name, n in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tether", type=Path, default=REPO / "target/release/tether")
    parser.add_argument("--loadtest", type=Path, default=REPO / "target/release/tether-loadtest")
    parser.add_argument("--inferno", type=Path, required=True, help="directory holding the inferno-* binaries")
    parser.add_argument("--modes", default="ws,http-full")
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--workflows", type=int, default=16)
    parser.add_argument("--duration", default="60s")
    parser.add_argument("--frequency", type=int, default=1999, help="samples per second per thread")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("profiles-out"))
    parser.add_argument("--analyze-only", action="store_true", help="re-read MODE.folded in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    if not args.analyze_only:
        proc, url = start_tether(args.tether, args.out)
        try:
            data = {mode: record(args, proc.pid, url, mode) for mode in modes}
        finally:
            stop(proc)
        for mode in modes:
            fold(args, data[mode], mode)
    for mode in modes:
        text = breakdown(args.out / f"{mode}.folded", args.top)
        (args.out / f"{mode}.txt").write_text(text)
        print(f"== {mode}\n{text}")


if __name__ == "__main__":
    main()
