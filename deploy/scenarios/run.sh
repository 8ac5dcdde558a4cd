#!/usr/bin/env bash
# Failure and migration scenarios against the compose cluster (deploy/docker-compose.yml, with
# etcd membership). Brings a cluster up under its own project name and ports, then runs one
# phase per disruption, each under load from tether-loadtest (WebSocket agent loops, store=true)
# plus canary chains (deploy/scenarios/canary.py: stored HTTP chains through both edges):
#
#   kill      docker kill a worker; it leaves the ring; later docker start it again (rejoins)
#   pause     docker pause a worker past its lease TTL, then unpause (fenced, re-registers)
#   scale     scale workers 3 -> 5 (new workers take sessions, pulling state) -> 3 (drain)
#   restart   docker restart every worker one by one (SIGTERM: drain and hand off, then start)
#   etcd      docker pause etcd past the lease TTL, then unpause (every lease expires at once)
#
# Then prints a table per phase: canary turns ok/failed, lost sessions, chains that moved to
# another worker, recovery (longest time a chain could not complete a turn after the disruption),
# the loadtest's workflows/turns/errors; and the disruption timings (ejection, lease expiry,
# rejoin). Asserts: 0 lost store=true sessions and 0 failed turns in every phase (a response in
# flight on a killed or paused worker continues on the next owner; drain and hand-off cover
# `scale` and `restart`; an etcd stall fences nobody); exit 1 otherwise.
#
# Usage: deploy/scenarios/run.sh [--out DIR] [--keep] [--phases kill,pause,scale,restart,etcd]
#                                [--agents N] [--no-build]
# Needs: the images (deploy/images/build.sh, run when missing unless --no-build), a tether binary
# with etcd membership, target/release/tether-loadtest (built when missing), python3, curl.
# Environment: TETHER_SCENARIO_PROJECT (default tether-scenarios), TETHER_EDGE1_PORT/EDGE2_PORT
# (host ports of the edges; default: ports Docker picks, read back after `up`), TETHER_LEASE_TTL
# (default 3s), TETHER_LOADTEST (binary path).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
COMPOSE_FILE=$ROOT/deploy/docker-compose.yml

OUT=""
KEEP=0
PHASES=kill,pause,scale,restart,etcd
AGENTS=6
BUILD=1
while (($#)); do
    case $1 in
        --out) OUT=${2:?}; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --phases) PHASES=${2:?}; shift 2 ;;
        --agents) AGENTS=${2:?}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
    esac
done

export COMPOSE_PROJECT_NAME=${TETHER_SCENARIO_PROJECT:-tether-scenarios}
# Empty: Docker picks free host ports (the compose file publishes "127.0.0.1::8080").
export TETHER_EDGE1_PORT=${TETHER_EDGE1_PORT:-}
export TETHER_EDGE2_PORT=${TETHER_EDGE2_PORT:-}
export TETHER_LEASE_TTL=${TETHER_LEASE_TTL:-3s}
export TETHER_CLUSTER=${TETHER_CLUSTER:-scenarios}
export TETHER_LOG_FORMAT=plain NO_COLOR=1
LOADTEST=${TETHER_LOADTEST:-$ROOT/target/release/tether-loadtest}
EDGE1="" # set once the cluster is up (published_edge)
EDGE2=""
TTL_S=${TETHER_LEASE_TTL%s}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/tether-scenarios.XXXXXX")}
mkdir -p "$OUT"

