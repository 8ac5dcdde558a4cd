"""tether's own rules for its rendered Kubernetes manifests, which no schema or linter knows.

    check_manifests.py pods RENDERED.yaml     drain, probes and skip reasons of every pod template
    check_manifests.py metrics ROOT           the autoscaling metric exists end to end
    check_manifests.py binary TETHER RENDERED the real binary takes every tether container's
                                              command line and TETHER_* variables

`pods`: every tether container's drain (TETHER_SHUTDOWN_GRACE, default 10 s, plus a preStop
sleep) ends before the pod's terminationGracePeriodSeconds, with 5 s to exit; it is probed for
readiness on /readyz and liveness on /healthz; and every checkov skip annotation gives a reason.
`metrics`: each custom metric the HPA targets is served by a prometheus-adapter rule whose
series is a metric tether declares (services/*/src/metrics.rs), scraped by a job of
prometheus/prometheus.yml that sets the `namespace` and `pod` labels the rule needs.
`binary`: clap ignores an environment variable it does not know, so a misspelt TETHER_* setting
would be silently dropped: every TETHER_* variable of a tether container (its env and the
ConfigMap it loads) must be one its subcommand's `--help` lists, or one tether-entrypoint reads;
the command line must parse (`--help` appended); and each init container `certs` is run for real
against a fresh CA, issuing the files its pod's containers point TETHER_TLS_CERT/KEY at without
writing into the CA's directory. An overlay needing an engine this binary was built without is
skipped (exit 3), not failed.
Prints one line per problem; exits 1 if there is any.
"""

import os
import re
import ssl
import subprocess
import sys
import tempfile
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


SKIPPED = 3
# Stand-ins for the downward API's values when a command line or path is checked.
POD_FIELDS = {"POD_NAME": "worker-7d9f8-abcde", "POD_IP": "10.1.2.3"}


def expand(text, env):
    """Kubernetes' $(VAR) expansion in args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container, config):
    env = dict(POD_FIELDS)
    for source in container.get("envFrom", []):
        env.update(config.get(source.get("configMapRef", {}).get("name"), {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "valueFrom" in item and item["name"] not in env:
            env[item["name"]] = "from-" + next(iter(item["valueFrom"]))
    return env


def run(binary, args, env=None):
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_COLOR": "1"}
    clean.update(env or {})
    return subprocess.run([binary, *args], env=clean, capture_output=True, text=True, timeout=60)


def check_binary(binary, rendered):
    root = Path(__file__).resolve().parents[2]
    entrypoint_vars = set(re.findall(r"\b(TETHER_[A-Z0-9_]+)", (root / "deploy/images/tether-entrypoint").read_text()))
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    config = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    problems, known_envs, checked = [], {}, 0
    for doc in docs:
        if doc["kind"] not in KINDS_WITH_PODS:
            continue
        pod = doc["spec"]["template"]["spec"]
        tethers = [c for c in pod.get("initContainers", []) + pod["containers"] if TETHER_IMAGE.match(c.get("image", ""))]
        with tempfile.TemporaryDirectory() as scratch:
            issued_here = False
            for container in tethers:
                where = f"{doc['kind']}/{doc['metadata']['name']} container {container['name']}"
                env = container_env(container, config)
                args = [expand(arg, env) for arg in container.get("args", [])]
                if not args:
                    problems.append(f"{where}: no subcommand in args")
                    continue
                command = args[0]
                if command not in known_envs:
                    help_text = run(binary, [command, "--help"])
                    known_envs[command] = set(re.findall(r"\[env: (TETHER_[A-Z0-9_]+)", help_text.stdout))
                    if "--engine" in help_text.stdout:
                        known_envs[command + " engines"] = help_text.stdout
                if "--engine" in args:
                    engine = args[args.index("--engine") + 1]
                    values = re.search(r"possible values: ([^\]]+)\]", known_envs.get(command + " engines", ""))
                    listed = re.findall(r"^\s+- (\w+):", known_envs.get(command + " engines", ""), re.M)
                    engines = set(listed) | set((values.group(1) if values else "").replace(" ", "").split(","))
                    if engine not in engines:
                        print(f"check_manifests: skipped: {binary} has no `--engine {engine}` ({where})")
                        return SKIPPED
                for name in sorted(env):
                    if name.startswith("TETHER_") and name not in known_envs[command] | entrypoint_vars:
                        problems.append(f"{where}: `tether {command}` does not know {name} (it would be ignored)")
                if command == "certs":
                    # Run it, with the pod's mount points mapped into the scratch directory.
                    ca, out = Path(scratch, "ca"), Path(scratch, "tls")
                    made = run(binary, ["certs", "--out", str(ca)])
                    if made.returncode != 0:
                        problems.append(f"cannot make a CA: {made.stderr.strip()}")
                        continue
                    before = sorted(os.listdir(ca))
                    issued_here = True
                    real = [a.replace("/var/lib/tether/ca", str(ca)).replace("/var/lib/tether/tls", str(out)) for a in args]
                    issued = run(binary, real)
                    if issued.returncode != 0:
                        problems.append(f"{where}: `{' '.join(args)}` failed: {issued.stderr.strip()}")
                    # Peers dial the pod IP it advertises: it must be an IP address SAN.
                    for pem in out.glob("*.pem") if out.is_dir() else []:
                        sans = ssl._ssl._test_decode_cert(str(pem)).get("subjectAltName", ())
                        if ("IP Address", POD_FIELDS["POD_IP"]) not in sans:
                            problems.append(f"{where}: {pem.name} lacks the pod IP as an IP SAN: {sans}")
                    if sorted(os.listdir(ca)) != before:
                        problems.append(f"{where}: wrote into the CA's directory (mounted read-only)")
                    continue
                parsed = run(binary, [*args, "--help"])
                if parsed.returncode != 0:
                    problems.append(f"{where}: `tether {' '.join(args)}` does not parse: {parsed.stderr.strip()}")
                for name in ("TETHER_TLS_CERT", "TETHER_TLS_KEY", "TETHER_TLS_CA"):
                    path = env.get(name)
                    if path and issued_here:
                        local = path.replace("/var/lib/tether/ca", str(Path(scratch, "ca"))).replace(
                            "/var/lib/tether/tls", str(Path(scratch, "tls"))
                        )
                        if not Path(local).is_file():
                            problems.append(f"{where}: {name}={path}, which the init container did not issue")
                checked += 1
    if checked == 0:
        problems.append(f"{rendered}: no tether container checked")
    return problems


def main(argv):
    if argv[1:2] == ["binary"] and len(argv) == 4:
        problems = check_binary(argv[2], argv[3])
        if problems == SKIPPED:
            return SKIPPED
    elif len(argv) == 3 and argv[1] in ("pods", "metrics"):
        problems = check_pods(argv[2]) if argv[1] == "pods" else check_metrics(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 64
    for problem in problems:
        print(f"check_manifests: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
