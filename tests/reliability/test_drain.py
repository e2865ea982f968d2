"""Drain: SIGTERM while long streams run. Each stream ends by the --shutdown-timeout deadline with an error
event and `data: [DONE]` (never a cut connection), the server exits 0 with no traceback in its log, and no
process is left behind."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.headrace.server_process import ServerProcess
from tests.reliability.harness import stream

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT_S = 3.0
STREAMS = 4


def test_sigterm_ends_every_stream_cleanly_by_the_deadline():
    srv = ServerProcess("--max-model-len", "1024", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    try:
        srv.wait_ready()

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                started: list = []
                tasks = [asyncio.create_task(stream(client, srv.base_url, f"Tell a long story {i}", 900,
                                                    ignore_eos=True, started=started)) for i in range(STREAMS)]
                deadline = time.monotonic() + 120
                while len(started) < STREAMS:  # every stream is streaming
                    assert time.monotonic() < deadline, "the streams never started"
                    await asyncio.sleep(0.05)
                srv.proc.send_signal(signal.SIGTERM)
                return time.monotonic(), await asyncio.gather(*tasks)

        stopped, streams = asyncio.run(run())
        for s in streams:
            assert s.status == 200 and s.text and s.done, s  # it streamed, then ended with [DONE], not a cut
            assert s.error["code"] == 503 and "shutting down" in s.error["message"], s.error
            assert s.ended_at - stopped < SHUTDOWN_TIMEOUT_S + 3.0, s.ended_at - stopped
        assert srv.proc.wait(60) == 0
    finally:
        left = srv.stop()
    assert not left, f"processes left behind: {left}"
    assert "Traceback" not in srv.output, srv.output[-4000:]