log() { printf '=== %s scenarios: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "run.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

if docker compose version >/dev/null 2>&1; then
    compose() { docker compose -f "$COMPOSE_FILE" "$@"; }
elif command -v docker-compose >/dev/null; then
    compose() { docker-compose -f "$COMPOSE_FILE" "$@"; }
else
    die "neither 'docker compose' nor docker-compose is installed"
fi

# --- preconditions ---------------------------------------------------------------------------------
for image in tether/etcd:latest tether/tether:latest; do
    if ! docker image inspect "$image" >/dev/null 2>&1; then
        ((BUILD)) || die "$image is missing: run deploy/images/build.sh"
        log "building the images"
        "$ROOT/deploy/images/build.sh"
        break
    fi
done
# (read the whole help first: `grep -q` closing the pipe early fails the pipeline under pipefail)
help=$(docker run --rm tether/tether:latest worker --help) || die "the tether image does not run"
grep -q -- '--etcd' <<<"$help" \
    || die "the tether image has no etcd membership (rebuild it from a newer binary)"
if [[ ! -x $LOADTEST ]]; then
    log "building tether-loadtest"
    (cd "$ROOT" && cargo build --release -p tether-loadtest)
fi

# --- helpers ---------------------------------------------------------------------------------------
CANARY_PID=""
LOGS_PID=""
cleanup() {
    local rc=$?
    touch "$OUT/canary.stop"
    if [[ -n $CANARY_PID ]]; then wait "$CANARY_PID" 2>/dev/null || true; fi
    if [[ -n $LOGS_PID ]]; then kill "$LOGS_PID" 2>/dev/null || true; fi
    if ((KEEP)); then
        log "cluster kept (project $COMPOSE_PROJECT_NAME); down: COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME docker-compose -f $COMPOSE_FILE down -v"
    else
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    log "artifacts in $OUT"
    exit "$rc"
}
trap cleanup EXIT

# members KIND: the ids in edge1's membership view (from etcd), one per line; fails when edge1
# does not answer.
members() {
    local view
    view=$(curl -fsS --max-time 2 "$EDGE1/v1/cluster" 2>/dev/null) || return 1
    python3 -c 'import json,sys; [print(m["id"]) for m in json.loads(sys.argv[2])[sys.argv[1]]]' "$1" "$view"
}
worker_count() { local m; m=$(members workers) || return 1; grep -c . <<<"$m" || true; }
# wait_until DEADLINE_S CMD...: polls CMD every 100 ms; prints the seconds it took; 1 on timeout.
wait_until() {
    local limit=$1 t0; t0=$(now); shift
    while ! "$@"; do
        if awk -v t="$(since "$t0")" -v l="$limit" 'BEGIN { exit !(t > l) }'; then return 1; fi
        sleep 0.1
    done
    since "$t0"
}
is_member() { local m; m=$(members workers) && grep -qx "$1" <<<"$m"; }
not_member() { local m; m=$(members workers) && ! grep -qx "$1" <<<"$m"; }
workers_are() { local n; n=$(worker_count) && [[ $n == "$1" ]]; }
# in_etcd ID: the worker's registration key exists (its lease is alive)
in_etcd() {
    [[ -n $(compose exec -T etcd etcdctl get --keys-only "/tether/$TETHER_CLUSTER/workers/$1" 2>/dev/null) ]]
}
not_in_etcd() { ! in_etcd "$1"; }
# the worker id of a container: its hostname (see deploy/images/tether-entrypoint)
worker_id() { docker inspect -f '{{.Config.Hostname}}' "$1"; }
worker_containers() { compose ps -q worker | while read -r c; do
    [[ $(docker inspect -f '{{.State.Running}}' "$c") == true ]] && echo "$c"; done; }
ejections() { # data-plane ejections of workers counted by edge1
    curl -fsS --max-time 2 "$EDGE1/metrics" 2>/dev/null \
        | awk '/^tether_node_ejections_total\{.*kind="workers?"/ { s += $NF } END { print s + 0 }'
}
ejected_since() { awk -v a="$(ejections)" -v b="$1" 'BEGIN { exit !(a > b) }'; }
edges_ready() { curl -fs -o /dev/null --max-time 2 "$EDGE1/readyz" && curl -fs -o /dev/null --max-time 2 "$EDGE2/readyz"; }
cluster_complete() { local s; s=$(members shards) && workers_are "$1" && [[ $(grep -c . <<<"$s") == 2 ]]; }

TIMINGS=()
timing() { TIMINGS+=("$(printf '  %-8s %-48s %s' "$1" "$2" "$3")"); log "$1: $2 $3"; }
# measure PHASE WHAT LIMIT_S CMD...: records how long until CMD holds (from now), or a timeout.
measure() {
    local phase=$1 what=$2 limit=$3 s; shift 3
    if s=$(wait_until "$limit" "$@"); then timing "$phase" "$what after" "${s}s"
    else timing "$phase" "$what" "NOT within ${limit}s"; fi
}

# phase NAME SECONDS LEAD FN: loadtest for SECONDS, FN (the disruption) LEAD seconds in.
phase() {
    local name=$1 seconds=$2 lead=$3 fn=$4 start disrupted lt_pid
    log "phase $name: loadtest ${seconds}s, disruption at ${lead}s"
    start=$(now)
    "$LOADTEST" --url "$EDGE1" --mode ws --agents "$AGENTS" --workflows 1000000 --warmup 0 \
        --duration "${seconds}s" --request-timeout 10s --turns 4 --tool-latency uniform:20ms..60ms \
        --input-tokens 300 --tool-output-bytes 800 --output-tokens 40 --quiet \
        --json "$OUT/$name.json" >"$OUT/$name.loadtest.txt" 2>&1 &
    lt_pid=$!
    sleep "$lead"
    disrupted=$(now)
    "$fn"
    wait "$lt_pid" || log "phase $name: the loadtest exited $? (see $OUT/$name.loadtest.txt)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$(now)" "$disrupted" >>"$OUT/phases.tsv"
}

disrupt_kill() {
    local c id e0 all
    mapfile -t all < <(worker_containers)
    c=${all[0]}; id=$(worker_id "$c"); e0=$(ejections)
    log "kill: docker kill worker $id"
    docker kill "$c" >/dev/null
    measure kill "data-plane ejection at edge1" 10 ejected_since "$e0"
    measure kill "lease expired in etcd" 30 not_in_etcd "$id"
    measure kill "gone from edge1's membership" 10 not_member "$id"
    sleep 3
    docker start "$c" >/dev/null
    measure kill "docker start: rejoined" 60 is_member "$id"
}

disrupt_pause() {
    local c id t0 hold all
    mapfile -t all < <(worker_containers)
    c=${all[1]}; id=$(worker_id "$c"); t0=$(now)
    hold=$(awk -v t="$TTL_S" 'BEGIN { print t + 2 }')
    log "pause: docker pause worker $id for ${hold}s (lease TTL ${TTL_S}s)"
    docker pause "$c" >/dev/null
    measure pause "lease expired in etcd" "$hold" not_in_etcd "$id"
    local left; left=$(awk -v h="$hold" -v e="$(since "$t0")" 'BEGIN { d = h - e; print (d > 0 ? d : 0) }')
    sleep "$left"
    docker unpause "$c" >/dev/null
    measure pause "unpaused: registered again" 30 is_member "$id"
}

disrupt_scale() {
    log "scale: workers 3 -> 5"
    compose up -d --no-recreate --scale worker=5 >/dev/null 2>&1
    measure scale "5 workers in membership" 60 workers_are 5
    sleep 6
    log "scale: workers 5 -> 3 (SIGTERM: drain)"
    local t0; t0=$(now)
    compose up -d --no-recreate --scale worker=3 >/dev/null 2>&1
    timing scale "scale-down (stop, drain, remove) took" "$(since "$t0")s"
    measure scale "3 workers in membership" 30 workers_are 3
}

disrupt_restart() {
    local c id t0
    for c in $(worker_containers); do
        id=$(worker_id "$c"); t0=$(now)
        docker restart -t 15 "$c" >/dev/null
        timing restart "docker restart $id (stop: drain, hand off) took" "$(since "$t0")s"
        measure restart "$id registered again" 60 is_member "$id"
        sleep 2
    done
}

etcd_answers() { compose exec -T etcd etcdctl endpoint health >/dev/null 2>&1; }

disrupt_etcd() {
    local c hold
    c=$(compose ps -q etcd)
    hold=$(awk -v t="$TTL_S" 'BEGIN { print t + 3 }')
    log "etcd: docker pause etcd for ${hold}s (lease TTL ${TTL_S}s)"
    docker pause "$c" >/dev/null
    sleep "$hold" # the stall's length, not a wait for some state
    docker unpause "$c" >/dev/null
    measure etcd "unpaused: etcd answers" 30 etcd_answers
    measure etcd "3 workers in edge1's membership" 30 workers_are 3
    timing etcd "stall (pause to unpause)" "${hold}s"
}

# published_edge SERVICE: the edge's URL on the host, from the port Docker published.
published_edge() {
    local hostport
    hostport=$(compose port "$1" 8080 | tail -n 1) || return 1
    [[ -n $hostport ]] || return 1
    echo "http://127.0.0.1:${hostport##*:}"
}

# --- run -------------------------------------------------------------------------------------------
log "compose project $COMPOSE_PROJECT_NAME, lease TTL $TETHER_LEASE_TTL, artifacts $OUT"
compose down -v --remove-orphans >/dev/null 2>&1 || true
T0=$(now)
compose up -d --scale worker=3 >"$OUT/up.txt" 2>&1 || { cat "$OUT/up.txt"; die "compose up failed"; }
EDGE1=$(published_edge edge1) || die "edge1 publishes no port"
EDGE2=$(published_edge edge2) || die "edge2 publishes no port"
log "edges at $EDGE1 and $EDGE2"
s=$(wait_until 120 edges_ready) || die "edges not ready within 120s"
s=$(wait_until 60 cluster_complete 3) || die "edges do not see 3 workers and 2 shards within 60s: $(curl -s "$EDGE1/v1/cluster")"
timing up "cluster up (3 workers, 2 shards, 2 edges) in" "$(since "$T0")s"
compose logs -f --no-color -t >"$OUT/compose.log" 2>&1 &
LOGS_PID=$!

rm -f "$OUT/canary.stop" "$OUT/canary.jsonl" "$OUT/phases.tsv"
python3 "$HERE/canary.py" run --edges "$EDGE1,$EDGE2" --out "$OUT/canary.jsonl" --stop "$OUT/canary.stop" &
CANARY_PID=$!
sleep 3

IFS=, read -r -a WANT <<<"$PHASES"
for p in "${WANT[@]}"; do
    case $p in
        kill) phase kill 22 6 disrupt_kill ;;
        pause) phase pause 22 6 disrupt_pause ;;
        scale) phase scale 30 5 disrupt_scale ;;
        restart) phase restart 40 5 disrupt_restart ;;
        etcd) phase etcd 22 5 disrupt_etcd ;;
        *) die "unknown phase $p" ;;
    esac
    sleep 2
