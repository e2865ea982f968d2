"""The Kubernetes replica's processes, started on this host as their containers would start them, serve.

Each process gets its container's rendered args and environment (overlays/cpu, through test_kubernetes's
helpers); only what a pod network gives for free is replaced for one host: every process listens on
loopback, dials 127.0.0.1 instead of the Service names, and takes a free HTTP port (the apis share it with
SO_REUSEPORT, as pods behind the `headrace` Service share one). Checked: two of the four api indexes the
tokenizers dial are running and both serve (the indexes the autoscaler has not started do not stall the
tokenizers); a third api started later joins; the workers' and tokenizers' probe passes on the real
processes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import httpx
import pytest

from headrace.common.curve import write_new_key_file
from tests.headrace.server_process import free_port
from tests.test_kubernetes import KUBE, as_service, containers, render

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def one_host_environment(service_env: dict[str, str], port: int, key_file: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADRACE_")}
    env.update(service_env)
    env.pop("HEADRACE_CACHE")  # the host's cache: the embedded model converts once for every test
    env.update({"HEADRACE_HOST": "127.0.0.1", "HEADRACE_PORT": str(port), "HEADRACE_ENGINE_BIND_HOST": "127.0.0.1",
                "HEADRACE_ENGINE_CONNECT_HOST": "127.0.0.1", "HEADRACE_ENGINE_CURVE_KEY_FILE": key_file,
                "HEADRACE_MAX_MODEL_LEN": "512", "HEADRACE_KV_CACHE_MEMORY": str(64 << 20)})
    return env


def wait_until(check, timeout: float, what: str, procs: dict[str, subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}"
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def healthy(base_url: str, tries: int) -> bool:
    """`tries` fresh connections all answer 200: SO_REUSEPORT spreads them over every api process."""
    try:
        return all(httpx.get(base_url + "/health", timeout=5, headers={"Connection": "close"}).status_code == 200
                   for _ in range(tries))
    except httpx.HTTPError:
        return False


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening socket on `port` (has bound it), from /proc as the probe reads."""
    spec = importlib.util.spec_from_file_location("connected_probe", KUBE / "base/probes/connected.py")
    connected = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(connected)
    own = connected.socket_inodes(str(pid))
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[1].endswith(f":{port:04X}") and r[3] == "0A" and r[9] in own for r in rows)


def probe(pid: int, port: int) -> int:
    return subprocess.run([sys.executable, str(KUBE / "base/probes/connected.py"), str(port), str(pid)],
                          timeout=30).returncode


def test_replica_processes_serve_with_some_api_indexes_not_started(tmp_path):
    docs = render("overlays/cpu")
    port = free_port()
    key_file = str(tmp_path / "engine_curve.key")
    write_new_key_file(key_file)
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str, workload, container, ordinal: int = 0) -> subprocess.Popen:
        service = as_service(docs, workload, container, ordinal)
        procs[name] = subprocess.Popen([sys.executable, "-m", "headrace.cli", *service["command"]],
                                       env=one_host_environment(service["environment"], port, key_file),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return procs[name]

    try:
        by_command = {c["args"][0]: (w, c) for w, c in containers(docs)}
        for command in ("scheduler", "worker", "tokenizer"):
            launch(command, *by_command[command])
        for ordinal in (0, 1):  # the autoscaler's minimum; api-2 and api-3 are dialled but absent
            launch(f"api-{ordinal}", *by_command["api"], ordinal)
        base_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(base_url, 16), 300, "the apis never all turned healthy", procs)

        reply = httpx.post(base_url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0

        # The autoscaler adds api-2: the tokenizers, which have dialled it all along, reach it.
        api2 = launch("api-2", *by_command["api"], 2)
        wait_until(lambda: listening(api2.pid, port), 180, "api-2 never bound the HTTP port", procs)
        # A fresh connection reaches api-2 one time in three: 24 answers of 200 mean it is healthy too.
        wait_until(lambda: healthy(base_url, 24), 120, "api-2 never turned healthy", procs)

        plan_port = port + 1000  # common/addresses.py: scheduler, worker-plan, worker-result from port + 1000
        assert probe(procs["worker"].pid, plan_port + 2) == 0
        assert probe(procs["tokenizer"].pid, plan_port) == 0
        assert probe(procs["api-0"].pid, plan_port + 2) == 1  # an api never dials the workers' result port
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
