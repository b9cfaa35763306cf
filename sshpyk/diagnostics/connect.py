"""The stages up to a logged-in connection: config resolution, TCP connect, host key,
authentication. They walk the connect path kernels take (the pool's connection, through
the same ProxyJump hops), timed by its SSH client."""

from __future__ import annotations

import asyncio
import os
import time
from typing import NoReturn

import asyncssh

from ..errors import (
    AuthenticationError,
    ConnectError,
    ConnectTimeoutError,
    HostKeyError,
    HostNotFoundError,
    HostRefusedError,
    KerberosError,
    LoginPromptError,
    SSHPykError,
)
from ..kernels.session import SSHSession
from ..ssh.hostkeys import DEFAULT_KNOWN_HOSTS, KeyRecorder
from ..ssh.hosts import alias_in_config, config_path, resolve_host
from .report import Diagnosis, Status

__all__ = ["stage_config", "stage_connect"]


class TimingClient(KeyRecorder):
    """Notes when the TCP connection, the key exchange and the authentication end
    (and, as a KeyRecorder, the host key known_hosts did not trust)."""

    def __init__(self, marks: dict[str, float], offered: list[tuple[asyncssh.SSHKey, str]]) -> None:
        super().__init__(offered)
        self.marks = marks

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        super().connection_made(conn)
        self.marks.setdefault("tcp", time.monotonic())

    def begin_auth(self, username: str) -> None:
        # called once the key exchange is done, i.e. the host key was accepted
        self.marks.setdefault("hostkey", time.monotonic())

    def auth_completed(self) -> None:
        self.marks.setdefault("auth", time.monotonic())

    def auth_methods(self) -> str:
        """Which methods the server offered and which were used, for the auth stage."""
        if not self.auth_offered:
            return ""
        text = f"server offered {', '.join(self.auth_offered)}"
        tried = self.auth_tried
        principal = self.gss_principal if "auth" in self.marks else None
        if tried and principal is not None and tried[-1].startswith("gssapi"):
            # Kerberos: say which principal got in (klist shows the same ticket)
            if tried[:-1]:
                text += f"; tried: {' then '.join(tried[:-1])}"
            text += f"; {tried[-1]} succeeded as Kerberos principal {principal}"
        elif tried:
            done = "succeeded" if "auth" in self.marks else "tried"
            text += f"; {done}: {' then '.join(tried)}"
        return text


