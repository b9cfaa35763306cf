"""Kerberos single sign-on against a real MIT KDC and a GSSAPI-only OpenSSH sshd, both on
loopback (support/kerberos.py): a kinit'ed user logs in with no key and no password,
directly and through a bastion that needs GSSAPI too; delegated credentials reach the
kernel only when the ssh config asks; no ticket, an expired one, a wrong realm, a
refused principal, a config without GSSAPI and a server without it each fail with one
line that says what to do; a ticket that expires under running kernels changes nothing
until a reconnect, which works again after kinit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sshpyk import SSHSession
from sshpyk.errors import (
    AuthenticationError,
    KerberosError,
    KerberosTicketError,
)
from sshpyk.kernelspec import SSHKernelSpec, write_spec
from sshpyk.ssh import pool

from support.cli import sshpyk
from support.kerberos import KerberosSSHD, ThrowawayKDC, need_kerberos
from support.kernels import run_cell, start_manager, stop_manager
from support.sshd import ThrowawaySSHD

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GSS = "  GSSAPIAuthentication yes\n"
DELEGATE = "  GSSAPIDelegateCredentials yes\n"


@dataclass
class Realm:
    kdc: ThrowawayKDC
    sshd: KerberosSSHD
    config: Path
    root: Path

    def ticket(self, monkeypatch: pytest.MonkeyPatch, user: str = "root", **kw: str) -> Path:
        """kinit ``user`` into a fresh cache that this process uses (KRB5CCNAME)."""
        ccache = self.root / f"cc-{user}-{time.monotonic_ns()}"
        self.kdc.kinit(user, ccache, **kw)
        monkeypatch.setenv("KRB5CCNAME", f"FILE:{ccache}")
        return ccache


def _block(name: str, host: str, port: int, known: Path, extra: str = "") -> str:
    return f"""Host {name}
  HostName {host}
  Port {port}
  User root
  IdentitiesOnly yes
  UserKnownHostsFile {known}
{extra}"""


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory, sshd: ThrowawaySSHD) -> Iterator[Realm]:
    need_kerberos()
    root = tmp_path_factory.mktemp("krb")
    # the target behind the bastion is reached as HostName localhost: its own service
    # principal, in the same host keytab
    kdc = ThrowawayKDC(root / "kdc", host_services=("host/127.0.0.1", "host/localhost"))
    kdc.start()
    try:
        server = KerberosSSHD(kdc, root / "sshd").start()
        try:
            host_key = (server.root / "host_ed25519.pub").read_text().split()
            known = root / "known_hosts"
            known.write_text(
                f"[127.0.0.1]:{server.port} {host_key[0]} {host_key[1]}\n"
                f"[localhost]:{server.port} {host_key[0]} {host_key[1]}\n"
            )
            empty = root / "known_hosts_empty"
            empty.write_text("")
            port = server.port
            config = root / "ssh_config"
            config.write_text(
                _block("krb", "127.0.0.1", port, known, GSS)
                + _block("krb-deleg", "127.0.0.1", port, known, GSS + DELEGATE)
                + _block("krb-kex", "127.0.0.1", port, empty, GSS + "  GSSAPIKeyExchange yes\n")
                + _block("krb-off", "127.0.0.1", port, known)
                + _block("krb-inner", "localhost", port, known, GSS + "  ProxyJump krb\n")
                + _block(
                    "krb-nogss",
                    "127.0.0.1",
                    sshd.port,
                    sshd.known_hosts,
                    GSS + f"  IdentityFile {sshd.root / 'id_stranger'}\n",
                )
            )
            yield Realm(kdc, server, config, root)
        finally:
            server.stop()
    finally:
        kdc.stop()


@pytest.fixture(autouse=True)
def kerberos_env(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """This process is a Kerberos client of the throwaway realm, without any ticket or
    ssh-agent of the person running the tests."""
    if "realm" in request.fixturenames:
        kdc: ThrowawayKDC = request.getfixturevalue("realm").kdc
        monkeypatch.setenv("KRB5_CONFIG", str(kdc.krb5_conf))
    monkeypatch.setenv("KRB5CCNAME", "FILE:/nonexistent/sshpyk-no-ccache")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("SSH_ASKPASS", raising=False)


async def _login(alias: str, realm: Realm) -> str:
    async with await SSHSession.connect(
        alias, ssh_config=realm.config, connect_timeout=20
    ) as session:
        conn = await session.connection()
        done = await conn.run("echo $USER; echo KRB5CCNAME=${KRB5CCNAME:-}", timeout=20)
        return str(done.stdout)


def _one_line(text: str) -> None:
    assert "\n" not in text and "Traceback" not in text, text


# -- logging in ------------------------------------------------------------------------


async def test_kinit_then_login_no_key_no_password(realm, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    realm.ticket(monkeypatch)
    started = time.monotonic()
    out = await _login("krb", realm)
    seconds = time.monotonic() - started
    assert out.splitlines()[0] == "root"
    assert "KRB5CCNAME=\n" in out  # no delegation unless the config asks
    print(f"GSSAPI login + one command: {seconds:.3f}s")


async def test_gssapi_key_exchange_needs_no_known_hosts_entry(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch)
    async with await SSHSession.connect(
        "krb-kex", ssh_config=realm.config, connect_timeout=20
    ) as session:
        conn = await session.connection()
        assert conn.get_server_host_key() is None  # Kerberos authenticated the host
        assert (await conn.run("true", timeout=20)).exit_status == 0


async def test_bastion_that_needs_gssapi_too(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch)
    out = await _login("krb-inner", realm)
    assert out.splitlines()[0] == "root"
    # each hop asked the KDC for its own HostName's principal
    klist = subprocess.run(["klist"], capture_output=True, text=True, timeout=10, check=True).stdout
    assert "host/127.0.0.1@SSHPYK.TEST" in klist, klist
    assert "host/localhost@SSHPYK.TEST" in klist, klist


async def test_bastion_without_ticket_names_the_bastion(realm) -> None:
    with pytest.raises(KerberosTicketError) as info:
        await _login("krb-inner", realm)
    text = str(info.value)
    _one_line(text)
    assert "bastion 'krb'" in text and "kinit" in text, text


# -- errors: one line each, with the fix -------------------------------------------------


async def test_no_ticket_says_kinit(realm) -> None:
    started = time.monotonic()
    with pytest.raises(KerberosTicketError) as info:
        await _login("krb", realm)
    text = str(info.value)
    _one_line(text)
    assert text.startswith("authentication failed for 'krb': no Kerberos ticket"), text
    assert "run `kinit`" in text
    assert time.monotonic() - started < 15


async def test_expired_ticket_says_kinit(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch, lifetime="2s")
    await asyncio.sleep(3)
    with pytest.raises(KerberosTicketError) as info:
        await _login("krb", realm)
    text = str(info.value)
    _one_line(text)
    assert "has expired" in text and "run `kinit`" in text, text


async def test_wrong_realm_names_the_principal(realm, monkeypatch) -> None:
    # a ticket of another realm (root@OTHER.TEST), whose KDC has no host/127.0.0.1
    with ThrowawayKDC(realm.root / "other-realm", realm="OTHER.TEST", host_services=()) as other:
        ccache = realm.root / "cc-other-realm"
        other.kinit("root", ccache)
        monkeypatch.setenv("KRB5_CONFIG", str(other.krb5_conf))
        monkeypatch.setenv("KRB5CCNAME", f"FILE:{ccache}")
        with pytest.raises(KerberosError) as info:
            await _login("krb", realm)
    text = str(info.value)
    _one_line(text)
    assert not isinstance(info.value, KerberosTicketError)
    assert "realm OTHER.TEST has no service principal host/127.0.0.1" in text, text
    assert "wrong realm or principal" in text and "[domain_realm]" in text


async def test_principal_the_server_refuses_for_user(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch, user="alice")  # alice@SSHPYK.TEST may not log in as root
    with pytest.raises(KerberosError) as info:
        await _login("krb", realm)
    text = str(info.value)
    _one_line(text)
    assert "did not accept Kerberos principal alice@SSHPYK.TEST as user root" in text, text
    assert ".k5login" in text


async def test_config_without_gssapi_names_the_option(realm, monkeypatch) -> None:
    # OpenSSH's default: no GSSAPI unless the ssh config says GSSAPIAuthentication yes
    realm.ticket(monkeypatch)
    with pytest.raises(KerberosError) as info:
        await _login("krb-off", realm)
    text = str(info.value)
    _one_line(text)
    assert "the server only takes Kerberos" in text and "GSSAPIAuthentication yes" in text


async def test_server_without_gssapi(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch)
    with pytest.raises(AuthenticationError) as info:
        await _login("krb-nogss", realm)
    text = str(info.value)
    _one_line(text)
    assert "the server offers no gssapi-with-mic (it offers publickey)" in text, text


def test_without_the_gssapi_package_names_the_extra(realm, tmp_path) -> None:
    """A process where ``import gssapi`` fails (as without the extra): one line naming
    ``sshpyk[kerberos]``."""
    blocker = tmp_path / "no_gssapi"
    blocker.mkdir()
    (blocker / "gssapi.py").write_text("raise ImportError('no gssapi here')\n")
    script = (
        "import asyncio, sys\n"
        "from sshpyk import SSHSession\n"
        "from sshpyk.errors import KerberosUnavailableError\n"
        "async def main():\n"
        "    try:\n"
        f"        await SSHSession.connect('krb', ssh_config={str(realm.config)!r},"
        " connect_timeout=20)\n"
        "    except KerberosUnavailableError as exc:\n"
        "        print(exc)\n"
        "        return 0\n"
        "    return 1\n"
        "sys.exit(asyncio.run(main()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout.strip()
    _one_line(text)
    assert 'pip install "sshpyk[kerberos]"' in text, text


# -- sshpyk check ----------------------------------------------------------------------


def test_check_shows_gssapi_with_mic_succeeded(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch)
    result = sshpyk("check", "--json", "krb", "--ssh-config", str(realm.config), "--no-kernel")
    stages = {stage["stage"]: stage for stage in json.loads(result.stdout)["stages"]}
    auth = stages["auth"]
    assert auth["status"] == "ok", auth
    assert "gssapi-with-mic succeeded as Kerberos principal root@SSHPYK.TEST" in auth["detail"]


def test_check_with_gssapi_key_exchange(realm, monkeypatch) -> None:
    realm.ticket(monkeypatch)
    result = sshpyk("check", "--json", "krb-kex", "--ssh-config", str(realm.config), "--no-kernel")
    stages = {stage["stage"]: stage for stage in json.loads(result.stdout)["stages"]}
    assert stages["hostkey"]["status"] == "ok", stages["hostkey"]
    assert "Kerberos authenticated the host" in stages["hostkey"]["detail"]
    assert (
        "gssapi-keyex succeeded as Kerberos principal root@SSHPYK.TEST"
        in (stages["auth"]["detail"])
    )


def test_check_without_ticket_says_kinit(realm) -> None:
    result = sshpyk("check", "krb", "--ssh-config", str(realm.config), "--no-kernel")
    assert result.exit_code == 1
    assert "no Kerberos ticket" in result.output and "kinit" in result.output, result.output
    assert "Traceback" not in result.output


# -- kernels: delegation, and a ticket that expires under them ----------------------------


def _spec(name: str, alias: str, realm: Realm, run_root: Path) -> SSHKernelSpec:
    spec = SSHKernelSpec(
        name=name,
        ssh_host_alias=alias,
        ssh_config=str(realm.config),
        remote_python=sys.executable,
        remote_kernel_name="python3",
        display_name=name,
        language="python",
        start_timeout=60.0,
        remote_run_root=str(run_root),
    )
    write_spec(spec, replace=True)
    return spec


KRB_CELL = (
    "import os, subprocess\n"
    "print('CC=' + os.environ.get('KRB5CCNAME', ''))\n"
    "r = subprocess.run(['klist'], capture_output=True, text=True)\n"
    "print(r.stdout)\n"
)


@pytest.mark.timeout(180)
async def test_delegated_ticket_reaches_the_kernel_only_when_asked(
    realm, monkeypatch, run_root
) -> None:
    realm.ticket(monkeypatch)
    for alias, delegated in (("krb-deleg", True), ("krb", False)):
        _spec(f"krb_{delegated}", alias, realm, run_root)
        km, kc = await start_manager(f"krb_{delegated}")
        try:
            reply, out = await run_cell(kc, KRB_CELL)
        finally:
            await stop_manager(km, kc)
        assert reply["status"] == "ok", reply
        if delegated:
            assert "CC=FILE:/tmp/krb5cc_" in out, out
            assert "Default principal: root@SSHPYK.TEST" in out, out
        else:
            assert "CC=\n" in out, out
            assert "Default principal" not in out, out
    await pool.close_all()


@pytest.mark.timeout(180)
async def test_ticket_expiring_under_a_running_kernel(realm, monkeypatch, run_root) -> None:
    """Kernels (on sshpyk's SSH loop) and a pool connection of this loop log in with a
    6 s ticket; after it expires both still work; the pool connection, dropped, cannot
    come back (the kinit hint) until kinit, then does, in the same process."""
    realm.ticket(monkeypatch, lifetime="6s")
    _spec("krb_expiry", "krb", realm, run_root)
    km, kc = await start_manager("krb_expiry")
    shared = pool.acquire("krb", str(realm.config))
    try:
        conn = await shared.ensure_connected(20)
        reply, out = await run_cell(kc, "print(6 * 7)")
        assert "42" in out
        await asyncio.sleep(7)  # the ticket has expired; the connections are up
        reply, out = await run_cell(kc, "print(6 * 8)")
        assert reply["status"] == "ok" and "48" in out, (reply, out)
        assert (await conn.run("true", timeout=20)).exit_status == 0
        conn.abort()
        await asyncio.wait_for(conn.wait_closed(), 10)
        with pytest.raises(KerberosTicketError) as info:
            await shared.ensure_connected(20)
        assert "has expired" in str(info.value) and "kinit" in str(info.value)
        realm.ticket(monkeypatch)  # kinit (a new cache: KRB5CCNAME is re-read)
        again = await shared.ensure_connected(20)
        assert (await again.run("true", timeout=20)).exit_status == 0
        reply, out = await run_cell(kc, "print(6 * 9)")
        assert "54" in out
    finally:
        await pool.release(shared)
        await stop_manager(km, kc)
    await pool.close_all()


# -- secrets ---------------------------------------------------------------------------


async def test_no_ticket_material_in_logs_or_argv(realm, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ccache = realm.ticket(monkeypatch)
    await _login("krb-deleg", realm)
    secret = ccache.read_bytes()
    # the ticket's session key and ticket blobs never appear as text anywhere; the
    # cache file is the user's own (0600), as kinit made it
    assert (ccache.stat().st_mode & 0o077) == 0
    for chunk in (secret[i : i + 16] for i in range(64, len(secret) - 16, 97)):
        text = chunk.hex()
        assert text not in caplog.text
        assert chunk.decode("latin-1") not in caplog.text
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=10).stdout
    assert str(ccache) not in ps
