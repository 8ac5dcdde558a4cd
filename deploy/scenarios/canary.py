#!/usr/bin/env python3
"""Canary chains for the failure scenarios (standard library only).

`canary.py run --edges URL,URL --out events.jsonl --stop FILE [--chains N] [--interval S]`
keeps N stored (`store=true`) chains alive, each continuing its own `previous_response_id`
every INTERVAL seconds through the edges in turn, and writes one JSON line per turn:
  {"t": unix time, "chain": i, "ok": bool, "error": class or null, "worker": id or null, "ms": latency}
A chain whose previous response is gone (`previous_response_not_found`) is a *lost* session; it
is counted and restarted. It runs until FILE exists.

`canary.py report --events events.jsonl --phases phases.tsv [--loadtest DIR] [--compose-log F]
[--json OUT]` prints, per phase (a line `name<TAB>start<TAB>end<TAB>disrupted_at` in phases.tsv),
the canary turns, failures by class, lost chains, chains served by another worker after the
disruption (moved), and the longest time a chain could not complete a turn after the disruption
(recovery); the loadtest's counts for that phase (`DIR/<name>.json`); and from the services' logs
(`docker compose logs -t`): response states handed off on drain, fenced workers, ejections.
"""

import re

import argparse
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request


def post(url, body, timeout):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/responses", data=data, method="POST",
                                 headers={"content-type": "application/json",
                                          "authorization": "Bearer sk-local"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {}
    except (urllib.error.URLError, OSError, ValueError) as err:
        return 0, {"error": {"code": "connect", "message": str(err)}}


def chain_loop(index, edges, interval, timeout, out, lock, stop):
    prev = None
    turn = 0
    while not os.path.exists(stop):
        edge = edges[(index + turn) % len(edges)]
        body = {"model": "tether-sim", "input": f"canary {index} turn {turn}", "store": True,
                "metadata": {"tether_sim_output_tokens": "4"}}
        if prev:
            body["previous_response_id"] = prev
        t0 = time.time()
        status, reply = post(edge, body, timeout)
        ms = (time.time() - t0) * 1000
        error = None
        if status == 200 and reply.get("status") == "completed":
            prev = reply["id"]
            worker = (reply.get("x_tether") or {}).get("worker")
        else:
            worker = None
            err = reply.get("error") or (reply.get("response") or {}).get("error") or {}
            error = f"http_{status}:{err.get('code') or reply.get('status') or '?'}"
            if err.get("code") == "previous_response_not_found":
                prev = None  # lost: start a new chain
        turn += 1
        with lock:
            out.write(json.dumps({"t": round(t0, 3), "chain": index, "ok": error is None,
                                  "error": error, "worker": worker, "ms": round(ms, 1),
                                  "continued": body.get("previous_response_id") is not None}) + "\n")
            out.flush()
        time.sleep(max(0.0, interval - ms / 1000))


def run(args):
    edges = [e.rstrip("/") for e in args.edges.split(",") if e]
    lock = threading.Lock()
    with open(args.out, "a", encoding="utf-8") as out:
        threads = [threading.Thread(target=chain_loop, daemon=True,
                                    args=(i, edges, args.interval, args.timeout, out, lock, args.stop))
                   for i in range(args.chains)]
        for thread in threads:
            thread.start()
            time.sleep(args.interval / args.chains)
        for thread in threads:
            thread.join()


def load_loadtest(path):
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None
    total = {"workflows_ok": 0, "workflows_failed": 0, "turns_ok": 0, "errors": {}}
    for mode in report.get("modes", []):
        for key in ("workflows_ok", "workflows_failed", "turns_ok"):
            total[key] += mode.get(key) or 0
        for name, count in (mode.get("errors") or {}).items():
            total["errors"][name] = total["errors"].get(name, 0) + count
    return total


STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_logs(path):
    """(unix time, line) of every timestamped line of `docker compose logs -t`."""
    import calendar
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            m = STAMP.search(line)
            if not m:
                continue
            whole, _, frac = m.group(1).partition(".")
            t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))
            lines.append((t, line))
    return lines


