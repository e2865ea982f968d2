"""The ipc folder and socket files are private to this user whatever the umask; foreign folders are refused."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest
import zmq

from headrace.common import ipc_dir, transport
from headrace.common.addresses import address_plan, claim_ipc_dir
from headrace.common.config import ConfigError, ServerConfig


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_bound_sockets_and_their_folder_are_private_under_umask_000(tmp_path, ctx):
    folder = tmp_path / "made" / "ipc"  # neither exists yet: the first bind makes both
    plan = address_plan(ServerConfig(ipc_dir=str(folder)))
    with umask(0o000):
        transport.router_socket(ctx, plan.scheduler)
        transport.pull_socket(ctx, plan.worker_result)
        transport.pub_socket(ctx, plan.worker_plan)
        transport.router_socket(ctx, plan.api_inbox[0])
    assert mode(folder) == 0o700
    for ep in plan.all():
        path = ep.bind.removeprefix("ipc://")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert mode(path) & 0o077 == 0, f"{path} is mode {mode(path):o}"
    # The umask is the caller's again after each bind.
    assert os.umask(0o022) == 0o022


def test_the_launchers_folder_is_private_under_umask_000(tmp_path):
    with umask(0o000):
        fresh, created = claim_ipc_dir(ServerConfig())
        given, given_created = claim_ipc_dir(ServerConfig(ipc_dir=str(tmp_path / "a" / "b")))
    try:
        assert created and given_created
        assert mode(fresh.ipc_dir) == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    finally:
        os.rmdir(fresh.ipc_dir)
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o700)
    assert claim_ipc_dir(ServerConfig(ipc_dir=str(existing))) == (ServerConfig(ipc_dir=str(existing)), False)


@pytest.mark.parametrize("folder_mode", [0o755, 0o750, 0o701, 0o777, 0o1777])
def test_a_folder_others_may_enter_is_refused(tmp_path, ctx, folder_mode):
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, folder_mode)
    server = ServerConfig(ipc_dir=str(folder))
    with pytest.raises(ConfigError, match="open to other users"):
        claim_ipc_dir(server)
    with pytest.raises(ConfigError, match="open to other users"):  # the binding process checks it as well
        transport.router_socket(ctx, address_plan(server).scheduler)
    assert os.listdir(folder) == []


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(folder).st_uid + 1)
    with pytest.raises(ConfigError, match="belongs to uid"):
        claim_ipc_dir(ServerConfig(ipc_dir=str(folder)))


def test_a_file_or_link_in_the_way_is_refused(tmp_path, ctx, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        claim_ipc_dir(ServerConfig(ipc_dir=str(not_a_dir)))
    # A file of the user's where a socket goes: ZeroMQ would unlink it to bind; we refuse instead.
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    (folder / "scheduler").write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        transport.router_socket(ctx, address_plan(ServerConfig(ipc_dir=str(folder))).scheduler)
    assert (folder / "scheduler").read_text() == "precious"
    # A link to a private folder of ours is fine; one that another user owns (and may re-point) is not.
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert claim_ipc_dir(ServerConfig(ipc_dir=str(link)))[1] is False
    real_uid = os.lstat(link).st_uid
    monkeypatch.setattr(os, "lstat", lambda p, _real=os.lstat: _with_uid(_real(p), real_uid + 1)
                        if os.path.abspath(p) == str(link) else _real(p))
    with pytest.raises(ConfigError, match="symbolic link owned by uid"):
        ipc_dir.check_private_dir(str(link))


def _with_uid(st: os.stat_result, uid: int) -> os.stat_result:
    fields = list(st)
    fields[stat.ST_UID] = uid
    return os.stat_result(fields)
