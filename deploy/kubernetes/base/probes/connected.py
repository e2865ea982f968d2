"""Exit 0 when process PID (default 1, the container's own headrace process) holds an established TCP
connection to PORT; else 1. The liveness of the headrace processes that bind nothing: a worker holds one to
the scheduler's result port, a tokenizer one to the scheduler's ROUTER.

    python /probes/connected.py PORT [PID]

All containers of a pod share one network namespace, so /proc/net/tcp lists the connections of the
scheduler and of every worker rank together; matching the socket inodes of PID's own descriptors tells
one process's connection from its neighbours'.
"""

import os
import sys


def socket_inodes(pid: str) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:  # closed since listdir
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def established_to(port: int, pid: str) -> bool:
    own = socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        # Columns: sl, local, remote (HEX_IP:HEX_PORT), state (01 = ESTABLISHED), ..., inode (10th).
        if any(r[2].endswith(f":{port:04X}") and r[3] == "01" and r[9] in own for r in rows):
            return True
    return False


if __name__ == "__main__":
    sys.exit(0 if established_to(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "1") else 1)
