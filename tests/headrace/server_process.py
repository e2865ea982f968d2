"""Start a real `headrace serve` in a subprocess for end-to-end tests, and stop it leaving nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

from headrace.common.ports import free_port_base

# Over tcp the engine's zmq ports are --port + 1000 + k (common.addresses): a test server's whole block is free.
ENGINE_PORTS = (0, *range(1000, 1032))


def free_port() -> int:
    """A free port below the kernel's ephemeral range, with the engine's tcp ports above it free too."""
    return free_port_base(ENGINE_PORTS)


def descendants(pid: int) -> list[int]:
    """Every live process below pid (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    def __init__(self, *args: str, port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "headrace.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output[-4000:]}")
            if "headrace is ready" in self.output:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output[-4000:]}")

    def child_pid(self, name: str) -> int:
        """The pid of a service process as the launcher logged it (e.g. 'tokenizer-1')."""
        for line in reversed(self.lines):
            m = re.search(rf"started {re.escape(name)} \(pid (\d+)\)", line)
            if m:
                return int(m.group(1))
        raise LookupError(f"no pid logged for {name}:\n{self.output[-3000:]}")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=120, **kw)

    def stop(self, timeout: float = 60.0) -> list[int]:
        """SIGTERM, wait; returns the pids still alive afterwards (should be none)."""
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
        left = [p for p in tree if alive(p)]
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        return left


@contextlib.contextmanager
def running_server(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A ready `headrace serve` started with `args`; stopped on exit, which must leave no process behind."""
    srv = ServerProcess(*args, env=env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        left = srv.stop()
        assert not left, f"processes left behind: {left}"


def served_greedy(prompt: list[int], *args: str, max_tokens: int = 8) -> tuple[dict, str]:
    """(the first choice of a greedy, ignore-EOS completion of `prompt` from a server started with `args`, that
    server's log)."""
    with running_server(*args) as srv:
        reply = srv.post("/v1/completions", json={"model": srv.get("/v1/models").json()["data"][0]["id"],
                                                  "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                  "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0], srv.output
