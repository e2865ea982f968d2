"""Pipeline parallelism through the real server on CPU (gloo): the same greedy text as one stage, on one
host and on two "nodes" (two `headrace serve` on loopback, one headless), and a lost node fails its requests
quickly instead of hanging them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.headrace.server_process import ServerProcess, free_port, running_server

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
# Several worker processes share CI's two cores; float32: pipeline micro-batches group rows differently from
# one stage, and only the float path's results do not depend on a row's batch (docs/cpu.md).
ONE_THREAD = ("--cpu-threads", "1", "--dtype", "float32")


@pytest.fixture(scope="module")
def reference():
    """Greedy texts of the embedded model in one process (one stage): what every pipeline must produce."""
    from headrace.common.sampling_params import SamplingParams
    from headrace.llm import LLM

    llm = LLM(max_model_len=128, dtype="float32", log=lambda *_: None)

    def generate(prompts: list, max_tokens: int) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [out.outputs[0].text for out in llm.generate(prompts, params)]

    return generate


def served(base_url: str, prompts: list, max_tokens: int) -> list[str]:
    """Greedy texts of the prompts sent at once, so that the scheduler forms micro-batches of them."""
    def one(prompt) -> str:
        r = httpx.post(base_url + "/v1/completions", timeout=300,
                       json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_embedded_model_pp3_equals_one_stage_with_chunked_prefill_prefix_caching_and_preemption(reference):
    # 8 blocks of 8 tokens hold one 64-token sequence; three requests of up to 30 tokens need 12: the
    # newest is preempted and recomputed. Prefills run in chunks of 4 tokens; the last prompt reuses the
    # cached first block of the one before it.
    args = ("--pipeline-parallel-size", "3", *ONE_THREAD, "--max-model-len", "64", "--block-size", "8",
            "--num-gpu-blocks-override", "8", "--enable-prefix-caching", "--long-prefill-token-threshold", "4")
    with running_server(*args) as srv:
        assert served(srv.base_url, PROMPTS, 20) == reference(PROMPTS, 20)
        again = [PROMPTS[2] + " there lived"]
        assert served(srv.base_url, again, 8) == reference(again, 8)
        metrics = srv.get("/metrics").text
    assert "layers 0..9" in srv.output and "layers 10..19" in srv.output and "layers 20..29" in srv.output
    assert _metric(metrics, "headrace:num_preemptions_total") > 0
    assert _metric(metrics, "headrace:prefix_cache_hits_total") > 0


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a /metrics page."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_tiny_llama_tp2_x_pp2_equals_tp1():
    from headrace.common.sampling_params import SamplingParams
    from headrace.llm import LLM

    prompts = [[1, 5, 9, 200, 31, 77, 4, 18], [7, 7, 8, 100, 13, 400, 2, 9, 9, 11]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM("random:tiny-llama", log=lambda *_: None).generate(prompts, params)]
    args = ("--model", "random:tiny-llama", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
            *ONE_THREAD, "--max-model-len", "256")
    with running_server(*args) as srv:
        assert served(srv.base_url, prompts, 10) == want
    assert "pipeline stage 1 of 2: layers 1..1" in srv.output


def test_two_nodes_serve_pp2_and_a_lost_node_fails_its_requests_fast(reference, tmp_path):
    key = tmp_path / "engine.key"
    subprocess.run([sys.executable, "-m", "headrace.cli", "keygen", str(key)], check=True, capture_output=True)
    port = free_port()
    common = ("--pipeline-parallel-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}",
              "--transport", "tcp", "--engine-curve-key-file", str(key), *ONE_THREAD, "--max-model-len", "128")
    node0 = ServerProcess(*common, "--node-rank", "0", port=port)
    node1 = ServerProcess(*common, "--node-rank", "1", "--headless", port=port)
    try:
        node0.wait_ready()
        assert "pipeline stage 1 of 2" in node1.output and "started worker-1" not in node0.output
        assert served(node0.base_url, PROMPTS, 12) == reference(PROMPTS, 12)

        # A long request in flight, then the headless node's worker dies: an error, not a hang.
        answer: dict = {}

        def long_request() -> None:
            r = httpx.post(node0.base_url + "/v1/completions", timeout=120,
                           json={"prompt": "Hello", "max_tokens": 120, "temperature": 0, "ignore_eos": True})
            answer["status"], answer["body"], answer["at"] = r.status_code, r.text, time.monotonic()

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2.0)
        killed = time.monotonic()
        os.kill(node1.child_pid("worker-1"), signal.SIGKILL)
        thread.join(30)
        assert answer["status"] == 503 and "worker rank 1" in answer["body"], answer
        assert answer["at"] - killed < 5.0
        assert node0.get("/health").status_code == 503

        # Node 0 stops: the headless node notices its scheduler go and stops by itself.
        assert not node0.stop()
        try:
            assert node1.proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"the headless node did not stop after node 0 did:\n{node1.output[-3000:]}")
        assert "node 0's scheduler went away" in node1.output
    finally:
        left = node0.stop() + node1.stop()
    assert not left, f"processes left behind: {left}"
