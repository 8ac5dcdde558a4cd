"""Runs a rendered overlay's pods as Docker containers, the way a kubelet would, and checks them.

    python3 deploy/kubernetes/smoke.py RENDERED.yaml [--tag TAG] [--keep]

No Kubernetes is needed (none runs here): each pod becomes a pause container holding the pod's
network namespace, hostname and a fixed pod IP (so POD_IP is known before start), then its init
containers run in order to completion and its containers start, all joined to that namespace.
What the manifests say is what runs: image (its tag replaced by --tag), args, env with $(VAR)
expansion and the downward API's POD_NAME/POD_IP, envFrom ConfigMaps, the securityContext (user
and group, fsGroup on volumes, read-only root filesystem, every capability dropped, no privilege
escalation), memory and CPU limits, Secret volumes (with `items` and modes), emptyDirs and
volume claims (Docker volumes with fsGroup applied), the headless Service names of a StatefulSet
(etcd-0.etcd), replicas (the HPA's minReplicas where a Deployment leaves them to it).

Then it asserts: every container's readiness probe passes (exec, or httpGet run as curl inside the
pod) and its liveness probe too, within a deadline; the edge serves a turn; the cluster view lists
every worker and shard at https://<pod IP>; a worker stopped the way the kubelet stops it
(SIGTERM, then SIGKILL after terminationGracePeriodSeconds) drains, hands off and exits 0 in
time; and a turn still completes after it. Secrets are made here: the CA by the image's own
`tether certs`, the edges' API keys as a fixed test key.
Prints "ok NAME" / "FAIL NAME" per check (7) and ends with "smoke: N passed, N failed". Exits 1
on a failure. `.ci/test` runs it on the dev overlay with the images it built.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PREFIX = "tether-k8s-smoke"
# A /24 for the pods (IPs from .10 up): the first of these no other Docker network overlaps.
SUBNETS = ["172.30.77", "10.213.77", "192.168.177"]
ORDER = ["etcd", "shard", "worker", "edge"]  # start order: membership, then the tether roles
API_KEY = "sk-smoke=smoke"


def docker(*args, check=True, capture=True, timeout=120):
    run = subprocess.run(["docker", *args], capture_output=capture, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}...: {run.stderr.strip()}")
    return run


def expand(text, env):
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), str(text))


def quantity_bytes(text):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, scale in units.items():
        if str(text).endswith(suffix):
            return int(float(str(text)[: -len(suffix)]) * scale)
    return int(text)


def quantity_cpus(text):
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


class Smoke:
    def __init__(self, docs, tag, workdir):
        self.docs = docs
        self.tag = tag
        self.workdir = Path(workdir)
        self.config = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
        self.secrets = {}
        self.subnet = None
        self.next_ip = 10
        self.pods = []  # (pod name, role, ip, [container names], pod spec)
        self.passed = 0
        self.failed = 0

    def result(self, name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok

    def image(self, name):
        base = name.split("@")[0].rsplit(":", 1)[0] if ":" in name.split("/")[-1] else name
        return f"{base}:{self.tag}"

    # --- secrets ---------------------------------------------------------------------------
    def make_secrets(self, tether_image):
        ca = self.workdir / "secret-tether-ca"
        ca.mkdir()
        docker("run", "--rm", "--user", "0", "-v", f"{ca}:/out", tether_image, "certs", "--out", "/out")
        self.secrets["tether-ca"] = {p.name: p.read_bytes() for p in ca.iterdir()}
        self.secrets["tether-edge"] = {"api-keys": API_KEY.encode()}

    def secret_dir(self, pod, volume, fs_group):
        source = volume["secret"]
        data = self.secrets[source["secretName"]]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        path = self.workdir / f"{pod}-{volume['name']}"
        path.mkdir()
        for item in items:
            target = path / item["path"]
            target.write_bytes(data[item["key"]])
            target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            if fs_group is not None:
                shutil.chown(target, group=fs_group)
        return str(path)

    # --- pods ------------------------------------------------------------------------------
    def workloads(self):
        hpa_min = {
            d["spec"]["scaleTargetRef"]["name"]: d["spec"].get("minReplicas", 1)
            for d in self.docs
            if d["kind"] == "HorizontalPodAutoscaler"
        }
        found = []
        for doc in self.docs:
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            name = doc["metadata"]["name"]
            replicas = doc["spec"].get("replicas", hpa_min.get(name, 1))
            labels = doc["spec"]["template"]["metadata"]["labels"]
            role = labels.get("app.kubernetes.io/component", name)
            role = "etcd" if labels.get("app.kubernetes.io/name") == "etcd" else role
            found.append((ORDER.index(role) if role in ORDER else len(ORDER), doc, role, replicas))
        return [(doc, role, replicas) for _, doc, role, replicas in sorted(found, key=lambda f: f[0])]

    def start_pod(self, doc, role, index):
        spec = doc["spec"]["template"]["spec"]
        stateful = doc["kind"] == "StatefulSet"
        pod = f"{doc['metadata']['name']}-{index}" if stateful else f"{doc['metadata']['name']}-smoke{index}"
        ip = f"{self.subnet}.{self.next_ip}"
        self.next_ip += 1
        security = spec.get("securityContext", {})
        fs_group = security.get("fsGroup")
        aliases = [f"{pod}.{doc['spec']['serviceName']}"] if stateful else []
        pause = f"{PREFIX}-{pod}"
        tether_image = self.image("tether/tether")
        args = ["run", "-d", "--name", pause, "--hostname", pod, "--network", PREFIX, "--ip", ip]
        for alias in aliases:
            args += ["--network-alias", alias]
        docker(*args, "--entrypoint", "sleep", tether_image, "infinity")

        volumes = {}
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                volumes[volume["name"]] = self.secret_dir(pod, volume, fs_group)
            else:  # emptyDir, persistentVolumeClaim
                name = f"{PREFIX}-{pod}-{volume['name']}"
                docker("volume", "create", name)
                volumes[volume["name"]] = name
        for template in doc["spec"].get("volumeClaimTemplates", []):
            name = f"{PREFIX}-{pod}-{template['metadata']['name']}"
            docker("volume", "create", name)
            volumes[template["metadata"]["name"]] = name
        for name in volumes.values():  # an emptyDir is 0777; fsGroup makes it group-owned, setgid
            if not name.startswith("/"):
                group = f"chgrp -R {fs_group} /v && chmod g+s /v && " if fs_group is not None else ""
                docker("run", "--rm", "--user", "0", "--entrypoint", "sh", "-v", f"{name}:/v:nocopy",
                       tether_image, "-c", f"{group}chmod 0777 /v")

        containers = []
        for init in spec.get("initContainers", []):
            if init.get("restartPolicy") == "Always":
                containers.append(self.run_container(pod, ip, init, spec, volumes, detach=True))
                continue
            self.run_container(pod, ip, init, spec, volumes, detach=False)
        for container in spec["containers"]:
            containers.append(self.run_container(pod, ip, container, spec, volumes, detach=True))
        self.pods.append((pod, role, ip, containers, spec))

    def run_container(self, pod, ip, container, spec, volumes, detach):
        name = f"{PREFIX}-{pod}-{container['name']}"
        env = {"POD_NAME": pod, "POD_IP": ip}
        for source in container.get("envFrom", []):
            env.update(self.config[source["configMapRef"]["name"]])
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            elif "fieldRef" in item.get("valueFrom", {}):
                field = item["valueFrom"]["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": pod, "status.podIP": ip}[field]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]].decode()
        pod_security = spec.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        args = ["run", "--name", name, "--network", f"container:{PREFIX}-{pod}"]
        args += ["-d"] if detach else ["--rm"]
        if "runAsUser" in security:
            args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
        if pod_security.get("fsGroup") is not None:
            args += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(quantity_bytes(limits["memory"]))]
        if "cpu" in limits:
            args += ["--cpus", str(quantity_cpus(limits["cpu"]))]
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            # emptyDirs and claims start empty (no copy of the image's files at the mount point)
            kind = "type=bind" if source.startswith("/") else "type=volume,volume-nocopy"
            readonly = ",readonly" if mount.get("readOnly") else ""
            args += ["--mount", f"{kind},src={source},dst={mount['mountPath']}{readonly}"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        if container.get("command"):
            args += ["--entrypoint", container["command"][0]]
        args.append(self.image(container["image"]))
        args += [expand(a, env) for a in container.get("command", [])[1:] + container.get("args", [])]
        run = docker(*args, check=False, timeout=300)
        if run.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        return name

    # --- probes ----------------------------------------------------------------------------
    def probe(self, key, ip, probe):
        """One probe, as the kubelet runs it: exec inside the container; httpGet and tcpSocket from
        outside it (here from the pod's pause container, which has curl) to the pod IP."""
        pod, container = key.split("|")
        if "exec" in probe:
            return docker("exec", container, *probe["exec"]["command"], check=False, timeout=30).returncode == 0
        if "httpGet" in probe:
            url = f"http://{ip}:{self.port(key, probe['httpGet']['port'])}{probe['httpGet']['path']}"
            command = ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", url]
            return docker("exec", f"{PREFIX}-{pod}", *command, check=False, timeout=30).returncode == 0
        if "tcpSocket" in probe:
            # curl's telnet scheme only connects: exit 28 means connected, then no data in 2 s
            url = f"telnet://{ip}:{self.port(key, probe['tcpSocket']['port'])}"
            command = ["curl", "-s", "--max-time", "2", "-o", "/dev/null", url]
            return docker("exec", f"{PREFIX}-{pod}", *command, check=False, timeout=30).returncode in (0, 28)
        return False

    def port(self, container_name, port):
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        spec = self.container_specs[container_name]
        return next(p["containerPort"] for p in spec.get("ports", []) if p.get("name") == port)

    def wait_ready(self, deadline_s):
        self.container_specs = {}
        pending = {}
        for pod, _, ip, containers, spec in self.pods:
            specs = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
            specs += spec["containers"]
            for name, container in zip(containers, specs):
                key = f"{pod}|{name}"
                self.container_specs[key] = container
                pending[key] = (ip, container)
        deadline = time.monotonic() + deadline_s
        while pending and time.monotonic() < deadline:
            for key, (ip, container) in list(pending.items()):
                probe = container.get("readinessProbe")
                if probe is None or self.probe(key, ip, probe):
                    pending.pop(key)
            if pending:
                time.sleep(0.5)  # a poll interval between probes, not a wait for a condition
        for key in self.container_specs:
            print(f"     {'ready' if key not in pending else 'NOT READY'} {self.describe(key)}")
        self.result(f"every container's readiness probe passes ({len(self.container_specs)})", not pending,
                    ", ".join(self.describe(key) for key in pending))
        dead = []
        for key, container in self.container_specs.items():
            ip = next(ip for pod, _, ip, _, _ in self.pods if pod == key.split("|")[0])
            if "livenessProbe" in container and not self.probe(key, ip, container["livenessProbe"]):
                dead.append(self.describe(key))
        self.result("every container's liveness probe passes", not dead, ", ".join(dead))
        return not pending

    def describe(self, key):
        return f"{key.split('|')[0]}/{self.container_specs[key]['name']}"

    # --- the cluster at work -----------------------------------------------------------------
    def edge(self):
        return next((pod, ip, containers[0]) for pod, role, ip, containers, _ in self.pods if role == "edge")

    def turn(self, label):
        _, ip, container = self.edge()
        body = json.dumps({"model": "tether-sim", "input": "hello from the smoke test"})
        run = docker("exec", container, "curl", "-sS", "--max-time", "20", "-XPOST",
                     f"http://{ip}:8080/v1/responses", "-H", "content-type: application/json",
                     "-H", f"authorization: Bearer {API_KEY.split('=')[0]}", "-d", body, check=False, timeout=60)
        try:
            reply = json.loads(run.stdout)
        except ValueError:
            reply = {}
        return self.result(label, reply.get("status") == "completed", "" if reply.get("status") == "completed"
                           else (run.stdout or run.stderr)[:300])

    def cluster_view(self):
        _, ip, container = self.edge()
        run = docker("exec", container, "curl", "-sS", "--max-time", "5", f"http://{ip}:8080/v1/cluster",
                     "-H", f"authorization: Bearer {API_KEY.split('=')[0]}", check=False)
        text = run.stdout
        want = [(pod, ip) for pod, role, ip, _, _ in self.pods if role in ("worker", "shard")]
        missing = [pod for pod, ip in want if pod not in text or f"https://{ip}:" not in text]
        return self.result("cluster view lists every worker and shard at https://<pod IP>", not missing,
                           f"missing {missing}: {text[:400]}" if missing else "")

    def drain_worker(self):
        pod, _, _, containers, spec = next(p for p in self.pods if p[1] == "worker")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        started = time.monotonic()
        docker("stop", "-t", str(grace), containers[-1], timeout=grace + 30)
        took = time.monotonic() - started
        state = json.loads(docker("inspect", containers[-1]).stdout)[0]["State"]
        logs = docker("logs", containers[-1]).stderr + docker("logs", containers[-1]).stdout
        handed = "sessions handed off" in logs
        ok = state["ExitCode"] == 0 and took < grace and handed
        return self.result(f"worker {pod} drains on SIGTERM within terminationGracePeriodSeconds ({grace}s)", ok,
                           f"exit {state['ExitCode']} after {took:.1f}s, hand-off logged: {handed}")

    def cleanup(self):
        names = docker("ps", "-aq", "--filter", f"name={PREFIX}").stdout.split()
        if names:
            docker("rm", "-f", *names, check=False, timeout=180)
        volumes = docker("volume", "ls", "-q", "--filter", f"name={PREFIX}").stdout.split()
        if volumes:
            docker("volume", "rm", "-f", *volumes, check=False)
        docker("network", "rm", PREFIX, check=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered")
    parser.add_argument("--tag", default="latest", help="tag of tether/tether and tether/etcd to run")
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    parser.add_argument("--ready-deadline", type=float, default=180)
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(Path(args.rendered).read_text()) if d]
    with tempfile.TemporaryDirectory(prefix="k8s-smoke-") as workdir:
        smoke = Smoke(docs, args.tag, workdir)
        smoke.cleanup()
        t0 = time.monotonic()
        try:
            for subnet in SUBNETS:
                if docker("network", "create", "--subnet", f"{subnet}.0/24", PREFIX, check=False).returncode == 0:
                    smoke.subnet = subnet
                    break
            else:
                raise RuntimeError(f"no free subnet among {SUBNETS}")
            smoke.make_secrets(smoke.image("tether/tether"))
            for doc, role, replicas in smoke.workloads():
                for index in range(replicas):
                    smoke.start_pod(doc, role, index)
            smoke.result(f"{len(smoke.pods)} pods started (init containers exited 0)", True)
            if smoke.wait_ready(args.ready_deadline):
                print(f"smoke: all ready {time.monotonic() - t0:.1f}s after the first pod", flush=True)
                smoke.turn("a turn through the edge completes")
                smoke.cluster_view()
                smoke.drain_worker()
                smoke.turn("a turn completes after the drain")
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            smoke.result("pods start", False, str(error))
        finally:
            if args.keep:
                print(f"smoke: kept the containers ({PREFIX}-*)")
            else:
                smoke.cleanup()
    print(f"smoke: {smoke.passed} passed, {smoke.failed} failed")
    return 1 if smoke.failed else 0


if __name__ == "__main__":
    sys.exit(main())
