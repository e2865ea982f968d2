"""Launcher start-up checks: every process agrees on one resolved config, and impossible setups fail first."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from headrace.common.addresses import ipc_socket_paths
from headrace.common.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig, ServerConfig
from headrace.launcher import Launcher, RuntimeFiles, check_devices, prepare_config
from tests.headrace.server_process import free_port


def test_prepare_config_resolves_model_tokenizer_and_addresses():
    files = RuntimeFiles()
    config = prepare_config(EngineConfig(device="cpu"), log_fn=lambda *_: None, files=files)
    assert config.resolved.tokenizer_dir and config.resolved.name == "SmolLM2-135M-Instruct"
    assert config.resolved.max_model_len == 8192
    assert config.server.ipc_dir
    os.rmdir(files.ipc_dir)  # the launcher made it (and would remove it at stop)


def test_more_ranks_than_gpus_fails_before_start(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs; this host has 1"):
        check_devices("cuda", 2)
    check_devices("cpu", 4)  # CPU ranks are processes: any number


def test_tp_that_does_not_divide_heads_fails_before_start():
    cfg = EngineConfig(model=ModelConfig(model="random:tiny-llama"), parallel=ParallelConfig(tensor_parallel_size=3),
                       device="cpu")
    with pytest.raises(ValueError, match="4 attention heads"):
        prepare_config(cfg, log_fn=lambda *_: None)


def test_bad_flags_are_one_line_errors(capsys):
    from headrace.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--block-size", "7"]) == 2
    err = capsys.readouterr().err
    assert "headrace: error: --port must be in 1..65535" in err and "Traceback" not in err
    assert "--block-size must be one of" in err


def tiny(server: ServerConfig) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="random:tiny-llama"), device="cpu", server=server)


def leave_sockets_behind(server: ServerConfig) -> None:
    """What killed processes leave: a socket file at every bound path, with nobody listening."""
    for path in ipc_socket_paths(server):
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)


def test_stop_removes_only_its_sockets_from_a_given_ipc_dir(tmp_path):
    folder = tmp_path / "ipc"
    folder.mkdir(mode=0o700)
    (folder / "notes.txt").write_text("the user's")
    (folder / "sub").mkdir()
    files = RuntimeFiles()
    config = prepare_config(tiny(ServerConfig(ipc_dir=str(folder))), log_fn=lambda *_: None, files=files)
    assert files.ipc_dir is None  # it was there before: not ours to remove
    leave_sockets_behind(config.server)
    assert len(os.listdir(folder)) == 2 + 4
    Launcher(config, files).stop(drain=False)
    assert sorted(os.listdir(folder)) == ["notes.txt", "sub"]
    assert (folder / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize("given", [False, True], ids=["temp-dir", "missing-ipc-dir"])
def test_stop_removes_the_ipc_dir_it_made_unless_others_files_are_in_it(tmp_path, given):
    for someone_wrote_there in (False, True):
        server = ServerConfig(ipc_dir=str(tmp_path / f"new-{someone_wrote_there}") if given else None)
        files = RuntimeFiles()
        config = prepare_config(tiny(server), log_fn=lambda *_: None, files=files)
        folder = config.server.ipc_dir
        assert files.ipc_dir == folder and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        leave_sockets_behind(config.server)
        if someone_wrote_there:
            with open(os.path.join(folder, "theirs.txt"), "w") as f:
                f.write("x")
        Launcher(config, files).stop(drain=False)
        if someone_wrote_there:
            assert os.listdir(folder) == ["theirs.txt"]
            os.remove(os.path.join(folder, "theirs.txt"))
            os.rmdir(folder)
        else:
            assert not os.path.exists(folder)


def test_an_ipc_dir_others_may_enter_stops_the_start_with_one_line(tmp_path, capsys):
    from headrace.cli import main

    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    assert main(["serve", "--model", "random:tiny-llama", "--device", "cpu", "--ipc-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"headrace: error: --ipc-dir {folder} is open to other users" in err and "Traceback" not in err
    assert os.listdir(folder) == []


@pytest.mark.parametrize("bind_host,dialed", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1")])
def test_tcp_on_one_host_dials_the_bind_host_with_a_one_off_key(bind_host, dialed):
    from headrace.common.addresses import address_plan, tcp_host_port
    from headrace.common.curve import read_key_file

    files = RuntimeFiles()
    server = ServerConfig(transport="tcp", engine_bind_host=bind_host, port=free_port())
    config = prepare_config(tiny(server), log_fn=lambda *_: None, files=files)
    launcher = Launcher(config, files)
    try:
        s = config.server
        assert s.engine_connect_host == dialed  # not the compose service names, which do not resolve here
        assert {tcp_host_port(ep.connect)[0] for ep in address_plan(s).all()} == {dialed}
        assert s.engine_curve_key_file and os.path.dirname(s.engine_curve_key_file) == files.key_dir
        assert stat.S_IMODE(os.stat(files.key_dir).st_mode) == 0o700
        read_key_file(s.engine_curve_key_file)
        assert files.ipc_dir is None
    finally:
        launcher.stop(drain=False)
    assert not os.path.exists(files.key_dir)


def test_tcp_on_one_host_names_an_engine_port_that_is_taken():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1001))  # the scheduler's worker-plan
        taken.listen()
        files = RuntimeFiles()
        with pytest.raises(ConfigError, match=f"port {port + 1001} .* cannot be bound.*pick another --port"):
            prepare_config(tiny(ServerConfig(transport="tcp", port=port)), log_fn=lambda *_: None, files=files)
    assert files.key_dir is None  # nothing made on disk for a start that fails


def test_tcp_keeps_the_users_key_and_hosts(tmp_path):
    from headrace.common.curve import write_new_key_file

    key = str(tmp_path / "k")
    write_new_key_file(key)
    files = RuntimeFiles()
    server = ServerConfig(transport="tcp", engine_connect_host="localhost", engine_curve_key_file=key,
                          port=free_port())
    config = prepare_config(tiny(server), log_fn=lambda *_: None, files=files)
    assert config.server == server and files == RuntimeFiles()
    Launcher(config, files).stop(drain=False)
    assert os.path.exists(key)  # the user's key is not the launcher's to remove


def test_a_peer_host_that_does_not_resolve_stops_the_start_with_one_line(capsys):
    from headrace.cli import main

    assert main(["serve", "--model", "random:tiny-llama", "--device", "cpu", "--transport", "tcp",
                 "--engine-connect-host", "no-such-host.invalid"]) == 2
    err = capsys.readouterr().err
    assert "headrace: error: the engine peer host 'no-such-host.invalid'" in err and "does not resolve" in err
    assert "Traceback" not in err


def test_a_key_file_that_cannot_be_read_stops_the_start_with_one_line(tmp_path, capsys):
    from headrace.cli import main

    missing = tmp_path / "no-key"
    assert main(["serve", "--model", "random:tiny-llama", "--device", "cpu", "--transport", "tcp",
                 "--engine-curve-key-file", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"headrace: error: --engine-curve-key-file {missing}: No such file" in err and "Traceback" not in err
