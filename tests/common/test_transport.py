"""The address plan and the socket helpers, over real ipc:// sockets in a temp dir."""

from __future__ import annotations

import asyncio
import os

import pytest
import zmq

from common import transport
from common.addresses import Endpoint, address_plan, with_ipc_dir
from common.codec import MessageDecodeError
from common.config import ConfigError, ServerConfig
from common.messages import AbortRequest, Heartbeat, TokenizedRequest
from common.sampling_params import SamplingParams


def test_ipc_plan_names_one_socket_per_inbox(tmp_path):
    plan = address_plan(ServerConfig(num_tokenizers=2, num_api_servers=3, ipc_dir=str(tmp_path)))
    assert [ep.bind for ep in plan.tokenizer_inbox] == [f"ipc://{tmp_path}/tokenizer-0", f"ipc://{tmp_path}/tokenizer-1"]
    assert len(plan.api_inbox) == 3 and plan.api_inbox[2].connect == f"ipc://{tmp_path}/api-2"
    assert plan.scheduler_inbox == Endpoint(f"ipc://{tmp_path}/scheduler", f"ipc://{tmp_path}/scheduler")
    everything = [*plan.api_inbox, *plan.tokenizer_inbox, plan.scheduler_inbox, plan.worker_plan, plan.worker_result]
    assert len({ep.bind for ep in everything}) == len(everything)


def test_ipc_plan_needs_a_shared_dir():
    with pytest.raises(ConfigError):
        address_plan(ServerConfig())
    server = with_ipc_dir(ServerConfig())
    try:
        assert os.path.isdir(server.ipc_dir)
        assert with_ipc_dir(server) is server  # idempotent: every process derives the same paths
    finally:
        os.rmdir(server.ipc_dir)
    with pytest.raises(ConfigError):
        address_plan(ServerConfig(ipc_dir="/" + "x" * 200))


def test_tcp_plan_uses_service_names_and_distinct_ports():
    plan = address_plan(ServerConfig(transport="tcp", port=8000, num_tokenizers=2), hosts={"tokenizer-1": "10.0.0.5"})
    assert plan.scheduler_inbox == Endpoint("tcp://*:9000", "tcp://scheduler:9000")
    assert plan.worker_plan.connect == "tcp://scheduler:9001"
    assert plan.worker_result.connect == "tcp://scheduler:9002"
    assert plan.tokenizer_inbox[0].connect == "tcp://tokenizer-0:9003"
    assert plan.tokenizer_inbox[1].connect == "tcp://10.0.0.5:9004"
    assert plan.api_inbox[0] == Endpoint("tcp://*:9005", "tcp://api-0:9005")
    assert address_plan(ServerConfig(transport="tcp"), base_port=7000).scheduler_inbox.bind == "tcp://*:7000"


@pytest.fixture
def plan(tmp_path):
    return address_plan(ServerConfig(ipc_dir=str(tmp_path)))


def test_push_pull_round_trip_survives_malformed_bytes(plan):
    ctx = zmq.Context()
    try:
        inbox = transport.pull_socket(ctx, plan.scheduler_inbox)
        sender = transport.push_socket(ctx, plan.scheduler_inbox)
        assert inbox.getsockopt(zmq.LINGER) == 0
        msg = TokenizedRequest("r1", list(range(1000)), SamplingParams(stop=("x",)), tokenizer_index=0)
        sender.send(b"\x00not msgpack")
        transport.send(sender, msg)
        with pytest.raises(MessageDecodeError):
            transport.recv(inbox, timeout_ms=5000)
        assert transport.recv(inbox, timeout_ms=5000) == msg  # the bad frame was consumed; the loop goes on
        assert transport.recv(inbox, timeout_ms=10) is None
        assert transport.recv_nowait(inbox) is None
    finally:
        ctx.destroy(linger=0)


def test_pub_sub_reaches_every_subscriber(plan):
    ctx = zmq.Context()
    try:
        pub = transport.pub_socket(ctx, plan.worker_plan)
        subs = [transport.sub_socket(ctx, plan.worker_plan) for _ in range(2)]
        # PUB drops messages until a subscription has propagated: publish until both have one.
        got = [None, None]
        for _ in range(200):
            transport.send(pub, Heartbeat("scheduler"))
            got = [g or transport.recv(s, timeout_ms=10) for g, s in zip(got, subs)]
            if all(got):
                break
        assert got == [Heartbeat("scheduler"), Heartbeat("scheduler")]
    finally:
        ctx.destroy(linger=0)


def test_asyncio_variant(plan):
    async def main():
        ctx = transport.async_context()
        try:
            inbox = transport.pull_socket(ctx, plan.api_inbox[0])
            sender = transport.push_socket(ctx, plan.api_inbox[0])
            await transport.send_async(sender, AbortRequest("r7"))
            return await asyncio.wait_for(transport.recv_async(inbox), 5)
        finally:
            ctx.destroy(linger=0)

    assert asyncio.run(main()) == AbortRequest("r7")
