"""The address plan: ipc paths and tcp service names/ports derived from one ServerConfig."""

from __future__ import annotations

import os

import pytest

from headrace.common.addresses import Endpoint, address_plan, check_resolves, is_loopback, with_ipc_dir
from headrace.common.config import ConfigError, ServerConfig


def test_ipc_plan_names_one_socket_per_bound_endpoint(tmp_path):
    plan = address_plan(ServerConfig(num_tokenizers=4, num_api_servers=3, ipc_dir=str(tmp_path)))
    assert plan.scheduler == Endpoint(f"ipc://{tmp_path}/scheduler", f"ipc://{tmp_path}/scheduler")
    assert [ep.bind for ep in plan.api_inbox] == [f"ipc://{tmp_path}/api-{i}" for i in range(3)]
    assert plan.api_inbox[2].connect == f"ipc://{tmp_path}/api-2"
    assert plan.worker_plan.bind == f"ipc://{tmp_path}/worker-plan"
    assert plan.worker_result.connect == f"ipc://{tmp_path}/worker-result"
    # Tokenizers bind nothing, so their count adds no endpoint.
    assert len(plan.all()) == 3 + 3 and len({ep.bind for ep in plan.all()}) == len(plan.all())


def test_ipc_plan_needs_a_shared_dir_with_short_paths(tmp_path):
    with pytest.raises(ConfigError, match="ipc_dir"):
        address_plan(ServerConfig())
    server = with_ipc_dir(ServerConfig())
    try:
        assert os.path.isdir(server.ipc_dir)
        assert with_ipc_dir(server) is server  # idempotent: every process derives the same paths
        assert address_plan(server).scheduler.bind == f"ipc://{server.ipc_dir}/scheduler"
    finally:
        os.rmdir(server.ipc_dir)
    assert with_ipc_dir(ServerConfig(transport="tcp")).ipc_dir is None
    # sun_path holds 107 bytes: the longest name ("worker-result") must fit, counted in bytes.
    fits = "/" + "x" * (107 - len("/worker-result") - 1)
    assert address_plan(ServerConfig(ipc_dir=fits)).worker_result.bind == f"ipc://{fits}/worker-result"
    with pytest.raises(ConfigError, match="longer than"):
        address_plan(ServerConfig(ipc_dir=fits + "x"))
    with pytest.raises(ConfigError, match="longer than"):
        address_plan(ServerConfig(ipc_dir="/" + "é" * 50))  # 100 bytes of UTF-8, though 51 characters


def test_tcp_plan_uses_service_names_and_distinct_ports():
    plan = address_plan(ServerConfig(transport="tcp", port=8000, num_api_servers=2, num_tokenizers=5))
    assert plan.scheduler == Endpoint("tcp://127.0.0.1:9000", "tcp://scheduler:9000")
    assert plan.worker_plan.connect == "tcp://scheduler:9001"
    assert plan.worker_result.connect == "tcp://scheduler:9002"
    assert plan.api_inbox == (Endpoint("tcp://127.0.0.1:9003", "tcp://api-0:9003"),
                              Endpoint("tcp://127.0.0.1:9004", "tcp://api-1:9004"))
    ports = [int(ep.bind.rsplit(":", 1)[1]) for ep in plan.all()]
    assert len(set(ports)) == len(ports) == 5  # tokenizers bind nothing: no ports for them


def test_tcp_plan_host_overrides_and_base_port():
    plan = address_plan(ServerConfig(transport="tcp", num_api_servers=2), base_port=7000,
                        hosts={"scheduler": "10.0.0.2", "api-1": "10.0.0.9"})
    assert plan.scheduler == Endpoint("tcp://127.0.0.1:7000", "tcp://10.0.0.2:7000")
    assert plan.worker_result.connect == "tcp://10.0.0.2:7002"  # the worker channels live on the scheduler's host
    assert [ep.connect for ep in plan.api_inbox] == ["tcp://api-0:7003", "tcp://10.0.0.9:7004"]
    with pytest.raises(ConfigError, match="do not fit"):
        address_plan(ServerConfig(transport="tcp"), base_port=65533)
    # The ports do not move when the api count changes, so the fixed services keep theirs.
    more = address_plan(ServerConfig(transport="tcp", num_api_servers=5), base_port=7000)
    assert [ep.bind for ep in more.all()[:1] + more.all()[-2:]] == ["tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001",
                                                                    "tcp://127.0.0.1:7002"]