done
touch "$OUT/canary.stop"; wait "$CANARY_PID" || true; CANARY_PID=""

log "results"
sleep 1; kill "$LOGS_PID" 2>/dev/null || true; wait "$LOGS_PID" 2>/dev/null || true; LOGS_PID=""
python3 "$HERE/canary.py" report --events "$OUT/canary.jsonl" --phases "$OUT/phases.tsv" \
    --loadtest "$OUT" --compose-log "$OUT/compose.log" --json "$OUT/report.json" | tee "$OUT/report.txt"
echo "timings:"
printf '%s\n' "${TIMINGS[@]}" | tee -a "$OUT/report.txt"
# --- assertions ------------------------------------------------------------------------------------
python3 - "$OUT/report.json" <<'PY' | tee "$OUT/assertions.txt"
import json, sys
failed_phases = 0
for r in json.load(open(sys.argv[1])):
    bad = []
    lt = r.get("loadtest") or {}
    lt_errors = lt.get("errors") or {}
    lost = r["lost_sessions"] + sum(v for k, v in lt_errors.items() if "previous_response_not_found" in k)
    if lost:
        bad.append(f"{lost} lost store=true sessions")
    failed = r["canary_turns_failed"] + sum(lt_errors.values())
    if failed:
        bad.append(f"{failed} failed turns")
    if not lt:
        bad.append("no loadtest report")
    if bad:
        failed_phases += 1
        print(f"FAIL {r['phase']}: " + "; ".join(bad))
    else:
        print(f"ok   {r['phase']}")
print("scenarios:", "FAILED" if failed_phases else "passed")
sys.exit(1 if failed_phases else 0)
PY
