"""sshpyk.ssh.kerberos: GSSAPI settings from the ssh config (OpenSSH's defaults, not
asyncssh's), the service principal of each hop, and the failure reasons that need no
KDC (no sshd; tests/e2e/security/test_kerberos.py has the real realm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sshpyk.errors import KerberosError, KerberosTicketError, KerberosUnavailableError
from sshpyk.ssh import kerberos
from sshpyk.ssh.hosts import host_options
from sshpyk.ssh.kerberos import GSSSettings, login_error

from support.sshd import write_config

pytestmark = pytest.mark.timeout(30)


async def test_off_unless_the_config_turns_it_on(tmp_path: Path) -> None:
    # asyncssh would try GSSAPI here; ssh(1) does not, and sshpyk follows ssh(1)
    config = write_config(tmp_path, "Host plain\n  HostName plain.example\n")
    built = await host_options("plain", config)
    assert built.gss == GSSSettings(host="plain.example")
    assert not built.gss.enabled
    assert built.overrides["gss_host"] is None  # no credential lookup at all


async def test_config_options_and_the_hostname_principal(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "Host hpc\n  HostName login1.hpc.example\n  GSSAPIAuthentication yes\n"
        "  GSSAPIDelegateCredentials yes\n  GSSAPIKeyExchange yes\n",
    )
    built = await host_options("hpc", config)
    assert built.gss == GSSSettings(True, True, True, "login1.hpc.example")
    assert built.gss.service == "host/login1.hpc.example"
    assert built.overrides["gss_host"] == "login1.hpc.example"
    assert built.overrides["gss_auth"] is True
    assert built.overrides["gss_kex"] is True
    assert built.overrides["gss_delegate_creds"] is True


async def test_each_hop_asks_for_its_own_principal(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "Host gate\n  HostName gate.example\n  GSSAPIAuthentication yes\n"
        "Host inner\n  HostName inner.example\n  ProxyJump gate\n  GSSAPIAuthentication yes\n"
        "  GSSAPIDelegateCredentials no\n",
    )
    inner = await host_options("inner", config)
    gate = await host_options(inner.proxy_jump or "", config)
    assert (inner.gss.host, gate.gss.host) == ("inner.example", "gate.example")
    assert not inner.gss.delegate
    # a ProxyJump hop written as user@host:port asks for that host's principal
    hop = await host_options("me@other.example:2222", config)
    assert hop.gss.host == "other.example" and not hop.gss.enabled


async def test_only_kerberos_offered_but_not_configured_names_option_and_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kerberos, "gssapi_available", lambda: False)
    error = await login_error(
        GSSSettings(host="h"),
        label="'hpc'",
        alias="hpc",
        user="me",
        offered=["gssapi-keyex", "gssapi-with-mic"],
    )
    assert isinstance(error, KerberosError)
    text = str(error)
    assert "\n" not in text
    assert "GSSAPIAuthentication yes" in text and 'pip install "sshpyk[kerberos]"' in text
    # other methods offered too: not a Kerberos problem, the usual error stands
    assert (
        await login_error(
            GSSSettings(host="h"),
            label="'hpc'",
            alias="hpc",
            user="me",
            offered=["publickey", "gssapi-with-mic"],
        )
        is None
    )


async def test_configured_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kerberos, "gssapi_available", lambda: False)
    error = await login_error(
        GSSSettings(auth=True, host="h"),
        label="'hpc'",
        alias="hpc",
        user="me",
        offered=["gssapi-with-mic"],
    )
    assert isinstance(error, KerberosUnavailableError)
    assert str(error).endswith('pip install "sshpyk[kerberos]"')


async def test_configured_but_the_server_offers_no_gssapi() -> None:
    error = await login_error(
        GSSSettings(auth=True, host="h"),
        label="'hpc'",
        alias="hpc",
        user="me",
        offered=["publickey", "password"],
    )
    assert isinstance(error, KerberosError)
    assert "offers no gssapi-with-mic (it offers publickey, password)" in str(error)


class _MinorCodeError(Exception):
    """The one attribute of a GSSError that _step_error reads."""

    def __init__(self, min_code: int) -> None:
        super().__init__(f"minor {min_code}")
        self.min_code = min_code


@pytest.mark.parametrize(
    ("code", "cls", "fragment"),
    [
        (-1765328377, KerberosError, "no service principal host/h.example"),  # S_PRINCIPAL
        (-1765328316, KerberosError, "wrong realm or principal"),  # WRONG_REALM
        (-1765328352, KerberosTicketError, "has expired"),  # TKT_EXPIRED
        (-1765328228, KerberosError, "cannot reach a KDC of realm R.EX"),  # KDC_UNREACH
        (-1765328347, KerberosError, "sync the clock"),  # SKEW
        (12345, KerberosError, "could not get a ticket for host/h.example"),
    ],
)
def test_step_errors_by_code(code: int, cls: type, fragment: str) -> None:
    settings = GSSSettings(auth=True, host="h.example")
    error = kerberos._step_error(
        _MinorCodeError(code & 0xFFFFFFFF), settings, "w", "me@R.EX", "hpc"
    )
    assert type(error) is cls
    assert fragment in str(error)
