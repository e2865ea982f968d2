"""The engine's CURVE key, and the ZAP handler that admits only peers holding it (tcp transport).

One key for the whole engine: every process trusts every other (any of them may shut the scheduler down), so
there is one trust domain and one secret, in one file every process reads (`--engine-curve-key-file`; written
by `headrace keygen`, or made by compose's scheduler on its first start). common/transport.py configures the
sockets with it: the owner of a socket (scheduler, api) is the CURVE server, its peers are CURVE clients using
the same key pair, and the owner's ZAP handler (here) admits a client only if its long-term public key is the
engine's. CurveZMQ makes a client prove it holds the secret behind the public key it presents, so a peer
without the file cannot get a single message through, even one that learned the public key. The traffic is
encrypted as well.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass

import zmq
from zmq.utils import z85

from headrace.common.config import ConfigError

log = logging.getLogger("headrace.curve")

# Where libzmq asks every CURVE server socket of a context whether to admit a peer (RFC 27, ZAP).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"headrace"
_SECRET_KEY_CHARS = 40  # a Z85-encoded 32-byte key


@dataclass(frozen=True)
class CurveKey:
    public: bytes  # Z85
    secret: bytes  # Z85


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("this pyzmq/libzmq was built without CURVE; it cannot authenticate the engine's peers")


def write_new_key_file(path: str) -> None:
    """A fresh engine key at `path`, readable by its owner only. An existing file is never overwritten: a
    new key there would lock out every process that already read the old one."""
    _require_curve()
    _, secret = zmq.curve_keypair()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the umask can only take bits away
    except FileExistsError:
        raise ConfigError(f"{path} exists already; the engine key is not replaced") from None
    except OSError as e:
        raise ConfigError(f"cannot write the engine key to {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")


def create_key_file_if_missing(path: str) -> bool:
    """Compose's scheduler makes the key on its first start (every other service waits for it). True when it
    made one."""
    try:
        write_new_key_file(path)
    except ConfigError:
        if os.path.exists(path):
            return False
        raise
    return True


def read_key_file(path: str) -> CurveKey:
    _require_curve()
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"--engine-curve-key-file {path}: {e.strerror}") from None
    try:
        if len(secret) != _SECRET_KEY_CHARS:
            raise ValueError("wrong length")
        public = zmq.curve_public(secret)
    except (ValueError, zmq.ZMQError):
        raise ConfigError(f"--engine-curve-key-file {path} does not hold a CURVE secret key (40 Z85 characters, "
                          "as `headrace keygen` writes)") from None
    return CurveKey(public=public, secret=secret)


# --------------------------------------------------------------------------- ZAP

_handlers: weakref.WeakKeyDictionary[zmq.Context, bytes] = weakref.WeakKeyDictionary()
_handlers_lock = threading.Lock()


def ensure_authenticator(ctx: zmq.Context, key: CurveKey) -> None:
    """Start, once per context and before its first CURVE server socket binds, the ZAP handler that admits only
    peers holding `key`. The handler is a daemon thread on a synchronous view of the same libzmq context (the
    api's context is an asyncio one); when the owner destroys the context, the handler's wait ends with
    ContextTerminated and it closes its socket, so the context's termination never waits on it."""
    with _handlers_lock:
        known = _handlers.get(ctx)
        if known == key.public:
            return
        if known is not None:
            raise ConfigError("one ZeroMQ context serves one engine key")
        sock = zmq.Context.shadow(ctx.underlying).socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        threading.Thread(target=_serve_zap, args=(sock, z85.decode(key.public)), name="headrace-zap",
                         daemon=True).start()
        _handlers[ctx] = key.public


def _serve_zap(sock: zmq.Socket, allowed: bytes) -> None:
    try:
        while True:
            sock.send_multipart(zap_reply(sock.recv_multipart(), allowed))
    except zmq.ContextTerminated:
        pass
    finally:
        sock.close(linger=0)


def zap_reply(request: list[bytes], allowed: bytes) -> list[bytes]:
    """The ZAP reply to one request (RFC 27: version, request id, domain, address, identity, mechanism,
    credentials...): 200 only for CURVE with the engine's public key."""
    if len(request) < 6:
        return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
    version, request_id, _domain, address, _identity, mechanism, *credentials = request
    if mechanism == b"CURVE" and credentials[:1] == [allowed]:
        return [version, request_id, b"200", b"OK", b"engine", b""]
    log.warning("refused an engine peer from %s: it does not hold the engine's CURVE key (%s)",
                address.decode("ascii", "replace") or "?", mechanism.decode("ascii", "replace"))
    return [version, request_id, b"400", b"not the engine key", b"", b""]
