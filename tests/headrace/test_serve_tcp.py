"""`headrace serve --transport tcp` on one host: it becomes ready, answers, and its engine ports admit no stranger."""

from __future__ import annotations

import time

import pytest
import zmq

from headrace.common import codec
from headrace.common.messages import Shutdown
from tests.headrace.server_process import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def test_serve_over_tcp_on_one_host_answers_and_refuses_strangers():
    srv = ServerProcess("--transport", "tcp", "--num-tokenizers", "1", "--max-model-len", "1024")
    try:
        srv.wait_ready(timeout=300)
        reply = srv.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of France is",
                                                  "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0 and reply.json()["choices"][0]["text"]

        # Another local process dials the scheduler's port (HTTP port + 1000) and sends a Shutdown: without the
        # engine's one-off CURVE key it never gets through, and the server keeps serving.
        ctx = zmq.Context()
        try:
            stranger = ctx.socket(zmq.DEALER)
            stranger.setsockopt(zmq.LINGER, 0)
            stranger.connect(f"tcp://127.0.0.1:{srv.port + 1000}")
            stranger.send(codec.encode(Shutdown("stranger")))
            time.sleep(2.0)
        finally:
            ctx.destroy(linger=0)
        assert srv.proc.poll() is None and srv.get("/health").status_code == 200
        again = srv.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
        assert again.status_code == 200, again.text
        assert "INSECURE" not in srv.output  # loopback and a key: nothing to warn about
    finally:
        left = srv.stop()
        assert not left, f"processes left behind: {left}"
