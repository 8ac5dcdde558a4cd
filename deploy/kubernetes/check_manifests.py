"""tether's own rules for its rendered Kubernetes manifests, which no schema or linter knows.

    check_manifests.py pods RENDERED.yaml     drain, probes and skip reasons of every pod template
    check_manifests.py metrics ROOT           the autoscaling metric exists end to end

`pods`: every tether container's drain (TETHER_SHUTDOWN_GRACE, default 10 s, plus a preStop
sleep) ends before the pod's terminationGracePeriodSeconds, with 5 s to exit; it is probed for
readiness on /readyz and liveness on /healthz; and every checkov skip annotation gives a reason.
`metrics`: each custom metric the HPA targets is served by a prometheus-adapter rule whose
series is a metric tether declares (services/*/src/metrics.rs), scraped by a job of
prometheus/prometheus.yml that sets the `namespace` and `pod` labels the rule needs.
Prints one line per problem; exits 1 if there is any.
"""

import re
import sys
from pathlib import Path

import yaml

EXIT_MARGIN_S = 5
DEFAULT_GRACE_S = 10
TETHER_IMAGE = re.compile(r"^(?:.*/)?tether/tether(?::|@|$)")
KINDS_WITH_PODS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def seconds(text):
    """A humantime duration as tether's flags take it ("30s", "1m30s", "500ms")."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def probe_reaches(probe, path):
    if not probe:
        return False
    if "httpGet" in probe:
        return probe["httpGet"].get("path") == path
    if "exec" in probe:
        return any(path in arg for arg in probe["exec"].get("command", []))
    return False


def check_pods(rendered):
    problems = []
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                if not re.fullmatch(r"CKV2?_K8S_\d+", check) or len(reason.strip()) < 20:
                    problems.append(f"{where}: {key} needs CHECK_ID=<a reason>, got {value!r}")
        if doc["kind"] not in KINDS_WITH_PODS:
            continue
        pod = doc["spec"]["template"]["spec"]
        budget = pod.get("terminationGracePeriodSeconds", 30)
        for container in pod.get("containers", []):
            if not TETHER_IMAGE.match(container.get("image", "")):
                continue
            name = f"{where} container {container['name']}"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            grace = seconds(env["TETHER_SHUTDOWN_GRACE"]) if env.get("TETHER_SHUTDOWN_GRACE") else DEFAULT_GRACE_S
            sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
            if sleep + grace + EXIT_MARGIN_S > budget:
                problems.append(
                    f"{name}: preStop {sleep}s + shutdown grace {grace:g}s + {EXIT_MARGIN_S}s to exit "
                    f"> terminationGracePeriodSeconds {budget}: the drain would be cut by SIGKILL"
                )
            if not probe_reaches(container.get("readinessProbe"), "/readyz"):
                problems.append(f"{name}: no readiness probe on /readyz")
            if not probe_reaches(container.get("livenessProbe"), "/healthz"):
                problems.append(f"{name}: no liveness probe on /healthz")
    if not any(d["kind"] in KINDS_WITH_PODS for d in docs):
        problems.append(f"{rendered}: no workload rendered")
    return problems


def check_metrics(root):
    root = Path(root)
    here = root / "deploy/kubernetes"
    problems = []
    declared = set()
    for source in root.glob("services/*/src/metrics.rs"):
        declared |= set(re.findall(r'"(tether_[a-z0-9_]+)"', source.read_text()))
    rules = yaml.safe_load((here / "prometheus/adapter-rules.yaml").read_text())["rules"]
    served = {}
    for rule in rules:
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        served[rule["name"]["as"]] = series
        if series not in declared:
            problems.append(f"adapter rule reads {series}, which no services/*/src/metrics.rs declares")
        if set(rule["resources"]["overrides"]) != {"namespace", "pod"}:
            problems.append(f"adapter rule for {series} must map the namespace and pod labels")
    hpa = yaml.safe_load((here / "base/worker-autoscaling.yaml").read_text())
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            name = metric["pods"]["metric"]["name"]
            if name not in served:
                problems.append(f"the HPA targets {name}, which no adapter rule serves")
    if not any(m["type"] == "Resource" for m in hpa["spec"]["metrics"]):
        problems.append("the HPA has no resource (CPU) fallback")
    prometheus = yaml.safe_load((here / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    worker = jobs.get("worker")
    if worker is None:
        problems.append("prometheus.yml has no `worker` job")
    else:
        targets = {r.get("target_label") for r in worker.get("relabel_configs", [])}
        if not {"namespace", "pod"} <= targets:
            problems.append("prometheus.yml's worker job must set the namespace and pod labels")
    return problems


def main(argv):
    if len(argv) != 3 or argv[1] not in ("pods", "metrics"):
        print(__doc__, file=sys.stderr)
        return 64
    problems = check_pods(argv[2]) if argv[1] == "pods" else check_metrics(argv[2])
    for problem in problems:
        print(f"check_manifests: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
