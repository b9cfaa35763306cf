"""Kerberos single sign-on (GSSAPI), as ssh(1) does it: ``kinit`` once, no key, no password.

What to use comes from the user's ssh config, with OpenSSH's defaults (not asyncssh's):
``GSSAPIAuthentication`` (gssapi-with-mic), ``GSSAPIKeyExchange`` (gssapi-keyex: the
host is then authenticated by Kerberos and sends no host key) and
``GSSAPIDelegateCredentials`` (the remote shell, and so the kernel, gets a forwarded
ticket in ``KRB5CCNAME``) are all off unless the config turns them on. asyncssh would
try GSSAPI whenever the config does not mention it; ssh(1) does not, and neither does
sshpyk: a host config that says nothing gets no Kerberos traffic. The service principal
is ``host/<HostName>`` of each connection, so every ProxyJump hop asks for its own.

GSSAPI needs the ``gssapi`` package (``pip install "sshpyk[kerberos]"``) and MIT or
Heimdal's libraries. asyncssh skips GSSAPI silently when it cannot be used (no package,
no ticket, an unknown principal): the server then just says "permission denied". When
a login fails and the server offered gssapi-with-mic, :func:`login_error` finds out
why, on that failure path only, by doing what asyncssh did (acquire the user's
credentials, ask the KDC for the host's service ticket) and reading the GSSAPI error
codes: no ticket, an expired one, a principal the realm does not know, an unreachable
KDC, or a ticket the server did not accept for this User. Each is a one-line error
that says what to run or fix.

A ticket is read when a connection is made: connections that are up stay up when it
expires (SSH does not check it again); a reconnect after expiry fails with the
``kinit`` hint, and one after ``kinit`` succeeds, with no restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import asyncssh

from ..errors import (
    AuthenticationError,
    KerberosError,
    KerberosTicketError,
    KerberosUnavailableError,
)

__all__ = [
    "GSS_METHODS",
    "KERBEROS_EXTRA",
    "PROBE_TIMEOUT",
    "GSSSettings",
    "gss_settings",
    "gssapi_available",
    "login_error",
]

log = logging.getLogger("sshpyk")

#: The SSH userauth methods that use GSSAPI.
GSS_METHODS = ("gssapi-keyex", "gssapi-with-mic")

#: What to install for GSSAPI.
KERBEROS_EXTRA = 'pip install "sshpyk[kerberos]"'

#: Bound on the diagnosis of a failed GSSAPI login (one KDC request; krb5.conf's
#: kdc_timeout and max_retries bound each try inside it).
PROBE_TIMEOUT = 15.0

# Kerberos minor status codes (com_err table krb5, krb5.h), as GSSAPI reports them
# (unsigned 32 bits).
_ERROR_TABLE_KRB5 = -1765328384 & 0xFFFFFFFF
_C_PRINCIPAL_UNKNOWN = _ERROR_TABLE_KRB5 + 6
_S_PRINCIPAL_UNKNOWN = _ERROR_TABLE_KRB5 + 7
_TGT_REVOKED = _ERROR_TABLE_KRB5 + 20
_TKT_EXPIRED = _ERROR_TABLE_KRB5 + 32
_CLOCK_SKEW = _ERROR_TABLE_KRB5 + 37
_WRONG_REALM = _ERROR_TABLE_KRB5 + 68
_REALM_UNKNOWN = _ERROR_TABLE_KRB5 + 154
_KDC_UNREACH = _ERROR_TABLE_KRB5 + 156
_REALM_CANT_RESOLVE = _ERROR_TABLE_KRB5 + 220


@dataclass(frozen=True)
class GSSSettings:
    """What one connection does with GSSAPI, from the ssh config (OpenSSH defaults)."""

    auth: bool = False
    key_exchange: bool = False
    delegate: bool = False
    #: whose ``host/`` service principal is asked for: the connection's HostName
    host: str = ""

    @property
    def enabled(self) -> bool:
        return self.auth or self.key_exchange

    @property
    def service(self) -> str:
        return f"host/{self.host}"

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect``: GSSAPI off entirely (no
        credential lookup) unless the config asks for it."""
        if not self.enabled:
            return {"gss_host": None}
        return {
            "gss_host": self.host,
            "gss_auth": self.auth,
            "gss_kex": self.key_exchange,
            "gss_delegate_creds": self.delegate,
        }


def _flag(config: Any, name: str) -> bool:
    value = config.get(name, False) if config is not None else False
    return bool(value)


def gss_settings(options: asyncssh.SSHClientConnectionOptions) -> GSSSettings:
    """The GSSAPI settings the ssh config gives these options (off when unset, as in
    OpenSSH)."""
    config = getattr(options, "config", None)
    return GSSSettings(
        auth=_flag(config, "GSSAPIAuthentication"),
        key_exchange=_flag(config, "GSSAPIKeyExchange"),
        delegate=_flag(config, "GSSAPIDelegateCredentials"),
        host=str(options.host),
    )


def gssapi_available() -> bool:
    """Whether the ``gssapi`` package (the ``kerberos`` extra) can be imported."""
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return False
    return True


def _ccache() -> str:
    name = os.environ.get("KRB5CCNAME")
    return f"KRB5CCNAME={name}" if name else "the default credential cache"


@dataclass(frozen=True)
class _Probe:
    """What redoing asyncssh's GSSAPI steps found: an error, or the client principal
    whose service ticket was obtained."""

    error: AuthenticationError | None = None
    principal: str | None = None