def log_counts(lines):
    handed = sum(int(m.group(1)) for _, l in lines for m in [re.search(r"handed_off=(\d+)", l)] if m)
    return {"states_handed_off": handed,
            "fenced": sum(1 for _, l in lines if "fenced until registered again" in l),
            "ejections": sum(1 for _, l in lines if "node ejected" in l and "edge" in l.split("|")[0]),
            "edge_turn_call_failures": sum(1 for _, l in lines if "worker turn call failed" in l)}


def report(args):
    logs = load_logs(args.compose_log) if args.compose_log else None
    events = []
    with open(args.events, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                events.append(json.loads(line))
    phases = []
    with open(args.phases, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                name, start, end, disrupted = line.rstrip("\n").split("\t")
                phases.append((name, float(start), float(end), float(disrupted or start)))
    results = []
    for name, start, end, disrupted in phases:
        inside = [e for e in events if start <= e["t"] < end]
        failures = {}
        for e in inside:
            if not e["ok"]:
                failures[e["error"]] = failures.get(e["error"], 0) + 1
        lost = sum(1 for e in inside if e["error"] and "previous_response_not_found" in e["error"])
        # chains that moved: the worker of a chain's last ok turn before the disruption differs
        # from its first ok turn after it.
        moved = 0
        recovery = 0.0
        chains = sorted({e["chain"] for e in inside})
        for chain in chains:
            mine = [e for e in inside if e["chain"] == chain]
            before = [e for e in mine if e["t"] < disrupted and e["ok"]]
            after = [e for e in mine if e["t"] >= disrupted and e["ok"]]
            if before and any(e["worker"] != before[-1]["worker"] for e in after):
                moved += 1
            # longest stretch without a completed turn, from the disruption on
            last_ok = before[-1]["t"] if before else disrupted
            for e in mine:
                if e["t"] < disrupted:
                    continue
                if e["ok"]:
                    recovery = max(recovery, e["t"] + e["ms"] / 1000 - max(last_ok, disrupted))
                    last_ok = e["t"] + e["ms"] / 1000
        ok = sum(1 for e in inside if e["ok"])
        entry = {"phase": name, "canary_turns_ok": ok, "canary_turns_failed": len(inside) - ok,
                 "canary_failures": failures, "lost_sessions": lost, "chains": len(chains),
                 "chains_moved": moved, "recovery_s": round(recovery, 2)}
        if args.loadtest:
            entry["loadtest"] = load_loadtest(os.path.join(args.loadtest, f"{name}.json"))
        if logs is not None:
            entry["logs"] = log_counts([x for x in logs if start <= x[0] < end])
        results.append(entry)
    print(f"{'phase':<8} {'canary ok':>9} {'failed':>6} {'lost':>4} {'moved':>7} {'recovery':>8}  "
          f"{'loadtest wf ok/failed':>21} {'turns ok':>8} {'handed off':>10} {'fenced':>6} {'ejections':>9}  errors")
    for r in results:
        lg = r.get("logs") or {}
        lt = r.get("loadtest") or {}
        errors = dict(r["canary_failures"])
        for k, v in (lt.get("errors") or {}).items():
            errors[f"loadtest:{k}"] = v
        wf = f"{lt.get('workflows_ok', '-')}/{lt.get('workflows_failed', '-')}" if lt else "-"
        print(f"{r['phase']:<8} {r['canary_turns_ok']:>9} {r['canary_turns_failed']:>6} "
              f"{r['lost_sessions']:>4} {r['chains_moved']:>3}/{r['chains']:<3} {r['recovery_s']:>7.2f}s  "
              f"{wf:>21} {lt.get('turns_ok', '-'):>8} {lg.get('states_handed_off', '-'):>10} "
              f"{lg.get('fenced', '-'):>6} {lg.get('ejections', '-'):>9}  {json.dumps(errors) if errors else '-'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--edges", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--stop", required=True)
    r.add_argument("--chains", type=int, default=12)
    r.add_argument("--interval", type=float, default=0.25)
    r.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("report")
    p.add_argument("--events", required=True)
    p.add_argument("--phases", required=True)
    p.add_argument("--loadtest")
    p.add_argument("--compose-log")
    p.add_argument("--json")
    args = parser.parse_args()
    sys.exit(run(args) if args.command == "run" else report(args))


if __name__ == "__main__":
    main()
