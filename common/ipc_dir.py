"""The folder of the engine's ipc:// sockets: only its owner may enter it, and shutdown removes only our files.

Why the folder and not the socket files: whoever can connect to the scheduler's socket can submit requests or
send it a `Shutdown`. Linux checks write permission on a socket file at connect, but the file is made by
ZeroMQ with whatever the umask allows, and anyone who may write to the folder can replace it with their own.
A folder that is ours and mode 0700 shuts every other local user out, whatever the files in it look like;
the socket files are made owner-only as well (transport binds them under umask 077).
"""

from __future__ import annotations

import os
import stat
import tempfile

from headrace.common.config import ConfigError

PRIVATE_MODE = 0o700


def make_temp_dir() -> str:
    """A fresh private folder for one run's sockets (mkdtemp asks for 0700; the chmod undoes a umask that
    took the owner's own bits away)."""
    path = tempfile.mkdtemp(prefix="headrace-")
    os.chmod(path, PRIVATE_MODE)
    return path


def private_dir(path: str) -> bool:
    """Make sure `path` is a folder only this user can enter: created 0700 when missing (its parents as
    `mkdir -p` would), refused with a ConfigError when it exists but another user owns it or its group or
    others have any access. True when this call created it, so its creator may remove it at shutdown."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_MODE)
    except FileExistsError:
        check_private_dir(path)
        return False
    os.chmod(path, PRIVATE_MODE)  # mkdir's mode passes through the umask, which can only take bits away
    return True


def check_private_dir(path: str) -> None:
    """A ConfigError unless `path` is a folder of this user's that nobody else may enter."""
    me = os.geteuid()
    link = os.lstat(path)
    # A link someone else owns can be pointed elsewhere later, taking our peers to their sockets.
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        raise ConfigError(f"--ipc-dir {path} is a symbolic link owned by uid {link.st_uid}, not by this user "
                          f"(uid {me}); use a folder of your own or leave --ipc-dir unset")
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--ipc-dir {path} is not a directory")
    if st.st_uid != me:
        raise ConfigError(f"--ipc-dir {path} belongs to uid {st.st_uid}, not to this user (uid {me}), who could "
                          "then reach or replace the engine's sockets; use a folder of your own or leave "
                          "--ipc-dir unset")
    if st.st_mode & 0o077:
        raise ConfigError(f"--ipc-dir {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): any "
                          f"local user could connect to the engine's sockets and shut it down; `chmod 700 {path}` "
                          "or leave --ipc-dir unset")


def bind_path_is_free(path: str) -> None:
    """A ConfigError when something other than a socket sits where a socket is to be bound: ZeroMQ unlinks
    whatever is at the path before binding, and a file of the user's is not ours to delete."""
    if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"{path} exists and is not a socket; the engine will not replace it (move it, or "
                          "choose another --ipc-dir)")


def remove_sockets(paths: list[str]) -> None:
    """Delete those of `paths` that are sockets (a process that was killed leaves its socket behind);
    anything else at a path is not ours and stays."""
    for path in paths:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