def _probe(settings: GSSSettings, label: str, alias: str) -> _Probe:
    """Acquire the user's credentials and the host's service ticket, as asyncssh does
    (blocking: run in an executor)."""
    import gssapi
    from gssapi import exceptions as gss_exceptions

    where = f"authentication failed for {label}"
    try:
        creds = gssapi.Credentials(usage="initiate")
        principal = str(creds.name)
        if not creds.lifetime:
            raise gss_exceptions.ExpiredCredentialsError(0, 0)
    except gss_exceptions.MissingCredentialsError:
        return _Probe(
            KerberosTicketError(
                f"{where}: no Kerberos ticket ({_ccache()} has none): run `kinit` and try again"
            )
        )
    except gss_exceptions.ExpiredCredentialsError:
        return _Probe(
            KerberosTicketError(
                f"{where}: the Kerberos ticket in {_ccache()} has expired: run `kinit` "
                "and try again"
            )
        )
    except gss_exceptions.GSSError as exc:
        return _Probe(KerberosError(f"{where}: Kerberos credentials unusable: {_gss_text(exc)}"))
    flags = gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity
    if settings.delegate:
        flags |= gssapi.RequirementFlag.delegate_to_peer
    try:
        target = gssapi.Name(f"host@{settings.host}", gssapi.NameType.hostbased_service)
        gssapi.SecurityContext(name=target, creds=creds, flags=flags).step()
    except gss_exceptions.ExpiredCredentialsError:
        return _Probe(
            KerberosTicketError(
                f"{where}: the Kerberos ticket of {principal} has expired: run `kinit` "
                "and try again"
            )
        )
    except gss_exceptions.GSSError as exc:
        return _Probe(_step_error(exc, settings, where, principal, alias))
    return _Probe(principal=principal)


def _gss_text(exc: Exception) -> str:
    gen = getattr(exc, "gen_message", None)
    text = gen() if callable(gen) else str(exc)
    return " ".join(str(text).split())


def _step_error(
    exc: Exception, settings: GSSSettings, where: str, principal: str, alias: str
) -> AuthenticationError:
    minor = int(getattr(exc, "min_code", 0) or 0) & 0xFFFFFFFF
    realm = principal.rpartition("@")[2] or "?"
    if minor in (_TKT_EXPIRED, _TGT_REVOKED):
        return KerberosTicketError(
            f"{where}: the Kerberos ticket of {principal} has expired: run `kinit` and try again"
        )
    if minor in (_S_PRINCIPAL_UNKNOWN, _WRONG_REALM):
        return KerberosError(
            f"{where}: the KDC of realm {realm} has no service principal "
            f"{settings.service} (wrong realm or principal): HostName must be the host's "
            f"Kerberos name, and krb5.conf's [domain_realm] must map it to its realm "
            f"(`kvno {settings.service}` shows the same error)"
        )
    if minor == _C_PRINCIPAL_UNKNOWN:
        return KerberosTicketError(
            f"{where}: the KDC does not know {principal} any more: run `kinit` for your "
            "current principal"
        )
    if minor in (_KDC_UNREACH, _REALM_UNKNOWN, _REALM_CANT_RESOLVE):
        return KerberosError(
            f"{where}: cannot reach a KDC of realm {realm} for {settings.service}: check "
            "krb5.conf (KRB5_CONFIG) and the network"
        )
    if minor == _CLOCK_SKEW:
        return KerberosError(
            f"{where}: this clock and the KDC's differ too much for Kerberos: sync the clock"
        )
    return KerberosError(
        f"{where}: Kerberos could not get a ticket for {settings.service}: {_gss_text(exc)}"
    )


async def login_error(
    settings: GSSSettings,
    *,
    label: str,
    alias: str,
    user: str,
    offered: list[str],
) -> AuthenticationError | None:
    """Why a login that failed with "permission denied" failed, where Kerberos is
    concerned; None when it is not (then the caller's usual error stands).

    ``offered`` are the methods the server offered; ``label`` names the host in the
    message (a bastion as one), ``user`` is the remote User.
    """
    where = f"authentication failed for {label}"
    gss_offered = [m for m in offered if m in GSS_METHODS]
    others = [m for m in offered if m not in GSS_METHODS]
    if not settings.auth:
        if gss_offered and not others:
            extra = "" if gssapi_available() else f", {KERBEROS_EXTRA}"
            return KerberosError(
                f"{where}: the server only takes Kerberos ({', '.join(gss_offered)}): set "
                f"`GSSAPIAuthentication yes` for {alias} in the ssh config{extra} and run "
                "`kinit`"
            )
        return None
    if not gss_offered:
        if not offered:
            return None
        return KerberosError(
            f"{where}: GSSAPIAuthentication is on for {alias} but the server offers no "
            f"gssapi-with-mic (it offers {', '.join(offered)}): ask its admin for "
            "`GSSAPIAuthentication yes` in sshd_config, or log in with a key"
        )
    if not gssapi_available():
        return KerberosUnavailableError(
            f"{where}: the server takes Kerberos ({', '.join(gss_offered)}) but the gssapi "
            f"package is not installed: {KERBEROS_EXTRA}"
        )
    loop = asyncio.get_running_loop()
    try:
        probe = await asyncio.wait_for(
            loop.run_in_executor(None, _probe, settings, label, alias), PROBE_TIMEOUT
        )
    except asyncio.TimeoutError:
        return KerberosError(
            f"{where}: no answer from the Kerberos KDC within {PROBE_TIMEOUT:g}s: check "
            "krb5.conf (KRB5_CONFIG) and the network"
        )
    if probe.error is not None:
        return probe.error
    log.info(
        "[%s] Kerberos service ticket for %s obtained as %s: the server refused it",
        alias,
        settings.service,
        probe.principal,
    )
    return KerberosError(
        f"{where}: the server did not accept Kerberos principal {probe.principal} as user "
        f"{user}: check User in the ssh config, or add the principal to the remote "
        "~/.k5login"
    )
