"""Connection sharing, the client side: reach a host through the user's connection broker.

With sharing on (:func:`share_persist` > 0), :meth:`sshpyk.ssh.pool.SharedConnection
.ensure_connected` does not connect to the host itself: :func:`connect` makes an SSH
connection to the broker (:mod:`sshpyk.ssh.broker`), a per-user process that owns one
connection per (alias, ssh config) and relays every channel of every local process
onto it. Everything above the pool (agents, forwards, relay links) uses the returned
connection as it would a direct one.

The broker lives in a private 0700 directory (:func:`sshpyk.localfs.broker_dir`):

* ``broker.sock``: its unix socket. The client refuses it unless it is a socket of
  ours and the process listening on it runs as our uid (SO_PEERCRED).
* ``hostkey.json``: the public half of the broker's host key, fresh per broker and
  0600. The client trusts exactly that key (no trust on first use).
* ``broker.lock``: the broker holds an ``flock`` on it while it lives; a free lock
  and a refused socket mean the socket is stale.
* ``spawn.lock``: starting a broker is single-flight across processes.
* ``broker.log``: the broker's log (0600).

The SSH username sent to the broker names the upstream (:class:`Request`). When the
broker cannot reach it, it disconnects with the error encoded by :func:`encode_error`,
and :func:`connect` raises the same sshpyk exception, with the same message, that an
in-process connection would have raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from ..errors import (
    ConnectError,
    LoginPromptError,
    SSHConfigError,
    SSHPykError,
    UnsafePathError,
)
from ..localfs import (
    broker_dir,
    check_own_socket,
    open_private_file,
    peer_credentials,
    read_private_json,
)
from .loginrelay import RelayedLoginClient

__all__ = [
    "ERROR_PREFIX",
    "LOCAL_CIPHERS",
    "PERSIST_ENV",
    "PROTOCOL",
    "START_TIMEOUT",
    "BrokerPaths",
    "Request",
    "broker_paths",
    "broker_status",
    "connect",
    "decode_error",
    "encode_error",
    "share_persist",
]

log = logging.getLogger("sshpyk")

#: Version of what the client and the broker say to each other; part of the directory
#: name, so that two sshpyk versions never share a broker.
PROTOCOL = 1

#: Seconds a shared connection stays up after its last user leaves; 0 or unset: no
#: sharing (each process connects by itself).
PERSIST_ENV = "SSHPYK_SHARE_PERSIST"

#: Bound on starting a broker (its socket accepting), within the connect timeout.
START_TIMEOUT = 15.0

#: Disconnect reasons that carry an sshpyk error start with this.
ERROR_PREFIX = "sshpyk-broker:"

#: The local hop runs over a private unix socket; AES-GCM is the cheapest cipher
#: asyncssh has (it has no "none").
LOCAL_CIPHERS = ("aes128-gcm@openssh.com",)

#: asyncssh refuses usernames of 1024 bytes or more.
_MAX_REQUEST = 1023

#: A log bigger than this is emptied when the next broker starts.
_MAX_LOG = 1 << 20

#: Starts the broker detached: this short-lived process forks and exits, so that the
#: broker is nobody's child (no zombie in a long-lived caller) and not a session leader.
_DETACH = (
    "import os, sys\n"
    "if os.fork() == 0:\n"
    "    os.execv(sys.executable, [sys.executable, '-m', 'sshpyk.ssh.broker', *sys.argv[1:]])\n"
)


def share_persist(explicit: float | None = None) -> float:
    """The persist time in seconds: ``$SSHPYK_SHARE_PERSIST`` when set (it overrides
    the configuration: one process's sharing is turned off without editing kernelspecs),
    else ``explicit`` (the kernelspec's ``connection_persist``), else 0; 0 means no
    sharing."""
    text = os.environ.get(PERSIST_ENV, "").strip()
    if text:
        where = f"{PERSIST_ENV}={text!r}"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    elif explicit is not None:
        value = float(explicit)
        where = f"connection persist {explicit!r}"
    else:
        return 0.0
    if not math.isfinite(value) or value < 0:
        raise SSHConfigError(f"{where} is not a number of seconds >= 0 (0: no connection sharing)")
    return value


# -- what the client asks for, and the errors that come back ----------------------------


@dataclass(frozen=True)
class Request:
    """The upstream a client wants, sent as its SSH username (JSON)."""

    alias: str
    ssh_config: str | None
    persist: float
    timeout: float
    #: the client's credentials (CREDENTIAL_ENV): a login the broker makes for it uses
    #: them (a new ssh-agent socket, a Kerberos cache of its own), not the broker's
    env: dict[str, str] = field(default_factory=dict)

    def encode(self) -> str:
        text = json.dumps(
            {
                "v": PROTOCOL,
                "alias": self.alias,
                "config": self.ssh_config,
                "persist": self.persist,
                "timeout": self.timeout,
                "env": self.env,
            },
            separators=(",", ":"),
        )
        if len(text.encode()) > _MAX_REQUEST:
            raise SSHConfigError(
                f"cannot share the connection to {self.alias!r}: alias and ssh config path are "
                f"too long for the connection broker (set {PERSIST_ENV}=0)"
            )
        return text

    @classmethod
    def decode(cls, text: str) -> Request:
        """The request in ``text``; ValueError if it is not one of this version."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != PROTOCOL:
            raise ValueError(f"not a version {PROTOCOL} request")
        try:
            alias, config, persist, timeout = (
                data[key] for key in ("alias", "config", "persist", "timeout")
            )
        except KeyError as exc:
            raise ValueError(f"no {exc}") from None
        if not isinstance(alias, str) or not alias:
            raise ValueError("no alias")
        if config is not None and not (isinstance(config, str) and os.path.isabs(config)):
            raise ValueError("the ssh config is not an absolute path")
        numbers = (persist, timeout)
        if not all(isinstance(n, (int, float)) and math.isfinite(n) and n >= 0 for n in numbers):
            raise ValueError("persist and timeout must be numbers >= 0")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(
            k in CREDENTIAL_ENV and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError(f"env may only hold {', '.join(CREDENTIAL_ENV)}")
        return cls(alias, config, float(persist), float(timeout), dict(env))


#: what a client's environment tells the broker's login for it
CREDENTIAL_ENV = ("SSH_AUTH_SOCK", "KRB5CCNAME")


def credential_env() -> dict[str, str]:
    """This process's credentials, for a login the broker makes on its behalf."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}


def encode_error(exc: SSHPykError) -> str:
    """A disconnect reason that carries ``exc`` (class, message, attributes)."""
    fields = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, type(None)))}
    body = {"kind": type(exc).__name__, "message": str(exc), "fields": fields}
    return ERROR_PREFIX + json.dumps(body, separators=(",", ":"))


def _error_classes() -> dict[str, type[SSHPykError]]:
    found: dict[str, type[SSHPykError]] = {}
    todo = [SSHPykError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def decode_error(exc: BaseException) -> SSHPykError | None:
    """The sshpyk error a broker's disconnect carries, else None."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str) or not reason.startswith(ERROR_PREFIX):
        return None
    try:
        body, _ = json.JSONDecoder().raw_decode(reason[len(ERROR_PREFIX) :])
        kind, message, fields = body["kind"], body["message"], body.get("fields") or {}
    except (ValueError, KeyError, TypeError):
        return None
    cls = _error_classes().get(str(kind), SSHPykError)
    error = cls.__new__(cls)
    Exception.__init__(error, str(message))
    if isinstance(fields, dict):
        error.__dict__.update(fields)
    return error


# -- finding (or starting) the broker ----------------------------------------------------


@dataclass(frozen=True)
class BrokerPaths:
    """The files in the broker's private directory."""

    dir: Path

    @property
    def socket(self) -> Path:
        return self.dir / "broker.sock"

    @property
    def hostkey(self) -> Path:
        return self.dir / "hostkey.json"

    @property
    def lock(self) -> Path:
        return self.dir / "broker.lock"

    @property
    def spawn_lock(self) -> Path:
        return self.dir / "spawn.lock"

    @property
    def log(self) -> Path:
        return self.dir / "broker.log"

    @property
    def status(self) -> Path:
        """What the broker holds now (``sshpyk ps`` shows it), rewritten as it changes."""
        return self.dir / "status.json"


def broker_paths() -> BrokerPaths:
    """The broker's directory, made (0700) or checked: a planted one is refused."""
    return BrokerPaths(broker_dir(PROTOCOL))


def broker_status() -> dict[str, Any] | None:
    """The live broker's status (pid, started, its connections and their clients), or
    None when no broker runs (or its directory is unsafe). Never starts one."""
    try:
        paths = broker_paths()
        if lock_is_free(paths.lock):
            return None
        status = read_private_json(paths.status)
    except (OSError, UnsafePathError, ValueError):
        return None
    return dict(status) if isinstance(status, dict) else None


def lock_is_free(path: Path) -> bool:
    """Whether no process holds ``flock`` on ``path`` (no live broker)."""
    fd = open_private_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return True


def _try_socket(paths: BrokerPaths) -> socket.socket | None:
    """A socket connected to a live broker of ours, or None if nobody listens."""
    try:
        check_own_socket(paths.socket)
    except FileNotFoundError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(paths.socket))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    creds = peer_credentials(sock)
    if creds is None or creds[1] != os.getuid():
        sock.close()
        raise UnsafePathError(
            f"{paths.socket} is served by uid {creds[1] if creds else 'unknown'}, not by you: "
            "refusing the connection broker"
        )
    return sock


@contextlib.contextmanager
def _flocked(path: Path, deadline: float) -> Iterator[None]:
    fd = open_private_file(path)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConnectError(
                        f"timed out waiting for another process to start the connection "
                        f"broker ({path} stays locked)"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _spawn(paths: BrokerPaths) -> int:
    """Start a detached broker; the log's size before it (its new lines follow)."""
    fd = open_private_file(paths.log, os.O_WRONLY | os.O_APPEND)
    try:
        if os.fstat(fd).st_size > _MAX_LOG:
            os.ftruncate(fd, 0)
        start = os.fstat(fd).st_size
        env = dict(os.environ)
        env.pop(PERSIST_ENV, None)
        proc = subprocess.Popen(
            [sys.executable, "-c", _DETACH, "--dir", str(paths.dir)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            cwd="/",
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    try:
        proc.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return start


def _new_log_lines(paths: BrokerPaths, start: int) -> list[str]:
    try:
        with open(paths.log, "rb") as f:
            f.seek(start)
            text = f.read(64 << 10).decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()]


def open_broker_socket(paths: BrokerPaths, deadline: float) -> socket.socket:
    """A socket connected to the live broker, started first if there is none (blocking:
    run it in a thread). A stale socket (refused, broker lock free) is replaced."""
    sock = _try_socket(paths)
    if sock is not None:
        return sock
    deadline = min(deadline, time.monotonic() + START_TIMEOUT)
    with _flocked(paths.spawn_lock, deadline):
        log_start: int | None = None
        while True:
            sock = _try_socket(paths)
            if sock is not None:
                return sock
            if log_start is None and lock_is_free(paths.lock):
                # nobody serves the socket and no broker is alive: start one
                with contextlib.suppress(FileNotFoundError):
                    check_own_socket(paths.socket).unlink()
                log_start = _spawn(paths)
            elif log_start is not None:
                lines = _new_log_lines(paths, log_start)
                fatal = [line.split("FATAL", 1)[1].strip(" :") for line in lines if "FATAL" in line]
                if fatal:
                    raise ConnectError(
                        f"the connection broker did not start: {fatal[-1]} (log {paths.log})"
                    )
            if time.monotonic() > deadline:
                lines = _new_log_lines(paths, log_start or 0)[-1:]
                raise ConnectError(
                    f"the connection broker did not start in time (log {paths.log}"
                    + (f": {lines[0].strip()}" if lines else "")
                    + f"); set {PERSIST_ENV}=0 to connect without it"
                )
            time.sleep(0.02)


def _pinned_key(paths: BrokerPaths) -> asyncssh.SSHKey:
    data = read_private_json(paths.hostkey)
    try:
        return asyncssh.import_public_key(str(data["key"]))
    except (KeyError, TypeError, asyncssh.KeyImportError) as exc:
        raise UnsafePathError(f"{paths.hostkey} holds no usable key") from exc


def _prepare(deadline: float) -> tuple[BrokerPaths, socket.socket, asyncssh.SSHKey]:
    paths = broker_paths()
    sock = open_broker_socket(paths, deadline)
    try:
        return paths, sock, _pinned_key(paths)
    except BaseException:
        sock.close()
        raise


async def _prepare_in_thread(
    deadline: float,
) -> tuple[BrokerPaths, socket.socket, asyncssh.SSHKey]:
    """:func:`_prepare` in a thread; a socket it opens for a caller that was cancelled
    meanwhile is closed."""
    future = asyncio.get_running_loop().run_in_executor(None, _prepare, deadline)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_unused)
        raise


def _close_unused(future: asyncio.Future[tuple[BrokerPaths, socket.socket, Any]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[1].close()


def client_options(request: Request, key: asyncssh.SSHKey) -> dict[str, Any]:
    """asyncssh.connect's options for the local hop: the broker's key and nothing of the
    user's (no config, no keys, no agent: the broker lets our uid in without auth)."""
    return {
        "username": request.encode(),
        "known_hosts": ([key], [], []),
        "config": None,
        "client_keys": None,
        "agent_path": None,
        "agent_forwarding": False,
        "gss_auth": False,
        "kbdint_auth": True,  # a login's questions for a person (loginrelay.py)
        "password": None,
        "x509_trusted_certs": None,
        "encryption_algs": list(LOCAL_CIPHERS),
        "keepalive_interval": 0,
    }


async def connect(
    alias: str, ssh_config: str | None, *, persist: float, timeout: float
) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``alias`` through the broker (started if needed).

    Errors of the upstream connection are the sshpyk errors an in-process connect would
    raise; a broker that goes away during the handshake (it was exiting) is tried once
    more. Blocking file and socket work runs in a thread.
    """
    request = Request(alias, ssh_config, persist, timeout, credential_env())
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    paths: BrokerPaths | None = None
    for _attempt in range(2):
        paths, sock, key = await _prepare_in_thread(deadline)
        client = RelayedLoginClient(alias)
        try:
            conn = await asyncssh.connect(
                sock=sock, client_factory=lambda c=client: c, **client_options(request, key)
            )
        except (asyncssh.Error, OSError) as exc:
            sock.close()
            error = decode_error(exc)
            if error is not None:
                raise error from None
            if client.failure is not None:  # the login's question found nobody here
                raise LoginPromptError(
                    f"authentication failed for {alias!r}: {client.failure}"
                ) from None
            last = exc
            log.info("[%s] the connection broker went away during the handshake: %s", alias, exc)
            continue
        log.debug("[%s] connected through the connection broker", alias)
        return conn
    raise ConnectError(
        f"cannot reach {alias!r} through the connection broker: "
        f"{' '.join(str(last).split()) or type(last).__name__} (log {paths.log if paths else '?'};"
        f" {PERSIST_ENV}=0 connects without it)"
    ) from last