def test_tcp_plan_binds_the_configured_interface_and_dials_the_configured_host():
    # The default keeps the engine's ports on this host (loopback); compose asks for every interface.
    default = address_plan(ServerConfig(transport="tcp"))
    assert {ep.bind.rsplit(":", 1)[0] for ep in default.all()} == {"tcp://127.0.0.1"}
    plan = address_plan(ServerConfig(transport="tcp", engine_bind_host="0.0.0.0", engine_connect_host="10.1.2.3",
                                     engine_curve_key_file="/keys/k", num_api_servers=2), base_port=7000)
    assert [ep.bind for ep in plan.all()] == [f"tcp://0.0.0.0:{p}" for p in (7000, 7003, 7004, 7001, 7002)]
    assert {ep.connect.rsplit(":", 1)[0] for ep in plan.all()} == {"tcp://10.1.2.3"}
    assert {ep.curve_key_file for ep in plan.all()} == {"/keys/k"}  # every socket is secured with the one key
    # A per-service override still wins over the shared connect host.
    assert address_plan(ServerConfig(transport="tcp", engine_connect_host="h"), base_port=7000,
                        hosts={"scheduler": "s"}).worker_plan.connect == "tcp://s:7001"
    v6 = address_plan(ServerConfig(transport="tcp", engine_bind_host="::1", engine_connect_host="::1"), base_port=7000)
    assert v6.scheduler == Endpoint("tcp://[::1]:7000", "tcp://[::1]:7000")
    with pytest.raises(ConfigError, match="engine-bind-host"):
        ServerConfig(transport="tcp", engine_bind_host="")


def test_peer_hosts_that_do_not_resolve_fail_at_once_naming_the_host():
    check_resolves("tcp://127.0.0.1:9000")
    check_resolves("tcp://localhost:9000")
    with pytest.raises(ConfigError, match="'no-such-host.invalid' .* does not resolve.*--engine-connect-host"):
        check_resolves("tcp://no-such-host.invalid:9000")
    assert is_loopback("tcp://127.0.0.1:1") and is_loopback("tcp://[::1]:1") and is_loopback("tcp://localhost:1")
    assert not any(is_loopback(a) for a in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://10.0.0.1:1", "tcp://scheduler:1"))


def test_replicas_have_their_own_sockets_and_kv_events(tmp_path):
    one = address_plan(ServerConfig(ipc_dir=str(tmp_path)))
    assert [r.kv_events for r in one.replicas] == [None]  # one replica: the plan of old, no KV events
    assert address_plan(ServerConfig(ipc_dir=str(tmp_path), kv_events=True)).replicas[0].kv_events.bind == \
        f"ipc://{tmp_path}/kv-events"
    two = address_plan(ServerConfig(transport="tcp", num_api_servers=2), base_port=7000, replicas=2)
    assert two.all()[:5] == address_plan(ServerConfig(transport="tcp", num_api_servers=2), base_port=7000).all()
    binds = [ep.bind for ep in two.all()]
    assert len(set(binds)) == len(binds) == 5 + 3 + 4  # replica 1's three sockets, each one's KV events + replay
    r1 = two.replica(1)
    assert r1.scheduler == two.replicas[1].scheduler != two.scheduler and r1.api_inbox == two.api_inbox
    assert r1.worker_plan.connect.startswith("tcp://scheduler-1:")  # bound by replica 1's scheduler
    assert two.replicas[1].kv_events.connect.startswith("tcp://scheduler-1:")
    assert two.replicas[0].kv_events.connect.startswith("tcp://scheduler:")
    assert two.replicas[1].kv_replay.connect.startswith("tcp://scheduler-1:")
