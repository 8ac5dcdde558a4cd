#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: for each overlay, render it with kustomize
# (`kubectl kustomize`, kustomize v5), check every object against the Kubernetes API schemas in
# strict mode (kubernetes-validate, unknown fields are errors) of the oldest Kubernetes the
# manifests support (1.30: the edge's preStop `sleep`) and of a current one (1.37), lint it for security
# (checkov: zero failed checks; a skipped check carries its reason in the manifest's
# `checkov.io/skipN` annotation), and check tether's own rules (check_manifests.py: the drain
# fits the termination grace period, probes on /readyz and /healthz); then the autoscaling
# metric end to end (HPA -> prometheus-adapter rule -> a metric tether declares -> scrape job).
# With a tether binary, also per overlay: the binary takes every tether container's command line
# and TETHER_* variables, and the init containers' `tether certs` issue what the pods load.
#
# Usage: deploy/kubernetes/validate.sh [--out DIR] [--kubernetes-versions "X.Y.Z ..."] [--tether-bin PATH] [OVERLAY...]
#   OVERLAY         directories under overlays/ (default: all of them)
#   --out DIR       keep the rendered manifests and reports there (default: a temp dir)
#   --tether-bin    the tether binary (default: $TETHER_BIN; without one those tests are skipped)
#   --kubernetes-versions   the schema versions (default: "1.30.0 1.37.0")
# Tools: kubectl on PATH; kubernetes-validate, checkov and PyYAML from .venv-kubernetes (made by
# .ci/run from requirements.txt), or from $TETHER_K8S_VENV, or on PATH.
# Prints "ok NAME", "skip NAME" or "FAIL NAME" per test and ends with
# "kubernetes: N passed, N failed, N skipped"; exits 1 if any failed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
K8S_VERSIONS="1.30.0 1.37.0"
OUT=""
OVERLAYS=()
while (($#)); do
    case $1 in
        --out) OUT=${2:?}; shift 2 ;;
        --kubernetes-versions) K8S_VERSIONS=${2:?}; shift 2 ;;
        --tether-bin) TETHER_BIN=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "validate.sh: unknown option $1" >&2; exit 64 ;;
        *) OVERLAYS+=("$1"); shift ;;
    esac
done
if ((${#OVERLAYS[@]} == 0)); then
    for dir in "$HERE"/overlays/*/; do OVERLAYS+=("$(basename "$dir")"); done
fi
if [[ -z $OUT ]]; then
    OUT=$(mktemp -d)
    trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT/checkov"

VENV=${TETHER_K8S_VENV:-$ROOT/.venv-kubernetes}
if [[ -x $VENV/bin/python ]]; then
    PATH=$VENV/bin:$PATH
fi
# checkov would otherwise ask its vendor's API for guidelines (no network here, nor needed).
export BC_SKIP_MAPPING=TRUE CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false

passed=0
failed=0
skipped=0
failures=()
test_step() { # test_step NAME LOG CMD...: one test; its output goes to LOG, shown on failure;
    local name=$1 log=$2 rc=0 # exit status 3 means skipped
    shift 2
    "$@" >"$log" 2>&1 || rc=$?
    if ((rc == 0)); then
        echo "ok   $name"
        passed=$((passed + 1))
    elif ((rc == 3)); then
        echo "skip $name: $(tail -n 1 "$log")"
        skipped=$((skipped + 1))
    else
        echo "FAIL $name ($*)"
        sed 's/^/    /' "$log" | tail -n 40
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

missing=()
for tool in kubectl kubernetes-validate checkov python; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "validate.sh: missing ${missing[*]} (kubectl on PATH; the rest: .ci/run makes .venv-kubernetes)"
    echo "kubernetes: 0 passed, 1 failed, 0 skipped"
    exit 1
fi
echo "validate.sh: $(kubectl version --client 2>/dev/null | tr '\n' ' '), kubernetes-validate $(kubernetes-validate --version 2>&1 | tail -n 1), checkov $(checkov --version 2>&1 | tail -n 1); schemas of Kubernetes $K8S_VERSIONS"

for overlay in "${OVERLAYS[@]}"; do
    rendered=$OUT/$overlay.yaml
    if [[ ! -f $HERE/overlays/$overlay/kustomization.yaml ]]; then
        echo "FAIL render-$overlay (no overlays/$overlay/kustomization.yaml)"
        failed=$((failed + 1)); failures+=("render-$overlay")
        continue
    fi
    test_step "render-$overlay" "$OUT/$overlay.render.log" sh -c 'kubectl kustomize "$1" >"$2"' _ "$HERE/overlays/$overlay" "$rendered"
    [[ -s $rendered ]] || continue
    # shellcheck disable=SC2016  # expanded by the inner shell
    test_step "schema-$overlay" "$OUT/$overlay.schema.log" sh -c \
        'f=$1; shift; for v; do kubernetes-validate --strict --quiet --kubernetes-version "$v" "$f" || exit 1; done' \
        _ "$rendered" $K8S_VERSIONS
    cp "$rendered" "$OUT/checkov/$overlay.yaml"
    test_step "invariants-$overlay" "$OUT/$overlay.invariants.log" python "$HERE/check_manifests.py" pods "$rendered"
    if [[ -n ${TETHER_BIN:-} ]]; then
        test_step "binary-$overlay" "$OUT/$overlay.binary.log" python "$HERE/check_manifests.py" binary "$TETHER_BIN" "$rendered"
    else
        echo "skip binary-$overlay: no tether binary (--tether-bin or TETHER_BIN)"
        skipped=$((skipped + 1))
    fi
done
# One checkov run over every rendered overlay (its start-up alone takes ~10 s), then one test per
# overlay: no failed check, and at least one passed (a scan that checked nothing proves nothing).
checkov --directory "$OUT/checkov" --framework kubernetes --skip-download -o json \
    >"$OUT/checkov.json" 2>"$OUT/checkov.log"
for overlay in "${OVERLAYS[@]}"; do
    [[ -f $OUT/checkov/$overlay.yaml ]] || continue
    test_step "checkov-$overlay" "$OUT/$overlay.checkov.log" python - "$OUT/checkov.json" "/$overlay.yaml" <<'PY'
import json, sys
report, path = sys.argv[1], sys.argv[2]
try:
    runs = json.load(open(report))
except ValueError:
    sys.exit(f"checkov wrote no JSON report ({report}); see checkov.log next to it")
runs = runs if isinstance(runs, list) else [runs]
results = [r["results"] for r in runs if r.get("check_type") == "kubernetes"]
def of(kind):
    return [c for r in results for c in r[kind] if c["file_path"] == path]
passed, failed, skipped = of("passed_checks"), of("failed_checks"), of("skipped_checks")
for c in failed:
    print(f"{c['check_id']} {c['check_name']}: {c['resource']} ({path} lines {c['file_line_range']})")
print(f"{path}: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped (reasons in annotations)")
sys.exit(1 if failed or not passed else 0)
PY
done
test_step "autoscaling-metric" "$OUT/metrics.log" python "$HERE/check_manifests.py" metrics "$ROOT"

if ((${#failures[@]})); then
    echo "validate.sh: FAILED: ${failures[*]} (rendered manifests and logs: $OUT)"
fi
echo "kubernetes: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