async def stage_config(d: Diagnosis) -> None:
    t = d.target
    started = time.monotonic()
    try:
        d.config = config_path(t.ssh_config)
        d.settings, d.options = await asyncio.wait_for(resolve_host(t.alias, d.config), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        d.fail(
            "config",
            time.monotonic() - started,
            str(exc) or "timed out reading the ssh config",
            f"fix the file named above; `ssh -G {t.alias}` shows how OpenSSH reads it",
        )
    seconds = time.monotonic() - started
    assert d.settings is not None
    detail = d.settings.summary() + (f" (from {d.config})" if d.config else "")
    if not alias_in_config(t.alias, d.config) and d.settings.hostname == t.alias:
        d.record(
            "config",
            Status.WARN,
            seconds,
            f"{t.alias!r} is not a Host in "
            f"{d.config or 'any ssh config'}: used as a host name; {detail}",
            f"add a `Host {t.alias}` block with HostName, User and IdentityFile to {d.where()}",
        )
    else:
        d.record("config", Status.OK, seconds, detail)


async def stage_connect(d: Diagnosis) -> None:
    """TCP connect, key exchange + host key, authentication: the connection kernels
    use (the pool's, through the same ProxyJump hops), timed by its SSH client."""
    t, settings = d.target, d.settings
    assert settings is not None
    marks: dict[str, float] = {}
    clients: list[TimingClient] = []

    def make_client(offered: list[tuple[asyncssh.SSHKey, str]]) -> TimingClient:
        client = TimingClient(marks, offered)
        clients.append(client)  # the target's is the last (bastions connect first)
        return client

    started = time.monotonic()
    try:
        d.session = await asyncio.wait_for(
            SSHSession.connect(
                t.alias,
                ssh_config=d.config,
                connect_timeout=d.timeout,
                client_factory=make_client,
            ),
            d.timeout,
        )
        conn = await d.session.connection()
    except (SSHPykError, asyncio.TimeoutError) as exc:
        _connect_failed(d, exc, started, marks, clients[-1].auth_methods() if clients else "")
    via = _via(d)
    tcp_at = marks.get("tcp", started)
    key_at = marks.get("hostkey", tcp_at)
    auth_at = marks.get("auth", key_at)
    d.record("tcp", Status.OK, tcp_at - started, f"{settings.hostname}:{settings.port}{via}")
    key = conn.get_server_host_key()
    if key is not None:
        key_detail = f"{key.get_algorithm()} {key.get_fingerprint()} matches known_hosts"
    else:  # GSSAPIKeyExchange: the server sends no host key
        key_detail = "no host key: Kerberos authenticated the host (GSSAPIKeyExchange)"
    d.record("hostkey", Status.OK, key_at - tcp_at, key_detail)
    user = conn.get_extra_info("username") or settings.user
    methods = clients[-1].auth_methods() if clients else ""
    detail = f"logged in as {user}" + (f" ({methods})" if methods else "")
    d.record("auth", Status.OK, auth_at - key_at, detail)


def _via(d: Diagnosis) -> str:
    settings = d.settings
    if settings and settings.proxy_jump:
        return f" via ProxyJump {settings.proxy_jump}"
    if settings and settings.proxy_command:
        return " via ProxyCommand"
    return ""


def _connect_failed(
    d: Diagnosis,
    exc: BaseException,
    started: float,
    marks: dict[str, float],
    methods: str = "",
) -> NoReturn:
    t, settings = d.target, d.settings
    assert settings is not None
    now = time.monotonic()
    timed_out = isinstance(exc, (asyncio.TimeoutError, ConnectTimeoutError))
    if timed_out:
        error: SSHPykError = ConnectError(f"no answer from {t.alias!r} within {d.timeout:g}s")
    else:
        assert isinstance(exc, SSHPykError)
        error = exc
    if "tcp" not in marks and (
        settings.proxy_jump or not isinstance(error, (HostKeyError, AuthenticationError))
    ):
        stage = "tcp"  # the target was not reached (a bastion's failure says why)
    elif isinstance(error, HostKeyError):
        stage = "hostkey"
    elif isinstance(error, AuthenticationError):
        stage = "auth"
    elif "tcp" not in marks:
        stage = "tcp"
    elif "hostkey" not in marks:
        stage = "hostkey"
    else:
        stage = "auth"
    endpoint = f"{settings.hostname}:{settings.port}"
    passed = {"tcp": endpoint + _via(d), "hostkey": "host key accepted"}
    previous = started
    for name in ("tcp", "hostkey", "auth"):
        if name == stage:
            break
        d.record(name, Status.OK, marks.get(name, previous) - previous, passed[name])
        previous = marks.get(name, previous)
    if stage == "tcp":
        if isinstance(error, HostKeyError) and error.fix:
            fix = error.fix
        elif isinstance(error, HostRefusedError):
            fix = (
                f"nothing listens on {endpoint}: start sshd there, or fix Port for "
                f"{t.alias} in {d.where()}"
            )
        elif isinstance(error, HostNotFoundError):
            fix = (
                f"add `Host {t.alias}` with a HostName to {d.where()}, or fix the "
                f"name (HostName {settings.hostname})"
            )
        else:
            fix = (
                f"check that {endpoint} is up and reachable from here (firewall, VPN, "
                "ProxyJump); `ssh -v " + t.alias + "` shows the same"
            )
    elif stage == "hostkey" and isinstance(error, HostKeyError) and error.fix:
        fix = error.fix
    elif stage == "hostkey" and isinstance(error, HostKeyError):
        host = (
            settings.hostname if settings.port == 22 else f"[{settings.hostname}]:{settings.port}"
        )
        files = list(settings.known_hosts) or [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
        file_arg = (
            ""
            if files == [os.path.expanduser(DEFAULT_KNOWN_HOSTS)]
            else f" -f {files[0]}"
            if len(files) == 1
            else " -f FILE"
        )
        fix = (
            f"verify the host's key fingerprint with its admin (a changed key may mean an "
            f"attack); if it was reinstalled: `ssh-keygen -R '{host}'{file_arg}`, then "
            f"`ssh {t.alias}` once to accept the new key (known_hosts: " + ", ".join(files) + ")"
        )
    elif stage == "hostkey":
        fix = (
            f"{endpoint} accepted the TCP connection but the SSH handshake failed: is it "
            f"an sshd (and not another service)? `ssh -v {t.alias}` shows the exchange"
        )
    elif timed_out:
        fix = f"the host did not finish authentication in time: try `ssh -v {t.alias} true`"
    elif isinstance(error, KerberosError):
        fix = (
            "the line above says what to run or fix; `klist` shows your ticket, and "
            f"`ssh -K -v {t.alias} true` tries the same login (README: Kerberos)"
        )
    elif isinstance(error, LoginPromptError):
        fix = (
            f"run `ssh {t.alias} true` in a terminal to check what the server asks; for "
            "JupyterLab set SSH_ASKPASS to a desktop askpass program (README: Logins that "
            "need a person)"
        )
    else:
        keys = ", ".join(settings.identity_files) or "your default keys"
        fix = (
            f"make `ssh {t.alias} true` work without a password: check User "
            f"({settings.user}) and IdentityFile ({keys}), then `ssh-copy-id {t.alias}`"
        )
    detail: object = error
    if stage == "hostkey" and isinstance(error, HostKeyError) and error.problem:
        detail = error.problem
    if stage == "auth" and methods:
        detail = f"{error} ({methods})"
    d.fail(stage, now - previous, str(detail), fix)
