"""sshpyk.ssh.hosts: the one builder of asyncssh's connection options (no sshd)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncssh
import pytest
from asyncssh.encryption import get_default_encryption_algs

from sshpyk.errors import (
    HostNotFoundError,
    SSHConfigError,
    SSHPykError,
    translating,
)
from sshpyk.ssh import jump
from sshpyk.ssh.hosts import (
    DEFAULT_KEEPALIVE_COUNT_MAX,
    DEFAULT_KEEPALIVE_INTERVAL,
    JumpTarget,
    config_path,
    host_options,
    preferred_ciphers,
    resolve_host,
)

from support.sshd import write_config

pytestmark = pytest.mark.timeout(30)


async def test_keepalive_is_on_when_the_config_sets_none(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host box\n  HostName 192.0.2.1\n  User alice\n")
    built = await host_options("box", config)
    assert built.overrides["keepalive_interval"] == DEFAULT_KEEPALIVE_INTERVAL
    assert built.overrides["keepalive_count_max"] == DEFAULT_KEEPALIVE_COUNT_MAX
    assert built.options.host == "192.0.2.1" and built.options.username == "alice"


async def test_the_configs_keepalive_stands(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host box\n  ServerAliveInterval 5\n")
    built = await host_options("box", config)
    assert "keepalive_interval" not in built.overrides
    assert built.options.keepalive_interval == 5


async def test_aes_gcm_first_by_default(tmp_path: Path) -> None:
    built = await host_options("box", write_config(tmp_path, "Host box\n  Port 2200\n"))
    algs = built.overrides["encryption_algs"]
    assert algs[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    default = sorted(a.decode() for a in get_default_encryption_algs())
    assert sorted(algs) == default  # reordered, nothing added or dropped
    assert built.options.port == 2200


async def test_the_configs_ciphers_stand(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host box\n  Ciphers aes256-ctr,aes128-ctr\n")
    built = await host_options("box", config)
    assert "encryption_algs" not in built.overrides
    assert list(built.options.encryption_algs) == [b"aes256-ctr", b"aes128-ctr"]


def test_preferred_ciphers_leaves_a_chosen_list_alone() -> None:
    assert preferred_ciphers([b"aes256-ctr"]) is None
    default = list(get_default_encryption_algs())
    assert preferred_ciphers(default)[0] == b"aes128-gcm@openssh.com"  # type: ignore[index]


async def test_proxyjump_from_the_config_and_from_a_chain(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "Host inner\n  ProxyJump gate\nHost direct\n  ProxyJump none\nHost gate\n  User g\n",
    )
    assert (await host_options("inner", config)).proxy_jump == "gate"
    assert (await host_options("direct", config)).proxy_jump is None
    assert (await host_options("gate", config)).proxy_jump is None
    chain = await host_options("a, b ,u@inner:2222", config)
    assert chain.target == JumpTarget("a, b ,u@inner:2222", "inner", "u", 2222, "a, b")
    assert chain.proxy_jump == "a, b"  # the chain's own hops, not inner's ProxyJump
    assert chain.options.port == 2222 and chain.options.username == "u"


async def test_bastion_alias_shortens_a_chain_that_matches_the_config(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "Host deep\n  ProxyJump mid\nHost mid\n  ProxyJump gate\nHost other\n"
    )
    # deep's bastion "mid" is itself reached through gate: one pool alias for both
    assert await jump.bastion_alias(await host_options("deep", config)) == "mid"
    # "gate,mid" is how mid's own config reaches it anyway: the short alias is shared
    assert await jump.bastion_alias(await host_options("gate,mid,x", config)) == "mid"
    # "other,mid" is not: it stays a chain of its own
    assert await jump.bastion_alias(await host_options("other,mid,x", config)) == "other,mid"
    assert await jump.bastion_alias(await host_options("other", config)) is None


@pytest.mark.parametrize("alias", ["gate:ssh", "gate:0", "a,,b", ",b", "a,", "@gate"])
async def test_a_bad_hop_is_a_config_error(alias: str) -> None:
    with pytest.raises(SSHConfigError, match="bad ProxyJump"):
        await host_options(alias, None)


async def test_a_bad_config_line_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, "Host box\n  Port notaport\n")
    with pytest.raises(SSHConfigError) as info:
        await host_options("box", config)
    text = str(info.value)
    assert "\n" not in text and config in text and "'box'" in text, text
    assert info.value.__cause__ is not None  # the asyncssh error it came from


async def test_resolve_host_reports_what_connections_use(tmp_path: Path) -> None:
    key = tmp_path / "id"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    config = write_config(
        tmp_path,
        "Host inner\n  HostName 192.0.2.7\n  User bob\n  Port 2201\n  ProxyJump gate\n"
        f"  IdentityFile {key}\n",
    )
    settings, built = await resolve_host("inner", config)
    assert (settings.hostname, settings.user, settings.port) == ("192.0.2.7", "bob", 2201)
    assert settings.proxy_jump == "gate" == built.proxy_jump
    assert settings.identity_files == (str(key),)
    assert settings.summary() == "HostName 192.0.2.7, User bob, Port 2201, ProxyJump gate"


def test_config_path(tmp_path: Path, home: Path) -> None:
    assert config_path(None) is None
    (home / ".ssh").mkdir()
    (home / ".ssh" / "config").write_text("")
    assert config_path(None) == str(home / ".ssh" / "config")
    with pytest.raises(SSHPykError, match="does not exist"):
        config_path(tmp_path / "missing")


def test_translating_maps_once_and_keeps_the_cause() -> None:
    cause = socket.gaierror(-2, "Name or service not known")
    with pytest.raises(HostNotFoundError, match="unknown host 'box'") as info:
        with translating("box", config="/etc/cfg"):
            raise cause
    assert info.value.__cause__ is cause and "/etc/cfg" in str(info.value)
    mine = SSHConfigError("already ours")
    with pytest.raises(SSHConfigError) as again:
        with translating("box"):
            raise mine
    assert again.value is mine
    with pytest.raises(asyncio.CancelledError):
        with translating("box"):
            raise asyncio.CancelledError
